//! The operator commands' queries and changes: listing, statistics, one event in detail,
//! replay, dead letters and pruning.

use super::Conn;
use crate::journal::inspect::{EventDetail, EventFilter, EventRow, PortalStats, Pruned, Requeued};
use chrono::{DateTime, Utc};

pub(super) async fn list_events(
    conn: &Conn,
    filter: &EventFilter,
    after: Option<i64>,
) -> anyhow::Result<Vec<EventRow>> {
    todo!()
}

pub(super) async fn stats(conn: &Conn, filter: &EventFilter) -> anyhow::Result<Vec<PortalStats>> {
    todo!()
}

pub(super) async fn show_event(conn: &Conn, id: &str) -> anyhow::Result<Vec<EventDetail>> {
    todo!()
}

pub(super) async fn replay(
    conn: &mut Conn,
    filter: &EventFilter,
    only_sink: Option<&str>,
    known_sinks: &[String],
) -> anyhow::Result<Requeued> {
    todo!()
}

pub(super) async fn retry_dead(
    conn: &mut Conn,
    filter: &EventFilter,
    known_sinks: &[String],
) -> anyhow::Result<Requeued> {
    todo!()
}

pub(super) async fn purge_dead(conn: &mut Conn, filter: &EventFilter) -> anyhow::Result<Pruned> {
    todo!()
}

pub(super) async fn prune(
    conn: &mut Conn,
    cutoff: DateTime<Utc>,
    include_dead: bool,
) -> anyhow::Result<Pruned> {
    todo!()
}
