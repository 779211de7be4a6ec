//! The daemon under test: the real binary (`b24eventd -c <config> run`, the `b24eventd` beside
//! this bench binary) as a child process
//! against simulators served from the bench process, with its config written and its tokens
//! seeded into its journal first, so its memory and CPU time in `/proc` are its own.

use super::procfs::{self, Memory};
use anyhow::{Context, bail};
use b24eventd::bitrix::Tokens;
use b24eventd::config::Synchronous;
use b24eventd::journal::Journal;
use b24eventd_simulator::{Simulator, SimulatorConfig};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The events every bench portal binds and raises.
pub const EVENTS: [&str; 2] = ["ONCRMDEALADD", "ONCRMDEALUPDATE"];

/// What the pipeline logs (at info) once it is up.
const RUNNING_LINE: &str = "b24eventd running";

/// A scratch directory for one bench (journal, config, sink file, daemon log), removed on drop.
pub struct WorkDir {
    pub path: PathBuf,
}

impl WorkDir {
    pub fn create(bench: &str) -> anyhow::Result<WorkDir> {
        let path = std::env::temp_dir().join(format!(
            "b24eventd-bench-{}-{bench}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(WorkDir { path })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A simulator with the bench events bound, and the token pair it issued.
pub async fn portal(config: SimulatorConfig) -> anyhow::Result<(Simulator, Tokens)> {
    let sim = Simulator::start(config).await?;
    for event in EVENTS {
        sim.bind_offline(event, "");
    }
    let (access, refresh) = sim.issue_tokens();
    Ok((sim, Tokens::from_pair(access, refresh)))
}

/// Raises `count` changes of distinct deals from `first` on, alternating ADD and UPDATE.
pub fn emit_deals(sim: &Simulator, first: u64, count: u64) {
    for id in first..first + count {
        sim.emit_change(EVENTS[(id % 2) as usize], id);
    }
}

/// True when the portal's queue table is empty: nothing queued, reserved or in the error lane.
pub fn upstream_empty(sim: &Simulator) -> bool {
    let s = sim.stats();
    s.queued + s.reserved + s.error_lane == 0
}

/// One `[portals.NAME]` of a bench config.
pub struct PortalSection<'a> {
    pub name: String,
    pub sim: &'a Simulator,
    /// Extra keys appended to the section (`poll_interval = "200ms"`).
    pub extra: String,
}

/// The `[sinks.archive]` file sink writing to `path`.
pub fn file_sink(path: &Path) -> String {
    format!(
        "[sinks.archive]\ntype = \"file\"\npath = \"{}\"\n",
        path.display()
    )
}

/// The `[sinks.receiver]` http sink posting each envelope to `url`.
pub fn http_sink(url: &str) -> String {
    format!(
        "[sinks.receiver]\ntype = \"http\"\nurl = \"{url}\"\ntimeout = \"5s\"\nconcurrency = 8\n"
    )
}

/// Writes `config.toml` in `dir`: the journal in `dir` at `synchronous = "full"`, no admin
/// endpoint, the given portals (defaults for every key not in their `extra`) and sinks.
pub fn write_config(
    dir: &Path,
    portals: &[PortalSection<'_>],
    sinks: &str,
) -> anyhow::Result<PathBuf> {
    let journal = format!(
        "[journal]\npath = \"{}\"\nsynchronous = \"full\"\n",
        dir.join("journal.db").display()
    );
    write_config_with(dir, "config.toml", &journal, portals, sinks)
}

/// Writes `name` in `dir` with the given `[journal]` section (and whatever follows it in
/// that table), no admin endpoint, the given portals and sinks.
pub fn write_config_with(
    dir: &Path,
    name: &str,
    journal: &str,
    portals: &[PortalSection<'_>],
    sinks: &str,
) -> anyhow::Result<PathBuf> {
    let defaults = SimulatorConfig::default();
    let mut text = format!("shutdown_timeout = \"10s\"\n{journal}\n[admin]\nlisten = \"\"\n\n");
    for p in portals {
        write!(
            text,
            "[portals.{name}]\nclient_endpoint = \"{endpoint}\"\noauth_token_url = \"{oauth}\"\n\
client_id = \"{client_id}\"\nclient_secret = \"{secret}\"\nevents = [\"{e0}\", \"{e1}\"]\n{extra}\n\n",
            name = p.name,
            endpoint = p.sim.client_endpoint(),
            oauth = p.sim.oauth_token_url(),
            client_id = defaults.client_id,
            secret = defaults.client_secret,
            e0 = EVENTS[0],
            e1 = EVENTS[1],
            extra = p.extra,
        )?;
    }
    text.push_str(sinks);
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Stores each portal's tokens in the journal at `dir/journal.db`, as `auth import` would.
pub async fn seed_tokens(dir: &Path, tokens: &[(String, Tokens)]) -> anyhow::Result<()> {
    // The daemon opens it at FULL; one fsync per portal is not what is measured here.
    let journal = Journal::open(&dir.join("journal.db"), Synchronous::Normal).await?;
    for (portal, pair) in tokens {
        journal.save_tokens(portal, pair).await?;
    }
    Ok(())
}

/// The `b24eventd` binary of this build: the one in the directory of this bench binary, where
/// `cargo build --workspace` (or `cargo run -p b24eventd-bench`, after it) puts both.
pub fn binary() -> anyhow::Result<PathBuf> {
    let bench = std::env::current_exe().context("cannot find the b24eventd-bench binary")?;
    let daemon = bench.with_file_name("b24eventd");
    if !daemon.is_file() {
        bail!(
            "cannot find the b24eventd binary at {}: build it beside b24eventd-bench with \
`cargo build --release --workspace`",
            daemon.display()
        );
    }
    Ok(daemon)
}

/// The daemon process.
pub struct Daemon {
    child: Child,
    log: PathBuf,
    spawned: Instant,
}

impl Daemon {
    /// Starts [`binary`]` -c <config> run`, logging at `warn,b24eventd=info` to `log`.
    pub fn spawn(config: &Path, log: &Path) -> anyhow::Result<Daemon> {
        Daemon::spawn_binary(&binary()?, config, log)
    }

    /// Like [`Daemon::spawn`] with another build of b24eventd.
    pub fn spawn_binary(exe: &Path, config: &Path, log: &Path) -> anyhow::Result<Daemon> {
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(exe)
            .arg("-c")
            .arg(config)
            .arg("run")
            .env("B24EVENTD_LOG", "warn,b24eventd=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        Ok(Daemon {
            child,
            log: log.to_path_buf(),
            spawned: Instant::now(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the daemon logged that it runs; returns how long that took since the spawn.
    pub async fn wait_running(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        loop {
            if self.log_text().contains(RUNNING_LINE) {
                return Ok(self.spawned.elapsed());
            }
            self.ensure_alive()?;
            if self.spawned.elapsed() > timeout {
                bail!(
                    "the daemon did not start within {timeout:?}; its log: {}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the daemon has logged that it runs.
    pub fn is_running(&self) -> bool {
        self.log_text().contains(RUNNING_LINE)
    }

    /// Fails with the end of the daemon's log when it has exited.
    pub fn ensure_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the daemon exited with {status}; its log: {}",
                self.log_tail()
            );
        }
        Ok(())
    }

    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        procfs::cpu_seconds(self.pid())
    }

    pub fn memory(&self) -> anyhow::Result<Memory> {
        procfs::memory(self.pid())
    }

    /// Sends SIGTERM and waits for the exit (30 s at most, then SIGKILL); fails unless it
    /// exited 0.
    pub async fn stop(mut self) -> anyhow::Result<Duration> {
        let asked = Instant::now();
        let pid = rustix::process::Pid::from_raw(self.pid() as i32)
            .context("the daemon has no valid pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .context("cannot send SIGTERM to the daemon")?;
        loop {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!(
                        "the daemon exited with {status} after SIGTERM; its log: {}",
                        self.log_tail()
                    );
                }
                return Ok(asked.elapsed());
            }
            if asked.elapsed() > Duration::from_secs(30) {
                bail!(
                    "the daemon did not stop within 30 s of SIGTERM; its log: {}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the daemon's log, for errors.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `done` every `every` until it holds; fails with `what` after `timeout`, or when the
/// daemon died.
pub async fn wait_until(
    daemon: &mut Daemon,
    what: &str,
    timeout: Duration,
    every: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    while !done() {
        daemon.ensure_alive()?;
        if started.elapsed() > timeout {
            bail!(
                "timed out after {timeout:?} waiting for {what}; daemon log: {}",
                daemon.log_tail()
            );
        }
        tokio::time::sleep(every).await;
    }
    Ok(started.elapsed())
}
