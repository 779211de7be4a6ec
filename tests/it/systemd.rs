//! systemd's notification protocol on the real binary: a fake `NOTIFY_SOCKET` (a unix datagram
//! socket) receives READY, STATUS, WATCHDOG, RELOADING and STOPPING.

use crate::support::daemon::signal;
use crate::support::*;
use b24eventd_simulator::SimulatorConfig;
use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Collects datagrams until `done` says so, or panics after `timeout`.
fn receive_until(
    socket: &UnixDatagram,
    seen: &mut Vec<String>,
    timeout: Duration,
    what: &str,
    done: impl Fn(&[String]) -> bool,
) {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while !done(seen) {
        assert!(
            start.elapsed() < timeout,
            "timed out waiting for {what}; got {seen:?}"
        );
        if let Ok(n) = socket.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
}

fn count(seen: &[String], prefix: &str) -> usize {
    seen.iter().filter(|m| m.starts_with(prefix)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_notify_socket_sees_ready_status_watchdog_reloading_and_stopping() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let loaded = b24eventd::config::load(&config).unwrap();
    let journal = b24eventd::journal::Journal::open_configured(
        &loaded.journal,
        b24eventd::journal::Access::Create,
    )
    .await
    .unwrap();
    journal.save_tokens("main", &tokens).await.unwrap();
    emit_deals(&sim, 1, 30);

    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut daemon = std::process::Command::new(env!("CARGO_BIN_EXE_b24eventd"))
        .args(["-c", config.to_str().unwrap(), "run"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "1000000")
        .env("B24EVENTD_LOG", "info")
        .env("B24EVENTD_LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log.jsonl")).unwrap())
        .spawn()
        .unwrap();
    let pid = daemon.id();

    let mut seen = Vec::new();
    let socket = tokio::task::spawn_blocking(move || {
        receive_until(
            &socket,
            &mut seen,
            Duration::from_secs(30),
            "READY, STATUS and WATCHDOG",
            |s| {
                count(s, "READY=1") >= 1
                    && s.iter()
                        .any(|m| m.starts_with("STATUS=main: ") && m.contains("unsettled"))
                    && count(s, "WATCHDOG=1") >= 2
            },
        );
        (socket, seen)
    })
    .await
    .unwrap();
    let (socket, mut seen) = socket;
    let ready_at = seen.iter().position(|m| m == "READY=1").unwrap();
    assert!(
        seen[..ready_at].iter().all(|m| !m.starts_with("STATUS=")),
        "READY comes first: {seen:?}"
    );

    signal(pid, "HUP");
    let (socket, mut seen) = tokio::task::spawn_blocking(move || {
        receive_until(
            &socket,
            &mut seen,
            Duration::from_secs(10),
            "RELOADING then READY",
            |s| {
                s.iter()
                    .position(|m| m.starts_with("RELOADING=1\nMONOTONIC_USEC="))
                    .is_some_and(|at| s[at..].iter().any(|m| m == "READY=1"))
            },
        );
        (socket, seen)
    })
    .await
    .unwrap();

    signal(pid, "TERM");
    let seen = tokio::task::spawn_blocking(move || {
        receive_until(
            &socket,
            &mut seen,
            Duration::from_secs(30),
            "STOPPING",
            |s| count(s, "STOPPING=1") == 1,
        );
        seen
    })
    .await
    .unwrap();
    let status = daemon.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(count(&seen, "STOPPING=1"), 1, "{seen:?}");

    // log_format = "json" (here from the environment): one object per line, fields as keys.
    let log = std::fs::read_to_string(dir.path().join("log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines.iter().any(|l| l["message"] == "b24eventd running"));
    let journaled = lines
        .iter()
        .find(|l| l["message"] == "reserved and journaled")
        .expect("a batch was journaled");
    assert_eq!(journaled["portal"], "main");
    assert_eq!(journaled["level"], "INFO");
    assert!(journaled["events"].as_u64().unwrap() > 0);
}

/// stderr is a pipe whose reader went away (a log shipper that died): the daemon's log lines are
/// lost, never a panic. It starts, works (and logs) through a reload, and SIGTERM ends it with 0,
/// not 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stderr_pipe_does_not_stop_the_daemon() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let loaded = b24eventd::config::load(&config).unwrap();
    let journal = b24eventd::journal::Journal::open_configured(
        &loaded.journal,
        b24eventd::journal::Access::Create,
    )
    .await
    .unwrap();
    journal.save_tokens("main", &tokens).await.unwrap();

    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut daemon = std::process::Command::new(env!("CARGO_BIN_EXE_b24eventd"))
        .args(["-c", config.to_str().unwrap(), "run"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("B24EVENTD_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(daemon.stderr.take());
    let pid = daemon.id();
    let (socket, mut seen) = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        receive_until(&socket, &mut seen, Duration::from_secs(30), "READY", |s| {
            count(s, "READY=1") >= 1
        });
        (socket, seen)
    })
    .await
    .unwrap();
    emit_deals(&sim, 1, 30);
    wait_for("30 events settled", Duration::from_secs(30), || {
        upstream_empty(&sim) && sim.stats().cleared == 30
    })
    .await;
    signal(pid, "HUP");
    let socket = tokio::task::spawn_blocking(move || {
        receive_until(
            &socket,
            &mut seen,
            Duration::from_secs(10),
            "READY after the reload",
            |s| count(s, "READY=1") >= 2,
        );
        socket
    })
    .await
    .unwrap();
    assert_eq!(daemon.try_wait().unwrap(), None, "still running");
    signal(pid, "TERM");
    let status = daemon.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM with a closed stderr exits 0"
    );
    drop(socket);
}
