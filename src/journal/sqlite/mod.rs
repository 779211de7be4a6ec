//! The SQLite backend: one file (WAL, `synchronous=FULL` by default) behind one connection.
//! Every call runs on tokio's blocking pool, one at a time: async callers wait for their turn
//! on a semaphore before they take a blocking thread, and the hot writes that queue meanwhile
//! share one transaction ([`group_commit`]). The SQL lives in one file per concern;
//! this file opens the journal and maps [`JournalBackend`] (which documents each operation)
//! onto them.

mod backup;
pub mod baseline;
mod batches;
mod conformance;
mod deliveries;
mod enrichment;
pub(super) mod export;
mod group_commit;
mod inspect;
pub mod lock;
pub(super) mod open;
mod schema;
pub(crate) use schema::SCHEMA_VERSION;
mod settlements;
mod status;
#[cfg(test)]
mod tests;
mod tokens;

use super::backend::JournalBackend;
use super::inspect::{EventDetail, EventFilter, EventRow, PortalStats, Pruned, Requeued};
use super::settle::DeliveryState;
use super::timestamp;
use super::types::{
    Access, DueDelivery, Enriched, JournalCounts, NewBatch, OpenBatch, Outcome, PendingEnrichment,
    PendingSettlement, RecordedBatch, SettleAction, StatusData, StoredFinding, TokenStatus,
};
use crate::BoxFuture;
use crate::bitrix::Tokens;
use crate::config::Synchronous;
use crate::envelope::Lane;
use anyhow::Context;
use chrono::{DateTime, Utc};
use open::{APPLICATION_ID, OpenError};
use rusqlite::Connection;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Row ids as a JSON array, bound to one parameter and read with `json_each`: one statement
/// for a set of rows instead of one per row.
fn id_list(ids: &[i64]) -> String {
    let mut text = String::with_capacity(ids.len() * 8 + 2);
    text.push('[');
    for (n, id) in ids.iter().enumerate() {
        if n > 0 {
            text.push(',');
        }
        text.push_str(&id.to_string());
    }
    text.push(']');
    text
}

/// The SQLite journal; cheap to clone.
#[derive(Clone)]
pub(super) struct SqliteJournal {
    conn: Arc<Mutex<Connection>>,
    /// Async callers queue here, not on the blocking pool: the connection serves one call at a
    /// time, and a thousand pollers waiting on its mutex would each hold a blocking thread.
    turn: Arc<tokio::sync::Semaphore>,
    /// The hot writes waiting for their turn, committed together (see [`group_commit`]).
    writes: group_commit::WriteQueue,
    path: PathBuf,
    access: Access,
    synchronous: Synchronous,
}

