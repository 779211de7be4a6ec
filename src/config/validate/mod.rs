//! Validation (pure, no I/O): a `RawConfig` into a typed `Config`, or one `ConfigError` naming
//! the file and the key. Portals and the keys every sink has have a file each; a sink type's own
//! keys are read by its module in `sinks`.

mod portal;
mod sink;

use super::raw::{RawAdmin, RawAlerts, RawConfig, RawJournal};
use super::types::{
    AdminConfig, AlertsConfig, Config, DEFAULT_LEASE_TTL, JournalConfig, LogFormat, PortalConfig,
    PostgresJournalConfig, Synchronous,
};
use crate::options::{ConfigError, duration_problem, parse_bytes, parse_http_url};
use crate::sinks::SinkConfig;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_JOURNAL_FILE: &str = "journal.db";
const DEFAULT_JOURNAL_FALLBACK: &str = "./b24eventd.db";
pub(crate) const DEFAULT_JOURNAL_SCHEMA: &str = "b24eventd";
const DEFAULT_JOURNAL_CONNECTIONS: u64 = 8;
const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
const DEFAULT_PRUNE_SCHEDULE: &str = "0 30 3 * * *";
const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";

/// Checks that `schema` is a plain PostgreSQL schema name (`[journal] schema`, `journal migrate
/// --schema`): used unquoted in SQL and in the config, it must need no quoting.
pub(crate) fn check_schema_name(schema: &str) -> Result<(), String> {
    let plain = schema.len() <= 63
        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        Ok(())
    } else {
        Err(format!(
            "{schema:?} is not a plain schema name: use lowercase letters, digits and _, starting with a letter or _, at most 63"
        ))
    }
}

