//! The journal: one SQLite file (WAL, `synchronous=FULL` by default) holding tokens, fetched
//! batches, events, deliveries and upstream settlement. All SQL of the crate lives in this module;
//! every call runs on tokio's blocking pool so the async runtime never waits on the disk.

pub mod baseline;
mod conformance;
mod inspect;
pub mod lock;
mod open;
mod schema;
mod status;

pub use conformance::StoredFinding;
pub use inspect::{
    AttemptDetail, BatchInfo, DeliveryBrief, DeliveryDetail, EventDetail, EventFilter, EventRow,
    PortalStats, Pruned, Requeued, SinkStats, StatusFilter, UpstreamInfo,
};
pub use open::{APPLICATION_ID, Access, OpenError, check, damage};
pub use schema::SCHEMA_VERSION;
pub use status::{DeadAttempt, HISTORY_MINUTES, PortalStatus, SinkStatus, StatusData};

use crate::bitrix::{TokenStore, Tokens};
use crate::config::Synchronous;
use crate::envelope::{Envelope, Lane};
use crate::pipeline::settle::{self, DeliveryState, SettleAction};
use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A timestamp as the journal stores it: RFC 3339 UTC with milliseconds, so text order is time order.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn now() -> String {
    timestamp(Utc::now())
}

/// A handle to the open journal; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    conn: Arc<Mutex<Connection>>,
    /// Async callers queue here, not on the blocking pool: the connection serves one call at a
    /// time, and a thousand pollers waiting on its mutex would each hold a blocking thread.
    turn: Arc<tokio::sync::Semaphore>,
    path: PathBuf,
    access: Access,
    synchronous: Synchronous,
}

/// Where a batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOrigin {
    /// Our own `event.offline.get` reserved it.
    Fetched,
    /// Found upstream by the orphan sweep (its `get` response was lost) and taken over.
    Adopted,
}

impl BatchOrigin {
    fn as_str(self) -> &'static str {
        match self {
            BatchOrigin::Fetched => "fetched",
            BatchOrigin::Adopted => "adopted",
        }
    }
}

/// What the journal knows about a portal's OAuth tokens, without the tokens themselves
/// (`auth status`, `doctor`).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenStatus {
    /// When the stored access token expires; `None` when unknown (imported without expiry).
    pub expires_at: Option<DateTime<Utc>>,
    /// When the pair was last written: the last refresh, login or import.
    pub updated_at: Option<DateTime<Utc>>,
    pub member_id: Option<String>,
    pub scope: Option<String>,
    pub user_id: Option<i64>,
    pub client_endpoint: Option<String>,
    /// False when only an access token is stored (nothing to refresh it with).
    pub has_refresh_token: bool,
}

/// One event of a batch about to be journaled, with the sinks routed to it.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub offline_id: i64,
    pub event: String,
    pub message_id: String,
    pub timestamp: String,
    pub data: Value,
    pub additional: Value,
    pub sinks: Vec<String>,
    /// Deliveries wait until the entity is read (`[portals.NAME.enrich]`).
    pub enrich: bool,
}

/// An event waiting for its entity to be read.
#[derive(Debug, Clone)]
pub struct PendingEnrichment {
    pub event_id: i64,
    pub event: String,
    pub data: Value,
}

/// What enrichment found for one event.
#[derive(Debug, Clone)]
pub struct Enriched {
    pub event_id: i64,
    /// The entity, or `null` (then `error` says why).
    pub entity: Value,
    pub error: Option<String>,
}

/// A reservation (`process_id`) and its events, journaled in one transaction.
#[derive(Debug, Clone)]
pub struct NewBatch {
    pub portal: String,
    /// The reservation's `process_id`; in fetch-delete mode a local id (`fetch-delete:...`).
    pub process_id: String,
    pub lane: Lane,
    pub origin: BatchOrigin,
    pub events: Vec<NewEvent>,
    /// Fetch-delete mode: the portal deleted these events when it answered, so they are
    /// journaled as already settled upstream (`cleared`) and nothing is ever sent back.
    pub deleted_upstream: bool,
    /// The `get` that answered made this reservation (it asked for no `process_id`). A
    /// `process_id` the journal has as a settled batch then names a new reservation the portal
    /// drew the same id for, not that batch: the settled batch is renamed
    /// `<process_id>#<batch id>` and its rows are never taken for the new ones. A re-read
    /// (`get` with the `process_id`) is not new: rows found again under a settled batch are
    /// rows that batch's clear left behind.
    pub new_reservation: bool,
}

/// What [`Journal::record_batch`] did.
#[derive(Debug, Clone, Default)]
pub struct RecordedBatch {
    pub batch_id: i64,
    /// Events new to the journal.
    pub inserted: usize,
    /// Events the journal already had under this reservation and still has to settle.
    pub known_unsettled: usize,
    /// Events the journal already had and considers settled, yet the portal still holds them
    /// reserved: their settle call must be repeated (message ids).
    pub known_settled: Vec<(i64, String)>,
    /// Error-lane events new to this reservation whose change the journal already holds in an
    /// earlier row (the copy `event.offline.error` left in the error lane, unchanged).
    pub known_changes: usize,
    /// Deliveries those copies still got: routed sinks that had neither delivered nor pending
    /// the change in the earlier rows.
    pub known_change_deliveries: usize,
    /// Those copies no sink needed any more: cleared upstream at once.
    pub known_changes_done: usize,
}

/// A reservation the journal knows and has not finished settling.
#[derive(Debug, Clone)]
pub struct OpenBatch {
    pub batch_id: i64,
    pub process_id: String,
    pub lane: Lane,
}

/// A delivery that is due now, with the envelope to send.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub event_id: i64,
    /// Attempts already made before this one.
    pub attempts: u32,
    pub envelope: Envelope,
    /// When the event was journaled (`events.fetched_at`); `None` if the column does not parse.
    pub fetched_at: Option<DateTime<Utc>>,
}

/// The result of one delivery attempt, as recorded.
#[derive(Debug, Clone)]
pub enum Outcome {
    Delivered,
    Retry {
        error: String,
        next_attempt_at: DateTime<Utc>,
    },
    Dead {
        error: String,
    },
}

/// Events of one reservation waiting for the same upstream call.
#[derive(Debug, Clone)]
pub struct PendingSettlement {
    pub batch_id: i64,
    pub process_id: String,
    pub lane: Lane,
    pub action: SettleAction,
    /// `(event row id, offline ID, MESSAGE_ID)`.
    pub events: Vec<(i64, i64, String)>,
}

/// Counters for summaries and `journal stats`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct JournalCounts {
    pub events: u64,
    pub delivered: u64,
    pub dead: u64,
    pub pending: u64,
    pub unsettled_upstream: u64,
    pub cleared: u64,
    pub errored: u64,
    pub batches: u64,
    pub adopted_batches: u64,
    pub delivery_attempts: u64,
    /// Attempts that failed and were scheduled again.
    pub retried_attempts: u64,
    /// Deliveries of an envelope id to a sink beyond the first successful one.
    pub duplicate_deliveries: u64,
}

impl Journal {
    /// Opens (creating if needed, mode 0600) and migrates the journal: [`Access::Create`], as
    /// `run` does. Blocking; see [`Journal::open`].
    pub fn open_blocking(path: &Path, synchronous: Synchronous) -> anyhow::Result<Journal> {
        Journal::open_blocking_as(path, synchronous, Access::Create)
    }

    /// Opens the journal as `access` allows, after the checks of [`check`]; a refusal is an
    /// [`OpenError`]. Blocking; see [`Journal::open_as`].
    pub fn open_blocking_as(
        path: &Path,
        synchronous: Synchronous,
        access: Access,
    ) -> anyhow::Result<Journal> {
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
        Ok(Journal {
            conn: Arc::new(Mutex::new(conn)),
            turn: Arc::new(tokio::sync::Semaphore::new(1)),
            path: path.to_path_buf(),
            access,
            synchronous,
        })
    }

