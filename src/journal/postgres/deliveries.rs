//! Deliveries: what is due, attempt outcomes with the settle lattice, and retiring sinks
//! (`deliveries`, `delivery_attempts`).
//!
//! Outcomes are written a call at a time (one `UPDATE ... FROM unnest(...)`, one `INSERT`), and
//! the lattice is applied to the events they finished under a row lock on each event, taken in
//! id order: of two dispatchers finishing the last two deliveries of one event at once, the
//! second waits for the first's commit, so it sees both deliveries final and settles the event
//! (without the lock each would see the other's delivery still pending, and the event would
//! never settle). The lock is `FOR NO KEY UPDATE`: `FOR UPDATE` would also wait for the key
//! share lock each transaction's `delivery_attempts` rows take on their event (the foreign
//! key), and two dispatchers would deadlock.

use super::batches::lane_from_sql;
use super::fence::{Fence, check_events};
use super::{Conn, millis, now};
use crate::envelope::Envelope;
use crate::journal::settle::{self, DeliveryState, SettleAction};
use crate::journal::types::{DueDelivery, Outcome};
use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use tokio_postgres::Row;

/// `text` as PostgreSQL can store it: without NUL characters, which a `text` value cannot hold
/// (SQLite keeps them). For what arrives from outside and is only read by people: a sink's
/// error or output, why an entity could not be read.
pub(super) fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(text)
    }
}

/// The columns of `events e` that make an envelope, in the order [`envelope_at`] reads them.
pub(super) const ENVELOPE_COLUMNS: &str = "e.envelope_id, e.portal, e.event, e.offline_id, e.message_id, \
     e.timestamp, e.data, e.additional, e.lane, e.entity, e.entity_error";
/// How many columns [`ENVELOPE_COLUMNS`] has.
pub(super) const ENVELOPE_WIDTH: usize = 11;

/// Reads an envelope from [`ENVELOPE_COLUMNS`] starting at column `first`. JSON columns that do
/// not parse (never written by this crate) read as `null`.
pub(super) fn envelope_at(r: &Row, first: usize, attempt: u32) -> Envelope {
    let json = |i: usize| -> Value {
        r.get::<_, Option<String>>(first + i)
            .and_then(|t| crate::json_depth::from_str(&t).ok())
            .unwrap_or(Value::Null)
    };
    Envelope {
        id: r.get(first),
        portal: r.get(first + 1),
        event: r.get(first + 2),
        offline_id: r.get(first + 3),
        message_id: r.get(first + 4),
        timestamp: r.get(first + 5),
        data: json(6),
        additional: json(7),
        lane: lane_from_sql(r.get(first + 8)),
        attempt,
        entity: json(9),
        entity_error: r.get(first + 10),
    }
}

/// The statement of [`due_deliveries`]: `$1` sink, `$2` now, `$3` limit, `$4` the portals this
/// instance owns (`NULL`: every portal). Public for the bench, which times it.
///
/// The owned portals are matched with `IN (SELECT unnest($4))`, not `= ANY($4)`, here and in
/// [`bring_forward`] and [`next_due`]: these statements are prepared once, and the plan
/// PostgreSQL reuses for them (generic) compares each row with every name of the array in
/// turn, while the subquery is hashed once per execution. With 10,000 portals over three
/// instances (3,334 names) and 33,000 due deliveries of the other instances, `= ANY` took
/// 5.0 s per call on the bench, `IN (SELECT unnest(..))` 0.15 s (docs/BENCHMARKS.md).
pub fn due_deliveries_sql() -> String {
    // The due deliveries are chosen first and only they are joined to their events (the
    // events waiting for enrichment are few, and found by their partial index).
    format!(
        "SELECT d.event_id, d.attempts, {ENVELOPE_COLUMNS}, e.fetched_at
         FROM (SELECT event_id, attempts, next_attempt_at FROM deliveries p
               WHERE sink = $1 AND status = 'pending' AND next_attempt_at <= $2
                 AND EXISTS (SELECT 1 FROM events w
                             WHERE w.id = p.event_id AND w.enrichment IS NULL
                               AND ($4::text[] IS NULL OR w.portal IN (SELECT unnest($4::text[]))))
               ORDER BY next_attempt_at, event_id
               LIMIT $3) d
         JOIN events e ON e.id = d.event_id
         ORDER BY d.next_attempt_at, d.event_id"
    )
}

pub(super) async fn due_deliveries(
    conn: &Conn,
    sink: &str,
    portals: Option<&[String]>,
    now: DateTime<Utc>,
    limit: usize,
) -> anyhow::Result<Vec<DueDelivery>> {
    let stmt = conn.prepare_cached(&due_deliveries_sql()).await?;
    let rows = conn
        .query(
            &stmt,
            &[
                &sink,
                &millis(now),
                &(limit.min(i64::MAX as usize) as i64),
                &portals,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let attempts = r.get::<_, i64>(1).clamp(0, u32::MAX as i64 - 1) as u32;
            DueDelivery {
                event_id: r.get(0),
                attempts,
                envelope: envelope_at(r, 2, attempts + 1),
                fetched_at: r.get(2 + ENVELOPE_WIDTH),
            }
        })
        .collect())
}

