//! `journal migrate`: copies a stopped SQLite journal into a PostgreSQL schema. The rows travel
//! as the plain records of this file: the SQLite backend exports them (`sqlite/export.rs`,
//! reading its tables in id order, times parsed from their RFC 3339 text), the PostgreSQL
//! backend imports them (`postgres/import.rs`: the schema created, every row with its id, the
//! identities set past the highest, the row counts checked, all in one transaction). Neither
//! side's SQL leaves its backend; the SQLite file is only read.

use super::check;
use super::lock::DaemonLock;
use super::postgres::import::Importer;
use super::sqlite::export;
use super::types::Access;
use crate::config::PostgresJournalConfig;
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Rows sent to PostgreSQL per statement.
pub(super) const CHUNK: usize = 1000;

/// A row of `portals`.
#[derive(Debug, Clone)]
pub(super) struct PortalRecord {
    pub name: String,
    pub member_id: Option<String>,
    pub client_endpoint: Option<String>,
    pub first_seen_at: DateTime<Utc>,
}

/// A row of `tokens` (the OAuth pair: never logged).
#[derive(Clone)]
pub(super) struct TokenRecord {
    pub portal: String,
    pub access_token: String,
    pub refresh_token: String,
    pub expires_at: Option<DateTime<Utc>>,
    pub scope: Option<String>,
    pub member_id: Option<String>,
    pub client_endpoint: Option<String>,
    pub user_id: Option<i64>,
    pub updated_at: DateTime<Utc>,
}

/// A row of `batches`.
#[derive(Debug, Clone)]
pub(super) struct BatchRecord {
    pub id: i64,
    pub portal: String,
    pub process_id: String,
    pub lane: String,
    pub origin: String,
    pub fetched_at: DateTime<Utc>,
    pub settled_at: Option<DateTime<Utc>>,
}

/// A row of `events`; `data`, `additional` and `entity` as the text stored.
#[derive(Debug, Clone)]
pub(super) struct EventRecord {
    pub id: i64,
    pub envelope_id: String,
    pub portal: String,
    pub batch_id: i64,
    pub offline_id: i64,
    pub event: String,
    pub message_id: String,
    pub timestamp: String,
    pub change_key: Option<String>,
    pub data: String,
    pub additional: String,
    pub entity: Option<String>,
    pub entity_error: Option<String>,
    pub enrichment: Option<String>,
    pub lane: String,
    pub fetched_at: DateTime<Utc>,
    pub status: String,
    pub upstream: String,
    pub settled_at: Option<DateTime<Utc>>,
}

/// A row of `deliveries`.
#[derive(Debug, Clone)]
pub(super) struct DeliveryRecord {
    pub event_id: i64,
    pub sink: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub replays: i64,
}

/// A row of `delivery_attempts`.
#[derive(Debug, Clone)]
pub(super) struct AttemptRecord {
    pub id: i64,
    pub event_id: i64,
    pub sink: String,
    pub attempt: i64,
    pub at: DateTime<Utc>,
    pub outcome: String,
    pub error: Option<String>,
    pub output: Option<String>,
}

/// A row of `conformance`.
#[derive(Debug, Clone)]
pub(super) struct ConformanceRecord {
    pub portal: String,
    pub check_name: String,
    pub status: String,
    pub observed: String,
    pub value: Option<i64>,
    pub run_id: String,
    pub checked_at: DateTime<Utc>,
}

/// Up to [`CHUNK`] rows of one table, in the order the tables must be filled (a row's
/// references first).
pub(super) enum Rows {
    Portals(Vec<PortalRecord>),
    Tokens(Vec<TokenRecord>),
    Batches(Vec<BatchRecord>),
    Events(Vec<EventRecord>),
    Deliveries(Vec<DeliveryRecord>),
    Attempts(Vec<AttemptRecord>),
    Conformance(Vec<ConformanceRecord>),
}

impl Rows {
    fn len(&self) -> usize {
        match self {
            Rows::Portals(r) => r.len(),
            Rows::Tokens(r) => r.len(),
            Rows::Batches(r) => r.len(),
            Rows::Events(r) => r.len(),
            Rows::Deliveries(r) => r.len(),
            Rows::Attempts(r) => r.len(),
            Rows::Conformance(r) => r.len(),
        }
    }
}

/// Rows per table of a journal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TableCounts {
    pub portals: u64,
    pub tokens: u64,
    pub batches: u64,
    pub events: u64,
    pub deliveries: u64,
    pub delivery_attempts: u64,
    pub conformance: u64,
}

impl TableCounts {
    /// `(table, rows)`, in the order the tables are copied.
    pub fn by_table(&self) -> [(&'static str, u64); 7] {
        [
            ("portals", self.portals),
            ("tokens", self.tokens),
            ("batches", self.batches),
            ("events", self.events),
            ("deliveries", self.deliveries),
            ("delivery_attempts", self.delivery_attempts),
            ("conformance", self.conformance),
        ]
    }

    /// Counts `rows` in.
    pub(super) fn add(&mut self, rows: &Rows) {
        let n = rows.len() as u64;
        match rows {
            Rows::Portals(_) => self.portals += n,
            Rows::Tokens(_) => self.tokens += n,
            Rows::Batches(_) => self.batches += n,
            Rows::Events(_) => self.events += n,
            Rows::Deliveries(_) => self.deliveries += n,
            Rows::Attempts(_) => self.delivery_attempts += n,
            Rows::Conformance(_) => self.conformance += n,
        }
    }

    /// The tables whose counts differ, as `table: N <self_is>, M <other_is>`.
    pub(super) fn differences(
        &self,
        self_is: &str,
        other: &TableCounts,
        other_is: &str,
    ) -> Vec<String> {
        self.by_table()
            .iter()
            .zip(other.by_table())
            .filter(|((_, a), (_, b))| a != b)
            .map(|((table, a), (_, b))| format!("{table}: {a} {self_is}, {b} {other_is}"))
            .collect()
    }
}

/// What `journal migrate` did.
#[derive(Debug, Clone, Serialize)]
pub struct Migrated {
    /// The SQLite journal copied (left as it was).
    pub source: PathBuf,
    /// The PostgreSQL journal written: the URL without its password, and the schema.
    pub target: String,
    /// Rows copied, per table (equal to the SQLite journal's: checked before committing).
    pub copied: TableCounts,
}

/// Copies the SQLite journal at `source` into the schema `target` names, which must not hold
/// anything yet (a journal of ours without a row is taken as empty). Refused while a daemon
/// holds the journal's lock; the lock is held until the copy is committed, so none starts on the
/// file meanwhile. One PostgreSQL transaction: on any error nothing is left in the target, and
/// the SQLite journal is never written. Blocking: call it outside an async runtime.
pub fn sqlite_to_postgres(
    source: &Path,
    target: &PostgresJournalConfig,
) -> anyhow::Result<Migrated> {
    check(source, Access::Read)?;
    let _lock = DaemonLock::acquire(source)?;
    let reader = export::Reader::open(source)?;
    let expected = reader.counts()?;
    let importer = Importer::start(target)?;
    let exported = reader.export(&mut |rows| importer.send(rows))?;
    if exported != expected {
        anyhow::bail!(
            "the SQLite journal {} changed while it was read ({}): nothing was committed",
            source.display(),
            expected
                .differences("counted", &exported, "read")
                .join("; ")
        );
    }
    let copied = importer.finish(expected)?;
    Ok(Migrated {
        source: source.to_path_buf(),
        target: target.location(),
        copied,
    })
}
