//! Faults around the journal and the portal that the daemon must ride out without losing an
//! event: an operator holding the journal's write lock, answers that are not what Bitrix24
//! should send, and a redirect loop in front of the portal.

mod common;

use b24eventd::simulator::{Faults, SimulatorConfig};
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

/// A proxy answering HTML error pages, answers cut in half, answers with invalid UTF-8 in an
/// event, and a 10 MB `EVENT_DATA`: all logged and ridden out, nothing lost, nothing left
/// upstream, the daemon still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_html_truncated_non_utf8_and_huge_answers_lose_nothing() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    sim.set_faults(Faults {
        html: 0.15,
        truncate: 0.05,
        invalid_utf8_next_gets: 3,
        ..Faults::default()
    });
    emit_deals(&sim, 1, 500);
    let blob = "x".repeat(10 * 1024 * 1024);
    sim.emit(
        "ONCRMDEALUPDATE",
        serde_json::json!({"FIELDS": {"ID": "900001"}, "BLOB": blob}),
        "",
        1,
    );
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let running = Running::start(&config, &tokens).await;
    wait_for("all 501 events settled", Duration::from_secs(120), || {
        upstream_empty(&sim) && sim.stats().cleared == 501
    })
    .await;
    assert!(!running.task.is_finished(), "the daemon keeps running");
    running.stop().await;

    let stats = sim.stats();
    assert!(stats.html_pages > 0 && stats.truncated > 0, "{stats:?}");
    assert_eq!(stats.invalid_utf8, 3);
    let text = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    let envelopes: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: std::collections::BTreeSet<&str> = envelopes
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 501, "every event delivered");
    let huge = envelopes
        .iter()
        .find(|e| e["data"]["FIELDS"]["ID"] == "900001")
        .expect("the 10 MB event was delivered");
    assert_eq!(
        huge["data"]["BLOB"].as_str().unwrap().len(),
        10 * 1024 * 1024
    );
    let replaced = envelopes
        .iter()
        .filter(|e| {
            e["data"]["FIELDS"]["ID"]
                .as_str()
                .is_some_and(|id| id.starts_with('\u{FFFD}'))
        })
        .count();
    assert!(
        replaced >= 1,
        "events whose answer carried an invalid byte arrive with U+FFFD in its place"
    );
    eprintln!(
        "garbage answers: {} HTML pages, {} truncated, {} with invalid UTF-8 ({replaced} events \
         delivered with U+FFFD), a 10 MB event delivered intact; 501/501 events",
        stats.html_pages, stats.truncated, stats.invalid_utf8
    );
}

/// A proxy in front of the portal answers every REST call with a 302 that leads back to itself.
/// The daemon follows a few hops, names the loop, stops that portal (an operator must fix the
/// address or the proxy) without hammering it or reserving anything, keeps running, and drains
/// everything once the loop is gone and the operator reloads.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redirect_loop_in_front_of_the_portal_stops_the_portal_until_a_reload() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    emit_deals(&sim, 1, 200);
    sim.set_faults(Faults {
        redirect_loop: true,
        ..Faults::default()
    });
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let reload = std::sync::Arc::new(tokio::sync::Notify::new());
    let running = Running::start_with(
        &config,
        &tokens,
        b24eventd::pipeline::Controls {
            reload: Some(reload.clone()),
            ..Default::default()
        },
    )
    .await;
    wait_for("the loop met", Duration::from_secs(30), || {
        sim.stats().redirect_loops >= 2
    })
    .await;
    // Stopped, not spinning: a few hops, then no request for as long as we watch.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stats = sim.stats();
    assert!(
        stats.redirect_loops <= 4,
        "{} looping requests: the daemon keeps following the loop",
        stats.redirect_loops
    );
    assert_eq!(stats.reserved, 0, "{stats:?}");
    assert_eq!(running.journal.counts().await.unwrap().events, 0);
    assert!(!running.task.is_finished(), "the daemon keeps running");
    let looped = stats.redirect_loops;

    // The proxy is fixed; the operator reloads (SIGHUP) and the portal resumes at once.
    sim.set_faults(Faults::default());
    reload.notify_one();
    let reloaded_at = Instant::now();
    wait_for(
        "all 200 events settled after the reload",
        Duration::from_secs(30),
        || upstream_empty(&sim) && sim.stats().cleared == 200,
    )
    .await;
    let recovered = reloaded_at.elapsed();
    running.stop().await;
    let ids = file_ids(&dir.path().join("events.jsonl"));
    assert_eq!(ids.len(), 200, "every event delivered");
    assert!(ids.values().all(|&n| n == 1), "each once");
    eprintln!(
        "redirect loop: {looped} looping 302s, then the portal stopped (no request in 4 s); \
         200/200 delivered {:.1} s after the reload",
        recovered.as_secs_f64()
    );
}