impl SqliteJournal {
    /// Opens the journal as `access` allows, after the checks of [`open::check`]; a refusal is
    /// an [`OpenError`]. With [`Access::Create`] a missing file is made (mode 0600); read-write
    /// opens switch to WAL, stamp [`APPLICATION_ID`] and migrate. Blocking.
    pub(super) fn open(
        path: &Path,
        synchronous: Synchronous,
        access: Access,
    ) -> anyhow::Result<SqliteJournal> {
        let found = open::inspect(path, access)?;
        let damaged = |e: rusqlite::Error| -> anyhow::Error {
            if open::is_damage(&e) {
                OpenError::Damaged {
                    path: path.to_path_buf(),
                    detail: e.to_string(),
                }
                .into()
            } else {
                anyhow::Error::from(e).context(format!("cannot open journal {}", path.display()))
            }
        };
        let conn = match access {
            Access::Read => {
                let conn = open::open_read_only(path).map_err(damaged)?;
                conn.busy_timeout(std::time::Duration::from_secs(60))?;
                conn
            }
            Access::Create | Access::Write => {
                if found == open::Found::Nothing {
                    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                        std::fs::create_dir_all(parent).with_context(|| {
                            format!("cannot create journal directory {}", parent.display())
                        })?;
                    }
                    create_private(path)?;
                } else {
                    set_private(path).with_context(|| {
                        format!("cannot set mode 0600 on journal {}", path.display())
                    })?;
                }
                let mut conn = open::open_read_write(path, false, synchronous).map_err(damaged)?;
                let mode: String = conn
                    .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
                    .map_err(damaged)?;
                if !mode.eq_ignore_ascii_case("wal") {
                    anyhow::bail!(
                        "journal {} could not switch to WAL mode (got {mode})",
                        path.display()
                    );
                }
                if !matches!(found, open::Found::Ours { stamped: true, .. }) {
                    conn.pragma_update(None, "application_id", APPLICATION_ID)
                        .map_err(damaged)?;
                }
                schema::migrate(&mut conn).map_err(|e| match open::damage(path, &e) {
                    Some(damage) => damage.into(),
                    None => e.context(format!("cannot migrate journal {}", path.display())),
                })?;
                // The WAL and shared-memory files hold the same data: keep them private too.
                for suffix in ["-wal", "-shm"] {
                    let mut p = path.as_os_str().to_owned();
                    p.push(suffix);
                    let _ = set_private(Path::new(&p));
                }
                conn
            }
        };
        Ok(SqliteJournal {
            conn: Arc::new(Mutex::new(conn)),
            turn: Arc::new(tokio::sync::Semaphore::new(1)),
            writes: Arc::default(),
            path: path.to_path_buf(),
            access,
            synchronous,
        })
    }

    /// Runs `f` with the connection on the blocking pool, after its turn.
    fn run<R, F>(&self, f: F) -> BoxFuture<'static, anyhow::Result<R>>
    where
        F: FnOnce(&mut Connection) -> anyhow::Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let turn = self.turn.clone();
        let conn = self.conn.clone();
        Box::pin(async move {
            let turn = turn.acquire_owned().await.context("journal closed")?;
            tokio::task::spawn_blocking(move || {
                let _turn = turn;
                let mut guard = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                f(&mut guard)
            })
            .await
            .context("journal task panicked")?
        })
    }

    /// Runs the write `f` in a transaction, with whichever writes queue beside it (see
    /// [`group_commit`]); answers once the transaction that holds it is committed.
    fn write<R, F>(&self, f: F) -> BoxFuture<'static, anyhow::Result<R>>
    where
        F: FnOnce(&Connection) -> anyhow::Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let turn = self.turn.clone();
        let conn = self.conn.clone();
        let queue = self.writes.clone();
        Box::pin(async move {
            let (write, answer) = group_commit::Write::queued(f);
            queue
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push(write);
            let turn = turn.acquire_owned().await.context("journal closed")?;
            // Empty when a group that ran while this caller waited took its write.
            let group = group_commit::take_all(&queue);
            if !group.is_empty() {
                tokio::task::spawn_blocking(move || {
                    let _turn = turn;
                    let mut guard = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                    group_commit::commit_group(&mut guard, group)
                })
                .await
                .context("journal task panicked")?;
            }
            answer.await.context("journal task panicked")?
        })
    }

    /// Runs `f` with the connection on the calling thread (CLI commands, tests).
    pub(super) fn with_conn<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> anyhow::Result<R>,
    ) -> anyhow::Result<R> {
        let mut guard = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }

    /// Where a read-only journal writes a rotated token pair (`None`: through its connection).
    fn token_writer(&self) -> Option<(PathBuf, Synchronous)> {
        (self.access == Access::Read).then(|| (self.path.clone(), self.synchronous))
    }
}

/// The SQLite backend's test hook on the handle.
impl super::Journal {
    /// Runs `f` with the SQLite connection on the calling thread. For tests that must see or
    /// set a row the interface does not show; nothing in `src/` outside `journal/` calls it
    /// (the boundary test checks), and a journal of another backend refuses.
    #[doc(hidden)]
    pub fn with_conn<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> anyhow::Result<R>,
    ) -> anyhow::Result<R> {
        let backend: &dyn std::any::Any = &*self.backend;
        backend
            .downcast_ref::<SqliteJournal>()
            .ok_or_else(|| anyhow::anyhow!("journal {} is not SQLite", self.path().display()))?
            .with_conn(f)
    }
}

