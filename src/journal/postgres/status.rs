//! What the daemon reports: counts, fetch rates, new dead attempts, the status page's data.
//!
//! The status page reads the last hour without a table scan, as the SQLite journal does: rows
//! are appended in time order, so the first row of the hour is found by a binary search over
//! the primary key (one recursive query), and the hour is counted from there by the server.

use super::{Conn, millis};
use crate::journal::timestamp;
use crate::journal::types::{
    DeadAttempt, HISTORY_MINUTES, JournalCounts, PortalStatus, SinkStatus, StatusData,
};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use std::collections::BTreeMap;

/// Dead attempts the page lists.
const LAST_DEAD: i64 = 20;

/// A non-negative SQL count as `u64`.
fn count(n: i64) -> u64 {
    n.max(0) as u64
}

pub(super) async fn events_since_row(
    conn: &Conn,
    after: Option<i64>,
) -> anyhow::Result<(i64, BTreeMap<String, u64>)> {
    let max: i64 = conn
        .query_one("SELECT COALESCE(MAX(id), 0)::bigint FROM events", &[])
        .await?
        .get(0);
    let mut counts = BTreeMap::new();
    if let Some(after) = after {
        let stmt = conn
            .prepare_cached("SELECT portal, COUNT(*) FROM events WHERE id > $1 GROUP BY portal")
            .await?;
        for row in conn.query(&stmt, &[&after]).await? {
            counts.insert(row.get(0), count(row.get(1)));
        }
    }
    Ok((max, counts))
}

pub(super) async fn dead_attempts_since(
    conn: &Conn,
    after: Option<i64>,
) -> anyhow::Result<(i64, u64, Vec<String>)> {
    let max: i64 = conn
        .query_one(
            "SELECT COALESCE(MAX(id), 0)::bigint FROM delivery_attempts",
            &[],
        )
        .await?
        .get(0);
    let Some(after) = after else {
        return Ok((max, 0, Vec::new()));
    };
    let stmt = conn
        .prepare_cached(
            "SELECT e.envelope_id FROM delivery_attempts a JOIN events e ON e.id = a.event_id
             WHERE a.id > $1 AND a.id <= $2 AND a.outcome = 'dead' ORDER BY a.id",
        )
        .await?;
    let ids: Vec<String> = conn
        .query(&stmt, &[&after, &max])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let count = ids.len() as u64;
    Ok((max, count, ids.into_iter().take(5).collect()))
}

pub(super) async fn oldest_pending_fetched_at(
    conn: &Conn,
) -> anyhow::Result<Option<DateTime<Utc>>> {
    let stmt = conn
        .prepare_cached(
            "SELECT MIN(e.fetched_at) FROM deliveries d JOIN events e ON e.id = d.event_id
             WHERE d.status = 'pending'",
        )
        .await?;
    Ok(conn.query_one(&stmt, &[]).await?.get(0))
}

pub(super) async fn counts(conn: &Conn) -> anyhow::Result<JournalCounts> {
    let events = conn
        .query_one(
            "SELECT COUNT(*),
                    COUNT(*) FILTER (WHERE status = 'delivered'),
                    COUNT(*) FILTER (WHERE status = 'dead'),
                    COUNT(*) FILTER (WHERE status = 'pending'),
                    COUNT(*) FILTER (WHERE upstream IN ('reserved', 'clear_pending', 'error_pending')),
                    COUNT(*) FILTER (WHERE upstream = 'cleared'),
                    COUNT(*) FILTER (WHERE upstream = 'errored')
             FROM events",
            &[],
        )
        .await?;
    let batches = conn
        .query_one(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE origin = 'adopted') FROM batches",
            &[],
        )
        .await?;
    let attempts = conn
        .query_one(
            "SELECT (SELECT COUNT(*) FROM delivery_attempts),
                    (SELECT COUNT(*) FROM delivery_attempts WHERE outcome = 'retry'),
                    (SELECT COUNT(*) - COUNT(DISTINCT (e.envelope_id, a.sink))
                     FROM delivery_attempts a JOIN events e ON e.id = a.event_id
                     WHERE a.outcome = 'delivered')",
            &[],
        )
        .await?;
    Ok(JournalCounts {
        events: count(events.get(0)),
        delivered: count(events.get(1)),
        dead: count(events.get(2)),
        pending: count(events.get(3)),
        unsettled_upstream: count(events.get(4)),
        cleared: count(events.get(5)),
        errored: count(events.get(6)),
        batches: count(batches.get(0)),
        adopted_batches: count(batches.get(1)),
        delivery_attempts: count(attempts.get(0)),
        retried_attempts: count(attempts.get(1)),
        duplicate_deliveries: count(attempts.get(2)),
    })
}

/// The smallest row id of `table` from which every row's `column` is at or after `$1`, by a
/// binary search over the primary key: rows are appended in time order, so the time of the
/// first row at or after an id grows with the id. One query, O(log rows) index probes.
fn first_row_since(table: &str, column: &str) -> String {
    format!(
        "WITH RECURSIVE search (lo, hi) AS (
             SELECT (SELECT COALESCE(MIN(id), 1) FROM {table}),
                    (SELECT COALESCE(MAX(id), 0) + 1 FROM {table})
             UNION ALL
             SELECT CASE WHEN probe.at < $1 THEN probe.mid + 1 ELSE lo END,
                    CASE WHEN probe.at < $1 THEN hi ELSE probe.mid END
             FROM search,
                  LATERAL (SELECT (lo + hi) / 2 AS mid) m,
                  LATERAL (SELECT m.mid, (SELECT {column} FROM {table} WHERE id >= m.mid
                                          ORDER BY id LIMIT 1) AS at) probe
             WHERE lo < hi
         )
         SELECT MAX(lo) FROM search"
    )
}

