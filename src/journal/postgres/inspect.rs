//! The SQL of the operator queries and maintenance: filtered listings, per-sink statistics,
//! one event in full, replay, dead-event handling and pruning; the same results as the SQLite
//! backend's (`journal/sqlite/inspect.rs`). Used by the CLI, beside a running daemon (every
//! write here is a short transaction), and by the daemon's prune job.

use super::Conn;
use crate::envelope::{Envelope, Lane};
use crate::journal::inspect::{
    AttemptDetail, BatchInfo, DeliveryBrief, DeliveryDetail, EventDetail, EventFilter, EventRow,
    PortalStats, Pruned, Requeued, SinkStats, StatusFilter, UpstreamInfo,
};
use crate::journal::timestamp;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

/// Events changed or deleted per transaction by `replay`, `dead retry|purge` and `prune`, so
/// the daemon never waits long.
const CHUNK: usize = 500;

type Param = Box<dyn ToSql + Sync + Send>;

/// A `WHERE` clause over `events e` and its parameters (`$1`, `$2`, ...).
struct Clause {
    sql: String,
    params: Vec<Param>,
}

impl Clause {
    /// Appends `text`, whose `?` becomes the next parameter, bound to `value`.
    fn bind(&mut self, text: &str, value: Param) {
        self.params.push(value);
        self.sql.push_str(" AND ");
        self.sql
            .push_str(&text.replace('?', &format!("${}", self.params.len())));
    }

    fn push(&mut self, text: &str) {
        self.sql.push_str(" AND ");
        self.sql.push_str(text);
    }

    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

/// The filter as SQL over `events e`.
fn clause(filter: &EventFilter) -> Clause {
    let mut c = Clause {
        sql: "TRUE".to_string(),
        params: Vec::new(),
    };
    if let Some(portal) = &filter.portal {
        c.bind("e.portal = ?", Box::new(portal.clone()));
    }
    if let Some(event) = &filter.event {
        c.bind("e.event ~ ?", Box::new(glob_regex(&event.to_uppercase())));
    }
    if let Some(since) = filter.since {
        c.bind("e.fetched_at >= ?", Box::new(since));
    }
    if let Some(until) = filter.until {
        c.bind("e.fetched_at < ?", Box::new(until));
    }
    let delivery_status = |status: StatusFilter| match status {
        StatusFilter::Pending => "d.status = 'pending'",
        StatusFilter::Retrying => "d.status = 'pending' AND d.attempts > 0",
        StatusFilter::Delivered => "d.status = 'delivered'",
        StatusFilter::Dead => "d.status = 'dead'",
    };
    match (&filter.sink, filter.status) {
        (Some(sink), status) => {
            let extra = status
                .map(|s| format!(" AND {}", delivery_status(s)))
                .unwrap_or_default();
            c.bind(
                &format!(
                    "EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id AND d.sink = ?{extra})"
                ),
                Box::new(sink.clone()),
            );
        }
        (None, Some(status @ (StatusFilter::Retrying | StatusFilter::Dead))) => c.push(&format!(
            "EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id AND {})",
            delivery_status(status)
        )),
        (None, Some(StatusFilter::Pending)) => c.push("e.status = 'pending'"),
        (None, Some(StatusFilter::Delivered)) => c.push("e.status = 'delivered'"),
        (None, None) => {}
    }
    c
}

fn limit_sql(filter: &EventFilter) -> String {
    match filter.limit {
        Some(n) => format!(" LIMIT {n}"),
        None => String::new(),
    }
}

/// A glob as SQLite's `GLOB` reads it (`*` any run, `?` one character, `[...]` a class, `[^...]`
/// its complement; case-sensitive) as an anchored POSIX regular expression for `~`.
fn glob_regex(glob: &str) -> String {
    let mut out = String::from("^");
    let mut chars = glob.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => out.push_str(".*"),
            '?' => out.push('.'),
            '[' => {
                // A class runs to the next `]` (one right after `[` or `[^` belongs to it);
                // without one, `[` is a plain character.
                let rest: String = chars.clone().collect();
                let skip = usize::from(rest.starts_with('^'));
                let body_start = skip + usize::from(rest[skip..].starts_with(']'));
                match rest[body_start..].find(']') {
                    Some(end) => {
                        let class = &rest[..body_start + end];
                        out.push('[');
                        for (i, ch) in class.chars().enumerate() {
                            match ch {
                                '^' if i == 0 => out.push('^'),
                                '\\' => out.push_str("\\\\"),
                                _ => out.push(ch),
                            }
                        }
                        out.push(']');
                        for _ in 0..class.chars().count() + 1 {
                            chars.next();
                        }
                    }
                    None => out.push_str("\\["),
                }
            }
            c if c.is_ascii_alphanumeric() || c == '_' || !c.is_ascii() => out.push(c),
            c => {
                out.push('\\');
                out.push(c);
            }
        }
    }
    out.push('$');
    out
}

