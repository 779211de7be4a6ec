//! The SQLite side of `journal migrate` (`journal/migrate.rs`): every table read in key order
//! in one read transaction, handed on as plain records in chunks, times parsed from the RFC
//! 3339 text the journal stores. Opens the file read-only: the journal is left as it was.

use super::SqliteJournal;
use crate::config::Synchronous;
use crate::journal::migrate::{
    AttemptRecord, BatchRecord, CHUNK, ConformanceRecord, DeliveryRecord, EventRecord,
    PortalRecord, Rows, TableCounts, TokenRecord,
};
use crate::journal::types::Access;
use anyhow::Context;
use chrono::{DateTime, Utc};
use rusqlite::Connection;
use rusqlite::types::ValueRef;
use std::path::Path;

/// A SQLite journal open to be exported.
pub(in crate::journal) struct Reader {
    journal: SqliteJournal,
}

/// Where a value that does not read is: table, row key and column.
struct At<'a> {
    table: &'a str,
    key: String,
}

impl Reader {
    /// Opens the journal at `path` read-only; it must be a journal of ours at this build's
    /// schema version.
    pub(in crate::journal) fn open(path: &Path) -> anyhow::Result<Reader> {
        Ok(Reader {
            journal: SqliteJournal::open(path, Synchronous::Full, Access::Read)?,
        })
    }

    /// Rows per table.
    pub(in crate::journal) fn counts(&self) -> anyhow::Result<TableCounts> {
        self.journal.with_conn(|conn| {
            let n = |table: &str| -> anyhow::Result<u64> {
                let n: i64 =
                    conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))?;
                Ok(n.max(0) as u64)
            };
            Ok(TableCounts {
                portals: n("portals")?,
                tokens: n("tokens")?,
                batches: n("batches")?,
                events: n("events")?,
                deliveries: n("deliveries")?,
                delivery_attempts: n("delivery_attempts")?,
                conformance: n("conformance")?,
            })
        })
    }

    /// Hands every row to `out`, table by table (referenced rows first), up to [`CHUNK`] rows
    /// at a time, from one read transaction; returns how many rows each table gave.
    pub(in crate::journal) fn export(
        &self,
        out: &mut dyn FnMut(Rows) -> anyhow::Result<()>,
    ) -> anyhow::Result<TableCounts> {
        self.journal.with_conn(|conn| {
            let tx = conn.transaction()?;
            let mut counts = TableCounts::default();
            let mut send = |rows: Rows| -> anyhow::Result<()> {
                counts.add(&rows);
                out(rows)
            };
            portals(&tx, &mut send)?;
            tokens(&tx, &mut send)?;
            batches(&tx, &mut send)?;
            events(&tx, &mut send)?;
            deliveries(&tx, &mut send)?;
            attempts(&tx, &mut send)?;
            conformance(&tx, &mut send)?;
            tx.finish()?;
            Ok(counts)
        })
    }
}

