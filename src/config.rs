//! Configuration: the TOML file, `B24EVENTD_*` overrides, defaults, validation, client secrets.
//!
//! Loading is two steps. [`load`] reads the file, layers built-in defaults < TOML < environment
//! (`B24EVENTD_PORTALS__MAIN__CLIENT_SECRET` sets `portals.main.client_secret`) with figment and
//! deserializes a [`RawConfig`]; [`validate`] (pure, no I/O) turns that into a typed [`Config`] or
//! one [`ConfigError`] naming the file and the exact key. Secrets are read later, when a portal
//! client is built, by [`resolve_secret`].

use figment::providers::Format;
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The environment variable that names the config file.
pub const CONFIG_ENV: &str = "B24EVENTD_CONFIG";
/// The prefix of environment variables that override config keys (`__` separates nesting).
pub const ENV_PREFIX: &str = "B24EVENTD_";
/// Variables with [`ENV_PREFIX`] that are not config keys (used by the CLI itself).
pub const IGNORED_ENV: &[&str] = &["B24EVENTD_CONFIG", "B24EVENTD_LOG"];

const LOCAL_CONFIG: &str = "b24eventd.toml";
const SYSTEM_CONFIG: &str = "/etc/b24eventd/config.toml";
const ENV_SOURCE: &str = "environment variable";

const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_JOURNAL_FILE: &str = "journal.db";
const DEFAULT_JOURNAL_FALLBACK: &str = "./b24eventd.db";
const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
const DEFAULT_PRUNE_SCHEDULE: &str = "0 30 3 * * *";
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";
const DEFAULT_OAUTH_TOKEN_URL: &str = "https://oauth.bitrix.info/oauth/token/";
const DEFAULT_BATCH_SIZE: u32 = 50;
const MAX_BATCH_SIZE: u32 = 1000;
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_BURST: u32 = 50;
const DEFAULT_PER_SECOND: f64 = 2.0;
/// Half the portal's bucket: the rest is left to the other integrations of the account.
const DEFAULT_SHARE: f64 = 0.5;
/// `LoadLimiter::$limitTime` of the rest module: 420 s per method per 10 minutes unless the
/// plan sets `rest_load_limiter_seconds` (the docs' older example said 480).
const DEFAULT_OPERATING_BUDGET: Duration = Duration::from_secs(420);
/// How slowly an idle portal is polled at most (when `poll_interval` is shorter).
const DEFAULT_IDLE_POLL_MAX: Duration = Duration::from_secs(30);
const DEFAULT_MAX_UNSETTLED: u32 = 5000;
const DEFAULT_ERROR_LANE_SCHEDULE: &str = "0 */10 * * * *";
const DEFAULT_ORPHAN_SWEEP_SCHEDULE: &str = "0 */5 * * * *";
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_SINK_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_SINK_CONCURRENCY: usize = 4;
const MAX_SINK_CONCURRENCY: usize = 256;
const DEFAULT_MAX_ATTEMPTS: u32 = 12;
const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(600);

/// Every sink `type`, quoted, for error messages.
fn sink_types() -> String {
    ["file", "http", "exec"]
        .into_iter()
        .chain(crate::sinks::OPTION_TYPES.iter().map(|(kind, _)| *kind))
        .map(|kind| format!("{kind:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}
/// Environment variables an exec sink sets itself for every event; `env` cannot set them.
pub const EXEC_EVENT_ENV: [&str; 4] = ["B24_EVENT_ID", "B24_EVENT", "B24_PORTAL", "B24_ATTEMPT"];

// ---------------------------------------------------------------------------------------------
// The typed configuration
// ---------------------------------------------------------------------------------------------

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub journal: JournalConfig,
    pub admin: AdminConfig,
    /// How long `run` waits for in-flight work after SIGTERM.
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
    /// `[alerts]`; `None` when the section is absent.
    pub alerts: Option<AlertsConfig>,
    pub portals: BTreeMap<String, PortalConfig>,
    pub sinks: BTreeMap<String, SinkConfig>,
    /// The file this configuration was read from.
    pub source: PathBuf,
}

/// `log_format`: how `run` writes its log to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    #[default]
    Text,
    /// One JSON object per line, fields as keys: for journald or Loki.
    Json,
}

/// `[alerts]`: conditions that send an alert envelope to a sink, once when they start and once
/// when they end.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertsConfig {
    /// The `[sinks.NAME]` alerts go to (whatever its `events` route).
    pub sink: String,
    /// How often the conditions are checked.
    pub check_interval: Duration,
    /// Unsettled events of a portal above this for `unsettled_for`; `None`: not watched.
    pub unsettled_above: Option<u64>,
    pub unsettled_for: Duration,
    /// Any new dead delivery.
    pub on_dead: bool,
    /// A portal failing (every round an error) for this long.
    pub portal_failing_for: Option<Duration>,
    /// The oldest pending delivery waiting longer than this.
    pub oldest_pending_older_than: Option<Duration>,
    /// The journal (with its WAL) above this many bytes.
    pub journal_larger_than: Option<u64>,
}

/// `[journal]`.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalConfig {
    /// Default: `$STATE_DIRECTORY/journal.db`, else `./b24eventd.db`.
    pub path: PathBuf,
    /// Settled events older than this are pruned.
    pub retention: Duration,
    /// Cron with seconds (6 fields), e.g. `0 30 3 * * *`.
    pub prune_schedule: String,
    pub synchronous: Synchronous,
}

/// SQLite `PRAGMA synchronous` for the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// fsync on every commit: survives power loss (the default).
    Full,
    /// WAL fsync at checkpoints only: survives a process crash, not a power cut.
    Normal,
}

impl Synchronous {
    /// The value as written in the config and in `PRAGMA synchronous`.
    pub fn as_str(self) -> &'static str {
        match self {
            Synchronous::Full => "full",
            Synchronous::Normal => "normal",
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None` (`listen = ""`) turns it off.
    pub listen: Option<SocketAddr>,
    /// A `listen` address other than loopback is refused unless this is set.
    pub allow_remote: bool,
}

/// `[portals.NAME]`: one Bitrix24 portal and the local application used to talk to it.
#[derive(Debug, Clone, PartialEq)]
pub struct PortalConfig {
    pub name: String,
    /// The REST base (`https://example.bitrix24.com/rest/`), always ending with `/`.
    pub client_endpoint: String,
    pub oauth_token_url: String,
    pub client_id: String,
    /// Where the client secret comes from; read with [`resolve_secret`].
    pub client_secret: SecretSource,
    pub auth_connector: Option<String>,
    /// Exact event names (upper case, no duplicates) the portal's offline bindings should cover.
    pub events: Vec<String>,
    pub mode: Mode,
    pub batch_size: u32,
    pub poll_interval: Duration,
    /// An idle portal is polled ever more slowly, from `poll_interval` up to this.
    pub idle_poll_max: Duration,
    pub rate_limit: RateLimit,
    pub max_unsettled: u32,
    pub error_lane_schedule: String,
    pub orphan_sweep_schedule: String,
    pub request_timeout: Duration,
    /// `[portals.NAME.enrich]`: which entity to read for which events, in key order (the first
    /// rule whose glob matches an event applies).
    pub enrich: Vec<EnrichRule>,
}

/// One `[portals.NAME.enrich]` entry: events matching `events` (a glob) get the entity `getter`
/// reads attached to their envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrichRule {
    pub events: String,
    pub getter: crate::bitrix::entities::Getter,
}

impl PortalConfig {
    /// The getter for `event`, if an enrich rule matches it.
    pub fn getter_for(&self, event: &str) -> Option<crate::bitrix::entities::Getter> {
        self.enrich
            .iter()
            .find(|rule| crate::sinks::route::glob_match(&rule.events, event))
            .map(|rule| rule.getter)
    }
}

/// Where a portal's client secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `client_secret = "..."` in the file or `B24EVENTD_PORTALS__<NAME>__CLIENT_SECRET`.
    Inline(Secret),
    /// `client_secret_file = "/path"`.
    File(PathBuf),
    /// Neither was given: a file of this name in `$CREDENTIALS_DIRECTORY` (systemd
    /// `LoadCredential=<portal>.client_secret:...`).
    Credential(String),
}

/// A secret string. `Debug` and `Display` print `[redacted]`; only [`Secret::expose`] shows it.
/// Making one registers it with [`crate::redact`], so no log line or output shows it either.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        let secret = s.into();
        crate::redact::register(&secret);
        Secret(secret)
    }

    /// The secret itself: for building a request, never for a log line or an error message.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

/// The portal's leaky bucket (`burst` requests at once, refilled at `per_second`) and the
/// fraction of it this daemon may use: the bucket is counted per account and source IP, so other
/// integrations on the same host draw from it too.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub burst: u32,
    pub per_second: f64,
    /// In (0, 1]: the client-side bucket is `burst * share` requests refilled at
    /// `per_second * share`.
    pub share: f64,
    /// Server time a method may use per 10 minutes (420 s on the cloud unless the plan says
    /// otherwise; `batch` itself counts at half its time): requests carry no more calls of a
    /// method than its time left pays for, and a method pauses at 90% of it.
    pub operating_budget: Duration,
}

impl RateLimit {
    /// The bucket the client keeps: this daemon's share of the portal's (at least one request).
    pub fn client_bucket(&self) -> (u32, f64) {
        let burst = (f64::from(self.burst) * self.share).floor().max(1.0) as u32;
        (burst, self.per_second * self.share)
    }
}

/// How events are taken from the portal's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `event.offline.get` with `clear=0`, settled later by `clear`/`error` (needs the plan
    /// feature `rest_offline_extended`).
    Reserve,
    /// `event.offline.get` with `clear=1`: the portal deletes the events as it answers, so a
    /// response lost in transit loses them. For plans without `rest_offline_extended`.
    FetchDelete,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Reserve => "reserve",
            Mode::FetchDelete => "fetch-delete",
        }
    }
}

/// `[sinks.NAME]`: one destination and the events routed to it.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    pub name: String,
    pub route: crate::sinks::Route,
    /// Bound on one delivery attempt.
    pub timeout: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    pub retry: RetryPolicy,
    pub kind: SinkKind,
}

/// `[sinks.NAME.retry]`: exponential backoff between attempts, then dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first one included; after the last failure the event is dead.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

/// The type-specific part of a sink.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    File(FileSinkConfig),
    Http(HttpSinkConfig),
    Exec(ExecSinkConfig),
    Amqp(crate::sinks::amqp::AmqpSinkConfig),
    Redis(crate::sinks::redis::RedisSinkConfig),
    Mqtt(crate::sinks::mqtt::MqttSinkConfig),
    Nats(crate::sinks::nats::NatsSinkConfig),
    Postgres(crate::sinks::postgres::PostgresSinkConfig),
}

impl SinkKind {
    /// The `type` as written in the config.
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkKind::File(_) => "file",
            SinkKind::Http(_) => "http",
            SinkKind::Exec(_) => "exec",
            SinkKind::Amqp(_) => "amqp",
            SinkKind::Redis(_) => "redis",
            SinkKind::Mqtt(_) => "mqtt",
            SinkKind::Nats(_) => "nats",
            SinkKind::Postgres(_) => "postgres",
        }
    }
}

/// `type = "file"`: append JSON lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSinkConfig {
    pub path: PathBuf,
}

/// `type = "http"`: POST each envelope.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpSinkConfig {
    /// May carry userinfo; print it with [`redact_url`].
    pub url: String,
    pub format: HttpFormat,
    /// Extra request headers; values may be credentials (`Authorization`), so `Debug` hides them.
    pub headers: BTreeMap<String, String>,
    /// `signing_secret` / `signing_secret_file`: Standard Webhooks signing when set (an inline
    /// secret is already checked to be well-formed; a file is read by [`resolve_http_secrets`]).
    pub signing_secret: Option<SecretSource>,
    /// `retry_on` / `dead_on`.
    pub statuses: StatusOverrides,
}

impl fmt::Debug for HttpSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSinkConfig")
            .field("url", &redact_url(&self.url))
            .field("format", &self.format)
            .field("headers", &RedactedValues(&self.headers))
            .field("signing_secret", &self.signing_secret)
            .field("statuses", &self.statuses)
            .finish()
    }
}

/// `retry_on` / `dead_on` of an http sink: status codes whose default class (2xx delivered;
/// 408, 429, 5xx retried; anything else dead) is overridden. Never both for one code; no 2xx in
/// `dead_on`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusOverrides {
    pub retry_on: Vec<u16>,
    pub dead_on: Vec<u16>,
}

/// `format = "bitrix-form"`: what goes into the body besides the event (the `auth[]` of one
/// portal and the handler id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitrixFormConfig {
    /// `auth[domain]`: `bitrix_domain`, default the host of the routed portal's client_endpoint.
    pub domain: String,
    /// `auth[client_endpoint]`: `https://<bitrix_domain>/rest/` when `bitrix_domain` is set,
    /// else the routed portal's client_endpoint.
    pub client_endpoint: String,
    /// `auth[server_endpoint]`: the origin of the portal's oauth_token_url + `/rest/`.
    pub server_endpoint: String,
    /// `auth[member_id]`: `bitrix_member_id`.
    pub member_id: String,
    /// `auth[application_token]`: `application_token`, `application_token_file`, or the
    /// systemd credential `<sink>.application_token`; read with [`resolve_http_secrets`].
    pub application_token: SecretSource,
    /// `event_handler_id`, default 0.
    pub event_handler_id: u64,
}

/// `type = "exec"`: run a program per event with the envelope on stdin.
#[derive(Clone, PartialEq, Eq)]
pub struct ExecSinkConfig {
    /// argv as configured: the program (a path, or a name looked up on `PATH` when the sink is
    /// built) and its arguments. Never run through a shell.
    pub command: Vec<String>,
    /// Exit codes that make the event dead for this sink at once (never 0).
    pub permanent_exit_codes: Vec<i32>,
    /// Extra environment variables; values may be credentials, so `Debug` hides them.
    pub env: BTreeMap<String, String>,
    /// The program's working directory; default: the daemon's.
    pub working_dir: Option<PathBuf>,
}

impl fmt::Debug for ExecSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecSinkConfig")
            .field("command", &self.command)
            .field("permanent_exit_codes", &self.permanent_exit_codes)
            .field("env", &RedactedValues(&self.env))
            .field("working_dir", &self.working_dir)
            .finish()
    }
}

/// The body an http sink posts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpFormat {
    /// The envelope as one JSON object.
    Json,
    /// The form-encoded body a Bitrix24 outbound webhook would have posted.
    BitrixForm(BitrixFormConfig),
}

impl HttpFormat {
    /// The `format` as written in the config.
    pub fn as_str(&self) -> &'static str {
        match self {
            HttpFormat::Json => "json",
            HttpFormat::BitrixForm(_) => "bitrix-form",
        }
    }
}

/// Map keys (header or variable names) with their values hidden, for `Debug`.
struct RedactedValues<'a>(&'a BTreeMap<String, String>);

impl fmt::Debug for RedactedValues<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "[redacted]")))
            .finish()
    }
}

/// `url` with any `user:password@` removed, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if !parsed.username().is_empty() || parsed.password().is_some() {
                let _ = parsed.set_username("");
                let _ = parsed.set_password(None);
            }
            parsed.to_string()
        }
        // Not a URL: drop everything up to an `@` that could be userinfo.
        Err(_) => match (url.find("://"), url.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                format!("{}{}", &url[..scheme_end + 3], &url[at + 1..])
            }
            _ => url.to_string(),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A configuration problem: the file (or environment variable) and the exact key it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {}{message}", key_prefix(.key))]
pub struct ConfigError {
    /// The config file, a secret file, or `environment variable B24EVENTD_...`.
    pub file: String,
    /// Dotted key path (`portals.main.batch_size`, `sinks.erp.events[0]`); empty for a syntax
    /// error or an unreadable file.
    pub key: String,
    pub message: String,
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("{key}: ")
    }
}