pub(super) async fn bring_forward(
    conn: &Conn,
    sink: &str,
    portals: Option<&[String]>,
    latest: DateTime<Utc>,
) -> anyhow::Result<usize> {
    let stmt = conn
        .prepare_cached(
            "UPDATE deliveries SET next_attempt_at = $3
             WHERE sink = $1 AND status = 'pending' AND next_attempt_at > $2
               AND ($4::text[] IS NULL
                    OR event_id IN (SELECT id FROM events
                                    WHERE portal IN (SELECT unnest($4::text[]))))",
        )
        .await?;
    Ok(conn
        .execute(&stmt, &[&sink, &millis(latest), &now(), &portals])
        .await? as usize)
}

pub(super) async fn next_due(
    conn: &Conn,
    sink: &str,
    portals: Option<&[String]>,
) -> anyhow::Result<Option<DateTime<Utc>>> {
    let stmt = conn
        .prepare_cached(
            "SELECT MIN(d.next_attempt_at) FROM deliveries d JOIN events e ON e.id = d.event_id
             WHERE d.sink = $1 AND d.status = 'pending' AND e.enrichment IS NULL
               AND ($2::text[] IS NULL OR e.portal IN (SELECT unnest($2::text[])))",
        )
        .await?;
    Ok(conn.query_one(&stmt, &[&sink, &portals]).await?.get(0))
}

pub(super) async fn record_outcomes(
    conn: &mut Conn,
    fence: Option<&Fence>,
    sink: &str,
    outcomes: &[(i64, Outcome, Option<String>)],
) -> anyhow::Result<Vec<String>> {
    let tx = conn.transaction().await?;
    let events: Vec<i64> = outcomes.iter().map(|(id, _, _)| *id).collect();
    check_events(&tx, fence, &events).await?;
    let at = now();
    let update = tx
        .prepare_cached(
            "UPDATE deliveries d SET status = u.status, attempts = d.attempts + 1,
                    next_attempt_at = u.next_attempt_at, last_error = u.error,
                    delivered_at = CASE WHEN u.status = 'delivered' THEN $2 ELSE d.delivered_at END
             FROM unnest($3::bigint[], $4::text[], $5::timestamptz[], $6::text[])
                  AS u(event_id, status, next_attempt_at, error)
             WHERE d.event_id = u.event_id AND d.sink = $1 AND d.status = 'pending'
             RETURNING d.event_id, d.attempts",
        )
        .await?;
    let log_attempts = tx
        .prepare_cached(
            "INSERT INTO delivery_attempts (event_id, sink, attempt, at, outcome, error, output)
             SELECT u.event_id, $1, u.attempt, $2, u.outcome, u.error, u.output
             FROM unnest($3::bigint[], $4::bigint[], $5::text[], $6::text[], $7::text[])
                  WITH ORDINALITY AS u(event_id, attempt, outcome, error, output, ord)
             ORDER BY u.ord",
        )
        .await?;
    // The events whose delivery to `sink` became final, in the order of `outcomes`.
    let mut finished: Vec<i64> = Vec::new();
    // An event named twice in one call (never by the dispatcher) is taken in a later round, so
    // that each outcome meets the delivery as the one before left it, as one by one would.
    let mut rest: &[(i64, Outcome, Option<String>)] = outcomes;
    while !rest.is_empty() {
        let mut seen = HashSet::new();
        let round_len = rest
            .iter()
            .position(|(id, _, _)| !seen.insert(*id))
            .unwrap_or(rest.len());
        let (round, later) = rest.split_at(round_len);
        rest = later;
        let mut event_ids = Vec::with_capacity(round.len());
        let mut statuses = Vec::with_capacity(round.len());
        let mut next_at = Vec::with_capacity(round.len());
        let mut errors: Vec<Option<Cow<'_, str>>> = Vec::with_capacity(round.len());
        for (event_id, outcome, _) in round {
            let (status, next, error) = match outcome {
                Outcome::Delivered => ("delivered", at, None),
                Outcome::Retry {
                    error,
                    next_attempt_at,
                } => ("pending", millis(*next_attempt_at), Some(storable(error))),
                Outcome::Dead { error } => ("dead", at, Some(storable(error))),
            };
            event_ids.push(*event_id);
            statuses.push(status);
            next_at.push(next);
            errors.push(error);
        }
        let updated: HashMap<i64, i64> = tx
            .query(
                &update,
                &[&sink, &at, &event_ids, &statuses, &next_at, &errors],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        // Already final ones (e.g. settled by an earlier run) are not recorded.
        let mut log = AttemptColumns::default();
        for (event_id, outcome, output) in round {
            let Some(attempt) = updated.get(event_id) else {
                continue;
            };
            let (label, error) = match outcome {
                Outcome::Delivered => ("delivered", None),
                Outcome::Retry { error, .. } => ("retry", Some(storable(error))),
                Outcome::Dead { error } => ("dead", Some(storable(error))),
            };
            log.event_ids.push(*event_id);
            log.attempts.push(*attempt);
            log.outcomes.push(label);
            log.errors.push(error);
            log.outputs.push(output.as_deref().map(storable));
            if label != "retry" {
                finished.push(*event_id);
            }
        }
        if !log.event_ids.is_empty() {
            tx.execute(
                &log_attempts,
                &[
                    &sink,
                    &at,
                    &log.event_ids,
                    &log.attempts,
                    &log.outcomes,
                    &log.errors,
                    &log.outputs,
                ],
            )
            .await?;
        }
    }
    let portals = settle_if_final(&tx, &finished).await?;
    tx.commit().await?;
    Ok(portals)
}

/// The columns of the attempts one round logs.
#[derive(Default)]
struct AttemptColumns<'a> {
    event_ids: Vec<i64>,
    attempts: Vec<i64>,
    outcomes: Vec<&'a str>,
    errors: Vec<Option<Cow<'a, str>>>,
    outputs: Vec<Option<Cow<'a, str>>>,
}

