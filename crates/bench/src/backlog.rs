//! `bench backlog`: the journal's own speed. A backlog of N events (default 100,000) queued
//! before the start on a portal without limits is drained by the daemon (one file sink, journal
//! `synchronous = FULL`, the client's bucket opened as for a portal that enforces none): events
//! per second from the spawn to an empty upstream queue, and the daemon's CPU per event against
//! bare rusqlite inserts of the same rows in the same run (the `overhead` baseline). The same
//! backlog is drained again with the journal on PostgreSQL (`--postgres`, a fresh schema
//! dropped after): events per second against the SQLite drain's, and the CPU of the server
//! backends that served the daemon.

use super::Report;
use super::daemon::{self, Daemon, PortalSection, WorkDir};
use super::drain::count_lines;
use super::overhead::{BATCH_SIZE, Cost, bare_inserts};
use super::pg::{self, BackendSampler, Schema};
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
/// The least share of the SQLite drain rate the PostgreSQL journal is meant to reach.
const TARGET_PG_SHARE: f64 = 1.0 / 3.0;

/// Where the daemon's journal is.
#[derive(Clone, Copy)]
pub enum Backend<'a> {
    Sqlite,
    /// A fresh schema on the server at this URL.
    Postgres(&'a str),
}

/// What the PostgreSQL server spent on one drain.
struct ServerCost {
    /// CPU seconds of the backends of the daemon's connections.
    backends_cpu_seconds: f64,
    /// CPU seconds of every process of the server (other clients' included), when visible.
    server_cpu_seconds: Option<f64>,
    most_connections: usize,
}

/// One drain of the backlog by one build.
struct Drained {
    cost: Cost,
    /// CPU seconds of the bench process over the drain: the simulator serving the daemon.
    simulator_cpu_seconds: f64,
    requests: u64,
    gets: u64,
    most_gets_per_request: u64,
    server: Option<ServerCost>,
}

