//! Faults around the journal and the portal that the daemon must ride out without losing an
//! event: an operator holding the journal's write lock, and answers that are not what Bitrix24
//! should send.

mod common;

use b24eventd::simulator::SimulatorConfig;
use common::*;
use std::time::{Duration, Instant};

/// `sqlite3 journal.db` with `BEGIN IMMEDIATE` left open for 30 s: the daemon's writes wait
/// (busy timeout), readers go on, and once the lock is released everything flows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_holding_the_write_lock_for_30_s_makes_the_daemon_wait_then_resume() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let running = Running::start(&config, &tokens).await;
    emit_deals(&sim, 1, 200);
    wait_for(
        "the first 200 events settled",
        Duration::from_secs(30),
        || upstream_empty(&sim) && sim.stats().cleared == 200,
    )
    .await;

    let journal_path = dir.path().join("journal.db");
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(journal_path).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(30));
        conn.execute_batch("COMMIT").unwrap();
    });
    locked_rx.recv().unwrap();
    let locked_at = Instant::now();
    emit_deals(&sim, 201, 200);
    // While the lock is held nothing new can be journaled, so nothing new is delivered.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = file_ids(&dir.path().join("events.jsonl")).len();
    assert_eq!(
        during, 200,
        "no event delivered while the journal is locked"
    );
    assert!(
        !running.task.is_finished(),
        "the daemon waits instead of giving up"
    );

    holder.join().unwrap();
    wait_for(
        "all 400 events settled after the lock",
        Duration::from_secs(60),
        || upstream_empty(&sim) && sim.stats().cleared == 400,
    )
    .await;
    let resumed_after = locked_at.elapsed();
    assert!(resumed_after >= Duration::from_secs(30));
    assert!(!running.task.is_finished());
    running.stop().await;
    let file = file_ids(&dir.path().join("events.jsonl"));
    assert_eq!(file.len(), 400);
    assert!(file.values().all(|n| *n == 1), "no duplicates");
    eprintln!(
        "write lock held 30 s: all 400 events settled {:.1} s after it was taken",
        resumed_after.as_secs_f64()
    );
}