    /// Opens and migrates the journal off the async runtime ([`Access::Create`]).
    pub async fn open(path: &Path, synchronous: Synchronous) -> anyhow::Result<Journal> {
        Journal::open_as(path, synchronous, Access::Create).await
    }

    /// [`Journal::open_blocking_as`] off the async runtime.
    pub async fn open_as(
        path: &Path,
        synchronous: Synchronous,
        access: Access,
    ) -> anyhow::Result<Journal> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || Journal::open_blocking_as(&path, synchronous, access))
            .await?
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the connection on the blocking pool.
    async fn run<R, F>(&self, f: F) -> anyhow::Result<R>
    where
        F: FnOnce(&mut Connection) -> anyhow::Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let turn = self
            .turn
            .clone()
            .acquire_owned()
            .await
            .context("journal closed")?;
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let mut guard = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut guard)
        })
        .await
        .context("journal task panicked")?
    }

    /// Runs `f` with the connection on the calling thread (CLI commands, tests).
    pub fn with_conn<R>(
        &self,
        f: impl FnOnce(&mut Connection) -> anyhow::Result<R>,
    ) -> anyhow::Result<R> {
        let mut guard = self
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }

    // ---- portals and tokens ------------------------------------------------------------------

    pub async fn load_tokens(&self, portal: &str) -> anyhow::Result<Option<Tokens>> {
        let portal = portal.to_string();
        self.run(move |conn| load_tokens(conn, &portal)).await
    }

    /// Stores tokens durably (the transaction has committed when this returns).
    ///
    /// On a journal opened [`Access::Read`] this is the one write made: a refresh made by a
    /// command that only looks has already killed the old refresh token upstream, so the new
    /// pair goes through a short-lived read-write connection to the file that was checked to be
    /// the daemon's journal (never created).
    pub async fn save_tokens(&self, portal: &str, tokens: &Tokens) -> anyhow::Result<()> {
        let portal = portal.to_string();
        let tokens = tokens.clone();
        let writer = self.token_writer();
        self.run(move |conn| match writer {
            Some((path, synchronous)) => {
                let mut conn =
                    open::open_read_write(&path, false, synchronous).with_context(|| {
                        format!("cannot open journal {} to store tokens", path.display())
                    })?;
                save_tokens(&mut conn, &portal, &tokens)
            }
            None => save_tokens(conn, &portal, &tokens),
        })
        .await
    }

    /// Where a read-only journal writes a rotated token pair (`None`: through its connection).
    fn token_writer(&self) -> Option<(PathBuf, Synchronous)> {
        (self.access == Access::Read).then(|| (self.path.clone(), self.synchronous))
    }

    /// The stored tokens' metadata for `portal` (never the tokens), or `None` when none are stored.
    pub async fn token_status(&self, portal: &str) -> anyhow::Result<Option<TokenStatus>> {
        let portal = portal.to_string();
        self.run(move |conn| {
            let status = conn
                .query_row(
                    "SELECT expires_at, updated_at, member_id, scope, user_id, client_endpoint,
                            refresh_token <> ''
                     FROM tokens WHERE portal = ?1",
                    [&portal],
                    |r| {
                        Ok(TokenStatus {
                            expires_at: parse_time(r.get(0)?),
                            updated_at: parse_time(r.get(1)?),
                            member_id: r.get(2)?,
                            scope: r.get(3)?,
                            user_id: r.get(4)?,
                            client_endpoint: r.get(5)?,
                            has_refresh_token: r.get(6)?,
                        })
                    },
                )
                .optional()?;
            Ok(status)
        })
        .await
    }

    pub fn save_tokens_blocking(&self, portal: &str, tokens: &Tokens) -> anyhow::Result<()> {
        match self.token_writer() {
            Some((path, synchronous)) => {
                let mut conn = open::open_read_write(&path, false, synchronous)?;
                save_tokens(&mut conn, portal, tokens)
            }
            None => self.with_conn(|conn| save_tokens(conn, portal, tokens)),
        }
    }

    // ---- batches -----------------------------------------------------------------------------

    /// Journals a reservation and its events in one transaction: the batch row, each event not
    /// yet known under this reservation, and one pending delivery per routed sink. An event no
    /// sink wants is settled (`clear_pending`) at once.
    ///
    /// Each event gets the envelope id of the first journaled row of the same change (same
    /// portal, offline ID and [`Envelope::change_key`]), else a new one. An error-lane event
    /// whose change the journal already holds goes only to the routed sinks with neither a
    /// delivered nor a pending delivery of it; with none left it is settled at once.
    pub async fn record_batch(&self, batch: NewBatch) -> anyhow::Result<RecordedBatch> {
        let mut recorded = self.record_batches(vec![batch]).await?;
        Ok(recorded.remove(0))
    }

    /// Journals several reservations (each with its events and deliveries) in one transaction:
    /// the reservations of one combined request land together or not at all.
    pub async fn record_batches(
        &self,
        batches: Vec<NewBatch>,
    ) -> anyhow::Result<Vec<RecordedBatch>> {
        self.run(move |conn| record_batches(conn, &batches)).await
    }

    /// Reservations not fully settled yet.
    pub async fn open_batches(&self, portal: &str) -> anyhow::Result<Vec<OpenBatch>> {
        let portal = portal.to_string();
        self.run(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, process_id, lane FROM batches WHERE portal = ?1 AND settled_at IS NULL ORDER BY id",
            )?;
            let rows = stmt.query_map([&portal], |r| {
                Ok(OpenBatch {
                    batch_id: r.get(0)?,
                    process_id: r.get(1)?,
                    lane: lane_from_sql(&r.get::<_, String>(2)?),
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Every `process_id` the journal has seen for `portal`, with whether it is settled.
    pub async fn known_process_ids(&self, portal: &str) -> anyhow::Result<HashMap<String, bool>> {
        let portal = portal.to_string();
        self.run(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT process_id, settled_at IS NOT NULL FROM batches WHERE portal = ?1",
            )?;
            let rows = stmt.query_map([&portal], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?))
            })?;
            Ok(rows.collect::<Result<HashMap<_, _>, _>>()?)
        })
        .await
    }

    /// Events of `portal` reserved upstream and not settled yet (the `max_unsettled` measure).
    pub async fn unsettled_count(&self, portal: &str) -> anyhow::Result<u64> {
        let portal = portal.to_string();
        self.run(move |conn| {
            let n: i64 = conn.query_row(
                "SELECT COUNT(*) FROM events WHERE portal = ?1 AND upstream IN ('reserved', 'clear_pending', 'error_pending')",
                [&portal],
                |r| r.get(0),
            )?;
            Ok(n as u64)
        })
        .await
    }

    /// Events of `portal` some sink still has to deliver (fetch-delete mode's backpressure:
    /// there, nothing stays unsettled upstream).
    pub async fn undelivered_count(&self, portal: &str) -> anyhow::Result<u64> {
        let portal = portal.to_string();
        self.run(move |conn| {
            let n: i64 = conn.query_row(
                "SELECT COUNT(*) FROM events WHERE portal = ?1 AND status = 'pending'",
                [&portal],
                |r| r.get(0),
            )?;
            Ok(n as u64)
        })
        .await
    }

    /// The highest event row, and per portal the events journaled after row `after` (none
    /// without one): the fetch rate for the systemd status line, from the rowid alone.
    pub async fn events_since_row(
        &self,
        after: Option<i64>,
    ) -> anyhow::Result<(i64, BTreeMap<String, u64>)> {
        self.run(move |conn| {
            let max: i64 =
                conn.query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?;
            let mut counts = BTreeMap::new();
            if let Some(after) = after {
                let mut stmt = conn.prepare_cached(
                    "SELECT portal, COUNT(*) FROM events WHERE id > ?1 GROUP BY portal",
                )?;
                let rows =
                    stmt.query_map([after], |r| Ok((r.get::<_, String>(0)?, count(r, 1)?)))?;
                for row in rows {
                    let (portal, n) = row?;
                    counts.insert(portal, n);
                }
            }
            Ok((max, counts))
        })
        .await
    }

    /// Dead outcomes recorded after attempt row `after` (none without one): the highest attempt
    /// row, how many, and up to 5 of their envelope ids. For the "new dead event" alert.
    pub async fn dead_attempts_since(
        &self,
        after: Option<i64>,
    ) -> anyhow::Result<(i64, u64, Vec<String>)> {
        self.run(move |conn| {
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
        })
        .await
    }

    /// When the event behind the oldest pending delivery was journaled.
    pub async fn oldest_pending_fetched_at(&self) -> anyhow::Result<Option<DateTime<Utc>>> {
        self.run(|conn| {
            let at: Option<String> = conn.query_row(
                "SELECT MIN(e.fetched_at) FROM deliveries d JOIN events e ON e.id = d.event_id
                 WHERE d.status = 'pending'",
                [],
                |r| r.get(0),
            )?;
            Ok(parse_time(at))
        })
        .await
    }

    // ---- deliveries --------------------------------------------------------------------------

    /// Up to `limit` pending deliveries for `sink` whose time has come, oldest first.
    pub async fn due_deliveries(
        &self,
        sink: &str,
        limit: usize,
    ) -> anyhow::Result<Vec<DueDelivery>> {
        let sink = sink.to_string();
        self.run(move |conn| due_deliveries(conn, &sink, &now(), limit))
            .await
    }

    /// Makes the pending deliveries of `sink` due now whose time lies after `latest`; returns
    /// how many. The dispatcher never schedules a retry further out than the sink's
    /// `max_backoff`, so such a time means this machine's clock was set back after it was
    /// written (or `max_backoff` was lowered since): waiting for it would hold the event back
    /// by the size of the step.
    pub async fn bring_forward(&self, sink: &str, latest: DateTime<Utc>) -> anyhow::Result<usize> {
        let sink = sink.to_string();
        self.run(move |conn| {
            Ok(conn.execute(
                "UPDATE deliveries SET next_attempt_at = ?3
                 WHERE sink = ?1 AND status = 'pending' AND next_attempt_at > ?2",
                params![sink, timestamp(latest), now()],
            )?)
        })
        .await
    }

    /// When the earliest pending delivery of `sink` is due, if any.
    pub async fn next_due(&self, sink: &str) -> anyhow::Result<Option<DateTime<Utc>>> {
        let sink = sink.to_string();
        self.run(move |conn| {
            let at: Option<String> = conn.query_row(
                "SELECT MIN(d.next_attempt_at) FROM deliveries d JOIN events e ON e.id = d.event_id
                 WHERE d.sink = ?1 AND d.status = 'pending' AND e.enrichment IS NULL",
                [&sink],
                |r| r.get(0),
            )?;
            Ok(at
                .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
                .map(|t| t.with_timezone(&Utc)))
        })
        .await
    }

    /// Records attempt outcomes for `sink` and, in the same transaction, settles every event whose
    /// deliveries are now all final. Returns the portals that have new settle work.
    pub async fn record_outcomes(
        &self,
        sink: &str,
        outcomes: Vec<(i64, Outcome, Option<String>)>,
    ) -> anyhow::Result<Vec<String>> {
        let sink = sink.to_string();
        self.run(move |conn| record_outcomes(conn, &sink, &outcomes))
            .await
    }

    /// Drops pending deliveries to sinks that are no longer configured, settling the events
    /// that waited only for them; returns `(sink, deliveries dropped)`.
    pub async fn drop_deliveries_to_unknown_sinks(
        &self,
        known: Vec<String>,
    ) -> anyhow::Result<Vec<(String, u64)>> {
        self.run(move |conn| drop_unknown_sinks(conn, &known)).await
    }

    // ---- settlement --------------------------------------------------------------------------

    /// Events waiting for `event.offline.clear` / `event.offline.error`, grouped by reservation.
    pub async fn pending_settlements(
        &self,
        portal: &str,
    ) -> anyhow::Result<Vec<PendingSettlement>> {
        let portal = portal.to_string();
        self.run(move |conn| pending_settlements(conn, &portal))
            .await
    }

    /// Marks events as settled upstream and closes reservations with nothing left to settle.
    pub async fn mark_settled(
        &self,
        event_ids: Vec<i64>,
        action: SettleAction,
    ) -> anyhow::Result<()> {
        self.mark_settled_groups(vec![(event_ids, action)]).await
    }

    /// [`Journal::mark_settled`] for the settle calls of one combined request, in one transaction.
    pub async fn mark_settled_groups(
        &self,
        groups: Vec<(Vec<i64>, SettleAction)>,
    ) -> anyhow::Result<()> {
        self.run(move |conn| mark_settled(conn, &groups)).await
    }

    // ---- reporting ---------------------------------------------------------------------------

    /// Events of `portal` whose entity is still to be read, oldest first.
    pub async fn pending_enrichment(
        &self,
        portal: &str,
        limit: usize,
    ) -> anyhow::Result<Vec<PendingEnrichment>> {
        let portal = portal.to_string();
        self.run(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT id, event, data FROM events
                 WHERE portal = ?1 AND enrichment IS NOT NULL ORDER BY id LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![portal, limit as i64], |r| {
                Ok(PendingEnrichment {
                    event_id: r.get(0)?,
                    event: r.get(1)?,
                    data: r
                        .get::<_, String>(2)
                        .ok()
                        .and_then(|t| crate::json_depth::from_str(&t).ok())
                        .unwrap_or(Value::Null),
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Stores what enrichment found (`entity`, or `null` and why) and releases the events'
    /// deliveries, in one transaction.
    pub async fn record_enrichment(&self, results: Vec<Enriched>) -> anyhow::Result<()> {
        self.run(move |conn| {
            let tx = conn.transaction()?;
            {
                let mut update = tx.prepare_cached(
                    "UPDATE events SET entity = ?2, entity_error = ?3, enrichment = NULL
                     WHERE id = ?1 AND enrichment IS NOT NULL",
                )?;
                for r in &results {
                    update.execute(params![r.event_id, r.entity.to_string(), r.error])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// Answers a trivial query: the journal is open and its connection is not stuck.
    pub async fn ping(&self) -> anyhow::Result<()> {
        self.run(|conn| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?;
            Ok(())
        })
        .await
    }

    /// Bytes on disk of the journal file and its write-ahead log (`-wal`); a missing WAL counts
    /// as 0.
    pub fn size_bytes(&self) -> std::io::Result<u64> {
        let mut wal = self.path.as_os_str().to_owned();
        wal.push("-wal");
        let wal = match std::fs::metadata(Path::new(&wal)) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        Ok(std::fs::metadata(&self.path)?.len() + wal)
    }

    pub async fn counts(&self) -> anyhow::Result<JournalCounts> {
        self.run(|conn| counts(conn)).await
    }

    pub fn counts_blocking(&self) -> anyhow::Result<JournalCounts> {
        self.with_conn(|conn| counts(conn))
    }
}

impl TokenStore for Journal {
    fn save<'a>(
        &'a self,
        portal: &'a str,
        tokens: &'a Tokens,
    ) -> crate::BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.save_tokens(portal, tokens))
    }

    fn load<'a>(&'a self, portal: &'a str) -> crate::BoxFuture<'a, anyhow::Result<Option<Tokens>>> {
        Box::pin(self.load_tokens(portal))
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

fn load_tokens(conn: &Connection, portal: &str) -> anyhow::Result<Option<Tokens>> {
    let tokens = conn
        .query_row(
            "SELECT access_token, refresh_token, expires_at, member_id, scope, client_endpoint, user_id
             FROM tokens WHERE portal = ?1",
            [portal],
            |r| {
                Ok(Tokens {
                    access_token: r.get(0)?,
                    refresh_token: r.get(1)?,
                    expires_at: parse_time(r.get(2)?),
                    member_id: r.get(3)?,
                    scope: r.get(4)?,
                    client_endpoint: r.get(5)?,
                    user_id: r.get(6)?,
                })
            },
        )
        .optional()?;
    Ok(tokens)
}

fn ensure_portal(conn: &Connection, portal: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO portals (name, first_seen_at) VALUES (?1, ?2)",
        params![portal, now()],
    )?;
    Ok(())
}

fn save_tokens(conn: &mut Connection, portal: &str, t: &Tokens) -> anyhow::Result<()> {
    let tx = conn.transaction()?;
    ensure_portal(&tx, portal)?;
    tx.execute(
        "INSERT INTO tokens (portal, access_token, refresh_token, expires_at, scope, member_id, client_endpoint, user_id, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (portal) DO UPDATE SET access_token = excluded.access_token,
            refresh_token = excluded.refresh_token, expires_at = excluded.expires_at,
            scope = COALESCE(excluded.scope, tokens.scope), member_id = COALESCE(excluded.member_id, tokens.member_id),
            client_endpoint = COALESCE(excluded.client_endpoint, tokens.client_endpoint),
            user_id = COALESCE(excluded.user_id, tokens.user_id), updated_at = excluded.updated_at",
        params![
            portal,
            t.access_token,
            t.refresh_token,
            t.expires_at.map(timestamp),
            t.scope,
            t.member_id,
            t.client_endpoint,
            t.user_id,
            now()
        ],
    )?;
    if let Some(member_id) = &t.member_id {
        tx.execute(
            "UPDATE portals SET member_id = ?2 WHERE name = ?1",
            params![portal, member_id],
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn record_batches(
    conn: &mut Connection,
    batches: &[NewBatch],
) -> anyhow::Result<Vec<RecordedBatch>> {
    let tx = conn.transaction()?;
    let recorded = batches
        .iter()
        .map(|batch| record_batch_in(&tx, batch))
        .collect::<anyhow::Result<Vec<_>>>()?;
    tx.commit()?;
    for (batch, r) in batches.iter().zip(&recorded) {
        if r.known_changes > 0 {
            tracing::info!(
                portal = %batch.portal,
                process_id = %batch.process_id,
                copies = r.known_changes,
                deliveries = r.known_change_deliveries,
                cleared_at_once = r.known_changes_done,
                "error-lane copies of changes already journaled: they go only to the sinks that have not had them"
            );
        }
    }
    Ok(recorded)
}

fn record_batch_in(
    tx: &rusqlite::Transaction<'_>,
    batch: &NewBatch,
) -> anyhow::Result<RecordedBatch> {
    ensure_portal(tx, &batch.portal)?;
    let fetched_at = now();
    if batch.new_reservation {
        let renamed = tx.execute(
            "UPDATE batches SET process_id = process_id || '#' || id
             WHERE portal = ?1 AND process_id = ?2 AND settled_at IS NOT NULL",
            params![batch.portal, batch.process_id],
        )?;
        if renamed > 0 {
            tracing::warn!(portal = %batch.portal, process_id = %batch.process_id, "the portal handed out the process_id of a settled batch again: journaled as a new reservation; the settled batch keeps its history as <process_id>#<batch id>");
        }
    }
    tx.execute(
        "INSERT OR IGNORE INTO batches (portal, process_id, lane, origin, fetched_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![batch.portal, batch.process_id, batch.lane.as_str(), batch.origin.as_str(), fetched_at],
    )?;
    let batch_id: i64 = tx.query_row(
        "SELECT id FROM batches WHERE portal = ?1 AND process_id = ?2",
        params![batch.portal, batch.process_id],
        |r| r.get(0),
    )?;
    let mut recorded = RecordedBatch {
        batch_id,
        ..RecordedBatch::default()
    };
    {
        let mut find = tx.prepare_cached(
            "SELECT id, upstream FROM events WHERE batch_id = ?1 AND offline_id = ?2",
        )?;
        let mut insert_event = tx.prepare_cached(
            "INSERT INTO events (envelope_id, portal, batch_id, offline_id, event, message_id, timestamp, data,
                                 additional, lane, fetched_at, status, upstream, enrichment, change_key)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        )?;
        // The first row of the same change (same portal, offline ID and change), whose key a
        // later row of that change keeps.
        let mut first_of_change = tx.prepare_cached(
            "SELECT envelope_id FROM events WHERE portal = ?1 AND offline_id = ?2 AND change_key = ?3
             ORDER BY id LIMIT 1",
        )?;
        // The sinks that have a change, or are about to (a pending delivery: a dead retry or a
        // replay in progress), in any earlier row.
        let mut sinks_with_change = tx.prepare_cached(
            "SELECT DISTINCT d.sink FROM deliveries d JOIN events e ON e.id = d.event_id
             WHERE e.portal = ?1 AND e.offline_id = ?2 AND e.change_key = ?3
               AND d.status IN ('delivered', 'pending')",
        )?;
        let mut insert_delivery = tx.prepare_cached(
            "INSERT INTO deliveries (event_id, sink, status, attempts, next_attempt_at) VALUES (?1, ?2, 'pending', 0, ?3)",
        )?;
        for e in &batch.events {
            let known: Option<(i64, String)> = find
                .query_row(params![batch_id, e.offline_id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            if let Some((_, upstream)) = known {
                if upstream == "cleared" || upstream == "errored" {
                    recorded
                        .known_settled
                        .push((e.offline_id, e.message_id.clone()));
                } else {
                    recorded.known_unsettled += 1;
                }
                continue;
            }
            // One key per change, forever: a row of a change journaled before (an error-lane
            // copy, or a row keyed before keys carried the change) lends its key.
            let change = Envelope::change_key(&e.timestamp);
            let earlier: Option<String> = first_of_change
                .query_row(params![batch.portal, e.offline_id, change], |r| r.get(0))
                .optional()?;
            let mut sinks: Vec<&String> = e.sinks.iter().collect();
            if batch.lane == Lane::Error && earlier.is_some() {
                // The copy `event.offline.error` left in the error lane: the sinks that had it
                // (or are getting it again) must not get it twice.
                let had: Vec<String> = sinks_with_change
                    .query_map(params![batch.portal, e.offline_id, change], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                sinks.retain(|sink| !had.contains(sink));
                recorded.known_changes += 1;
                recorded.known_change_deliveries += sinks.len();
                recorded.known_changes_done += usize::from(sinks.is_empty());
            }
            let envelope_id = earlier
                .unwrap_or_else(|| Envelope::id_of_change(&batch.portal, e.offline_id, &change));
            // With no sink to deliver to, the lattice settles the event at once.
            let status = if sinks.is_empty() {
                "delivered"
            } else {
                "pending"
            };
            let upstream = match (batch.deleted_upstream, sinks.is_empty()) {
                (true, _) => "cleared",
                (false, true) => "clear_pending",
                (false, false) => "reserved",
            };
            insert_event.execute(params![
                envelope_id,
                batch.portal,
                batch_id,
                e.offline_id,
                e.event,
                e.message_id,
                e.timestamp,
                e.data.to_string(),
                e.additional.to_string(),
                batch.lane.as_str(),
                fetched_at,
                status,
                upstream,
                // An event no sink wants is not worth a request.
                (e.enrich && !sinks.is_empty()).then_some("pending"),
                change
            ])?;
            let event_id = tx.last_insert_rowid();
            for sink in sinks {
                insert_delivery.execute(params![event_id, sink, fetched_at])?;
            }
            recorded.inserted += 1;
        }
    }
    if batch.deleted_upstream {
        tx.execute(
            "UPDATE batches SET settled_at = ?2 WHERE id = ?1",
            params![batch_id, fetched_at],
        )?;
        tx.execute(
            "UPDATE events SET settled_at = ?2 WHERE batch_id = ?1 AND settled_at IS NULL",
            params![batch_id, fetched_at],
        )?;
    } else if recorded.inserted > 0 {
        tx.execute(
            "UPDATE batches SET settled_at = NULL WHERE id = ?1",
            [batch_id],
        )?;
    }
    Ok(recorded)
}

fn due_deliveries(
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
const ENVELOPE_COLUMNS: &str = "e.envelope_id, e.portal, e.event, e.offline_id, e.message_id, \
     e.timestamp, e.data, e.additional, e.lane, e.entity, e.entity_error";
/// How many columns [`ENVELOPE_COLUMNS`] has.
const ENVELOPE_WIDTH: usize = 11;

/// Reads an envelope from [`ENVELOPE_COLUMNS`] starting at column `first`. JSON columns that do
/// not parse (never written by this crate) read as `null`.
fn envelope_at(r: &rusqlite::Row<'_>, first: usize, attempt: u32) -> rusqlite::Result<Envelope> {
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

fn record_outcomes(
    conn: &mut Connection,
    sink: &str,
    outcomes: &[(i64, Outcome, Option<String>)],
) -> anyhow::Result<Vec<String>> {
    let tx = conn.transaction()?;
    let at = now();
    let mut portals = Vec::new();
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
            if status == "pending" {
                continue;
            }
            if let Some(portal) = settle_if_final(&tx, *event_id)?
                && !portals.contains(&portal)
            {
                portals.push(portal);
            }
        }
    }
    tx.commit()?;
    Ok(portals)
}

/// Applies the settle lattice to one event: when every delivery is final it becomes
/// `delivered`/`dead`, and if it is still `reserved` upstream, `clear_pending`/`error_pending`.
/// Returns its portal when there is new settle work. An event settled upstream before (a
/// replay, a dead retry, fetch-delete mode) only gets its status.
fn settle_if_final(
    tx: &rusqlite::Transaction<'_>,
    event_id: i64,
) -> anyhow::Result<Option<String>> {
    let (lane, portal, upstream): (String, String, String) = tx
        .prepare_cached("SELECT lane, portal, upstream FROM events WHERE id = ?1")?
        .query_row([event_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    let deliveries: Vec<DeliveryState> = tx
        .prepare_cached("SELECT status FROM deliveries WHERE event_id = ?1")?
        .query_map([event_id], |r| Ok(state_from_sql(&r.get::<_, String>(0)?)))?
        .collect::<Result<_, _>>()?;
    let Some(decision) = settle::decide(lane_from_sql(&lane), &deliveries) else {
        return Ok(None);
    };
    let status = if decision.dead { "dead" } else { "delivered" };
    if upstream != "reserved" {
        tx.prepare_cached("UPDATE events SET status = ?2 WHERE id = ?1")?
            .execute(params![event_id, status])?;
        return Ok(None);
    }
    let upstream = match decision.action {
        SettleAction::Clear => "clear_pending",
        SettleAction::Error => "error_pending",
    };
    tx.prepare_cached(
        "UPDATE events SET status = ?2, upstream = ?3 WHERE id = ?1 AND upstream = 'reserved'",
    )?
    .execute(params![event_id, status, upstream])?;
    Ok(Some(portal))
}

/// Deletes pending deliveries to sinks no longer configured (an operator removed or renamed
/// one) and settles the events that were only waiting for them. Returns, per removed sink, how
/// many deliveries were dropped.
fn drop_unknown_sinks(
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
        settle_if_final(&tx, *event_id)?;
    }
    tx.commit()?;
    Ok(dropped.into_iter().collect())
}

fn pending_settlements(conn: &Connection, portal: &str) -> anyhow::Result<Vec<PendingSettlement>> {
    let mut stmt = conn.prepare_cached(
        "SELECT e.batch_id, b.process_id, b.lane, e.upstream, e.id, e.offline_id, e.message_id
         FROM events e JOIN batches b ON b.id = e.batch_id
         WHERE e.portal = ?1 AND e.upstream IN ('clear_pending', 'error_pending')
         ORDER BY e.batch_id, e.upstream, e.id",
    )?;
    let mut groups: BTreeMap<(i64, String), PendingSettlement> = BTreeMap::new();
    let rows = stmt.query_map([portal], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, i64>(5)?,
            r.get::<_, String>(6)?,
        ))
    })?;
    for row in rows {
        let (batch_id, process_id, lane, upstream, id, offline_id, message_id) = row?;
        let action = if upstream == "error_pending" {
            SettleAction::Error
        } else {
            SettleAction::Clear
        };
        groups
            .entry((batch_id, upstream))
            .or_insert_with(|| PendingSettlement {
                batch_id,
                process_id,
                lane: lane_from_sql(&lane),
                action,
                events: Vec::new(),
            })
            .events
            .push((id, offline_id, message_id));
    }
    Ok(groups.into_values().collect())
}

fn mark_settled(conn: &mut Connection, groups: &[(Vec<i64>, SettleAction)]) -> anyhow::Result<()> {
    let tx = conn.transaction()?;
    let at = now();
    for (event_ids, action) in groups {
        mark_settled_in(&tx, event_ids, *action, &at)?;
    }
    tx.commit()?;
    Ok(())
}

fn mark_settled_in(
    tx: &rusqlite::Transaction<'_>,
    event_ids: &[i64],
    action: SettleAction,
    at: &str,
) -> anyhow::Result<()> {
    let (from, to) = match action {
        SettleAction::Clear => ("clear_pending", "cleared"),
        SettleAction::Error => ("error_pending", "errored"),
    };
    {
        let mut update = tx.prepare_cached(
            "UPDATE events SET upstream = ?2, settled_at = ?3 WHERE id = ?1 AND upstream = ?4 RETURNING batch_id",
        )?;
        let mut close = tx.prepare_cached(
            "UPDATE batches SET settled_at = ?2 WHERE id = ?1 AND settled_at IS NULL AND NOT EXISTS (
                SELECT 1 FROM events WHERE batch_id = ?1 AND upstream IN ('reserved', 'clear_pending', 'error_pending'))",
        )?;
        let mut batches = Vec::new();
        for id in event_ids {
            if let Some(batch_id) = update
                .query_row(params![id, to, at, from], |r| r.get::<_, i64>(0))
                .optional()?
                && !batches.contains(&batch_id)
            {
                batches.push(batch_id);
            }
        }
        for batch_id in batches {
            close.execute(params![batch_id, at])?;
        }
    }
    Ok(())
}

fn counts(conn: &Connection) -> anyhow::Result<JournalCounts> {
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

/// Reads a non-negative SQL integer (a COUNT or SUM) as `u64`.
fn count(row: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    Ok(row.get::<_, i64>(idx)?.max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn open() -> (tempfile::TempDir, Journal) {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open_blocking(&dir.path().join("j.db"), Synchronous::Full).unwrap();
        (dir, j)
    }

    fn event(id: i64, sinks: &[&str]) -> NewEvent {
        NewEvent {
            offline_id: id,
            event: "ONCRMDEALUPDATE".into(),
            message_id: format!("{id:032x}"),
            timestamp: "2026-11-22T10:00:00+03:00".into(),
            data: json!({"FIELDS": {"ID": id.to_string()}}),
            additional: json!({"user_id": 1}),
            sinks: sinks.iter().map(|s| s.to_string()).collect(),
            enrich: false,
        }
    }

    fn batch(pid: &str, lane: Lane, events: Vec<NewEvent>) -> NewBatch {
        NewBatch {
            portal: "main".into(),
            process_id: pid.into(),
            lane,
            origin: BatchOrigin::Fetched,
            events,
            deleted_upstream: false,
            new_reservation: true,
        }
    }

    #[tokio::test]
    async fn journal_file_is_private_and_migrated() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, j) = open();
        let mode = std::fs::metadata(dir.path().join("j.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let v: i64 = j
            .with_conn(|c| Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        // reopening is a no-op migration
        drop(j);
        Journal::open_blocking(&dir.path().join("j.db"), Synchronous::Full).unwrap();
    }

    #[tokio::test]
    async fn ping_answers_and_size_counts_the_file_and_its_wal() {
        let (_d, j) = open();
        j.ping().await.unwrap();
        let empty = j.size_bytes().unwrap();
        assert!(empty > 0, "the migrated journal has pages");
        j.record_batch(batch("p1", Lane::Normal, vec![event(1, &["a"])]))
            .await
            .unwrap();
        let mut wal = j.path().as_os_str().to_owned();
        wal.push("-wal");
        let expected = std::fs::metadata(j.path()).unwrap().len()
            + std::fs::metadata(std::path::Path::new(&wal))
                .map(|m| m.len())
                .unwrap_or(0);
        assert_eq!(j.size_bytes().unwrap(), expected);
        assert!(j.size_bytes().unwrap() > empty, "the batch grew the WAL");
    }

    #[tokio::test]
    async fn a_batch_is_delivered_then_cleared() {
        let (_d, j) = open();
        let before = Utc::now() - chrono::Duration::seconds(1);
        let r = j
            .record_batch(batch(
                "p1",
                Lane::Normal,
                vec![event(1, &["a", "b"]), event(2, &["a"])],
            ))
            .await
            .unwrap();
        assert_eq!(r.inserted, 2);
        assert_eq!(j.unsettled_count("main").await.unwrap(), 2);
        let due = j.due_deliveries("a", 10).await.unwrap();
        assert_eq!(due.len(), 2);
        assert_eq!(due[0].envelope.id, "main:1:1795330800");
        assert_eq!(due[0].envelope.attempt, 1);
        let fetched_at = due[0].fetched_at.expect("fetched_at is read");
        assert!(
            fetched_at >= before && fetched_at <= Utc::now(),
            "{fetched_at}"
        );
        let ids: Vec<i64> = due.iter().map(|d| d.event_id).collect();
        let portals = j
            .record_outcomes(
                "a",
                ids.iter()
                    .map(|id| (*id, Outcome::Delivered, None))
                    .collect(),
            )
            .await
            .unwrap();
        assert_eq!(portals, vec!["main".to_string()]); // event 2 only needed sink a
        let pending = j.pending_settlements("main").await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].events.len(), 1);
        assert_eq!(pending[0].action, SettleAction::Clear);
        let b = j.due_deliveries("b", 10).await.unwrap();
        j.record_outcomes("b", vec![(b[0].event_id, Outcome::Delivered, None)])
            .await
            .unwrap();
        let pending = j.pending_settlements("main").await.unwrap();
        assert_eq!(pending[0].events.len(), 2);
        j.mark_settled(
            pending[0].events.iter().map(|e| e.0).collect(),
            SettleAction::Clear,
        )
        .await
        .unwrap();
        assert!(j.open_batches("main").await.unwrap().is_empty());
        assert_eq!(j.unsettled_count("main").await.unwrap(), 0);
        let c = j.counts().await.unwrap();
        assert_eq!(
            (c.events, c.delivered, c.cleared, c.duplicate_deliveries),
            (2, 2, 2, 0)
        );
    }

    #[tokio::test]
    async fn a_dead_delivery_errors_a_normal_event_and_clears_an_error_lane_event() {
        let (_d, j) = open();
        j.record_batch(batch("p1", Lane::Normal, vec![event(1, &["a"])]))
            .await
            .unwrap();
        j.record_batch(batch("p2", Lane::Error, vec![event(9, &["a"])]))
            .await
            .unwrap();
        let due = j.due_deliveries("a", 10).await.unwrap();
        let outcomes = due
            .iter()
            .map(|d| {
                (
                    d.event_id,
                    Outcome::Dead {
                        error: "http 422".into(),
                    },
                    None,
                )
            })
            .collect();
        j.record_outcomes("a", outcomes).await.unwrap();
        let pending = j.pending_settlements("main").await.unwrap();
        let actions: Vec<(String, SettleAction)> = pending
            .iter()
            .map(|p| (p.process_id.clone(), p.action))
            .collect();
        assert_eq!(
            actions,
            vec![
                ("p1".into(), SettleAction::Error),
                ("p2".into(), SettleAction::Clear)
            ]
        );
        assert_eq!(j.counts().await.unwrap().dead, 2);
    }

    #[tokio::test]
    async fn retries_are_not_due_before_their_time() {
        let (_d, j) = open();
        j.record_batch(batch("p1", Lane::Normal, vec![event(1, &["a"])]))
            .await
            .unwrap();
        let due = j.due_deliveries("a", 10).await.unwrap();
        let later = Utc::now() + chrono::Duration::seconds(60);
        j.record_outcomes(
            "a",
            vec![(
                due[0].event_id,
                Outcome::Retry {
                    error: "503".into(),
                    next_attempt_at: later,
                },
                None,
            )],
        )
        .await
        .unwrap();
        assert!(j.due_deliveries("a", 10).await.unwrap().is_empty());
        assert!(j.next_due("a").await.unwrap().unwrap() > Utc::now());
        assert!(j.pending_settlements("main").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn retry_times_beyond_the_latest_possible_are_brought_forward() {
        let (_d, j) = open();
        j.record_batch(batch(
            "p1",
            Lane::Normal,
            vec![event(1, &["a", "b"]), event(2, &["a"]), event(3, &["a"])],
        ))
        .await
        .unwrap();
        let due = j.due_deliveries("a", 10).await.unwrap();
        let now = Utc::now();
        // As written before the clock went back an hour: an hour and 5 s, an hour and 1 s ahead;
        // and one written after it, 1 s ahead.
        let retry = |id, secs| {
            (
                id,
                Outcome::Retry {
                    error: "503".into(),
                    next_attempt_at: now + chrono::Duration::seconds(secs),
                },
                None,
            )
        };
        j.record_outcomes(
            "a",
            vec![
                retry(due[0].event_id, 3605),
                retry(due[1].event_id, 3601),
                retry(due[2].event_id, 1),
            ],
        )
        .await
        .unwrap();
        let b = j.due_deliveries("b", 10).await.unwrap();
        j.record_outcomes("b", vec![retry(b[0].event_id, 3605)])
            .await
            .unwrap();
        let latest = now + chrono::Duration::seconds(3);
        assert_eq!(j.bring_forward("a", latest).await.unwrap(), 2);
        let due: Vec<i64> = j
            .due_deliveries("a", 10)
            .await
            .unwrap()
            .iter()
            .map(|d| d.event_id)
            .collect();
        assert_eq!(due.len(), 2, "the two far-off retries are due now");
        assert!(j.next_due("a").await.unwrap().unwrap() <= latest);
        // Another sink's retries are its own dispatcher's business.
        assert!(j.due_deliveries("b", 10).await.unwrap().is_empty());
        assert_eq!(j.bring_forward("a", latest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn recording_a_known_reservation_again_inserts_only_new_events() {
        let (_d, j) = open();
        j.record_batch(batch("p1", Lane::Normal, vec![event(1, &["a"])]))
            .await
            .unwrap();
        let r = j
            .record_batch(batch(
                "p1",
                Lane::Normal,
                vec![event(1, &["a"]), event(2, &["a"])],
            ))
            .await
            .unwrap();
        assert_eq!((r.inserted, r.known_unsettled), (1, 1));
        assert_eq!(j.counts().await.unwrap().events, 2);
    }

    /// The deliveries of the event row `row`: `(sink, status)` by sink.
    fn deliveries_of(j: &Journal, row: i64) -> Vec<(String, String)> {
        j.with_conn(|conn| {
            Ok(conn
                .prepare("SELECT sink, status FROM deliveries WHERE event_id = ?1 ORDER BY sink")?
                .query_map([row], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?)
        })
        .unwrap()
    }

    /// `(row, envelope_id, status, upstream)` of every event, by row.
    fn event_rows(j: &Journal) -> Vec<(i64, String, String, String)> {
        j.with_conn(|conn| {
            Ok(conn
                .prepare("SELECT id, envelope_id, status, upstream FROM events ORDER BY id")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<Result<_, _>>()?)
        })
        .unwrap()
    }

    /// Event 1 delivered to `a` and dead at `b`, so errored upstream.
    async fn delivered_to_a_dead_at_b(j: &Journal) {
        j.record_batch(batch("p1", Lane::Normal, vec![event(1, &["a", "b"])]))
            .await
            .unwrap();
        let a = j.due_deliveries("a", 10).await.unwrap();
        j.record_outcomes("a", vec![(a[0].event_id, Outcome::Delivered, None)])
            .await
            .unwrap();
        let b = j.due_deliveries("b", 10).await.unwrap();
        let dead = Outcome::Dead {
            error: "http 400".into(),
        };
        j.record_outcomes("b", vec![(b[0].event_id, dead, None)])
            .await
            .unwrap();
        let pending = j.pending_settlements("main").await.unwrap();
        assert_eq!(pending[0].action, SettleAction::Error);
        j.mark_settled(vec![pending[0].events[0].0], SettleAction::Error)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_unchanged_error_lane_copy_keeps_its_key_and_skips_the_sinks_that_have_it() {
        let (_d, j) = open();
        delivered_to_a_dead_at_b(&j).await;
        let r = j
            .record_batch(batch("e1", Lane::Error, vec![event(1, &["a", "b"])]))
            .await
            .unwrap();
        assert_eq!(
            (
                r.inserted,
                r.known_changes,
                r.known_change_deliveries,
                r.known_changes_done
            ),
            (1, 1, 1, 0)
        );
        let rows = event_rows(&j);
        assert_eq!(rows[1].1, rows[0].1, "the same change, the same key");
        assert_eq!(rows[1].1, "main:1:1795330800");
        assert_eq!(
            deliveries_of(&j, rows[1].0),
            [("b".to_string(), "pending".to_string())],
            "a has it; b gave up on it and gets it again"
        );
        assert!(j.due_deliveries("a", 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_error_lane_copy_every_sink_has_or_is_getting_again_is_cleared_at_once() {
        let (_d, j) = open();
        delivered_to_a_dead_at_b(&j).await;
        // `dead retry --sink b`: b's delivery of the first row is pending again.
        j.with_conn(|conn| {
            Ok(conn.execute(
                "UPDATE deliveries SET status = 'pending', attempts = 0 WHERE sink = 'b'",
                [],
            )?)
        })
        .unwrap();
        let r = j
            .record_batch(batch("e1", Lane::Error, vec![event(1, &["a", "b"])]))
            .await
            .unwrap();
        assert_eq!(
            (
                r.known_changes,
                r.known_change_deliveries,
                r.known_changes_done
            ),
            (1, 0, 1)
        );
        let rows = event_rows(&j);
        assert_eq!(
            (rows[1].2.as_str(), rows[1].3.as_str()),
            ("delivered", "clear_pending")
        );
        assert!(deliveries_of(&j, rows[1].0).is_empty());
        let pending = j.pending_settlements("main").await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            (pending[0].process_id.as_str(), pending[0].action),
            ("e1", SettleAction::Clear)
        );
        // Only b's retry of the first row is due, under the one key.
        let due = j.due_deliveries("b", 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].event_id, rows[0].0);
        assert!(j.due_deliveries("a", 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_later_change_merged_into_the_error_lane_row_is_new_to_every_sink() {
        let (_d, j) = open();
        delivered_to_a_dead_at_b(&j).await;
        let mut merged = event(1, &["a", "b"]);
        merged.timestamp = "2026-11-22T10:00:02+03:00".into();
        let r = j
            .record_batch(batch("e1", Lane::Error, vec![merged]))
            .await
            .unwrap();
        assert_eq!((r.inserted, r.known_changes), (1, 0));
        let rows = event_rows(&j);
        assert_eq!(rows[1].1, "main:1:1795330802");
        assert_ne!(rows[1].1, rows[0].1);
        assert_eq!(
            deliveries_of(&j, rows[1].0),
            [
                ("a".to_string(), "pending".to_string()),
                ("b".to_string(), "pending".to_string())
            ]
        );
    }

    #[tokio::test]
    async fn a_reused_offline_id_is_a_new_key_and_goes_to_every_sink() {
        let (_d, j) = open();
        j.record_batch(batch("p1", Lane::Normal, vec![event(1, &["a"])]))
            .await
            .unwrap();
        let due = j.due_deliveries("a", 10).await.unwrap();
        j.record_outcomes("a", vec![(due[0].event_id, Outcome::Delivered, None)])
            .await
            .unwrap();
        // The table was emptied and MySQL re-seeded its counter: ID 1 again, another event.
        let mut reused = event(1, &["a"]);
        reused.timestamp = "2026-11-22T10:07:13+03:00".into();
        reused.data = json!({"FIELDS": {"ID": "77"}});
        j.record_batch(batch("p2", Lane::Normal, vec![reused]))
            .await
            .unwrap();
        let due = j.due_deliveries("a", 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].envelope.id, "main:1:1795331233");
        assert_eq!(due[0].envelope.data["FIELDS"]["ID"], "77");
    }

    /// A journal written by the previous version (schema 4, keys `main:N`) migrates: every row
    /// gets its change, keeps its key, and an unchanged error-lane copy of it keeps that key.
    #[tokio::test]
    async fn rows_keyed_before_changes_were_keyed_keep_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        {
            let mut conn = Connection::open(&path).unwrap();
            schema::migrate_to(&mut conn, 0, 4).unwrap();
            conn.execute_batch(
                "INSERT INTO batches (id, portal, process_id, lane, origin, fetched_at, settled_at)
                 VALUES (1, 'main', 'p1', 'normal', 'fetched', '2026-11-22T07:00:00.000Z',
                         '2026-11-22T07:00:01.000Z');
                 INSERT INTO events (id, envelope_id, portal, batch_id, offline_id, event, message_id,
                                     timestamp, data, additional, lane, fetched_at, status, upstream,
                                     settled_at)
                 VALUES (1, 'main:1', 'main', 1, 1, 'ONCRMDEALUPDATE', '00000000000000000000000000000001',
                         '2026-11-22T10:00:00+03:00', '{}', '{}', 'normal', '2026-11-22T07:00:00.000Z',
                         'dead', 'errored', '2026-11-22T07:00:01.000Z'),
                        (2, 'main:2', 'main', 1, 2, 'ONCRMDEALUPDATE', '00000000000000000000000000000002',
                         '2026-11-22T10:00:01+03:00', '{}', '{}', 'normal', '2026-11-22T07:00:00.000Z',
                         'delivered', 'cleared', '2026-11-22T07:00:01.000Z');
                 INSERT INTO deliveries (event_id, sink, status, attempts, next_attempt_at)
                 VALUES (1, 'a', 'delivered', 1, '2026-11-22T07:00:00.000Z'),
                        (1, 'b', 'dead', 1, '2026-11-22T07:00:00.000Z'),
                        (2, 'a', 'delivered', 1, '2026-11-22T07:00:00.000Z');",
            )
            .unwrap();
        }
        let j = Journal::open_blocking(&path, Synchronous::Full).unwrap();
        let migrated: Vec<(String, Option<String>)> = j
            .with_conn(|conn| {
                Ok(conn
                    .prepare("SELECT envelope_id, change_key FROM events ORDER BY id")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<_, _>>()?)
            })
            .unwrap();
        assert_eq!(
            migrated,
            [
                ("main:1".to_string(), Some("1795330800".to_string())),
                ("main:2".to_string(), Some("1795330801".to_string()))
            ]
        );
        // Event 1 comes back from the error lane unchanged: the old key, only to b.
        let r = j
            .record_batch(batch("e1", Lane::Error, vec![event(1, &["a", "b"])]))
            .await
            .unwrap();
        assert_eq!((r.known_changes, r.known_change_deliveries), (1, 1));
        let due = j.due_deliveries("b", 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].envelope.id, "main:1");
        assert_eq!(due[0].envelope.lane, Lane::Error);
        assert!(j.due_deliveries("a", 10).await.unwrap().is_empty());
        // A later change of it is a new change: the new key format, every sink.
        let mut merged = event(1, &["a", "b"]);
        merged.timestamp = "2026-11-22T10:09:00+03:00".into();
        j.record_batch(batch("e2", Lane::Error, vec![merged]))
            .await
            .unwrap();
        let due = j.due_deliveries("a", 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].envelope.id, "main:1:1795331340");
    }

    #[tokio::test]
    async fn an_event_without_sinks_is_cleared_at_once() {
        let (_d, j) = open();
        j.record_batch(batch("p1", Lane::Normal, vec![event(1, &[])]))
            .await
            .unwrap();
        let pending = j.pending_settlements("main").await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].action, SettleAction::Clear);
    }

    #[tokio::test]
    async fn tokens_round_trip() {
        let (_d, j) = open();
        assert!(j.load_tokens("main").await.unwrap().is_none());
        let t = Tokens {
            access_token: "a1".into(),
            refresh_token: "r1".into(),
            expires_at: Some(Utc::now()),
            member_id: Some("m".into()),
            scope: None,
            client_endpoint: None,
            user_id: Some(1),
        };
        j.save_tokens("main", &t).await.unwrap();
        let got = j.load_tokens("main").await.unwrap().unwrap();
        assert_eq!(
            (got.access_token.as_str(), got.refresh_token.as_str()),
            ("a1", "r1")
        );
        assert_eq!(got.member_id.as_deref(), Some("m"));

        assert!(j.token_status("other").await.unwrap().is_none());
        let status = j.token_status("main").await.unwrap().unwrap();
        assert_eq!(
            status.expires_at.map(|t| t.timestamp_millis()),
            t.expires_at.map(|t| t.timestamp_millis())
        );
        assert!(status.updated_at.is_some_and(|at| at <= Utc::now()));
        assert_eq!(status.member_id.as_deref(), Some("m"));
        assert_eq!((status.scope, status.user_id), (None, Some(1)));
        assert!(status.has_refresh_token);
        j.save_tokens("main", &Tokens::from_pair("a2", ""))
            .await
            .unwrap();
        let status = j.token_status("main").await.unwrap().unwrap();
        assert!(!status.has_refresh_token);
        assert_eq!(status.expires_at, None);
        assert_eq!(status.member_id.as_deref(), Some("m"), "kept from before");
    }

    #[tokio::test]
    async fn deliveries_to_a_removed_sink_are_dropped_and_the_event_settles() {
        let (_d, j) = open();
        j.record_batch(batch(
            "p1",
            Lane::Normal,
            vec![event(1, &["a", "gone"]), event(2, &["a"])],
        ))
        .await
        .unwrap();
        let due = j.due_deliveries("a", 10).await.unwrap();
        j.record_outcomes(
            "a",
            due.iter()
                .map(|d| (d.event_id, Outcome::Delivered, None))
                .collect(),
        )
        .await
        .unwrap();
        // Event 1 still waits for "gone".
        assert_eq!(
            j.pending_settlements("main").await.unwrap()[0].events.len(),
            1
        );
        let dropped = j
            .drop_deliveries_to_unknown_sinks(vec!["a".into()])
            .await
            .unwrap();
        assert_eq!(dropped, vec![("gone".to_string(), 1)]);
        let pending = j.pending_settlements("main").await.unwrap();
        assert_eq!(pending[0].events.len(), 2, "both events are ready to clear");
        assert_eq!(pending[0].action, SettleAction::Clear);
        assert!(
            j.drop_deliveries_to_unknown_sinks(vec!["a".into()])
                .await
                .unwrap()
                .is_empty()
        );
    }
}

/// The settle lattice as the journal applies it, under random routings and outcome orders: an
/// event is cleared iff every routed sink delivered it (or it is dead in the error lane), errored
/// iff a sink gave up on it in the normal lane, never both, and never while a delivery is open.
#[cfg(test)]
mod lattice_properties {
    use super::*;
    use proptest::prelude::*;

    const SINKS: [&str; 3] = ["a", "b", "c"];

    /// One attempt: (event index, sink index, 0 delivered / 1 retry / 2 dead).
    type Step = (usize, usize, u8);

    fn scenario() -> impl Strategy<Value = (Vec<u8>, bool, Vec<Step>)> {
        (
            // Per event, which sinks it routes to (a bit set, possibly none).
            proptest::collection::vec(0u8..8, 1..8),
            any::<bool>(),
            proptest::collection::vec((0usize..8, 0usize..3, 0u8..3), 0..40),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn cleared_iff_all_delivered_errored_iff_dead_never_both(
            (routes, error_lane, steps) in scenario()
        ) {
            let dir = tempfile::tempdir().unwrap();
            let j = Journal::open_blocking(&dir.path().join("j.db"), Synchronous::Normal).unwrap();
            let lane = if error_lane { Lane::Error } else { Lane::Normal };
            let events: Vec<NewEvent> = routes
                .iter()
                .enumerate()
                .map(|(i, bits)| NewEvent {
                    offline_id: i as i64 + 1,
                    event: "ONCRMDEALUPDATE".into(),
                    message_id: format!("{:032x}", i + 1),
                    timestamp: "2026-11-22T10:00:00+03:00".into(),
                    data: Value::Null,
                    additional: Value::Null,
                    sinks: SINKS
                        .iter()
                        .enumerate()
                        .filter(|(s, _)| bits & (1 << s) != 0)
                        .map(|(_, name)| name.to_string())
                        .collect(),
                    enrich: false,
                })
                .collect();
            let batch = NewBatch {
                portal: "main".into(),
                process_id: "p1".into(),
                lane,
                origin: BatchOrigin::Fetched,
                events,
                deleted_upstream: false,
                new_reservation: true,
            };
            j.with_conn(|conn| record_batches(conn, std::slice::from_ref(&batch))).unwrap();
            let row_of = |offline_id: i64| -> i64 {
                j.with_conn(|conn| {
                    Ok(conn.query_row(
                        "SELECT id FROM events WHERE offline_id = ?1",
                        [offline_id],
                        |r| r.get(0),
                    )?)
                })
                .unwrap()
            };

            // The model: per (event, sink) the final state once delivered or dead.
            let mut model: BTreeMap<(usize, usize), Option<bool>> = BTreeMap::new();
            for (i, bits) in routes.iter().enumerate() {
                for s in 0..SINKS.len() {
                    if bits & (1 << s) != 0 {
                        model.insert((i, s), None); // open
                    }
                }
            }
            for (event, sink, kind) in steps {
                let event = event % routes.len();
                let Some(state) = model.get_mut(&(event, sink)) else { continue };
                if state.is_some() {
                    continue; // final deliveries take no more attempts
                }
                let outcome = match kind {
                    0 => { *state = Some(true); Outcome::Delivered }
                    1 => Outcome::Retry { error: "busy".into(), next_attempt_at: Utc::now() },
                    _ => { *state = Some(false); Outcome::Dead { error: "refused".into() } }
                };
                let row = row_of(event as i64 + 1);
                j.with_conn(|conn| record_outcomes(conn, SINKS[sink], &[(row, outcome, None)]))
                    .unwrap();
            }

            let pending = j.with_conn(|conn| pending_settlements(conn, "main")).unwrap();
            let mut actions: BTreeMap<i64, Vec<SettleAction>> = BTreeMap::new();
            for group in &pending {
                for (row, _, _) in &group.events {
                    actions.entry(*row).or_default().push(group.action);
                }
            }
            for (i, _) in routes.iter().enumerate() {
                let row = row_of(i as i64 + 1);
                let states: Vec<Option<bool>> = model
                    .iter()
                    .filter(|((e, _), _)| *e == i)
                    .map(|(_, s)| *s)
                    .collect();
                let got = actions.get(&row).cloned().unwrap_or_default();
                prop_assert!(got.len() <= 1, "event {i} in two settle groups: {got:?}");
                let expected = if states.iter().any(Option::is_none) {
                    None
                } else if states.contains(&Some(false)) && lane == Lane::Normal {
                    Some(SettleAction::Error)
                } else {
                    Some(SettleAction::Clear)
                };
                prop_assert_eq!(got.first().copied(), expected, "event {} with deliveries {:?}", i, states);
            }
        }
    }
}
