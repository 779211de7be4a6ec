//! The `exec` sink: runs the configured program once per event (argv, never a shell) with the
//! envelope on stdin and `B24_EVENT_ID`, `B24_EVENT`, `B24_PORTAL`, `B24_ATTEMPT` in its
//! environment, up to `concurrency` programs at once.
//!
//! Exit 0 within `timeout` is delivered; an exit code listed in `permanent_exit_codes` is dead;
//! anything else (another code, a signal, the timeout, a program that cannot be started) is
//! retried. Every run is its own process group, killed when the run ends (exit, timeout or
//! shutdown), so nothing the program started outlives it unless it left the group (`setsid`). The first 4 KiB of stdout and of stderr go into the attempt record; the rest is read
//! and dropped so the program never blocks on a full pipe.

use super::SinkConfig;
use super::{Health, HealthLevel, Sink, SinkResult};
use crate::BoxFuture;
use crate::envelope::Envelope;
use crate::options::IGNORED_ENV;
use anyhow::Context;
use futures_util::stream::{self, StreamExt};
use rustix::process::{Pid, Signal};
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

mod config;

pub(crate) use config::parse_config;
pub use config::{EXEC_EVENT_ENV, ExecSinkConfig};

/// How much of stdout and of stderr is kept for the attempt record.
const OUTPUT_KEEP_BYTES: usize = 4096;
/// How long the pipes may stay open after the program exited (or was killed): longer means a
/// process it left running holds them, and the output is cut there.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);
/// How long to wait for a killed program to be reaped.
const REAP_WAIT: Duration = Duration::from_secs(5);
/// How much of stderr's first line goes into the error text.
const ERROR_EXCERPT_CHARS: usize = 200;
/// The prefix of the daemon's own configuration variables, which may hold client secrets.
const DAEMON_ENV_PREFIX: &str = crate::options::ENV_PREFIX;

/// Delivers envelopes by running a program per envelope.
pub(crate) struct ExecSink {
    name: String,
    /// argv[0] resolved to an absolute path when the sink was built.
    program: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    /// Absolute; `None` runs the program in the daemon's working directory.
    working_dir: Option<PathBuf>,
    /// The daemon's `B24EVENTD_*` configuration variables, removed from the program's
    /// environment: they can carry client secrets.
    hidden_env: Vec<OsString>,
    permanent_exit_codes: Vec<i32>,
    timeout: Duration,
    concurrency: usize,
}

impl ExecSink {
    /// Resolves argv[0] (a bare name on `PATH`, a relative path against `working_dir` or the
    /// daemon's working directory) and checks that `working_dir` is a directory. A program given
    /// by path that does not exist yet is not an error here: deliveries retry until it does.
    pub fn new(config: &SinkConfig, exec: &ExecSinkConfig) -> anyhow::Result<ExecSink> {
        let name = &config.name;
        let working_dir = match &exec.working_dir {
            None => None,
            Some(dir) => {
                let dir = std::path::absolute(dir).with_context(|| {
                    format!("sink {name}: cannot resolve working_dir {}", dir.display())
                })?;
                if !dir.is_dir() {
                    anyhow::bail!(
                        "sink {name}: working_dir {} is not a directory",
                        dir.display()
                    );
                }
                Some(dir)
            }
        };
        let (argv0, args) = exec
            .command
            .split_first()
            .with_context(|| format!("sink {name}: command is empty"))?;
        let program = resolve_program(
            argv0,
            std::env::var_os("PATH").as_deref(),
            working_dir.as_deref(),
        )
        .map_err(|e| anyhow::anyhow!("sink {name}: {e}"))?;
        Ok(ExecSink {
            name: name.clone(),
            program,
            args: args.to_vec(),
            env: exec.env.clone(),
            working_dir,
            hidden_env: daemon_config_vars(std::env::vars_os().map(|(k, _)| k)),
            permanent_exit_codes: exec.permanent_exit_codes.clone(),
            timeout: config.timeout,
            concurrency: config.concurrency.max(1),
        })
    }

    /// Runs the program for one envelope: the result, and what it printed.
    async fn run(&self, envelope: &Envelope) -> (SinkResult, Option<String>) {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        for var in &self.hidden_env {
            command.env_remove(var);
        }
        command
            .env("B24_EVENT_ID", &envelope.id)
            .env("B24_EVENT", &envelope.event)
            .env("B24_PORTAL", &envelope.portal)
            .env("B24_ATTEMPT", envelope.attempt.to_string())
            .envs(&self.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &self.working_dir {
            command.current_dir(dir);
        }
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                // Retried, even for ENOENT or EACCES: an operator can install or chmod the
                // program, and the retry policy bounds the attempts.
                let error = format!("cannot start {}: {e}", self.program.display());
                tracing::debug!(portal = %envelope.portal, event_id = %envelope.id, sink = %self.name, error = %error, "exec delivery failed");
                return (SinkResult::Retry { error, after: None }, None);
            }
        };
        let mut group = GroupKiller::of(&child);

