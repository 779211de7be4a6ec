//! What the daemon reports from the journal, read without table scans: the status page (the
//! last hour is read backwards by rowid, as rows are appended in time order; backlogs come from
//! partial indexes, the last dead attempts from their own index), the systemd status line's
//! fetch rate, the alerts' new dead attempts and oldest pending delivery, and the counts.

use super::{count, parse_time};
use crate::journal::timestamp;
use crate::journal::types::{
    DeadAttempt, HISTORY_MINUTES, JournalCounts, PortalStatus, SinkStatus, StatusData,
};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use rusqlite::Connection;
use std::collections::BTreeMap;

/// Dead attempts the page lists.
const LAST_DEAD: usize = 20;

pub(super) fn events_since_row(
    conn: &Connection,
    after: Option<i64>,
) -> anyhow::Result<(i64, BTreeMap<String, u64>)> {
    let max: i64 = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?;
    let mut counts = BTreeMap::new();
    if let Some(after) = after {
        let mut stmt = conn
            .prepare_cached("SELECT portal, COUNT(*) FROM events WHERE id > ?1 GROUP BY portal")?;
        let rows = stmt.query_map([after], |r| Ok((r.get::<_, String>(0)?, count(r, 1)?)))?;
        for row in rows {
            let (portal, n) = row?;
            counts.insert(portal, n);
        }
    }
    Ok((max, counts))
}

pub(super) fn dead_attempts_since(
    conn: &Connection,
    after: Option<i64>,
) -> anyhow::Result<(i64, u64, Vec<String>)> {
    let max: i64 = conn.query_row(
        "SELECT COALESCE(MAX(id), 0) FROM delivery_attempts",
        [],
        |r| r.get(0),
    )?;
    let Some(after) = after else {
        return Ok((max, 0, Vec::new()));
    };
    let mut stmt = conn.prepare_cached(
        "SELECT e.envelope_id FROM delivery_attempts a JOIN events e ON e.id = a.event_id
         WHERE a.id > ?1 AND a.id <= ?2 AND a.outcome = 'dead' ORDER BY a.id",
    )?;
    let ids: Vec<String> = stmt
        .query_map([after, max], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let count = ids.len() as u64;
    Ok((max, count, ids.into_iter().take(5).collect()))
}

pub(super) fn oldest_pending_fetched_at(
    conn: &Connection,
) -> anyhow::Result<Option<DateTime<Utc>>> {
    let at: Option<String> = conn.query_row(
        "SELECT MIN(e.fetched_at) FROM deliveries d JOIN events e ON e.id = d.event_id
         WHERE d.status = 'pending'",
        [],
        |r| r.get(0),
    )?;
    Ok(parse_time(at))
}

pub(super) fn counts(conn: &Connection) -> anyhow::Result<JournalCounts> {
    let mut c = conn.query_row(
        "SELECT COUNT(*),
                COALESCE(SUM(status = 'delivered'), 0), COALESCE(SUM(status = 'dead'), 0),
                COALESCE(SUM(status = 'pending'), 0),
                COALESCE(SUM(upstream IN ('reserved', 'clear_pending', 'error_pending')), 0),
                COALESCE(SUM(upstream = 'cleared'), 0), COALESCE(SUM(upstream = 'errored'), 0)
         FROM events",
        [],
        |r| {
            Ok(JournalCounts {
                events: count(r, 0)?,
                delivered: count(r, 1)?,
                dead: count(r, 2)?,
                pending: count(r, 3)?,
                unsettled_upstream: count(r, 4)?,
                cleared: count(r, 5)?,
                errored: count(r, 6)?,
                ..JournalCounts::default()
            })
        },
    )?;
    (c.batches, c.adopted_batches) = conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(origin = 'adopted'), 0) FROM batches",
        [],
        |r| Ok((count(r, 0)?, count(r, 1)?)),
    )?;
    (c.delivery_attempts, c.retried_attempts, c.duplicate_deliveries) = conn.query_row(
        "SELECT (SELECT COUNT(*) FROM delivery_attempts),
                (SELECT COUNT(*) FROM delivery_attempts WHERE outcome = 'retry'),
                (SELECT COUNT(*) - COUNT(DISTINCT e.envelope_id || char(31) || a.sink)
                 FROM delivery_attempts a JOIN events e ON e.id = a.event_id WHERE a.outcome = 'delivered')",
        [],
        |r| Ok((count(r, 0)?, count(r, 1)?, count(r, 2)?)),
    )?;
    Ok(c)
}

