//! Upstream settlement: events waiting for `event.offline.clear` / `event.offline.error`, and
//! marking them settled (closing the reservations with nothing left to settle).

use super::batches::lane_from_sql;
use super::fence::{Fence, check_events};
use super::{Conn, now};
use crate::journal::types::{PendingSettlement, SettleAction};
use std::collections::BTreeMap;

pub(super) async fn pending_settlements(
    conn: &Conn,
    portal: &str,
) -> anyhow::Result<Vec<PendingSettlement>> {
    let stmt = conn
        .prepare_cached(
            "SELECT e.batch_id, b.process_id, b.lane, e.upstream, e.id, e.offline_id, e.message_id
             FROM events e JOIN batches b ON b.id = e.batch_id
             WHERE e.portal = $1 AND e.upstream IN ('clear_pending', 'error_pending')
             ORDER BY e.batch_id, e.upstream, e.id",
        )
        .await?;
    let mut groups: BTreeMap<(i64, String), PendingSettlement> = BTreeMap::new();
    for row in conn.query(&stmt, &[&portal]).await? {
        let batch_id: i64 = row.get(0);
        let upstream: String = row.get(3);
        let action = if upstream == "error_pending" {
            SettleAction::Error
        } else {
            SettleAction::Clear
        };
        groups
            .entry((batch_id, upstream))
            .or_insert_with(|| PendingSettlement {
                batch_id,
                process_id: row.get(1),
                lane: lane_from_sql(row.get(2)),
                action,
                events: Vec::new(),
            })
            .events
            .push((row.get(4), row.get(5), row.get(6)));
    }
    Ok(groups.into_values().collect())
}

pub(super) async fn mark_settled(
    conn: &mut Conn,
    fence: Option<&Fence>,
    groups: &[(Vec<i64>, SettleAction)],
) -> anyhow::Result<()> {
    let tx = conn.transaction().await?;
    let events: Vec<i64> = groups
        .iter()
        .flat_map(|(ids, _)| ids.iter().copied())
        .collect();
    check_events(&tx, fence, &events).await?;
    let at = now();
    // The events are locked in id order, as `deliveries::settle_if_final` locks them, so the
    // two never wait for each other in a cycle.
    let update = tx
        .prepare_cached(
            "UPDATE events SET upstream = $2, settled_at = $3
             WHERE id IN (SELECT id FROM events WHERE id = ANY($1) AND upstream = $4
                          ORDER BY id FOR NO KEY UPDATE)
             RETURNING batch_id",
        )
        .await?;
    // A batch is closed only once no row of it is left to settle. Its row is locked first, so
    // that a `record_batches` adding rows to it commits before the check (a new statement, so a
    // new snapshot) looks: the check never misses rows journaled meanwhile.
    let lock_batches = tx
        .prepare_cached("SELECT id FROM batches WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .await?;
    let close = tx
        .prepare_cached(
            "UPDATE batches b SET settled_at = $2
             WHERE b.id = ANY($1) AND b.settled_at IS NULL AND NOT EXISTS (
                 SELECT 1 FROM events e WHERE e.batch_id = b.id
                   AND e.upstream IN ('reserved', 'clear_pending', 'error_pending'))",
        )
        .await?;
    for (event_ids, action) in groups {
        let (from, to) = match action {
            SettleAction::Clear => ("clear_pending", "cleared"),
            SettleAction::Error => ("error_pending", "errored"),
        };
        let mut batches: Vec<i64> = tx
            .query(&update, &[event_ids, &to, &at, &from])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        batches.sort_unstable();
        batches.dedup();
        if !batches.is_empty() {
            tx.query(&lock_batches, &[&batches]).await?;
            tx.execute(&close, &[&batches, &at]).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}