        let mut input = envelope.to_json_line().into_bytes();
        input.push(b'\n');
        let mut captured = Captured::default();
        let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let mut exchange = Box::pin(exchange(pipes, &input, &mut captured));
        let mut exchanged = false;
        let exited = loop {
            tokio::select! {
                status = child.wait() => break Some(status),
                () = &mut exchange, if !exchanged => exchanged = true,
                () = tokio::time::sleep_until(deadline) => break None,
            }
        };

        let timed_out = exited.is_none();
        let status = match exited {
            Some(status) => status,
            None => {
                if let Err(e) = group.kill() {
                    tracing::warn!(sink = %self.name, program = %self.program.display(), error = %e, "cannot kill the process group of a timed-out program");
                }
                tokio::time::timeout(REAP_WAIT, child.wait())
                    .await
                    .unwrap_or_else(|_| {
                        Err(io::Error::other(format!(
                            "still running {} after SIGKILL",
                            humantime::format_duration(REAP_WAIT)
                        )))
                    })
            }
        };
        if status.is_ok() {
            // Reaped. Whatever the program left running in its group (a `cmd &` it did not wait
            // for) ends with the run, whatever the outcome: a delivery leaves no process behind.
            // The signal cannot reach a stranger: Linux does not hand out a pid again while a
            // process group of that id still has members, and an empty group is ESRCH. After
            // this the group id may be reused, so it is never signalled again.
            if let Err(e) = group.kill() {
                tracing::warn!(sink = %self.name, program = %self.program.display(), error = %e, "cannot kill what the program left running in its process group");
            }
            group.disarm();
        }
        let pipes_held = !exchanged
            && tokio::time::timeout(OUTPUT_GRACE, &mut exchange)
                .await
                .is_err();
        drop(exchange);

        let (result, outcome) = if timed_out {
            let error = format!(
                "timed out after {}, process group killed",
                humantime::format_duration(self.timeout)
            );
            (
                SinkResult::Retry {
                    error: error.clone(),
                    after: None,
                },
                error,
            )
        } else {
            match status {
                Ok(status) => self.classify(status, &captured.stderr),
                Err(e) => {
                    let error = format!("cannot wait for {}: {e}", self.program.display());
                    (
                        SinkResult::Retry {
                            error: error.clone(),
                            after: None,
                        },
                        error,
                    )
                }
            }
        };
        let mut notes = Vec::new();
        if let Some(e) = &captured.stdin_error {
            notes.push(format!("note: writing the envelope to stdin failed: {e}"));
        }
        if pipes_held {
            notes.push(format!(
                "note: output cut: the pipes were still open {} after the program ended (a process it started holds them)",
                humantime::format_duration(OUTPUT_GRACE)
            ));
        }
        if !matches!(result, SinkResult::Delivered) {
            tracing::debug!(portal = %envelope.portal, event_id = %envelope.id, sink = %self.name, result = ?result, "exec delivery failed");
        }
        let output = render_output(&outcome, &captured.stdout, &captured.stderr, &notes);
        (result, Some(output))
    }

    /// The result of a program that exited on its own, and the outcome line for the record.
    fn classify(&self, status: ExitStatus, stderr: &Capture) -> (SinkResult, String) {
        let excerpt = first_line(&stderr.text());
        let with_excerpt = |head: String| {
            if excerpt.is_empty() {
                head
            } else {
                format!("{head}: {excerpt}")
            }
        };
        match (status.code(), status.signal()) {
            (Some(0), _) => (SinkResult::Delivered, "exit 0".to_string()),
            (Some(code), _) if self.permanent_exit_codes.contains(&code) => (
                SinkResult::Dead {
                    error: with_excerpt(format!("exit {code} (in permanent_exit_codes)")),
                },
                format!("exit {code}"),
            ),
            (Some(code), _) => (
                SinkResult::Retry {
                    error: with_excerpt(format!("exit {code}")),
                    after: None,
                },
                format!("exit {code}"),
            ),
            (None, signal) => {
                let head = match signal {
                    Some(signal) => format!("killed by signal {signal}"),
                    None => format!("ended without an exit code ({status})"),
                };
                (
                    SinkResult::Retry {
                        error: with_excerpt(head.clone()),
                        after: None,
                    },
                    head,
                )
            }
        }
    }
}

