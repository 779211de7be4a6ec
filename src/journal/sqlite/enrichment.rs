//! The SQL of enrichment: the events whose entity is still to be read, and storing what was
//! found (which releases their deliveries).

use crate::journal::types::{Enriched, PendingEnrichment};
use rusqlite::{Connection, params};
use serde_json::Value;

pub(super) fn pending_enrichment(
    conn: &Connection,
    portal: &str,
    limit: usize,
) -> anyhow::Result<Vec<PendingEnrichment>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, event, data FROM events
         WHERE portal = ?1 AND enrichment IS NOT NULL ORDER BY id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![portal, limit as i64], |r| {
        Ok(PendingEnrichment {
            event_id: r.get(0)?,
            event: r.get(1)?,
            data: r
                .get::<_, String>(2)
                .ok()
                .and_then(|t| crate::json_depth::from_str(&t).ok())
                .unwrap_or(Value::Null),
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

pub(super) fn record_enrichment(conn: &mut Connection, results: &[Enriched]) -> anyhow::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut update = tx.prepare_cached(
            "UPDATE events SET entity = ?2, entity_error = ?3, enrichment = NULL
             WHERE id = ?1 AND enrichment IS NOT NULL",
        )?;
        for r in results {
            update.execute(params![r.event_id, r.entity.to_string(), r.error])?;
        }
    }
    tx.commit()?;
    Ok(())
}