/// A time column as the commands show it: [`timestamp`], as the SQLite journal stores it.
fn time(row: &Row, idx: usize) -> Result<String, tokio_postgres::Error> {
    Ok(timestamp(row.try_get::<_, DateTime<Utc>>(idx)?))
}

fn time_opt(row: &Row, idx: usize) -> Result<Option<String>, tokio_postgres::Error> {
    Ok(row.try_get::<_, Option<DateTime<Utc>>>(idx)?.map(timestamp))
}

fn count(row: &Row, idx: usize) -> Result<u64, tokio_postgres::Error> {
    Ok(row.try_get::<_, i64>(idx)?.max(0) as u64)
}

fn small(row: &Row, idx: usize) -> Result<u32, tokio_postgres::Error> {
    Ok(row.try_get::<_, i64>(idx)?.clamp(0, u32::MAX as i64) as u32)
}

pub(super) async fn list_events(
    conn: &Conn,
    filter: &EventFilter,
    after: Option<i64>,
) -> anyhow::Result<Vec<EventRow>> {
    let mut clause = clause(filter);
    if let Some(after) = after {
        clause.bind("e.id > ?", Box::new(after));
    }
    // The newest `limit` rows, shown oldest first (`journal tail`: the first `limit` after).
    let sql = format!(
        "SELECT * FROM (
            SELECT e.id, e.envelope_id, e.portal, e.event, e.lane, e.status, e.upstream,
                   e.fetched_at, e.settled_at
            FROM events e WHERE {} ORDER BY e.id {}{}
         ) q ORDER BY id",
        clause.sql,
        if after.is_some() { "ASC" } else { "DESC" },
        limit_sql(filter)
    );
    let mut rows = conn
        .query(&sql, &clause.refs())
        .await?
        .iter()
        .map(|r| {
            Ok(EventRow {
                row: r.try_get(0)?,
                id: r.try_get(1)?,
                portal: r.try_get(2)?,
                event: r.try_get(3)?,
                lane: r.try_get(4)?,
                status: r.try_get(5)?,
                upstream: r.try_get(6)?,
                fetched_at: time(r, 7)?,
                settled_at: time_opt(r, 8)?,
                deliveries: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    let ids: Vec<i64> = rows.iter().map(|r| r.row).collect();
    let mut by_event: HashMap<i64, Vec<DeliveryBrief>> = HashMap::new();
    for r in conn
        .query(
            "SELECT event_id, sink, status, attempts, last_error FROM deliveries
             WHERE event_id = ANY($1) ORDER BY event_id, sink",
            &[&ids],
        )
        .await?
    {
        let attempts = small(&r, 3)?;
        by_event
            .entry(r.try_get(0)?)
            .or_default()
            .push(DeliveryBrief {
                sink: r.try_get(1)?,
                status: retrying_label(r.try_get(2)?, attempts),
                attempts,
                last_error: r.try_get(4)?,
            });
    }
    for row in &mut rows {
        row.deliveries = by_event.remove(&row.row).unwrap_or_default();
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

pub(super) async fn stats(conn: &Conn, filter: &EventFilter) -> anyhow::Result<Vec<PortalStats>> {
    let mut clause = clause(filter);
    let sql = format!(
        "SELECT e.portal, COUNT(*),
                COUNT(*) FILTER (WHERE e.status = 'pending'),
                COUNT(*) FILTER (WHERE e.status = 'delivered'),
                COUNT(*) FILTER (WHERE e.status = 'dead'),
                COUNT(*) FILTER (WHERE e.upstream IN ('reserved', 'clear_pending', 'error_pending')),
                MIN(e.fetched_at) FILTER (WHERE e.status = 'pending'),
                COUNT(*) FILTER (WHERE e.status = 'pending' AND EXISTS (SELECT 1 FROM deliveries r
                    WHERE r.event_id = e.id AND r.status = 'pending' AND r.attempts > 0))
         FROM events e WHERE {} GROUP BY e.portal ORDER BY e.portal",
        clause.sql
    );
    let mut portals = conn
        .query(&sql, &clause.refs())
        .await?
        .iter()
        .map(|r| {
            Ok(PortalStats {
                portal: r.try_get(0)?,
                events: count(r, 1)?,
                pending: count(r, 2)?,
                retrying: count(r, 7)?,
                delivered: count(r, 3)?,
                dead: count(r, 4)?,
                upstream_unsettled: count(r, 5)?,
                oldest_pending_fetched_at: time_opt(r, 6)?,
                sinks: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    if let Some(sink) = &filter.sink {
        clause.bind("d.sink = ?", Box::new(sink.clone()));
    }
    let sink_sql = format!(
        "SELECT e.portal, d.sink,
                COUNT(*) FILTER (WHERE d.status = 'pending'),
                COUNT(*) FILTER (WHERE d.status = 'pending' AND d.attempts > 0),
                COUNT(*) FILTER (WHERE d.status = 'delivered'),
                COUNT(*) FILTER (WHERE d.status = 'dead'),
                MIN(e.fetched_at) FILTER (WHERE d.status = 'pending')
         FROM deliveries d JOIN events e ON e.id = d.event_id
         WHERE {} GROUP BY e.portal, d.sink ORDER BY e.portal, d.sink",
        clause.sql
    );
    for r in conn.query(&sink_sql, &clause.refs()).await? {
        let portal: String = r.try_get(0)?;
        let sink = SinkStats {
            sink: r.try_get(1)?,
            pending: count(&r, 2)?,
            retrying: count(&r, 3)?,
            delivered: count(&r, 4)?,
            dead: count(&r, 5)?,
            oldest_pending_fetched_at: time_opt(&r, 6)?,
        };
        if let Some(p) = portals.iter_mut().find(|p| p.portal == portal) {
            p.sinks.push(sink);
        }
    }
    Ok(portals)
}

pub(super) async fn show_event(conn: &Conn, id: &str) -> anyhow::Result<Vec<EventDetail>> {
    // `<portal>:<offline ID>` also names every row of that offline ID (the portal part may hold
    // a colon of its own; then it matches nothing here, and the envelope id still does).
    let offline = id
        .rsplit_once(':')
        .and_then(|(portal, n)| Some((portal, n.parse::<i64>().ok()?)));
    let rows: Vec<i64> = match (id.parse::<i64>(), offline) {
        (Ok(row), _) => vec![row],
        (Err(_), Some((portal, offline_id))) => conn
            .query(
                "SELECT id FROM events WHERE envelope_id = $1 OR (portal = $2 AND offline_id = $3)
                 ORDER BY id",
                &[&id, &portal, &offline_id],
            )
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?,
        (Err(_), None) => conn
            .query(
                "SELECT id FROM events WHERE envelope_id = $1 ORDER BY id",
                &[&id],
            )
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?,
    };
    let mut out = Vec::new();
    for row in rows {
        if let Some(detail) = event_detail(conn, row).await? {
            out.push(detail);
        }
    }
    Ok(out)
}

/// Reads the envelope of `e` from columns 0 to 10 of `SELECT e.envelope_id, e.portal, e.event,
/// e.offline_id, e.message_id, e.timestamp, e.data, e.additional, e.lane, e.entity,
/// e.entity_error`. JSON columns that do not parse (never written by this crate) read as
/// `null`.
fn envelope(r: &Row, attempt: u32) -> Result<Envelope, tokio_postgres::Error> {
    let json = |i: usize| -> Result<Value, tokio_postgres::Error> {
        let text: Option<String> = r.try_get(i)?;
        Ok(text
            .and_then(|t| crate::json_depth::from_str(&t).ok())
            .unwrap_or(Value::Null))
    };
    Ok(Envelope {
        id: r.try_get(0)?,
        portal: r.try_get(1)?,
        event: r.try_get(2)?,
        offline_id: r.try_get(3)?,
        message_id: r.try_get(4)?,
        timestamp: r.try_get(5)?,
        data: json(6)?,
        additional: json(7)?,
        lane: Lane::parse(r.try_get(8)?).unwrap_or(Lane::Normal),
        attempt,
        entity: json(9)?,
        entity_error: r.try_get(10)?,
    })
}

async fn event_detail(conn: &Conn, row: i64) -> anyhow::Result<Option<EventDetail>> {
    let Some(r) = conn
        .query_opt(
            "SELECT e.envelope_id, e.portal, e.event, e.offline_id, e.message_id, e.timestamp,
                    e.data, e.additional, e.lane, e.entity, e.entity_error,
                    e.status, e.fetched_at, e.upstream, e.settled_at,
                    b.process_id, b.origin, b.fetched_at, b.settled_at
             FROM events e JOIN batches b ON b.id = e.batch_id WHERE e.id = $1",
            &[&row],
        )
        .await?
    else {
        return Ok(None);
    };
    let mut detail = EventDetail {
        row,
        envelope: envelope(&r, 1)?,
        status: r.try_get(11)?,
        fetched_at: time(&r, 12)?,
        upstream: UpstreamInfo {
            state: r.try_get(13)?,
            settled_at: time_opt(&r, 14)?,
        },
        batch: BatchInfo {
            process_id: r.try_get(15)?,
            origin: r.try_get(16)?,
            fetched_at: time(&r, 17)?,
            settled_at: time_opt(&r, 18)?,
        },
        deliveries: Vec::new(),
        attempts: Vec::new(),
    };
    detail.deliveries = conn
        .query(
            "SELECT sink, status, attempts, next_attempt_at, last_error, delivered_at, replays
             FROM deliveries WHERE event_id = $1 ORDER BY sink",
            &[&row],
        )
        .await?
        .iter()
        .map(|r| {
            let status: String = r.try_get(1)?;
            Ok(DeliveryDetail {
                next_attempt_at: if status == "pending" {
                    Some(time(r, 3)?)
                } else {
                    None
                },
                sink: r.try_get(0)?,
                status,
                attempts: small(r, 2)?,
                last_error: r.try_get(4)?,
                delivered_at: time_opt(r, 5)?,
                replays: small(r, 6)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()?;
    detail.attempts = conn
        .query(
            "SELECT sink, attempt, at, outcome, error, output FROM delivery_attempts
             WHERE event_id = $1 ORDER BY id",
            &[&row],
        )
        .await?
        .iter()
        .map(|r| {
            Ok(AttemptDetail {
                sink: r.try_get(0)?,
                attempt: small(r, 1)?,
                at: time(r, 2)?,
                outcome: r.try_get(3)?,
                error: r.try_get(4)?,
                output: r.try_get(5)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()?;
    // The envelope as the sinks last received it: `attempt` is the most attempts any delivery
    // has made, the number the ATTEMPTS column shows (1 before the first one: what it will
    // carry).
    detail.envelope.attempt = detail
        .deliveries
        .iter()
        .map(|d| d.attempts)
        .max()
        .unwrap_or(1)
        .max(1);
    Ok(Some(detail))
}

/// The row ids of matching events, oldest first (the newest `limit` with one).
async fn matching_rows(conn: &Conn, filter: &EventFilter) -> anyhow::Result<Vec<i64>> {
    let clause = clause(filter);
    let sql = format!(
        "SELECT id FROM (SELECT e.id FROM events e WHERE {} ORDER BY e.id DESC{}) q ORDER BY id",
        clause.sql,
        limit_sql(filter)
    );
    Ok(conn
        .query(&sql, &clause.refs())
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?)
}

/// Which deliveries of an event a requeue resets.
enum Sinks<'a> {
    /// This one sink, added if the event never went there (`replay --sink`).
    Only(&'a str),
    /// Every delivery the event has (`replay`).
    Every,
    /// Its dead deliveries, to `sink` only when given (`dead retry [--sink]`).
    Dead(Option<&'a str>),
}

pub(super) async fn replay(
    conn: &mut Conn,
    filter: &EventFilter,
    only_sink: Option<&str>,
    known_sinks: &[String],
) -> anyhow::Result<Requeued> {
    let rows = matching_rows(conn, filter).await?;
    let sinks = match only_sink {
        Some(sink) => Sinks::Only(sink),
        None => Sinks::Every,
    };
    requeue(conn, &rows, known_sinks, sinks).await
}

pub(super) async fn retry_dead(
    conn: &mut Conn,
    filter: &EventFilter,
    known_sinks: &[String],
) -> anyhow::Result<Requeued> {
    let mut filter = filter.clone();
    filter.status = Some(StatusFilter::Dead);
    let rows = matching_rows(conn, &filter).await?;
    requeue(
        conn,
        &rows,
        known_sinks,
        Sinks::Dead(filter.sink.as_deref()),
    )
    .await
}

/// Makes deliveries pending again (attempts from zero, due now), in transactions of [`CHUNK`]
/// events: `sinks` picks them, those to sinks not in `known_sinks` are counted and left alone,
/// and every event with one reset becomes `pending`.
async fn requeue(
    conn: &mut Conn,
    rows: &[i64],
    known_sinks: &[String],
    sinks: Sinks<'_>,
) -> anyhow::Result<Requeued> {
    let mut out = Requeued::default();
    let at = Utc::now();
    for chunk in rows.chunks(CHUNK) {
        let tx = conn.transaction().await?;
        let chunk = chunk.to_vec();
        let pairs: Vec<(i64, String)> = match sinks {
            Sinks::Only(sink) => chunk.iter().map(|&e| (e, sink.to_string())).collect(),
            Sinks::Every | Sinks::Dead(_) => {
                let dead_only = matches!(sinks, Sinks::Dead(_));
                tx.query(
                    "SELECT event_id, sink FROM deliveries
                     WHERE event_id = ANY($1) AND (NOT $2 OR status = 'dead')
                     ORDER BY event_id, sink",
                    &[&chunk, &dead_only],
                )
                .await?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()?
                .into_iter()
                .filter(|(_, sink)| match sinks {
                    Sinks::Dead(Some(only)) => sink == only,
                    _ => true,
                })
                .collect()
            }
        };
        let (known, unknown): (Vec<_>, Vec<_>) = pairs
            .into_iter()
            .partition(|(_, sink)| known_sinks.contains(sink));
        out.skipped_unknown_sinks += unknown.len() as u64;
        if known.is_empty() {
            tx.commit().await?;
            continue;
        }
        let (event_ids, sink_names): (Vec<i64>, Vec<String>) = known.iter().cloned().unzip();
        let sql = match sinks {
            Sinks::Only(_) | Sinks::Every => {
                "INSERT INTO deliveries (event_id, sink, status, attempts, next_attempt_at, replays)
                 SELECT u.event_id, u.sink, 'pending', 0, $3, 1
                 FROM unnest($1::bigint[], $2::text[]) AS u(event_id, sink)
                 ON CONFLICT (event_id, sink) DO UPDATE SET status = 'pending', attempts = 0,
                    next_attempt_at = excluded.next_attempt_at, last_error = NULL,
                    replays = deliveries.replays + 1"
            }
            Sinks::Dead(_) => {
                "UPDATE deliveries d SET status = 'pending', attempts = 0, next_attempt_at = $3
                 FROM unnest($1::bigint[], $2::text[]) AS u(event_id, sink)
                 WHERE d.event_id = u.event_id AND d.sink = u.sink AND d.status = 'dead'"
            }
        };
        tx.execute(sql, &[&event_ids, &sink_names, &at]).await?;
        out.deliveries += known.len() as u64;
        let events: Vec<i64> = event_ids
            .iter()
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        tx.execute(
            "UPDATE events SET status = 'pending' WHERE id = ANY($1)",
            &[&events],
        )
        .await?;
        out.events += events.len() as u64;
        tx.commit().await?;
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
pub(super) async fn purge_dead(conn: &mut Conn, filter: &EventFilter) -> anyhow::Result<Pruned> {
    let mut filter = filter.clone();
    filter.status = Some(StatusFilter::Dead);
    delete_settled(conn, &filter, None, true).await
}

/// Deletes events settled upstream before `cutoff` (`prune`).
pub(super) async fn prune(
    conn: &mut Conn,
    cutoff: DateTime<Utc>,
    include_dead: bool,
) -> anyhow::Result<Pruned> {
    delete_settled(conn, &EventFilter::default(), Some(cutoff), include_dead).await
}

/// Deletes matching events that are settled upstream and have no pending delivery, with their
/// deliveries and attempts, then the settled batches left empty. `cutoff` bounds `settled_at`;
/// dead events go only with `include_dead`; events still in Bitrix24's error lane stay.
async fn delete_settled(
    conn: &mut Conn,
    filter: &EventFilter,
    cutoff: Option<DateTime<Utc>>,
    include_dead: bool,
) -> anyhow::Result<Pruned> {
    let mut clause = clause(filter);
    if let Some(cutoff) = cutoff {
        clause.bind(
            "e.settled_at IS NOT NULL AND e.settled_at < ?",
            Box::new(cutoff),
        );
    }
    if !include_dead {
        clause.push("e.status <> 'dead'");
    }
    clause.push("e.status <> 'pending'");
    let sql = format!(
        "SELECT e.id, e.upstream, ({STILL_IN_ERROR_LANE}) FROM events e WHERE {} ORDER BY e.id{}",
        clause.sql,
        limit_sql(filter)
    );
    let mut out = Pruned::default();
    let mut ids = Vec::new();
    for r in conn.query(&sql, &clause.refs()).await? {
        let (id, upstream, in_error_lane): (i64, String, bool) =
            (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        if upstream != "cleared" && upstream != "errored" {
            out.kept_unsettled += 1;
        } else if in_error_lane {
            out.kept_in_error_lane += 1;
        } else {
            ids.push(id);
        }
    }
    for chunk in ids.chunks(CHUNK) {
        // Deliveries and attempts go with the event (ON DELETE CASCADE). The conditions are
        // checked again: the daemon may have changed an event since it was selected.
        out.events += conn
            .execute(
                &format!(
                    "DELETE FROM events AS e WHERE e.id = ANY($1)
                     AND e.upstream IN ('cleared', 'errored')
                     AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id AND d.status = 'pending')
                     AND NOT ({STILL_IN_ERROR_LANE})"
                ),
                &[&chunk],
            )
            .await?;
    }
    out.batches = conn
        .execute(
            "DELETE FROM batches b WHERE b.settled_at IS NOT NULL
             AND NOT EXISTS (SELECT 1 FROM events e WHERE e.batch_id = b.id)",
            &[],
        )
        .await?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::glob_regex;

    #[test]
    fn globs_read_as_sqlite_reads_them() {
        assert_eq!(glob_regex("ONCRMDEAL*"), "^ONCRMDEAL.*$");
        assert_eq!(glob_regex("ONCRM?EAL"), "^ONCRM.EAL$");
        assert_eq!(glob_regex("A.B+C"), "^A\\.B\\+C$");
        assert_eq!(glob_regex("ON[A-C]X"), "^ON[A-C]X$");
        assert_eq!(glob_regex("ON[^A]X"), "^ON[^A]X$");
        assert_eq!(glob_regex("ON[]A]X"), "^ON[]A]X$");
        assert_eq!(glob_regex("ON[X"), "^ON\\[X$");
    }
}