/// Runs `sql` and hands its rows, read by `read`, to `send` in chunks of [`CHUNK`] as `wrap`
/// makes them.
fn each<T>(
    conn: &Connection,
    sql: &str,
    read: impl Fn(&rusqlite::Row<'_>) -> anyhow::Result<T>,
    wrap: impl Fn(Vec<T>) -> Rows,
    send: &mut dyn FnMut(Rows) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query([])?;
    let mut chunk = Vec::with_capacity(CHUNK);
    while let Some(row) = rows.next()? {
        chunk.push(read(row)?);
        if chunk.len() == CHUNK {
            send(wrap(std::mem::replace(
                &mut chunk,
                Vec::with_capacity(CHUNK),
            )))?;
        }
    }
    if !chunk.is_empty() {
        send(wrap(chunk))?;
    }
    Ok(())
}

impl At<'_> {
    fn new(table: &str, key: impl std::fmt::Display) -> At<'_> {
        At {
            table,
            key: key.to_string(),
        }
    }

    fn context(&self, column: &str) -> String {
        format!("{}.{column} of row {}", self.table, self.key)
    }

    /// A time column (RFC 3339 text).
    fn time(
        &self,
        row: &rusqlite::Row<'_>,
        idx: usize,
        column: &str,
    ) -> anyhow::Result<DateTime<Utc>> {
        self.time_opt(row, idx, column)?
            .with_context(|| format!("{} is empty", self.context(column)))
    }

    fn time_opt(
        &self,
        row: &rusqlite::Row<'_>,
        idx: usize,
        column: &str,
    ) -> anyhow::Result<Option<DateTime<Utc>>> {
        let text: Option<String> = row.get(idx).with_context(|| self.context(column))?;
        text.map(|t| {
            DateTime::parse_from_rfc3339(&t)
                .map(|t| t.with_timezone(&Utc))
                .with_context(|| format!("{} is not an RFC 3339 time: {t:?}", self.context(column)))
        })
        .transpose()
    }

    /// A text column that may hold a number (SQLite keeps what it was given).
    fn text_opt(
        &self,
        row: &rusqlite::Row<'_>,
        idx: usize,
        column: &str,
    ) -> anyhow::Result<Option<String>> {
        Ok(
            match row.get_ref(idx).with_context(|| self.context(column))? {
                ValueRef::Null => None,
                ValueRef::Integer(n) => Some(n.to_string()),
                ValueRef::Real(x) => Some(x.to_string()),
                ValueRef::Text(t) | ValueRef::Blob(t) => Some(
                    String::from_utf8(t.to_vec())
                        .with_context(|| format!("{} is not UTF-8", self.context(column)))?,
                ),
            },
        )
    }

    fn text(&self, row: &rusqlite::Row<'_>, idx: usize, column: &str) -> anyhow::Result<String> {
        self.text_opt(row, idx, column)?
            .with_context(|| format!("{} is empty", self.context(column)))
    }
}

fn portals(
    conn: &Connection,
    send: &mut dyn FnMut(Rows) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    each(
        conn,
        "SELECT name, member_id, client_endpoint, first_seen_at FROM portals ORDER BY name",
        |r| {
            let name: String = r.get(0)?;
            let at = At::new("portals", &name);
            Ok(PortalRecord {
                member_id: at.text_opt(r, 1, "member_id")?,
                client_endpoint: at.text_opt(r, 2, "client_endpoint")?,
                first_seen_at: at.time(r, 3, "first_seen_at")?,
                name,
            })
        },
        Rows::Portals,
        send,
    )
}

fn tokens(
    conn: &Connection,
    send: &mut dyn FnMut(Rows) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    each(
        conn,
        "SELECT portal, access_token, refresh_token, expires_at, scope, member_id,
                client_endpoint, user_id, updated_at
         FROM tokens ORDER BY portal",
        |r| {
            let portal: String = r.get(0)?;
            let at = At::new("tokens", &portal);
            Ok(TokenRecord {
                access_token: at.text(r, 1, "access_token")?,
                refresh_token: at.text(r, 2, "refresh_token")?,
                expires_at: at.time_opt(r, 3, "expires_at")?,
                scope: at.text_opt(r, 4, "scope")?,
                member_id: at.text_opt(r, 5, "member_id")?,
                client_endpoint: at.text_opt(r, 6, "client_endpoint")?,
                user_id: r.get(7).with_context(|| at.context("user_id"))?,
                updated_at: at.time(r, 8, "updated_at")?,
                portal,
            })
        },
        Rows::Tokens,
        send,
    )
}

fn batches(
    conn: &Connection,
    send: &mut dyn FnMut(Rows) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    each(
        conn,
        "SELECT id, portal, process_id, lane, origin, fetched_at, settled_at
         FROM batches ORDER BY id",
        |r| {
            let id: i64 = r.get(0)?;
            let at = At::new("batches", id);
            Ok(BatchRecord {
                id,
                portal: at.text(r, 1, "portal")?,
                process_id: at.text(r, 2, "process_id")?,
                lane: at.text(r, 3, "lane")?,
                origin: at.text(r, 4, "origin")?,
                fetched_at: at.time(r, 5, "fetched_at")?,
                settled_at: at.time_opt(r, 6, "settled_at")?,
            })
        },
        Rows::Batches,
        send,
    )
}

