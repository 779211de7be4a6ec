//! `bench journal`: the journal's own work per event, in the bench process, without HTTP, sinks
//! or a simulator: what the daemon asks of its journal for each fetched event (the batch with
//! its events and deliveries journaled, the deliveries read back as due, their outcomes and the
//! settle lattice, the settlements read and marked), against bare rusqlite inserts of the same
//! rows in the same run (the `overhead` baseline). A profile of `bench backlog` spends most of
//! the daemon's CPU here; this bench measures that part alone, so a change to the journal's SQL
//! can be judged in seconds and without the noise of the other processes.

use super::Report;
use super::daemon::{EVENTS, WorkDir};
use super::overhead::{BATCH_SIZE, Cost, bare_inserts};
use super::procfs;
use b24eventd::config::Synchronous;
use b24eventd::envelope::Lane;
use b24eventd::journal::{BatchOrigin, Journal, NewBatch, NewEvent, Outcome};
use std::time::Instant;

/// The file sink's batch in the daemon (`max_batch`): deliveries read as due at once.
const DUE_LIMIT: usize = 500;
/// The sink every event is routed to.
const SINK: &str = "file";
/// The portal of every batch.
const PORTAL: &str = "main";

pub async fn run(events: u64) -> anyhow::Result<Report> {
    let mut report = Report::new("journal");
    report.setup = vec![
        format!(
            "{events} events through the SQLite journal in the bench process (synchronous=full): per reservation of {BATCH_SIZE} events one `record_batches` (one sink routed), and per {DUE_LIMIT} events `due_deliveries`, `record_outcomes` (all delivered), `pending_settlements` and `mark_settled_groups`, as the daemon calls them; CPU = the whole bench process (utime+stime, its journal threads included)"
        ),
        format!(
            "baseline: the `overhead` bench's bare rusqlite inserts of the same rows ({BATCH_SIZE} and their batch row per transaction, the journal's schema), CPU of the inserting thread"
        ),
    ];
    let dir = WorkDir::create("journal")?;
    let journal = Journal::open(&dir.file("journal.db"), Synchronous::Full).await?;
    let through = through_journal(&journal, events).await?;
    drop(journal);
    let db = dir.file("bare.db");
    let baseline =
        tokio::task::spawn_blocking(move || bare_inserts(&db, events, BATCH_SIZE)).await??;
    baseline.report_rates(&mut report, "baseline: bare inserts", events);
    through.report_rates(&mut report, "journal", events);
    report.ratio(
        "CPU per event (journal / baseline)",
        through.cpu_seconds / baseline.cpu_seconds.max(1e-9),
        "the journal's work for an event from fetch to settled, in bare inserts of its row; lower is better",
    );
    Ok(report)
}

/// Drives `events` events through the journal's life cycle; the cost of the whole process.
async fn through_journal(journal: &Journal, events: u64) -> anyhow::Result<Cost> {
    let pid = std::process::id();
    let started = Instant::now();
    let cpu_before = procfs::cpu_seconds(pid)?;
    let mut next = 1u64;
    let mut undelivered = 0usize;
    while next <= events {
        let last = (next + BATCH_SIZE).min(events + 1);
        let batch = NewBatch {
            portal: PORTAL.to_string(),
            process_id: format!("bench{next}"),
            lane: Lane::Normal,
            origin: BatchOrigin::Fetched,
            events: (next..last).map(new_event).collect(),
            deleted_upstream: false,
            new_reservation: true,
        };
        journal.record_batches(vec![batch]).await?;
        undelivered += (last - next) as usize;
        next = last;
        if undelivered >= DUE_LIMIT || next > events {
            deliver_and_settle(journal).await?;
            undelivered = 0;
        }
    }
    Ok(Cost {
        seconds: started.elapsed().as_secs_f64(),
        cpu_seconds: procfs::cpu_seconds(pid)? - cpu_before,
    })
}

/// What the dispatcher and the settler do with the due deliveries: all delivered, settled.
async fn deliver_and_settle(journal: &Journal) -> anyhow::Result<()> {
    loop {
        let due = journal.due_deliveries(SINK, DUE_LIMIT).await?;
        if due.is_empty() {
            break;
        }
        let outcomes = due
            .iter()
            .map(|d| (d.event_id, Outcome::Delivered, None))
            .collect();
        journal.record_outcomes(SINK, outcomes).await?;
    }
    let groups = journal
        .pending_settlements(PORTAL)
        .await?
        .into_iter()
        .map(|s| (s.events.iter().map(|(id, _, _)| *id).collect(), s.action))
        .collect::<Vec<_>>();
    anyhow::ensure!(!groups.is_empty(), "nothing to settle after the deliveries");
    journal.mark_settled_groups(groups).await
}

/// The event a portal would send for offline ID `id` (the rows of the baseline).
fn new_event(id: u64) -> NewEvent {
    NewEvent {
        offline_id: id as i64,
        event: EVENTS[(id % 2) as usize].to_string(),
        message_id: format!("{:032x}", u128::from(id) * 0x9e37_79b9_7f4a_7c15),
        timestamp: super::overhead::TIMESTAMP.to_string(),
        data: serde_json::json!({"FIELDS": {"ID": id.to_string()}}),
        additional: serde_json::json!({"user_id": "1"}),
        sinks: vec![SINK.to_string()],
        enrich: false,
    }
}
