//! The SQL of deliveries: which are due, their outcomes, and the settle lattice applied to an
//! event in the transaction that makes its last delivery final.

use super::{lane_from_sql, now, parse_time, state_from_sql};
use crate::envelope::Envelope;
use crate::journal::settle::{self, DeliveryState, SettleAction};
use crate::journal::timestamp;
use crate::journal::types::{DueDelivery, Outcome};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

pub(super) fn due_deliveries(
    conn: &Connection,
    sink: &str,
    now: &str,
    limit: usize,
) -> anyhow::Result<Vec<DueDelivery>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT d.event_id, d.attempts, {ENVELOPE_COLUMNS}, e.fetched_at
         FROM deliveries d JOIN events e ON e.id = d.event_id
         WHERE d.sink = ?1 AND d.status = 'pending' AND d.next_attempt_at <= ?2
           AND e.enrichment IS NULL
         ORDER BY d.next_attempt_at, d.event_id
         LIMIT ?3"
    ))?;
    let rows = stmt.query_map(params![sink, now, limit as i64], |r| {
        let attempts: u32 = r.get(1)?;
        Ok(DueDelivery {
            event_id: r.get(0)?,
            attempts,
            envelope: envelope_at(r, 2, attempts + 1)?,
            fetched_at: parse_time(r.get(2 + ENVELOPE_WIDTH)?),
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

/// The columns of `events e` that make an envelope, in the order [`envelope_at`] reads them.
pub(super) const ENVELOPE_COLUMNS: &str = "e.envelope_id, e.portal, e.event, e.offline_id, e.message_id, \
     e.timestamp, e.data, e.additional, e.lane, e.entity, e.entity_error";
/// How many columns [`ENVELOPE_COLUMNS`] has.
pub(super) const ENVELOPE_WIDTH: usize = 11;

/// Reads an envelope from [`ENVELOPE_COLUMNS`] starting at column `first`. JSON columns that do
/// not parse (never written by this crate) read as `null`.
pub(super) fn envelope_at(
    r: &rusqlite::Row<'_>,
    first: usize,
    attempt: u32,
) -> rusqlite::Result<Envelope> {
    let json = |i: usize| -> rusqlite::Result<Value> {
        let text: Option<String> = r.get(first + i)?;
        Ok(text
            .and_then(|t| crate::json_depth::from_str(&t).ok())
            .unwrap_or(Value::Null))
    };
    Ok(Envelope {
        id: r.get(first)?,
        portal: r.get(first + 1)?,
        event: r.get(first + 2)?,
        offline_id: r.get(first + 3)?,
        message_id: r.get(first + 4)?,
        timestamp: r.get(first + 5)?,
        data: json(6)?,
        additional: json(7)?,
        lane: lane_from_sql(&r.get::<_, String>(first + 8)?),
        attempt,
        entity: json(9)?,
        entity_error: r.get(first + 10)?,
    })
}

/// Journals a sink's outcomes and settles the events they made final, inside the transaction
/// of the group commit that runs it.
pub(super) fn record_outcomes(
    tx: &Connection,
    sink: &str,
    outcomes: &[(i64, Outcome, Option<String>)],
) -> anyhow::Result<Vec<String>> {
    let at = now();
    // The events with a delivery made final here: the settle lattice runs on them at the end.
    let mut made_final: Vec<i64> = Vec::new();
    // A delivery with nothing to keep but its success, the usual outcome, is journaled with the
    // others of its batch in one statement each (its attempt row, its delivery row): SQLite's
    // per-statement work is paid per batch, not per event.
    let plain: Vec<i64> = outcomes
        .iter()
        .filter(|(_, outcome, output)| matches!(outcome, Outcome::Delivered) && output.is_none())
        .map(|(event_id, _, _)| *event_id)
        .collect();
    if !plain.is_empty() {
        let ids = super::id_list(&plain);
        // Only a delivery still pending gets an attempt (one already final, e.g. settled by an
        // earlier run, records nothing), numbered as the update below counts it.
        tx.prepare_cached(
            "INSERT INTO delivery_attempts (event_id, sink, attempt, at, outcome)
             SELECT d.event_id, d.sink, d.attempts + 1, ?3, 'delivered' FROM deliveries d
             WHERE d.sink = ?2 AND d.status = 'pending'
               AND d.event_id IN (SELECT value FROM json_each(?1))",
        )?
        .execute(params![ids, sink, at])?;
        let mut update = tx.prepare_cached(
            "UPDATE deliveries SET status = 'delivered', attempts = attempts + 1,
                    next_attempt_at = ?3, last_error = NULL, delivered_at = ?3
             WHERE sink = ?2 AND status = 'pending'
               AND event_id IN (SELECT value FROM json_each(?1))
             RETURNING event_id",
        )?;
        let updated = update.query_map(params![ids, sink, at], |r| r.get::<_, i64>(0))?;
        for event_id in updated {
            made_final.push(event_id?);
        }
    }
    {
        let mut update = tx.prepare_cached(
            "UPDATE deliveries SET status = ?3, attempts = attempts + 1, next_attempt_at = ?4, last_error = ?5,
                    delivered_at = CASE WHEN ?3 = 'delivered' THEN ?6 ELSE delivered_at END
             WHERE event_id = ?1 AND sink = ?2 AND status = 'pending'
             RETURNING attempts",
        )?;
        let mut log_attempt = tx.prepare_cached(
            "INSERT INTO delivery_attempts (event_id, sink, attempt, at, outcome, error, output) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?;
        for (event_id, outcome, output) in outcomes {
            let (status, next_at, error, label) = match outcome {
                Outcome::Delivered if output.is_none() => continue, // journaled above
                Outcome::Delivered => ("delivered", at.clone(), None, "delivered"),
                Outcome::Retry {
                    error,
                    next_attempt_at,
                } => (
                    "pending",
                    timestamp(*next_attempt_at),
                    Some(error.as_str()),
                    "retry",
                ),
                Outcome::Dead { error } => ("dead", at.clone(), Some(error.as_str()), "dead"),
            };
            let attempt: Option<i64> = update
                .query_row(params![event_id, sink, status, next_at, error, at], |r| {
                    r.get(0)
                })
                .optional()?;
            let Some(attempt) = attempt else {
                continue; // already final (e.g. settled by an earlier run): nothing to record
            };
            log_attempt.execute(params![event_id, sink, attempt, at, label, error, output])?;
            if status != "pending" {
                made_final.push(*event_id);
            }
        }
    }
    // In the order of the outcomes, as the portals with settle work are returned.
    let made_final: std::collections::HashSet<i64> = made_final.into_iter().collect();
    let in_order: Vec<i64> = outcomes
        .iter()
        .map(|(event_id, _, _)| *event_id)
        .filter(|event_id| made_final.contains(event_id))
        .collect();
    settle_if_final(tx, &in_order)
}

/// Events and their deliveries, one row per delivery (one row with no status for an event with
/// none left), for a JSON array of event ids (see [`settle_if_final`]).
pub(super) const SETTLE_SELECT: &str = "SELECT e.id, e.lane, e.portal, e.upstream, d.status
     FROM events e LEFT JOIN deliveries d ON d.event_id = e.id
     WHERE e.id IN (SELECT value FROM json_each(?1)) ORDER BY e.id";

/// Applies the settle lattice to each of `event_ids`: an event whose deliveries are all final
/// becomes `delivered`/`dead`, and if it is still `reserved` upstream, `clear_pending`/
/// `error_pending`. Returns the portals with new settle work, in the order of `event_ids`
/// (as every backend does). An event settled upstream before
/// (a replay, a dead retry, fetch-delete mode) only gets its status. One read and one update
/// per kind of change, whatever the number of events.
fn settle_if_final(tx: &Connection, event_ids: &[i64]) -> anyhow::Result<Vec<String>> {
    if event_ids.is_empty() {
        return Ok(Vec::new());
    }
    struct Seen {
        id: i64,
        lane: String,
        portal: String,
        upstream: String,
        deliveries: Vec<DeliveryState>,
    }
    let mut seen: Vec<Seen> = Vec::with_capacity(event_ids.len());
    {
        let mut select = tx.prepare_cached(SETTLE_SELECT)?;
        let mut rows = select.query([super::id_list(event_ids)])?;
        while let Some(r) = rows.next()? {
            let id: i64 = r.get(0)?;
            if seen.last().is_none_or(|s| s.id != id) {
                seen.push(Seen {
                    id,
                    lane: r.get(1)?,
                    portal: r.get(2)?,
                    upstream: r.get(3)?,
                    deliveries: Vec::new(),
                });
            }
            if let Some(status) = r.get::<_, Option<String>>(4)?
                && let Some(event) = seen.last_mut()
            {
                event.deliveries.push(state_from_sql(&status));
            }
        }
    }
    // (status, upstream it moves to: `None` when it stays) -> the events that change so.
    let mut changes: BTreeMap<(&str, Option<&str>), Vec<i64>> = BTreeMap::new();
    let mut settle_work: HashMap<i64, &str> = HashMap::new();
    for event in &seen {
        let Some(decision) = settle::decide(lane_from_sql(&event.lane), &event.deliveries) else {
            continue;
        };
        let status = if decision.dead { "dead" } else { "delivered" };
        if event.upstream != "reserved" {
            changes.entry((status, None)).or_default().push(event.id);
            continue;
        }
        let upstream = match decision.action {
            SettleAction::Clear => "clear_pending",
            SettleAction::Error => "error_pending",
        };
        changes
            .entry((status, Some(upstream)))
            .or_default()
            .push(event.id);
        settle_work.insert(event.id, &event.portal);
    }
    let mut portals: Vec<String> = Vec::new();
    for id in event_ids {
        if let Some(portal) = settle_work.get(id)
            && !portals.iter().any(|p| p == portal)
        {
            portals.push(portal.to_string());
        }
    }
    for ((status, upstream), ids) in changes {
        let ids = super::id_list(&ids);
        match upstream {
            None => tx
                .prepare_cached(
                    "UPDATE events SET status = ?2 WHERE id IN (SELECT value FROM json_each(?1))",
                )?
                .execute(params![ids, status])?,
            Some(upstream) => tx
                .prepare_cached(
                    "UPDATE events SET status = ?2, upstream = ?3
                     WHERE id IN (SELECT value FROM json_each(?1)) AND upstream = 'reserved'",
                )?
                .execute(params![ids, status, upstream])?,
        };
    }
    Ok(portals)
}

/// Deletes pending deliveries to sinks no longer configured (an operator removed or renamed
/// one) and settles the events that were only waiting for them. Returns, per removed sink, how
/// many deliveries were dropped.
pub(super) fn drop_unknown_sinks(
    conn: &mut Connection,
    known: &[String],
) -> anyhow::Result<Vec<(String, u64)>> {
    let tx = conn.transaction()?;
    let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
    let mut events = Vec::new();
    {
        let mut pending =
            tx.prepare("SELECT event_id, sink FROM deliveries WHERE status = 'pending'")?;
        let rows = pending.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        for row in rows {
            let (event_id, sink) = row?;
            if !known.contains(&sink) {
                *dropped.entry(sink.clone()).or_default() += 1;
                events.push((event_id, sink));
            }
        }
    }
    for (event_id, sink) in &events {
        tx.execute(
            "DELETE FROM deliveries WHERE event_id = ?1 AND sink = ?2 AND status = 'pending'",
            params![event_id, sink],
        )?;
    }
    let mut event_ids: Vec<i64> = events.iter().map(|(event_id, _)| *event_id).collect();
    event_ids.dedup();
    settle_if_final(&tx, &event_ids)?;
    tx.commit()?;
    Ok(dropped.into_iter().collect())
}

pub(super) fn bring_forward(
    conn: &Connection,
    sink: &str,
    latest: DateTime<Utc>,
) -> anyhow::Result<usize> {
    Ok(conn.execute(
        "UPDATE deliveries SET next_attempt_at = ?3
         WHERE sink = ?1 AND status = 'pending' AND next_attempt_at > ?2",
        params![sink, timestamp(latest), now()],
    )?)
}

pub(super) fn next_due(conn: &Connection, sink: &str) -> anyhow::Result<Option<DateTime<Utc>>> {
    let at: Option<String> = conn.query_row(
        "SELECT MIN(d.next_attempt_at) FROM deliveries d JOIN events e ON e.id = d.event_id
         WHERE d.sink = ?1 AND d.status = 'pending' AND e.enrichment IS NULL",
        [sink],
        |r| r.get(0),
    )?;
    Ok(parse_time(at))
}
