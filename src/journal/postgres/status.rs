//! What the daemon reports: counts, fetch rates, new dead attempts, the status page's data.

use super::Conn;
use crate::journal::types::{JournalCounts, StatusData};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

pub(super) async fn events_since_row(
    conn: &Conn,
    after: Option<i64>,
) -> anyhow::Result<(i64, BTreeMap<String, u64>)> {
    todo!()
}

pub(super) async fn dead_attempts_since(
    conn: &Conn,
    after: Option<i64>,
) -> anyhow::Result<(i64, u64, Vec<String>)> {
    todo!()
}

pub(super) async fn oldest_pending_fetched_at(
    conn: &Conn,
) -> anyhow::Result<Option<DateTime<Utc>>> {
    todo!()
}

pub(super) async fn counts(conn: &Conn) -> anyhow::Result<JournalCounts> {
    todo!()
}

pub(super) async fn status_data(
    conn: &Conn,
    portals: &[String],
    now: DateTime<Utc>,
) -> anyhow::Result<StatusData> {
    todo!()
}
