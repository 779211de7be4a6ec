//! The raw configuration: what figment deserializes from TOML and the environment, before
//! defaults and checks.

use crate::options::{RedactedValues, Secret, redact_url};
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
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJournal {
    pub(crate) path: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub(crate) retention: Option<Duration>,
    pub(crate) prune_schedule: Option<String>,
    pub(crate) synchronous: Option<String>,
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

/// The keys of `[sinks.NAME]`: the common ones and those of the `file`, `http` and `exec` types by
/// name (which ones are allowed is checked per `type`); every other key lands in `options`, which
/// the broker and database sink types read into their own typed config ([`SinkOptions`]).
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
    pub(crate) path: Option<PathBuf>,
    pub(crate) url: Option<String>,
    pub(crate) format: Option<String>,
    pub(crate) headers: Option<BTreeMap<String, String>>,
    pub(crate) signing_secret: Option<Secret>,
    pub(crate) signing_secret_file: Option<PathBuf>,
    pub(crate) retry_on: Option<Vec<i64>>,
    pub(crate) dead_on: Option<Vec<i64>>,
    pub(crate) bitrix_domain: Option<String>,
    pub(crate) bitrix_member_id: Option<String>,
    pub(crate) application_token: Option<Secret>,
    pub(crate) application_token_file: Option<PathBuf>,
    pub(crate) event_handler_id: Option<u64>,
    pub(crate) command: Option<Vec<String>>,
    pub(crate) permanent_exit_codes: Option<Vec<i32>>,
    pub(crate) env: Option<BTreeMap<String, String>>,
    pub(crate) working_dir: Option<PathBuf>,
    /// Keys not named above, for the sink types that define their own ([`SinkOptions`]).
    #[serde(flatten)]
    pub(crate) options: BTreeMap<String, Value>,
}

impl RawSink {
    /// The `file`/`http`/`exec` keys that are set, `url` excepted (most sink types have one).
    pub(super) fn named_type_keys(&self) -> Vec<&'static str> {
        [
            ("path", self.path.is_some()),
            ("format", self.format.is_some()),
            ("headers", self.headers.is_some()),
            ("signing_secret", self.signing_secret.is_some()),
            ("signing_secret_file", self.signing_secret_file.is_some()),
            ("retry_on", self.retry_on.is_some()),
            ("dead_on", self.dead_on.is_some()),
            ("bitrix_domain", self.bitrix_domain.is_some()),
            ("bitrix_member_id", self.bitrix_member_id.is_some()),
            ("application_token", self.application_token.is_some()),
            (
                "application_token_file",
                self.application_token_file.is_some(),
            ),
            ("event_handler_id", self.event_handler_id.is_some()),
            ("command", self.command.is_some()),
            ("permanent_exit_codes", self.permanent_exit_codes.is_some()),
            ("env", self.env.is_some()),
            ("working_dir", self.working_dir.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect()
    }
}

impl RawSink {
    /// The `http`-only keys and whether each is set (`url` excepted), for refusing them on
    /// `file` and `exec` sinks.
    pub(super) fn http_only_keys(&self) -> [(&'static str, bool); 11] {
        [
            ("format", self.format.is_some()),
            ("headers", self.headers.is_some()),
            ("signing_secret", self.signing_secret.is_some()),
            ("signing_secret_file", self.signing_secret_file.is_some()),
            ("retry_on", self.retry_on.is_some()),
            ("dead_on", self.dead_on.is_some()),
            ("bitrix_domain", self.bitrix_domain.is_some()),
            ("bitrix_member_id", self.bitrix_member_id.is_some()),
            ("application_token", self.application_token.is_some()),
            (
                "application_token_file",
                self.application_token_file.is_some(),
            ),
            ("event_handler_id", self.event_handler_id.is_some()),
        ]
    }
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
            .field("path", &self.path)
            .field("url", &self.url.as_deref().map(redact_url))
            .field("format", &self.format)
            .field("headers", &self.headers.as_ref().map(RedactedValues))
            .field("signing_secret", &self.signing_secret)
            .field("signing_secret_file", &self.signing_secret_file)
            .field("retry_on", &self.retry_on)
            .field("dead_on", &self.dead_on)
            .field("bitrix_domain", &self.bitrix_domain)
            .field("bitrix_member_id", &self.bitrix_member_id)
            .field("application_token", &self.application_token)
            .field("application_token_file", &self.application_token_file)
            .field("event_handler_id", &self.event_handler_id)
            .field("command", &self.command)
            .field("permanent_exit_codes", &self.permanent_exit_codes)
            .field("env", &self.env.as_ref().map(RedactedValues))
            .field("working_dir", &self.working_dir)
            // Option values may be credentials (a password in a URL): keys only.
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
