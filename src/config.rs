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
    pub rate_limit: RateLimit,
    pub max_unsettled: u32,
    pub error_lane_schedule: String,
    pub orphan_sweep_schedule: String,
    pub request_timeout: Duration,
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
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
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
        String::deserialize(deserializer).map(Secret)
    }
}

/// The client-side leaky bucket mirroring the portal's: `burst` requests at once, refilled at
/// `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub burst: u32,
    pub per_second: f64,
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
}

impl fmt::Debug for HttpSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSinkConfig")
            .field("url", &redact_url(&self.url))
            .field("format", &self.format)
            .field("headers", &RedactedValues(&self.headers))
            .finish()
    }
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpFormat {
    /// The envelope as one JSON object.
    Json,
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
    pub rate_limit: Option<RawRateLimit>,
    pub max_unsettled: Option<u32>,
    pub error_lane_schedule: Option<String>,
    pub orphan_sweep_schedule: Option<String>,
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub burst: Option<u32>,
    pub per_second: Option<f64>,
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
    validate(raw, path)
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
    "working_dir",
    // Durations: "5" must reach humantime (and fail there for lack of a unit), not be a number.
    "shutdown_timeout",
    "check_interval",
    "unsettled_for",
    "portal_failing_for",
    "oldest_pending_older_than",
    "retention",
    "poll_interval",
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
                "events" | "portals" | "command" | "permanent_exit_codes"
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
    matches!(leaf, "client_secret" | "signing_secret")
        || (path.len() >= 3 && path[0] == "sinks" && matches!(path[2].as_str(), "headers" | "env"))
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

    let alerts = match raw.alerts {
        Some(alerts) => Some(v.alerts(alerts, &sinks)?),
        None => None,
    };

    Ok(Config {
        journal,
        admin,
        alerts,
        shutdown_timeout: raw.shutdown_timeout.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT),
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

    fn nonzero(
        &self,
        key: &str,
        value: Option<Duration>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match value {
            Some(d) if d.is_zero() => Err(self.err(key, "must be longer than 0s")),
            Some(d) => Ok(d),
            None => Ok(default),
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
                Ok(_) => return Ok(expr),
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
            retention: self.nonzero("journal.retention", raw.retention, DEFAULT_RETENTION)?,
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
        let optional = |key: &str, value: Option<Duration>| match value {
            Some(d) if d.is_zero() => Err(self.err(key, "must be longer than 0s")),
            other => Ok(other),
        };
        Ok(AlertsConfig {
            sink,
            check_interval: self.nonzero(
                "alerts.check_interval",
                raw.check_interval,
                Duration::from_secs(30),
            )?,
            unsettled_above: raw.unsettled_above,
            unsettled_for: self.nonzero(
                "alerts.unsettled_for",
                raw.unsettled_for,
                Duration::from_secs(5 * 60),
            )?,
            on_dead: raw.on_dead.unwrap_or(true),
            portal_failing_for: optional("alerts.portal_failing_for", raw.portal_failing_for)?
                .or(Some(Duration::from_secs(10 * 60))),
            oldest_pending_older_than: optional(
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
            (Some(secret), None) => SecretSource::Inline(secret),
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
            poll_interval: self.nonzero(
                &k("poll_interval"),
                raw.poll_interval,
                DEFAULT_POLL_INTERVAL,
            )?,
            rate_limit: RateLimit { burst, per_second },
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
            request_timeout: self.nonzero(
                &k("request_timeout"),
                raw.request_timeout,
                DEFAULT_REQUEST_TIMEOUT,
            )?,
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

        let mut events = Vec::new();
        for (i, glob) in raw.events.unwrap_or_default().into_iter().enumerate() {
            if glob.trim().is_empty() {
                return Err(self.err(format!("{}[{i}]", k("events")), "must not be empty"));
            }
            events.push(glob.trim().to_string());
        }
        let mut routed_portals = Vec::new();
        for (i, portal) in raw.portals.unwrap_or_default().into_iter().enumerate() {
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

        let retry = raw.retry.unwrap_or_default();
        let max_attempts = retry.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if max_attempts < 1 {
            return Err(self.err(k("retry.max_attempts"), "must be at least 1"));
        }
        let initial_backoff = self.nonzero(
            &k("retry.initial_backoff"),
            retry.initial_backoff,
            DEFAULT_INITIAL_BACKOFF,
        )?;
        let max_backoff = retry.max_backoff.unwrap_or(DEFAULT_MAX_BACKOFF);
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

        if raw.signing_secret.is_some() {
            return Err(self.err(
                k("signing_secret"),
                "request signing is not supported by this version; remove the key",
            ));
        }
        if raw.signing_secret_file.is_some() {
            return Err(self.err(
                k("signing_secret_file"),
                "request signing is not supported by this version; remove the key",
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
                        ("format", raw.format.is_some()),
                        ("headers", raw.headers.is_some()),
                        ("command", raw.command.is_some()),
                        ("permanent_exit_codes", raw.permanent_exit_codes.is_some()),
                        ("env", raw.env.is_some()),
                        ("working_dir", raw.working_dir.is_some()),
                    ],
                )?;
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
                let url = self.non_empty(&k("url"), raw.url)?;
                self.http_url(&k("url"), &url)?;
                let format = match raw.format.as_deref() {
                    None | Some("json") => HttpFormat::Json,
                    Some(other) => {
                        return Err(self.err(
                            k("format"),
                            format!("unsupported format {other:?}; supported: \"json\""),
                        ));
                    }
                };
                let headers = raw.headers.unwrap_or_default();
                for (header, value) in &headers {
                    let key = format!("{}.{header}", k("headers"));
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
                    reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                        self.err(
                            &key,
                            "invalid header value (control characters or non-ASCII text)",
                        )
                    })?;
                }
                SinkKind::Http(HttpSinkConfig {
                    url,
                    format,
                    headers,
                })
            }
            Some("exec") => {
                self.no_options(name, "exec", &options)?;
                self.not_for_type(
                    name,
                    "exec",
                    &[
                        ("path", raw.path.is_some()),
                        ("url", raw.url.is_some()),
                        ("format", raw.format.is_some()),
                        ("headers", raw.headers.is_some()),
                    ],
                )?;
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
            timeout: self.nonzero(&k("timeout"), raw.timeout, DEFAULT_SINK_TIMEOUT)?,
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
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from);
    resolve_secret_in(portal, dir.as_deref())
}

/// [`resolve_secret`] with an explicit credentials directory.
pub fn resolve_secret_in(
    portal: &PortalConfig,
    credentials_dir: Option<&Path>,
) -> Result<Secret, ConfigError> {
    let name = &portal.name;
    match &portal.client_secret {
        SecretSource::Inline(secret) => Ok(secret.clone()),
        SecretSource::File(path) => {
            let key = format!("portals.{name}.client_secret_file");
            let secret = read_secret_file(path, &key)?;
            warn_if_shared(name, path);
            Ok(secret)
        }
        SecretSource::Credential(credential) => {
            let key = format!("portals.{name}.client_secret");
            let tried = format!(
                "tried client_secret (or {}), client_secret_file, and the systemd credential {credential:?}",
                env_var_name(&["portals", name, "client_secret"])
            );
            let Some(dir) = credentials_dir else {
                return Err(ConfigError::new(
                    "$CREDENTIALS_DIRECTORY",
                    key,
                    format!(
                        "no client secret configured: {tried}, but $CREDENTIALS_DIRECTORY is not set"
                    ),
                ));
            };
            let path = dir.join(credential);
            if !path.exists() {
                return Err(ConfigError::new(
                    path.display().to_string(),
                    key,
                    format!("no client secret configured: {tried}, which does not exist"),
                ));
            }
            read_secret_file(&path, &key)
        }
    }
}

fn read_secret_file(path: &Path, key: &str) -> Result<Secret, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(&file, key, format!("cannot read the client secret: {e}")))?;
    let secret = text.trim_end_matches(['\n', '\r']);
    if secret.trim().is_empty() {
        return Err(ConfigError::new(
            &file,
            key,
            "the client secret file is empty",
        ));
    }
    Ok(Secret::new(secret))
}

fn warn_if_shared(portal: &str, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                portal,
                path = %path.display(),
                mode = format_args!("{mode:04o}"),
                "client secret file is readable by group or others; chmod 0600 it"
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
                per_second: 2.0
            }
        );
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
                per_second: 5.0
            }
        );
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
    fn secret_never_prints() {
        let secret = Secret::new("hunter2");
        assert_eq!(format!("{secret}"), "[redacted]");
        assert_eq!(format!("{secret:?}"), "[redacted]");
        let config = load_str(&with("[sinks.erp]\ntype = \"http\"\nurl = \"https://user:pw@erp.local/x\"\nheaders = { Authorization = \"Bearer tok\" }"), &[]).unwrap();
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
            &sink("type = \"http\"\nurl = \"http://x/\"\nformat = \"bitrix-form\""),
            "sinks.erp.format",
            "unsupported format \"bitrix-form\"",
        );
        assert_err(
            &sink("type = \"http\"\nurl = \"http://x/\"\nsigning_secret_file = \"/k\""),
            "sinks.erp.signing_secret_file",
            "not supported",
        );
        assert_err(
            &sink("type = \"http\"\nurl = \"http://x/\"\nsigning_secret = \"k\""),
            "sinks.erp.signing_secret",
            "not supported",
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
                !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
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
