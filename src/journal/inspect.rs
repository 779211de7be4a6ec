//! What the operator commands ask the journal and get back: the event filter, `journal
//! list|show|stats` rows, and what `replay`, `dead retry|purge` and `prune` did.

use crate::envelope::Envelope;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// Which events an operator command is about. Every field narrows; `None` means any.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub portal: Option<String>,
    /// An event name, or a glob (`ONCRMDEAL*`); compared in upper case.
    pub event: Option<String>,
    /// Events with a delivery to this sink (and `status` then applies to that delivery).
    pub sink: Option<String>,
    pub status: Option<StatusFilter>,
    /// Journaled (`fetched_at`) at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// Journaled before this instant.
    pub until: Option<DateTime<Utc>>,
    pub limit: Option<u32>,
}

/// `--status`: of the event, or of its delivery to `--sink`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusFilter {
    Pending,
    /// Pending after at least one failed attempt.
    Retrying,
    Delivered,
    Dead,
}

impl StatusFilter {
    pub fn parse(s: &str) -> Option<StatusFilter> {
        Some(match s {
            "pending" => StatusFilter::Pending,
            "retrying" => StatusFilter::Retrying,
            "delivered" => StatusFilter::Delivered,
            "dead" => StatusFilter::Dead,
            _ => return None,
        })
    }
}

/// One line of `journal list`.
#[derive(Debug, Clone, Serialize)]
pub struct EventRow {
    /// The journal row id (`journal show ID`).
    pub row: i64,
    /// The envelope id, `<portal>:<offline ID>:<change>` (`<portal>:<offline ID>` for rows
    /// journaled before keys carried the change).
    pub id: String,
    pub portal: String,
    pub event: String,
    pub lane: String,
    /// `pending`, `retrying` (pending, and a delivery of it failed at least once; what
    /// `--status retrying` selects), `delivered` or `dead`.
    pub status: String,
    pub upstream: String,
    pub fetched_at: String,
    pub settled_at: Option<String>,
    /// `sink=status` per delivery.
    pub deliveries: Vec<DeliveryBrief>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryBrief {
    pub sink: String,
    /// `pending`, `retrying` (pending after a failed attempt), `delivered` or `dead`.
    pub status: String,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// `journal stats`, per portal.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PortalStats {
    pub portal: String,
    pub events: u64,
    pub pending: u64,
    /// Pending events a delivery of which failed at least once (counted in `pending` too).
    pub retrying: u64,
    pub delivered: u64,
    pub dead: u64,
    /// Reserved upstream, or waiting for our clear/error call.
    pub upstream_unsettled: u64,
    pub oldest_pending_fetched_at: Option<String>,
    pub sinks: Vec<SinkStats>,
}

/// `journal stats`, per sink of a portal.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SinkStats {
    pub sink: String,
    pub pending: u64,
    /// Pending after at least one failed attempt (counted in `pending` too).
    pub retrying: u64,
    pub delivered: u64,
    pub dead: u64,
    pub oldest_pending_fetched_at: Option<String>,
}

/// `journal show`: one event with everything known about it.
#[derive(Debug, Clone, Serialize)]
pub struct EventDetail {
    pub row: i64,
    pub envelope: Envelope,
    pub status: String,
    pub fetched_at: String,
    pub batch: BatchInfo,
    pub upstream: UpstreamInfo,
    pub deliveries: Vec<DeliveryDetail>,
    pub attempts: Vec<AttemptDetail>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchInfo {
    pub process_id: String,
    pub origin: String,
    pub fetched_at: String,
    pub settled_at: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpstreamInfo {
    /// `reserved`, `clear_pending`, `error_pending`, `cleared` or `errored`.
    pub state: String,
    pub settled_at: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryDetail {
    pub sink: String,
    pub status: String,
    pub attempts: u32,
    pub next_attempt_at: Option<String>,
    pub last_error: Option<String>,
    pub delivered_at: Option<String>,
    pub replays: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptDetail {
    pub sink: String,
    pub attempt: u32,
    pub at: String,
    pub outcome: String,
    pub error: Option<String>,
    pub output: Option<String>,
}

/// What `replay` or `dead retry` did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Requeued {
    /// Events with at least one delivery made pending again.
    pub events: u64,
    pub deliveries: u64,
    /// Deliveries to sinks that are not configured any more, left alone.
    pub skipped_unknown_sinks: u64,
}

/// What `prune` or `dead purge` deleted.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Pruned {
    pub events: u64,
    pub batches: u64,
    /// Matching events kept because they still wait for upstream settlement.
    pub kept_unsettled: u64,
    /// Matching events kept because Bitrix24 still holds them in its error lane: reported with
    /// `event.offline.error` and not re-read by an error-lane poll since. Without them the
    /// error-lane copy would go again to the sinks that have it.
    pub kept_in_error_lane: u64,
}