impl JournalBackend for SqliteJournal {
    fn path(&self) -> &Path {
        &self.path
    }

    /// The file and its write-ahead log (`-wal`); a missing WAL counts as 0.
    /// Two `stat` calls, answered from the inode cache: done in place.
    fn size_bytes(&self) -> BoxFuture<'_, std::io::Result<u64>> {
        Box::pin(async move {
            let mut wal = self.path.as_os_str().to_owned();
            wal.push("-wal");
            let wal = match std::fs::metadata(Path::new(&wal)) {
                Ok(m) => m.len(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(e) => return Err(e),
            };
            Ok(std::fs::metadata(&self.path)?.len() + wal)
        })
    }

    fn ping(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        self.run(|conn| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?;
            Ok(())
        })
    }

    fn load_tokens<'a>(&'a self, portal: &'a str) -> BoxFuture<'a, anyhow::Result<Option<Tokens>>> {
        let portal = portal.to_string();
        self.run(move |conn| tokens::load_tokens(conn, &portal))
    }

    /// A read-only journal writes the pair through a short-lived read-write connection to the
    /// file that was checked to be the daemon's journal (never created).
    fn save_tokens<'a>(
        &'a self,
        portal: &'a str,
        tokens: &'a Tokens,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        let portal = portal.to_string();
        let tokens = tokens.clone();
        let writer = self.token_writer();
        self.run(move |conn| match writer {
            Some((path, synchronous)) => {
                let mut conn =
                    open::open_read_write(&path, false, synchronous).with_context(|| {
                        format!("cannot open journal {} to store tokens", path.display())
                    })?;
                tokens::save_tokens(&mut conn, &portal, &tokens)
            }
            None => tokens::save_tokens(conn, &portal, &tokens),
        })
    }

    fn token_status<'a>(
        &'a self,
        portal: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Option<TokenStatus>>> {
        let portal = portal.to_string();
        self.run(move |conn| tokens::token_status(conn, &portal))
    }

    fn record_batches(
        &self,
        batches: Vec<NewBatch>,
    ) -> BoxFuture<'_, anyhow::Result<Vec<RecordedBatch>>> {
        let new_batches = Arc::new(batches);
        let journaled = new_batches.clone();
        let recorded = self.write(move |tx| batches::record_batches(tx, &journaled));
        Box::pin(async move {
            let recorded = recorded.await?;
            super::types::log_known_changes(&new_batches, &recorded);
            Ok(recorded)
        })
    }

    fn open_batches<'a>(
        &'a self,
        portal: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Vec<OpenBatch>>> {
        let portal = portal.to_string();
        self.run(move |conn| batches::open_batches(conn, &portal))
    }

    fn known_process_ids<'a>(
        &'a self,
        portal: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<HashMap<String, bool>>> {
        let portal = portal.to_string();
        self.run(move |conn| batches::known_process_ids(conn, &portal))
    }

    fn unsettled_count<'a>(&'a self, portal: &'a str) -> BoxFuture<'a, anyhow::Result<u64>> {
        let portal = portal.to_string();
        self.run(move |conn| batches::unsettled_count(conn, &portal))
    }

    fn undelivered_count<'a>(&'a self, portal: &'a str) -> BoxFuture<'a, anyhow::Result<u64>> {
        let portal = portal.to_string();
        self.run(move |conn| batches::undelivered_count(conn, &portal))
    }

    fn due_deliveries<'a>(
        &'a self,
        sink: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, anyhow::Result<Vec<DueDelivery>>> {
        let sink = sink.to_string();
        self.run(move |conn| deliveries::due_deliveries(conn, &sink, &now(), limit))
    }

    fn bring_forward<'a>(
        &'a self,
        sink: &'a str,
        latest: DateTime<Utc>,
    ) -> BoxFuture<'a, anyhow::Result<usize>> {
        let sink = sink.to_string();
        self.run(move |conn| deliveries::bring_forward(conn, &sink, latest))
    }

    fn next_due<'a>(
        &'a self,
        sink: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Option<DateTime<Utc>>>> {
        let sink = sink.to_string();
        self.run(move |conn| deliveries::next_due(conn, &sink))
    }

    fn record_outcomes<'a>(
        &'a self,
        sink: &'a str,
        outcomes: Vec<(i64, Outcome, Option<String>)>,
    ) -> BoxFuture<'a, anyhow::Result<Vec<String>>> {
        let sink = sink.to_string();
        self.write(move |conn| deliveries::record_outcomes(conn, &sink, &outcomes))
    }

    fn drop_deliveries_to_unknown_sinks(
        &self,
        known: Vec<String>,
    ) -> BoxFuture<'_, anyhow::Result<Vec<(String, u64)>>> {
        self.run(move |conn| deliveries::drop_unknown_sinks(conn, &known))
    }

    fn pending_settlements<'a>(
        &'a self,
        portal: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Vec<PendingSettlement>>> {
        let portal = portal.to_string();
        self.run(move |conn| settlements::pending_settlements(conn, &portal))
    }

    fn mark_settled_groups(
        &self,
        groups: Vec<(Vec<i64>, SettleAction)>,
    ) -> BoxFuture<'_, anyhow::Result<()>> {
        self.write(move |conn| settlements::mark_settled(conn, &groups))
    }

    fn pending_enrichment<'a>(
        &'a self,
        portal: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, anyhow::Result<Vec<PendingEnrichment>>> {
        let portal = portal.to_string();
        self.run(move |conn| enrichment::pending_enrichment(conn, &portal, limit))
    }

    fn record_enrichment(&self, results: Vec<Enriched>) -> BoxFuture<'_, anyhow::Result<()>> {
        self.run(move |conn| enrichment::record_enrichment(conn, &results))
    }

    fn replace_conformance<'a>(
        &'a self,
        portal: &'a str,
        findings: Vec<StoredFinding>,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        let portal = portal.to_string();
        self.run(move |conn| conformance::replace_conformance(conn, &portal, &findings))
    }

    fn conformance<'a>(
        &'a self,
        portal: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Vec<StoredFinding>>> {
        let portal = portal.to_string();
        self.run(move |conn| conformance::conformance(conn, &portal))
    }

    fn events_since_row(
        &self,
        after: Option<i64>,
    ) -> BoxFuture<'_, anyhow::Result<(i64, BTreeMap<String, u64>)>> {
        self.run(move |conn| status::events_since_row(conn, after))
    }

    fn dead_attempts_since(
        &self,
        after: Option<i64>,
    ) -> BoxFuture<'_, anyhow::Result<(i64, u64, Vec<String>)>> {
        self.run(move |conn| status::dead_attempts_since(conn, after))
    }

    fn oldest_pending_fetched_at(&self) -> BoxFuture<'_, anyhow::Result<Option<DateTime<Utc>>>> {
        self.run(|conn| status::oldest_pending_fetched_at(conn))
    }

    fn counts(&self) -> BoxFuture<'_, anyhow::Result<JournalCounts>> {
        self.run(|conn| status::counts(conn))
    }

    fn counts_blocking(&self) -> anyhow::Result<JournalCounts> {
        self.with_conn(|conn| status::counts(conn))
    }

    fn status_data(
        &self,
        portals: Vec<String>,
        now: DateTime<Utc>,
    ) -> BoxFuture<'_, anyhow::Result<StatusData>> {
        self.run(move |conn| status::status_data(conn, &portals, now))
    }

    fn list_events(&self, filter: &EventFilter) -> anyhow::Result<Vec<EventRow>> {
        self.with_conn(|conn| inspect::list_events(conn, filter, None))
    }

    fn events_after(&self, filter: &EventFilter, after: i64) -> anyhow::Result<Vec<EventRow>> {
        self.with_conn(|conn| inspect::list_events(conn, filter, Some(after)))
    }

    fn stats(&self, filter: &EventFilter) -> anyhow::Result<Vec<PortalStats>> {
        self.with_conn(|conn| inspect::stats(conn, filter))
    }

    fn show_event(&self, id: &str) -> anyhow::Result<Vec<EventDetail>> {
        self.with_conn(|conn| inspect::show_event(conn, id))
    }

    fn replay(
        &self,
        filter: &EventFilter,
        only_sink: Option<&str>,
        known_sinks: &[String],
    ) -> anyhow::Result<Requeued> {
        self.with_conn(|conn| inspect::replay(conn, filter, only_sink, known_sinks))
    }

    fn retry_dead(&self, filter: &EventFilter, known_sinks: &[String]) -> anyhow::Result<Requeued> {
        self.with_conn(|conn| inspect::retry_dead(conn, filter, known_sinks))
    }

    fn purge_dead(&self, filter: &EventFilter) -> anyhow::Result<Pruned> {
        self.with_conn(|conn| inspect::purge_dead(conn, filter))
    }

    fn prune_blocking(&self, cutoff: DateTime<Utc>, include_dead: bool) -> anyhow::Result<Pruned> {
        self.with_conn(|conn| inspect::prune(conn, cutoff, include_dead))
    }

    fn backup_blocking(&self, to: &Path) -> anyhow::Result<u64> {
        self.with_conn(|conn| backup::backup(conn, to))
    }

    fn sql_rows(&self, sql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        use rusqlite::types::ValueRef;
        self.with_conn(|conn| {
            let mut stmt = conn.prepare(sql)?;
            let names: Vec<String> = stmt.column_names().map(str::to_string).collect();
            let mut rows = stmt.query([])?;
            let mut out = Vec::new();
            while let Some(row) = rows.next()? {
                let mut object = serde_json::Map::new();
                for (i, name) in names.iter().enumerate() {
                    let value = match row.get_ref(i)? {
                        ValueRef::Null => serde_json::Value::Null,
                        ValueRef::Integer(n) => n.into(),
                        ValueRef::Real(f) => f.into(),
                        ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned().into(),
                        ValueRef::Blob(b) => String::from_utf8_lossy(b).into_owned().into(),
                    };
                    object.insert(name.clone(), value);
                }
                out.push(serde_json::Value::Object(object));
            }
            Ok(out)
        })
    }

    fn sql_execute(&self, sql: &str) -> anyhow::Result<u64> {
        self.with_conn(|conn| Ok(conn.execute(sql, [])? as u64))
    }

    fn prune(
        &self,
        cutoff: DateTime<Utc>,
        include_dead: bool,
    ) -> BoxFuture<'_, anyhow::Result<Pruned>> {
        let journal = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || journal.prune_blocking(cutoff, include_dead))
                .await?
        })
    }
}

/// Creates `path` with mode 0600 if missing, and tightens an existing one.
fn create_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create journal {}", path.display()))?;
    set_private(path).with_context(|| format!("cannot set mode 0600 on journal {}", path.display()))
}

fn set_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn now() -> String {
    timestamp(Utc::now())
}

fn lane_from_sql(s: &str) -> Lane {
    Lane::parse(s).unwrap_or(Lane::Normal)
}

fn state_from_sql(s: &str) -> DeliveryState {
    match s {
        "delivered" => DeliveryState::Delivered,
        "dead" => DeliveryState::Dead,
        _ => DeliveryState::Pending,
    }
}

fn parse_time(s: Option<String>) -> Option<DateTime<Utc>> {
    s.and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// Reads a non-negative SQL integer (a COUNT or SUM) as `u64`.
fn count(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    Ok(row.get::<_, i64>(idx)?.max(0) as u64)
}
