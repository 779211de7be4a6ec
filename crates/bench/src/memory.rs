//! `bench memory`: the daemon's resident memory (`VmRSS` after settling, `VmHWM`) idle with one
//! portal (the baseline), under a backlog queued before the start (sampled during the drain),
//! and with many portals, each its own simulator on its own port with a few events.

use super::Report;
use super::daemon::{self, Daemon, PortalSection, WorkDir};
use super::procfs::Memory;
use b24eventd::bitrix::Tokens;
use b24eventd_simulator::{Simulator, SimulatorConfig};
use std::time::{Duration, Instant};

/// How long the daemon sits before its memory is read as "settled".
const SETTLE: Duration = Duration::from_secs(5);
/// Events queued on each of the many portals.
const EVENTS_PER_PORTAL: u64 = 3;

pub async fn run(backlog: u64, portals: u32) -> anyhow::Result<Report> {
    let mut report = Report::new("memory");
    report.setup = vec![
        "simulators without limits, default portal settings, one file sink, journal synchronous=full".to_string(),
        format!("idle: one portal, nothing queued, read {SETTLE:?} after the start"),
        format!("backlog: {backlog} events queued before the start, VmRSS sampled every 250 ms during the drain"),
        format!(
            "many portals: {portals} simulators in the bench process (one port each), {EVENTS_PER_PORTAL} \
events each, one [portals.pNNNN] each; read {SETTLE:?} after every queue is empty"
        ),
        format!("open-file limit of the bench and the daemon (RLIMIT_NOFILE): {}", nofile_limit()),
    ];
    let idle = idle_one_portal().await?;
    report.row("baseline: idle, 1 portal", "VmRSS", idle.rss_mib(), "MiB");
    report.row("baseline: idle, 1 portal", "VmHWM", idle.hwm_mib(), "MiB");

    let drained = backlog_drain(backlog).await?;
    let subject = format!("backlog {backlog}");
    report.row(&subject, "VmRSS max sampled", drained.peak_rss_mib, "MiB");
    report.row(&subject, "VmHWM", drained.settled.hwm_mib(), "MiB");
    report.row(&subject, "VmRSS settled", drained.settled.rss_mib(), "MiB");
    report.row(&subject, "drain time", drained.seconds, "s");
    report.row(
        &subject,
        "events per second",
        backlog as f64 / drained.seconds,
        "",
    );
    report.ratio(
        &format!("VmHWM backlog {backlog} / idle VmRSS"),
        drained.settled.hwm_kib as f64 / idle.rss_kib as f64,
        "lower is better",
    );

    let subject = format!("{portals} portals");
    match many_portals(portals, &mut report, &subject).await {
        Ok(m) => {
            report.ratio(
                &format!("VmRSS {portals} portals / idle VmRSS"),
                m.rss_kib as f64 / idle.rss_kib as f64,
                "lower is better",
            );
            report.ratio(
                &format!("VmHWM {portals} portals / idle VmRSS"),
                m.hwm_kib as f64 / idle.rss_kib as f64,
                "lower is better",
            );
        }
        Err(e) => report
            .notes
            .push(format!("{subject}: did not complete: {e:#}")),
    }
    Ok(report)
}

fn nofile_limit() -> String {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let show = |v: Option<u64>| v.map_or("unlimited".to_string(), |v| v.to_string());
    format!("soft {}, hard {}", show(limit.current), show(limit.maximum))
}

fn one_portal<'a>(sim: &'a Simulator, name: &str) -> PortalSection<'a> {
    PortalSection {
        name: name.to_string(),
        sim,
        extra: String::new(),
    }
}

async fn idle_one_portal() -> anyhow::Result<Memory> {
    let dir = WorkDir::create("memory-idle")?;
    let (sim, tokens) = daemon::portal(SimulatorConfig::default()).await?;
    let out = dir.file("events.jsonl");
    let config = daemon::write_config(
        &dir.path,
        &[one_portal(&sim, "main")],
        &daemon::file_sink(&out),
    )?;
    daemon::seed_tokens(&dir.path, &[("main".to_string(), tokens)]).await?;
    let mut child = Daemon::spawn(&config, &dir.file("daemon.log"))?;
    child.wait_running(Duration::from_secs(60)).await?;
    tokio::time::sleep(SETTLE).await;
    let memory = child.memory()?;
    child.stop().await?;
    sim.shutdown();
    Ok(memory)
}