pub async fn run(
    events: u64,
    compare_with: Option<&Path>,
    postgres: Option<&str>,
) -> anyhow::Result<Report> {
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
        drain(events, &this, "backlog", Backend::Sqlite).await?,
    )];
    if let Some(url) = postgres {
        report.setup.push(
            "PostgreSQL journal: the same queue, simulator and config but `[journal] url` on a \
fresh schema of --postgres (dropped after), default max_connections; the server's CPU is read \
from /proc: the backends of the daemon's connections (found in pg_stat_activity by the \
application_name put in the daemon's URL and by its instance-lock connection's name, sampled \
every 200 ms, each backend's last reading: all of its time, as they are the daemon's own), and every process of the server (its WAL writer \
and checkpointer, and any other client's backends)"
                .to_string(),
        );
        subjects.push((
            "b24eventd, PostgreSQL journal".to_string(),
            drain(events, &this, "backlog-pg", Backend::Postgres(url)).await?,
        ));
    }
    if let Some(exe) = compare_with {
        report.setup.push(format!(
            "other build: {}, same queue, simulator and config",
            exe.display()
        ));
        subjects.push((
            "b24eventd (other build)".to_string(),
            drain(events, exe, "backlog-other", Backend::Sqlite).await?,
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
        if let Some(server) = &d.server {
            report.row(
                subject,
                "PostgreSQL backends' CPU per event",
                server.backends_cpu_seconds * 1e6 / events as f64,
                "us",
            );
            if let Some(all) = server.server_cpu_seconds {
                report.row(
                    subject,
                    "PostgreSQL server CPU per event (every process)",
                    all * 1e6 / events as f64,
                    "us",
                );
            }
            report.row(
                subject,
                "most connections at once",
                server.most_connections as f64,
                "",
            );
        }
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
    if let (Some((_, sqlite)), Some((_, pg))) = (
        subjects.first(),
        subjects.iter().find(|(_, d)| d.server.is_some()),
    ) {
        report.ratio(
            "PostgreSQL / SQLite journal: events/s",
            sqlite.cost.seconds / pg.cost.seconds,
            &format!("the target is {TARGET_PG_SHARE:.2} or more"),
        );
        report.ratio(
            "PostgreSQL / SQLite journal: daemon CPU per event",
            pg.cost.cpu_seconds / sqlite.cost.cpu_seconds.max(1e-9),
            "lower is better",
        );
        if let Some(server) = &pg.server {
            report.ratio(
                "PostgreSQL (daemon + its backends) / SQLite daemon: CPU per event",
                (pg.cost.cpu_seconds + server.backends_cpu_seconds)
                    / sqlite.cost.cpu_seconds.max(1e-9),
                "lower is better; SQLite's work is inside the daemon's process",
            );
        }
    }
    report.notes.push(
        "the simulator runs in the bench process on the same cores, one request at a time \
(under its lock): its CPU (and any other load on the machine) is not the daemon's but bounds \
the drain"
            .to_string(),
    );
    Ok(report)
}

/// Drains a fresh backlog of `events` with the daemon `exe`, in a scratch directory of its own
/// and the journal on `backend`.
async fn drain(
    events: u64,
    exe: &Path,
    name: &str,
    backend: Backend<'_>,
) -> anyhow::Result<Drained> {
    let dir = WorkDir::create(name)?;
    let (sim, tokens) = daemon::portal(SimulatorConfig::default()).await?;
    daemon::emit_deals(&sim, 1, events);
    let out = dir.file("events.jsonl");
    let portals = [PortalSection {
        name: "main".to_string(),
        sim: &sim,
        extra: NO_LIMITS.to_string(),
    }];
    let sink = daemon::file_sink(&out);
    let tokens = [("main".to_string(), tokens)];
    let app = format!("b24bench-{}-{name}", std::process::id());
    let schema = match backend {
        Backend::Sqlite => {
            daemon::seed_tokens(&dir.path, &tokens).await?;
            None
        }
        Backend::Postgres(url) => {
            let schema = Schema::fresh(url, "backlog").await?;
            let journal = schema.open_journal().await?;
            for (portal, pair) in &tokens {
                journal.save_tokens(portal, pair).await?;
            }
            drop(journal);
            Some(schema)
        }
    };
    let config = match &schema {
        None => daemon::write_config(&dir.path, &portals, &sink)?,
        Some(schema) => daemon::write_config_with(
            &dir.path,
            "config.toml",
            &schema.journal_section(&app, ""),
            &portals,
            &sink,
        )?,
    };
    let result = drain_with(events, exe, &dir, &config, &sim, schema.as_ref(), &app).await;
    if let Some(schema) = &schema {
        schema.drop_now().await?;
    }
    let (cost, simulator_cpu_seconds, server) = result?;
    let lines = count_lines(&out)?;
    if lines < events as usize {
        bail!(
            "{} wrote {lines} of {events} events to its file",
            exe.display()
        );
    }
    let stats = sim.stats();
    Ok(Drained {
        cost,
        simulator_cpu_seconds,
        requests: stats.requests,
        gets: gets(&sim),
        most_gets_per_request: stats.max_gets_per_batch,
        server,
    })
}

/// Runs the daemon until the upstream queue is empty; its cost, the bench's CPU over it (the
/// simulator) and, on PostgreSQL, the server's.
async fn drain_with(
    events: u64,
    exe: &Path,
    dir: &WorkDir,
    config: &Path,
    sim: &Simulator,
    schema: Option<&Schema>,
    app: &str,
) -> anyhow::Result<(Cost, f64, Option<ServerCost>)> {
    let bench_cpu_before = procfs::cpu_seconds(std::process::id())?;
    let server_before = match schema {
        Some(s) => pg::server_cpu_seconds(s.client()).await,
        None => None,
    };
    let mut child = Daemon::spawn_binary(exe, config, &dir.file("daemon.log"))?;
    let started = Instant::now();
    let sampler = match schema {
        Some(s) => Some(
            BackendSampler::start(
                &s.url,
                vec![(app.to_string(), child.pid())],
                Duration::from_millis(200),
            )
            .await?,
        ),
        None => None,
    };
    daemon::wait_until(
        &mut child,
        &format!("the daemon to drain the backlog of {events}"),
        Duration::from_secs(60 * 60),
        Duration::from_millis(100),
        || daemon::upstream_empty(sim),
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = child.cpu_seconds()?;
    let simulator_cpu_seconds = procfs::cpu_seconds(std::process::id())? - bench_cpu_before;
    let server = match (schema, sampler) {
        (Some(s), Some(sampler)) => {
            let sampled = sampler.finish().await?;
            let after = pg::server_cpu_seconds(s.client()).await;
            Some(ServerCost {
                backends_cpu_seconds: sampled.cpu_seconds.first().copied().unwrap_or(0.0),
                server_cpu_seconds: server_before.zip(after).map(|(b, a)| a - b),
                most_connections: sampled.most_connections.first().copied().unwrap_or(0),
            })
        }
        _ => None,
    };
    child.stop().await?;
    sim.shutdown();
    Ok((
        Cost {
            seconds,
            cpu_seconds,
        },
        simulator_cpu_seconds,
        server,
    ))
}

fn gets(sim: &Simulator) -> u64 {
    sim.stats()
        .calls_by_method
        .get("event.offline.get")
        .copied()
        .unwrap_or(0)
}