/// Checks a [`RawConfig`] and fills in defaults. Pure: reads no files and no environment.
pub(crate) fn validate(raw: RawConfig, source: &Path) -> Result<Config, ConfigError> {
    let v = Validator {
        file: source.display().to_string(),
        env_keys: raw.env_keys,
    };

    let lease_ttl = raw.journal.lease_ttl;
    let mut journal = v.journal(raw.journal, raw.state_directory.as_deref())?;
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

    journal.lease_ttl = v.lease_ttl(lease_ttl, &journal, &portals)?;

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

/// Parses a schedule the way the daemon does: cron with a seconds field, exactly 6 fields.
pub(crate) fn parse_cron(expr: &str) -> Result<croner::Cron, croner::errors::CronError> {
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
    /// The key paths a `B24EVENTD_*` variable set (see [`RawConfig::env_keys`]).
    env_keys: Vec<Vec<String>>,
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

    fn non_empty(&self, key: &str, value: Option<String>) -> Result<String, ConfigError> {
        match value {
            None => Err(self.err(key, "missing required key")),
            Some(s) if s.trim().is_empty() => Err(self.err(key, "must not be empty")),
            Some(s) => Ok(s.trim().to_string()),
        }
    }

    fn http_url(&self, key: &str, value: &str) -> Result<reqwest::Url, ConfigError> {
        parse_http_url(value).map_err(|problem| self.err(key, problem))
    }

    /// The key paths below `prefix` that a `B24EVENTD_*` variable set, without the prefix.
    fn env_keys_below(&self, prefix: &[&str]) -> Vec<Vec<String>> {
        self.env_keys
            .iter()
            .filter(|path| {
                path.len() > prefix.len() && path.iter().zip(prefix).all(|(a, b)| a == b)
            })
            .map(|path| path[prefix.len()..].to_vec())
            .collect()
    }

    fn journal(
        &self,
        raw: RawJournal,
        state_directory: Option<&Path>,
    ) -> Result<JournalConfig, ConfigError> {
        let postgres = self.postgres_journal(&raw)?;
        let in_current_directory =
            postgres.is_none() && raw.path.is_none() && state_directory.is_none();
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
            postgres,
            retention: self.duration("journal.retention", raw.retention, DEFAULT_RETENTION)?,
            prune_schedule: self.schedule(
                "journal.prune_schedule",
                raw.prune_schedule,
                DEFAULT_PRUNE_SCHEDULE,
            )?,
            synchronous,
            in_current_directory,
            lease_ttl: DEFAULT_LEASE_TTL,
        })
    }

    /// `journal.lease_ttl`: PostgreSQL only. An upstream call runs only while more lease time
    /// is left than its `request_timeout`, and the time left falls to about 57% of the TTL
    /// before each renewal, so the TTL must be at least twice the longest `request_timeout`.
    fn lease_ttl(
        &self,
        raw: Option<Duration>,
        journal: &JournalConfig,
        portals: &BTreeMap<String, PortalConfig>,
    ) -> Result<Duration, ConfigError> {
        let longest = portals
            .values()
            .map(|p| p.request_timeout)
            .max()
            .unwrap_or_default();
        let Some(ttl) = raw else {
            return Ok(DEFAULT_LEASE_TTL.max(longest.saturating_mul(3)));
        };
        if journal.postgres.is_none() {
            return Err(self.err(
                "journal.lease_ttl",
                "applies to a journal in PostgreSQL (several instances); set journal.url too, or remove it",
            ));
        }
        let ttl = self.duration("journal.lease_ttl", Some(ttl), DEFAULT_LEASE_TTL)?;
        if ttl < longest.saturating_mul(2) {
            return Err(self.err(
                "journal.lease_ttl",
                format!(
                    "{} is shorter than twice the longest portal request_timeout ({}): upstream calls would never have lease time for their timeout; raise lease_ttl or lower request_timeout",
                    humantime::format_duration(ttl),
                    humantime::format_duration(longest)
                ),
            ));
        }
        Ok(ttl)
    }

    /// `url`, `schema` and `max_connections`: the journal in PostgreSQL. `path` and
    /// `synchronous` are SQLite's and refused beside `url`, as `schema` and `max_connections`
    /// are without it.
    fn postgres_journal(
        &self,
        raw: &RawJournal,
    ) -> Result<Option<PostgresJournalConfig>, ConfigError> {
        let Some(url) = &raw.url else {
            for (key, set) in [
                ("journal.schema", raw.schema.is_some()),
                ("journal.max_connections", raw.max_connections.is_some()),
            ] {
                if set {
                    return Err(self.err(
                        key,
                        "applies to a journal in PostgreSQL; set journal.url too, or remove it",
                    ));
                }
            }
            return Ok(None);
        };
        for (key, set) in [
            ("journal.path", raw.path.is_some()),
            ("journal.synchronous", raw.synchronous.is_some()),
        ] {
            if set {
                return Err(self.err(
                    key,
                    "applies to a SQLite journal, and journal.url puts the journal in PostgreSQL; remove one of the two",
                ));
            }
        }
        crate::pg::connect_config(url).map_err(|m| self.err("journal.url", m))?;
        let schema = raw
            .schema
            .clone()
            .unwrap_or_else(|| DEFAULT_JOURNAL_SCHEMA.to_string());
        check_schema_name(&schema).map_err(|m| self.err("journal.schema", m))?;
        let max_connections = raw.max_connections.unwrap_or(DEFAULT_JOURNAL_CONNECTIONS);
        if !(2..=1000).contains(&max_connections) {
            return Err(self.err(
                "journal.max_connections",
                format!("{max_connections} is out of range: use 2 to 1000"),
            ));
        }
        Ok(Some(PostgresJournalConfig {
            url: url.clone(),
            schema,
            max_connections: max_connections as usize,
        }))
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
}

