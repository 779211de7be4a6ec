//! The SQL of reservations: a batch with its events and deliveries journaled in one
//! transaction (the one-key-per-change rule and the error-lane copies included), and what the
//! poller reads back about them.

use super::tokens::ensure_portal;
use super::{lane_from_sql, now};
use crate::envelope::{Envelope, Lane};
use crate::journal::types::{NewBatch, NewEvent, OpenBatch, RecordedBatch};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::{BTreeMap, HashMap};

/// Journals `batches`, inside the transaction of the group commit that runs it: the caller
/// logs the known changes once that transaction is committed.
pub(super) fn record_batches(
    tx: &Connection,
    batches: &[NewBatch],
) -> anyhow::Result<Vec<RecordedBatch>> {
    batches
        .iter()
        .map(|batch| record_batch_in(tx, batch))
        .collect::<anyhow::Result<Vec<_>>>()
}

fn record_batch_in(tx: &Connection, batch: &NewBatch) -> anyhow::Result<RecordedBatch> {
    ensure_portal(tx, &batch.portal)?;
    let fetched_at = now();
    if batch.new_reservation {
        let renamed = tx
            .prepare_cached(
                "UPDATE batches SET process_id = process_id || '#' || id
                 WHERE portal = ?1 AND process_id = ?2 AND settled_at IS NOT NULL",
            )?
            .execute(params![batch.portal, batch.process_id])?;
        if renamed > 0 {
            tracing::warn!(portal = %batch.portal, process_id = %batch.process_id, "the portal handed out the process_id of a settled batch again: journaled as a new reservation; the settled batch keeps its history as <process_id>#<batch id>");
        }
    }
    // A batch row made here holds no events yet: nothing of it needs looking up (the usual
    // case, a fresh reservation). A known one (a re-read, an adoption) is looked up per event.
    let inserted: Option<i64> = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO batches (portal, process_id, lane, origin, fetched_at) VALUES (?1, ?2, ?3, ?4, ?5)
             RETURNING id",
        )?
        .query_row(
            params![batch.portal, batch.process_id, batch.lane.as_str(), batch.origin.as_str(), fetched_at],
            |r| r.get(0),
        )
        .optional()?;
    let fresh = inserted.is_some();
    let batch_id: i64 = match inserted {
        Some(id) => id,
        None => tx.query_row(
            "SELECT id FROM batches WHERE portal = ?1 AND process_id = ?2",
            params![batch.portal, batch.process_id],
            |r| r.get(0),
        )?,
    };
    let mut recorded = RecordedBatch {
        batch_id,
        ..RecordedBatch::default()
    };
    // The rows this batch adds, written after the loop by a few multi-row statements.
    let mut rows: Vec<EventRow<'_>> = Vec::with_capacity(batch.events.len());
    // Per sink, the offline IDs of the rows it gets a delivery of.
    let mut deliveries: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    // The upstream state of each row added here, by offline ID: an answer listing a row twice
    // journals it once.
    let mut added: HashMap<i64, &'static str> = HashMap::new();
    {
        let mut find = tx.prepare_cached(
            "SELECT id, upstream FROM events WHERE batch_id = ?1 AND offline_id = ?2",
        )?;
        // The first row of the same change (same portal, offline ID and change), whose key a
        // later row of that change keeps.
        let mut first_of_change = tx.prepare_cached(
            "SELECT envelope_id FROM events WHERE portal = ?1 AND offline_id = ?2 AND change_key = ?3
             ORDER BY id LIMIT 1",
        )?;
        // The sinks that have a change, or are about to (a pending delivery: a dead retry or a
        // replay in progress), in any earlier row.
        let mut sinks_with_change = tx.prepare_cached(
            "SELECT DISTINCT d.sink FROM deliveries d JOIN events e ON e.id = d.event_id
             WHERE e.portal = ?1 AND e.offline_id = ?2 AND e.change_key = ?3
               AND d.status IN ('delivered', 'pending')",
        )?;
        for e in &batch.events {
            // A fresh batch holds only the rows added here; a known one is looked up.
            let known: Option<String> = match added.get(&e.offline_id) {
                Some(upstream) => Some((*upstream).to_string()),
                None if fresh => None,
                None => find
                    .query_row(params![batch_id, e.offline_id], |r| r.get(1))
                    .optional()?,
            };
            if let Some(upstream) = known {
                if upstream == "cleared" || upstream == "errored" {
                    recorded
                        .known_settled
                        .push((e.offline_id, e.message_id.clone()));
                } else {
                    recorded.known_unsettled += 1;
                }
                continue;
            }
            // One key per change, forever: a row of a change journaled before (an error-lane
            // copy, or a row keyed before keys carried the change) lends its key.
            let change = Envelope::change_key(&e.timestamp);
            let earlier: Option<String> = first_of_change
                .query_row(params![batch.portal, e.offline_id, change], |r| r.get(0))
                .optional()?;
            let mut sinks: Vec<&String> = e.sinks.iter().collect();
            if batch.lane == Lane::Error && earlier.is_some() {
                // The copy `event.offline.error` left in the error lane: the sinks that had it
                // (or are getting it again) must not get it twice.
                let had: Vec<String> = sinks_with_change
                    .query_map(params![batch.portal, e.offline_id, change], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                sinks.retain(|sink| !had.contains(sink));
                recorded.known_changes += 1;
                recorded.known_change_deliveries += sinks.len();
                recorded.known_changes_done += usize::from(sinks.is_empty());
            }
            let envelope_id = earlier
                .unwrap_or_else(|| Envelope::id_of_change(&batch.portal, e.offline_id, &change));
            // With no sink to deliver to, the lattice settles the event at once.
            let status = if sinks.is_empty() {
                "delivered"
            } else {
                "pending"
            };
            let upstream = match (batch.deleted_upstream, sinks.is_empty()) {
                (true, _) => "cleared",
                (false, true) => "clear_pending",
                (false, false) => "reserved",
            };
            if let Some(twice) = sinks
                .iter()
                .enumerate()
                .find_map(|(n, sink)| sinks[..n].contains(sink).then_some(sink))
            {
                anyhow::bail!(
                    "event {} of reservation {} is routed to sink {twice} twice",
                    e.offline_id,
                    batch.process_id
                );
            }
            for sink in &sinks {
                deliveries
                    .entry(sink.as_str())
                    .or_default()
                    .push(e.offline_id);
            }
            rows.push(EventRow {
                event: e,
                envelope_id,
                data: e.data.to_string(),
                additional: e.additional.to_string(),
                status,
                upstream,
                // An event no sink wants is not worth a request.
                enrichment: (e.enrich && !sinks.is_empty()).then_some("pending"),
                change,
            });
            added.insert(e.offline_id, upstream);
            recorded.inserted += 1;
        }
    }
    insert_events(tx, batch, batch_id, &fetched_at, &rows)?;
    for (sink, offline_ids) in &deliveries {
        tx.prepare_cached(
            "INSERT INTO deliveries (event_id, sink, status, attempts, next_attempt_at)
             SELECT e.id, ?3, 'pending', 0, ?4 FROM events e
             WHERE e.batch_id = ?1 AND e.offline_id IN (SELECT value FROM json_each(?2))",
        )?
        .execute(params![
            batch_id,
            super::id_list(offline_ids),
            sink,
            fetched_at
        ])?;
    }
    if batch.deleted_upstream {
        tx.execute(
            "UPDATE batches SET settled_at = ?2 WHERE id = ?1",
            params![batch_id, fetched_at],
        )?;
        tx.execute(
            "UPDATE events SET settled_at = ?2 WHERE batch_id = ?1 AND settled_at IS NULL",
            params![batch_id, fetched_at],
        )?;
    } else if recorded.inserted > 0 && !fresh {
        // A known reservation with rows new to it is open again (a fresh one is open already).
        tx.prepare_cached("UPDATE batches SET settled_at = NULL WHERE id = ?1")?
            .execute([batch_id])?;
    }
    Ok(recorded)
}