/// The minute slot (0 = oldest) of a journal timestamp within the hour before `now`.
fn slot(at: &str, start: DateTime<Utc>) -> Option<usize> {
    let at = DateTime::parse_from_rfc3339(at).ok()?.with_timezone(&Utc);
    let minutes = (at - start).num_minutes();
    (0..HISTORY_MINUTES as i64)
        .contains(&minutes)
        .then_some(minutes as usize)
}

pub(super) fn status_data(
    conn: &Connection,
    portals: &[String],
    now: DateTime<Utc>,
) -> anyhow::Result<StatusData> {
    let start = now - ChronoDuration::minutes(HISTORY_MINUTES as i64);
    let cutoff = timestamp(start);
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

    // Events of the last hour, newest first, until the first older one.
    {
        let mut stmt =
            conn.prepare_cached("SELECT portal, fetched_at FROM events ORDER BY id DESC")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let at: String = row.get(1)?;
            if at < cutoff {
                break;
            }
            let portal: String = row.get(0)?;
            portal_entry(&mut by_portal, &portal);
            if let (Some(i), Some(p)) = (slot(&at, start), by_portal.get_mut(&portal)) {
                p.fetched_per_minute[i] += 1;
            }
        }
    }

    // Attempts of the last hour, newest first.
    let mut sinks: BTreeMap<String, SinkStatus> = BTreeMap::new();
    {
        let mut stmt = conn.prepare_cached(
            "SELECT a.at, a.sink, a.outcome, e.portal FROM delivery_attempts a
             JOIN events e ON e.id = a.event_id ORDER BY a.id DESC",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let at: String = row.get(0)?;
            if at < cutoff {
                break;
            }
            let sink: String = row.get(1)?;
            let outcome: String = row.get(2)?;
            let portal: String = row.get(3)?;
            let s = sinks.entry(sink.clone()).or_insert_with(|| SinkStatus {
                sink,
                ..SinkStatus::default()
            });
            match outcome.as_str() {
                "delivered" => {
                    s.delivered += 1;
                    portal_entry(&mut by_portal, &portal);
                    if let (Some(i), Some(p)) = (slot(&at, start), by_portal.get_mut(&portal)) {
                        p.delivered_per_minute[i] += 1;
                    }
                }
                "retry" => s.retried += 1,
                _ => s.dead += 1,
            }
        }
    }
    {
        let mut stmt = conn.prepare_cached(
            "SELECT sink, COUNT(*) FROM deliveries WHERE status = 'pending' GROUP BY sink",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, count(r, 1)?)))?;
        for row in rows {
            let (sink, n) = row?;
            sinks
                .entry(sink.clone())
                .or_insert_with(|| SinkStatus {
                    sink,
                    ..SinkStatus::default()
                })
                .pending = n;
        }
    }
    for p in by_portal.values_mut() {
        p.unsettled = conn.query_row(
            "SELECT COUNT(*) FROM events WHERE portal = ?1 AND upstream IN ('reserved', 'clear_pending', 'error_pending')",
            [&p.portal],
            |r| count(r, 0),
        )?;
        p.pending = conn.query_row(
            "SELECT COUNT(*) FROM events WHERE portal = ?1 AND status = 'pending'",
            [&p.portal],
            |r| count(r, 0),
        )?;
    }
    let last_dead = conn
        .prepare_cached(
            "SELECT a.at, e.envelope_id, e.portal, e.event, a.sink, a.error
             FROM delivery_attempts a JOIN events e ON e.id = a.event_id
             WHERE a.outcome = 'dead' ORDER BY a.id DESC LIMIT ?1",
        )?
        .query_map([LAST_DEAD as i64], |r| {
            Ok(DeadAttempt {
                at: r.get(0)?,
                id: r.get(1)?,
                portal: r.get(2)?,
                event: r.get(3)?,
                sink: r.get(4)?,
                error: r.get(5)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(StatusData {
        generated_at: timestamp(now),
        portals: by_portal.into_values().collect(),
        sinks: sinks.into_values().collect(),
        last_dead,
    })
}