#[cfg(test)]
mod tests {
    use super::portal::*;
    use super::sink::*;
    use super::*;
    use crate::config::raw::{RawPortal, RawSink};
    use crate::config::test_support::*;
    use crate::config::*;
    use crate::options::*;
    use crate::sinks::file::FileSinkConfig;

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
    fn a_postgres_journal_takes_url_schema_and_connections_and_refuses_sqlite_keys() {
        let with = |journal: &str| load_str(&format!("[journal]\n{journal}\n{MINIMAL}"), &[]);
        let pg = with("url = \"postgres://b24:s3cret@db.internal:5432/events?sslmode=require\"")
            .unwrap()
            .journal;
        let on = pg.postgres.as_ref().expect("a PostgreSQL journal");
        assert_eq!((on.schema.as_str(), on.max_connections), ("b24eventd", 8));
        assert_eq!(
            pg.location(),
            "postgres://db.internal:5432/events?sslmode=require#b24eventd"
        );
        assert!(!format!("{pg:?}").contains("s3cret"), "{pg:?}");
        assert_eq!(pg.fallback_warning(Path::new("/home/operator")), None);
        let custom =
            with("url = \"postgres://db/events\"\nschema = \"b24_prod\"\nmax_connections = 20")
                .unwrap()
                .journal
                .postgres
                .unwrap();
        assert_eq!(
            (custom.schema.as_str(), custom.max_connections),
            ("b24_prod", 20)
        );

        for (journal, key, says) in [
            (
                "url = \"postgres://db/e\"\npath = \"/var/j.db\"",
                "journal.path",
                "applies to a SQLite journal",
            ),
            (
                "url = \"postgres://db/e\"\nsynchronous = \"full\"",
                "journal.synchronous",
                "applies to a SQLite journal",
            ),
            ("schema = \"x\"", "journal.schema", "set journal.url too"),
            (
                "max_connections = 4",
                "journal.max_connections",
                "set journal.url too",
            ),
            (
                "url = \"mysql://db/e\"",
                "journal.url",
                "unsupported scheme",
            ),
            (
                "url = \"postgres://db\"",
                "journal.url",
                "names no database",
            ),
            (
                "url = \"postgres://db/e\"\nschema = \"Public\"",
                "journal.schema",
                "not a plain schema name",
            ),
            (
                "url = \"postgres://db/e\"\nschema = \"a;drop\"",
                "journal.schema",
                "not a plain schema name",
            ),
            (
                "url = \"postgres://db/e\"\nmax_connections = 1",
                "journal.max_connections",
                "use 2 to 1000",
            ),
        ] {
            let e = with(journal).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(says), "{journal}: {e}");
        }
    }

    #[test]
    fn only_the_current_directory_fallback_warns() {
        let cwd = Path::new("/home/operator");
        let fallback = load_str(MINIMAL, &[]).unwrap();
        assert_eq!(
            fallback.journal.fallback_warning(cwd).as_deref(),
            Some(
                "[journal] path is unset and $STATE_DIRECTORY is not set (not under systemd): using \
                 ./b24eventd.db in the current directory (/home/operator/b24eventd.db); set [journal] \
                 path to the journal the service uses (the packaged service: run `b24eventd-as-service` as \
                 root instead)"
            )
        );
        let systemd = load_str(MINIMAL, &[("STATE_DIRECTORY", "/var/lib/b24eventd")]).unwrap();
        assert_eq!(systemd.journal.fallback_warning(cwd), None);
        let set = load_str(&format!("[journal]\npath = \"./j.db\"\n{MINIMAL}"), &[]).unwrap();
        assert_eq!(set.journal.fallback_warning(cwd), None);
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
                "journal.lease_ttl",
                with("[journal]\nurl = \"postgres://db/events\"\nlease_ttl = \"VALUE\""),
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
    fn the_lease_ttl_is_postgresql_only_and_leaves_room_for_an_upstream_call() {
        let pg = "[journal]\nurl = \"postgres://db/events\"";
        // Unset: 30 s, or three request timeouts (60 s by default) when that is longer.
        let default = load_str(&format!("{pg}\n{MINIMAL}"), &[]).unwrap();
        assert_eq!(default.journal.lease_ttl, Duration::from_secs(180));
        let short = load_str(
            &format!("{pg}\n{MINIMAL}").replace(
                "[portals.main]\n",
                "[portals.main]\nrequest_timeout = \"5s\"\n",
            ),
            &[],
        )
        .unwrap();
        assert_eq!(short.journal.lease_ttl, DEFAULT_LEASE_TTL);
        let set = load_str(&format!("{pg}\nlease_ttl = \"2m\"\n{MINIMAL}"), &[]).unwrap();
        assert_eq!(set.journal.lease_ttl, Duration::from_secs(120));
        let err = assert_err(
            &format!("{pg}\nlease_ttl = \"90s\"\n{MINIMAL}"),
            "journal.lease_ttl",
            "twice the longest portal request_timeout",
        );
        assert!(err.message.contains("1m"), "{err}");
        assert_err(
            &format!("[journal]\nlease_ttl = \"5m\"\n{MINIMAL}"),
            "journal.lease_ttl",
            "applies to a journal in PostgreSQL",
        );
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
            include_str!("../raw.rs"),
            include_str!("../../sinks/nats.rs"),
            include_str!("../../sinks/mqtt.rs"),
        ] {
            let mut lines = source.lines();
            while let Some(line) = lines.next() {
                if !line.contains("with = \"humantime_serde\"") || line.contains("line.contains") {
                    continue;
                }
                let field = lines.next().unwrap_or_default().trim();
                let name = field
                    .trim_start_matches("pub(crate) ")
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
                    options: BTreeMap::from([(
                        "path".to_string(),
                        figment::value::Value::from("/tmp/x"),
                    )]),
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
}