/// An event row to insert, with the values the journal adds to what the portal sent.
struct EventRow<'a> {
    event: &'a NewEvent,
    envelope_id: String,
    data: String,
    additional: String,
    status: &'static str,
    upstream: &'static str,
    enrichment: Option<&'static str>,
    change: String,
}

/// The most rows one `INSERT INTO events` writes (15 values each).
const MAX_ROWS_PER_INSERT: usize = 32;

/// Inserts `rows` with multi-row `INSERT … VALUES` statements of 32, 16, 8, 4, 2 and 1 rows
/// (at most six shapes to keep prepared): SQLite builds the lookup tables of the table's
/// `CHECK (… IN …)` constraints and partial-index conditions once per statement, so a
/// reservation of 50 events pays for them three times instead of fifty.
fn insert_events(
    tx: &Connection,
    batch: &NewBatch,
    batch_id: i64,
    fetched_at: &str,
    rows: &[EventRow<'_>],
) -> anyhow::Result<()> {
    let lane = batch.lane.as_str();
    let mut rest = rows;
    while !rest.is_empty() {
        let size = chunk_size(rest.len());
        let (chunk, after) = rest.split_at(size);
        let mut values: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(size * 15);
        for row in chunk {
            let e = row.event;
            values.extend_from_slice(&[
                &row.envelope_id,
                &batch.portal,
                &batch_id,
                &e.offline_id,
                &e.event,
                &e.message_id,
                &e.timestamp,
                &row.data,
                &row.additional,
                &lane,
                &fetched_at,
                &row.status,
                &row.upstream,
                &row.enrichment,
                &row.change,
            ]);
        }
        tx.prepare_cached(&insert_events_sql(size))?
            .execute(rusqlite::params_from_iter(values))?;
        rest = after;
    }
    Ok(())
}

/// The largest power of two up to [`MAX_ROWS_PER_INSERT`] that is at most `left`.
fn chunk_size(left: usize) -> usize {
    let mut size = MAX_ROWS_PER_INSERT;
    while size > left {
        size /= 2;
    }
    size
}

/// `INSERT INTO events … VALUES` with `rows` rows of 15 positional parameters.
fn insert_events_sql(rows: usize) -> String {
    const ROW: &str = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    let mut sql = String::from(
        "INSERT INTO events (envelope_id, portal, batch_id, offline_id, event, message_id, timestamp, data,
                             additional, lane, fetched_at, status, upstream, enrichment, change_key) VALUES ",
    );
    for n in 0..rows {
        if n > 0 {
            sql.push_str(", ");
        }
        sql.push_str(ROW);
    }
    sql
}

