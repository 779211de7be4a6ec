//! `type = "exec"`: the exec sink's typed config and the parser of its keys (`command`,
//! `permanent_exit_codes`, `env`, `working_dir`).

use crate::options::{ConfigError, RedactedValues, SinkOptions};
use crate::sinks::SinkKind;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// Environment variables an exec sink sets itself for every event; `env` cannot set them.
pub const EXEC_EVENT_ENV: [&str; 4] = ["B24_EVENT_ID", "B24_EVENT", "B24_PORTAL", "B24_ATTEMPT"];

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

impl crate::sinks::SinkTypeConfig for ExecSinkConfig {}

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

/// The keys of an `exec` sink as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    command: Option<Vec<String>>,
    permanent_exit_codes: Option<Vec<i32>>,
    env: Option<BTreeMap<String, String>>,
    working_dir: Option<PathBuf>,
}

/// Reads and checks the keys of an `exec` sink (registered in [`crate::sinks::SINK_TYPES`]).
pub(crate) fn parse_config(options: &SinkOptions) -> Result<SinkKind, ConfigError> {
    let raw: Raw = options.parse()?;
    let example =
        "e.g. [\"/usr/local/bin/on-deal\", \"--verbose\"] (argv: never run through a shell)";
    let command = match raw.command {
        None => {
            return Err(options.err(
                "command",
                format!("missing required key: the program and its arguments, {example}"),
            ));
        }
        Some(argv) if argv.is_empty() => {
            return Err(options.err(
                "command",
                format!("must not be empty: give the program and its arguments, {example}"),
            ));
        }
        Some(argv) => argv,
    };
    if command[0].trim().is_empty() {
        return Err(options.err("command[0]", "must not be empty: the program to run"));
    }
    if let Some(i) = command.iter().position(|arg| arg.contains('\0')) {
        return Err(options.err(&format!("command[{i}]"), "must not contain a NUL character"));
    }

    let permanent_exit_codes = raw.permanent_exit_codes.unwrap_or_default();
    for (i, code) in permanent_exit_codes.iter().enumerate() {
        let key = format!("permanent_exit_codes[{i}]");
        if *code == 0 {
            return Err(options.err(&key, "0 means delivered and cannot be a permanent failure"));
        }
        if !(1..=255).contains(code) {
            return Err(options.err(
                &key,
                format!("must be an exit code between 1 and 255, got {code}"),
            ));
        }
    }

    let env = raw.env.unwrap_or_default();
    for (var, value) in &env {
        let key = format!("env.{var}");
        if var.is_empty() || var.contains(['=', '\0']) {
            return Err(options.err(
                &key,
                "invalid variable name (empty, or contains '=' or a NUL character)",
            ));
        }
        if EXEC_EVENT_ENV.contains(&var.as_str()) {
            return Err(options.err(
                &key,
                "this variable is set by the sink for every event and cannot be configured",
            ));
        }
        if value.contains('\0') {
            return Err(options.err(&key, "the value must not contain a NUL character"));
        }
    }

    if raw
        .working_dir
        .as_ref()
        .is_some_and(|dir| dir.as_os_str().is_empty())
    {
        return Err(options.err(
            "working_dir",
            "must not be empty (leave the key out instead)",
        ));
    }

    Ok(SinkKind::Exec(ExecSinkConfig {
        command,
        permanent_exit_codes,
        env,
        working_dir: raw.working_dir,
    }))
}