fn events(
    conn: &Connection,
    send: &mut dyn FnMut(Rows) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    each(
        conn,
        "SELECT id, envelope_id, portal, batch_id, offline_id, event, message_id, timestamp,
                change_key, data, additional, entity, entity_error, enrichment, lane, fetched_at,
                status, upstream, settled_at
         FROM events ORDER BY id",
        |r| {
            let id: i64 = r.get(0)?;
            let at = At::new("events", id);
            Ok(EventRecord {
                id,
                envelope_id: at.text(r, 1, "envelope_id")?,
                portal: at.text(r, 2, "portal")?,
                batch_id: r.get(3).with_context(|| at.context("batch_id"))?,
                offline_id: r.get(4).with_context(|| at.context("offline_id"))?,
                event: at.text(r, 5, "event")?,
                message_id: at.text(r, 6, "message_id")?,
                timestamp: at.text(r, 7, "timestamp")?,
                change_key: at.text_opt(r, 8, "change_key")?,
                data: at.text(r, 9, "data")?,
                additional: at.text(r, 10, "additional")?,
                entity: at.text_opt(r, 11, "entity")?,
                entity_error: at.text_opt(r, 12, "entity_error")?,
                enrichment: at.text_opt(r, 13, "enrichment")?,
                lane: at.text(r, 14, "lane")?,
                fetched_at: at.time(r, 15, "fetched_at")?,
                status: at.text(r, 16, "status")?,
                upstream: at.text(r, 17, "upstream")?,
                settled_at: at.time_opt(r, 18, "settled_at")?,
            })
        },
        Rows::Events,
        send,
    )
}

fn deliveries(
    conn: &Connection,
    send: &mut dyn FnMut(Rows) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    each(
        conn,
        "SELECT event_id, sink, status, attempts, next_attempt_at, last_error, delivered_at, replays
         FROM deliveries ORDER BY event_id, sink",
        |r| {
            let event_id: i64 = r.get(0)?;
            let sink: String = r.get(1)?;
            let at = At::new("deliveries", format!("{event_id}/{sink}"));
            Ok(DeliveryRecord {
                event_id,
                status: at.text(r, 2, "status")?,
                attempts: r.get(3).with_context(|| at.context("attempts"))?,
                next_attempt_at: at.time(r, 4, "next_attempt_at")?,
                last_error: at.text_opt(r, 5, "last_error")?,
                delivered_at: at.time_opt(r, 6, "delivered_at")?,
                replays: r.get(7).with_context(|| at.context("replays"))?,
                sink,
            })
        },
        Rows::Deliveries,
        send,
    )
}

fn attempts(
    conn: &Connection,
    send: &mut dyn FnMut(Rows) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    each(
        conn,
        "SELECT id, event_id, sink, attempt, at, outcome, error, output
         FROM delivery_attempts ORDER BY id",
        |r| {
            let id: i64 = r.get(0)?;
            let at = At::new("delivery_attempts", id);
            Ok(AttemptRecord {
                id,
                event_id: r.get(1).with_context(|| at.context("event_id"))?,
                sink: at.text(r, 2, "sink")?,
                attempt: r.get(3).with_context(|| at.context("attempt"))?,
                at: at.time(r, 4, "at")?,
                outcome: at.text(r, 5, "outcome")?,
                error: at.text_opt(r, 6, "error")?,
                output: at.text_opt(r, 7, "output")?,
            })
        },
        Rows::Attempts,
        send,
    )
}

fn conformance(
    conn: &Connection,
    send: &mut dyn FnMut(Rows) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    each(
        conn,
        "SELECT portal, check_name, status, observed, value, run_id, checked_at
         FROM conformance ORDER BY portal, check_name",
        |r| {
            let portal: String = r.get(0)?;
            let check_name: String = r.get(1)?;
            let at = At::new("conformance", format!("{portal}/{check_name}"));
            Ok(ConformanceRecord {
                status: at.text(r, 2, "status")?,
                observed: at.text(r, 3, "observed")?,
                value: r.get(4).with_context(|| at.context("value"))?,
                run_id: at.text(r, 5, "run_id")?,
                checked_at: at.time(r, 6, "checked_at")?,
                portal,
                check_name,
            })
        },
        Rows::Conformance,
        send,
    )
}