pub(super) fn open_batches(conn: &Connection, portal: &str) -> anyhow::Result<Vec<OpenBatch>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, process_id, lane FROM batches WHERE portal = ?1 AND settled_at IS NULL ORDER BY id",
    )?;
    let rows = stmt.query_map([portal], |r| {
        Ok(OpenBatch {
            batch_id: r.get(0)?,
            process_id: r.get(1)?,
            lane: lane_from_sql(&r.get::<_, String>(2)?),
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

pub(super) fn known_process_ids(
    conn: &Connection,
    portal: &str,
) -> anyhow::Result<HashMap<String, bool>> {
    let mut stmt = conn.prepare_cached(
        "SELECT process_id, settled_at IS NOT NULL FROM batches WHERE portal = ?1",
    )?;
    let rows = stmt.query_map([portal], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?))
    })?;
    Ok(rows.collect::<Result<HashMap<_, _>, _>>()?)
}

pub(super) fn unsettled_count(conn: &Connection, portal: &str) -> anyhow::Result<u64> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM events WHERE portal = ?1 AND upstream IN ('reserved', 'clear_pending', 'error_pending')",
        [portal],
        |r| r.get(0),
    )?;
    Ok(n as u64)
}

pub(super) fn undelivered_count(conn: &Connection, portal: &str) -> anyhow::Result<u64> {
    let n: i64 = conn.query_row(
        "SELECT COUNT(*) FROM events WHERE portal = ?1 AND status = 'pending'",
        [portal],
        |r| r.get(0),
    )?;
    Ok(n as u64)
}

#[cfg(test)]
mod tests {
    use super::chunk_size;

    /// The row counts of the multi-row inserts that write `rows` rows.
    fn shapes(mut rows: usize) -> Vec<usize> {
        let mut sizes = Vec::new();
        while rows > 0 {
            let size = chunk_size(rows);
            sizes.push(size);
            rows -= size;
        }
        sizes
    }

    #[test]
    fn a_reservation_is_written_by_at_most_six_shapes_of_insert() {
        assert_eq!(shapes(50), [32, 16, 2]);
        assert_eq!(shapes(63), [32, 16, 8, 4, 2, 1]);
        assert_eq!(shapes(1), [1]);
        assert_eq!(shapes(100), [32, 32, 32, 4]);
        assert!(shapes(0).is_empty());
        for rows in 1..=1000 {
            let sizes = shapes(rows);
            assert_eq!(sizes.iter().sum::<usize>(), rows);
            assert!(sizes.iter().all(|s| [1, 2, 4, 8, 16, 32].contains(s)));
        }
    }
}
