//! The SQL of the operator queries and maintenance: filtered listings, per-sink statistics,
//! one event in full, replay, dead-event handling and pruning. Used by the CLI (a separate
//! process beside the daemon: WAL lets it read without blocking the daemon, and every write here
//! is a short transaction) and by the daemon's prune job.

use super::deliveries::{ENVELOPE_COLUMNS, ENVELOPE_WIDTH, envelope_at};
use super::{count, now};
use crate::journal::inspect::{
    AttemptDetail, BatchInfo, DeliveryBrief, DeliveryDetail, EventDetail, EventFilter, EventRow,
    PortalStats, Pruned, Requeued, SinkStats, StatusFilter, UpstreamInfo,
};
use crate::journal::timestamp;
use chrono::{DateTime, Utc};
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};

/// Rows deleted per transaction by `prune` and `dead purge`, so the daemon never waits long.
const DELETE_CHUNK: usize = 500;

/// A `WHERE` clause over `events e` and its parameters.
struct Clause {
    sql: String,
    params: Vec<SqlValue>,
}

impl EventFilter {
    fn clause(&self) -> Clause {
        let mut sql = vec!["1".to_string()];
        let mut params: Vec<SqlValue> = Vec::new();
        let mut bind = |sql: &mut Vec<String>, text: &str, value: SqlValue| {
            params.push(value);
            sql.push(text.replace('?', &format!("?{}", params.len())));
        };
        if let Some(portal) = &self.portal {
            bind(&mut sql, "e.portal = ?", SqlValue::Text(portal.clone()));
        }
        if let Some(event) = &self.event {
            bind(
                &mut sql,
                "e.event GLOB ?",
                SqlValue::Text(event.to_uppercase()),
            );
        }
        if let Some(since) = self.since {
            bind(
                &mut sql,
                "e.fetched_at >= ?",
                SqlValue::Text(timestamp(since)),
            );
        }
        if let Some(until) = self.until {
            bind(
                &mut sql,
                "e.fetched_at < ?",
                SqlValue::Text(timestamp(until)),
            );
        }
        let delivery_status = |status: StatusFilter| match status {
            StatusFilter::Pending => "d.status = 'pending'",
            StatusFilter::Retrying => "d.status = 'pending' AND d.attempts > 0",
            StatusFilter::Delivered => "d.status = 'delivered'",
            StatusFilter::Dead => "d.status = 'dead'",
        };
        match (&self.sink, self.status) {
            (Some(sink), status) => {
                let extra = status
                    .map(|s| format!(" AND {}", delivery_status(s)))
                    .unwrap_or_default();
                bind(
                    &mut sql,
                    &format!(
                        "EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id AND d.sink = ?{extra})"
                    ),
                    SqlValue::Text(sink.clone()),
                );
            }
            (None, Some(StatusFilter::Retrying)) => sql.push(format!(
                "EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id AND {})",
                delivery_status(StatusFilter::Retrying)
            )),
            (None, Some(StatusFilter::Dead)) => sql.push(
                "EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id AND d.status = 'dead')"
                    .to_string(),
            ),
            (None, Some(StatusFilter::Pending)) => sql.push("e.status = 'pending'".to_string()),
            (None, Some(StatusFilter::Delivered)) => sql.push("e.status = 'delivered'".to_string()),
            (None, None) => {}
        }
        Clause {
            sql: sql.join(" AND "),
            params,
        }
    }

    fn limit_sql(&self) -> String {
        match self.limit {
            Some(n) => format!(" LIMIT {n}"),
            None => String::new(),
        }
    }
}