fn state_from_sql(s: &str) -> DeliveryState {
    match s {
        "delivered" => DeliveryState::Delivered,
        "dead" => DeliveryState::Dead,
        _ => DeliveryState::Pending,
    }
}

/// Applies the settle lattice to `events` (in the caller's transaction): each whose deliveries
/// are all final becomes `delivered`/`dead`, and if it is still `reserved` upstream,
/// `clear_pending`/`error_pending`. Returns the portals with new settle work, in the order of
/// `events`. An event settled upstream before (a replay, a dead retry, fetch-delete mode) only
/// gets its status. The events are locked first, in id order (see the module's comment), and
/// their deliveries read afterwards, so what is read includes every commit made before the
/// lock was granted.
async fn settle_if_final(tx: &Transaction<'_>, events: &[i64]) -> anyhow::Result<Vec<String>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = events.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let lock = tx
        .prepare_cached("SELECT id FROM events WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .await?;
    tx.query(&lock, &[&ids]).await?;
    let read = tx
        .prepare_cached(
            "SELECT e.id, e.lane, e.portal, e.upstream,
                    ARRAY(SELECT d.status FROM deliveries d WHERE d.event_id = e.id)
             FROM events e WHERE e.id = ANY($1)",
        )
        .await?;
    let mut portal_of: HashMap<i64, String> = HashMap::new();
    let (mut ids_to_set, mut statuses) = (Vec::new(), Vec::new());
    let mut upstreams: Vec<Option<&str>> = Vec::new();
    for row in tx.query(&read, &[&ids]).await? {
        let id: i64 = row.get(0);
        let lane = lane_from_sql(row.get(1));
        let portal: String = row.get(2);
        let upstream: String = row.get(3);
        let deliveries: Vec<DeliveryState> = row
            .get::<_, Vec<String>>(4)
            .iter()
            .map(|s| state_from_sql(s))
            .collect();
        let Some(decision) = settle::decide(lane, &deliveries) else {
            continue;
        };
        ids_to_set.push(id);
        statuses.push(if decision.dead { "dead" } else { "delivered" });
        if upstream == "reserved" {
            upstreams.push(Some(match decision.action {
                SettleAction::Clear => "clear_pending",
                SettleAction::Error => "error_pending",
            }));
            portal_of.insert(id, portal);
        } else {
            upstreams.push(None);
        }
    }
    if !ids_to_set.is_empty() {
        let set = tx
            .prepare_cached(
                "UPDATE events e SET status = u.status, upstream = COALESCE(u.upstream, e.upstream)
                 FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(id, status, upstream)
                 WHERE e.id = u.id",
            )
            .await?;
        tx.execute(&set, &[&ids_to_set, &statuses, &upstreams])
            .await?;
    }
    let mut portals: Vec<String> = Vec::new();
    for id in events {
        if let Some(portal) = portal_of.get(id)
            && !portals.contains(portal)
        {
            portals.push(portal.clone());
        }
    }
    Ok(portals)
}

/// Deletes pending deliveries to sinks no longer configured (an operator removed or renamed
/// one) and settles the events that were only waiting for them. Returns, per removed sink, how
/// many deliveries were dropped.
pub(super) async fn drop_unknown_sinks(
    conn: &mut Conn,
    portals: Option<&[String]>,
    known: &[String],
) -> anyhow::Result<Vec<(String, u64)>> {
    let tx = conn.transaction().await?;
    let rows = tx
        .query(
            "DELETE FROM deliveries WHERE status = 'pending' AND NOT (sink = ANY($1))
               AND ($2::text[] IS NULL
                    OR event_id IN (SELECT id FROM events WHERE portal = ANY($2)))
             RETURNING event_id, sink",
            &[&known, &portals],
        )
        .await?;
    let mut dropped: BTreeMap<String, u64> = BTreeMap::new();
    let mut events = Vec::with_capacity(rows.len());
    for row in &rows {
        events.push(row.get::<_, i64>(0));
        *dropped.entry(row.get(1)).or_default() += 1;
    }
    settle_if_final(&tx, &events).await?;
    tx.commit().await?;
    Ok(dropped.into_iter().collect())
}
