//! Loading: the file path, figment layering (defaults < TOML < `B24EVENTD_*`), the raw
//! structs, figment's errors turned into `ConfigError`s naming the key, and the credentials a
//! loaded config registers with the scrubber.

use super::CONFIG_ENV;
use super::raw::RawConfig;
use super::types::Config;
use super::validate::validate;
use crate::options::{
    ConfigError, ENV_PREFIX, ENV_SOURCE, IGNORED_ENV, env_var_name, push_leaf, render_key,
};
use figment::providers::Format;
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

const LOCAL_CONFIG: &str = "b24eventd.toml";
const SYSTEM_CONFIG: &str = "/etc/b24eventd/config.toml";

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
/// output shows them: the userinfo of sink URLs and of the journal's URL (with the `Basic` credentials an HTTP client
/// makes of it) and the values of http sink headers that carry credentials. Inline secrets
/// register themselves as [`Secret`]s. The journal's PostgreSQL URL likewise.
fn register_credentials(config: &Config) {
    if let Some(pg) = &config.journal.postgres {
        crate::sinks::register_url_password(&pg.url);
    }
    for sink in config.sinks.values() {
        sink.kind.register_credentials();
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

    let env = EnvOverrides::from_env(env);
    let env_keys = env.vars.iter().map(|(path, _)| path.clone()).collect();
    let mut raw = Figment::new()
        .merge(toml)
        .merge(env)
        .extract::<RawConfig>()
        .map_err(|e| figment_error(e, &file))?;
    raw.env_keys = env_keys;
    Ok(raw)
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

/// Keys whose values must never be echoed in an error message.
fn is_secret_key(path: &[String]) -> bool {
    let leaf = path.last().map(String::as_str).unwrap_or_default();
    matches!(
        leaf,
        "client_secret" | "signing_secret" | "application_token"
    ) || (path.len() >= 3 && path[0] == "sinks" && matches!(path[2].as_str(), "headers" | "env"))
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;
    use crate::config::*;
    use crate::options::*;
    use crate::sinks::http::HttpFormat;
    use std::time::Duration;

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
        // `[journal]` offers SQLite's keys and PostgreSQL's, which exclude each other: each set
        // is checked on its own.
        let without = |keys: &[&str]| -> String {
            uncommented
                .lines()
                .filter(|line| !keys.iter().any(|k| line.starts_with(k)))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let f = write_config(&without(&[
            "path = \"/var/lib/b24eventd/journal.db\"",
            "synchronous = ",
        ]));
        let on_postgres = load_with_env(f.path(), &[])
            .unwrap_or_else(|e| panic!("uncommented example, PostgreSQL journal: {e}"));
        let pg = on_postgres
            .journal
            .postgres
            .expect("the journal in PostgreSQL");
        assert_eq!((pg.schema.as_str(), pg.max_connections), ("b24eventd", 8));
        let f = write_config(&without(&[
            "url = \"postgres://b24eventd:PASSWORD",
            "schema = ",
            "max_connections = ",
            "lease_ttl = ",
        ]));
        let config =
            load_with_env(f.path(), &[]).unwrap_or_else(|e| panic!("uncommented example: {e}"));
        assert!(config.journal.postgres.is_none());
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

    /// A comment that documents a key stands right above that key's line: a prose line after a
    /// key line and before a table header or a blank line is a key's description whose
    /// `# key = default` line is missing (the amqp and mqtt examples had "Bound on ..."
    /// without `# timeout = "10s"`).
    #[test]
    fn every_key_description_in_the_example_has_its_key_line() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml"));
        let text = std::fs::read_to_string(path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let bare = |line: &str| line.strip_prefix("# ").unwrap_or(line).to_string();
        let key = |line: &str| looks_like_key(&bare(line));
        let table = |line: &str| looks_like_table(&bare(line));
        let mut orphans = Vec::new();
        for (i, window) in lines.windows(3).enumerate() {
            let [before, line, after] = window else {
                unreachable!()
            };
            let prose = line.starts_with('#') && !key(line) && !table(line);
            if prose && key(before) && (table(after) || after.trim().is_empty()) {
                orphans.push(format!("line {}: {line}", i + 2));
            }
        }
        assert!(
            orphans.is_empty(),
            "descriptions without their key line: {orphans:?}"
        );
        assert!(
            text.matches("timeout = \"10s\"").count() >= 8,
            "every sink type shows its timeout"
        );
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
    fn env_sets_the_keys_a_sink_type_defines() {
        let config = load_str(
            &sink("type = \"redis\"\nurl = \"redis://h\""),
            &[
                ("B24EVENTD_SINKS__ERP__MAXLEN", "50"),
                ("B24EVENTD_SINKS__ERP__STREAM", "s:{event}"),
            ],
        )
        .unwrap();
        let SinkKind::Redis(redis) = &config.sinks["erp"].kind else {
            panic!("redis sink expected")
        };
        assert_eq!(
            (redis.maxlen, redis.stream.as_str()),
            (Some(50), "s:{event}")
        );
        let config = load_str(
            &sink("type = \"mqtt\"\nurl = \"mqtt://h\""),
            &[
                ("B24EVENTD_SINKS__ERP__RETAIN", "true"),
                ("B24EVENTD_SINKS__ERP__TOPIC", "t/{portal}"),
            ],
        )
        .unwrap();
        let SinkKind::Mqtt(mqtt) = &config.sinks["erp"].kind else {
            panic!("mqtt sink expected")
        };
        assert!(mqtt.retain);
        assert_eq!(mqtt.topic, "t/{portal}");
    }
}