impl ConfigError {
    pub fn new(
        file: impl Into<String>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            file: file.into(),
            key: key.into(),
            message: message.into(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The raw (deserialized, unvalidated) configuration
// ---------------------------------------------------------------------------------------------

/// The config as deserialized from TOML + environment, before defaults and checks.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub journal: RawJournal,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default, with = "humantime_serde")]
    pub shutdown_timeout: Option<Duration>,
    pub log_format: Option<String>,
    pub alerts: Option<RawAlerts>,
    #[serde(default)]
    pub portals: BTreeMap<String, RawPortal>,
    #[serde(default)]
    pub sinks: BTreeMap<String, RawSink>,
    /// `$STATE_DIRECTORY` as seen by [`load`]; the default journal directory. Not a config key.
    #[serde(skip)]
    pub state_directory: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJournal {
    pub path: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub retention: Option<Duration>,
    pub prune_schedule: Option<String>,
    pub synchronous: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    pub sink: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub check_interval: Option<Duration>,
    pub unsettled_above: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub unsettled_for: Option<Duration>,
    pub on_dead: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub portal_failing_for: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub oldest_pending_older_than: Option<Duration>,
    pub journal_larger_than: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
    pub allow_remote: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPortal {
    pub client_endpoint: Option<String>,
    pub oauth_token_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret: Option<Secret>,
    pub client_secret_file: Option<PathBuf>,
    pub auth_connector: Option<String>,
    pub events: Option<Vec<String>>,
    pub mode: Option<String>,
    pub batch_size: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub idle_poll_max: Option<Duration>,
    pub rate_limit: Option<RawRateLimit>,
    pub max_unsettled: Option<u32>,
    pub error_lane_schedule: Option<String>,
    pub orphan_sweep_schedule: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Event glob → getter method (`"ONCRMDEAL*" = "crm.deal.get"`).
    pub enrich: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub burst: Option<u32>,
    pub per_second: Option<f64>,
    pub share: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    pub operating_budget: Option<Duration>,
}

/// The keys of `[sinks.NAME]`: the common ones and those of the `file`, `http` and `exec` types by
/// name (which ones are allowed is checked per `type`); every other key lands in `options`, which
/// the broker and database sink types read into their own typed config ([`SinkOptions`]).
#[derive(Clone, Default, Deserialize)]
pub struct RawSink {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub events: Option<Vec<String>>,
    pub portals: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    pub concurrency: Option<usize>,
    pub retry: Option<RawRetry>,
    pub path: Option<PathBuf>,
    pub url: Option<String>,
    pub format: Option<String>,
    pub headers: Option<BTreeMap<String, String>>,
    pub signing_secret: Option<Secret>,
    pub signing_secret_file: Option<PathBuf>,
    pub retry_on: Option<Vec<i64>>,
    pub dead_on: Option<Vec<i64>>,
    pub bitrix_domain: Option<String>,
    pub bitrix_member_id: Option<String>,
    pub application_token: Option<Secret>,
    pub application_token_file: Option<PathBuf>,
    pub event_handler_id: Option<u64>,
    pub command: Option<Vec<String>>,
    pub permanent_exit_codes: Option<Vec<i32>>,
    pub env: Option<BTreeMap<String, String>>,
    pub working_dir: Option<PathBuf>,
    /// Keys not named above, for the sink types that define their own ([`SinkOptions`]).
    #[serde(flatten)]
    pub options: BTreeMap<String, Value>,
}

impl RawSink {
    /// The `file`/`http`/`exec` keys that are set, `url` excepted (most sink types have one).
    fn named_type_keys(&self) -> Vec<&'static str> {
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
    fn http_only_keys(&self) -> [(&'static str, bool); 11] {
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

/// The type-specific keys of one `[sinks.NAME]` of a type that defines its own config (`redis`,
/// `nats`, ...): `url` and every key `RawSink` does not name. A sink module reads them into its
/// typed config with [`SinkOptions::parse`] and reports problems with [`SinkOptions::err`].
#[derive(Clone)]
pub struct SinkOptions {
    file: String,
    sink: String,
    kind: &'static str,
    values: Dict,
}

impl SinkOptions {
    /// The `[sinks.NAME]` these options belong to.
    pub fn sink_name(&self) -> &str {
        &self.sink
    }

    /// The dotted path of one of these keys, `sinks.NAME.key`.
    pub fn key(&self, key: &str) -> String {
        format!("sinks.{}.{key}", self.sink)
    }

    /// A duration key of this sink: `default` when unset, else the value, which must lie in
    /// the key's [`DurationRange`].
    pub fn duration(
        &self,
        key: &str,
        value: Option<Duration>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        match duration_problem(&self.key(key), value) {
            Some(problem) => Err(self.err(key, problem)),
            None => Ok(value),
        }
    }

    /// An error about `key` (a key of this sink, without the `sinks.NAME.` prefix).
    pub fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::new(&self.file, self.key(key), message)
    }

    /// Reads the options into `T`, which should be `#[serde(deny_unknown_fields)]` so that a
    /// misspelt key is named. Messages never echo a value (a URL may carry a password).
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        use figment::error::Kind;
        let error = match Value::from(self.values.clone()).deserialize::<T>() {
            Ok(parsed) => return Ok(parsed),
            Err(e) => e
                .into_iter()
                .next()
                .unwrap_or_else(|| figment::Error::from("invalid value".to_string())),
        };
        let mut path = error.path.clone();
        let message = match &error.kind {
            Kind::UnknownField(field, expected) => {
                push_leaf(&mut path, field);
                format!(
                    "not a key of a {:?} sink; its keys: {}",
                    self.kind,
                    expected.join(", ")
                )
            }
            Kind::MissingField(field) => {
                push_leaf(&mut path, field);
                "missing required key".to_string()
            }
            Kind::InvalidType(_, expected) | Kind::InvalidValue(_, expected) => {
                format!("invalid value, expected {expected}")
            }
            _ => "invalid value".to_string(),
        };
        Err(self.err(&render_key(&path), message))
    }
}

impl fmt::Debug for SinkOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkOptions")
            .field("sink", &self.sink)
            .field("kind", &self.kind)
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub max_attempts: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub initial_backoff: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub max_backoff: Option<Duration>,
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// The config file to use when none is given on the command line: `$B24EVENTD_CONFIG`, then
/// `./b24eventd.toml` if it exists, then `/etc/b24eventd/config.toml`.
pub fn default_config_path() -> PathBuf {
    choose_config_path(
        std::env::var_os(CONFIG_ENV),
        Path::new(LOCAL_CONFIG).is_file(),
    )
}

fn choose_config_path(from_env: Option<OsString>, local_exists: bool) -> PathBuf {
    match from_env {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ if local_exists => PathBuf::from(LOCAL_CONFIG),
        _ => PathBuf::from(SYSTEM_CONFIG),
    }
}

/// Reads `path`, applies `B24EVENTD_*` overrides from the process environment and validates.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let env: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    load_with_env(path, &env)
}

/// [`load`] with an explicit environment (`B24EVENTD_*` overrides and `STATE_DIRECTORY`), so
/// tests and tools do not depend on the process environment.
pub fn load_with_env(path: &Path, env: &[(String, String)]) -> Result<Config, ConfigError> {
    let mut raw = load_raw(path, env)?;
    raw.state_directory = env
        .iter()
        .find(|(k, _)| k == "STATE_DIRECTORY")
        // systemd lists several directories separated by ':' when several are configured.
        .and_then(|(_, v)| v.split(':').find(|s| !s.is_empty()))
        .map(PathBuf::from);
    let config = validate(raw, path)?;
    register_credentials(&config);
    Ok(config)
}

/// Registers the credentials a loaded config names with [`crate::redact`], so no log line or
/// output shows them: the userinfo of sink URLs (with the `Basic` credentials an HTTP client
/// makes of it) and the values of http sink headers that carry credentials. Inline secrets
/// register themselves as [`Secret`]s.
fn register_credentials(config: &Config) {
    for sink in config.sinks.values() {
        match &sink.kind {
            SinkKind::Http(http) => {
                register_url_credentials(&http.url);
                for (name, value) in &http.headers {
                    if crate::redact::is_credential_header(name) {
                        crate::redact::register(value);
                        // `Bearer TOKEN`, `Basic CREDENTIALS`: the credential on its own too.
                        if let Some((_, credential)) = value.trim().split_once(' ') {
                            crate::redact::register(credential.trim());
                        }
                    }
                }
            }
            SinkKind::Amqp(c) => register_url_credentials(&c.url),
            SinkKind::Redis(c) => register_url_credentials(&c.url),
            SinkKind::Mqtt(c) => register_url_credentials(&c.url),
            SinkKind::Postgres(c) => register_url_credentials(&c.url),
            // Its token or password is a `Secret`; files and programs have no credentials here.
            SinkKind::Nats(_) | SinkKind::File(_) | SinkKind::Exec(_) => {}
        }
    }
}

/// The userinfo of `url` with [`crate::redact`]: as written and decoded.
fn register_url_credentials(url: &str) {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return;
    };
    // Userinfo is percent-encoded; a `+` in it is a plus, not a space.
    let decode = |text: &str| crate::bitrix::form::percent_decode(&text.replace('+', "%2B"));
    let user = parsed.username();
    if let Some(password) = parsed.password() {
        crate::redact::register(password);
        crate::redact::register_credentials(&decode(user), &decode(password));
    } else if !user.is_empty() {
        crate::redact::register(user);
        crate::redact::register_credentials(&decode(user), "");
    }
}

fn load_raw(path: &Path, env: &[(String, String)]) -> Result<RawConfig, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        let message = if e.kind() == std::io::ErrorKind::NotFound {
            "config file not found (pass -c/--config or set B24EVENTD_CONFIG)".to_string()
        } else {
            format!("cannot read the config file: {e}")
        };
        ConfigError::new(&file, "", message)
    })?;

    let toml = figment::providers::Toml::string(&text);
    // Syntax errors first, on their own: they carry a line number but no key.
    toml.data()
        .map_err(|e| ConfigError::new(&file, "", toml_syntax_message(&e.to_string())))?;

    Figment::new()
        .merge(toml)
        .merge(EnvOverrides::from_env(env))
        .extract::<RawConfig>()
        .map_err(|e| figment_error(e, &file))
}

/// The first line of a toml error ("TOML parse error at line 3, column 9") and its explanation,
/// without the quoted source line, which may hold a secret.
fn toml_syntax_message(raw: &str) -> String {
    let mut lines = raw
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty());
    let head = lines.next().unwrap_or("invalid TOML").to_string();
    let rest: Vec<&str> = lines.filter(|l| !l.contains('|')).map(str::trim).collect();
    if rest.is_empty() {
        head
    } else {
        format!("{head}: {}", rest.join("; "))
    }
}

/// `B24EVENTD_A__B__C=v` as `a.b.c = v`, with figment's value syntax for non-string keys.
struct EnvOverrides {
    vars: Vec<(Vec<String>, String)>,
}

/// Keys whose values are always strings: taken verbatim from the environment, never parsed as
/// numbers, booleans or arrays (a client secret of only digits must stay a string).
const STRING_KEYS: &[&str] = &[
    "path",
    "prune_schedule",
    "synchronous",
    "listen",
    "client_endpoint",
    "oauth_token_url",
    "client_id",
    "client_secret",
    "client_secret_file",
    "auth_connector",
    "mode",
    "log_format",
    "sink",
    "journal_larger_than",
    "error_lane_schedule",
    "orphan_sweep_schedule",
    "type",
    "url",
    "format",
    "signing_secret",
    "signing_secret_file",
    "bitrix_domain",
    "bitrix_member_id",
    "application_token",
    "application_token_file",
    "working_dir",
    // Durations: "5" must reach humantime (and fail there for lack of a unit), not be a number.
    "shutdown_timeout",
    "check_interval",
    "unsettled_for",
    "portal_failing_for",
    "oldest_pending_older_than",
    "retention",
    "poll_interval",
    "idle_poll_max",
    "operating_budget",
    "request_timeout",
    "timeout",
    "initial_backoff",
    "max_backoff",
];

impl EnvOverrides {
    fn from_env(env: &[(String, String)]) -> EnvOverrides {
        let vars = env
            .iter()
            .filter(|(k, _)| !IGNORED_ENV.iter().any(|i| i.eq_ignore_ascii_case(k)))
            .filter_map(|(k, v)| {
                let prefix = k.get(..ENV_PREFIX.len())?;
                if !prefix.eq_ignore_ascii_case(ENV_PREFIX) {
                    return None;
                }
                let path: Vec<String> = k[ENV_PREFIX.len()..]
                    .split("__")
                    .map(|s| s.to_ascii_lowercase())
                    .collect();
                if path.iter().any(|s| s.is_empty()) {
                    return None;
                }
                Some((path, v.clone()))
            })
            .collect();
        EnvOverrides { vars }
    }

    fn value(path: &[String], raw: &str) -> Value {
        let leaf = path.last().map(String::as_str).unwrap_or_default();
        let in_map =
            path.len() == 4 && path[0] == "sinks" && matches!(path[2].as_str(), "headers" | "env");
        if in_map || STRING_KEYS.contains(&leaf) {
            Value::from(raw.to_string())
        } else {
            raw.parse()
                .unwrap_or_else(|never: std::convert::Infallible| match never {})
        }
    }
}

fn insert_nested(dict: &mut Dict, path: &[String], value: Value) {
    match path {
        [] => {}
        [leaf] => {
            dict.insert(leaf.clone(), value);
        }
        [head, rest @ ..] => {
            let entry = dict
                .entry(head.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if !matches!(entry, Value::Dict(..)) {
                *entry = Value::from(Dict::new());
            }
            if let Value::Dict(_, inner) = entry {
                insert_nested(inner, rest, value);
            }
        }
    }
}

fn env_var_name(keys: &[&str]) -> String {
    let upper: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
    format!("{ENV_PREFIX}{}", upper.join("__"))
}

impl Provider for EnvOverrides {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_SOURCE).interpolater(|_: &Profile, keys: &[&str]| env_var_name(keys))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        for (path, raw) in &self.vars {
            insert_nested(&mut dict, path, EnvOverrides::value(path, raw));
        }
        Ok(Profile::Default.collect(dict))
    }
}

/// Renders a key path: `portals.main.batch_size`, list items as `events[0]`.
fn render_key<S: AsRef<str>>(path: &[S]) -> String {
    let mut key = String::new();
    for (i, seg) in path.iter().enumerate() {
        let seg = seg.as_ref();
        let is_index = i >= 2
            && !seg.is_empty()
            && seg.bytes().all(|b| b.is_ascii_digit())
            && matches!(
                path[i - 1].as_ref(),
                "events" | "portals" | "command" | "permanent_exit_codes" | "retry_on" | "dead_on"
            );
        if is_index {
            key.push_str(&format!("[{seg}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(seg);
        }
    }
    key
}

/// Keys whose values must never be echoed in an error message.
fn is_secret_key(path: &[String]) -> bool {
    let leaf = path.last().map(String::as_str).unwrap_or_default();
    matches!(
        leaf,
        "client_secret" | "signing_secret" | "application_token"
    ) || (path.len() >= 3 && path[0] == "sinks" && matches!(path[2].as_str(), "headers" | "env"))
}

/// Appends `field` unless figment already ended the path with it.
fn push_leaf(path: &mut Vec<String>, field: &str) {
    if path.last().map(String::as_str) != Some(field) {
        path.push(field.to_string());
    }
}

fn figment_error(error: figment::Error, file: &str) -> ConfigError {
    use figment::error::Kind;

    let error = error
        .into_iter()
        .next()
        .unwrap_or_else(|| figment::Error::from("invalid config".to_string()));
    let mut path = error.path.clone();
    let secret = is_secret_key(&path);
    let message = match &error.kind {
        Kind::UnknownField(field, expected) => {
            push_leaf(&mut path, field);
            if expected.is_empty() {
                "unknown key".to_string()
            } else {
                format!("unknown key; expected one of: {}", expected.join(", "))
            }
        }
        Kind::MissingField(field) => {
            push_leaf(&mut path, field);
            "missing required key".to_string()
        }
        Kind::DuplicateField(field) => {
            push_leaf(&mut path, field);
            "key given twice".to_string()
        }
        Kind::InvalidType(_, expected) | Kind::InvalidValue(_, expected) if secret => {
            format!("invalid value, expected {expected}")
        }
        Kind::InvalidType(actual, expected) => {
            format!("invalid type: found {actual}, expected {expected}")
        }
        Kind::InvalidValue(actual, expected) => {
            format!("invalid value: found {actual}, expected {expected}")
        }
        Kind::Message(_) if secret => "invalid value".to_string(),
        other => other.to_string(),
    };

    let from_env = error
        .metadata
        .as_ref()
        .is_some_and(|md| md.name == ENV_SOURCE)
        && !matches!(error.kind, Kind::MissingField(_));
    let source = if from_env {
        let keys: Vec<&str> = path.iter().map(String::as_str).collect();
        format!("{ENV_SOURCE} {}", env_var_name(&keys))
    } else {
        file.to_string()
    };
    ConfigError::new(source, render_key(&path), message)
}

// ---------------------------------------------------------------------------------------------
// Duration bounds
// ---------------------------------------------------------------------------------------------

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);
/// The least a duration that "must be longer than 0s" may be.
const NONZERO: Duration = Duration::from_nanos(1);

/// The range one duration key must lie in, and why its upper end is there.
#[derive(Debug, Clone, Copy)]
pub struct DurationRange {
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
pub const DURATION_RANGES: &[DurationRange] = &[
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
pub fn duration_problem(key: &str, value: Duration) -> Option<String> {
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

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// Checks a [`RawConfig`] and fills in defaults. Pure: reads no files and no environment.
pub fn validate(raw: RawConfig, source: &Path) -> Result<Config, ConfigError> {
    let v = Validator {
        file: source.display().to_string(),
    };

    let journal = v.journal(raw.journal, raw.state_directory.as_deref())?;
    let admin = v.admin(raw.admin)?;
    let log_format = match raw.log_format.as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            return Err(v.err(
                "log_format",
                format!("unknown log format {other:?}; use \"text\" or \"json\""),
            ));
        }
    };

    if raw.portals.is_empty() {
        return Err(v.err(
            "portals",
            "at least one portal is required ([portals.NAME])",
        ));
    }
    let mut portals = BTreeMap::new();
    for (name, portal) in raw.portals {
        let portal = v.portal(&name, portal)?;
        portals.insert(name, portal);
    }

    if raw.sinks.is_empty() {
        return Err(v.err("sinks", "at least one sink is required ([sinks.NAME])"));
    }
    let mut sinks = BTreeMap::new();
    for (name, sink) in raw.sinks {
        let sink = v.sink(&name, sink, &portals)?;
        sinks.insert(name, sink);
    }

    v.file_sink_paths(&sinks, &journal.path)?;

    let alerts = match raw.alerts {
        Some(alerts) => Some(v.alerts(alerts, &sinks)?),
        None => None,
    };

    Ok(Config {
        journal,
        admin,
        alerts,
        shutdown_timeout: v.duration(
            "shutdown_timeout",
            raw.shutdown_timeout,
            DEFAULT_SHUTDOWN_TIMEOUT,
        )?,
        log_format,
        portals,
        sinks,
        source: source.to_path_buf(),
    })
}

// ---------------------------------------------------------------------------------------------
// Reload (SIGHUP)
// ---------------------------------------------------------------------------------------------

/// What a reloaded configuration changes about the sinks of a running one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Same name, different settings (routes, retry, type-specific keys...).
    pub changed: Vec<String>,
}

impl SinkChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Compares the sinks of the running config with a reloaded one.
pub fn sink_changes(running: &Config, reloaded: &Config) -> SinkChanges {
    let mut changes = SinkChanges::default();
    for (name, sink) in &reloaded.sinks {
        match running.sinks.get(name) {
            None => changes.added.push(name.clone()),
            Some(old) if old != sink => changes.changed.push(name.clone()),
            Some(_) => {}
        }
    }
    for name in running.sinks.keys() {
        if !reloaded.sinks.contains_key(name) {
            changes.removed.push(name.clone());
        }
    }
    changes
}

/// The keys a reloaded config changes that only take effect after a restart: everything but
/// `[sinks.*]` (the journal, the admin endpoint, the shutdown timeout, and any portal).
pub fn changes_needing_restart(running: &Config, reloaded: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    if running.journal != reloaded.journal {
        keys.push("journal".to_string());
    }
    if running.admin != reloaded.admin {
        keys.push("admin".to_string());
    }
    if running.shutdown_timeout != reloaded.shutdown_timeout {
        keys.push("shutdown_timeout".to_string());
    }
    if running.log_format != reloaded.log_format {
        keys.push("log_format".to_string());
    }
    if running.alerts != reloaded.alerts {
        keys.push("alerts".to_string());
    }
    for (name, portal) in &reloaded.portals {
        if running.portals.get(name) != Some(portal) {
            keys.push(format!("portals.{name}"));
        }
    }
    for name in running.portals.keys() {
        if !reloaded.portals.contains_key(name) {
            keys.push(format!("portals.{name}"));
        }
    }
    keys
}

/// A size such as `500MB`, `2GiB`, `1048576` (bytes; decimal and binary units).
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// Parses a schedule the way the daemon does: cron with a seconds field, exactly 6 fields.
pub fn parse_cron(expr: &str) -> Result<croner::Cron, croner::errors::CronError> {
    use croner::parser::{CronParser, Seconds, Year};
    CronParser::builder()
        .seconds(Seconds::Required)
        .year(Year::Disallowed)
        .build()
        .parse(expr)
}

fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// `host[:port]` of a URL (the port only when it is not the scheme's default).
fn host_of(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    let host = url.host_str()?;
    Some(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    })
}

