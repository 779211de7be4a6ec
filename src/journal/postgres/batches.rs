//! Reservations: journaling fetched batches with their events and deliveries (the
//! one-key-per-change rule and the error-lane copies included), and what is still open
//! (`batches`, `events`, `deliveries`).
//!
//! A batch costs a fixed number of round trips whatever its size: its known rows, the first
//! rows of its changes and (error lane) the sinks that have them are read with one query each
//! (a `LATERAL` index lookup per event, by portal and offline ID), and its events and
//! deliveries are written with one `INSERT ... SELECT FROM unnest(...)` each.

use super::deliveries::storable;
use super::fence::{Fence, check};
use super::tokens::ensure_portal;
use super::{Conn, now};
use crate::envelope::{Envelope, Lane};
use crate::journal::types::{NewBatch, NewEvent, OpenBatch, RecordedBatch};
use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use std::collections::{HashMap, HashSet};

/// A lane as the journal names it; an unknown name reads as the normal lane.
pub(super) fn lane_from_sql(s: &str) -> Lane {
    Lane::parse(s).unwrap_or(Lane::Normal)
}

pub(super) async fn record_batches(
    conn: &mut Conn,
    fence: Option<&Fence>,
    batches: &[NewBatch],
) -> anyhow::Result<Vec<RecordedBatch>> {
    let tx = conn.transaction().await?;
    let portals: Vec<String> = batches.iter().map(|b| b.portal.clone()).collect();
    check(&tx, fence, &portals).await?;
    let mut recorded = Vec::with_capacity(batches.len());
    for batch in batches {
        recorded.push(record_batch_in(&tx, batch).await?);
    }
    tx.commit().await?;
    crate::journal::types::log_known_changes(batches, &recorded);
    Ok(recorded)
}

/// What happens to one event of a batch.
enum Fate {
    /// The journal has it under this reservation, with this upstream state.
    Known(String),
    /// New to the journal: inserted.
    New,
    /// The same offline ID appeared earlier in the batch: the `i`-th row inserted.
    Again(usize),
}

/// An event row about to be inserted.
struct NewRow<'a> {
    event: &'a NewEvent,
    change: String,
    envelope_id: String,
    sinks: Vec<&'a String>,
    upstream: &'static str,
}

