//! Enrichment: events waiting for their entity, and storing what was read (which releases
//! their deliveries).

use super::Conn;
use super::deliveries::storable;
use super::fence::{Fence, check_events};
use crate::journal::types::{Enriched, PendingEnrichment};
use serde_json::Value;
use std::borrow::Cow;

pub(super) async fn pending_enrichment(
    conn: &Conn,
    portal: &str,
    limit: usize,
) -> anyhow::Result<Vec<PendingEnrichment>> {
    let stmt = conn
        .prepare_cached(
            "SELECT id, event, data FROM events
             WHERE portal = $1 AND enrichment IS NOT NULL ORDER BY id LIMIT $2",
        )
        .await?;
    let limit = limit.min(i64::MAX as usize) as i64;
    Ok(conn
        .query(&stmt, &[&portal, &limit])
        .await?
        .iter()
        .map(|r| PendingEnrichment {
            event_id: r.get(0),
            event: r.get(1),
            data: crate::json_depth::from_str(r.get(2)).unwrap_or(Value::Null),
        })
        .collect())
}

pub(super) async fn record_enrichment(
    conn: &mut Conn,
    fence: Option<&Fence>,
    results: &[Enriched],
) -> anyhow::Result<()> {
    if results.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = results.iter().map(|r| r.event_id).collect();
    let entities: Vec<String> = results.iter().map(|r| r.entity.to_string()).collect();
    let errors: Vec<Option<Cow<'_, str>>> = results
        .iter()
        .map(|r| r.error.as_deref().map(storable))
        .collect();
    // One statement after the fence's check. It locks the rows in id order, as the other
    // writers of `events` do. An event named twice keeps its first result, which released it.
    let tx = conn.transaction().await?;
    check_events(&tx, fence, &ids).await?;
    let update = tx
        .prepare_cached(
            "UPDATE events e SET entity = u.entity, entity_error = u.error, enrichment = NULL
             FROM (SELECT DISTINCT ON (id) id, entity, error
                   FROM unnest($1::bigint[], $2::text[], $3::text[]) WITH ORDINALITY
                        AS u(id, entity, error, ord)
                   ORDER BY id, ord) u
             WHERE e.id = u.id AND e.id IN (SELECT id FROM events WHERE id = ANY($1)
                                            AND enrichment IS NOT NULL ORDER BY id FOR NO KEY UPDATE)",
        )
        .await?;
    tx.execute(&update, &[&ids, &entities, &errors]).await?;
    tx.commit().await?;
    Ok(())
}
