//! `[sinks.NAME]`: the keys every sink has (route, timeout, concurrency, retry) and the `type`,
//! whose module in `sinks` reads the other keys.

use super::{Validator, valid_name};
use crate::config::raw::RawSink;
use crate::config::types::PortalConfig;
use crate::options::{ConfigError, PortalRef, SinkOptions};
use crate::sinks::{RetryPolicy, SinkConfig, SinkKind};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(super) const DEFAULT_SINK_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_SINK_CONCURRENCY: usize = 4;
const MAX_SINK_CONCURRENCY: usize = 256;
const DEFAULT_MAX_ATTEMPTS: u32 = 12;
pub(super) const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);
pub(super) const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(600);

/// Every sink `type`, quoted, for error messages.
fn sink_types() -> String {
    crate::sinks::SINK_TYPES
        .iter()
        .map(|(kind, _)| kind)
        .map(|kind| format!("{kind:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Validator {
    /// Two file sinks appending to one file would interleave and rotate each other's output,
    /// and a file sink aimed at the journal would corrupt it: both are refused. Paths are
    /// compared as written with `.` and repeated slashes dropped, and, where they exist, after
    /// resolving symlinks.
    pub(super) fn file_sink_paths(
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

    pub(super) fn sink(
        &self,
        name: &str,
        mut raw: RawSink,
        portals: &BTreeMap<String, PortalConfig>,
    ) -> Result<SinkConfig, ConfigError> {
        let k = |key: &str| format!("sinks.{name}.{key}");
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

        let Some(kind) = raw.kind.as_deref() else {
            return Err(self.err(
                k("type"),
                format!("missing required key; supported types: {}", sink_types()),
            ));
        };
        let Some((kind, parse)) = crate::sinks::sink_type(kind) else {
            return Err(self.err(
                k("type"),
                format!(
                    "unknown sink type {kind:?}; supported types: {}",
                    sink_types()
                ),
            ));
        };
        let portal_refs = portals
            .values()
            .map(|portal| PortalRef {
                name: portal.name.clone(),
                client_endpoint: portal.client_endpoint.clone(),
                oauth_token_url: portal.oauth_token_url.clone(),
            })
            .collect();
        let options = SinkOptions::new(&self.file, name, kind, options.into_iter().collect())
            .with_env_keys(self.env_keys_below(&["sinks", name]))
            .with_portals(portal_refs, routed_portals.clone());
        let kind = parse(&options)?;

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
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;
    use crate::sinks::http::HttpFormat;

    #[test]
    fn a_key_of_no_sink_type_is_named() {
        let err = load_str(
            &sink("type = \"file\"\npath = \"/tmp/x\"\nstream = \"s\""),
            &[],
        )
        .unwrap_err();
        assert_eq!(err.key, "sinks.erp.stream");
        assert!(
            err.message
                .starts_with("not a key of a \"file\" sink; its keys: path;"),
            "{err}"
        );
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
    fn the_type_chooses_the_module_that_reads_the_other_keys() {
        let err = assert_err(
            &sink("type = \"redis\"\nurl = \"redis://:hunter2@127.0.0.1/\"\npath = \"/tmp/x\""),
            "sinks.erp.path",
            "not a key of a \"redis\" sink; its keys: url, stream, maxlen",
        );
        assert!(
            err.message.ends_with(
                "every sink also has: type, events, portals, timeout, concurrency, retry"
            ),
            "{err}"
        );
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert_err(
            &sink("type = \"file\"\npath = \"/tmp/x\"\ncommand = [\"/bin/x\"]"),
            "sinks.erp.command",
            "not a key of a \"file\" sink; its keys: path;",
        );
    }

    #[test]
    fn a_type_key_set_by_the_environment_is_named_by_its_variable() {
        let err = load_str(
            &http_toml(""),
            &[("B24EVENTD_SINKS__ERP__RETRY_ON", "[409, 600]")],
        )
        .unwrap_err();
        assert_eq!(
            (err.file.as_str(), err.key.as_str()),
            (
                "environment variable B24EVENTD_SINKS__ERP__RETRY_ON",
                "sinks.erp.retry_on[1]"
            )
        );
        assert!(err.message.contains("got 600"), "{err}");
        let err = load_str(
            &http_toml(""),
            &[("B24EVENTD_SINKS__ERP__HEADERS__X-A", "a\u{1}b")],
        )
        .unwrap_err();
        assert_eq!(
            err.file,
            "environment variable B24EVENTD_SINKS__ERP__HEADERS__X-A"
        );
        assert_eq!(err.key, "sinks.erp.headers.x-a");

        // An environment variable sets the secret; a bad one is named without its value.
        let err = load_str(
            &http_toml(""),
            &[("B24EVENTD_SINKS__ERP__SIGNING_SECRET", "whsec_12345")],
        )
        .unwrap_err();
        assert_eq!(err.key, "sinks.erp.signing_secret");
        assert!(!err.to_string().contains("12345"), "{err}");
    }
}