async fn record_batch_in(tx: &Transaction<'_>, batch: &NewBatch) -> anyhow::Result<RecordedBatch> {
    ensure_portal(tx, &batch.portal).await?;
    let fetched_at = now();
    if batch.new_reservation {
        let rename = tx
            .prepare_cached(
                "UPDATE batches SET process_id = process_id || '#' || id
                 WHERE portal = $1 AND process_id = $2 AND settled_at IS NOT NULL",
            )
            .await?;
        let renamed = tx
            .execute(&rename, &[&batch.portal, &batch.process_id])
            .await?;
        if renamed > 0 {
            tracing::warn!(portal = %batch.portal, process_id = %batch.process_id, "the portal handed out the process_id of a settled batch again: journaled as a new reservation; the settled batch keeps its history as <process_id>#<batch id>");
        }
    }
    let (batch_id, created) = batch_row(tx, batch, fetched_at).await?;
    let mut recorded = RecordedBatch {
        batch_id,
        ..RecordedBatch::default()
    };

    // The rows this reservation already has (none when the batch row is new).
    let mut known: HashMap<i64, String> = HashMap::new();
    if !created {
        let offline_ids: Vec<i64> = batch.events.iter().map(|e| e.offline_id).collect();
        let find = tx
            .prepare_cached(
                "SELECT offline_id, upstream FROM events WHERE batch_id = $1 AND offline_id = ANY($2)",
            )
            .await?;
        for row in tx.query(&find, &[&batch_id, &offline_ids]).await? {
            known.insert(row.get(0), row.get(1));
        }
    }
    let mut fates = Vec::with_capacity(batch.events.len());
    let mut rows: Vec<NewRow<'_>> = Vec::new();
    let mut row_of: HashMap<i64, usize> = HashMap::new();
    for e in &batch.events {
        if let Some(upstream) = known.get(&e.offline_id) {
            fates.push(Fate::Known(upstream.clone()));
        } else if let Some(&i) = row_of.get(&e.offline_id) {
            fates.push(Fate::Again(i));
        } else {
            row_of.insert(e.offline_id, rows.len());
            fates.push(Fate::New);
            rows.push(NewRow {
                event: e,
                change: Envelope::change_key(&e.timestamp),
                envelope_id: String::new(),
                sinks: e.sinks.iter().collect(),
                upstream: "reserved",
            });
        }
    }

    // One key per change, forever: the first row of a change journaled before (an error-lane
    // copy, or a row keyed before keys carried the change) lends its key.
    let offline_ids: Vec<i64> = rows.iter().map(|r| r.event.offline_id).collect();
    let changes: Vec<&str> = rows.iter().map(|r| r.change.as_str()).collect();
    let mut earlier: HashMap<(i64, String), String> = HashMap::new();
    if !rows.is_empty() {
        let first_of_change = tx
            .prepare_cached(
                "SELECT u.offline_id, u.change_key, f.envelope_id
                 FROM unnest($2::bigint[], $3::text[]) AS u(offline_id, change_key)
                 CROSS JOIN LATERAL (
                     SELECT envelope_id FROM events
                     WHERE portal = $1 AND offline_id = u.offline_id AND change_key = u.change_key
                     ORDER BY id LIMIT 1) f",
            )
            .await?;
        for row in tx
            .query(&first_of_change, &[&batch.portal, &offline_ids, &changes])
            .await?
        {
            earlier.insert((row.get(0), row.get(1)), row.get(2));
        }
    }
    // The copy `event.offline.error` left in the error lane: the sinks that had it (or are
    // getting it again: a dead retry or a replay in progress) must not get it twice.
    let mut had: HashSet<(i64, String, String)> = HashSet::new();
    if batch.lane == Lane::Error && !earlier.is_empty() {
        let copies: Vec<&NewRow<'_>> = rows
            .iter()
            .filter(|r| earlier.contains_key(&(r.event.offline_id, r.change.clone())))
            .collect();
        let offline_ids: Vec<i64> = copies.iter().map(|r| r.event.offline_id).collect();
        let changes: Vec<&str> = copies.iter().map(|r| r.change.as_str()).collect();
        let sinks_with_change = tx
            .prepare_cached(
                "SELECT DISTINCT u.offline_id, u.change_key, s.sink
                 FROM unnest($2::bigint[], $3::text[]) AS u(offline_id, change_key)
                 CROSS JOIN LATERAL (
                     SELECT d.sink FROM events e JOIN deliveries d ON d.event_id = e.id
                     WHERE e.portal = $1 AND e.offline_id = u.offline_id
                       AND e.change_key = u.change_key AND d.status IN ('delivered', 'pending')) s",
            )
            .await?;
        for row in tx
            .query(&sinks_with_change, &[&batch.portal, &offline_ids, &changes])
            .await?
        {
            had.insert((row.get(0), row.get(1), row.get(2)));
        }
    }
    for r in &mut rows {
        let offline_id = r.event.offline_id;
        match earlier.remove(&(offline_id, r.change.clone())) {
            Some(envelope_id) => {
                if batch.lane == Lane::Error {
                    r.sinks.retain(|sink| {
                        !had.contains(&(offline_id, r.change.clone(), sink.to_string()))
                    });
                    recorded.known_changes += 1;
                    recorded.known_change_deliveries += r.sinks.len();
                    recorded.known_changes_done += usize::from(r.sinks.is_empty());
                }
                r.envelope_id = envelope_id;
            }
            None => {
                r.envelope_id = Envelope::id_of_change(&batch.portal, offline_id, &r.change);
            }
        }
        // With no sink to deliver to, the lattice settles the event at once.
        r.upstream = match (batch.deleted_upstream, r.sinks.is_empty()) {
            (true, _) => "cleared",
            (false, true) => "clear_pending",
            (false, false) => "reserved",
        };
    }
    for (e, fate) in batch.events.iter().zip(&fates) {
        let upstream = match fate {
            Fate::New => {
                recorded.inserted += 1;
                continue;
            }
            Fate::Known(upstream) => upstream.as_str(),
            Fate::Again(i) => rows[*i].upstream,
        };
        if upstream == "cleared" || upstream == "errored" {
            recorded
                .known_settled
                .push((e.offline_id, e.message_id.clone()));
        } else {
            recorded.known_unsettled += 1;
        }
    }

    insert_rows(tx, batch, batch_id, fetched_at, &rows).await?;
    if batch.deleted_upstream {
        let close = tx
            .prepare_cached("UPDATE batches SET settled_at = $2 WHERE id = $1")
            .await?;
        tx.execute(&close, &[&batch_id, &fetched_at]).await?;
        let settle = tx
            .prepare_cached(
                "UPDATE events SET settled_at = $2 WHERE batch_id = $1 AND settled_at IS NULL",
            )
            .await?;
        tx.execute(&settle, &[&batch_id, &fetched_at]).await?;
    } else if recorded.inserted > 0 {
        let reopen = tx
            .prepare_cached(
                "UPDATE batches SET settled_at = NULL WHERE id = $1 AND settled_at IS NOT NULL",
            )
            .await?;
        tx.execute(&reopen, &[&batch_id]).await?;
    }
    Ok(recorded)
}

