//! Deliveries: what is due, attempt outcomes with the settle lattice, and retiring sinks
//! (`deliveries`, `delivery_attempts`).

use super::Conn;
use crate::journal::types::{DueDelivery, Outcome};
use chrono::{DateTime, Utc};

pub(super) async fn due_deliveries(
    conn: &Conn,
    sink: &str,
    now: DateTime<Utc>,
    limit: usize,
) -> anyhow::Result<Vec<DueDelivery>> {
    todo!()
}

pub(super) async fn bring_forward(
    conn: &Conn,
    sink: &str,
    latest: DateTime<Utc>,
) -> anyhow::Result<usize> {
    todo!()
}

pub(super) async fn next_due(conn: &Conn, sink: &str) -> anyhow::Result<Option<DateTime<Utc>>> {
    todo!()
}

pub(super) async fn record_outcomes(
    conn: &mut Conn,
    sink: &str,
    outcomes: &[(i64, Outcome, Option<String>)],
) -> anyhow::Result<Vec<String>> {
    todo!()
}

pub(super) async fn drop_unknown_sinks(
    conn: &mut Conn,
    known: &[String],
) -> anyhow::Result<Vec<(String, u64)>> {
    todo!()
}
