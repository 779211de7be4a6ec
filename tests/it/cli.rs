//! The binary as an operator meets it: exit codes, error messages, `auth import`, `demo`.

use crate::support::cli::{stderr, stdout};
use crate::support::*;
use b24eventd::journal::Journal;
use b24eventd_simulator::SimulatorConfig;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn b24eventd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_b24eventd"))
        .args(args)
        .env_remove("B24EVENTD_CONFIG")
        .output()
        .expect("the binary runs")
}

fn write(dir: &Path, text: &str) -> String {
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

const GOOD: &str = r#"
[journal]
path = "JOURNAL"
[portals.main]
client_endpoint = "https://example.bitrix24.com/rest/"
client_id = "local.1"
client_secret = "s3cret-value"
events = ["ONCRMDEALADD"]
[sinks.archive]
type = "file"
path = "JSONL"
"#;

fn good(dir: &Path) -> String {
    GOOD.replace("JOURNAL", &dir.join("j.db").display().to_string())
        .replace("JSONL", &dir.join("e.jsonl").display().to_string())
}

#[test]
fn validate_accepts_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &good(dir.path()));
    let out = b24eventd(&["-c", &path, "validate"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("ok (1 portal, 1 sink)"),
        "{}",
        stdout(&out)
    );
    assert!(!stdout(&out).contains("s3cret-value"));
}

#[test]
fn validate_names_the_file_and_key_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &good(dir.path())
            .replace("[sinks.archive]", "[portals.main.x]\n[sinks.archive]")
            .replace(
                "events = [\"ONCRMDEALADD\"]",
                "events = [\"ONCRMDEALADD\"]\nbatch_size = 0",
            ),
    );
    let out = b24eventd(&["-c", &path, "validate"]);
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(err.contains(&path), "names the file: {err}");
    assert!(err.contains("portals.main."), "names the key: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one message: {err}");
}

/// Durations no part of the daemon can use (they passed `validate` and later panicked in
/// `DateTime + TimeDelta`) are refused by `validate`, exit 78, naming the key.
#[test]
fn absurd_durations_are_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (key, edit) in [
        (
            "sinks.archive.retry.max_backoff",
            (
                "[sinks.archive]",
                "[sinks.archive]\nretry.max_backoff = \"500000000y\"",
            ),
        ),
        (
            "journal.retention",
            ("[journal]", "[journal]\nretention = \"300000y\""),
        ),
        (
            "portals.main.poll_interval",
            (
                "[portals.main]",
                "[portals.main]\npoll_interval = \"300000y\"",
            ),
        ),
        (
            "shutdown_timeout",
            ("[journal]", "shutdown_timeout = \"50y\"\n[journal]"),
        ),
    ] {
        let path = write(dir.path(), &good(dir.path()).replace(edit.0, edit.1));
        let out = b24eventd(&["-c", &path, "validate"]);
        assert_eq!(out.status.code(), Some(78), "{key}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(key) && err.contains("must be at most"),
            "{err}"
        );
    }
}

#[test]
fn unknown_keys_are_configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        &good(dir.path()).replace("[sinks.archive]", "[sinks.archive]\nretries = 3"),
    );
    let out = b24eventd(&["-c", &path, "validate"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(stderr(&out).contains("retries"), "{}", stderr(&out));
}

#[test]
fn a_webhook_url_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let text = good(dir.path()).replace(
        "https://example.bitrix24.com/rest/",
        "https://example.bitrix24.com/rest/1/abcdef123456/",
    );
    let out = b24eventd(&["-c", &write(dir.path(), &text), "validate"]);
    assert_eq!(out.status.code(), Some(78));
    let err = stderr(&out);
    assert!(
        err.contains("portals.main.client_endpoint") && err.contains("WRONG_AUTH_TYPE"),
        "{err}"
    );
}

