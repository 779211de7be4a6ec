//! Reservations: journaling fetched batches with their events and deliveries, and what is
//! still open (`batches`, `events`, `deliveries`).

use super::Conn;
use crate::journal::types::{NewBatch, OpenBatch, RecordedBatch};
use std::collections::HashMap;

pub(super) async fn record_batches(
    conn: &mut Conn,
    batches: &[NewBatch],
) -> anyhow::Result<Vec<RecordedBatch>> {
    todo!()
}

pub(super) async fn open_batches(conn: &Conn, portal: &str) -> anyhow::Result<Vec<OpenBatch>> {
    todo!()
}

pub(super) async fn known_process_ids(
    conn: &Conn,
    portal: &str,
) -> anyhow::Result<HashMap<String, bool>> {
    todo!()
}

pub(super) async fn unsettled_count(conn: &Conn, portal: &str) -> anyhow::Result<u64> {
    todo!()
}

pub(super) async fn undelivered_count(conn: &Conn, portal: &str) -> anyhow::Result<u64> {
    todo!()
}