/// The minute slot (0 = oldest) of `slot` minutes after the start of the hour, if within it.
fn slot(minutes: i64) -> Option<usize> {
    (0..HISTORY_MINUTES as i64)
        .contains(&minutes)
        .then_some(minutes as usize)
}

pub(super) async fn status_data(
    conn: &Conn,
    portals: &[String],
    now: DateTime<Utc>,
) -> anyhow::Result<StatusData> {
    let start = millis(now - ChronoDuration::minutes(HISTORY_MINUTES as i64));
    let mut by_portal: BTreeMap<String, PortalStatus> = BTreeMap::new();
    // Configured portals show even without events; journaled ones even if no longer configured.
    let portal_entry = |by_portal: &mut BTreeMap<String, PortalStatus>, portal: &str| {
        by_portal
            .entry(portal.to_string())
            .or_insert_with(|| PortalStatus {
                portal: portal.to_string(),
                fetched_per_minute: vec![0; HISTORY_MINUTES],
                delivered_per_minute: vec![0; HISTORY_MINUTES],
                ..PortalStatus::default()
            });
    };
    for p in portals {
        portal_entry(&mut by_portal, p);
    }

    // Events of the last hour, by portal and minute.
    let fetched = conn
        .prepare_cached(&format!(
            "SELECT portal, floor(extract(epoch FROM fetched_at - $1) / 60)::bigint, COUNT(*)
             FROM events
             WHERE id >= ({}) AND fetched_at >= $1
             GROUP BY 1, 2",
            first_row_since("events", "fetched_at")
        ))
        .await?;
    for row in conn.query(&fetched, &[&start]).await? {
        let portal: String = row.get(0);
        portal_entry(&mut by_portal, &portal);
        if let (Some(i), Some(p)) = (slot(row.get(1)), by_portal.get_mut(&portal)) {
            p.fetched_per_minute[i] += count(row.get(2));
        }
    }

    // Attempts of the last hour, by sink, outcome, portal and minute.
    let mut sinks: BTreeMap<String, SinkStatus> = BTreeMap::new();
    let attempts = conn
        .prepare_cached(&format!(
            "SELECT a.sink, a.outcome, e.portal, floor(extract(epoch FROM a.at - $1) / 60)::bigint,
                    COUNT(*)
             FROM delivery_attempts a JOIN events e ON e.id = a.event_id
             WHERE a.id >= ({}) AND a.at >= $1
             GROUP BY 1, 2, 3, 4",
            first_row_since("delivery_attempts", "at")
        ))
        .await?;
    for row in conn.query(&attempts, &[&start]).await? {
        let sink: String = row.get(0);
        let outcome: &str = row.get(1);
        let portal: String = row.get(2);
        let n = count(row.get(4));
        let s = sinks.entry(sink.clone()).or_insert_with(|| SinkStatus {
            sink,
            ..SinkStatus::default()
        });
        match outcome {
            "delivered" => {
                s.delivered += n;
                portal_entry(&mut by_portal, &portal);
                if let (Some(i), Some(p)) = (slot(row.get(3)), by_portal.get_mut(&portal)) {
                    p.delivered_per_minute[i] += n;
                }
            }
            "retry" => s.retried += n,
            _ => s.dead += n,
        }
    }
    let pending = conn
        .prepare_cached(
            "SELECT sink, COUNT(*) FROM deliveries WHERE status = 'pending' GROUP BY sink",
        )
        .await?;
    for row in conn.query(&pending, &[]).await? {
        let sink: String = row.get(0);
        sinks
            .entry(sink.clone())
            .or_insert_with(|| SinkStatus {
                sink,
                ..SinkStatus::default()
            })
            .pending = count(row.get(1));
    }
    let backlog = conn
        .prepare_cached(
            "SELECT (SELECT COUNT(*) FROM events WHERE portal = $1
                       AND upstream IN ('reserved', 'clear_pending', 'error_pending')),
                    (SELECT COUNT(*) FROM events WHERE portal = $1 AND status = 'pending')",
        )
        .await?;
    for p in by_portal.values_mut() {
        let row = conn.query_one(&backlog, &[&p.portal]).await?;
        p.unsettled = count(row.get(0));
        p.pending = count(row.get(1));
    }
    let last_dead = conn
        .prepare_cached(
            "SELECT a.at, e.envelope_id, e.portal, e.event, a.sink, a.error
             FROM delivery_attempts a JOIN events e ON e.id = a.event_id
             WHERE a.outcome = 'dead' ORDER BY a.id DESC LIMIT $1",
        )
        .await?;
    let last_dead = conn
        .query(&last_dead, &[&LAST_DEAD])
        .await?
        .iter()
        .map(|r| DeadAttempt {
            at: timestamp(r.get(0)),
            id: r.get(1),
            portal: r.get(2),
            event: r.get(3),
            sink: r.get(4),
            error: r.get(5),
        })
        .collect();
    Ok(StatusData {
        generated_at: timestamp(now),
        portals: by_portal.into_values().collect(),
        sinks: sinks.into_values().collect(),
        last_dead,
    })
}