#[test]
fn a_missing_config_file_is_a_configuration_error() {
    let out = b24eventd(&["-c", "/nonexistent/b24eventd.toml", "validate"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("/nonexistent/b24eventd.toml"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn environment_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &good(dir.path()));
    let out = Command::new(env!("CARGO_BIN_EXE_b24eventd"))
        .args(["-c", &path, "validate"])
        .env("B24EVENTD_PORTALS__MAIN__BATCH_SIZE", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr(&out).contains("portals.main.batch_size"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn usage_errors_exit_2_and_help_explains() {
    assert_eq!(b24eventd(&["frobnicate"]).status.code(), Some(2));
    let help = b24eventd(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    let text = stdout(&help);
    for word in [
        "demo",
        "run",
        "validate",
        "auth",
        "simulate",
        "B24EVENTD_CONFIG",
        "78",
    ] {
        assert!(text.contains(word), "--help mentions {word}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_import_stores_checks_and_rotates_the_refresh_token() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let config = config.to_str().unwrap().to_string();
    let refresh = tokens.refresh_token.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_b24eventd"))
            .args([
                "-c",
                &config,
                "auth",
                "import",
                "--portal",
                "main",
                "--refresh-token",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{refresh}\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("rotated"));
    assert!(
        !stdout(&out).contains(&tokens.refresh_token),
        "the token is never printed"
    );
    assert_eq!(sim.stats().token_refreshes, 1);
    let stored = crate::support::cli::stored_tokens(dir.path())
        .await
        .unwrap();
    assert_ne!(
        stored.refresh_token, tokens.refresh_token,
        "the rotated token is stored"
    );

    // The old refresh token is dead now (strict rotation): importing it again fails, loudly.
    let config = dir.path().join("config.toml");
    let out = b24eventd(&[
        "-c",
        config.to_str().unwrap(),
        "auth",
        "import",
        "--portal",
        "main",
        "--refresh-token",
        &tokens.refresh_token,
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid_grant"), "{}", stderr(&out));
}

#[test]
fn demo_runs_end_to_end_and_summarises() {
    let dir = tempfile::tempdir().unwrap();
    let demo_dir = dir.path().join("demo");
    let out = b24eventd(&[
        "demo",
        "--dir",
        demo_dir.to_str().unwrap(),
        "--events",
        "300",
        "--duration",
        "2s",
        "--waves",
        "2",
    ]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", stderr(&out));
    assert!(
        text.contains("left upstream              0 queued, 0 reserved, 0 in the error lane"),
        "{text}"
    );
    assert!(text.contains("sqlite3"), "{text}");
    let lines = std::fs::read_to_string(demo_dir.join("events.jsonl"))
        .unwrap()
        .lines()
        .count();
    let journaled: usize = text
        .lines()
        .find(|l| l.contains("events fetched (journaled)"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert_eq!(
        lines, journaled,
        "every journaled event is in the JSONL file once"
    );
}

#[test]
fn the_client_secret_can_come_from_the_credentials_directory() {
    let dir = tempfile::tempdir().unwrap();
    let text = good(dir.path()).replace("client_secret = \"s3cret-value\"\n", "");
    let path = write(dir.path(), &text);
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    let run = |creds: &Path| {
        Command::new(env!("CARGO_BIN_EXE_b24eventd"))
            .args(["-c", &path, "validate"])
            .env("CREDENTIALS_DIRECTORY", creds)
            .output()
            .unwrap()
    };
    let out = run(&creds);
    assert_eq!(
        out.status.code(),
        Some(78),
        "missing credential is a config error"
    );
    assert!(
        stderr(&out).contains("main.client_secret"),
        "{}",
        stderr(&out)
    );
    std::fs::write(creds.join("main.client_secret"), "from-credentials\n").unwrap();
    let out = run(&creds);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_log_even_at_trace_level() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig {
        access_token_ttl: std::time::Duration::from_secs(2),
        ..SimulatorConfig::default()
    })
    .await;
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    crate::support::cli::store_tokens(dir.path(), &tokens).await;
    emit_deals(&sim, 1, 50);
    let log = dir.path().join("trace.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_b24eventd"))
        .args(["-c", config.to_str().unwrap(), "run"])
        .env("B24EVENTD_LOG", "trace")
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Long enough for the access token to expire and be refreshed once.
    wait_for("a refresh", std::time::Duration::from_secs(30), || {
        sim.stats().token_refreshes >= 1
    })
    .await;
    emit_deals(&sim, 51, 50);
    wait_for("events settled", std::time::Duration::from_secs(30), || {
        upstream_empty(&sim)
    })
    .await;
    crate::support::daemon::signal(child.id(), "TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.len() > 10_000,
        "trace logging happened ({} bytes)",
        text.len()
    );
    let stored = crate::support::cli::stored_tokens(dir.path())
        .await
        .unwrap();
    let secret = SimulatorConfig::default().client_secret;
    for (what, value) in [
        ("client secret", secret.as_str()),
        ("first access token", tokens.access_token.as_str()),
        ("first refresh token", tokens.refresh_token.as_str()),
        ("current access token", stored.access_token.as_str()),
        ("current refresh token", stored.refresh_token.as_str()),
    ] {
        assert!(!text.contains(value), "the {what} appears in the trace log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once_with_143() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    // A sink that answers after 20 s: the first SIGTERM waits for its batch (up to the 10 s
    // shutdown_timeout of the test config), the second must not.
    let endpoint = Endpoint::start_with_delay(
        std::sync::Arc::new(|_| 200),
        std::time::Duration::from_secs(20),
    )
    .await;
    let (mut child, log) =
        daemon_with_a_batch_journaled(dir.path(), &sim, &tokens, &endpoint.url, "10s").await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let pid = child.id();
    crate::support::daemon::signal(pid, "TERM");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first SIGTERM waits for the batch in flight"
    );
    let second = std::time::Instant::now();
    crate::support::daemon::signal(pid, "TERM");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(
        second.elapsed() < std::time::Duration::from_secs(3),
        "the second SIGTERM ends the process at once"
    );
    assert_eq!(
        status.code(),
        Some(143),
        "128 + SIGTERM, as a shell reports it\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

#[tokio::test]
async fn journal_commands_never_print_control_characters_from_the_portal() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), &good(dir.path()));
    let journal = Journal::open(
        &dir.path().join("j.db"),
        b24eventd::config::Synchronous::Full,
    )
    .await
    .unwrap();
    // An event name and an error text with a terminal escape sequence in them.
    let hostile = "ONCRMDEAL\u{1b}]0;owned\u{7}\u{1b}[2J";
    journal
        .record_batch(b24eventd::journal::NewBatch {
            portal: "main".into(),
            process_id: "p1".into(),
            lane: b24eventd::envelope::Lane::Normal,
            origin: b24eventd::journal::BatchOrigin::Fetched,
            events: vec![b24eventd::journal::NewEvent {
                offline_id: 7,
                event: hostile.into(),
                message_id: format!("{:032x}", 7),
                timestamp: "2026-11-22T10:00:00+03:00".into(),
                data: serde_json::json!({"FIELDS": {"ID": "7"}}),
                additional: serde_json::json!({"user_id": 1}),
                sinks: vec!["archive".into()],
                enrich: false,
            }],
            deleted_upstream: false,
            new_reservation: true,
        })
        .await
        .unwrap();
    drop(journal);
    for args in [
        vec!["-c", config.as_str(), "journal", "list"],
        vec!["-c", config.as_str(), "journal", "show", "1"],
        vec!["-c", config.as_str(), "journal", "stats"],
    ] {
        let out = b24eventd(&args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{args:?} printed a control character: {text:?}"
        );
        if args[3] == "list" {
            assert!(text.contains("ONCRMDEAL\\x1b]0;owned\\x07"), "{text}");
        }
    }
}

#[test]
fn a_log_filter_that_is_not_one_is_reported_and_the_default_used() {
    use std::io::BufRead;
    // `verbose` is no level: tracing alone would read it as "all levels of a target named
    // verbose" and log nothing else at all.
    let mut child = Command::new(env!("CARGO_BIN_EXE_b24eventd"))
        .args(["simulate", "--listen", "127.0.0.1:0"])
        .env("B24EVENTD_LOG", "verbose")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            if lines_tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut warned = false;
    while !warned {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            break;
        };
        warned |= line.contains("log filter refused")
            && line.contains("B24EVENTD_LOG")
            && line.contains("verbose");
        seen.push(line);
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        warned,
        "a warning naming the variable and its value:\n{}",
        seen.join("\n")
    );
}

#[tokio::test]
async fn a_stop_ends_within_shutdown_timeout_and_its_tail_whatever_hangs() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    // The sink answers after 1.5 s (its timeout is 2 s); by then the portal answers nothing
    // for a minute, so the poller's round hangs and so does the clear of the delivered batch in
    // the final settle.
    let endpoint = Endpoint::start_with_delay(
        std::sync::Arc::new(|_| 200),
        std::time::Duration::from_millis(1500),
    )
    .await;
    let (mut child, log) =
        daemon_with_a_batch_journaled(dir.path(), &sim, &tokens, &endpoint.url, "2s").await;
    sim.set_faults(b24eventd_simulator::Faults {
        slow: 1.0,
        slow_delay: std::time::Duration::from_secs(60),
        ..Default::default()
    });
    // The delivery ends at 1.5 s; the portal is silent.
    tokio::time::sleep(std::time::Duration::from_millis(3000)).await;
    assert_eq!(endpoint.accepted_count(), 5, "delivered before the stop");
    let signalled = std::time::Instant::now();
    crate::support::daemon::signal(child.id(), "TERM");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let took = signalled.elapsed();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    // 2 s of shutdown_timeout plus the 10 s tail, and a margin for a loaded machine.
    assert!(
        took < std::time::Duration::from_secs(13),
        "the stop took {took:?}\n{text}"
    );
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(
        text.contains("shutdown deadline reached with portal calls in flight"),
        "the log names the portal call it gave up on\n{text}"
    );
    assert!(
        text.contains("shutdown deadline reached while settling"),
        "the log names the settle calls it gave up on\n{text}"
    );
    assert!(
        text.contains("stop waited for"),
        "the log says what the stop waited for\n{text}"
    );
}

/// The real binary on the simulator with its tokens stored, an http sink at `sink_url` and
/// `shutdown_timeout`, once 5 deals were raised and their batch journaled: the child and its log.
async fn daemon_with_a_batch_journaled(
    dir: &Path,
    sim: &b24eventd_simulator::Simulator,
    tokens: &b24eventd::bitrix::Tokens,
    sink_url: &str,
    shutdown_timeout: &str,
) -> (crate::support::daemon::Daemon, std::path::PathBuf) {
    let config = write_config(dir, sim, None, "", &http_sink(sink_url));
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "shutdown_timeout = \"10s\"",
        &format!("shutdown_timeout = \"{shutdown_timeout}\""),
    );
    std::fs::write(&config, text).unwrap();
    crate::support::open_journal(dir)
        .await
        .save_tokens("main", tokens)
        .await
        .unwrap();
    let log = dir.join("daemon.log");
    emit_deals(sim, 1, 5);
    let child = crate::support::daemon::spawn_daemon(&config, &log);
    wait_for(
        "a batch journaled",
        std::time::Duration::from_secs(30),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("reserved and journaled")
        },
    )
    .await;
    (child, log)
}

async fn new_journal(path: &Path) {
    Journal::open(path, b24eventd::config::Synchronous::Full)
        .await
        .unwrap();
}

fn user_version(path: &Path) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn version_names_the_journal_schema_this_build_writes() {
    let out = b24eventd(&["--version"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    let expected = format!("b24eventd {} (journal schema ", env!("CARGO_PKG_VERSION"));
    let schema: i64 = text
        .trim()
        .strip_prefix(&expected)
        .and_then(|rest| rest.strip_suffix(')'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no schema version in {text:?}"));
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("j.db");
    new_journal(&journal).await;
    assert_eq!(schema, user_version(&journal));
}

#[tokio::test]
async fn a_journal_from_a_newer_build_is_refused_with_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), &good(dir.path()));
    let journal = dir.path().join("j.db");
    new_journal(&journal).await;
    let newer = user_version(&journal) + 1;
    rusqlite::Connection::open(&journal)
        .unwrap()
        .pragma_update(None, "user_version", newer)
        .unwrap();
    let before = std::fs::read(&journal).unwrap();
    for args in [&["journal", "stats"][..], &["auth", "status"], &["run"]] {
        let mut full = vec!["-c", path.as_str()];
        full.extend_from_slice(args);
        let out = b24eventd(&full);
        assert_eq!(out.status.code(), Some(78), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!("schema version {newer}"))
                && err.contains("newer than this build supports")
                && err.contains("upgrade b24eventd"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(std::fs::read(&journal).unwrap(), before, "left as it was");
}

/// `[journal] path` unset and no $STATE_DIRECTORY: the commands that make a journal say it goes
/// to the current directory; `auth status` names the journal it read.
#[test]
fn the_current_directory_journal_is_announced() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        &good(dir.path())
            .replace("[journal]\n", "")
            .replace(
                &format!("path = \"{}\"\n", dir.path().join("j.db").display()),
                "",
            )
            .replace(
                "https://example.bitrix24.com/rest/",
                "http://127.0.0.1:1/rest/",
            ),
    );
    assert!(
        !std::fs::read_to_string(&config)
            .unwrap()
            .contains("[journal]")
    );
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_b24eventd"))
            .args(["-c", &config])
            .args(args)
            .current_dir(dir.path())
            .env_remove("B24EVENTD_CONFIG")
            .env_remove("STATE_DIRECTORY")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let warning = format!(
        "b24eventd: warning: [journal] path is unset and $STATE_DIRECTORY is not set (not under systemd): using ./b24eventd.db in the current directory ({})",
        dir.path().join("b24eventd.db").display()
    );
    let status = run(&["auth", "status"]);
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    assert!(!stderr(&status).contains("warning"), "{}", stderr(&status));
    assert!(
        stdout(&status).starts_with(&format!(
            "journal {} (not created yet: no tokens stored)\n",
            dir.path().join("b24eventd.db").display()
        )),
        "{}",
        stdout(&status)
    );
    // The portal is unreachable: the import fails, after the warning.
    let import = run(&["auth", "import", "--portal", "main", "--refresh-token", "r"]);
    assert_eq!(import.status.code(), Some(1), "{}", stderr(&import));
    assert!(stderr(&import).starts_with(&warning), "{}", stderr(&import));
    let login = run(&["auth", "login", "--portal", "main"]);
    assert!(stderr(&login).starts_with(&warning), "{}", stderr(&login));
}

/// `simulate` prints a config with an admin endpoint and an `auth import` line that passes the
/// token on stdin (never in a process's argv); both work as printed.
#[test]
fn simulate_prints_a_config_with_an_admin_endpoint_and_an_import_from_stdin() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_b24eventd"))
        .args(["simulate", "--listen", "127.0.0.1:0"])
        .env_remove("B24EVENTD_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary runs");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let done = line.starts_with("3. ");
        printed.push(line);
        if done {
            break;
        }
    }
    let text = printed.join("\n");
    let config: String = text
        .split_once("1. save this as sim.toml:")
        .and_then(|(_, rest)| rest.split_once("\n2. "))
        .map(|(config, _)| config.trim().to_string())
        .unwrap_or_else(|| panic!("no config printed:\n{text}"));
    let import = printed
        .iter()
        .find_map(|l| l.strip_prefix("2. "))
        .unwrap_or_else(|| panic!("no import line:\n{text}"));
    assert!(
        config.contains("[admin]\nlisten = \"127.0.0.1:") && !config.contains("listen = \"\""),
        "{config}"
    );
    assert!(
        import.contains("--refresh-token -") && !import.contains("--access-token"),
        "the token goes in on stdin: {import}"
    );
    std::fs::write(dir.path().join("sim.toml"), &config).unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_b24eventd")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .args(["-c", import])
        .current_dir(dir.path())
        .env("PATH", path)
        .env_remove("B24EVENTD_CONFIG")
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(out.status.code(), Some(0), "{import}: {}", stderr(&out));
    assert!(
        stdout(&out).contains("stored tokens for portal sim"),
        "{}",
        stdout(&out)
    );
    let validated = Command::new(env!("CARGO_BIN_EXE_b24eventd"))
        .args(["-c", "sim.toml", "validate"])
        .current_dir(dir.path())
        .env_remove("B24EVENTD_CONFIG")
        .output()
        .unwrap();
    assert_eq!(validated.status.code(), Some(0), "{}", stderr(&validated));
}
