//! The real daemon binary as a child process: started (and signalled or SIGKILLed by the test),
//! killed if the test ends with it still running, and for the crash tests run a last time to
//! drain the portal and stop on SIGTERM.

use b24eventd::journal::Journal;
use b24eventd_simulator::Simulator;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A daemon the test started; SIGKILLed and reaped when dropped still running (a test that
/// fails leaves no daemon behind).
pub struct Daemon(Child);

impl Deref for Daemon {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `b24eventd --config CONFIG run`, its log appended to `log`.
pub fn spawn_daemon(config: &Path, log: &Path) -> Daemon {
    spawn_daemon_with_env(config, log, &[])
}

/// [`spawn_daemon`] with extra environment variables.
pub fn spawn_daemon_with_env(config: &Path, log: &Path, env: &[(&str, &str)]) -> Daemon {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_b24eventd"))
        .args(["--config", config.to_str().unwrap(), "run"])
        .env("B24EVENTD_LOG", "warn,b24eventd=info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the daemon binary starts");
    Daemon(child)
}

/// A last run after the kills: waits until it is up (its signal handlers installed: the queue
/// may be drained already), until the portal holds nothing and the journal has nothing
/// unsettled, then stops it with SIGTERM, which must exit 0. Returns the journal.
pub async fn last_run_drains_and_stops(
    config: &Path,
    log: &Path,
    sim: &Simulator,
    journal_dir: &Path,
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
    let journal = super::open_journal(journal_dir).await;
    super::wait_for(
        "the journal has nothing unsettled",
        Duration::from_secs(120),
        || journal.counts_blocking().unwrap().unsettled_upstream == 0,
    )
    .await;
    stop_with_sigterm(&mut child, log);
    journal
}

/// Sends signal `name` (as `kill` names it: `TERM`, `HUP`, `INT`) to process `pid`.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// Stops the daemon with SIGTERM, which must exit 0.
pub fn stop_with_sigterm(child: &mut Child, log: &Path) {
    signal(child.id(), "TERM");
    let exit = child.wait().unwrap();
    assert_eq!(
        exit.code(),
        Some(0),
        "SIGTERM exits 0; log: {}",
        std::fs::read_to_string(log).unwrap()
    );
}