struct BacklogDrain {
    seconds: f64,
    peak_rss_mib: f64,
    settled: Memory,
}

async fn backlog_drain(backlog: u64) -> anyhow::Result<BacklogDrain> {
    let dir = WorkDir::create("memory-backlog")?;
    let (sim, tokens) = daemon::portal(SimulatorConfig::default()).await?;
    daemon::emit_deals(&sim, 1, backlog);
    let out = dir.file("events.jsonl");
    let config = daemon::write_config(
        &dir.path,
        &[one_portal(&sim, "main")],
        &daemon::file_sink(&out),
    )?;
    daemon::seed_tokens(&dir.path, &[("main".to_string(), tokens)]).await?;
    let mut child = Daemon::spawn(&config, &dir.file("daemon.log"))?;
    let started = Instant::now();
    let mut peak_kib = 0u64;
    loop {
        if let Ok(m) = child.memory() {
            peak_kib = peak_kib.max(m.rss_kib);
        }
        if daemon::upstream_empty(&sim) {
            break;
        }
        child.ensure_alive()?;
        if started.elapsed() > Duration::from_secs(60 * 60) {
            anyhow::bail!(
                "the backlog of {backlog} was not drained within an hour; daemon log: {}",
                child.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    let settled = child.memory()?;
    child.stop().await?;
    sim.shutdown();
    Ok(BacklogDrain {
        seconds,
        peak_rss_mib: peak_kib as f64 / 1024.0,
        settled,
    })
}

/// Runs `portals` portals; records what it measured into `report` as it goes (so a failure
/// later still shows how far it got) and returns the settled memory.
async fn many_portals(portals: u32, report: &mut Report, subject: &str) -> anyhow::Result<Memory> {
    let dir = WorkDir::create("memory-portals")?;
    let started = Instant::now();
    let mut sims = Vec::with_capacity(portals as usize);
    let mut tokens: Vec<(String, Tokens)> = Vec::with_capacity(portals as usize);
    for n in 0..portals {
        let (sim, pair) = daemon::portal(SimulatorConfig::default()).await?;
        daemon::emit_deals(&sim, 1, EVENTS_PER_PORTAL);
        tokens.push((format!("p{n:04}"), pair));
        sims.push(sim);
    }
    report.row(
        subject,
        "simulators started",
        started.elapsed().as_secs_f64(),
        "s",
    );
    let sections: Vec<PortalSection<'_>> = sims
        .iter()
        .zip(&tokens)
        .map(|(sim, (name, _))| one_portal(sim, name))
        .collect();
    let out = dir.file("events.jsonl");
    let config = daemon::write_config(&dir.path, &sections, &daemon::file_sink(&out))?;
    let seeding = Instant::now();
    daemon::seed_tokens(&dir.path, &tokens).await?;
    report.row(
        subject,
        "tokens seeded",
        seeding.elapsed().as_secs_f64(),
        "s",
    );

    let mut child = Daemon::spawn(&config, &dir.file("daemon.log"))?;
    let up = child.wait_running(Duration::from_secs(10 * 60)).await?;
    report.row(subject, "time to 'running'", up.as_secs_f64(), "s");
    let all_empty = || sims.iter().all(daemon::upstream_empty);
    let drained = daemon::wait_until(
        &mut child,
        "every portal drained",
        Duration::from_secs(20 * 60),
        Duration::from_millis(500),
        all_empty,
    )
    .await;
    let at_end = child.memory();
    if let Ok(m) = &at_end {
        report.row(subject, "VmRSS when drained or stopped", m.rss_mib(), "MiB");
    }
    let drained = drained?;
    report.row(
        subject,
        "all drained after start",
        (up + drained).as_secs_f64(),
        "s",
    );
    tokio::time::sleep(SETTLE).await;
    let settled = child.memory()?;
    report.row(subject, "VmRSS settled", settled.rss_mib(), "MiB");
    report.row(subject, "VmHWM", settled.hwm_mib(), "MiB");
    report.row(subject, "open fds", open_fds(child.pid()) as f64, "");
    report.row(subject, "threads", threads(child.pid()) as f64, "");
    child.stop().await?;
    for sim in &sims {
        sim.shutdown();
    }
    Ok(settled)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}
