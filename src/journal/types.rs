//! The plain data the journal takes and returns: what the pipeline journals (batches, outcomes,
//! enrichment, findings), what it reads back (due deliveries, pending settlements, counts,
//! token metadata, the status page's data), and how a caller opens it. No storage type appears
//! here; every backend reads and writes these.

use crate::envelope::{Envelope, Lane};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;

pub use super::settle::SettleAction;

/// A timestamp as the journal stores it: RFC 3339 UTC with milliseconds, so text order is time order.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// What an opener may do to the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `run`, `demo` and the commands that store a portal's first tokens (`auth login`,
    /// `auth import`): read-write; a missing file is created (mode 0600, with its directory),
    /// an older schema of ours migrated.
    Create,
    /// Commands that change the journal (`replay`, `dead retry|purge`, `prune`, the conformance
    /// probe): read-write on an existing journal of ours; an older schema of ours is migrated.
    Write,
    /// Commands that only look (`journal ...`, `dead list`, `auth status`, `doctor`,
    /// `subscribe`): `SQLITE_OPEN_READ_ONLY` on an existing journal of ours at this build's
    /// schema. The one write such a command may need, persisting a token pair that a refresh
    /// rotated, goes through a short-lived read-write connection (see
    /// `JournalBackend::save_tokens`).
    Read,
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
    /// How the journal names it (`batches.origin`).
    pub(super) fn as_str(self) -> &'static str {
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
#[derive(Debug, Clone, Default, Serialize)]
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

// ---- the conformance probe's findings -----------------------------------------------------

/// One stored finding of a probe run. Plain strings; their meaning (which checks exist, what a
/// status means to the daemon) is `crate::conformance`'s.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFinding {
    /// The check's stable name (`get_limit_above_50`, ...).
    pub check: String,
    /// `ok`, `fail` or `skipped`.
    pub status: String,
    /// What the probe saw, for people.
    pub observed: String,
    /// A number the daemon acts on, where the check has one (e.g. how many rows a get returned).
    pub value: Option<i64>,
    /// The probe run that found it (its connector suffix).
    pub run_id: String,
    pub checked_at: DateTime<Utc>,
}

// ---- the status page ---------------------------------------------------------------------

/// Minutes of history the page charts.
pub const HISTORY_MINUTES: usize = 60;
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

/// Logs, once a transaction journaling `batches` has committed, the error-lane copies of changes
/// the journal already held (every backend reports them alike).
pub(super) fn log_known_changes(batches: &[NewBatch], recorded: &[RecordedBatch]) {
    for (batch, r) in batches.iter().zip(recorded) {
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
}