/// The batch row of `batch`, inserted if new: `(id, whether it was inserted now)`. Either way
/// the row is this transaction's until it commits.
async fn batch_row(
    tx: &Transaction<'_>,
    batch: &NewBatch,
    fetched_at: DateTime<Utc>,
) -> anyhow::Result<(i64, bool)> {
    let insert = tx
        .prepare_cached(
            "INSERT INTO batches (portal, process_id, lane, origin, fetched_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (portal, process_id) DO NOTHING RETURNING id",
        )
        .await?;
    let inserted = tx
        .query_opt(
            &insert,
            &[
                &batch.portal,
                &batch.process_id,
                &batch.lane.as_str(),
                &batch.origin.as_str(),
                &fetched_at,
            ],
        )
        .await?;
    if let Some(row) = inserted {
        return Ok((row.get(0), true));
    }
    // Locked to the commit: a settle closing this batch meanwhile waits, then sees the rows
    // added here (see `settlements::mark_settled`).
    let select = tx
        .prepare_cached(
            "SELECT id FROM batches WHERE portal = $1 AND process_id = $2 FOR NO KEY UPDATE",
        )
        .await?;
    let row = tx
        .query_one(&select, &[&batch.portal, &batch.process_id])
        .await?;
    Ok((row.get(0), false))
}