/// argv[0] as an absolute path: a name without `/` is looked up on `path_var` (empty entries
/// skipped), a relative path is taken from `working_dir` or else the daemon's working directory.
fn resolve_program(
    argv0: &str,
    path_var: Option<&OsStr>,
    working_dir: Option<&Path>,
) -> Result<PathBuf, String> {
    if argv0.contains('/') {
        let path = match working_dir {
            Some(dir) => dir.join(argv0),
            None => PathBuf::from(argv0),
        };
        return std::path::absolute(&path)
            .map_err(|e| format!("cannot resolve the command {argv0:?}: {e}"));
    }
    let dirs: Vec<PathBuf> = path_var
        .map(|p| std::env::split_paths(p).collect())
        .unwrap_or_default();
    for dir in dirs.iter().filter(|d| !d.as_os_str().is_empty()) {
        let candidate = dir.join(argv0);
        if is_executable_file(&candidate) {
            return std::path::absolute(&candidate)
                .map_err(|e| format!("cannot resolve the command {}: {e}", candidate.display()));
        }
    }
    let searched = path_var
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "PATH is not set".to_string());
    Err(format!(
        "the command {argv0:?} is not an executable file on PATH ({searched}); install it or give its absolute path"
    ))
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What systemd gives the daemon alone: the directory of its credentials (`LoadCredential=`,
/// the portals' client secrets; `systemd.exec(5)`), the notification socket and watchdog (a
/// program must not talk to systemd as the daemon), and socket-activation descriptors.
const SYSTEMD_ENV: &[&str] = &[
    "CREDENTIALS_DIRECTORY",
    "ENCRYPTED_CREDENTIALS_DIRECTORY",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// Which of the daemon's environment variables a program must not inherit: its `B24EVENTD_*`
/// configuration overrides (client secrets among them; `B24EVENTD_CONFIG` and `B24EVENTD_LOG`
/// are not configuration and stay), and what systemd set for the daemon alone ([`SYSTEMD_ENV`]:
/// the credentials directory, the notification socket and watchdog).
fn daemon_config_vars(names: impl Iterator<Item = OsString>) -> Vec<OsString> {
    names
        .filter(|name| {
            let name = name.to_string_lossy();
            let config = name
                .get(..DAEMON_ENV_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(DAEMON_ENV_PREFIX))
                && !IGNORED_ENV.iter().any(|i| i.eq_ignore_ascii_case(&name));
            config || SYSTEMD_ENV.contains(&name.as_ref())
        })
        .collect()
}

/// What came back from a program besides its exit status.
#[derive(Default)]
struct Captured {
    stdout: Capture,
    stderr: Capture,
    /// Writing stdin failed for another reason than the program not reading it (EPIPE).
    stdin_error: Option<io::Error>,
}

/// A child's stdin, stdout and stderr.
type Pipes = (Option<ChildStdin>, Option<ChildStdout>, Option<ChildStderr>);

/// Feeds `input` to stdin (then closes it) while draining stdout and stderr into `captured`;
/// ends when stdin is written and both pipes reached EOF.
async fn exchange((stdin, stdout, stderr): Pipes, input: &[u8], captured: &mut Captured) {
    let Captured {
        stdout: out,
        stderr: err,
        stdin_error,
    } = captured;
    tokio::join!(
        feed(stdin, input, stdin_error),
        out.drain(stdout),
        err.drain(stderr),
    );
}

async fn feed(stdin: Option<ChildStdin>, input: &[u8], error: &mut Option<io::Error>) {
    let Some(mut stdin) = stdin else { return };
    match stdin.write_all(input).await {
        // A program may exit without reading its input: that is its choice, not an error.
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {}
        Err(e) => *error = Some(e),
    }
    // Dropping closes the pipe: the program sees EOF after the envelope.
}

/// The first [`OUTPUT_KEEP_BYTES`] of one output stream, and how long it was.
#[derive(Default)]
struct Capture {
    kept: Vec<u8>,
    total: u64,
}

impl Capture {
    /// Reads `pipe` to EOF, keeping the beginning.
    async fn drain(&mut self, pipe: Option<impl AsyncRead + Unpin>) {
        let Some(mut pipe) = pipe else { return };
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => self.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = OUTPUT_KEEP_BYTES.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.total += bytes.len() as u64;
    }

    fn truncated(&self) -> bool {
        self.total > self.kept.len() as u64
    }

    /// The kept bytes as text: lossy UTF-8, without a character cut in half at the end.
    fn text(&self) -> String {
        let bytes = if self.truncated() {
            without_cut_char(&self.kept)
        } else {
            &self.kept
        };
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// `bytes` without a trailing multi-byte UTF-8 sequence that was cut short.
fn without_cut_char(bytes: &[u8]) -> &[u8] {
    let len = bytes.len();
    for back in 1..=len.min(4) {
        let byte = bytes[len - back];
        if byte & 0xC0 == 0x80 {
            continue; // a continuation byte: keep looking for the lead byte
        }
        let needed = match byte {
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        return if needed > back {
            &bytes[..len - back]
        } else {
            bytes
        };
    }
    bytes
}

/// The first non-empty line of `text`, trimmed and shortened for an error message.
fn first_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or_default()
        .chars()
        .take(ERROR_EXCERPT_CHARS)
        .collect()
}

/// The attempt record: the outcome line, then each non-empty stream under its name (with the
/// byte counts when it was cut), then notes.
///
/// ```text
/// exit 3
/// stdout:
/// ...
/// stderr (first 4096 of 1048576 bytes):
/// ...
/// ```
fn render_output(outcome: &str, stdout: &Capture, stderr: &Capture, notes: &[String]) -> String {
    let mut text = outcome.to_string();
    for (stream, capture) in [("stdout", stdout), ("stderr", stderr)] {
        if capture.total == 0 {
            continue;
        }
        let shown = capture.text();
        if capture.truncated() {
            let _ = write!(
                text,
                "\n{stream} (first {} of {} bytes):\n",
                shown.len(),
                capture.total
            );
        } else {
            let _ = write!(text, "\n{stream}:\n");
        }
        text.push_str(shown.strip_suffix('\n').unwrap_or(&shown));
    }
    for note in notes {
        text.push('\n');
        text.push_str(note);
    }
    text
}

/// Sends SIGKILL to a child's process group (the child runs with `process_group(0)`, so the
/// group id is its pid) when asked, or when dropped before the child was reaped: a delivery
/// abandoned at shutdown does not leave the program running.
struct GroupKiller {
    group: Option<Pid>,
}

impl GroupKiller {
    fn of(child: &Child) -> GroupKiller {
        let group = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .and_then(Pid::from_raw);
        GroupKiller { group }
    }

    fn kill(&self) -> io::Result<()> {
        let Some(group) = self.group else {
            return Ok(());
        };
        match rustix::process::kill_process_group(group, Signal::KILL) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The child was reaped: never signal its group id again.
    fn disarm(&mut self) {
        self.group = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// Why `program` could not run now, if anything (for the health check).
fn check_runnable(program: &Path, working_dir: Option<&Path>) -> Result<(), String> {
    let shown = program.display();
    let meta = match std::fs::metadata(program) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!(
                "{shown} does not exist: install it or fix the sink's command"
            ));
        }
        Err(e) => return Err(format!("cannot inspect {shown}: {e}")),
    };
    if !meta.is_file() {
        return Err(format!("{shown} is not a file: fix the sink's command"));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{shown} is not executable: chmod +x it"));
    }
    if let Some(dir) = working_dir
        && !dir.is_dir()
    {
        return Err(format!(
            "working_dir {} is not a directory: create it or fix the sink's working_dir",
            dir.display()
        ));
    }
    Ok(())
}

impl Sink for ExecSink {
    fn name(&self) -> &str {
        &self.name
    }

    /// One program per envelope, all of a batch at once: the dispatcher hands over one batch at
    /// a time, so the batch is what bounds the programs running together.
    fn max_batch(&self) -> usize {
        self.concurrency
    }

    fn deliver<'a>(&'a self, batch: &'a [Envelope]) -> BoxFuture<'a, Vec<SinkResult>> {
        crate::sinks::without_output(self.deliver_with_output(batch))
    }

    fn deliver_with_output<'a>(
        &'a self,
        batch: &'a [Envelope],
    ) -> BoxFuture<'a, Vec<(SinkResult, Option<String>)>> {
        Box::pin(async move {
            let runs: Vec<_> = batch.iter().map(|envelope| self.run(envelope)).collect();
            stream::iter(runs)
                .buffered(self.concurrency)
                .collect()
                .await
        })
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            match check_runnable(&self.program, self.working_dir.as_deref()) {
                Ok(()) => Health::ok(format!("will run {}", self.program.display())),
                Err(problem) => Health {
                    level: HealthLevel::Fail,
                    detail: problem,
                    fix: None,
                },
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::{RetryPolicy, SinkKind};
    use std::time::Instant;

    /// A sink running `script` with `/bin/sh -c` (the test's choice of argv; the sink itself
    /// never involves a shell).
    fn sink_with(
        script: &str,
        exec: impl FnOnce(&mut ExecSinkConfig),
        timeout: Duration,
        concurrency: usize,
    ) -> ExecSink {
        let mut config = ExecSinkConfig {
            command: vec!["/bin/sh".into(), "-c".into(), script.into(), "sh".into()],
            permanent_exit_codes: vec![3],
            env: BTreeMap::new(),
            working_dir: None,
        };
        exec(&mut config);
        let sink = SinkConfig {
            name: "notify".into(),
            route: Default::default(),
            timeout,
            concurrency,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(5),
            },
            kind: SinkKind::Exec(config.clone()),
        };
        ExecSink::new(&sink, &config).unwrap()
    }

    fn script_sink(script: &str) -> ExecSink {
        sink_with(script, |_| {}, Duration::from_secs(20), 1)
    }

    async fn run_one(sink: &ExecSink, envelope: &Envelope) -> (SinkResult, String) {
        let mut results = sink
            .deliver_with_output(std::slice::from_ref(envelope))
            .await;
        assert_eq!(results.len(), 1);
        let (result, output) = results.remove(0);
        (
            result,
            output.expect("a program that ran leaves an output record"),
        )
    }

    #[tokio::test]
    async fn exit_0_is_delivered_and_stdin_is_the_envelope() {
        let dir = tempfile::tempdir().unwrap();
        let stdin_copy = dir.path().join("stdin.json");
        let sink = sink_with(
            "cat > \"$COPY\"; echo stored",
            |c| {
                c.env
                    .insert("COPY".into(), stdin_copy.display().to_string());
            },
            Duration::from_secs(20),
            1,
        );
        let mut envelope = Envelope::sample(7);
        envelope.data = serde_json::json!({"FIELDS": {"ID": "7"}, "TITLE": "Ünïcödé \"q\" \n"});
        let (result, output) = run_one(&sink, &envelope).await;
        assert_eq!(result, SinkResult::Delivered);
        assert_eq!(output, "exit 0\nstdout:\nstored");
        let written = std::fs::read_to_string(&stdin_copy).unwrap();
        assert_eq!(written, format!("{}\n", envelope.to_json_line()));
        let back: Envelope = serde_json::from_str(written.trim_end()).unwrap();
        assert_eq!(back, envelope);
        assert_eq!(sink.deliver(&[envelope]).await, vec![SinkResult::Delivered]);
    }

    #[tokio::test]
    async fn event_variables_and_configured_env_are_set() {
        let sink = sink_with(
            "printf '%s|%s|%s|%s|%s' \"$B24_EVENT_ID\" \"$B24_EVENT\" \"$B24_PORTAL\" \"$B24_ATTEMPT\" \"$ERP_URL\"",
            |c| {
                c.env.insert("ERP_URL".into(), "http://erp.local".into());
            },
            Duration::from_secs(20),
            1,
        );
        let mut envelope = Envelope::sample(42);
        envelope.attempt = 3;
        let (result, output) = run_one(&sink, &envelope).await;
        assert_eq!(result, SinkResult::Delivered);
        assert_eq!(
            output,
            "exit 0\nstdout:\nmain:42:1795330800|ONCRMDEALUPDATE|main|3|http://erp.local"
        );
    }

    #[tokio::test]
    async fn working_dir_is_where_the_program_runs() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        let sink = sink_with(
            "pwd",
            |c| c.working_dir = Some(dir.clone()),
            Duration::from_secs(20),
            1,
        );
        let (result, output) = run_one(&sink, &Envelope::sample(1)).await;
        assert_eq!(result, SinkResult::Delivered);
        assert_eq!(output, format!("exit 0\nstdout:\n{}", dir.display()));
    }

    #[tokio::test]
    async fn a_permanent_exit_code_is_dead() {
        let sink = script_sink("echo 'deal 7 does not exist' >&2; echo second line >&2; exit 3");
        let (result, output) = run_one(&sink, &Envelope::sample(7)).await;
        assert_eq!(
            result,
            SinkResult::Dead {
                error: "exit 3 (in permanent_exit_codes): deal 7 does not exist".into()
            }
        );
        assert_eq!(
            output,
            "exit 3\nstderr:\ndeal 7 does not exist\nsecond line"
        );
    }

    #[tokio::test]
    async fn other_exit_codes_and_signals_are_retried() {
        let sink = script_sink("cat >/dev/null; echo 'erp busy' >&2; exit 4");
        let (result, output) = run_one(&sink, &Envelope::sample(1)).await;
        assert_eq!(
            result,
            SinkResult::Retry {
                error: "exit 4: erp busy".into(),
                after: None
            }
        );
        assert_eq!(output, "exit 4\nstderr:\nerp busy");

        let sink = script_sink("exit 1");
        let (result, output) = run_one(&sink, &Envelope::sample(1)).await;
        assert_eq!(
            result,
            SinkResult::Retry {
                error: "exit 1".into(),
                after: None
            }
        );
        assert_eq!(output, "exit 1");

        let sink = script_sink("kill -9 $$");
        let (result, output) = run_one(&sink, &Envelope::sample(1)).await;
        assert_eq!(
            result,
            SinkResult::Retry {
                error: "killed by signal 9".into(),
                after: None
            }
        );
        assert_eq!(output, "killed by signal 9");
    }

    /// The state letter of a process in /proc, or `None` once it is gone.
    fn process_state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "pid (comm) S ...": the state follows the last ')'.
        stat.rsplit_once(')')?.1.trim_start().chars().next()
    }

    #[tokio::test]
    async fn a_timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild.pid");
        let sink = sink_with(
            "sleep 30 & echo $! > \"$PID_FILE\"; echo started; wait",
            |c| {
                c.env
                    .insert("PID_FILE".into(), pid_file.display().to_string());
            },
            Duration::from_secs(2),
            1,
        );
        let started = Instant::now();
        let (result, output) = run_one(&sink, &Envelope::sample(1)).await;
        let took = started.elapsed();
        assert_eq!(
            result,
            SinkResult::Retry {
                error: "timed out after 2s, process group killed".into(),
                after: None
            }
        );
        assert!(took < Duration::from_secs(10), "took {took:?}");
        assert_eq!(
            output,
            "timed out after 2s, process group killed\nstdout:\nstarted"
        );

        let grandchild: u32 = std::fs::read_to_string(&pid_file)
            .expect("the script started its grandchild before the timeout")
            .trim()
            .parse()
            .unwrap();
        assert_killed(grandchild).await;
    }

    #[tokio::test]
    async fn a_successful_run_leaves_no_background_process_behind() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("background.pid");
        let sink = sink_with(
            "sleep 30 >/dev/null 2>&1 & echo $! > \"$PID_FILE\"; exit 0",
            |c| {
                c.env
                    .insert("PID_FILE".into(), pid_file.display().to_string());
            },
            Duration::from_secs(10),
            1,
        );
        let (result, _) = run_one(&sink, &Envelope::sample(1)).await;
        assert_eq!(result, SinkResult::Delivered);
        let background: u32 = std::fs::read_to_string(&pid_file)
            .expect("the script started its background process")
            .trim()
            .parse()
            .unwrap();
        assert_killed(background).await;
    }

    /// Waits until `pid` is gone or a zombie (killed, waiting for whoever adopted it to reap it).
    async fn assert_killed(pid: u32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match process_state(pid) {
                None | Some('Z') => return,
                Some(state) if Instant::now() > deadline => {
                    panic!("process {pid} still running (state {state})")
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Reads the pid a script wrote to `file`, waiting for it to appear.
    async fn pid_from(file: &Path) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pid) = std::fs::read_to_string(file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return pid;
            }
            assert!(Instant::now() < deadline, "no pid in {}", file.display());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_delivery_dropped_midway_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("grandchild.pid");
        let sink = sink_with(
            "sleep 30 & echo $! > \"$PID_FILE\"; wait",
            |c| {
                c.env
                    .insert("PID_FILE".into(), pid_file.display().to_string());
            },
            Duration::from_secs(60),
            1,
        );
        let batch = [Envelope::sample(1)];
        let delivery = sink.deliver(&batch);
        // Abandoned the way a shutdown deadline abandons it: the future is dropped.
        let abandoned = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::select! {
                _ = delivery => panic!("the program cannot finish on its own"),
                pid = pid_from(&pid_file) => pid,
            }
        })
        .await
        .unwrap();
        assert_killed(abandoned).await;
    }

    #[tokio::test]
    async fn a_process_left_holding_the_pipes_does_not_hold_up_the_result() {
        // The background sleep inherits stdout and, in a session of its own, escapes the kill
        // of the run's process group: it outlives the program by seconds. The program ends only
        // once the sleep has left the group.
        let dir = tempfile::tempdir().unwrap();
        let left = dir.path().join("left-the-group");
        let sink = sink_with(
            "setsid sh -c 'touch \"$0\"; exec sleep 5' \"$LEFT\" & \
             while [ ! -e \"$LEFT\" ]; do sleep 0.05; done; echo finished",
            |c| {
                c.env.insert("LEFT".into(), left.display().to_string());
            },
            Duration::from_secs(10),
            1,
        );
        let started = Instant::now();
        let (result, output) = run_one(&sink, &Envelope::sample(1)).await;
        let took = started.elapsed();
        assert_eq!(result, SinkResult::Delivered);
        assert!(took < Duration::from_secs(4), "took {took:?}");
        assert_eq!(
            output,
            "exit 0\nstdout:\nfinished\nnote: output cut: the pipes were still open 500ms after the program ended (a process it started holds them)"
        );
    }

    #[tokio::test]
    async fn big_output_is_cut_and_never_blocks_the_program() {
        // 1 MiB on stdout, far past any pipe buffer, then a line on stderr; stdin is not read.
        let sink = script_sink("head -c 1048576 /dev/zero | tr '\\0' 'a'; echo done >&2");
        let mut envelope = Envelope::sample(1);
        envelope.data = serde_json::json!({"blob": "x".repeat(256 * 1024)});
        let started = Instant::now();
        let (result, output) = run_one(&sink, &envelope).await;
        assert_eq!(result, SinkResult::Delivered, "{output}");
        assert!(started.elapsed() < Duration::from_secs(15));
        let expected = format!(
            "exit 0\nstdout (first 4096 of 1048576 bytes):\n{}\nstderr:\ndone",
            "a".repeat(4096)
        );
        assert_eq!(output, expected);
    }

    #[tokio::test]
    async fn a_program_that_ignores_stdin_is_not_an_error() {
        let sink = script_sink("exit 0");
        let mut envelope = Envelope::sample(1);
        // Bigger than a pipe buffer: the write fails with EPIPE once the program is gone.
        envelope.data = serde_json::json!({"blob": "x".repeat(1024 * 1024)});
        let (result, output) = run_one(&sink, &envelope).await;
        assert_eq!(result, SinkResult::Delivered);
        assert_eq!(output, "exit 0");
    }

    #[tokio::test]
    async fn output_is_valid_utf8_when_cut_inside_a_character() {
        // 4095 ASCII bytes, then 'é' (2 bytes) straddles the 4096-byte cut.
        let sink =
            script_sink("head -c 4095 /dev/zero | tr '\\0' 'a'; printf '\\303\\251\\377tail'");
        let (result, output) = run_one(&sink, &Envelope::sample(1)).await;
        assert_eq!(result, SinkResult::Delivered);
        assert_eq!(
            output,
            format!(
                "exit 0\nstdout (first 4095 of 4102 bytes):\n{}",
                "a".repeat(4095)
            )
        );

        let sink = script_sink("printf 'ok \\377\\n'");
        let (_, output) = run_one(&sink, &Envelope::sample(1)).await;
        assert_eq!(output, "exit 0\nstdout:\nok \u{FFFD}");
    }

    #[test]
    fn cut_characters_are_dropped_whole() {
        assert_eq!(without_cut_char(b"abc"), b"abc");
        assert_eq!(without_cut_char("aé".as_bytes()), "aé".as_bytes());
        assert_eq!(without_cut_char(&"aé".as_bytes()[..2]), b"a");
        assert_eq!(without_cut_char(&"a€".as_bytes()[..3]), b"a");
        assert_eq!(without_cut_char(&"a😀".as_bytes()[..4]), b"a");
        assert_eq!(without_cut_char("a😀".as_bytes()), "a😀".as_bytes());
        assert_eq!(without_cut_char(b""), b"");
        assert_eq!(without_cut_char(b"\x80\x80\x80\x80"), b"\x80\x80\x80\x80");
    }

    #[tokio::test]
    async fn a_program_that_cannot_start_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("on-deal");
        let sink = sink_with(
            "unused",
            |c| c.command = vec![missing.display().to_string()],
            Duration::from_secs(5),
            1,
        );
        let results = sink.deliver_with_output(&[Envelope::sample(1)]).await;
        match &results[..] {
            [(SinkResult::Retry { error, after: None }, None)] => {
                assert!(
                    error.starts_with(&format!("cannot start {}: ", missing.display())),
                    "{error}"
                );
                assert!(error.contains("No such file or directory"), "{error}");
            }
            other => panic!("expected a retry without output, got {other:?}"),
        }
        let health = sink.health().await;
        assert_eq!(health.level, HealthLevel::Fail, "{health:?}");
        assert!(health.detail.contains("does not exist"), "{health:?}");

        // Installed later: the next attempt runs it.
        std::fs::write(&missing, "#!/bin/sh\nexit 0\n").unwrap();
        let health = sink.health().await;
        assert_eq!(health.level, HealthLevel::Fail, "{health:?}");
        assert!(health.detail.contains("chmod +x"), "{health:?}");
        std::fs::set_permissions(&missing, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            sink.health().await,
            Health::ok(format!("will run {}", missing.display()))
        );
        assert_eq!(
            sink.deliver(&[Envelope::sample(1)]).await,
            vec![SinkResult::Delivered]
        );
    }

    #[tokio::test]
    async fn up_to_concurrency_programs_run_at_once() {
        let dir = tempfile::tempdir().unwrap();
        // Each program waits until all four have started: only possible if they run together.
        let sink = sink_with(
            "touch \"$DIR/$B24_EVENT_ID\"; while [ \"$(ls \"$DIR\" | wc -l)\" -lt 4 ]; do sleep 0.05; done",
            |c| {
                c.env.insert("DIR".into(), dir.path().display().to_string());
            },
            Duration::from_secs(20),
            4,
        );
        assert_eq!(sink.max_batch(), 4);
        let batch: Vec<Envelope> = (1..=4).map(Envelope::sample).collect();
        assert_eq!(sink.deliver(&batch).await, vec![SinkResult::Delivered; 4]);
    }

    #[test]
    fn argv0_is_resolved_on_path_or_against_working_dir() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let tool = bin.join("on-deal");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let plain = bin.join("not-executable");
        std::fs::write(&plain, "").unwrap();

        let path =
            std::env::join_paths(["", "/nonexistent-b24eventd", bin.to_str().unwrap()]).unwrap();
        assert_eq!(resolve_program("on-deal", Some(&path), None).unwrap(), tool);
        let err = resolve_program("not-executable", Some(&path), None).unwrap_err();
        assert!(
            err.contains("\"not-executable\" is not an executable file on PATH"),
            "{err}"
        );
        assert!(err.contains("/nonexistent-b24eventd"), "{err}");
        let err = resolve_program("on-deal", None, None).unwrap_err();
        assert!(err.contains("PATH is not set"), "{err}");

        assert_eq!(
            resolve_program("/usr/local/bin/on-deal", Some(&path), None).unwrap(),
            PathBuf::from("/usr/local/bin/on-deal")
        );
        assert_eq!(
            resolve_program("bin/on-deal", None, Some(dir.path())).unwrap(),
            tool
        );
        let relative = resolve_program("./x", None, None).unwrap();
        assert!(relative.is_absolute(), "{}", relative.display());
    }

    #[test]
    fn building_fails_only_when_the_sink_cannot_work() {
        let config = |command: &str, working_dir: Option<PathBuf>| {
            let exec = ExecSinkConfig {
                command: vec![command.into()],
                permanent_exit_codes: vec![],
                env: BTreeMap::new(),
                working_dir,
            };
            let sink = SinkConfig {
                name: "notify".into(),
                route: Default::default(),
                timeout: Duration::from_secs(1),
                concurrency: 2,
                retry: RetryPolicy {
                    max_attempts: 3,
                    initial_backoff: Duration::from_secs(1),
                    max_backoff: Duration::from_secs(5),
                },
                kind: SinkKind::Exec(exec.clone()),
            };
            ExecSink::new(&sink, &exec)
        };
        let err = config("b24eventd-no-such-program", None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("sink notify: the command \"b24eventd-no-such-program\" is not an executable file on PATH"), "{err}");
        let err = config("/bin/sh", Some("/nonexistent-b24eventd".into()))
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            err,
            "sink notify: working_dir /nonexistent-b24eventd is not a directory"
        );
        // A program given by path may be installed later.
        assert!(config("/nonexistent-b24eventd/on-deal", None).is_ok());
        let sink = config("sh", None).unwrap();
        assert!(sink.program.is_absolute() && sink.program.ends_with("sh"));
    }

    #[test]
    fn daemon_configuration_variables_are_not_passed_on() {
        let names = [
            "PATH",
            "B24EVENTD_PORTALS__MAIN__CLIENT_SECRET",
            "b24eventd_sinks__erp__url",
            "B24EVENTD_CONFIG",
            "B24EVENTD_LOG",
            "B24_EVENT_ID",
            "B24EVENT",
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "CREDENTIALS_DIRECTORY",
        ]
        .map(OsString::from);
        assert_eq!(
            daemon_config_vars(names.into_iter()),
            vec![
                OsString::from("B24EVENTD_PORTALS__MAIN__CLIENT_SECRET"),
                OsString::from("b24eventd_sinks__erp__url"),
                OsString::from("NOTIFY_SOCKET"),
                OsString::from("WATCHDOG_USEC"),
                OsString::from("CREDENTIALS_DIRECTORY"),
            ]
        );
    }

    #[test]
    fn the_record_names_each_stream() {
        let mut out = Capture::default();
        let mut err = Capture::default();
        assert_eq!(render_output("exit 0", &out, &err, &[]), "exit 0");
        out.push(b"line 1\nline 2\n");
        err.push(&[b'e'; OUTPUT_KEEP_BYTES]);
        err.push(b"more");
        let text = render_output("exit 5", &out, &err, &["note: x".to_string()]);
        assert_eq!(
            text,
            format!(
                "exit 5\nstdout:\nline 1\nline 2\nstderr (first 4096 of 4100 bytes):\n{}\nnote: x",
                "e".repeat(4096)
            )
        );
        assert_eq!(first_line("\n  \n  first  \nsecond"), "first");
        assert_eq!(first_line(&"x".repeat(500)).len(), ERROR_EXCERPT_CHARS);
    }
}
