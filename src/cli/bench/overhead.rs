//! `bench overhead`: the local cost of an event with no portal limits. N events go through the
//! daemon into a file sink with the journal at `synchronous = FULL` (events per second, daemon
//! CPU per event); the baseline inserts rows of the same shape into a bare SQLite database (WAL,
//! `synchronous = FULL`) in transactions of the daemon's batch size, measuring its own thread's
//! CPU time.

use super::Report;
use super::daemon::{self, Daemon, PortalSection, WorkDir};
use super::drain::count_lines;
use super::procfs;
use anyhow::bail;
use b24eventd_simulator::SimulatorConfig;
use rusqlite::params;
use std::path::Path;
use std::time::{Duration, Instant};

/// The daemon's `batch_size` (its default): rows per reservation and per baseline transaction.
const BATCH_SIZE: u64 = 50;

/// Wall and CPU time of one way of storing the events.
struct Cost {
    seconds: f64,
    cpu_seconds: f64,
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
            "baseline: bare rusqlite (bundled SQLite, WAL, synchronous=FULL) inserting rows of the \
journal's events shape (envelope id, portal, offline id, event, message id, timestamps, data JSON, \
additional JSON, status) in transactions of {BATCH_SIZE} rows; CPU = the inserting thread's \
CLOCK_THREAD_CPUTIME_ID"
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
        report.row(subject, "events per second", events as f64 / c.seconds, "");
        report.row(
            subject,
            "CPU per event",
            c.cpu_seconds * 1e6 / events as f64,
            "us",
        );
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

fn gets(sim: &b24eventd_simulator::Simulator) -> u64 {
    sim.stats()
        .calls_by_method
        .get("event.offline.get")
        .copied()
        .unwrap_or(0)
}

/// Inserts `events` rows shaped like the journal's events in transactions of `per_txn`.
fn bare_inserts(path: &Path, events: u64, per_txn: u64) -> anyhow::Result<Cost> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    conn.pragma_update(None, "synchronous", "full")?;
    conn.execute_batch(
        "CREATE TABLE events (
            id INTEGER PRIMARY KEY, envelope_id TEXT NOT NULL, portal TEXT NOT NULL,
            offline_id INTEGER NOT NULL, event TEXT NOT NULL, message_id TEXT NOT NULL,
            timestamp TEXT NOT NULL, data TEXT NOT NULL, additional TEXT NOT NULL,
            fetched_at TEXT NOT NULL, status TEXT NOT NULL)",
    )?;
    let started = Instant::now();
    let cpu_before = procfs::thread_cpu_seconds();
    let mut next = 1u64;
    while next <= events {
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (envelope_id, portal, offline_id, event, message_id, timestamp,
                                     data, additional, fetched_at, status)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'pending')",
            )?;
            let fetched_at = chrono::Utc::now().to_rfc3339();
            for id in next..(next + per_txn).min(events + 1) {
                let data = serde_json::json!({"FIELDS": {"ID": id.to_string()}});
                insert.execute(params![
                    crate::envelope::Envelope::make_id(
                        "main",
                        id as i64,
                        "2026-01-01T00:00:00+03:00"
                    ),
                    "main",
                    id as i64,
                    daemon::EVENTS[(id % 2) as usize],
                    format!("{:032x}", u128::from(id) * 0x9e37_79b9_7f4a_7c15),
                    "2026-01-01T00:00:00+03:00",
                    data.to_string(),
                    "{\"user_id\":\"1\"}",
                    fetched_at,
                ])?;
            }
        }
        tx.commit()?;
        next += per_txn;
    }
    Ok(Cost {
        seconds: started.elapsed().as_secs_f64(),
        cpu_seconds: procfs::thread_cpu_seconds() - cpu_before,
    })
}
