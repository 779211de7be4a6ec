//! The one table of duration keys and their ranges (`DURATION_RANGES`), which `config` and the
//! sink modules (`SinkOptions::duration`) check every duration key against.

use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
/// The least a duration that "must be longer than 0s" may be.
const NONZERO: Duration = Duration::from_nanos(1);

/// The range one duration key must lie in, and why its upper end is there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DurationRange {
    /// The dotted key; `*` stands for a portal or sink name (`portals.*.poll_interval`).
    pub key: &'static str,
    /// [`Duration::ZERO`] when 0 is allowed.
    pub min: Duration,
    pub max: Duration,
    /// Why a longer value makes no sense, for the error message.
    pub why: &'static str,
}

const fn range(
    key: &'static str,
    min: Duration,
    max: Duration,
    why: &'static str,
) -> DurationRange {
    DurationRange { key, min, max, why }
}

/// Every duration key of the configuration (sink modules' own keys included) and its range.
/// A value past the upper end is a slip (`"5y"` for `"5s"`), and it would reach arithmetic
/// that cannot hold it (a retry time past the year 9999 in the journal, a cutoff before year 0):
/// `validate` refuses it, naming the key.
pub(crate) const DURATION_RANGES: &[DurationRange] = &[
    range(
        "shutdown_timeout",
        Duration::ZERO,
        HOUR,
        "systemd stops waiting long before that",
    ),
    range(
        "journal.retention",
        NONZERO,
        Duration::from_secs(100 * 365 * 24 * 3600),
        "100 years keeps everything",
    ),
    range(
        "journal.lease_ttl",
        Duration::from_secs(1),
        HOUR,
        "an owner gone for an hour leaves its portals unserved for an hour",
    ),
    range(
        "alerts.check_interval",
        NONZERO,
        DAY,
        "an alert checked less often than daily is no alert",
    ),
    range(
        "alerts.unsettled_for",
        NONZERO,
        Duration::from_secs(365 * 24 * 3600),
        "a year",
    ),
    range(
        "alerts.portal_failing_for",
        NONZERO,
        Duration::from_secs(365 * 24 * 3600),
        "a year",
    ),
    range(
        "alerts.oldest_pending_older_than",
        NONZERO,
        Duration::from_secs(365 * 24 * 3600),
        "a year",
    ),
    range(
        "portals.*.poll_interval",
        NONZERO,
        DAY,
        "a portal polled less often than daily loses events to its own purge",
    ),
    range(
        "portals.*.idle_poll_max",
        NONZERO,
        DAY,
        "a portal polled less often than daily loses events to its own purge",
    ),
    range(
        "portals.*.request_timeout",
        NONZERO,
        Duration::from_secs(10 * 60),
        "the portal ends a request after 60 s",
    ),
    range(
        "portals.*.rate_limit.operating_budget",
        NONZERO,
        Duration::from_secs(10 * 60),
        "the portal's operating-time window is 10 minutes",
    ),
    range(
        "sinks.*.timeout",
        NONZERO,
        HOUR,
        "a delivery that takes longer is hung",
    ),
    range(
        "sinks.*.retry.initial_backoff",
        NONZERO,
        Duration::from_secs(7 * 24 * 3600),
        "a week",
    ),
    range(
        "sinks.*.retry.max_backoff",
        NONZERO,
        Duration::from_secs(7 * 24 * 3600),
        "a week; a longer pause holds events past any sensible retention",
    ),
    range(
        "sinks.*.duplicate_window",
        Duration::from_secs(2 * 60),
        Duration::from_secs(7 * 24 * 3600),
        "the server keeps every message id of the window",
    ),
    range(
        "sinks.*.keep_alive",
        Duration::from_secs(5),
        Duration::from_secs(u16::MAX as u64),
        "MQTT carries it in 16 bits of seconds",
    ),
];

/// What is wrong with `value` for the duration key `key` (a full key such as
/// `sinks.erp.retry.max_backoff`), or `None` when it lies in the key's [`DurationRange`].
pub(crate) fn duration_problem(key: &str, value: Duration) -> Option<String> {
    let range = DurationRange::of(key);
    debug_assert!(range.is_some(), "no DurationRange for {key}");
    match range {
        Some(range) => range.check(value),
        None => value
            .is_zero()
            .then(|| "must be longer than 0s".to_string()),
    }
}

impl DurationRange {
    /// The range of `key` (`portals.main.poll_interval` finds `portals.*.poll_interval`).
    pub fn of(key: &str) -> Option<&'static DurationRange> {
        DURATION_RANGES
            .iter()
            .find(|r| match r.key.split_once('*') {
                None => r.key == key,
                Some((prefix, suffix)) => {
                    key.len() > prefix.len() + suffix.len()
                        && key.starts_with(prefix)
                        && key.ends_with(suffix)
                        && !key[prefix.len()..key.len() - suffix.len()].contains('.')
                }
            })
    }

    /// `None` when `value` lies in the range, else what is wrong with it.
    pub fn check(&self, value: Duration) -> Option<String> {
        let show = |d: Duration| humantime::format_duration(d).to_string();
        if value.is_zero() && !self.min.is_zero() {
            Some("must be longer than 0s".to_string())
        } else if value < self.min {
            Some(format!(
                "must be at least {}, got {}",
                show(self.min),
                show(value)
            ))
        } else if value > self.max {
            Some(format!(
                "must be at most {} ({}), got {}",
                show(self.max),
                self.why,
                show(value)
            ))
        } else {
            None
        }
    }
}
