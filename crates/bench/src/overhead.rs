//! `bench overhead`: the local cost of an event with no portal limits. N events go through the
//! daemon into a file sink with the journal at `synchronous = FULL` (events per second, daemon
//! CPU per event); the baseline inserts the same events with bare rusqlite into a database with
//! the journal's schema (WAL, `synchronous = FULL`; `b24eventd::journal::baseline`), one batch
//! row and its events per transaction of the daemon's batch size, measuring its own thread's
//! CPU time.

use super::Report;
use super::daemon::{self, Daemon, PortalSection, WorkDir};
use super::drain::count_lines;
use super::procfs;
use anyhow::bail;
use b24eventd::envelope::Envelope;
use b24eventd::journal::baseline::{BareInserts, BaselineEvent};
use b24eventd_simulator::{Simulator, SimulatorConfig};
use std::path::Path;
use std::time::{Duration, Instant};

/// The daemon's `batch_size` (its default): rows per reservation and per baseline transaction.
pub const BATCH_SIZE: u64 = 50;

/// Wall and CPU time of one way of storing the events.
pub struct Cost {
    pub seconds: f64,
    pub cpu_seconds: f64,
}

impl Cost {
    /// Its rows of `report` for `events` events: events per second and CPU per event.
    pub fn report_rates(&self, report: &mut Report, subject: &str, events: u64) {
        report.row(
            subject,
            "events per second",
            events as f64 / self.seconds,
            "",
        );
        report.row(
            subject,
            "CPU per event",
            self.cpu_seconds * 1e6 / events as f64,
            "us",
        );
    }
}

pub async fn run(events: u64) -> anyhow::Result<Report> {
    let mut report = Report::new("overhead");
    report.setup = vec![
        format!("{events} events, simulator without rate or operating limits"),
        format!(
            "b24eventd: the real binary, one file sink, journal synchronous=full, batch_size={BATCH_SIZE}, \
poll_interval = idle_poll_max = 200ms; timed from the first emit to an empty upstream queue \
(every event journaled, written, fsynced and cleared); CPU = utime+stime of the process"
        ),
        format!(
            "baseline: bare rusqlite (bundled SQLite, WAL, synchronous=FULL) inserting into the \
journal's own schema (its migrations, its indexes) one batch row and its events (envelope id, \
portal, offline id, event, message id, timestamps, data JSON, additional JSON, status) per \
transaction of {BATCH_SIZE} rows; CPU = the inserting thread's CLOCK_THREAD_CPUTIME_ID"
        ),
    ];
    let dir = WorkDir::create("overhead")?;
    let (daemon_cost, gets) = through_daemon(events, &dir).await?;
    let db = dir.file("bare.db");
    let baseline =
        tokio::task::spawn_blocking(move || bare_inserts(&db, events, BATCH_SIZE)).await??;
    for (subject, c) in [
        ("baseline: bare inserts", &baseline),
        ("b24eventd", &daemon_cost),
    ] {
        report.row(subject, "wall time", c.seconds, "s");
        c.report_rates(&mut report, subject, events);
    }
    report.row("b24eventd", "event.offline.get calls", gets as f64, "");
    report.ratio(
        "wall time (b24eventd / baseline)",
        daemon_cost.seconds / baseline.seconds,
        "how many times longer the daemon takes than bare journal inserts; lower is better",
    );
    report.ratio(
        "CPU per event (b24eventd / baseline)",
        daemon_cost.cpu_seconds / baseline.cpu_seconds.max(1e-9),
        "lower is better",
    );
    report.notes.push(
        "the daemon also fetches over HTTP from the simulator (which runs in the bench process), \
journals deliveries and outcomes, writes and fsyncs the JSONL file and sends the clears: the \
baseline is the floor of one fsynced transaction per fetched batch, not the same work"
            .to_string(),
    );
    Ok(report)
}

async fn through_daemon(events: u64, dir: &WorkDir) -> anyhow::Result<(Cost, u64)> {
    let (sim, tokens) = daemon::portal(SimulatorConfig::default()).await?;
    let out = dir.file("events.jsonl");
    let config = daemon::write_config(
        &dir.path,
        &[PortalSection {
            name: "main".to_string(),
            sim: &sim,
            extra: "poll_interval = \"200ms\"\nidle_poll_max = \"200ms\"".to_string(),
        }],
        &daemon::file_sink(&out),
    )?;
    daemon::seed_tokens(&dir.path, &[("main".to_string(), tokens)]).await?;
    let mut child = Daemon::spawn(&config, &dir.file("daemon.log"))?;
    child.wait_running(Duration::from_secs(60)).await?;
    // Let the start-up calls (orphan sweep, first empty polls) finish before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu_before = child.cpu_seconds()?;
    let gets_before = gets(&sim);
    let started = Instant::now();
    daemon::emit_deals(&sim, 1, events);
    daemon::wait_until(
        &mut child,
        "the daemon to deliver and clear every event",
        Duration::from_secs(30 * 60),
        Duration::from_millis(50),
        || daemon::upstream_empty(&sim),
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_seconds = child.cpu_seconds()? - cpu_before;
    let gets = gets(&sim) - gets_before;
    child.stop().await?;
    sim.shutdown();
    let lines = count_lines(&out)?;
    if lines < events as usize {
        bail!("the daemon wrote {lines} of {events} events to its file");
    }
    Ok((
        Cost {
            seconds,
            cpu_seconds,
        },
        gets,
    ))
}

fn gets(sim: &Simulator) -> u64 {
    sim.stats()
        .calls_by_method
        .get("event.offline.get")
        .copied()
        .unwrap_or(0)
}

/// Inserts `events` rows as fetched batches of `per_txn`, one transaction each, into a
/// database with the journal's schema ([`BareInserts`]).
pub fn bare_inserts(path: &Path, events: u64, per_txn: u64) -> anyhow::Result<Cost> {
    let mut bare = BareInserts::create(path)?;
    let started = Instant::now();
    let cpu_before = procfs::thread_cpu_seconds();
    let mut next = 1u64;
    while next <= events {
        let fetched_at = chrono::Utc::now().to_rfc3339();
        let batch: Vec<BaselineEvent> = (next..(next + per_txn).min(events + 1))
            .map(|id| BaselineEvent {
                envelope_id: Envelope::make_id("main", id as i64, TIMESTAMP),
                offline_id: id as i64,
                event: daemon::EVENTS[(id % 2) as usize].to_string(),
                message_id: format!("{:032x}", u128::from(id) * 0x9e37_79b9_7f4a_7c15),
                timestamp: TIMESTAMP.to_string(),
                data: serde_json::json!({"FIELDS": {"ID": id.to_string()}}).to_string(),
                additional: "{\"user_id\":\"1\"}".to_string(),
            })
            .collect();
        bare.insert_batch("main", &format!("bench{next}"), &fetched_at, &batch)?;
        next += per_txn;
    }
    Ok(Cost {
        seconds: started.elapsed().as_secs_f64(),
        cpu_seconds: procfs::thread_cpu_seconds() - cpu_before,
    })
}

/// The `TIMESTAMP_X` of every baseline row.
pub const TIMESTAMP: &str = "2026-01-01T00:00:00+03:00";
