//! The real pipeline, in-process, against the portal simulator, delivering through an `exec`
//! sink: a program per event, a permanent exit code ending one entity dead, and what the
//! programs printed kept in the journal's attempt records. The daemon binary under systemd's
//! variables: its programs get no credentials directory, notification socket or watchdog.

use crate::support::*;
use b24eventd_simulator::SimulatorConfig;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

/// The hook: records each event id in `$IDS` and answers `ok <id> <first argument>`; refuses
/// deal 13 with exit 3, listed in `permanent_exit_codes`.
const HOOK: &str = r#"#!/bin/sh
input=$(cat)
case "$input" in
  *'"FIELDS":{"ID":"13"}'*) echo "deal 13 refused" >&2; exit 3 ;;
esac
echo "$B24_EVENT_ID" >> "$IDS"
echo "ok $B24_EVENT_ID $1"
"#;

fn exec_sink(dir: &Path) -> String {
    let hook = dir.join("on-deal");
    std::fs::write(&hook, HOOK).unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        r#"[sinks.notify]
type = "exec"
command = ["{hook}", "--verbose"]
permanent_exit_codes = [3]
env = {{ IDS = "{ids}" }}
timeout = "10s"
concurrency = 4
[sinks.notify.retry]
max_attempts = 5
initial_backoff = "100ms"
max_backoff = "1s"
"#,
        hook = hook.display(),
        ids = dir.join("ids.txt").display(),
    )
}

/// One row of `delivery_attempts` joined with its event.
#[derive(Debug)]
struct Attempt {
    envelope_id: String,
    lane: String,
    outcome: String,
    error: Option<String>,
    output: Option<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_sink_delivers_each_event_and_a_permanent_exit_code_ends_dead() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let config = write_config(dir.path(), &sim, None, "", &exec_sink(dir.path()));
    let running = Running::start(&config, &tokens).await;
    emit_deals(&sim, 1, 100);

    // Deal 13 is dead in the normal lane, errored upstream, fetched again from the error lane,
    // dead again there and cleared.
    wait_for(
        "every event settled, the refused one through the error lane",
        Duration::from_secs(60),
        || upstream_empty(&sim) && sim.stats().errored >= 1,
    )
    .await;
    let journal = running.journal.clone();
    running.stop().await;

    let counts = journal.counts().await.unwrap();
    assert_eq!(
        counts.dead, 2,
        "dead in the normal lane and again in the error lane"
    );
    assert_eq!(counts.errored, 1, "reported with event.offline.error once");
    assert_eq!(
        counts.retried_attempts, 0,
        "exit 0 and exit 3 are never retried"
    );

    let ids = |status: &str| -> BTreeSet<String> {
        sql_rows(
            &journal,
            &format!("SELECT envelope_id FROM events WHERE status = '{status}'"),
        )
        .iter()
        .map(|r| sql_text(r, "envelope_id").unwrap())
        .collect()
    };
    let (delivered, dead) = (ids("delivered"), ids("dead"));
    let attempts: Vec<Attempt> = sql_rows(
        &journal,
        "SELECT e.envelope_id, e.lane, a.outcome, a.error, a.output
         FROM delivery_attempts a JOIN events e ON e.id = a.event_id
         WHERE a.sink = 'notify' ORDER BY a.id",
    )
    .iter()
    .map(|r| Attempt {
        envelope_id: sql_text(r, "envelope_id").unwrap(),
        lane: sql_text(r, "lane").unwrap(),
        outcome: sql_text(r, "outcome").unwrap(),
        error: sql_text(r, "error"),
        output: sql_text(r, "output"),
    })
    .collect();

    // The hook saw every event but deal 13, each once, with its id in B24_EVENT_ID.
    let lines = std::fs::read_to_string(dir.path().join("ids.txt")).unwrap();
    let recorded: Vec<&str> = lines.lines().collect();
    assert_eq!(recorded.len(), 99, "no duplicates without faults");
    let recorded: BTreeSet<String> = recorded.into_iter().map(str::to_string).collect();
    assert_eq!(recorded, delivered);
    assert_eq!(
        dead.len(),
        1,
        "both dead rows are the same envelope id: {dead:?}"
    );
    assert!(!recorded.contains(dead.first().unwrap()));

    assert_eq!(
        attempts.len(),
        101,
        "one attempt per delivery: {attempts:#?}"
    );
    for attempt in &attempts {
        if dead.contains(&attempt.envelope_id) {
            assert_eq!(attempt.outcome, "dead", "{attempt:?}");
            assert_eq!(
                attempt.error.as_deref(),
                Some("exit 3 (in permanent_exit_codes): deal 13 refused")
            );
            assert_eq!(
                attempt.output.as_deref(),
                Some("exit 3\nstderr:\ndeal 13 refused")
            );
        } else {
            assert_eq!(attempt.outcome, "delivered", "{attempt:?}");
            assert_eq!(attempt.error, None);
            assert_eq!(
                attempt.output.as_deref(),
                Some(format!("exit 0\nstdout:\nok {} --verbose", attempt.envelope_id).as_str())
            );
        }
    }
    let dead_lanes: Vec<&str> = attempts
        .iter()
        .filter(|a| a.outcome == "dead")
        .map(|a| a.lane.as_str())
        .collect();
    assert_eq!(dead_lanes, vec!["normal", "error"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn programs_get_no_credentials_directory_nor_the_systemd_socket() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    // The client secret comes from systemd's credentials directory, as `LoadCredential=` gives it.
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    let secret = SimulatorConfig::default().client_secret;
    std::fs::write(credentials.join("main.client_secret"), &secret).unwrap();
    let socket_path = dir.path().join("notify.sock");
    let _socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    let dump = dir.path().join("env.txt");
    let sinks = format!(
        r#"[sinks.notify]
type = "exec"
command = ["/bin/sh", "-c", "env >> \"$ENV_DUMP\"; echo ---- >> \"$ENV_DUMP\""]
env = {{ ENV_DUMP = "{dump}" }}
"#,
        dump = dump.display()
    );
    let config = write_config(dir.path(), &sim, None, "", &sinks);
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&format!("client_secret = \"{secret}\""), "");
    std::fs::write(&config, text).unwrap();
    crate::support::cli::store_tokens(dir.path(), &tokens).await;

    let log = dir.path().join("daemon.log");
    let mut daemon = crate::support::daemon::spawn_daemon_with_env(
        &config,
        &log,
        &[
            ("CREDENTIALS_DIRECTORY", credentials.to_str().unwrap()),
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "600000000"),
            ("LISTEN_FDS", "0"),
        ],
    );
    emit_deals(&sim, 1, 3);
    wait_for("three events settled", Duration::from_secs(60), || {
        upstream_empty(&sim) && sim.stats().cleared == 3
    })
    .await;
    crate::support::daemon::stop_with_sigterm(&mut daemon, &log);

    let env = std::fs::read_to_string(&dump).unwrap();
    assert_eq!(env.matches("----").count(), 3, "{env}");
    assert!(
        env.contains("B24_EVENT_ID=") && env.contains("ENV_DUMP="),
        "{env}"
    );
    for leaked in [
        "CREDENTIALS_DIRECTORY",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "LISTEN_FDS",
        credentials.to_str().unwrap(),
        socket_path.to_str().unwrap(),
        secret.as_str(),
    ] {
        assert!(!env.contains(leaked), "a program saw {leaked:?}:\n{env}");
    }
}
