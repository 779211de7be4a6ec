//! The real daemon binary as a child process, for the crash tests: started (and SIGKILLed by the
//! test), then run a last time to drain the portal and stop on SIGTERM.

use b24eventd::journal::Journal;
use b24eventd::simulator::Simulator;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `b24eventd --config CONFIG run`, its log appended to `log`.
pub fn spawn_daemon(config: &Path, log: &Path) -> Child {
    spawn_daemon_with_env(config, log, &[])
}

/// [`spawn_daemon`] with extra environment variables.
pub fn spawn_daemon_with_env(config: &Path, log: &Path, env: &[(&str, &str)]) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_b24eventd"))
        .args(["--config", config.to_str().unwrap(), "run"])
        .env("B24EVENTD_LOG", "warn,b24eventd=info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the daemon binary starts")
}

/// A last run after the kills: waits until it is up (its signal handlers installed: the queue
/// may be drained already), until the portal holds nothing and the journal has nothing
/// unsettled, then stops it with SIGTERM, which must exit 0. Returns the journal.
pub async fn last_run_drains_and_stops(
    config: &Path,
    log: &Path,
    sim: &Simulator,
    journal_path: &Path,
    drain_timeout: Duration,
) -> Journal {
    let runs_logged = || {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("b24eventd running")
            .count()
    };
    let runs_before = runs_logged();
    let mut child = spawn_daemon(config, log);
    super::wait_for("the last run to start", Duration::from_secs(30), || {
        runs_logged() > runs_before
    })
    .await;
    super::wait_for("the queue drained after the kills", drain_timeout, || {
        super::upstream_empty(sim)
    })
    .await;
    let journal = Journal::open(journal_path, b24eventd::config::Synchronous::Full)
        .await
        .unwrap();
    super::wait_for(
        "the journal has nothing unsettled",
        Duration::from_secs(120),
        || journal.counts_blocking().unwrap().unsettled_upstream == 0,
    )
    .await;
    stop_with_sigterm(&mut child, log);
    journal
}

/// Stops the daemon with SIGTERM, which must exit 0.
pub fn stop_with_sigterm(child: &mut Child, log: &Path) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert_eq!(
        exit.code(),
        Some(0),
        "SIGTERM exits 0; log: {}",
        std::fs::read_to_string(log).unwrap()
    );
}