pub(super) fn list_events(
    conn: &Connection,
    filter: &EventFilter,
    after: Option<i64>,
) -> anyhow::Result<Vec<EventRow>> {
    let clause = filter.clause();
    let after_sql = after
        .map(|a| format!(" AND e.id > {a}"))
        .unwrap_or_default();
    // The newest `limit` rows, shown oldest first.
    let sql = format!(
        "SELECT * FROM (
            SELECT e.id, e.envelope_id, e.portal, e.event, e.lane, e.status, e.upstream, e.fetched_at, e.settled_at
            FROM events e WHERE {}{after_sql} ORDER BY e.id {}{}
         ) ORDER BY id",
        clause.sql,
        if after.is_some() { "ASC" } else { "DESC" },
        filter.limit_sql()
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt
        .query_map(params_from_iter(clause.params.iter()), |r| {
            Ok(EventRow {
                row: r.get(0)?,
                id: r.get(1)?,
                portal: r.get(2)?,
                event: r.get(3)?,
                lane: r.get(4)?,
                status: r.get(5)?,
                upstream: r.get(6)?,
                fetched_at: r.get(7)?,
                settled_at: r.get(8)?,
                deliveries: Vec::new(),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut deliveries = conn.prepare_cached(
        "SELECT sink, status, attempts, last_error FROM deliveries WHERE event_id = ?1 ORDER BY sink",
    )?;
    for row in &mut rows {
        row.deliveries = deliveries
            .query_map([row.row], |r| {
                let status: String = r.get(1)?;
                let attempts: u32 = r.get(2)?;
                Ok(DeliveryBrief {
                    sink: r.get(0)?,
                    status: retrying_label(status, attempts),
                    attempts,
                    last_error: r.get(3)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        if row.status == "pending" && row.deliveries.iter().any(|d| d.status == "retrying") {
            row.status = "retrying".to_string();
        }
    }
    Ok(rows)
}

/// A delivery's status as the commands show it: `retrying` for a pending one that failed
/// before (the journal stores `pending` with its attempt count), as `--status retrying` selects.
fn retrying_label(status: String, attempts: u32) -> String {
    if status == "pending" && attempts > 0 {
        "retrying".to_string()
    } else {
        status
    }
}

pub(super) fn stats(conn: &Connection, filter: &EventFilter) -> anyhow::Result<Vec<PortalStats>> {
    let clause = filter.clause();
    let sql = format!(
        "SELECT e.portal, COUNT(*), COALESCE(SUM(e.status = 'pending'), 0),
                COALESCE(SUM(e.status = 'delivered'), 0), COALESCE(SUM(e.status = 'dead'), 0),
                COALESCE(SUM(e.upstream IN ('reserved', 'clear_pending', 'error_pending')), 0),
                MIN(CASE WHEN e.status = 'pending' THEN e.fetched_at END),
                COALESCE(SUM(e.status = 'pending' AND EXISTS (SELECT 1 FROM deliveries r
                    WHERE r.event_id = e.id AND r.status = 'pending' AND r.attempts > 0)), 0)
         FROM events e WHERE {} GROUP BY e.portal ORDER BY e.portal",
        clause.sql
    );
    let mut portals = conn
        .prepare(&sql)?
        .query_map(params_from_iter(clause.params.iter()), |r| {
            Ok(PortalStats {
                portal: r.get(0)?,
                events: count(r, 1)?,
                pending: count(r, 2)?,
                retrying: count(r, 7)?,
                delivered: count(r, 3)?,
                dead: count(r, 4)?,
                upstream_unsettled: count(r, 5)?,
                oldest_pending_fetched_at: r.get(6)?,
                sinks: Vec::new(),
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let sink_sql = format!(
        "SELECT e.portal, d.sink, COALESCE(SUM(d.status = 'pending'), 0),
                COALESCE(SUM(d.status = 'pending' AND d.attempts > 0), 0),
                COALESCE(SUM(d.status = 'delivered'), 0), COALESCE(SUM(d.status = 'dead'), 0),
                MIN(CASE WHEN d.status = 'pending' THEN e.fetched_at END)
         FROM deliveries d JOIN events e ON e.id = d.event_id
         WHERE {}{} GROUP BY e.portal, d.sink ORDER BY e.portal, d.sink",
        clause.sql,
        match &filter.sink {
            Some(_) => format!(" AND d.sink = ?{}", clause.params.len() + 1),
            None => String::new(),
        }
    );
    let mut params = clause.params.clone();
    if let Some(sink) = &filter.sink {
        params.push(SqlValue::Text(sink.clone()));
    }
    let mut stmt = conn.prepare(&sink_sql)?;
    let rows = stmt.query_map(params_from_iter(params.iter()), |r| {
        Ok((
            r.get::<_, String>(0)?,
            SinkStats {
                sink: r.get(1)?,
                pending: count(r, 2)?,
                retrying: count(r, 3)?,
                delivered: count(r, 4)?,
                dead: count(r, 5)?,
                oldest_pending_fetched_at: r.get(6)?,
            },
        ))
    })?;
    for row in rows {
        let (portal, sink) = row?;
        if let Some(p) = portals.iter_mut().find(|p| p.portal == portal) {
            p.sinks.push(sink);
        }
    }
    Ok(portals)
}

pub(super) fn show_event(conn: &Connection, id: &str) -> anyhow::Result<Vec<EventDetail>> {
    // `<portal>:<offline ID>` also names every row of that offline ID (the portal part may hold
    // a colon of its own; then it matches nothing here, and the envelope id still does).
    let offline = id
        .rsplit_once(':')
        .and_then(|(portal, n)| Some((portal, n.parse::<i64>().ok()?)));
    let rows: Vec<i64> = match (id.parse::<i64>(), offline) {
        (Ok(row), _) => vec![row],
        (Err(_), Some((portal, offline_id))) => conn
            .prepare_cached(
                "SELECT id FROM events WHERE envelope_id = ?1 OR (portal = ?2 AND offline_id = ?3)
                 ORDER BY id",
            )?
            .query_map(params![id, portal, offline_id], |r| r.get(0))?
            .collect::<Result<_, _>>()?,
        (Err(_), None) => conn
            .prepare_cached("SELECT id FROM events WHERE envelope_id = ?1 ORDER BY id")?
            .query_map([id], |r| r.get(0))?
            .collect::<Result<_, _>>()?,
    };
    let mut out = Vec::new();
    for row in rows {
        if let Some(detail) = event_detail(conn, row)? {
            out.push(detail);
        }
    }
    Ok(out)
}

fn event_detail(conn: &Connection, row: i64) -> anyhow::Result<Option<EventDetail>> {
    let Some(mut detail) = conn
        .prepare_cached(&format!(
            "SELECT {ENVELOPE_COLUMNS}, e.status, e.fetched_at, e.upstream, e.settled_at,
                    b.process_id, b.origin, b.fetched_at, b.settled_at
             FROM events e JOIN batches b ON b.id = e.batch_id WHERE e.id = ?1"
        ))?
        .query_row([row], |r| {
            Ok(EventDetail {
                row,
                envelope: envelope_at(r, 0, 1)?,
                status: r.get(ENVELOPE_WIDTH)?,
                fetched_at: r.get(ENVELOPE_WIDTH + 1)?,
                upstream: UpstreamInfo {
                    state: r.get(ENVELOPE_WIDTH + 2)?,
                    settled_at: r.get(ENVELOPE_WIDTH + 3)?,
                },
                batch: BatchInfo {
                    process_id: r.get(ENVELOPE_WIDTH + 4)?,
                    origin: r.get(ENVELOPE_WIDTH + 5)?,
                    fetched_at: r.get(ENVELOPE_WIDTH + 6)?,
                    settled_at: r.get(ENVELOPE_WIDTH + 7)?,
                },
                deliveries: Vec::new(),
                attempts: Vec::new(),
            })
        })
        .optional()?
    else {
        return Ok(None);
    };
    detail.deliveries = conn
        .prepare_cached(
            "SELECT sink, status, attempts, next_attempt_at, last_error, delivered_at, replays
             FROM deliveries WHERE event_id = ?1 ORDER BY sink",
        )?
        .query_map([row], |r| {
            let status: String = r.get(1)?;
            let next: String = r.get(3)?;
            Ok(DeliveryDetail {
                next_attempt_at: (status == "pending").then_some(next),
                sink: r.get(0)?,
                status,
                attempts: r.get(2)?,
                last_error: r.get(4)?,
                delivered_at: r.get(5)?,
                replays: r.get(6)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    detail.attempts = conn
        .prepare_cached(
            "SELECT sink, attempt, at, outcome, error, output FROM delivery_attempts
             WHERE event_id = ?1 ORDER BY id",
        )?
        .query_map([row], |r| {
            Ok(AttemptDetail {
                sink: r.get(0)?,
                attempt: r.get(1)?,
                at: r.get(2)?,
                outcome: r.get(3)?,
                error: r.get(4)?,
                output: r.get(5)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    // The envelope as the sinks last received it: `attempt` is the most attempts any delivery
    // has made, the number the ATTEMPTS column shows (1 before the first one: what it will
    // carry). The next attempt's number is not shown here: the NEXT ATTEMPT column says when.
    detail.envelope.attempt = detail
        .deliveries
        .iter()
        .map(|d| d.attempts)
        .max()
        .unwrap_or(1)
        .max(1);
    Ok(Some(detail))
}

/// The row ids of matching events, oldest first.
fn matching_rows(conn: &Connection, filter: &EventFilter) -> anyhow::Result<Vec<i64>> {
    let clause = filter.clause();
    let sql = format!(
        "SELECT id FROM (SELECT e.id FROM events e WHERE {} ORDER BY e.id DESC{}) ORDER BY id",
        clause.sql,
        filter.limit_sql()
    );
    let rows = conn
        .prepare(&sql)?
        .query_map(params_from_iter(clause.params.iter()), |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

pub(super) fn replay(
    conn: &mut Connection,
    filter: &EventFilter,
    only_sink: Option<&str>,
    known_sinks: &[String],
) -> anyhow::Result<Requeued> {
    let rows = matching_rows(conn, filter)?;
    requeue(
        conn,
        &rows,
        known_sinks,
        |tx, row| match only_sink {
            Some(sink) => Ok(vec![sink.to_string()]),
            None => sinks_where(tx, row, "1"),
        },
        "INSERT INTO deliveries (event_id, sink, status, attempts, next_attempt_at, replays)
         VALUES (?1, ?2, 'pending', 0, ?3, 1)
         ON CONFLICT (event_id, sink) DO UPDATE SET status = 'pending', attempts = 0,
            next_attempt_at = excluded.next_attempt_at, last_error = NULL,
            replays = deliveries.replays + 1",
    )
}

pub(super) fn retry_dead(
    conn: &mut Connection,
    filter: &EventFilter,
    known_sinks: &[String],
) -> anyhow::Result<Requeued> {
    let mut filter = filter.clone();
    filter.status = Some(StatusFilter::Dead);
    let rows = matching_rows(conn, &filter)?;
    requeue(
        conn,
        &rows,
        known_sinks,
        |tx, row| {
            let mut sinks = sinks_where(tx, row, "status = 'dead'")?;
            sinks.retain(|s| filter.sink.as_ref().is_none_or(|only| only == s));
            Ok(sinks)
        },
        "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_at = ?3
         WHERE event_id = ?1 AND sink = ?2 AND status = 'dead'",
    )
}

/// The sinks of an event's deliveries that satisfy `condition` (SQL over `deliveries`).
fn sinks_where(
    tx: &rusqlite::Transaction<'_>,
    row: i64,
    condition: &str,
) -> rusqlite::Result<Vec<String>> {
    tx.prepare_cached(&format!(
        "SELECT sink FROM deliveries WHERE event_id = ?1 AND {condition} ORDER BY sink"
    ))?
    .query_map([row], |r| r.get(0))?
    .collect()
}

/// Makes deliveries pending again, in transactions of [`DELETE_CHUNK`] events: for each event,
/// `sinks_of` picks the sinks, `requeue_sql` (`?1` event, `?2` sink, `?3` now) resets each one
/// still configured, and the event becomes `pending`.
fn requeue(
    conn: &mut Connection,
    rows: &[i64],
    known_sinks: &[String],
    sinks_of: impl Fn(&rusqlite::Transaction<'_>, i64) -> rusqlite::Result<Vec<String>>,
    requeue_sql: &str,
) -> anyhow::Result<Requeued> {
    let mut out = Requeued::default();
    let at = now();
    for chunk in rows.chunks(DELETE_CHUNK) {
        let tx = conn.transaction()?;
        for &row in chunk {
            let mut any = false;
            for sink in sinks_of(&tx, row)? {
                if !known_sinks.contains(&sink) {
                    out.skipped_unknown_sinks += 1;
                    continue;
                }
                tx.prepare_cached(requeue_sql)?
                    .execute(params![row, sink, at])?;
                out.deliveries += 1;
                any = true;
            }
            if any {
                tx.prepare_cached("UPDATE events SET status = 'pending' WHERE id = ?1")?
                    .execute([row])?;
                out.events += 1;
            }
        }
        tx.commit()?;
    }
    Ok(out)
}

/// Whether the event `e` (SQL over `events e`) was reported with `event.offline.error` and no
/// error-lane row of its offline ID has been journaled after it: Bitrix24 still holds it in its
/// error lane (unchanged, or with a later change merged in), and the next error-lane poll needs
/// its deliveries to tell which sinks have the change.
const STILL_IN_ERROR_LANE: &str = "e.upstream = 'errored' AND NOT EXISTS (
    SELECT 1 FROM events l WHERE l.portal = e.portal AND l.offline_id = e.offline_id
      AND l.lane = 'error' AND l.id > e.id)";

/// Deletes matching dead events that are settled upstream (`dead purge`).
pub(super) fn purge_dead(conn: &mut Connection, filter: &EventFilter) -> anyhow::Result<Pruned> {
    let mut filter = filter.clone();
    filter.status = Some(StatusFilter::Dead);
    delete_settled(conn, &filter, None, true)
}

/// Deletes events settled upstream before `cutoff` (`prune`).
pub(super) fn prune(
    conn: &mut Connection,
    cutoff: DateTime<Utc>,
    include_dead: bool,
) -> anyhow::Result<Pruned> {
    delete_settled(conn, &EventFilter::default(), Some(cutoff), include_dead)
}

/// Deletes matching events that are settled upstream and have no pending delivery, with their
/// deliveries and attempts, then the settled batches left empty. `cutoff` bounds `settled_at`;
/// dead events go only with `include_dead`; events still in Bitrix24's error lane stay.
fn delete_settled(
    conn: &mut Connection,
    filter: &EventFilter,
    cutoff: Option<DateTime<Utc>>,
    include_dead: bool,
) -> anyhow::Result<Pruned> {
    let clause = filter.clause();
    let mut params = clause.params.clone();
    let mut sql = format!(
        "SELECT e.id, e.upstream, {STILL_IN_ERROR_LANE} FROM events e WHERE {}",
        clause.sql
    );
    if let Some(cutoff) = cutoff {
        params.push(SqlValue::Text(timestamp(cutoff)));
        sql.push_str(&format!(
            " AND e.settled_at IS NOT NULL AND e.settled_at < ?{}",
            params.len()
        ));
    }
    if !include_dead {
        sql.push_str(" AND e.status <> 'dead'");
    }
    sql.push_str(" AND e.status <> 'pending' ORDER BY e.id");
    sql.push_str(&filter.limit_sql());
    let candidates: Vec<(i64, String, bool)> = conn
        .prepare(&sql)?
        .query_map(params_from_iter(params.iter()), |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<Result<_, _>>()?;
    let mut out = Pruned::default();
    let mut ids = Vec::new();
    for (id, upstream, in_error_lane) in candidates {
        if upstream != "cleared" && upstream != "errored" {
            out.kept_unsettled += 1;
        } else if in_error_lane {
            out.kept_in_error_lane += 1;
        } else {
            ids.push(id);
        }
    }
    for chunk in ids.chunks(DELETE_CHUNK) {
        let tx = conn.transaction()?;
        {
            // Deliveries and attempts go with the event (ON DELETE CASCADE).
            let mut delete = tx.prepare_cached(&format!(
                "DELETE FROM events AS e WHERE e.id = ?1 AND e.upstream IN ('cleared', 'errored')
                 AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = ?1 AND d.status = 'pending')
                 AND NOT ({STILL_IN_ERROR_LANE})"
            ))?;
            for id in chunk {
                out.events += delete.execute([id])? as u64;
            }
        }
        tx.commit()?;
    }
    out.batches = conn.execute(
        "DELETE FROM batches WHERE settled_at IS NOT NULL
         AND NOT EXISTS (SELECT 1 FROM events e WHERE e.batch_id = batches.id)",
        [],
    )? as u64;
    Ok(out)
}
