//! The raw configuration: what figment deserializes from TOML and the environment, before
//! defaults and checks.

use crate::options::Secret;
use figment::value::Value;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The config as deserialized from TOML + environment, before defaults and checks.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) journal: RawJournal,
    #[serde(default)]
    pub(crate) admin: RawAdmin,
    #[serde(default, with = "humantime_serde")]
    pub(crate) shutdown_timeout: Option<Duration>,
    pub(crate) log_format: Option<String>,
    pub(crate) alerts: Option<RawAlerts>,
    #[serde(default)]
    pub(crate) portals: BTreeMap<String, RawPortal>,
    #[serde(default)]
    pub(crate) sinks: BTreeMap<String, RawSink>,
    /// `$STATE_DIRECTORY` as seen by [`load`]; the default journal directory. Not a config key.
    #[serde(skip)]
    pub(crate) state_directory: Option<PathBuf>,
    /// The key paths (`["sinks", "erp", "url"]`) a `B24EVENTD_*` variable set, so that errors
    /// found after loading name the variable. Not a config key.
    #[serde(skip)]
    pub(crate) env_keys: Vec<Vec<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJournal {
    pub(crate) path: Option<PathBuf>,
    pub(crate) url: Option<String>,
    pub(crate) schema: Option<String>,
    pub(crate) max_connections: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) retention: Option<Duration>,
    pub(crate) prune_schedule: Option<String>,
    pub(crate) synchronous: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) lease_ttl: Option<Duration>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAlerts {
    pub(crate) sink: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) check_interval: Option<Duration>,
    pub(crate) unsettled_above: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) unsettled_for: Option<Duration>,
    pub(crate) on_dead: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) portal_failing_for: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) oldest_pending_older_than: Option<Duration>,
    pub(crate) journal_larger_than: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAdmin {
    pub(crate) listen: Option<String>,
    pub(crate) allow_remote: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPortal {
    pub(crate) client_endpoint: Option<String>,
    pub(crate) oauth_token_url: Option<String>,
    pub(crate) client_id: Option<String>,
    pub(crate) client_secret: Option<Secret>,
    pub(crate) client_secret_file: Option<PathBuf>,
    pub(crate) auth_connector: Option<String>,
    pub(crate) events: Option<Vec<String>>,
    pub(crate) mode: Option<String>,
    pub(crate) batch_size: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) poll_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) idle_poll_max: Option<Duration>,
    pub(crate) rate_limit: Option<RawRateLimit>,
    pub(crate) max_unsettled: Option<u32>,
    pub(crate) error_lane_schedule: Option<String>,
    pub(crate) orphan_sweep_schedule: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) request_timeout: Option<Duration>,
    /// Event glob → getter method (`"ONCRMDEAL*" = "crm.deal.get"`).
    pub(crate) enrich: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    pub(crate) burst: Option<u32>,
    pub(crate) per_second: Option<f64>,
    pub(crate) share: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) operating_budget: Option<Duration>,
}

/// The keys of `[sinks.NAME]`: those every sink has by name; the others land in `options`,
/// which the sink type's own module reads into its typed config ([`SinkOptions`]).
///
/// [`SinkOptions`]: crate::options::SinkOptions
#[derive(Clone, Default, Deserialize)]
pub(crate) struct RawSink {
    #[serde(rename = "type")]
    pub(crate) kind: Option<String>,
    pub(crate) events: Option<Vec<String>>,
    pub(crate) portals: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) timeout: Option<Duration>,
    pub(crate) concurrency: Option<usize>,
    pub(crate) retry: Option<RawRetry>,
    /// Every other key, for the sink type's module.
    #[serde(flatten)]
    pub(crate) options: BTreeMap<String, Value>,
}

impl fmt::Debug for RawSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawSink")
            .field("kind", &self.kind)
            .field("events", &self.events)
            .field("portals", &self.portals)
            .field("timeout", &self.timeout)
            .field("concurrency", &self.concurrency)
            .field("retry", &self.retry)
            // Option values may be credentials (a password in a URL, a header): keys only.
            .field("options", &self.options.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    pub(crate) max_attempts: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) initial_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) max_backoff: Option<Duration>,
}