/// A host name (with an optional port) and nothing else.
fn valid_domain(domain: &str) -> bool {
    !domain.is_empty()
        && !domain.contains(['/', '@', '?', '#', ' '])
        && reqwest::Url::parse(&format!("https://{domain}/"))
            .ok()
            .and_then(|url| host_of(url.as_str()))
            .is_some_and(|parsed| parsed.eq_ignore_ascii_case(domain))
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

struct Validator {
    file: String,
}

impl Validator {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::new(&self.file, key, message)
    }

    /// A duration key: `default` when unset, else the value, which must lie in the key's
    /// [`DurationRange`].
    fn duration(
        &self,
        key: &str,
        value: Option<Duration>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        self.bounded(key, value).map(|d| d.unwrap_or(default))
    }

    /// An optional duration key: the value must lie in the key's [`DurationRange`].
    fn bounded(&self, key: &str, value: Option<Duration>) -> Result<Option<Duration>, ConfigError> {
        let Some(d) = value else { return Ok(None) };
        match duration_problem(key, d) {
            Some(problem) => Err(self.err(key, problem)),
            None => Ok(Some(d)),
        }
    }

    fn schedule(
        &self,
        key: &str,
        value: Option<String>,
        default: &str,
    ) -> Result<String, ConfigError> {
        let expr = value.unwrap_or_else(|| default.to_string());
        let fields = expr.split_whitespace().count();
        let problem = if fields != 6 && !expr.trim_start().starts_with('@') {
            format!("{fields} field{}", if fields == 1 { "" } else { "s" })
        } else {
            match parse_cron(&expr) {
                // A schedule that parses can still name a day no month has (`0 0 0 31 2 *`):
                // it would be accepted and never run.
                Ok(cron) => match cron.find_next_occurrence(&chrono::Utc::now(), false) {
                    Ok(_) => return Ok(expr),
                    Err(_) => {
                        "it never fires: no date matches its day and month fields".to_string()
                    }
                },
                Err(e) => lowercase_first(e.to_string().trim_end_matches('.')),
            }
        };
        Err(self.err(
            key,
            format!(
                "invalid cron schedule {expr:?} ({problem}); expected 6 fields: sec min hour day month weekday, e.g. {default:?}"
            ),
        ))
    }

    /// Two file sinks appending to one file would interleave and rotate each other's output,
    /// and a file sink aimed at the journal would corrupt it: both are refused. Paths are
    /// compared as written with `.` and repeated slashes dropped, and, where they exist, after
    /// resolving symlinks.
    fn file_sink_paths(
        &self,
        sinks: &BTreeMap<String, SinkConfig>,
        journal: &Path,
    ) -> Result<(), ConfigError> {
        fn same_file(a: &Path, b: &Path) -> bool {
            a.components().eq(b.components())
                || matches!(
                    (std::fs::canonicalize(a), std::fs::canonicalize(b)),
                    (Ok(a), Ok(b)) if a == b
                )
        }
        let mut journal_files = vec![journal.to_path_buf()];
        for suffix in ["-wal", "-shm", "-journal", ".lock"] {
            let mut name = journal.as_os_str().to_owned();
            name.push(suffix);
            journal_files.push(PathBuf::from(name));
        }
        let mut seen: Vec<(&str, &Path)> = Vec::new();
        for (name, sink) in sinks {
            let SinkKind::File(file) = &sink.kind else {
                continue;
            };
            let key = format!("sinks.{name}.path");
            if let Some((other, _)) = seen.iter().find(|(_, path)| same_file(path, &file.path)) {
                return Err(self.err(
                    key,
                    format!(
                        "{} is already the path of sinks.{other}; two file sinks cannot share a file (route both to one sink instead)",
                        file.path.display()
                    ),
                ));
            }
            if journal_files.iter().any(|j| same_file(j, &file.path)) {
                return Err(self.err(
                    key,
                    format!(
                        "{} is the journal's file ({}); a file sink must write elsewhere",
                        file.path.display(),
                        journal.display()
                    ),
                ));
            }
            seen.push((name, &file.path));
        }
        Ok(())
    }

    fn non_empty(&self, key: &str, value: Option<String>) -> Result<String, ConfigError> {
        match value {
            None => Err(self.err(key, "missing required key")),
            Some(s) if s.trim().is_empty() => Err(self.err(key, "must not be empty")),
            Some(s) => Ok(s.trim().to_string()),
        }
    }

    fn http_url(&self, key: &str, value: &str) -> Result<reqwest::Url, ConfigError> {
        let url = reqwest::Url::parse(value)
            .map_err(|e| self.err(key, format!("invalid URL {:?}: {e}", redact_url(value))))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
            return Err(self.err(
                key,
                format!(
                    "must be an http:// or https:// URL, got {:?}",
                    redact_url(value)
                ),
            ));
        }
        Ok(url)
    }

    fn journal(
        &self,
        raw: RawJournal,
        state_directory: Option<&Path>,
    ) -> Result<JournalConfig, ConfigError> {
        let path = match raw.path {
            Some(p) if p.as_os_str().is_empty() => {
                return Err(self.err("journal.path", "must not be empty"));
            }
            Some(p) => p,
            None => match state_directory {
                Some(dir) => dir.join(DEFAULT_JOURNAL_FILE),
                None => PathBuf::from(DEFAULT_JOURNAL_FALLBACK),
            },
        };
        let synchronous = match raw.synchronous.as_deref() {
            None | Some("full") => Synchronous::Full,
            Some("normal") => Synchronous::Normal,
            Some(other) => {
                return Err(self.err(
                    "journal.synchronous",
                    format!("unsupported value {other:?}; supported: \"full\", \"normal\""),
                ));
            }
        };
        Ok(JournalConfig {
            path,
            retention: self.duration("journal.retention", raw.retention, DEFAULT_RETENTION)?,
            prune_schedule: self.schedule(
                "journal.prune_schedule",
                raw.prune_schedule,
                DEFAULT_PRUNE_SCHEDULE,
            )?,
            synchronous,
        })
    }

    fn alerts(
        &self,
        raw: RawAlerts,
        sinks: &BTreeMap<String, SinkConfig>,
    ) -> Result<AlertsConfig, ConfigError> {
        let sink = raw.sink.ok_or_else(|| {
            self.err(
                "alerts.sink",
                "missing required key: the [sinks.NAME] alerts are sent to",
            )
        })?;
        if !sinks.contains_key(&sink) {
            let known: Vec<&str> = sinks.keys().map(String::as_str).collect();
            return Err(self.err(
                "alerts.sink",
                format!("unknown sink {sink:?}; configured: {}", known.join(", ")),
            ));
        }
        if raw.unsettled_above == Some(0) {
            return Err(self.err("alerts.unsettled_above", "must be at least 1"));
        }
        let journal_larger_than = match raw.journal_larger_than {
            None => None,
            Some(text) => Some(parse_bytes(&text).ok_or_else(|| {
                self.err(
                    "alerts.journal_larger_than",
                    format!("invalid size {text:?}; use e.g. \"500MB\" or \"2GiB\""),
                )
            })?),
        };
        Ok(AlertsConfig {
            sink,
            check_interval: self.duration(
                "alerts.check_interval",
                raw.check_interval,
                Duration::from_secs(30),
            )?,
            unsettled_above: raw.unsettled_above,
            unsettled_for: self.duration(
                "alerts.unsettled_for",
                raw.unsettled_for,
                Duration::from_secs(5 * 60),
            )?,
            on_dead: raw.on_dead.unwrap_or(true),
            portal_failing_for: self
                .bounded("alerts.portal_failing_for", raw.portal_failing_for)?
                .or(Some(Duration::from_secs(10 * 60))),
            oldest_pending_older_than: self.bounded(
                "alerts.oldest_pending_older_than",
                raw.oldest_pending_older_than,
            )?,
            journal_larger_than,
        })
    }

    fn admin(&self, raw: RawAdmin) -> Result<AdminConfig, ConfigError> {
        let listen = raw
            .listen
            .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.to_string());
        let allow_remote = raw.allow_remote.unwrap_or(false);
        if listen.trim().is_empty() {
            return Ok(AdminConfig {
                listen: None,
                allow_remote,
            });
        }
        let addr = listen.trim().parse::<SocketAddr>().map_err(|_| {
            self.err(
                "admin.listen",
                format!("invalid address {listen:?}; expected IP:port such as \"127.0.0.1:9464\", or \"\" to turn the endpoint off"),
            )
        })?;
        if !addr.ip().is_loopback() && !allow_remote {
            return Err(self.err(
                "admin.listen",
                format!("{addr} is not a loopback address, and the endpoint has no authentication; listen on 127.0.0.1 or [::1] (and put a proxy in front), or set admin.allow_remote = true to serve other hosts"),
            ));
        }
        Ok(AdminConfig {
            listen: Some(addr),
            allow_remote,
        })
    }

    fn portal(&self, name: &str, raw: RawPortal) -> Result<PortalConfig, ConfigError> {
        let k = |key: &str| format!("portals.{name}.{key}");
        if !valid_name(name) {
            return Err(self.err(
                format!("portals.{name}"),
                "invalid portal name; use lowercase letters, digits, '_' and '-'",
            ));
        }

        let client_endpoint = self.client_endpoint(&k("client_endpoint"), raw.client_endpoint)?;
        let oauth_token_url = raw
            .oauth_token_url
            .unwrap_or_else(|| DEFAULT_OAUTH_TOKEN_URL.to_string());
        self.http_url(&k("oauth_token_url"), &oauth_token_url)?;
        let client_id = self.non_empty(&k("client_id"), raw.client_id)?;

        let client_secret = match (raw.client_secret, raw.client_secret_file) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    k("client_secret"),
                    format!(
                        "both client_secret and client_secret_file are set; keep one (the environment variable {} also sets client_secret)",
                        env_var_name(&["portals", name, "client_secret"])
                    ),
                ));
            }
            (Some(secret), None) if secret.expose().trim().is_empty() => {
                return Err(self.err(k("client_secret"), "must not be empty"));
            }
            (Some(secret), None) => {
                check_secret_text(secret.expose(), "client secret")
                    .map_err(|problem| self.err(k("client_secret"), problem))?;
                SecretSource::Inline(secret)
            }
            (None, Some(path)) if path.as_os_str().is_empty() => {
                return Err(self.err(k("client_secret_file"), "must not be empty"));
            }
            (None, Some(path)) => SecretSource::File(path),
            (None, None) => SecretSource::Credential(format!("{name}.client_secret")),
        };

        let auth_connector = match raw.auth_connector {
            Some(s) if s.trim().is_empty() => {
                return Err(self.err(
                    k("auth_connector"),
                    "must not be empty (leave the key out instead)",
                ));
            }
            other => other.map(|s| s.trim().to_string()),
        };

        let events = self.portal_events(&k("events"), raw.events)?;

        let mode = match raw.mode.as_deref() {
            None | Some("reserve") => Mode::Reserve,
            Some("fetch-delete") => Mode::FetchDelete,
            Some(other) => {
                return Err(self.err(
                    k("mode"),
                    format!(
                        "unsupported mode {other:?}; supported: \"reserve\" (needs rest_offline_extended) and \"fetch-delete\""
                    ),
                ));
            }
        };

        let batch_size = raw.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);
        if !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
            return Err(self.err(
                k("batch_size"),
                format!("must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}"),
            ));
        }
        let max_unsettled = raw.max_unsettled.unwrap_or(DEFAULT_MAX_UNSETTLED);
        if max_unsettled < batch_size {
            return Err(self.err(
                k("max_unsettled"),
                format!("must be at least batch_size ({batch_size}), got {max_unsettled}"),
            ));
        }

        let rate = raw.rate_limit.unwrap_or_default();
        let burst = rate.burst.unwrap_or(DEFAULT_BURST);
        if burst < 1 {
            return Err(self.err(k("rate_limit.burst"), "must be at least 1"));
        }
        let per_second = rate.per_second.unwrap_or(DEFAULT_PER_SECOND);
        if !(per_second.is_finite() && per_second > 0.0) {
            return Err(self.err(
                k("rate_limit.per_second"),
                format!("must be greater than 0, got {per_second}"),
            ));
        }

        let share = rate.share.unwrap_or(DEFAULT_SHARE);
        if !(share.is_finite() && share > 0.0 && share <= 1.0) {
            return Err(self.err(
                k("rate_limit.share"),
                format!("must be a fraction greater than 0 and at most 1, got {share}"),
            ));
        }
        let poll_interval = self.duration(
            &k("poll_interval"),
            raw.poll_interval,
            DEFAULT_POLL_INTERVAL,
        )?;
        let idle_poll_max = self
            .bounded(&k("idle_poll_max"), raw.idle_poll_max)?
            .unwrap_or(DEFAULT_IDLE_POLL_MAX.max(poll_interval));
        if idle_poll_max < poll_interval {
            return Err(self.err(
                k("idle_poll_max"),
                format!(
                    "must not be shorter than poll_interval ({}), got {}",
                    humantime::format_duration(poll_interval),
                    humantime::format_duration(idle_poll_max)
                ),
            ));
        }

        let mut enrich = Vec::new();
        for (glob, method) in raw.enrich.unwrap_or_default() {
            let key = format!("{}.{glob:?}", k("enrich"));
            if glob.trim().is_empty() {
                return Err(self.err(key, "the event glob must not be empty"));
            }
            let Some(getter) = crate::bitrix::entities::Getter::from_method(&method) else {
                let known: Vec<&str> = crate::bitrix::entities::Getter::ALL
                    .iter()
                    .map(|g| g.method())
                    .collect();
                return Err(self.err(
                    key,
                    format!("unknown getter {method:?}; supported: {}", known.join(", ")),
                ));
            };
            enrich.push(EnrichRule {
                events: glob.trim().to_ascii_uppercase(),
                getter,
            });
        }

        Ok(PortalConfig {
            name: name.to_string(),
            client_endpoint,
            oauth_token_url,
            client_id,
            client_secret,
            auth_connector,
            events,
            mode,
            batch_size,
            poll_interval,
            idle_poll_max,
            rate_limit: RateLimit {
                burst,
                per_second,
                share,
                operating_budget: self.duration(
                    &k("rate_limit.operating_budget"),
                    rate.operating_budget,
                    DEFAULT_OPERATING_BUDGET,
                )?,
            },
            max_unsettled,
            error_lane_schedule: self.schedule(
                &k("error_lane_schedule"),
                raw.error_lane_schedule,
                DEFAULT_ERROR_LANE_SCHEDULE,
            )?,
            orphan_sweep_schedule: self.schedule(
                &k("orphan_sweep_schedule"),
                raw.orphan_sweep_schedule,
                DEFAULT_ORPHAN_SWEEP_SCHEDULE,
            )?,
            request_timeout: self.duration(
                &k("request_timeout"),
                raw.request_timeout,
                DEFAULT_REQUEST_TIMEOUT,
            )?,
            enrich,
        })
    }

    fn client_endpoint(&self, key: &str, value: Option<String>) -> Result<String, ConfigError> {
        let value = self.non_empty(key, value)?;
        let url = self.http_url(key, &value)?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(self.err(key, "must not have a query string or fragment"));
        }
        let segments: Vec<&str> = url
            .path_segments()
            .map(|s| s.filter(|s| !s.is_empty()).collect())
            .unwrap_or_default();
        let is_webhook = matches!(
            segments.as_slice(),
            ["rest", user, code, ..] if user.bytes().all(|b| b.is_ascii_digit()) && !code.is_empty()
        );
        if is_webhook {
            let portal = url.host_str().unwrap_or("<portal>");
            return Err(self.err(
                key,
                format!(
                    "this is an incoming webhook URL, but the event.* methods reject incoming webhooks (WRONG_AUTH_TYPE); create a local application and configure its client_endpoint (`https://{portal}/rest/`), client_id and client_secret"
                ),
            ));
        }
        let mut endpoint = value;
        if !endpoint.ends_with('/') {
            endpoint.push('/');
        }
        Ok(endpoint)
    }

    fn portal_events(
        &self,
        key: &str,
        value: Option<Vec<String>>,
    ) -> Result<Vec<String>, ConfigError> {
        let list = value.ok_or_else(|| {
            self.err(
                key,
                "missing required key: the event names to receive, e.g. [\"ONCRMDEALUPDATE\"]",
            )
        })?;
        if list.is_empty() {
            return Err(self.err(key, "at least one event name is required"));
        }
        let mut events: Vec<String> = Vec::with_capacity(list.len());
        for (i, event) in list.iter().enumerate() {
            let event = event.trim();
            if event.is_empty() {
                return Err(self.err(format!("{key}[{i}]"), "must not be empty"));
            }
            if event.contains(['*', '?']) {
                return Err(self.err(
                    format!("{key}[{i}]"),
                    format!("{event:?} is a glob; portal events are exact names to subscribe to (globs belong in sinks.NAME.events)"),
                ));
            }
            let event = event.to_ascii_uppercase();
            if !events.contains(&event) {
                events.push(event);
            }
        }
        Ok(events)
    }

    fn sink(
        &self,
        name: &str,
        mut raw: RawSink,
        portals: &BTreeMap<String, PortalConfig>,
    ) -> Result<SinkConfig, ConfigError> {
        let k = |key: &str| format!("sinks.{name}.{key}");
        let named_type_keys = raw.named_type_keys();
        let options = std::mem::take(&mut raw.options);
        if !valid_name(name) {
            return Err(self.err(
                format!("sinks.{name}"),
                "invalid sink name; use lowercase letters, digits, '_' and '-'",
            ));
        }

        if raw.events.as_ref().is_some_and(Vec::is_empty) {
            // An empty list reads as "no events", yet a missing key routes every event: refuse
            // the list rather than guess which was meant.
            return Err(self.err(
                k("events"),
                "an empty list routes nothing; list at least one event name or glob, or leave the key out to route every event",
            ));
        }
        if raw.portals.as_ref().is_some_and(Vec::is_empty) {
            return Err(self.err(
                k("portals"),
                "an empty list routes nothing; list at least one portal, or leave the key out to route every portal",
            ));
        }
        let mut events = Vec::new();
        for (i, glob) in raw
            .events
            .take()
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            if glob.trim().is_empty() {
                return Err(self.err(format!("{}[{i}]", k("events")), "must not be empty"));
            }
            events.push(glob.trim().to_string());
        }
        let mut routed_portals = Vec::new();
        for (i, portal) in raw
            .portals
            .take()
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            if !portals.contains_key(&portal) {
                let known: Vec<&str> = portals.keys().map(String::as_str).collect();
                return Err(self.err(
                    format!("{}[{i}]", k("portals")),
                    format!(
                        "unknown portal {portal:?}; configured portals: {}",
                        known.join(", ")
                    ),
                ));
            }
            routed_portals.push(portal);
        }

        let concurrency = raw.concurrency.unwrap_or(DEFAULT_SINK_CONCURRENCY);
        if !(1..=MAX_SINK_CONCURRENCY).contains(&concurrency) {
            return Err(self.err(
                k("concurrency"),
                format!("must be between 1 and {MAX_SINK_CONCURRENCY}, got {concurrency}"),
            ));
        }

        let retry = raw.retry.take().unwrap_or_default();
        let max_attempts = retry.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if max_attempts < 1 {
            return Err(self.err(k("retry.max_attempts"), "must be at least 1"));
        }
        let initial_backoff = self.duration(
            &k("retry.initial_backoff"),
            retry.initial_backoff,
            DEFAULT_INITIAL_BACKOFF,
        )?;
        let max_backoff = self.duration(
            &k("retry.max_backoff"),
            retry.max_backoff,
            DEFAULT_MAX_BACKOFF,
        )?;
        if initial_backoff > max_backoff {
            return Err(self.err(
                k("retry.initial_backoff"),
                format!(
                    "must not exceed retry.max_backoff ({}), got {}",
                    humantime::format_duration(max_backoff),
                    humantime::format_duration(initial_backoff)
                ),
            ));
        }

        let kind = match raw.kind.as_deref() {
            None => {
                return Err(self.err(
                    k("type"),
                    format!("missing required key; supported types: {}", sink_types()),
                ));
            }
            Some("file") => {
                self.no_options(name, "file", &options)?;
                self.not_for_type(
                    name,
                    "file",
                    &[
                        ("url", raw.url.is_some()),
                        ("command", raw.command.is_some()),
                        ("permanent_exit_codes", raw.permanent_exit_codes.is_some()),
                        ("env", raw.env.is_some()),
                        ("working_dir", raw.working_dir.is_some()),
                    ],
                )?;
                self.not_for_type(name, "file", &raw.http_only_keys())?;
                let path = match raw.path {
                    None => return Err(self.err(k("path"), "missing required key")),
                    Some(p) if p.as_os_str().is_empty() => {
                        return Err(self.err(k("path"), "must not be empty"));
                    }
                    Some(p) => p,
                };
                SinkKind::File(FileSinkConfig { path })
            }
            Some("http") => {
                self.no_options(name, "http", &options)?;
                self.not_for_type(
                    name,
                    "http",
                    &[
                        ("path", raw.path.is_some()),
                        ("command", raw.command.is_some()),
                        ("permanent_exit_codes", raw.permanent_exit_codes.is_some()),
                        ("env", raw.env.is_some()),
                        ("working_dir", raw.working_dir.is_some()),
                    ],
                )?;
                SinkKind::Http(self.http_sink(name, &mut raw, &routed_portals, portals)?)
            }
            Some("exec") => {
                self.no_options(name, "exec", &options)?;
                self.not_for_type(
                    name,
                    "exec",
                    &[("path", raw.path.is_some()), ("url", raw.url.is_some())],
                )?;
                self.not_for_type(name, "exec", &raw.http_only_keys())?;
                SinkKind::Exec(self.exec_sink(
                    name,
                    raw.command,
                    raw.permanent_exit_codes,
                    raw.env,
                    raw.working_dir,
                )?)
            }
            Some(other) => {
                let Some((kind, parse)) = crate::sinks::option_type(other) else {
                    return Err(self.err(
                        k("type"),
                        format!(
                            "unknown sink type {other:?}; supported types: {}",
                            sink_types()
                        ),
                    ));
                };
                let options = self.options(name, kind, &named_type_keys, raw.url, options)?;
                parse(&options)?
            }
        };

        Ok(SinkConfig {
            name: name.to_string(),
            route: crate::sinks::Route {
                events,
                portals: routed_portals,
            },
            timeout: self.duration(&k("timeout"), raw.timeout, DEFAULT_SINK_TIMEOUT)?,
            concurrency,
            retry: RetryPolicy {
                max_attempts,
                initial_backoff,
                max_backoff,
            },
            kind,
        })
    }

    /// The `exec`-only keys of `[sinks.NAME]`.
    fn exec_sink(
        &self,
        name: &str,
        command: Option<Vec<String>>,
        permanent_exit_codes: Option<Vec<i32>>,
        env: Option<BTreeMap<String, String>>,
        working_dir: Option<PathBuf>,
    ) -> Result<ExecSinkConfig, ConfigError> {
        let k = |key: &str| format!("sinks.{name}.{key}");
        let example =
            "e.g. [\"/usr/local/bin/on-deal\", \"--verbose\"] (argv: never run through a shell)";
        let command = match command {
            None => {
                return Err(self.err(
                    k("command"),
                    format!("missing required key: the program and its arguments, {example}"),
                ));
            }
            Some(argv) if argv.is_empty() => {
                return Err(self.err(
                    k("command"),
                    format!("must not be empty: give the program and its arguments, {example}"),
                ));
            }
            Some(argv) => argv,
        };
        if command[0].trim().is_empty() {
            return Err(self.err(
                format!("{}[0]", k("command")),
                "must not be empty: the program to run",
            ));
        }
        if let Some(i) = command.iter().position(|arg| arg.contains('\0')) {
            return Err(self.err(
                format!("{}[{i}]", k("command")),
                "must not contain a NUL character",
            ));
        }

        let permanent_exit_codes = permanent_exit_codes.unwrap_or_default();
        for (i, code) in permanent_exit_codes.iter().enumerate() {
            let key = format!("{}[{i}]", k("permanent_exit_codes"));
            if *code == 0 {
                return Err(self.err(key, "0 means delivered and cannot be a permanent failure"));
            }
            if !(1..=255).contains(code) {
                return Err(self.err(
                    key,
                    format!("must be an exit code between 1 and 255, got {code}"),
                ));
            }
        }

        let env = env.unwrap_or_default();
        for (var, value) in &env {
            let key = format!("{}.{var}", k("env"));
            if var.is_empty() || var.contains(['=', '\0']) {
                return Err(self.err(
                    key,
                    "invalid variable name (empty, or contains '=' or a NUL character)",
                ));
            }
            if EXEC_EVENT_ENV.contains(&var.as_str()) {
                return Err(self.err(
                    key,
                    "this variable is set by the sink for every event and cannot be configured",
                ));
            }
            if value.contains('\0') {
                return Err(self.err(key, "the value must not contain a NUL character"));
            }
        }

        if working_dir
            .as_ref()
            .is_some_and(|dir| dir.as_os_str().is_empty())
        {
            return Err(self.err(
                k("working_dir"),
                "must not be empty (leave the key out instead)",
            ));
        }

        Ok(ExecSinkConfig {
            command,
            permanent_exit_codes,
            env,
            working_dir,
        })
    }

    /// The `http`-only keys of `[sinks.NAME]`.
    fn http_sink(
        &self,
        name: &str,
        raw: &mut RawSink,
        routed_portals: &[String],
        portals: &BTreeMap<String, PortalConfig>,
    ) -> Result<HttpSinkConfig, ConfigError> {
        let k = |key: &str| format!("sinks.{name}.{key}");
        let url = self.non_empty(&k("url"), raw.url.take())?;
        self.http_url(&k("url"), &url)?;
        let signing_secret = self.signing_secret(
            name,
            raw.signing_secret.take(),
            raw.signing_secret_file.take(),
        )?;
        let headers = self.http_headers(
            name,
            raw.headers.take().unwrap_or_default(),
            signing_secret.is_some(),
        )?;
        if let Some(header) = headers
            .keys()
            .find(|h| h.eq_ignore_ascii_case("authorization"))
            && reqwest::Url::parse(&url)
                .is_ok_and(|u| !u.username().is_empty() || u.password().is_some())
        {
            return Err(self.err(
                k(&format!("headers.{header}")),
                format!(
                    "sink {name}: url carries credentials (user:password@, sent as Authorization: Basic) and headers sets Authorization too; keep one"
                ),
            ));
        }
        let statuses = self.status_overrides(name, raw.retry_on.take(), raw.dead_on.take())?;
        let format = match raw.format.as_deref() {
            None | Some("json") => {
                let bitrix_only = [
                    ("bitrix_domain", raw.bitrix_domain.is_some()),
                    ("bitrix_member_id", raw.bitrix_member_id.is_some()),
                    ("application_token", raw.application_token.is_some()),
                    (
                        "application_token_file",
                        raw.application_token_file.is_some(),
                    ),
                    ("event_handler_id", raw.event_handler_id.is_some()),
                ];
                if let Some((key, _)) = bitrix_only.iter().find(|(_, set)| *set) {
                    return Err(self.err(
                        k(key),
                        "only used with format = \"bitrix-form\" (it goes into the form body); remove it or set format = \"bitrix-form\"",
                    ));
                }
                HttpFormat::Json
            }
            Some("bitrix-form") => {
                HttpFormat::BitrixForm(self.bitrix_form(name, raw, routed_portals, portals)?)
            }
            Some(other) => {
                return Err(self.err(
                    k("format"),
                    format!("unsupported format {other:?}; supported: \"json\", \"bitrix-form\""),
                ));
            }
        };
        Ok(HttpSinkConfig {
            url,
            format,
            headers,
            signing_secret,
            statuses,
        })
    }

    /// `headers`: valid names and values, none of those the sink sets itself.
    fn http_headers(
        &self,
        name: &str,
        headers: BTreeMap<String, String>,
        signing: bool,
    ) -> Result<BTreeMap<String, String>, ConfigError> {
        use crate::sinks::standard_webhooks::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP};
        for (header, value) in &headers {
            let key = format!("sinks.{name}.headers.{header}");
            let parsed = reqwest::header::HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| self.err(&key, "invalid header name"))?;
            if matches!(
                parsed.as_str(),
                "idempotency-key" | "content-length" | "host"
            ) {
                return Err(self.err(
                    &key,
                    "this header is set by the sink and cannot be configured",
                ));
            }
            if signing && [HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE].contains(&parsed.as_str())
            {
                return Err(self.err(
                    &key,
                    "this header is set by the sink when signing_secret is set (Standard Webhooks) and cannot be configured",
                ));
            }
            reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                self.err(
                    &key,
                    "invalid header value (control characters or non-ASCII text)",
                )
            })?;
        }
        Ok(headers)
    }

    /// `signing_secret` / `signing_secret_file`; an inline secret must be well-formed.
    fn signing_secret(
        &self,
        name: &str,
        inline: Option<Secret>,
        file: Option<PathBuf>,
    ) -> Result<Option<SecretSource>, ConfigError> {
        let k = |key: &str| format!("sinks.{name}.{key}");
        match (inline, file) {
            (Some(_), Some(_)) => Err(self.err(
                k("signing_secret"),
                format!(
                    "both signing_secret and signing_secret_file are set; keep one (the environment variable {} also sets signing_secret)",
                    env_var_name(&["sinks", name, "signing_secret"])
                ),
            )),
            (Some(secret), None) => {
                crate::sinks::standard_webhooks::parse_secret(secret.expose())
                    .map_err(|problem| self.err(k("signing_secret"), problem))?;
                Ok(Some(SecretSource::Inline(secret)))
            }
            (None, Some(path)) if path.as_os_str().is_empty() => {
                Err(self.err(k("signing_secret_file"), "must not be empty"))
            }
            (None, Some(path)) => Ok(Some(SecretSource::File(path))),
            (None, None) => Ok(None),
        }
    }

    /// `retry_on` / `dead_on`: status codes 100..=599, never in both lists, no 2xx in dead_on.
    fn status_overrides(
        &self,
        name: &str,
        retry_on: Option<Vec<i64>>,
        dead_on: Option<Vec<i64>>,
    ) -> Result<StatusOverrides, ConfigError> {
        let retry_on = self.status_list(&format!("sinks.{name}.retry_on"), retry_on)?;
        let dead_on = self.status_list(&format!("sinks.{name}.dead_on"), dead_on)?;
        for (i, code) in dead_on.iter().enumerate() {
            let key = format!("sinks.{name}.dead_on[{i}]");
            if (200..300).contains(code) {
                return Err(self.err(
                    key,
                    format!(
                        "{code} is a success status: a 2xx answer always means delivered; remove it"
                    ),
                ));
            }
            if retry_on.contains(code) {
                return Err(self.err(
                    key,
                    format!("{code} is also listed in retry_on; a status is either retried or dead, keep it in one list"),
                ));
            }
        }
        Ok(StatusOverrides { retry_on, dead_on })
    }

    fn status_list(&self, key: &str, list: Option<Vec<i64>>) -> Result<Vec<u16>, ConfigError> {
        let mut codes: Vec<u16> = Vec::new();
        for (i, code) in list.unwrap_or_default().into_iter().enumerate() {
            let code = u16::try_from(code)
                .ok()
                .filter(|c| (100..=599).contains(c))
                .ok_or_else(|| {
                    self.err(
                        format!("{key}[{i}]"),
                        format!("must be an HTTP status code between 100 and 599, got {code}"),
                    )
                })?;
            if !codes.contains(&code) {
                codes.push(code);
            }
        }
        Ok(codes)
    }

    /// The `format = "bitrix-form"` keys: one routed portal's `auth[]` and the handler id.
    fn bitrix_form(
        &self,
        name: &str,
        raw: &mut RawSink,
        routed_portals: &[String],
        portals: &BTreeMap<String, PortalConfig>,
    ) -> Result<BitrixFormConfig, ConfigError> {
        let k = |key: &str| format!("sinks.{name}.{key}");
        let portal = match routed_portals {
            [only] => &portals[only],
            [] if portals.len() == 1 => portals.values().next().expect("one portal"),
            _ => {
                let known: Vec<&str> = portals.keys().map(String::as_str).collect();
                return Err(self.err(
                    k("portals"),
                    format!(
                        "a bitrix-form sink posts one portal's auth[] (domain, member_id, application_token), so it must route exactly one portal: set portals = [\"{}\"] and add one sink per portal (configured portals: {})",
                        known.first().copied().unwrap_or("main"),
                        known.join(", ")
                    ),
                ));
            }
        };

        let (domain, client_endpoint) = match raw.bitrix_domain.take() {
            Some(domain) => {
                let domain = domain.trim().to_string();
                if !valid_domain(&domain) {
                    return Err(self.err(
                        k("bitrix_domain"),
                        format!("invalid domain {domain:?}; give the portal's host name without scheme or path, e.g. \"example.bitrix24.com\""),
                    ));
                }
                let endpoint = format!("https://{domain}/rest/");
                (domain, endpoint)
            }
            None => (
                host_of(&portal.client_endpoint).unwrap_or_default(),
                portal.client_endpoint.clone(),
            ),
        };
        let server_endpoint = reqwest::Url::parse(&portal.oauth_token_url)
            .map(|url| format!("{}/rest/", url.origin().ascii_serialization()))
            .unwrap_or_default();

        let member_id = match raw.bitrix_member_id.take() {
            None => {
                return Err(self.err(
                    k("bitrix_member_id"),
                    format!(
                        "missing required key for format = \"bitrix-form\": the member_id of portal {:?} for auth[member_id] (`b24eventd auth status` shows it)",
                        portal.name
                    ),
                ));
            }
            Some(id) if id.trim().is_empty() => {
                return Err(self.err(k("bitrix_member_id"), "must not be empty"));
            }
            Some(id) => id.trim().to_string(),
        };

        let application_token = match (
            raw.application_token.take(),
            raw.application_token_file.take(),
        ) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    k("application_token"),
                    format!(
                        "both application_token and application_token_file are set; keep one (the environment variable {} also sets application_token)",
                        env_var_name(&["sinks", name, "application_token"])
                    ),
                ));
            }
            (Some(token), None) if token.expose().trim().is_empty() => {
                return Err(self.err(k("application_token"), "must not be empty"));
            }
            (Some(token), None) => {
                check_secret_text(token.expose(), "application token")
                    .map_err(|problem| self.err(k("application_token"), problem))?;
                SecretSource::Inline(token)
            }
            (None, Some(path)) if path.as_os_str().is_empty() => {
                return Err(self.err(k("application_token_file"), "must not be empty"));
            }
            (None, Some(path)) => SecretSource::File(path),
            (None, None) => SecretSource::Credential(format!("{name}.application_token")),
        };

        Ok(BitrixFormConfig {
            domain,
            client_endpoint,
            server_endpoint,
            member_id,
            application_token,
            event_handler_id: raw.event_handler_id.take().unwrap_or(0),
        })
    }

    /// Refuses keys that no `file`, `http` or `exec` sink has.
    fn no_options(
        &self,
        sink: &str,
        kind: &str,
        options: &BTreeMap<String, Value>,
    ) -> Result<(), ConfigError> {
        match options.keys().next() {
            Some(key) => Err(self.err(
                format!("sinks.{sink}.{key}"),
                format!("not a key of a {kind:?} sink"),
            )),
            None => Ok(()),
        }
    }

    /// The options of a sink type that defines its own keys: refuses the `file`/`http`/`exec`
    /// keys `RawSink` names (all but `url`) and hands `url` and the rest to the sink module.
    fn options(
        &self,
        sink: &str,
        kind: &'static str,
        named_type_keys: &[&'static str],
        url: Option<String>,
        mut options: BTreeMap<String, Value>,
    ) -> Result<SinkOptions, ConfigError> {
        if let Some(key) = named_type_keys.first() {
            return Err(self.err(
                format!("sinks.{sink}.{key}"),
                format!("not a key of a {kind:?} sink"),
            ));
        }
        if let Some(url) = url {
            options.insert("url".to_string(), Value::from(url));
        }
        Ok(SinkOptions {
            file: self.file.clone(),
            sink: sink.to_string(),
            kind,
            values: options.into_iter().collect(),
        })
    }

    fn not_for_type(
        &self,
        sink: &str,
        kind: &str,
        present: &[(&str, bool)],
    ) -> Result<(), ConfigError> {
        match present.iter().find(|(_, is_set)| *is_set) {
            Some((key, _)) => Err(self.err(
                format!("sinks.{sink}.{key}"),
                format!("not a key of a {kind:?} sink"),
            )),
            None => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

/// Reads a portal's client secret from where the config says it is, with `$CREDENTIALS_DIRECTORY`
/// from the process environment.
pub fn resolve_secret(portal: &PortalConfig) -> Result<Secret, ConfigError> {
    resolve_secret_in(portal, credentials_directory().as_deref())
}

/// [`resolve_secret`] with an explicit credentials directory.
pub fn resolve_secret_in(
    portal: &PortalConfig,
    credentials_dir: Option<&Path>,
) -> Result<Secret, ConfigError> {
    let keys = SecretKeys {
        what: "client secret",
        table: ["portals", &portal.name],
        inline: "client_secret",
        file: "client_secret_file",
    };
    read_secret(&portal.client_secret, &keys, credentials_dir)
}

/// The secrets an http sink needs, read and checked.
#[derive(Debug, Clone, Default)]
pub struct HttpSecrets {
    /// The Standard Webhooks key, when `signing_secret`/`signing_secret_file` is set.
    pub signing_key: Option<crate::sinks::standard_webhooks::SigningKey>,
    /// The `auth[application_token]` of a bitrix-form sink.
    pub application_token: Option<Secret>,
}

/// Reads an http sink's secrets (signing secret, application token) from where the config says
/// they are, with `$CREDENTIALS_DIRECTORY` from the process environment.
pub fn resolve_http_secrets(sink: &str, http: &HttpSinkConfig) -> Result<HttpSecrets, ConfigError> {
    resolve_http_secrets_in(sink, http, credentials_directory().as_deref())
}

/// [`resolve_http_secrets`] with an explicit credentials directory.
pub fn resolve_http_secrets_in(
    sink: &str,
    http: &HttpSinkConfig,
    credentials_dir: Option<&Path>,
) -> Result<HttpSecrets, ConfigError> {
    let signing_key = match &http.signing_secret {
        None => None,
        Some(source) => {
            let keys = SecretKeys {
                what: "signing secret",
                table: ["sinks", sink],
                inline: "signing_secret",
                file: "signing_secret_file",
            };
            let secret = read_secret(source, &keys, credentials_dir)?;
            let key = crate::sinks::standard_webhooks::parse_secret(secret.expose())
                .map_err(|problem| keys.error(source, problem))?;
            Some(key)
        }
    };
    let application_token = match &http.format {
        HttpFormat::Json => None,
        HttpFormat::BitrixForm(form) => {
            let keys = SecretKeys {
                what: "application token",
                table: ["sinks", sink],
                inline: "application_token",
                file: "application_token_file",
            };
            Some(read_secret(
                &form.application_token,
                &keys,
                credentials_dir,
            )?)
        }
    };
    Ok(HttpSecrets {
        signing_key,
        application_token,
    })
}

/// Reads every secret a sink needs, so that a missing or malformed one is a configuration error
/// (exit 78) before anything starts.
pub fn resolve_sink_secrets(sink: &SinkConfig) -> Result<(), ConfigError> {
    match &sink.kind {
        SinkKind::Http(http) => resolve_http_secrets(&sink.name, http).map(|_| ()),
        // The broker and database sinks carry their credentials in their URL.
        _ => Ok(()),
    }
}

fn credentials_directory() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// Names for the messages about one secret: what it is and its two keys in `[table.NAME]`.
struct SecretKeys<'a> {
    what: &'a str,
    table: [&'a str; 2],
    inline: &'a str,
    file: &'a str,
}

impl SecretKeys<'_> {
    fn key(&self, leaf: &str) -> String {
        format!("{}.{}.{leaf}", self.table[0], self.table[1])
    }

    /// An error about the secret's content, on the key it came from.
    fn error(&self, source: &SecretSource, message: String) -> ConfigError {
        match source {
            SecretSource::File(path) => {
                ConfigError::new(path.display().to_string(), self.key(self.file), message)
            }
            SecretSource::Inline(_) => {
                ConfigError::new("the config", self.key(self.inline), message)
            }
            SecretSource::Credential(credential) => {
                ConfigError::new(credential.clone(), self.key(self.inline), message)
            }
        }
    }
}

fn read_secret(
    source: &SecretSource,
    keys: &SecretKeys<'_>,
    credentials_dir: Option<&Path>,
) -> Result<Secret, ConfigError> {
    match source {
        SecretSource::Inline(secret) => Ok(secret.clone()),
        SecretSource::File(path) => {
            let key = keys.key(keys.file);
            let secret = read_secret_file(path, &key, keys.what)?;
            warn_if_shared(&key, path);
            Ok(secret)
        }
        SecretSource::Credential(credential) => {
            let key = keys.key(keys.inline);
            let env_var = env_var_name(&[keys.table[0], keys.table[1], keys.inline]);
            let tried = format!(
                "tried {} (or {env_var}), {}, and the systemd credential {credential:?}",
                keys.inline, keys.file
            );
            let what = keys.what;
            let Some(dir) = credentials_dir else {
                return Err(ConfigError::new(
                    "$CREDENTIALS_DIRECTORY",
                    key,
                    format!("no {what} configured: {tried}, but $CREDENTIALS_DIRECTORY is not set"),
                ));
            };
            let path = dir.join(credential);
            if !path.exists() {
                return Err(ConfigError::new(
                    path.display().to_string(),
                    key,
                    format!("no {what} configured: {tried}, which does not exist"),
                ));
            }
            read_secret_file(&path, &key, what)
        }
    }
}

/// The largest secret file read (a client secret is 50 characters, a signing key well under
/// 1 KiB); a bigger file is refused, not read.
pub const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Reads a secret file: a regular file (a FIFO would block, a device like `/dev/zero` never
/// ends: both refused without reading) of at most [`MAX_SECRET_FILE`] bytes, UTF-8, holding the
/// secret and at most one final newline.
fn read_secret_file(path: &Path, key: &str, what: &str) -> Result<Secret, ConfigError> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = path.display().to_string();
    let err = |message: String| ConfigError::new(&file, key, message);
    // Non-blocking, so that opening a FIFO returns at once; the type is checked on the opened
    // file, so nothing can be swapped in between.
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .map_err(|e| err(format!("cannot read the {what}: {e}")))?;
    let meta = handle
        .metadata()
        .map_err(|e| err(format!("cannot read the {what}: {e}")))?;
    if !meta.is_file() {
        let kind = file_kind(&meta);
        return Err(err(format!(
            "the {what} file is {kind}, not a regular file: point the key at a file holding only the {what}"
        )));
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(err(format!(
            "the {what} file is {} bytes; a secret file holds at most {MAX_SECRET_FILE} bytes",
            meta.len()
        )));
    }
    let mut bytes = Vec::new();
    handle
        .take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| err(format!("cannot read the {what}: {e}")))?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(err(format!(
            "the {what} file grew past {MAX_SECRET_FILE} bytes while it was read"
        )));
    }
    let text =
        String::from_utf8(bytes).map_err(|_| err(format!("the {what} file is not UTF-8 text")))?;
    let secret = text
        .strip_suffix('\n')
        .map(|s| s.strip_suffix('\r').unwrap_or(s))
        .unwrap_or(&text);
    if secret.trim().is_empty() {
        return Err(err(format!("the {what} file is empty")));
    }
    check_secret_text(secret, what).map_err(|problem| {
        err(format!(
            "{problem} (a secret file holds the secret and at most one final newline)"
        ))
    })?;
    Ok(Secret::new(secret))
}

