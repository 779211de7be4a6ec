//! `bench backlog`: the journal's own speed. A backlog of N events (default 100,000) queued
//! before the start on a portal without limits is drained by the daemon (one file sink, journal
//! `synchronous = FULL`, the client's bucket opened as for a portal that enforces none): events
//! per second from the spawn to an empty upstream queue, and the daemon's CPU per event against
//! bare rusqlite inserts of the same rows in the same run (the `overhead` baseline).

use super::Report;
use super::daemon::{self, Daemon, PortalSection, WorkDir};
use super::drain::count_lines;
use super::overhead::{BATCH_SIZE, Cost, bare_inserts};
use super::procfs;
use anyhow::bail;
use b24eventd_simulator::{Simulator, SimulatorConfig};
use std::path::Path;
use std::time::{Duration, Instant};

/// The portal's keys besides the defaults: a client bucket no drain can empty, since the
/// simulated portal limits nothing (a self-hosted portal with its limiter off).
const NO_LIMITS: &str = "rate_limit = { burst = 1000000, per_second = 1000000.0, share = 1.0 }";
/// The drain rate the journal is meant to reach on this bench.
const TARGET_EVENTS_PER_SECOND: f64 = 20_000.0;
/// The most CPU per event the daemon is meant to spend, in bare inserts of the same rows.
const TARGET_CPU_RATIO: f64 = 3.0;

/// One drain of the backlog by one build.
struct Drained {
    cost: Cost,
    /// CPU seconds of the bench process over the drain: the simulator serving the daemon.
    simulator_cpu_seconds: f64,
    requests: u64,
    gets: u64,
    most_gets_per_request: u64,
}

pub async fn run(events: u64, compare_with: Option<&Path>) -> anyhow::Result<Report> {
    let mut report = Report::new("backlog");
    let sim = SimulatorConfig::default();
    report.setup = vec![
        format!(
            "{events} events queued before the start (distinct deal ids, ADD/UPDATE alternating); \
simulator without rate or operating limits, each call taking {:?} + {:?} per event returned or \
affected (its defaults), answered after that time",
            sim.operating_cost, sim.operating_cost_per_event
        ),
        format!(
            "b24eventd: the real binary, one file sink, journal synchronous=full, default portal \
settings but `{NO_LIMITS}`; timed from the spawn until the upstream queue is empty (every event \
journaled, written, fsynced and cleared); CPU = utime+stime of the process over that span"
        ),
        format!(
            "baseline: bare rusqlite inserts of the same {events} rows into the journal's schema, \
{BATCH_SIZE} rows and their batch row per transaction (WAL, synchronous=FULL), CPU of the \
inserting thread"
        ),
    ];
    let this = daemon::binary()?;
    let mut subjects = vec![(
        "b24eventd".to_string(),
        drain(events, &this, "backlog").await?,
    )];
    if let Some(exe) = compare_with {
        report.setup.push(format!(
            "other build: {}, same queue, simulator and config",
            exe.display()
        ));
        subjects.push((
            "b24eventd (other build)".to_string(),
            drain(events, exe, "backlog-other").await?,
        ));
    }
    let dir = WorkDir::create("backlog-bare")?;
    let db = dir.file("bare.db");
    let baseline =
        tokio::task::spawn_blocking(move || bare_inserts(&db, events, BATCH_SIZE)).await??;
    let per_event = |c: &Cost| c.cpu_seconds * 1e6 / events as f64;
    report.row("baseline: bare inserts", "wall time", baseline.seconds, "s");
    report.row(
        "baseline: bare inserts",
        "events per second",
        events as f64 / baseline.seconds,
        "",
    );
    report.row(
        "baseline: bare inserts",
        "CPU per event",
        per_event(&baseline),
        "us",
    );
    for (subject, d) in &subjects {
        report.row(subject, "wall time", d.cost.seconds, "s");
        report.row(
            subject,
            "events per second",
            events as f64 / d.cost.seconds,
            "",
        );
        report.row(subject, "CPU per event", per_event(&d.cost), "us");
        report.row(
            subject,
            "busy (CPU / wall)",
            100.0 * d.cost.cpu_seconds / d.cost.seconds,
            "%",
        );
        report.row(
            subject,
            "simulator CPU per event (the bench process)",
            d.simulator_cpu_seconds * 1e6 / events as f64,
            "us",
        );
        report.row(subject, "requests", d.requests as f64, "");
        report.row(subject, "event.offline.get calls", d.gets as f64, "");
        report.row(
            subject,
            "most gets in one request",
            d.most_gets_per_request as f64,
            "",
        );
        report.ratio(
            &format!("{subject}: events/s / {TARGET_EVENTS_PER_SECOND}"),
            events as f64 / d.cost.seconds / TARGET_EVENTS_PER_SECOND,
            "the drain rate against its target; 1 or more reaches it",
        );
        report.ratio(
            &format!("{subject}: CPU per event / baseline"),
            d.cost.cpu_seconds / baseline.cpu_seconds.max(1e-9),
            &format!("lower is better; the target is {TARGET_CPU_RATIO} or less"),
        );
    }
    report.notes.push(
        "the simulator runs in the bench process on the same cores, one request at a time \
(under its lock): its CPU (and any other load on the machine) is not the daemon's but bounds \
the drain"
            .to_string(),
    );
    Ok(report)
}

/// Drains a fresh backlog of `events` with the daemon `exe`, in a scratch directory of its own.
async fn drain(events: u64, exe: &Path, name: &str) -> anyhow::Result<Drained> {
    let dir = WorkDir::create(name)?;
    let (sim, tokens) = daemon::portal(SimulatorConfig::default()).await?;
    daemon::emit_deals(&sim, 1, events);
    let out = dir.file("events.jsonl");
    let config = daemon::write_config(
        &dir.path,
        &[PortalSection {
            name: "main".to_string(),
            sim: &sim,
            extra: NO_LIMITS.to_string(),
        }],
        &daemon::file_sink(&out),
    )?;
    daemon::seed_tokens(&dir.path, &[("main".to_string(), tokens)]).await?;
    let bench_cpu_before = procfs::cpu_seconds(std::process::id())?;
    let mut child = Daemon::spawn_binary(exe, &config, &dir.file("daemon.log"))?;
    let started = Instant::now();
    daemon::wait_until(
        &mut child,
        "the daemon to drain the backlog",
        Duration::from_secs(60 * 60),
        Duration::from_millis(100),
        || daemon::upstream_empty(&sim),
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = child.cpu_seconds()?;
    let simulator_cpu_seconds = procfs::cpu_seconds(std::process::id())? - bench_cpu_before;
    child.stop().await?;
    sim.shutdown();
    let lines = count_lines(&out)?;
    if lines < events as usize {
        bail!(
            "{} wrote {lines} of {events} events to its file",
            exe.display()
        );
    }
    let stats = sim.stats();
    Ok(Drained {
        cost: Cost {
            seconds,
            cpu_seconds,
        },
        simulator_cpu_seconds,
        requests: stats.requests,
        gets: gets(&sim),
        most_gets_per_request: stats.max_gets_per_batch,
    })
}

fn gets(sim: &Simulator) -> u64 {
    sim.stats()
        .calls_by_method
        .get("event.offline.get")
        .copied()
        .unwrap_or(0)
}
