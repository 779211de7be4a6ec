//! Enrichment: events waiting for their entity, and storing what was read.

use super::Conn;
use crate::journal::types::{Enriched, PendingEnrichment};

pub(super) async fn pending_enrichment(
    conn: &Conn,
    portal: &str,
    limit: usize,
) -> anyhow::Result<Vec<PendingEnrichment>> {
    todo!()
}

pub(super) async fn record_enrichment(conn: &mut Conn, results: &[Enriched]) -> anyhow::Result<()> {
    todo!()
}