/// What a file is, for the message refusing it as a secret file.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    let kind = meta.file_type();
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() || kind.is_block_device() {
        "a device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// A secret holds no line break and no NUL: it goes into headers, query strings and URLs, where
/// either would cut it or smuggle something in.
fn check_secret_text(secret: &str, what: &str) -> Result<(), String> {
    if secret.contains(['\n', '\r']) {
        return Err(format!("the {what} holds a line break"));
    }
    if secret.contains('\0') {
        return Err(format!("the {what} holds a NUL character"));
    }
    Ok(())
}

fn warn_if_shared(key: &str, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                key,
                path = %path.display(),
                mode = format_args!("{mode:04o}"),
                "secret file is readable by group or others; chmod 0600 it"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const MINIMAL: &str = r#"
[portals.main]
client_endpoint = "https://example.bitrix24.com/rest"
client_id = "local.1.2"
client_secret = "s3cr3t"
events = ["ONCRMDEALADD", "oncrmdealupdate"]

[sinks.archive]
type = "file"
path = "/tmp/events.jsonl"
"#;

    fn write_config(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let f = write_config(text);
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        load_with_env(f.path(), &env)
    }

    /// MINIMAL with `extra` appended (TOML tables may be reopened only once, so `extra` adds keys
    /// through dotted names or new tables).
    fn with(extra: &str) -> String {
        format!("{MINIMAL}\n{extra}\n")
    }

    #[track_caller]
    fn assert_err(text: &str, key: &str, needle: &str) -> ConfigError {
        let err = load_str(text, &[]).expect_err("config should be rejected");
        assert_eq!(err.key, key, "wrong key in {err}");
        assert!(
            err.message.contains(needle),
            "message {:?} should contain {needle:?}",
            err.message
        );
        err
    }

    fn portal(extra_keys: &str) -> String {
        format!(
            r#"
[portals.main]
client_endpoint = "https://example.bitrix24.com/rest/"
client_id = "local.1.2"
client_secret = "s3cr3t"
events = ["ONCRMDEALADD"]
{extra_keys}

[sinks.archive]
type = "file"
path = "/tmp/events.jsonl"
"#
        )
    }

    fn sink(extra_keys: &str) -> String {
        format!(
            r#"
[portals.main]
client_endpoint = "https://example.bitrix24.com/rest/"
client_id = "local.1.2"
client_secret = "s3cr3t"
events = ["ONCRMDEALADD"]

[sinks.erp]
{extra_keys}
"#
        )
    }

    #[test]
    fn enrich_rules_name_known_getters() {
        let config = load_str(
            &portal(
                "enrich = { \"ONCRMDEAL*\" = \"crm.deal.get\", \"ontask*\" = \"tasks.task.get\" }",
            ),
            &[],
        )
        .unwrap();
        let p = &config.portals["main"];
        use crate::bitrix::entities::Getter;
        assert_eq!(p.getter_for("ONCRMDEALUPDATE"), Some(Getter::CrmDeal));
        assert_eq!(p.getter_for("ONTASKADD"), Some(Getter::Task));
        assert_eq!(p.getter_for("ONCRMLEADADD"), None);
        assert_err(
            &portal("enrich = { \"ONCRMDEAL*\" = \"crm.deal.list\" }"),
            "portals.main.enrich.\"ONCRMDEAL*\"",
            "unknown getter \"crm.deal.list\"; supported: crm.deal.get",
        );
        assert_eq!(
            load_str(MINIMAL, &[]).unwrap().portals["main"].enrich,
            vec![]
        );
    }

    #[test]
    fn a_key_of_no_sink_type_is_named() {
        let err = load_str(
            &sink("type = \"file\"\npath = \"/tmp/x\"\nstream = \"s\""),
            &[],
        )
        .unwrap_err();
        assert_eq!(err.key, "sinks.erp.stream");
        assert_eq!(err.message, "not a key of a \"file\" sink");
        let err = load_str(&sink("type = \"kafka\""), &[]).unwrap_err();
        assert_eq!(err.key, "sinks.erp.type");
        assert!(
            err.message.starts_with(
                "unknown sink type \"kafka\"; supported types: \"file\", \"http\", \"exec\""
            ),
            "{}",
            err.message
        );
    }

    #[test]
    fn sink_options_reach_a_typed_config_with_named_errors() {
        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct Options {
            url: String,
            stream: String,
            maxlen: Option<u64>,
        }
        let v = Validator {
            file: "c.toml".into(),
        };
        let options = |pairs: &[(&str, Value)]| -> BTreeMap<String, Value> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect()
        };
        let url = Some("redis://:hunter2@127.0.0.1/".to_string());

        let ok = v
            .options(
                "q",
                "redis",
                &[],
                url.clone(),
                options(&[("stream", Value::from("s"))]),
            )
            .unwrap();
        assert_eq!(
            ok.parse::<Options>().unwrap(),
            Options {
                url: url.clone().unwrap(),
                stream: "s".into(),
                maxlen: None
            }
        );
        assert!(!format!("{ok:?}").contains("hunter2"));

        let typo = v
            .options(
                "q",
                "redis",
                &[],
                url.clone(),
                options(&[("stream", Value::from("s")), ("max_len", Value::from(5u64))]),
            )
            .unwrap();
        let err = typo.parse::<Options>().unwrap_err();
        assert_eq!(
            (err.file.as_str(), err.key.as_str()),
            ("c.toml", "sinks.q.max_len")
        );
        assert!(
            err.message
                .starts_with("not a key of a \"redis\" sink; its keys: url, stream, maxlen"),
            "{}",
            err.message
        );

        let missing = v
            .options("q", "redis", &[], url.clone(), options(&[]))
            .unwrap();
        let err = missing.parse::<Options>().unwrap_err();
        assert_eq!(
            (err.key.as_str(), err.message.as_str()),
            ("sinks.q.stream", "missing required key")
        );

        let wrong = v
            .options(
                "q",
                "redis",
                &[],
                Some("x".into()),
                options(&[("stream", Value::from(7u64))]),
            )
            .unwrap();
        let err = wrong.parse::<Options>().unwrap_err();
        assert_eq!(err.key, "sinks.q.stream");
        assert!(
            err.message.starts_with("invalid value, expected"),
            "{}",
            err.message
        );

        let err = v
            .options("q", "redis", &["path"], url, options(&[]))
            .unwrap_err();
        assert_eq!(
            (err.key.as_str(), err.message.as_str()),
            ("sinks.q.path", "not a key of a \"redis\" sink")
        );
    }

    #[test]
    fn defaults_are_filled_in() {
        let config = load_str(MINIMAL, &[]).unwrap();
        assert_eq!(config.journal.path, PathBuf::from("./b24eventd.db"));
        assert_eq!(config.journal.retention, Duration::from_secs(30 * 86400));
        assert_eq!(config.journal.prune_schedule, "0 30 3 * * *");
        assert_eq!(config.journal.synchronous, Synchronous::Full);
        assert_eq!(config.admin.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(30));

        let p = &config.portals["main"];
        assert_eq!(p.name, "main");
        assert_eq!(p.client_endpoint, "https://example.bitrix24.com/rest/");
        assert_eq!(p.oauth_token_url, "https://oauth.bitrix.info/oauth/token/");
        assert_eq!(p.client_secret, SecretSource::Inline(Secret::new("s3cr3t")));
        assert_eq!(p.auth_connector, None);
        assert_eq!(p.events, vec!["ONCRMDEALADD", "ONCRMDEALUPDATE"]);
        assert_eq!(p.mode, Mode::Reserve);
        assert_eq!(p.batch_size, 50);
        assert_eq!(p.poll_interval, Duration::from_secs(5));
        assert_eq!(
            p.rate_limit,
            RateLimit {
                burst: 50,
                per_second: 2.0,
                share: 0.5,
                operating_budget: Duration::from_secs(420)
            }
        );
        assert_eq!(p.idle_poll_max, Duration::from_secs(30));
        assert_eq!(p.max_unsettled, 5000);
        assert_eq!(p.error_lane_schedule, "0 */10 * * * *");
        assert_eq!(p.orphan_sweep_schedule, "0 */5 * * * *");
        assert_eq!(p.request_timeout, Duration::from_secs(60));

        let s = &config.sinks["archive"];
        assert_eq!(s.name, "archive");
        assert_eq!(s.route, crate::sinks::Route::default());
        assert_eq!(s.timeout, Duration::from_secs(10));
        assert_eq!(s.concurrency, 4);
        assert_eq!(
            s.retry,
            RetryPolicy {
                max_attempts: 12,
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(600)
            }
        );
        assert_eq!(
            s.kind,
            SinkKind::File(FileSinkConfig {
                path: "/tmp/events.jsonl".into()
            })
        );
    }

    #[test]
    fn journal_defaults_to_state_directory() {
        let config = load_str(
            MINIMAL,
            &[("STATE_DIRECTORY", "/var/lib/b24eventd:/var/lib/other")],
        )
        .unwrap();
        assert_eq!(
            config.journal.path,
            PathBuf::from("/var/lib/b24eventd/journal.db")
        );
    }

    #[test]
    fn env_overrides_file_and_defaults() {
        let env = [
            ("B24EVENTD_PORTALS__MAIN__CLIENT_SECRET", "0123456789"),
            ("B24EVENTD_PORTALS__MAIN__BATCH_SIZE", "200"),
            ("B24EVENTD_PORTALS__MAIN__CLIENT_ID", "12345"),
            ("B24EVENTD_JOURNAL__SYNCHRONOUS", "normal"),
            ("B24EVENTD_ADMIN__LISTEN", ""),
            ("B24EVENTD_SINKS__ARCHIVE__EVENTS", "[\"ONCRMDEAL*\"]"),
            ("B24EVENTD_SHUTDOWN_TIMEOUT", "5s"),
            ("B24EVENTD_CONFIG", "/ignored.toml"),
            ("B24EVENTD_LOG", "debug"),
            ("OTHER_VAR", "x"),
        ];
        let config = load_str(MINIMAL, &env).unwrap();
        let p = &config.portals["main"];
        assert_eq!(
            p.client_secret,
            SecretSource::Inline(Secret::new("0123456789"))
        );
        assert_eq!(p.client_id, "12345");
        assert_eq!(p.batch_size, 200);
        assert_eq!(config.journal.synchronous, Synchronous::Normal);
        assert_eq!(config.admin.listen, None);
        assert_eq!(config.sinks["archive"].route.events, vec!["ONCRMDEAL*"]);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(5));
    }

    #[test]
    fn env_errors_name_the_variable() {
        let err =
            load_str(MINIMAL, &[("B24EVENTD_PORTALS__MAIN__BATCH_SIZE", "many")]).unwrap_err();
        assert_eq!(err.key, "portals.main.batch_size");
        assert_eq!(
            err.file,
            "environment variable B24EVENTD_PORTALS__MAIN__BATCH_SIZE"
        );
        let err = load_str(MINIMAL, &[("B24EVENTD_PORTALS__MAIN__BOGUS", "1")]).unwrap_err();
        assert_eq!(err.key, "portals.main.bogus");
        assert!(err.message.contains("unknown key"), "{err}");
    }

    #[test]
    fn env_secret_and_secret_file_conflict() {
        let text = portal("").replace(
            "client_secret = \"s3cr3t\"",
            "client_secret_file = \"/etc/x\"",
        );
        let err =
            load_str(&text, &[("B24EVENTD_PORTALS__MAIN__CLIENT_SECRET", "abc")]).unwrap_err();
        assert_eq!(err.key, "portals.main.client_secret");
        assert!(
            err.message
                .contains("B24EVENTD_PORTALS__MAIN__CLIENT_SECRET"),
            "{err}"
        );
        assert!(!err.to_string().contains("abc"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = assert_err(
            &portal("colour = \"blue\""),
            "portals.main.colour",
            "unknown key",
        );
        assert!(err.message.contains("client_endpoint"), "{err}");
        assert_err(
            &with("[journal]\nretension = \"1d\""),
            "journal.retension",
            "unknown key",
        );
        assert_err(&format!("bogus = 1\n{MINIMAL}"), "bogus", "unknown key");
        assert_err(
            &sink("type = \"file\"\npath = \"/tmp/x\"\n[sinks.erp.retry]\nmax_attempt = 3"),
            "sinks.erp.retry.max_attempt",
            "unknown key",
        );
    }

    #[test]
    fn display_names_file_key_and_message() {
        let f = write_config(&portal("batch_size = 0"));
        let err = load_with_env(f.path(), &[]).unwrap_err();
        assert_eq!(err.file, f.path().display().to_string());
        assert_eq!(
            err.to_string(),
            format!(
                "{}: portals.main.batch_size: must be between 1 and 1000, got 0",
                f.path().display()
            )
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = load_with_env(Path::new("/nonexistent/b24eventd.toml"), &[]).unwrap_err();
        assert_eq!(err.file, "/nonexistent/b24eventd.toml");
        assert_eq!(err.key, "");
        assert!(err.message.contains("not found"), "{err}");
        assert!(
            err.to_string()
                .starts_with("/nonexistent/b24eventd.toml: config file not found")
        );
    }

    #[test]
    fn syntax_error_names_the_line_without_echoing_it() {
        let text = "[portals.main]\nclient_id = \"a\"\nclient_secret = \"topsecret\n";
        let f = write_config(text);
        let err = load_with_env(f.path(), &[]).unwrap_err();
        assert_eq!(err.key, "");
        assert!(err.message.contains("line 3"), "{err}");
        assert!(!err.to_string().contains("topsecret"), "{err}");
        assert!(!err.message.contains('\n'), "{err}");
    }

    #[test]
    fn type_errors_on_secrets_do_not_echo_the_value() {
        let text = portal("").replace("client_secret = \"s3cr3t\"", "client_secret = 987654321");
        let err = assert_err(&text, "portals.main.client_secret", "invalid");
        assert!(!err.to_string().contains("987654321"), "{err}");
    }

    #[test]
    fn durations_are_humantime() {
        let config = load_str(
            &portal("poll_interval = \"200ms\"\nrequest_timeout = \"2m\""),
            &[],
        )
        .unwrap();
        assert_eq!(
            config.portals["main"].poll_interval,
            Duration::from_millis(200)
        );
        assert_eq!(
            config.portals["main"].request_timeout,
            Duration::from_secs(120)
        );
        assert_err(
            &portal("poll_interval = \"soon\""),
            "portals.main.poll_interval",
            "",
        );
        assert_err(
            &portal("poll_interval = \"0s\""),
            "portals.main.poll_interval",
            "longer than 0s",
        );
    }

    /// One config per duration key, with `VALUE` where the duration goes.
    fn duration_cases() -> Vec<(&'static str, String)> {
        let nats = "[sinks.bus]\ntype = \"nats\"\nurl = \"nats://127.0.0.1:4222\"\nsubject = \"b.{event}\"\nstream = \"B\"\ncreate_stream = true\n";
        let mqtt = "[sinks.bus]\ntype = \"mqtt\"\nurl = \"mqtt://127.0.0.1\"\n";
        vec![
            (
                "shutdown_timeout",
                format!("shutdown_timeout = \"VALUE\"\n{MINIMAL}"),
            ),
            (
                "journal.retention",
                with("[journal]\nretention = \"VALUE\""),
            ),
            (
                "alerts.check_interval",
                with("[alerts]\nsink = \"archive\"\ncheck_interval = \"VALUE\""),
            ),
            (
                "alerts.unsettled_for",
                with("[alerts]\nsink = \"archive\"\nunsettled_for = \"VALUE\""),
            ),
            (
                "alerts.portal_failing_for",
                with("[alerts]\nsink = \"archive\"\nportal_failing_for = \"VALUE\""),
            ),
            (
                "alerts.oldest_pending_older_than",
                with("[alerts]\nsink = \"archive\"\noldest_pending_older_than = \"VALUE\""),
            ),
            (
                "portals.main.poll_interval",
                portal("poll_interval = \"VALUE\"\nidle_poll_max = \"VALUE\""),
            ),
            (
                "portals.main.idle_poll_max",
                portal("poll_interval = \"1s\"\nidle_poll_max = \"VALUE\""),
            ),
            (
                "portals.main.request_timeout",
                portal("request_timeout = \"VALUE\""),
            ),
            (
                "portals.main.rate_limit.operating_budget",
                portal("rate_limit.operating_budget = \"VALUE\""),
            ),
            (
                "sinks.erp.timeout",
                sink("type = \"file\"\npath = \"/tmp/x\"\ntimeout = \"VALUE\""),
            ),
            (
                "sinks.erp.retry.initial_backoff",
                sink(
                    "type = \"file\"\npath = \"/tmp/x\"\nretry.initial_backoff = \"VALUE\"\nretry.max_backoff = \"VALUE\"",
                ),
            ),
            (
                "sinks.erp.retry.max_backoff",
                sink(
                    "type = \"file\"\npath = \"/tmp/x\"\nretry.initial_backoff = \"1ms\"\nretry.max_backoff = \"VALUE\"",
                ),
            ),
            (
                "sinks.bus.duplicate_window",
                format!("{MINIMAL}\n{nats}duplicate_window = \"VALUE\"\n"),
            ),
            (
                "sinks.bus.keep_alive",
                format!("{MINIMAL}\n{mqtt}keep_alive = \"VALUE\"\n"),
            ),
        ]
    }

    #[test]
    fn every_duration_key_is_bounded_and_absurd_values_are_refused_naming_the_key() {
        let cases = duration_cases();
        // Every range is exercised, and every humantime key in the sources has a range.
        for range in DURATION_RANGES {
            assert!(
                cases
                    .iter()
                    .any(|(key, _)| DurationRange::of(key).is_some_and(|r| r.key == range.key)),
                "no case for {}",
                range.key
            );
        }
        for source in [
            include_str!("config.rs"),
            include_str!("sinks/nats.rs"),
            include_str!("sinks/mqtt.rs"),
        ] {
            let mut lines = source.lines();
            while let Some(line) = lines.next() {
                if !line.contains("with = \"humantime_serde\"") || line.contains("line.contains") {
                    continue;
                }
                let field = lines.next().unwrap_or_default().trim();
                let name = field
                    .trim_start_matches("pub ")
                    .split(':')
                    .next()
                    .unwrap_or_default();
                assert!(
                    DURATION_RANGES
                        .iter()
                        .any(|r| r.key.ends_with(&format!(".{name}")) || r.key == name),
                    "the duration key {name} has no DurationRange"
                );
            }
        }
        for (key, text) in &cases {
            let range = DurationRange::of(key).expect("a range");
            // In range: the upper end itself is accepted.
            let max = humantime::format_duration(range.max).to_string();
            load_str(&text.replace("VALUE", &max), &[])
                .unwrap_or_else(|e| panic!("{key} = {max:?} should pass: {e}"));
            for absurd in ["500000000y", "300000y", "101years"] {
                let err = assert_err(&text.replace("VALUE", absurd), key, "must be at most");
                assert!(err.message.contains(range.why), "{err}");
            }
            let above = humantime::format_duration(range.max + Duration::from_secs(1)).to_string();
            assert_err(&text.replace("VALUE", &above), key, "must be at most");
            if !range.min.is_zero() {
                assert_err(&text.replace("VALUE", "0s"), key, "");
            }
        }
        // The defaults lie in their ranges.
        for (key, default) in [
            ("shutdown_timeout", DEFAULT_SHUTDOWN_TIMEOUT),
            ("journal.retention", DEFAULT_RETENTION),
            ("portals.main.poll_interval", DEFAULT_POLL_INTERVAL),
            ("portals.main.idle_poll_max", DEFAULT_IDLE_POLL_MAX),
            ("portals.main.request_timeout", DEFAULT_REQUEST_TIMEOUT),
            (
                "portals.main.rate_limit.operating_budget",
                DEFAULT_OPERATING_BUDGET,
            ),
            ("sinks.erp.timeout", DEFAULT_SINK_TIMEOUT),
            ("sinks.erp.retry.initial_backoff", DEFAULT_INITIAL_BACKOFF),
            ("sinks.erp.retry.max_backoff", DEFAULT_MAX_BACKOFF),
        ] {
            assert_eq!(duration_problem(key, default), None, "{key}");
        }
        assert!(DurationRange::of("portals.a.b.poll_interval").is_none());
        assert!(DurationRange::of("sinks.x.retry.timeout").is_none());
    }

    #[test]
    fn needs_a_portal_and_a_sink() {
        assert_err(
            "[sinks.a]\ntype = \"file\"\npath = \"/tmp/x\"\n",
            "portals",
            "at least one portal",
        );
        let only_portal = portal("")
            .split("[sinks.archive]")
            .next()
            .unwrap()
            .to_string();
        assert_err(&only_portal, "sinks", "at least one sink");
    }

    #[test]
    fn names_must_be_lowercase_identifiers() {
        let text = portal("").replace("[portals.main]", "[portals.Main]");
        assert_err(&text, "portals.Main", "invalid portal name");
        let text = portal("").replace("[sinks.archive]", "[sinks.\"my sink\"]");
        assert_err(&text, "sinks.my sink", "invalid sink name");
    }

    #[test]
    fn portal_required_keys() {
        let text = portal("").replace("client_id = \"local.1.2\"\n", "");
        assert_err(&text, "portals.main.client_id", "missing");
        let text = portal("").replace(
            "client_endpoint = \"https://example.bitrix24.com/rest/\"\n",
            "",
        );
        assert_err(&text, "portals.main.client_endpoint", "missing");
        let text = portal("").replace("events = [\"ONCRMDEALADD\"]\n", "");
        assert_err(&text, "portals.main.events", "missing");
    }

    #[test]
    fn batch_size_and_max_unsettled() {
        assert_err(
            &portal("batch_size = 0"),
            "portals.main.batch_size",
            "between 1 and 1000",
        );
        assert_err(
            &portal("batch_size = 1001"),
            "portals.main.batch_size",
            "between 1 and 1000",
        );
        assert!(load_str(&portal("batch_size = 1000"), &[]).is_ok());
        assert_err(
            &portal("batch_size = 100\nmax_unsettled = 99"),
            "portals.main.max_unsettled",
            "at least batch_size (100)",
        );
        assert_err(
            &portal("batch_size = -1"),
            "portals.main.batch_size",
            "invalid",
        );
    }

    #[test]
    fn rate_limit_bounds() {
        assert_err(
            &portal("rate_limit = { burst = 0 }"),
            "portals.main.rate_limit.burst",
            "at least 1",
        );
        assert_err(
            &portal("rate_limit = { per_second = 0.0 }"),
            "portals.main.rate_limit.per_second",
            "greater than 0",
        );
        assert_err(
            &portal("rate_limit = { per_second = -1 }"),
            "portals.main.rate_limit.per_second",
            "greater than 0",
        );
        assert_err(
            &portal("rate_limit = { burst = 5, rate = 1 }"),
            "portals.main.rate_limit.rate",
            "unknown key",
        );
        let config =
            load_str(&portal("rate_limit = { burst = 250, per_second = 5 }"), &[]).unwrap();
        assert_eq!(
            config.portals["main"].rate_limit,
            RateLimit {
                burst: 250,
                per_second: 5.0,
                share: 0.5,
                operating_budget: Duration::from_secs(420)
            }
        );
        assert_eq!(
            config.portals["main"].rate_limit.client_bucket(),
            (125, 2.5)
        );
        let config = load_str(&portal("rate_limit = { share = 1.0 }"), &[]).unwrap();
        assert_eq!(config.portals["main"].rate_limit.client_bucket(), (50, 2.0));
        let config = load_str(&portal("rate_limit = { burst = 1, share = 0.1 }"), &[]).unwrap();
        assert_eq!(config.portals["main"].rate_limit.client_bucket().0, 1);
        for bad in ["0.0", "1.5", "-0.5"] {
            assert_err(
                &portal(&format!("rate_limit = {{ share = {bad} }}")),
                "portals.main.rate_limit.share",
                "must be a fraction greater than 0 and at most 1",
            );
        }
    }

    #[test]
    fn cron_schedules_need_six_fields() {
        assert_err(
            &portal("error_lane_schedule = \"*/10 * * * *\""),
            "portals.main.error_lane_schedule",
            "6 fields",
        );
        assert_err(
            &portal("orphan_sweep_schedule = \"nonsense\""),
            "portals.main.orphan_sweep_schedule",
            "invalid cron schedule",
        );
        assert_err(
            &with("[journal]\nprune_schedule = \"0 99 3 * * *\""),
            "journal.prune_schedule",
            "invalid cron schedule",
        );
        assert!(parse_cron("0 */5 * * * *").is_ok());
        assert!(parse_cron("0 0 0 * * * 2030").is_err());
    }

    #[test]
    fn a_cron_schedule_that_never_fires_is_refused() {
        assert_err(
            &with("[journal]\nprune_schedule = \"0 0 0 31 2 *\""),
            "journal.prune_schedule",
            "never fires",
        );
        assert_err(
            &portal("orphan_sweep_schedule = \"0 0 0 30 2 *\""),
            "portals.main.orphan_sweep_schedule",
            "never fires",
        );
        // Rare is not never: the 29th of February comes every four years.
        let config = load_str(&with("[journal]\nprune_schedule = \"0 0 3 29 2 *\""), &[]).unwrap();
        assert_eq!(config.journal.prune_schedule, "0 0 3 29 2 *");
    }

    #[test]
    fn two_file_sinks_cannot_share_a_path_nor_write_the_journal() {
        let text = format!(
            "{}\n[sinks.copy]\ntype = \"file\"\npath = \"/tmp/./events.jsonl\"\n",
            portal("")
        );
        assert_err(
            &text,
            "sinks.copy.path",
            "already the path of sinks.archive",
        );
        let text = format!(
            "{}\n[sinks.copy]\ntype = \"file\"\npath = \"/tmp/other.jsonl\"\n",
            portal("")
        );
        assert!(load_str(&text, &[]).is_ok());
        let text = format!(
            "[journal]\npath = \"/var/lib/x/j.db\"\n{}\n[sinks.copy]\ntype = \"file\"\npath = \"/var/lib/x/j.db-wal\"\n",
            portal("")
        );
        assert_err(&text, "sinks.copy.path", "the journal's file");

        // The same file under another name (a symlink) is the same file.
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.jsonl");
        std::fs::write(&real, "").unwrap();
        let link = dir.path().join("link.jsonl");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let text = format!(
            "{}\n[sinks.a]\ntype = \"file\"\npath = {:?}\n[sinks.b]\ntype = \"file\"\npath = {:?}\n",
            portal(""),
            real.display().to_string(),
            link.display().to_string()
        );
        assert_err(&text, "sinks.b.path", "already the path of sinks.a");
    }

    #[test]
    fn an_empty_route_list_is_refused_not_read_as_everything() {
        assert_err(
            &sink("type = \"file\"\npath = \"/tmp/e.jsonl\"\nevents = []"),
            "sinks.erp.events",
            "an empty list routes nothing",
        );
        assert_err(
            &sink("type = \"file\"\npath = \"/tmp/e.jsonl\"\nportals = []"),
            "sinks.erp.portals",
            "an empty list routes nothing",
        );
        let config = load_str(&sink("type = \"file\"\npath = \"/tmp/e.jsonl\""), &[]).unwrap();
        assert!(config.sinks["erp"].route.events.is_empty());
    }

    #[test]
    fn portal_events_are_exact_names() {
        assert_err(
            &portal("").replace("[\"ONCRMDEALADD\"]", "[]"),
            "portals.main.events",
            "at least one",
        );
        assert_err(
            &portal("").replace("[\"ONCRMDEALADD\"]", "[\"A\", \"\"]"),
            "portals.main.events[1]",
            "must not be empty",
        );
        assert_err(
            &portal("").replace("[\"ONCRMDEALADD\"]", "[\"ONCRMDEAL*\"]"),
            "portals.main.events[0]",
            "glob",
        );
        let config = load_str(
            &portal("").replace("[\"ONCRMDEALADD\"]", "[\"a\", \"A\", \"b\"]"),
            &[],
        )
        .unwrap();
        assert_eq!(config.portals["main"].events, vec!["A", "B"]);
    }

    #[test]
    fn modes() {
        let mode = |extra: &str| load_str(&portal(extra), &[]).unwrap().portals["main"].mode;
        assert_eq!(mode("mode = \"reserve\""), Mode::Reserve);
        assert_eq!(mode("mode = \"fetch-delete\""), Mode::FetchDelete);
        let err = assert_err(
            &portal("mode = \"delete\""),
            "portals.main.mode",
            "unsupported mode \"delete\"",
        );
        assert!(err.message.contains("\"reserve\"") && err.message.contains("\"fetch-delete\""));
    }

    #[test]
    fn journal_and_admin_values() {
        assert_err(
            &with("[journal]\nsynchronous = \"off\""),
            "journal.synchronous",
            "\"full\", \"normal\"",
        );
        assert_err(
            &with("[journal]\nretention = \"0s\""),
            "journal.retention",
            "longer than 0s",
        );
        assert_err(
            &with("[admin]\nlisten = \"localhost\""),
            "admin.listen",
            "invalid address",
        );
        let config = load_str(&with("[admin]\nlisten = \"\""), &[]).unwrap();
        assert_eq!(config.admin.listen, None);
        let config = load_str(&with("[admin]\nlisten = \"[::1]:9000\""), &[]).unwrap();
        assert_eq!(config.admin.listen, Some("[::1]:9000".parse().unwrap()));
        assert!(!config.admin.allow_remote);
    }

    #[test]
    fn admin_listen_off_loopback_needs_allow_remote() {
        for addr in ["0.0.0.0:9464", "192.0.2.10:9464", "[::]:9464"] {
            let err = assert_err(
                &with(&format!("[admin]\nlisten = \"{addr}\"")),
                "admin.listen",
                "admin.allow_remote = true",
            );
            assert!(err.message.contains("not a loopback address"), "{err}");
        }
        let config = load_str(
            &with("[admin]\nlisten = \"0.0.0.0:9464\"\nallow_remote = true"),
            &[],
        )
        .unwrap();
        assert_eq!(config.admin.listen, Some("0.0.0.0:9464".parse().unwrap()));
        assert!(config.admin.allow_remote);
        let config = load_str(&with("[admin]\nlisten = \"127.0.0.2:9000\""), &[]).unwrap();
        assert_eq!(config.admin.listen, Some("127.0.0.2:9000".parse().unwrap()));
        let config = load_str(
            &with("[admin]\nlisten = \"10.1.2.3:9464\""),
            &[("B24EVENTD_ADMIN__ALLOW_REMOTE", "true")],
        )
        .unwrap();
        assert!(config.admin.allow_remote);
    }

    #[test]
    fn client_endpoint_must_be_http_and_not_a_webhook() {
        let text = portal("").replace(
            "https://example.bitrix24.com/rest/",
            "ftp://example.bitrix24.com/rest/",
        );
        assert_err(&text, "portals.main.client_endpoint", "http:// or https://");
        let text = portal("").replace("https://example.bitrix24.com/rest/", "example.bitrix24.com");
        assert_err(&text, "portals.main.client_endpoint", "invalid URL");
        let text = portal("").replace(
            "https://example.bitrix24.com/rest/",
            "https://example.bitrix24.com/rest/1/83te1pjdphsa9u15/",
        );
        let err = assert_err(&text, "portals.main.client_endpoint", "WRONG_AUTH_TYPE");
        assert!(
            err.message
                .contains("the event.* methods reject incoming webhooks (WRONG_AUTH_TYPE)")
        );
        assert!(err.message.contains("create a local application and configure its client_endpoint (`https://example.bitrix24.com/rest/`), client_id and client_secret"));
        assert!(
            !err.message.contains("83te1pjdphsa9u15"),
            "the webhook code is a secret: {err}"
        );
        let text = portal("").replace(
            "https://example.bitrix24.com/rest/",
            "https://example.bitrix24.com/rest/12/abc/profile.json",
        );
        assert_err(&text, "portals.main.client_endpoint", "WRONG_AUTH_TYPE");
        let text = portal("oauth_token_url = \"file:///x\"");
        assert_err(&text, "portals.main.oauth_token_url", "http:// or https://");
    }

    #[test]
    fn secret_sources() {
        let config = load_str(
            &portal("").replace(
                "client_secret = \"s3cr3t\"",
                "client_secret_file = \"/etc/b24/main.secret\"",
            ),
            &[],
        )
        .unwrap();
        assert_eq!(
            config.portals["main"].client_secret,
            SecretSource::File("/etc/b24/main.secret".into())
        );

        let config =
            load_str(&portal("").replace("client_secret = \"s3cr3t\"\n", ""), &[]).unwrap();
        assert_eq!(
            config.portals["main"].client_secret,
            SecretSource::Credential("main.client_secret".into())
        );

        let both = portal("client_secret_file = \"/x\"");
        assert_err(
            &both,
            "portals.main.client_secret",
            "both client_secret and client_secret_file",
        );
        assert_err(
            &portal("").replace("\"s3cr3t\"", "\"\""),
            "portals.main.client_secret",
            "must not be empty",
        );
        assert_err(
            &portal("auth_connector = \" \""),
            "portals.main.auth_connector",
            "must not be empty",
        );
    }

    fn portal_with(source: SecretSource) -> PortalConfig {
        let mut config = load_str(MINIMAL, &[]).unwrap();
        let mut portal = config.portals.remove("main").unwrap();
        portal.client_secret = source;
        portal
    }

    #[test]
    fn resolve_secret_from_each_source() {
        let dir = tempfile::tempdir().unwrap();

        let inline = portal_with(SecretSource::Inline(Secret::new("inline")));
        assert_eq!(resolve_secret_in(&inline, None).unwrap().expose(), "inline");

        let file = dir.path().join("main.secret");
        std::fs::write(&file, "from-file\r\n").unwrap();
        let p = portal_with(SecretSource::File(file.clone()));
        assert_eq!(resolve_secret_in(&p, None).unwrap().expose(), "from-file");

        std::fs::write(&file, "\n").unwrap();
        let err = resolve_secret_in(&p, None).unwrap_err();
        assert_eq!(err.key, "portals.main.client_secret_file");
        assert!(err.message.contains("empty"));

        let missing = portal_with(SecretSource::File(dir.path().join("nope")));
        let err = resolve_secret_in(&missing, None).unwrap_err();
        assert!(err.file.ends_with("nope"), "{err}");
        assert!(err.message.contains("cannot read"), "{err}");

        std::fs::write(dir.path().join("main.client_secret"), "from-credential\n").unwrap();
        let cred = portal_with(SecretSource::Credential("main.client_secret".into()));
        assert_eq!(
            resolve_secret_in(&cred, Some(dir.path())).unwrap().expose(),
            "from-credential"
        );

        let err = resolve_secret_in(&cred, None).unwrap_err();
        assert_eq!(err.key, "portals.main.client_secret");
        for needle in [
            "client_secret",
            "B24EVENTD_PORTALS__MAIN__CLIENT_SECRET",
            "client_secret_file",
            "\"main.client_secret\"",
            "$CREDENTIALS_DIRECTORY is not set",
        ] {
            assert!(err.message.contains(needle), "{needle:?} not in {err}");
        }

        let empty_dir = tempfile::tempdir().unwrap();
        let err = resolve_secret_in(&cred, Some(empty_dir.path())).unwrap_err();
        assert!(err.file.ends_with("main.client_secret"), "{err}");
        assert!(err.message.contains("does not exist"), "{err}");
    }

    #[test]
    fn secret_files_are_small_regular_files_of_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let read = |path: &Path| {
            read_secret_file(path, "portals.main.client_secret_file", "client secret")
        };
        let file = dir.path().join("main.secret");
        std::fs::write(&file, "q7".repeat(MAX_SECRET_FILE as usize / 2)).unwrap();
        assert_eq!(
            read(&file).unwrap().expose().len(),
            MAX_SECRET_FILE as usize
        );
        std::fs::write(&file, "q7".repeat(MAX_SECRET_FILE as usize / 2) + "q").unwrap();
        let err = read(&file).unwrap_err();
        assert!(
            err.message.contains("65537 bytes") && err.message.contains("65536"),
            "{err}"
        );
        assert_eq!(err.key, "portals.main.client_secret_file");
        let err = read(Path::new("/dev/zero")).unwrap_err();
        assert_eq!(err.file, "/dev/zero");
        assert!(
            err.message.contains("a device, not a regular file"),
            "{err}"
        );
        let err = read(dir.path()).unwrap_err();
        assert!(err.message.contains("a directory"), "{err}");
        for (content, expected) in [
            ("s3cret\n", Ok("s3cret")),
            ("s3cret\r\n", Ok("s3cret")),
            (" s3 cret ", Ok(" s3 cret ")),
            ("s3cret\n\n", Err("line break")),
            ("s3\ncret", Err("line break")),
            ("s3\rcret", Err("line break")),
            ("s3\0cret", Err("NUL")),
        ] {
            std::fs::write(&file, content).unwrap();
            match (read(&file), expected) {
                (Ok(secret), Ok(want)) => assert_eq!(secret.expose(), want),
                (Err(err), Err(why)) => assert!(
                    err.message.contains(why) && err.message.contains("one final newline"),
                    "{content:?}: {err}"
                ),
                (got, want) => panic!("{content:?}: {got:?}, expected {want:?}"),
            }
        }
        std::fs::write(&file, [0xff, 0xfe]).unwrap();
        assert!(read(&file).unwrap_err().message.contains("not UTF-8"));
    }

    #[test]
    fn inline_secrets_hold_no_line_break_or_nul() {
        for (value, why) in [("s3\\ncr3t", "line break"), ("s3\\u0000cr3t", "NUL")] {
            let text = portal("").replace(
                "client_secret = \"s3cr3t\"",
                &format!("client_secret = \"{value}\""),
            );
            assert_err(&text, "portals.main.client_secret", why);
        }
        assert_err(
            &sink(
                "type = \"http\"\nurl = \"https://u:p@erp.example/\"\nheaders = { Authorization = \"Bearer t0ken\" }",
            ),
            "sinks.erp.headers.Authorization",
            "keep one",
        );
    }

    #[test]
    fn secret_never_prints() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        let config = load_str(&with("[sinks.erp]\ntype = \"http\"\nurl = \"https://user:pw@erp.local/x\"\nheaders = { X-Api-Key = \"Bearer tok\" }"), &[]).unwrap();
        let debug = format!("{config:?}");
        for leaked in ["s3cr3t", "Bearer tok", ":pw@"] {
            assert!(!debug.contains(leaked), "{leaked} leaked in {debug}");
        }
    }

    #[test]
    fn sink_type_and_type_specific_keys() {
        assert_err(
            &sink("path = \"/tmp/x\""),
            "sinks.erp.type",
            "missing required key; supported types: \"file\", \"http\", \"exec\"",
        );
        let err = assert_err(
            &sink("type = \"smtp\""),
            "sinks.erp.type",
            "unknown sink type \"smtp\"",
        );
        assert!(err.message.contains("\"file\", \"http\", \"exec\""));
        assert_err(
            &sink("type = \"file\""),
            "sinks.erp.path",
            "missing required key",
        );
        assert_err(
            &sink("type = \"file\"\npath = \"/tmp/x\"\nurl = \"http://x/\""),
            "sinks.erp.url",
            "not a key of a \"file\" sink",
        );
        assert_err(
            &sink("type = \"http\""),
            "sinks.erp.url",
            "missing required key",
        );
        assert_err(
            &sink("type = \"http\"\nurl = \"http://x/\"\npath = \"/tmp/x\""),
            "sinks.erp.path",
            "not a key of a \"http\" sink",
        );
        assert_err(
            &sink("type = \"http\"\nurl = \"ftp://x/\""),
            "sinks.erp.url",
            "http:// or https://",
        );
        assert_err(
            &sink("type = \"http\"\nurl = \"http://x/\"\nformat = \"xml\""),
            "sinks.erp.format",
            "unsupported format \"xml\"; supported: \"json\", \"bitrix-form\"",
        );
        assert_err(
            &sink("type = \"http\"\nurl = \"http://x/\"\nheaders = { \"bad header\" = \"v\" }"),
            "sinks.erp.headers.bad header",
            "invalid header name",
        );
        assert_err(
            &sink("type = \"http\"\nurl = \"http://x/\"\nheaders = { X-A = \"a\\nb\" }"),
            "sinks.erp.headers.X-A",
            "invalid header value",
        );
        assert_err(
            &sink("type = \"http\"\nurl = \"http://x/\"\nheaders = { Idempotency-Key = \"1\" }"),
            "sinks.erp.headers.Idempotency-Key",
            "set by the sink",
        );

        let config = load_str(&sink("type = \"http\"\nurl = \"http://erp:8080/ev\"\nformat = \"json\"\nheaders = { X-Token = \"t\" }"), &[]).unwrap();
        let SinkKind::Http(http) = &config.sinks["erp"].kind else {
            panic!("http sink expected")
        };
        assert_eq!(http.url, "http://erp:8080/ev");
        assert_eq!(http.format, HttpFormat::Json);
        assert_eq!(http.headers["X-Token"], "t");
    }

    const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn http_toml(extra_keys: &str) -> String {
        sink(&format!(
            "type = \"http\"\nurl = \"http://erp:8080/ev\"\n{extra_keys}"
        ))
    }

    fn bitrix(extra_keys: &str) -> String {
        http_toml(&format!(
            "format = \"bitrix-form\"\nbitrix_member_id = \"d897063e1ce7c5eb9f04b9751eef5915\"\napplication_token = \"t0ken\"\n{extra_keys}"
        ))
    }

    fn http_config(text: &str) -> HttpSinkConfig {
        let config = load_str(text, &[]).unwrap_or_else(|e| panic!("{e}"));
        let SinkKind::Http(http) = &config.sinks["erp"].kind else {
            panic!("http sink expected")
        };
        http.clone()
    }

    #[test]
    fn http_bitrix_form_keys() {
        let http = http_config(&bitrix(""));
        let HttpFormat::BitrixForm(form) = &http.format else {
            panic!("bitrix-form expected: {http:?}")
        };
        assert_eq!(form.domain, "example.bitrix24.com", "the portal's host");
        assert_eq!(form.client_endpoint, "https://example.bitrix24.com/rest/");
        assert_eq!(form.server_endpoint, "https://oauth.bitrix.info/rest/");
        assert_eq!(form.member_id, "d897063e1ce7c5eb9f04b9751eef5915");
        assert_eq!(
            form.application_token,
            SecretSource::Inline(Secret::new("t0ken"))
        );
        assert_eq!(form.event_handler_id, 0);
        assert!(!format!("{http:?}").contains("t0ken"), "{http:?}");

        let http = http_config(&bitrix(
            "bitrix_domain = \"crm.example.com\"\nevent_handler_id = 975\nportals = [\"main\"]",
        ));
        let HttpFormat::BitrixForm(form) = &http.format else {
            panic!("bitrix-form expected")
        };
        assert_eq!(form.domain, "crm.example.com");
        assert_eq!(form.client_endpoint, "https://crm.example.com/rest/");
        assert_eq!(form.event_handler_id, 975);

        // The token from a file, or by default from the credentials directory.
        let text = http_toml(
            "format = \"bitrix-form\"\nbitrix_member_id = \"m\"\napplication_token_file = \"/etc/b24eventd/erp.token\"",
        );
        let HttpFormat::BitrixForm(form) = http_config(&text).format else {
            panic!("bitrix-form expected")
        };
        assert_eq!(
            form.application_token,
            SecretSource::File("/etc/b24eventd/erp.token".into())
        );
        let text = http_toml("format = \"bitrix-form\"\nbitrix_member_id = \"m\"");
        let HttpFormat::BitrixForm(form) = http_config(&text).format else {
            panic!("bitrix-form expected")
        };
        assert_eq!(
            form.application_token,
            SecretSource::Credential("erp.application_token".into())
        );

        assert_err(
            &http_toml("format = \"bitrix-form\""),
            "sinks.erp.bitrix_member_id",
            "missing required key for format = \"bitrix-form\"",
        );
        assert_err(
            &http_toml("format = \"bitrix-form\"\nbitrix_member_id = \" \""),
            "sinks.erp.bitrix_member_id",
            "must not be empty",
        );
        let err = assert_err(
            &bitrix("application_token_file = \"/t\""),
            "sinks.erp.application_token",
            "both application_token and application_token_file",
        );
        assert!(!err.message.contains("t0ken"), "{err}");
        assert_err(
            &http_toml(
                "format = \"bitrix-form\"\nbitrix_member_id = \"m\"\napplication_token = \"\"",
            ),
            "sinks.erp.application_token",
            "must not be empty",
        );
        assert_err(
            &bitrix("bitrix_domain = \"https://x.bitrix24.com/\""),
            "sinks.erp.bitrix_domain",
            "without scheme or path",
        );
        assert_err(
            &bitrix("event_handler_id = -1"),
            "sinks.erp.event_handler_id",
            "invalid",
        );
        for key in [
            "bitrix_domain = \"x.bitrix24.com\"",
            "bitrix_member_id = \"m\"",
            "application_token = \"t\"",
            "application_token_file = \"/t\"",
            "event_handler_id = 5",
        ] {
            let name = key.split(' ').next().unwrap();
            assert_err(
                &http_toml(key),
                &format!("sinks.erp.{name}"),
                "only used with format = \"bitrix-form\"",
            );
            for other in [
                "type = \"file\"\npath = \"/tmp/x\"",
                "type = \"exec\"\ncommand = [\"/bin/x\"]",
            ] {
                assert_err(
                    &sink(&format!("{other}\n{key}")),
                    &format!("sinks.erp.{name}"),
                    "not a key of a",
                );
            }
        }
    }

    #[test]
    fn http_bitrix_form_routes_exactly_one_portal() {
        let two_portals = |sink_keys: &str| {
            format!(
                "{}\n[portals.other]\nclient_endpoint = \"https://other.bitrix24.com/rest/\"\nclient_id = \"local.1.2\"\nclient_secret = \"s\"\nevents = [\"ONCRMDEALADD\"]\n",
                bitrix(sink_keys)
            )
        };
        let err = assert_err(
            &two_portals(""),
            "sinks.erp.portals",
            "must route exactly one portal",
        );
        assert!(err.message.contains("auth[]"), "{err}");
        assert!(
            err.message.contains("configured portals: main, other"),
            "{err}"
        );
        assert_err(
            &two_portals("portals = [\"main\", \"other\"]"),
            "sinks.erp.portals",
            "must route exactly one portal",
        );
        let config = load_str(&two_portals("portals = [\"other\"]"), &[]).unwrap();
        let SinkKind::Http(HttpSinkConfig {
            format: HttpFormat::BitrixForm(form),
            ..
        }) = &config.sinks["erp"].kind
        else {
            panic!("bitrix-form expected")
        };
        assert_eq!(form.domain, "other.bitrix24.com");
    }

    #[test]
    fn http_signing_secret() {
        let http = http_config(&http_toml(&format!(
            "signing_secret = \"{SIGNING_SECRET}\""
        )));
        assert_eq!(
            http.signing_secret,
            Some(SecretSource::Inline(Secret::new(SIGNING_SECRET)))
        );
        assert!(!format!("{http:?}").contains("MfKQ"), "{http:?}");
        let http = http_config(&http_toml(
            "signing_secret_file = \"/etc/b24eventd/erp.key\"",
        ));
        assert_eq!(
            http.signing_secret,
            Some(SecretSource::File("/etc/b24eventd/erp.key".into()))
        );
        assert_eq!(http_config(&http_toml("")).signing_secret, None);

        let err = assert_err(
            &http_toml("signing_secret = \"whsec_%%%notbase64\""),
            "sinks.erp.signing_secret",
            "not valid base64",
        );
        assert!(!err.message.contains("notbase64"), "{err}");
        assert_err(
            &http_toml("signing_secret = \"whsec_c2hvcnQ=\""),
            "sinks.erp.signing_secret",
            "24 to 64 random bytes",
        );
        assert_err(
            &http_toml(&format!(
                "signing_secret = \"{SIGNING_SECRET}\"\nsigning_secret_file = \"/k\""
            )),
            "sinks.erp.signing_secret",
            "both signing_secret and signing_secret_file",
        );
        assert_err(
            &http_toml(&format!(
                "signing_secret = \"{SIGNING_SECRET}\"\nheaders = {{ Webhook-Signature = \"x\" }}"
            )),
            "sinks.erp.headers.Webhook-Signature",
            "set by the sink when signing_secret is set",
        );
        // Unsigned sinks may pass such a header through.
        http_config(&http_toml("headers = { Webhook-Id = \"x\" }"));

        // An environment variable sets the secret; a bad one is named without its value.
        let err = load_str(
            &http_toml(""),
            &[("B24EVENTD_SINKS__ERP__SIGNING_SECRET", "whsec_12345")],
        )
        .unwrap_err();
        assert_eq!(err.key, "sinks.erp.signing_secret");
        assert!(!err.to_string().contains("12345"), "{err}");
    }

    #[test]
    fn http_status_overrides() {
        let http = http_config(&http_toml(
            "retry_on = [409, 423, 409]\ndead_on = [503, 301]",
        ));
        assert_eq!(
            http.statuses,
            StatusOverrides {
                retry_on: vec![409, 423],
                dead_on: vec![503, 301]
            }
        );
        assert_eq!(
            http_config(&http_toml("")).statuses,
            StatusOverrides::default()
        );
        assert_err(
            &http_toml("retry_on = [409, 600]"),
            "sinks.erp.retry_on[1]",
            "between 100 and 599, got 600",
        );
        assert_err(
            &http_toml("dead_on = [99]"),
            "sinks.erp.dead_on[0]",
            "between 100 and 599, got 99",
        );
        assert_err(
            &http_toml("dead_on = [70000]"),
            "sinks.erp.dead_on[0]",
            "got 70000",
        );
        assert_err(
            &http_toml("dead_on = [500, 204]"),
            "sinks.erp.dead_on[1]",
            "204 is a success status",
        );
        assert_err(
            &http_toml("retry_on = [409, 503]\ndead_on = [503]"),
            "sinks.erp.dead_on[0]",
            "503 is also listed in retry_on",
        );
        assert_err(
            &http_toml("retry_on = \"409\""),
            "sinks.erp.retry_on",
            "invalid type",
        );
    }

    #[test]
    fn http_secrets_resolve_from_files_and_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("erp.key");
        std::fs::write(&key_file, format!("{SIGNING_SECRET}\n")).unwrap();
        let text = bitrix(&format!("signing_secret_file = \"{}\"", key_file.display()))
            .replace("application_token = \"t0ken\"\n", "");
        let http = http_config(&text);

        let creds = tempfile::tempdir().unwrap();
        std::fs::write(creds.path().join("erp.application_token"), "from-cred\n").unwrap();
        let secrets = resolve_http_secrets_in("erp", &http, Some(creds.path())).unwrap();
        assert_eq!(
            secrets.application_token.as_ref().map(Secret::expose),
            Some("from-cred")
        );
        assert!(secrets.signing_key.is_some());
        assert!(!format!("{secrets:?}").contains("from-cred"));

        let err = resolve_http_secrets_in("erp", &http, None).unwrap_err();
        assert_eq!(err.key, "sinks.erp.application_token");
        for needle in [
            "no application token configured",
            "B24EVENTD_SINKS__ERP__APPLICATION_TOKEN",
            "application_token_file",
            "\"erp.application_token\"",
        ] {
            assert!(err.message.contains(needle), "{needle:?} not in {err}");
        }

        std::fs::write(&key_file, "whsec_c2hvcnQ=").unwrap();
        let err = resolve_http_secrets_in("erp", &http, Some(creds.path())).unwrap_err();
        assert_eq!(err.key, "sinks.erp.signing_secret_file");
        assert!(err.file.ends_with("erp.key"), "{err}");
        assert!(err.message.contains("decodes to 5 bytes"), "{err}");
        assert!(!err.message.contains("c2hvcnQ"), "{err}");

        std::fs::write(&key_file, "\n").unwrap();
        let err = resolve_http_secrets_in("erp", &http, Some(creds.path())).unwrap_err();
        assert!(
            err.message.contains("the signing secret file is empty"),
            "{err}"
        );

        // json sinks without signing need nothing.
        let plain = http_config(&http_toml(""));
        let secrets = resolve_http_secrets_in("erp", &plain, None).unwrap();
        assert!(secrets.signing_key.is_none() && secrets.application_token.is_none());
    }

    #[test]
    fn exec_sink_keys() {
        assert_err(
            &sink("type = \"exec\""),
            "sinks.erp.command",
            "missing required key: the program and its arguments",
        );
        assert_err(
            &sink("type = \"exec\"\ncommand = []"),
            "sinks.erp.command",
            "must not be empty",
        );
        assert_err(
            &sink("type = \"exec\"\ncommand = [\" \", \"--verbose\"]"),
            "sinks.erp.command[0]",
            "must not be empty: the program to run",
        );
        assert_err(
            &sink("type = \"exec\"\ncommand = [\"/bin/x\", \"a\\u0000b\"]"),
            "sinks.erp.command[1]",
            "NUL",
        );
        assert_err(
            &sink("type = \"exec\"\ncommand = \"/bin/x --verbose\""),
            "sinks.erp.command",
            "invalid type",
        );
        assert_err(
            &sink("type = \"exec\"\ncommand = [\"/bin/x\"]\npermanent_exit_codes = [3, 0]"),
            "sinks.erp.permanent_exit_codes[1]",
            "0 means delivered and cannot be a permanent failure",
        );
        assert_err(
            &sink("type = \"exec\"\ncommand = [\"/bin/x\"]\npermanent_exit_codes = [256]"),
            "sinks.erp.permanent_exit_codes[0]",
            "between 1 and 255, got 256",
        );
        assert_err(
            &sink("type = \"exec\"\ncommand = [\"/bin/x\"]\nurl = \"http://x/\""),
            "sinks.erp.url",
            "not a key of a \"exec\" sink",
        );
        assert_err(
            &sink("type = \"exec\"\ncommand = [\"/bin/x\"]\nheaders = { X-A = \"a\" }"),
            "sinks.erp.headers",
            "not a key of a \"exec\" sink",
        );
        assert_err(
            &sink("type = \"exec\"\ncommand = [\"/bin/x\"]\npath = \"/tmp/x\""),
            "sinks.erp.path",
            "not a key of a \"exec\" sink",
        );
        assert_err(
            &sink("type = \"http\"\nurl = \"http://x/\"\ncommand = [\"/bin/x\"]"),
            "sinks.erp.command",
            "not a key of a \"http\" sink",
        );
        assert_err(
            &sink("type = \"file\"\npath = \"/tmp/x\"\npermanent_exit_codes = [3]"),
            "sinks.erp.permanent_exit_codes",
            "not a key of a \"file\" sink",
        );
        assert_err(
            &sink("type = \"exec\"\ncommand = [\"/bin/x\"]\nenv = { B24_EVENT_ID = \"x\" }"),
            "sinks.erp.env.B24_EVENT_ID",
            "set by the sink",
        );
        assert_err(
            &sink("type = \"exec\"\ncommand = [\"/bin/x\"]\nenv = { \"A=B\" = \"x\" }"),
            "sinks.erp.env.A=B",
            "invalid variable name",
        );
        assert_err(
            &sink("type = \"exec\"\ncommand = [\"/bin/x\"]\nworking_dir = \"\""),
            "sinks.erp.working_dir",
            "must not be empty",
        );
        let err = assert_err(
            &sink("type = \"exec\"\ncommand = [\"/bin/x\"]\nenv = { TOKEN = 12345 }"),
            "sinks.erp.env.TOKEN",
            "invalid",
        );
        assert!(
            !err.message.contains("12345"),
            "env values are not echoed: {err}"
        );

        let config = load_str(
            &sink("type = \"exec\"\ncommand = [\"on-deal\", \"--verbose\"]\npermanent_exit_codes = [3, 65]\nenv = { ERP_TOKEN = \"t0k\" }\nworking_dir = \"/srv/hooks\"\nconcurrency = 2"),
            &[],
        )
        .unwrap();
        let s = &config.sinks["erp"];
        assert_eq!(s.kind.type_name(), "exec");
        assert_eq!(s.concurrency, 2);
        let SinkKind::Exec(exec) = &s.kind else {
            panic!("exec sink expected")
        };
        assert_eq!(exec.command, vec!["on-deal", "--verbose"]);
        assert_eq!(exec.permanent_exit_codes, vec![3, 65]);
        assert_eq!(exec.env["ERP_TOKEN"], "t0k");
        assert_eq!(exec.working_dir.as_deref(), Some(Path::new("/srv/hooks")));
        assert!(
            !format!("{config:?}").contains("t0k"),
            "env values stay out of Debug"
        );

        // Only `command` is required; the environment can set the others.
        let config = load_str(
            &sink("type = \"exec\"\ncommand = [\"/bin/x\"]"),
            &[
                ("B24EVENTD_SINKS__ERP__PERMANENT_EXIT_CODES", "[7]"),
                ("B24EVENTD_SINKS__ERP__ENV__SECRET", "0042"),
                ("B24EVENTD_SINKS__ERP__WORKING_DIR", "/tmp"),
            ],
        )
        .unwrap();
        let SinkKind::Exec(exec) = &config.sinks["erp"].kind else {
            panic!("exec sink expected")
        };
        assert_eq!(exec.permanent_exit_codes, vec![7]);
        assert_eq!(exec.env["secret"], "0042", "env values stay strings");
        assert_eq!(exec.working_dir.as_deref(), Some(Path::new("/tmp")));
    }

    #[test]
    fn sink_common_keys() {
        let base = "type = \"file\"\npath = \"/tmp/x\"\n";
        assert_err(
            &sink(&format!("{base}concurrency = 0")),
            "sinks.erp.concurrency",
            "between 1 and 256",
        );
        assert_err(
            &sink(&format!("{base}concurrency = 257")),
            "sinks.erp.concurrency",
            "between 1 and 256",
        );
        assert_err(
            &sink(&format!("{base}timeout = \"0s\"")),
            "sinks.erp.timeout",
            "longer than 0s",
        );
        assert_err(
            &sink(&format!("{base}events = [\"\"]")),
            "sinks.erp.events[0]",
            "must not be empty",
        );
        let err = assert_err(
            &sink(&format!("{base}portals = [\"main\", \"other\"]")),
            "sinks.erp.portals[1]",
            "unknown portal \"other\"",
        );
        assert!(err.message.contains("configured portals: main"));
        assert_err(
            &sink(&format!("{base}[sinks.erp.retry]\nmax_attempts = 0")),
            "sinks.erp.retry.max_attempts",
            "at least 1",
        );
        assert_err(
            &sink(&format!(
                "{base}[sinks.erp.retry]\ninitial_backoff = \"5m\"\nmax_backoff = \"1m\""
            )),
            "sinks.erp.retry.initial_backoff",
            "must not exceed retry.max_backoff (1m)",
        );
        assert_err(
            &sink(&format!("{base}events = \"ONCRMDEALADD\"")),
            "sinks.erp.events",
            "invalid type",
        );

        let config = load_str(
            &sink(&format!("{base}events = [\"ONCRMDEAL*\"]\nportals = [\"main\"]\ntimeout = \"3s\"\nconcurrency = 16\n[sinks.erp.retry]\nmax_attempts = 3\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"")),
            &[],
        )
        .unwrap();
        let s = &config.sinks["erp"];
        assert_eq!(s.route.events, vec!["ONCRMDEAL*"]);
        assert_eq!(s.route.portals, vec!["main"]);
        assert_eq!(s.timeout, Duration::from_secs(3));
        assert_eq!(s.concurrency, 16);
        assert_eq!(
            s.retry,
            RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1)
            }
        );
    }

    #[test]
    fn validate_is_pure_over_raw() {
        let raw = RawConfig {
            portals: BTreeMap::from([(
                "p".to_string(),
                RawPortal {
                    client_endpoint: Some("http://127.0.0.1:1/rest/".into()),
                    client_id: Some("id".into()),
                    events: Some(vec!["ONTASKUPDATE".into()]),
                    ..RawPortal::default()
                },
            )]),
            sinks: BTreeMap::from([(
                "s".to_string(),
                RawSink {
                    kind: Some("file".into()),
                    path: Some("/tmp/x".into()),
                    ..RawSink::default()
                },
            )]),
            state_directory: Some("/state".into()),
            ..RawConfig::default()
        };
        let config = validate(raw, Path::new("inline.toml")).unwrap();
        assert_eq!(config.source, PathBuf::from("inline.toml"));
        assert_eq!(config.journal.path, PathBuf::from("/state/journal.db"));
        assert_eq!(
            config.portals["p"].client_secret,
            SecretSource::Credential("p.client_secret".into())
        );
    }

    #[test]
    fn default_config_path_order() {
        assert_eq!(
            choose_config_path(Some("/x/y.toml".into()), true),
            PathBuf::from("/x/y.toml")
        );
        assert_eq!(
            choose_config_path(Some("".into()), true),
            PathBuf::from("b24eventd.toml")
        );
        assert_eq!(
            choose_config_path(None, true),
            PathBuf::from("b24eventd.toml")
        );
        assert_eq!(
            choose_config_path(None, false),
            PathBuf::from("/etc/b24eventd/config.toml")
        );
    }

    #[test]
    fn redact_url_strips_userinfo() {
        assert_eq!(
            redact_url("https://user:pw@host:8080/p?q=1"),
            "https://host:8080/p?q=1"
        );
        assert_eq!(redact_url("http://host/p"), "http://host/p");
        assert_eq!(redact_url("weird://user:pw@"), "weird://");
    }

    #[test]
    fn example_config_validates() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"));
        let config = load_with_env(path, &[]).unwrap_or_else(|e| panic!("{e}"));
        assert!(config.portals.contains_key("main"));
        let kinds: Vec<&str> = config.sinks.values().map(|s| s.kind.type_name()).collect();
        assert!(
            kinds.contains(&"file") && kinds.contains(&"http"),
            "{kinds:?}"
        );

        // Every key of the example is spelled as the loader expects, commented-out ones (and
        // commented-out tables) too: uncomment them all and the result must still validate.
        let text = std::fs::read_to_string(path).unwrap();
        let uncommented: String = text
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest) if looks_like_key(rest) || looks_like_table(rest) => rest,
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let f = write_config(&uncommented);
        let config =
            load_with_env(f.path(), &[]).unwrap_or_else(|e| panic!("uncommented example: {e}"));
        assert!(config.portals["main"].auth_connector.is_some());
        assert_eq!(config.portals["main"].enrich.len(), 2);
        assert_eq!(
            config.alerts.as_ref().map(|a| a.sink.as_str()),
            Some("notify")
        );
        let SinkKind::Exec(exec) = &config.sinks["notify"].kind else {
            panic!(
                "the example's commented-out exec sink: {:?}",
                config.sinks.keys()
            )
        };
        assert_eq!(exec.command, vec!["/usr/local/bin/on-deal", "--verbose"]);
        assert_eq!(exec.permanent_exit_codes, vec![65]);
        assert!(exec.env.contains_key("ERP_URL") && exec.working_dir.is_some());
        let SinkKind::Http(erp) = &config.sinks["erp"].kind else {
            panic!("the example's http sink")
        };
        assert!(erp.signing_secret.is_some());
        assert_eq!(erp.statuses.retry_on, vec![409, 423]);
        let SinkKind::Http(legacy) = &config.sinks["legacy_php"].kind else {
            panic!("the example's commented-out bitrix-form sink")
        };
        let HttpFormat::BitrixForm(form) = &legacy.format else {
            panic!("bitrix-form expected")
        };
        assert_eq!(form.event_handler_id, 975);
        assert_eq!(form.domain, "example.bitrix24.com");
    }

    /// A commented-out table header such as `[sinks.notify]` (not prose).
    fn looks_like_table(line: &str) -> bool {
        line.strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .is_some_and(|name| {
                !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.')
            })
    }

    /// A commented-out `key = value` line (not prose).
    fn looks_like_key(line: &str) -> bool {
        match line.split_once(" = ") {
            Some((key, _)) => {
                let quoted = key.len() > 2 && key.starts_with('"') && key.ends_with('"');
                quoted
                    || (!key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
            }
            None => false,
        }
    }

    #[test]
    fn reload_diff_names_sink_changes_and_restart_keys() {
        let base = format!(
            "{}\n[sinks.keep]\ntype = \"file\"\npath = \"/tmp/a.jsonl\"\n[sinks.edit]\ntype = \"file\"\npath = \"/tmp/b.jsonl\"\n[sinks.drop]\ntype = \"file\"\npath = \"/tmp/c.jsonl\"\n",
            portal("")
        );
        let running = load_str(&base, &[]).unwrap();
        let same = load_str(&base, &[]).unwrap();
        assert!(sink_changes(&running, &same).is_empty());
        assert!(changes_needing_restart(&running, &same).is_empty());

        let edited = base.replace("/tmp/b.jsonl", "/tmp/b2.jsonl").replace(
            "[sinks.drop]\ntype = \"file\"\npath = \"/tmp/c.jsonl\"\n",
            "",
        ) + "[sinks.new]\ntype = \"file\"\npath = \"/tmp/d.jsonl\"\n"
            + "[journal]\nretention = \"7d\"\n";
        let reloaded = load_str(&edited, &[]).unwrap();
        assert_eq!(
            sink_changes(&running, &reloaded),
            SinkChanges {
                added: vec!["new".into()],
                removed: vec!["drop".into()],
                changed: vec!["edit".into()],
            }
        );
        assert_eq!(
            changes_needing_restart(&running, &reloaded),
            vec!["journal"]
        );

        let portal_edit = base.replace("client_id = ", "batch_size = 10\nclient_id = ");
        let reloaded = load_str(&portal_edit, &[]).unwrap();
        assert_eq!(
            changes_needing_restart(&running, &reloaded),
            vec!["portals.main"]
        );
    }

    #[test]
    fn log_format() {
        let format = |extra: &str, env: &[(&str, &str)]| {
            load_str(&format!("{extra}\n{}", portal("")), env).map(|c| c.log_format)
        };
        assert_eq!(format("", &[]).unwrap(), LogFormat::Text);
        assert_eq!(
            format("log_format = \"json\"", &[]).unwrap(),
            LogFormat::Json
        );
        assert_eq!(
            format("", &[("B24EVENTD_LOG_FORMAT", "json")]).unwrap(),
            LogFormat::Json
        );
        let err = format("log_format = \"xml\"", &[]).unwrap_err();
        assert_eq!(err.key, "log_format");
        assert!(err.message.contains("\"json\""), "{err}");
    }

    #[test]
    fn alerts_section() {
        let base = format!(
            "{}\n[sinks.ops]\ntype = \"file\"\npath = \"/tmp/ops.jsonl\"\n",
            portal("")
        );
        assert_eq!(load_str(&base, &[]).unwrap().alerts, None);
        let config = load_str(
            &format!("{base}[alerts]\nsink = \"ops\"\nunsettled_above = 50\njournal_larger_than = \"2GiB\"\n"),
            &[],
        )
        .unwrap();
        let alerts = config.alerts.unwrap();
        assert_eq!(alerts.sink, "ops");
        assert_eq!(alerts.unsettled_above, Some(50));
        assert_eq!(alerts.unsettled_for, Duration::from_secs(300));
        assert!(alerts.on_dead);
        assert_eq!(alerts.portal_failing_for, Some(Duration::from_secs(600)));
        assert_eq!(alerts.oldest_pending_older_than, None);
        assert_eq!(alerts.journal_larger_than, Some(2 << 30));
        assert_err(
            &format!("{base}[alerts]\nunsettled_above = 5\n"),
            "alerts.sink",
            "missing required key",
        );
        assert_err(
            &format!("{base}[alerts]\nsink = \"pager\"\n"),
            "alerts.sink",
            "unknown sink \"pager\"",
        );
        assert_err(
            &format!("{base}[alerts]\nsink = \"ops\"\njournal_larger_than = \"lots\"\n"),
            "alerts.journal_larger_than",
            "invalid size",
        );
        assert_err(
            &format!("{base}[alerts]\nsink = \"ops\"\nunsettled_above = 0\n"),
            "alerts.unsettled_above",
            "at least 1",
        );
        assert_err(
            &format!("{base}[alerts]\nsink = \"ops\"\nemail = \"x\"\n"),
            "alerts.email",
            "unknown key",
        );
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("1048576"), Some(1 << 20));
        assert_eq!(parse_bytes("500MB"), Some(500_000_000));
        assert_eq!(parse_bytes("2 GiB"), Some(2 << 30));
        assert_eq!(parse_bytes("1kib"), Some(1024));
        assert_eq!(parse_bytes("MB"), None);
        assert_eq!(parse_bytes("1.5GB"), None);
    }
}