/// Inserts the new rows of a batch and their pending deliveries: two statements, rows in the
/// batch's order (so row ids follow it, as the SQLite journal's do).
async fn insert_rows(
    tx: &Transaction<'_>,
    batch: &NewBatch,
    batch_id: i64,
    fetched_at: DateTime<Utc>,
    rows: &[NewRow<'_>],
) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let column = |f: &dyn Fn(&NewRow<'_>) -> String| rows.iter().map(f).collect::<Vec<String>>();
    let envelope_ids = column(&|r| r.envelope_id.clone());
    let offline_ids: Vec<i64> = rows.iter().map(|r| r.event.offline_id).collect();
    // A portal's strings with a NUL in them (which `text` cannot hold) would stop the portal's
    // journaling for good: stored with U+FFFD instead.
    let events = column(&|r| storable(&r.event.event).into_owned());
    let message_ids = column(&|r| storable(&r.event.message_id).into_owned());
    let timestamps = column(&|r| storable(&r.event.timestamp).into_owned());
    let data = column(&|r| r.event.data.to_string());
    let additional = column(&|r| r.event.additional.to_string());
    let statuses: Vec<&str> = rows
        .iter()
        .map(|r| {
            if r.sinks.is_empty() {
                "delivered"
            } else {
                "pending"
            }
        })
        .collect();
    let upstreams: Vec<&str> = rows.iter().map(|r| r.upstream).collect();
    // An event no sink wants is not worth a request.
    let enrichment: Vec<Option<&str>> = rows
        .iter()
        .map(|r| (r.event.enrich && !r.sinks.is_empty()).then_some("pending"))
        .collect();
    let changes = column(&|r| r.change.clone());
    let insert_events = tx
        .prepare_cached(
            "INSERT INTO events (envelope_id, portal, batch_id, offline_id, event, message_id, timestamp,
                                 data, additional, lane, fetched_at, status, upstream, enrichment, change_key)
             SELECT u.envelope_id, $1, $2, u.offline_id, u.event, u.message_id, u.timestamp, u.data,
                    u.additional, $3, $4, u.status, u.upstream, u.enrichment, u.change_key
             FROM unnest($5::text[], $6::bigint[], $7::text[], $8::text[], $9::text[], $10::text[],
                         $11::text[], $12::text[], $13::text[], $14::text[], $15::text[])
                  WITH ORDINALITY AS u(envelope_id, offline_id, event, message_id, timestamp, data,
                                       additional, status, upstream, enrichment, change_key, ord)
             ORDER BY u.ord
             RETURNING id, offline_id",
        )
        .await?;
    let inserted = tx
        .query(
            &insert_events,
            &[
                &batch.portal,
                &batch_id,
                &batch.lane.as_str(),
                &fetched_at,
                &envelope_ids,
                &offline_ids,
                &events,
                &message_ids,
                &timestamps,
                &data,
                &additional,
                &statuses,
                &upstreams,
                &enrichment,
                &changes,
            ],
        )
        .await?;
    let id_of: HashMap<i64, i64> = inserted.iter().map(|r| (r.get(1), r.get(0))).collect();
    let mut event_ids = Vec::new();
    let mut sinks = Vec::new();
    for r in rows {
        let id = *id_of.get(&r.event.offline_id).ok_or_else(|| {
            anyhow::anyhow!("journal: event {} was not inserted", r.event.offline_id)
        })?;
        for sink in &r.sinks {
            event_ids.push(id);
            sinks.push(sink.as_str());
        }
    }
    if !event_ids.is_empty() {
        let insert_deliveries = tx
            .prepare_cached(
                "INSERT INTO deliveries (event_id, sink, status, attempts, next_attempt_at)
                 SELECT u.event_id, u.sink, 'pending', 0, $1
                 FROM unnest($2::bigint[], $3::text[]) AS u(event_id, sink)",
            )
            .await?;
        tx.execute(&insert_deliveries, &[&fetched_at, &event_ids, &sinks])
            .await?;
    }
    Ok(())
}

pub(super) async fn open_batches(conn: &Conn, portal: &str) -> anyhow::Result<Vec<OpenBatch>> {
    let stmt = conn
        .prepare_cached(
            "SELECT id, process_id, lane FROM batches WHERE portal = $1 AND settled_at IS NULL ORDER BY id",
        )
        .await?;
    Ok(conn
        .query(&stmt, &[&portal])
        .await?
        .iter()
        .map(|r| OpenBatch {
            batch_id: r.get(0),
            process_id: r.get(1),
            lane: lane_from_sql(r.get(2)),
        })
        .collect())
}

pub(super) async fn known_process_ids(
    conn: &Conn,
    portal: &str,
) -> anyhow::Result<HashMap<String, bool>> {
    let stmt = conn
        .prepare_cached("SELECT process_id, settled_at IS NOT NULL FROM batches WHERE portal = $1")
        .await?;
    Ok(conn
        .query(&stmt, &[&portal])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

pub(super) async fn unsettled_count(conn: &Conn, portal: &str) -> anyhow::Result<u64> {
    let stmt = conn
        .prepare_cached(
            "SELECT COUNT(*) FROM events
             WHERE portal = $1 AND upstream IN ('reserved', 'clear_pending', 'error_pending')",
        )
        .await?;
    let n: i64 = conn.query_one(&stmt, &[&portal]).await?.get(0);
    Ok(n.max(0) as u64)
}

pub(super) async fn undelivered_count(conn: &Conn, portal: &str) -> anyhow::Result<u64> {
    let stmt = conn
        .prepare_cached("SELECT COUNT(*) FROM events WHERE portal = $1 AND status = 'pending'")
        .await?;
    let n: i64 = conn.query_one(&stmt, &[&portal]).await?.get(0);
    Ok(n.max(0) as u64)
}
