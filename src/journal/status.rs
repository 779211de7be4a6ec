//! What the status page shows, read from the journal without table scans: the last hour is read
//! backwards by rowid (rows are appended in time order), backlogs come from partial indexes, and
//! the last dead attempts from their own index.

use super::{Journal, count};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use rusqlite::Connection;
use serde::Serialize;
use std::collections::BTreeMap;

/// Minutes of history the page charts.
pub const HISTORY_MINUTES: usize = 60;
/// Dead attempts the page lists.
const LAST_DEAD: usize = 20;

/// Everything on the status page.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatusData {
    pub generated_at: String,
    pub portals: Vec<PortalStatus>,
    pub sinks: Vec<SinkStatus>,
    pub last_dead: Vec<DeadAttempt>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PortalStatus {
    pub portal: String,
    /// Reserved upstream or waiting for our clear/error call.
    pub unsettled: u64,
    /// Events some sink still has to take.
    pub pending: u64,
    /// Events journaled per minute, oldest minute first ([`HISTORY_MINUTES`] values).
    pub fetched_per_minute: Vec<u64>,
    /// Deliveries that succeeded per minute (all sinks), oldest first.
    pub delivered_per_minute: Vec<u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SinkStatus {
    pub sink: String,
    /// Attempts in the last hour by outcome.
    pub delivered: u64,
    pub retried: u64,
    pub dead: u64,
    /// Deliveries waiting now.
    pub pending: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadAttempt {
    pub at: String,
    pub id: String,
    pub portal: String,
    pub event: String,
    pub sink: String,
    pub error: Option<String>,
}

impl Journal {
    /// The status page's data as of `now`, for `portals` (the configured ones, shown even
    /// without events).
    pub async fn status_data(
        &self,
        portals: Vec<String>,
        now: DateTime<Utc>,
    ) -> anyhow::Result<StatusData> {
        self.run(move |conn| status_data(conn, &portals, now)).await
    }
}

/// The minute slot (0 = oldest) of a journal timestamp within the hour before `now`.
fn slot(at: &str, start: DateTime<Utc>) -> Option<usize> {
    let at = DateTime::parse_from_rfc3339(at).ok()?.with_timezone(&Utc);
    let minutes = (at - start).num_minutes();
    (0..HISTORY_MINUTES as i64)
        .contains(&minutes)
        .then_some(minutes as usize)
}

fn status_data(
    conn: &Connection,
    portals: &[String],
    now: DateTime<Utc>,
) -> anyhow::Result<StatusData> {
    let start = now - ChronoDuration::minutes(HISTORY_MINUTES as i64);
    let cutoff = super::timestamp(start);
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
        generated_at: super::timestamp(now),
        portals: by_portal.into_values().collect(),
        sinks: sinks.into_values().collect(),
        last_dead,
    })
}
