//! The typed configuration `validate` produces: always valid, nothing downstream re-checks it.

use crate::options::SecretSource;
use crate::sinks::SinkConfig;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// The SQLite journal's file (unused when `postgres` is set). Default:
    /// `$STATE_DIRECTORY/journal.db`, else `./b24eventd.db`.
    pub path: PathBuf,
    /// `[journal] url`: the journal is in PostgreSQL, not in the file at `path`.
    pub postgres: Option<PostgresJournalConfig>,
    /// Settled events older than this are pruned.
    pub retention: Duration,
    /// Cron with seconds (6 fields), e.g. `0 30 3 * * *`.
    pub prune_schedule: String,
    pub synchronous: Synchronous,
    /// `path` is the `./b24eventd.db` fallback: `[journal] path` unset and no
    /// `$STATE_DIRECTORY` (not under systemd).
    pub in_current_directory: bool,
    /// `[journal] lease_ttl` (PostgreSQL): how long a portal's lease lasts without renewal;
    /// renewed every third of it. Unused on SQLite.
    pub lease_ttl: Duration,
}

/// `[journal] lease_ttl` when not set: 30 s, or three times the longest portal
/// `request_timeout` when that is longer (an upstream call must fit in the lease time left).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);

impl JournalConfig {
    /// Where the journal is, for messages: the file's absolute path (`./b24eventd.db` says
    /// nothing about which directory was meant), or the URL (without its password) and the
    /// schema.
    pub fn location(&self) -> String {
        match &self.postgres {
            Some(pg) => pg.location(),
            None => std::path::absolute(&self.path)
                .unwrap_or_else(|_| self.path.clone())
                .display()
                .to_string(),
        }
    }

    /// The warning of the commands that create a journal (`run`, `auth login`, `auth import`)
    /// when it falls back to the current directory `cwd`: a service reading another journal
    /// would find no tokens and no events there.
    pub fn fallback_warning(&self, cwd: &std::path::Path) -> Option<String> {
        self.in_current_directory.then(|| {
            let file = self.path.file_name().map(PathBuf::from).unwrap_or_default();
            format!(
                "[journal] path is unset and $STATE_DIRECTORY is not set (not under systemd): using \
                 {} in the current directory ({}); set [journal] path to the journal the service \
                 uses (the packaged service: run `b24eventd-as-service` as root instead)",
                self.path.display(),
                cwd.join(file).display()
            )
        })
    }
}

/// `[journal] url`, `schema`, `max_connections`: the journal in PostgreSQL.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresJournalConfig {
    /// `postgres://user:password@host:5432/database?sslmode=...`; print it with
    /// [`PostgresJournalConfig::location`].
    pub url: String,
    /// The schema holding the journal's tables (created at the first start).
    pub schema: String,
    /// The most connections of this process's pool to PostgreSQL (`run` keeps three more:
    /// the instance lock's, the lease-change listener's and the lease task's).
    pub max_connections: usize,
}

impl PostgresJournalConfig {
    /// The URL without its password, and the schema: `postgres://user@host:5432/db#schema`.
    pub fn location(&self) -> String {
        format!("{}#{}", crate::options::redact_url(&self.url), self.schema)
    }
}

impl std::fmt::Debug for PostgresJournalConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresJournalConfig")
            .field("url", &crate::options::redact_url(&self.url))
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .finish()
    }
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
    /// Where the client secret comes from; read with [`super::resolve_secret`].
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
