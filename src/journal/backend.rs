//! The journal's interface: every operation the daemon, the commands and the tests make on a
//! journal, in terms of the plain data of `types` and `inspect` only. A storage backend
//! implements [`JournalBackend`]; callers reach it through the [`super::Journal`] handle.
//!
//! Every implementation keeps the invariants listed in ARCHITECTURE.md (`journal/`): a batch
//! with its events and deliveries in one transaction, outcomes and the settle lattice
//! (`settle`) in one transaction, upstream states that only move forward, nothing
//! unsettled ever deleted, one idempotency key per change.

use super::inspect::{EventDetail, EventFilter, EventRow, PortalStats, Pruned, Requeued};
use super::types::{
    DueDelivery, Enriched, JournalCounts, NewBatch, OpenBatch, Outcome, PendingEnrichment,
    PendingSettlement, RecordedBatch, SettleAction, StatusData, StoredFinding, TokenStatus,
};
use crate::BoxFuture;
use crate::bitrix::Tokens;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A journal store. Object-safe: async operations return a [`BoxFuture`] (as `Sink` and
/// `TokenStore` do), so the handle holds any backend as `dyn JournalBackend`. The blocking
/// operations serve the operator commands, which run without an async runtime.
pub trait JournalBackend: std::any::Any + Send + Sync {
    // ---- where it is and whether it answers ------------------------------------------------

    /// Where the journal is: the SQLite file (for a PostgreSQL journal, its location as a path:
    /// use [`JournalBackend::location`] in messages).
    fn path(&self) -> &Path;

    /// Where the journal is, for messages: the SQLite file's absolute path (`./b24eventd.db`
    /// says nothing about which directory was meant), or a PostgreSQL journal's URL without
    /// its password and the schema (`postgres://user@host:5432/db#schema`).
    fn location(&self) -> String {
        std::path::absolute(self.path())
            .unwrap_or_else(|_| self.path().to_path_buf())
            .display()
            .to_string()
    }

    /// Bytes the journal takes on disk (for SQLite: the file and its write-ahead log).
    /// Async: on PostgreSQL it is a query, which must not hold a runtime thread.
    fn size_bytes(&self) -> BoxFuture<'_, std::io::Result<u64>>;

    /// Answers a trivial query: the journal is open and its connection is not stuck.
    fn ping(&self) -> BoxFuture<'_, anyhow::Result<()>>;

    // ---- portals and tokens ----------------------------------------------------------------

    fn load_tokens<'a>(&'a self, portal: &'a str) -> BoxFuture<'a, anyhow::Result<Option<Tokens>>>;

    /// Stores tokens durably (the transaction has committed when this returns). On a journal
    /// opened [`super::Access::Read`] this is the one write made: a refresh made by a command
    /// that only looks has already killed the old refresh token upstream.
    fn save_tokens<'a>(
        &'a self,
        portal: &'a str,
        tokens: &'a Tokens,
    ) -> BoxFuture<'a, anyhow::Result<()>>;

    /// The stored tokens' metadata for `portal` (never the tokens), or `None` when none are
    /// stored.
    fn token_status<'a>(
        &'a self,
        portal: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Option<TokenStatus>>>;

    // ---- reservations ----------------------------------------------------------------------

    /// Journals a reservation and its events in one transaction: the batch row, each event not
    /// yet known under this reservation, and one pending delivery per routed sink. An event no
    /// sink wants is settled (`clear_pending`) at once.
    ///
    /// Each event gets the envelope id of the first journaled row of the same change (same
    /// portal, offline ID and `Envelope::change_key`), else a new one. An error-lane event
    /// whose change the journal already holds goes only to the routed sinks with neither a
    /// delivered nor a pending delivery of it; with none left it is settled at once.
    fn record_batch(&self, batch: NewBatch) -> BoxFuture<'_, anyhow::Result<RecordedBatch>> {
        Box::pin(async move {
            let mut recorded = self.record_batches(vec![batch]).await?;
            Ok(recorded.remove(0))
        })
    }

    /// Journals several reservations (each as [`JournalBackend::record_batch`] does) in one
    /// transaction: the reservations of one combined request land together or not at all.
    fn record_batches(
        &self,
        batches: Vec<NewBatch>,
    ) -> BoxFuture<'_, anyhow::Result<Vec<RecordedBatch>>>;

    /// Reservations not fully settled yet.
    fn open_batches<'a>(&'a self, portal: &'a str)
    -> BoxFuture<'a, anyhow::Result<Vec<OpenBatch>>>;

    /// Every `process_id` the journal has seen for `portal`, with whether it is settled.
    fn known_process_ids<'a>(
        &'a self,
        portal: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<HashMap<String, bool>>>;

    /// Events of `portal` reserved upstream and not settled yet (the `max_unsettled` measure).
    fn unsettled_count<'a>(&'a self, portal: &'a str) -> BoxFuture<'a, anyhow::Result<u64>>;

    /// Events of `portal` some sink still has to deliver (fetch-delete mode's backpressure:
    /// there, nothing stays unsettled upstream).
    fn undelivered_count<'a>(&'a self, portal: &'a str) -> BoxFuture<'a, anyhow::Result<u64>>;

    // ---- deliveries ------------------------------------------------------------------------

    /// Up to `limit` pending deliveries for `sink` whose time has come, oldest first (none of
    /// an event still waiting for its entity).
    fn due_deliveries<'a>(
        &'a self,
        sink: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, anyhow::Result<Vec<DueDelivery>>>;

    /// Makes the pending deliveries of `sink` due now whose time lies after `latest`; returns
    /// how many. The dispatcher never schedules a retry further out than the sink's
    /// `max_backoff`, so such a time means this machine's clock was set back after it was
    /// written (or `max_backoff` was lowered since): waiting for it would hold the event back
    /// by the size of the step.
    fn bring_forward<'a>(
        &'a self,
        sink: &'a str,
        latest: DateTime<Utc>,
    ) -> BoxFuture<'a, anyhow::Result<usize>>;

    /// When the earliest pending delivery of `sink` is due, if any.
    fn next_due<'a>(
        &'a self,
        sink: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Option<DateTime<Utc>>>>;

    /// Records attempt outcomes `(event row, outcome, output)` for `sink` and, in the same
    /// transaction, applies the settle lattice to every event whose deliveries are now all
    /// final. Returns the portals that have new settle work.
    fn record_outcomes<'a>(
        &'a self,
        sink: &'a str,
        outcomes: Vec<(i64, Outcome, Option<String>)>,
    ) -> BoxFuture<'a, anyhow::Result<Vec<String>>>;

    /// Drops pending deliveries to sinks that are no longer configured, settling the events
    /// that waited only for them; returns `(sink, deliveries dropped)`.
    fn drop_deliveries_to_unknown_sinks(
        &self,
        known: Vec<String>,
    ) -> BoxFuture<'_, anyhow::Result<Vec<(String, u64)>>>;

    // ---- upstream settlement ---------------------------------------------------------------

    /// Events waiting for `event.offline.clear` / `event.offline.error`, grouped by reservation.
    fn pending_settlements<'a>(
        &'a self,
        portal: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Vec<PendingSettlement>>>;

    /// Marks events as settled upstream and closes reservations with nothing left to settle.
    fn mark_settled(
        &self,
        event_ids: Vec<i64>,
        action: SettleAction,
    ) -> BoxFuture<'_, anyhow::Result<()>> {
        self.mark_settled_groups(vec![(event_ids, action)])
    }

    /// [`JournalBackend::mark_settled`] for the settle calls of one combined request, in one
    /// transaction.
    fn mark_settled_groups(
        &self,
        groups: Vec<(Vec<i64>, SettleAction)>,
    ) -> BoxFuture<'_, anyhow::Result<()>>;

    // ---- enrichment ------------------------------------------------------------------------

    /// Events of `portal` whose entity is still to be read, oldest first.
    fn pending_enrichment<'a>(
        &'a self,
        portal: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, anyhow::Result<Vec<PendingEnrichment>>>;

    /// Stores what enrichment found (`entity`, or `null` and why) and releases the events'
    /// deliveries, in one transaction.
    fn record_enrichment(&self, results: Vec<Enriched>) -> BoxFuture<'_, anyhow::Result<()>>;

    // ---- conformance findings --------------------------------------------------------------

    /// Replaces the stored findings of `portal` with those of one probe run, in one
    /// transaction: a check the run did not reach is forgotten (unknown again), not kept from
    /// an older run.
    fn replace_conformance<'a>(
        &'a self,
        portal: &'a str,
        findings: Vec<StoredFinding>,
    ) -> BoxFuture<'a, anyhow::Result<()>>;

    /// The stored findings of `portal`, by check name; empty when it was never probed.
    fn conformance<'a>(
        &'a self,
        portal: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Vec<StoredFinding>>>;

    // ---- what the daemon reports -----------------------------------------------------------

    /// The highest event row, and per portal the events journaled after row `after` (none
    /// without one): the fetch rate for the systemd status line, from the rowid alone.
    fn events_since_row(
        &self,
        after: Option<i64>,
    ) -> BoxFuture<'_, anyhow::Result<(i64, BTreeMap<String, u64>)>>;

    /// Dead outcomes recorded after attempt row `after` (none without one): the highest attempt
    /// row, how many, and up to 5 of their envelope ids. For the "new dead event" alert.
    fn dead_attempts_since(
        &self,
        after: Option<i64>,
    ) -> BoxFuture<'_, anyhow::Result<(i64, u64, Vec<String>)>>;

    /// When the event behind the oldest pending delivery was journaled.
    fn oldest_pending_fetched_at(&self) -> BoxFuture<'_, anyhow::Result<Option<DateTime<Utc>>>>;

    /// Counters for summaries and `journal stats`.
    fn counts(&self) -> BoxFuture<'_, anyhow::Result<JournalCounts>>;

    /// [`JournalBackend::counts`], blocking.
    fn counts_blocking(&self) -> anyhow::Result<JournalCounts>;

    /// The status page's data as of `now`, for `portals` (the configured ones, shown even
    /// without events).
    fn status_data(
        &self,
        portals: Vec<String>,
        now: DateTime<Utc>,
    ) -> BoxFuture<'_, anyhow::Result<StatusData>>;

    // ---- operator commands (blocking) and pruning ------------------------------------------

    /// Events matching `filter`, oldest first (or the newest `limit`, still oldest first).
    fn list_events(&self, filter: &EventFilter) -> anyhow::Result<Vec<EventRow>>;

    /// Events journaled after row `after`, oldest first (`journal tail`).
    fn events_after(&self, filter: &EventFilter, after: i64) -> anyhow::Result<Vec<EventRow>>;

    /// `journal stats`: per portal, and per sink of each.
    fn stats(&self, filter: &EventFilter) -> anyhow::Result<Vec<PortalStats>>;

    /// The events with this row id (`42`) or envelope id (`main:1234:1721298751`; an event
    /// re-fetched from the error lane unchanged has several rows), or every row of one offline
    /// ID (`main:1234`: its changes, and a row keyed so before keys carried the change).
    fn show_event(&self, id: &str) -> anyhow::Result<Vec<EventDetail>>;

    /// Makes the deliveries of matching events pending again (attempts from zero, due now):
    /// to every sink they had, or to `only_sink` (added if the event never went there).
    /// Deliveries to sinks not in `known_sinks` are skipped. The upstream settlement is not
    /// touched: a replay is local.
    fn replay(
        &self,
        filter: &EventFilter,
        only_sink: Option<&str>,
        known_sinks: &[String],
    ) -> anyhow::Result<Requeued>;

    /// Makes dead deliveries of matching events pending again (`dead retry`).
    fn retry_dead(&self, filter: &EventFilter, known_sinks: &[String]) -> anyhow::Result<Requeued>;

    /// Deletes matching dead events that are settled upstream (`dead purge`); those Bitrix24
    /// still holds in its error lane stay until an error-lane poll has re-read them.
    fn purge_dead(&self, filter: &EventFilter) -> anyhow::Result<Pruned>;

    /// Deletes events settled upstream before `cutoff` whose deliveries are all final; dead
    /// ones only with `include_dead`, and none Bitrix24 still holds in its error lane. Small
    /// transactions, so the daemon never waits long.
    fn prune_blocking(&self, cutoff: DateTime<Utc>, include_dead: bool) -> anyhow::Result<Pruned>;

    /// Writes a consistent copy of the journal, taken while the daemon may be writing, into
    /// `to`, a file that must not exist yet, created with mode 0600 (the copy holds the OAuth
    /// tokens); returns its size in bytes (`journal backup`). The copy opens as a journal.
    fn backup_blocking(&self, to: &Path) -> anyhow::Result<u64>;

    /// For tests that must see a row the interface does not show: the rows of a `SELECT`, each
    /// an object of column name to value (integers and text as JSON numbers and strings, times
    /// as each backend writes them). Blocking. Nothing in `src/` outside `journal/` calls it (the
    /// boundary test checks).
    #[doc(hidden)]
    fn sql_rows(&self, sql: &str) -> anyhow::Result<Vec<serde_json::Value>>;

    /// For tests that must set up a state the interface cannot make (an old row, a broken
    /// one): runs one statement and returns the rows it changed. Blocking.
    #[doc(hidden)]
    fn sql_execute(&self, sql: &str) -> anyhow::Result<u64>;

    /// [`JournalBackend::prune_blocking`] off the async runtime (the daemon's prune job).
    fn prune(
        &self,
        cutoff: DateTime<Utc>,
        include_dead: bool,
    ) -> BoxFuture<'_, anyhow::Result<Pruned>>;
}
