//! The SQL of upstream settlement: the events waiting for `event.offline.clear` /
//! `event.offline.error`, grouped by reservation, and marking them settled (closing the
//! reservations with nothing left to settle).

use super::{lane_from_sql, now};
use crate::journal::settle::SettleAction;
use crate::journal::types::PendingSettlement;
use rusqlite::{Connection, params};
use std::collections::BTreeMap;

/// The events of a portal waiting for a settle call. The condition of the `events_unsettled`
/// partial index is written out in full: SQLite uses a partial index only for a query whose
/// WHERE clause contains its condition term for term, and without it this read scanned every
/// event of the portal, settled ones included (a cost that grew with the journal's retention:
/// 20% of the journal's CPU with 100,000 events kept).
pub(super) const PENDING_SETTLEMENTS: &str =
    "SELECT e.batch_id, b.process_id, b.lane, e.upstream, e.id, e.offline_id, e.message_id
     FROM events e JOIN batches b ON b.id = e.batch_id
     WHERE e.portal = ?1 AND e.upstream IN ('reserved', 'clear_pending', 'error_pending')
       AND e.upstream <> 'reserved'
     ORDER BY e.batch_id, e.upstream, e.id";

pub(super) fn pending_settlements(
    conn: &Connection,
    portal: &str,
) -> anyhow::Result<Vec<PendingSettlement>> {
    let mut stmt = conn.prepare_cached(PENDING_SETTLEMENTS)?;
    let mut groups: BTreeMap<(i64, String), PendingSettlement> = BTreeMap::new();
    let rows = stmt.query_map([portal], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, String>(6)?,
        ))
    })?;
    for row in rows {
        let (batch_id, process_id, lane, upstream, id, offline_id, message_id) = row?;
        let action = if upstream == "error_pending" {
            SettleAction::Error
        } else {
            SettleAction::Clear
        };
        groups
            .entry((batch_id, upstream))
            .or_insert_with(|| PendingSettlement {
                batch_id,
                process_id,
                lane: lane_from_sql(&lane),
                action,
                events: Vec::new(),
            })
            .events
            .push((id, offline_id, message_id));
    }
    Ok(groups.into_values().collect())
}

/// Marks the events of `groups` settled upstream, inside the transaction of the group commit
/// that runs it.
pub(super) fn mark_settled(
    tx: &Connection,
    groups: &[(Vec<i64>, SettleAction)],
) -> anyhow::Result<()> {
    let at = now();
    for (event_ids, action) in groups {
        mark_settled_in(tx, event_ids, *action, &at)?;
    }
    Ok(())
}

fn mark_settled_in(
    tx: &Connection,
    event_ids: &[i64],
    action: SettleAction,
    at: &str,
) -> anyhow::Result<()> {
    let (from, to) = match action {
        SettleAction::Clear => ("clear_pending", "cleared"),
        SettleAction::Error => ("error_pending", "errored"),
    };
    // One statement per settle call, not per event: SQLite's per-statement work (the
    // ephemeral tables its CHECK constraints and partial-index conditions build) is paid once.
    let ids = super::id_list(event_ids);
    tx.prepare_cached(
        "UPDATE events SET upstream = ?2, settled_at = ?3
         WHERE id IN (SELECT value FROM json_each(?1)) AND upstream = ?4",
    )?
    .execute(params![ids, to, at, from])?;
    // Their reservations close once nothing of them is left to settle.
    tx.prepare_cached(
        "UPDATE batches SET settled_at = ?2
         WHERE id IN (SELECT DISTINCT batch_id FROM events WHERE id IN (SELECT value FROM json_each(?1)))
           AND settled_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM events e WHERE e.batch_id = batches.id
                             AND e.upstream IN ('reserved', 'clear_pending', 'error_pending'))",
    )?
    .execute(params![ids, at])?;
    Ok(())
}
