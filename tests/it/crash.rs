//! Crash safety of the real binary: SIGKILL at random moments while events flow and the portal
//! misbehaves (lost `get` responses after commit, 500s, truncated JSON) and an HTTP sink flaps;
//! afterwards every event was delivered to every sink, nothing is left reserved upstream, every
//! idempotency key is the key of its change (a redelivery after a kill carries the key of the
//! first delivery), and the duplicates are counted.

use crate::support::daemon::{self, spawn_daemon};
use crate::support::*;
use b24eventd_simulator::{Faults, SimulatorConfig};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One crash scenario: events raised in waves while the daemon is SIGKILLed again and again.
struct Scenario {
    seed: u64,
    faults: Faults,
    /// Events raised in all, in waves of `wave` every `wave_every`.
    total: u64,
    wave: u64,
    wave_every: Duration,
    kills: u32,
    /// Random run time before each kill, in milliseconds.
    run_ms: std::ops::Range<u64>,
    batch_size: u32,
    /// More lines of the portal's config (`batch_size` is set above).
    portal_config: &'static str,
    /// Answers of the HTTP sink's endpoint; `None`: always 200.
    flapping_sink: Option<Duration>,
    /// The least number of requests the portal must have served at once (waves side by side).
    side_by_side: Option<u64>,
}

