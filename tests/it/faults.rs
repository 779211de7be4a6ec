//! Faults around the journal and the portal that the daemon must ride out without losing an
//! event: an operator holding the journal's write lock, answers that are not what Bitrix24
//! should send, and a redirect loop in front of the portal.

use crate::support::*;
use b24eventd_simulator::{Faults, SimulatorConfig};
use std::time::{Duration, Instant};

/// `sqlite3 journal.db` with `BEGIN IMMEDIATE` left open for 30 s (on PostgreSQL: `LOCK TABLE
/// events IN EXCLUSIVE MODE` in an open transaction): the daemon's writes wait, readers go on,
/// and once the lock is released everything flows again.
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

    let journal_config = b24eventd::journal::test_support::test_journal_config(dir.path());
    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || match &journal_config.postgres {
        None => {
            let conn = rusqlite::Connection::open(&journal_config.path).unwrap();
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            locked_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_secs(30));
            conn.execute_batch("COMMIT").unwrap();
        }
        Some(pg) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (client, connection) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                client
                    .batch_execute(&format!(
                        "BEGIN; LOCK TABLE \"{}\".events IN EXCLUSIVE MODE",
                        pg.schema
                    ))
                    .await
                    .unwrap();
                locked_tx.send(()).unwrap();
                tokio::time::sleep(Duration::from_secs(30)).await;
                client.batch_execute("COMMIT").await.unwrap();
            });
        }
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
        // One cut-off answer for sure: how many the 5 % above hits depends on the request
        // sequence, which the seeded generator does not fix.
        unparsable_next_gets: 1,
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
    assert!(
        stats.html_pages > 0 && stats.truncated + stats.unparsable > 0,
        "{stats:?}"
    );
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

/// `EVENT_DATA` nested 150 levels deep (legal JSON; serde_json alone stops at 128), raised
/// through the simulator's control API among ordinary events: fetched, journaled and delivered
/// intact, and the portal goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn event_data_nested_150_deep_is_delivered_intact() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    emit_deals(&sim, 1, 20);
    let emitted = reqwest::Client::new()
        .post(format!("{}/_sim/emit", sim.base_url()))
        .body(r#"{"event": "ONCRMDEALUPDATE", "entity_id": 900001, "nest": 150}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(emitted.status().as_u16(), 200);
    emit_deals(&sim, 21, 20);
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let running = Running::start(&config, &tokens).await;
    wait_for("all 41 events settled", Duration::from_secs(60), || {
        upstream_empty(&sim) && sim.stats().cleared == 41
    })
    .await;
    running.stop().await;
    let envelopes = file_envelopes(&dir.path().join("events.jsonl"));
    assert_eq!(envelopes.len(), 41);
    let deep = envelopes
        .iter()
        .find(|e| e["data"].get("NESTED").is_some())
        .expect("the deep event was delivered");
    let mut data = &deep["data"];
    let mut levels = 0;
    while let Some(inner) = data.get("NESTED") {
        data = inner;
        levels += 1;
    }
    assert_eq!(levels, 150);
    assert_eq!(data, &serde_json::json!({"FIELDS": {"ID": "900001"}}));
}

/// Every `event.offline.get` fails (500) while every other call works, the orphan sweep's
/// listings included: their successes do not reset the fetch's backoff, so the interval between
/// gets grows (0.5 s, 1 s, 2 s, 4 s, …) instead of staying at 0.5 s; once gets work again,
/// everything is fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_portal_whose_gets_all_fail_backs_off_longer_and_longer() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    sim.set_faults(Faults {
        fail_gets: true,
        ..Faults::default()
    });
    emit_deals(&sim, 1, 10);
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let running = Running::start(&config, &tokens).await;
    // When the count of failed gets moves: one request may carry several gets.
    let started = Instant::now();
    let mut seen = 0;
    let mut attempts = Vec::new();
    while started.elapsed() < Duration::from_secs(16) {
        let failed = sim.stats().failed_gets;
        if failed > seen {
            seen = failed;
            attempts.push(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let gaps: Vec<f64> = attempts
        .windows(2)
        .map(|w| (w[1] - w[0]).as_secs_f64())
        .collect();
    let lists = sim
        .stats()
        .calls_by_method
        .get("event.offline.list")
        .copied();
    assert!(
        lists.unwrap_or(0) > 0,
        "the orphan sweep's listings went through: {lists:?}"
    );
    assert!(
        (4..=8).contains(&attempts.len()),
        "gets tried with a growing backoff, not every 0.5 s: {} times in 16 s, gaps {gaps:.1?}",
        attempts.len()
    );
    assert!(
        gaps.windows(2).all(|w| w[1] >= w[0] * 1.5),
        "each gap longer than the one before: {gaps:.1?}"
    );
    sim.set_faults(Faults::default());
    wait_for("all 10 events settled", Duration::from_secs(90), || {
        upstream_empty(&sim) && sim.stats().cleared == 10
    })
    .await;
    running.stop().await;
    eprintln!("every get failing: gaps between attempts {gaps:.1?} s");
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
        b24eventd::daemon::Controls {
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