async fn crash_scenario(s: Scenario) {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig {
        seed: s.seed,
        ..SimulatorConfig::default()
    })
    .await;
    sim.set_faults(s.faults.clone());
    // A second, slower sink keeps deliveries in flight when the kills land. A flapping one
    // answers 503 for `period`, then 200 for `period`, and so on.
    let responder: Arc<Responder> = match s.flapping_sink {
        None => Arc::new(|_| 200),
        Some(period) => {
            let epoch = Instant::now();
            Arc::new(move |_| {
                if (epoch.elapsed().as_millis() / period.as_millis()) % 2 == 1 {
                    503
                } else {
                    200
                }
            })
        }
    };
    let endpoint = Endpoint::start_with_delay(responder, Duration::from_millis(15)).await;
    let sinks = format!("{}\n{}", file_sink(dir.path()), http_sink(&endpoint.url));
    let config = write_config(
        dir.path(),
        &sim,
        None,
        &format!("batch_size = {}\n{}", s.batch_size, s.portal_config),
        &sinks,
    );
    crate::support::cli::store_tokens(dir.path(), &tokens).await;
    let log = dir.path().join("daemon.log");

    let emitter = {
        let sim = sim.clone();
        let (total, wave, every) = (s.total, s.wave, s.wave_every);
        tokio::spawn(async move {
            let mut first = 1;
            while first <= total {
                let count = wave.min(total - first + 1);
                emit_deals(&sim, first, count);
                first += count;
                tokio::time::sleep(every).await;
            }
        })
    };

    let mut rng = fastrand::Rng::with_seed(42);
    let mut kills = 0;
    let started = Instant::now();
    while kills < s.kills {
        let mut child = spawn_daemon(&config, &log);
        tokio::time::sleep(Duration::from_millis(rng.u64(s.run_ms.clone()))).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "daemon died on its own; see {}",
            log.display()
        );
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    emitter.await.unwrap();
    // The last run works without portal faults (a flapping sink goes on flapping).
    sim.set_faults(Faults::default());

    // A last run drains whatever is left, then stops gracefully on SIGTERM.
    let journal = daemon::last_run_drains_and_stops(
        &config,
        &log,
        &sim,
        dir.path(),
        Duration::from_secs(240),
    )
    .await;

    let delivered = file_entities(&dir.path().join("events.jsonl"));
    let expected = expected_entities(1, s.total);
    let missing: Vec<_> = expected.difference(&delivered).collect();
    assert!(missing.is_empty(), "lost events (file sink): {missing:?}");
    let reached = endpoint.accepted_entities();
    let missing: Vec<_> = expected.difference(&reached).collect();
    assert!(missing.is_empty(), "lost events (http sink): {missing:?}");
    assert!(
        sim.rows().is_empty(),
        "nothing left reserved or queued upstream: {:?}",
        sim.rows().len()
    );
    // Every key has the form of its change, and a redelivery after a kill carries the key of the
    // first delivery of the same offline ID and TIMESTAMP_X, in both sinks.
    let mut first_key: BTreeMap<(i64, String), String> = BTreeMap::new();
    let file = file_envelopes(&dir.path().join("events.jsonl"));
    let http = endpoint.received.lock().unwrap().clone();
    for envelope in file.iter().chain(&http) {
        let id = envelope["id"].as_str().unwrap();
        assert_eq!(id, expected_key(envelope), "the key of the change");
        let change = (
            envelope["offline_id"].as_i64().unwrap(),
            envelope["timestamp"].as_str().unwrap().to_string(),
        );
        match first_key.get(&change) {
            Some(first) => assert_eq!(first, id, "every delivery of {change:?} has its key"),
            None => {
                first_key.insert(change, id.to_string());
            }
        }
    }
    let counts = journal.counts_blocking().unwrap();
    let lines: usize = file_ids(&dir.path().join("events.jsonl")).values().sum();
    let stats = sim.stats();
    eprintln!(
        "crash test: {kills} SIGKILLs in {:.1} s, {} lost get responses, {} 500s, {} truncated \
         answers, {} reservations adopted, {} events journaled, {} JSONL lines for {} distinct \
         events ({} duplicates), {} HTTP deliveries ({} duplicates); {} changes, each under one key \
         in both sinks; at most {} requests at once",
        started.elapsed().as_secs_f64(),
        stats.dropped_after_commit,
        stats.faults_500,
        stats.truncated,
        counts.adopted_batches,
        counts.events,
        lines,
        delivered.len(),
        lines - delivered.len(),
        endpoint.accepted_count(),
        endpoint.accepted_count() - reached.len(),
        first_key.len(),
        stats.most_requests_at_once
    );
    assert_eq!(kills, s.kills);
    if s.faults.drop_get_after_commit > 0.0 {
        assert!(
            stats.dropped_after_commit > 0,
            "the lost-answer fault was exercised"
        );
    }
    if s.faults.fail_500 > 0.0 {
        assert!(stats.faults_500 > 0, "the 500 fault was exercised");
    }
    if let Some(least) = s.side_by_side {
        assert!(
            stats.most_requests_at_once >= least,
            "the kills landed among waves of requests side by side: at most {} at once",
            stats.most_requests_at_once
        );
    }
    if s.faults.truncate > 0.0 {
        assert!(stats.truncated > 0, "the truncation fault was exercised");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_and_leaves_nothing_reserved() {
    crash_scenario(Scenario {
        seed: 7,
        faults: Faults {
            drop_get_after_commit: 0.05,
            ..Faults::default()
        },
        total: 1500,
        wave: 100,
        wave_every: Duration::from_millis(700),
        kills: 12,
        run_ms: 250..1500,
        batch_size: 20,
        portal_config: "",
        flapping_sink: None,
        side_by_side: None,
    })
    .await;
}

/// The hardening suite's loop: 50 kills during a 10,000-event drain while 5% of get answers are
/// lost after commit, 5% of requests fail with 500, 5% of answers are cut in half, and the HTTP
/// sink is down every other two seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sigkills_with_a_misbehaving_portal_and_a_flapping_sink_lose_nothing() {
    crash_scenario(Scenario {
        seed: 11,
        faults: Faults {
            drop_get_after_commit: 0.05,
            fail_500: 0.05,
            truncate: 0.05,
            ..Faults::default()
        },
        total: 10_000,
        wave: 500,
        wave_every: Duration::from_millis(1000),
        kills: 50,
        run_ms: 200..900,
        batch_size: 50,
        portal_config: "",
        flapping_sink: Some(Duration::from_secs(2)),
        side_by_side: None,
    })
    .await;
}

/// A portal that limits nothing, its bucket opened: every round sends a wave of combined
/// requests side by side (as many as the pipeline allows), so the kills land while dozens of
/// gets and settle calls are out at once, some answered and journaled, some not, and 5% of
/// the get answers are lost after the portal reserved them, 5% of requests fail with 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_waves_of_requests_side_by_side_loses_nothing() {
    crash_scenario(Scenario {
        seed: 23,
        faults: Faults {
            drop_get_after_commit: 0.05,
            fail_500: 0.05,
            ..Faults::default()
        },
        total: 10_000,
        wave: 2_500,
        wave_every: Duration::from_millis(1000),
        kills: 20,
        run_ms: 150..900,
        batch_size: 20,
        portal_config: "rate_limit = { burst = 1000000, per_second = 1000000.0, share = 1.0 }",
        flapping_sink: None,
        side_by_side: Some(16),
    })
    .await;
}
