//! The real pipeline, in-process, against the portal simulator: delivery, settlement, token
//! refresh, rate limits, sink outages, poison events, lost responses and a moved portal.

use crate::support::*;
use b24eventd::journal::Journal;
use b24eventd_simulator::{Faults, SimulatorConfig};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_events_in_waves_reach_both_sinks_and_the_queue_ends_empty() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let endpoint = Endpoint::start(Arc::new(|_| 200)).await;
    let sinks = format!("{}\n{}", file_sink(dir.path()), http_sink(&endpoint.url));
    let config = write_config(dir.path(), &sim, None, "", &sinks);
    let running = Running::start(&config, &tokens).await;

    for wave in 0..4 {
        emit_deals(&sim, 1 + wave * 500, 500);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_for(
        "all 2000 events settled upstream",
        Duration::from_secs(90),
        || upstream_empty(&sim) && sim.stats().emitted == 2000,
    )
    .await;
    // The portal clears before its answer reaches the journal: wait for the journal too.
    wait_for(
        "the journal to record the clears",
        Duration::from_secs(10),
        || {
            running
                .journal
                .counts_blocking()
                .is_ok_and(|c| c.cleared == 2000)
        },
    )
    .await;
    let counts = running.journal.counts().await.unwrap();
    running.stop().await;

    let jsonl = dir.path().join("events.jsonl");
    assert_eq!(file_entities(&jsonl), expected_entities(1, 2000));
    let file = file_ids(&jsonl);
    assert_eq!(file.len(), 2000);
    assert!(
        file.values().all(|n| *n == 1),
        "no duplicates without faults"
    );
    assert_eq!(endpoint.accepted_ids().len(), 2000);
    assert_eq!(endpoint.accepted_ids(), file.keys().cloned().collect());
    assert_eq!(
        (counts.events, counts.delivered, counts.cleared, counts.dead),
        (2000, 2000, 2000, 0)
    );
    assert_eq!(counts.unsettled_upstream, 0);
    let stats = sim.stats();
    assert_eq!(stats.cleared, 2000, "every row was removed by clear");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_mid_run_is_refreshed_and_rotated() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let running = Running::start(&config, &tokens).await;

    emit_deals(&sim, 1, 200);
    wait_for("first wave settled", Duration::from_secs(30), || {
        upstream_empty(&sim)
    })
    .await;
    sim.expire_access_tokens();
    emit_deals(&sim, 201, 200);
    wait_for(
        "second wave settled after expiry",
        Duration::from_secs(30),
        || upstream_empty(&sim),
    )
    .await;
    let stored = running.journal.load_tokens("main").await.unwrap().unwrap();
    running.stop().await;

    assert_eq!(
        file_entities(&dir.path().join("events.jsonl")),
        expected_entities(1, 400)
    );
    assert!(
        sim.stats().token_refreshes >= 1,
        "the expired token was refreshed"
    );
    assert_ne!(
        stored.refresh_token, tokens.refresh_token,
        "the rotated refresh token is in the journal"
    );
    assert_ne!(stored.access_token, tokens.access_token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_storm_is_ridden_out() {
    init();
    let dir = tempfile::tempdir().unwrap();
    // The portal's bucket is far smaller than the one configured in the daemon: a storm of 503s.
    let (sim, tokens) = portal(SimulatorConfig {
        rate_limit: Some((3, 4.0)),
        ..SimulatorConfig::default()
    })
    .await;
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "batch_size = 20\nrate_limit = { burst = 50, per_second = 50.0 }",
        &file_sink(dir.path()),
    );
    let running = Running::start(&config, &tokens).await;
    emit_deals(&sim, 1, 300);
    wait_for(
        "all events settled despite 503s",
        Duration::from_secs(90),
        || upstream_empty(&sim),
    )
    .await;
    running.stop().await;
    assert!(sim.stats().rejected_503 > 0, "the storm happened");
    assert_eq!(
        file_entities(&dir.path().join("events.jsonl")),
        expected_entities(1, 300)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_down_for_a_minute_gets_everything_after_it_recovers() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let down = Arc::new(AtomicBool::new(true));
    let flag = down.clone();
    let endpoint = Endpoint::start(Arc::new(move |_| {
        if flag.load(Ordering::SeqCst) {
            503
        } else {
            200
        }
    }))
    .await;
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "max_unsettled = 100",
        &http_sink(&endpoint.url),
    );
    let running = Running::start(&config, &tokens).await;

    emit_deals(&sim, 1, 300);
    tokio::time::sleep(Duration::from_secs(60)).await;
    // While the sink is down, at most max_unsettled events are reserved; the rest wait upstream.
    let counts = running.journal.counts().await.unwrap();
    assert!(
        counts.events <= 100,
        "max_unsettled bounds the reservations ({} journaled)",
        counts.events
    );
    assert_eq!(counts.delivered, 0);
    assert!(!upstream_empty(&sim));
    down.store(false, Ordering::SeqCst);
    wait_for(
        "everything delivered after recovery",
        Duration::from_secs(60),
        || upstream_empty(&sim),
    )
    .await;
    running.stop().await;
    let ids = endpoint.accepted_ids();
    assert_eq!(ids.len(), 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_ends_dead_and_reported_while_the_rest_flow() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    // Deal 13 is refused with 422 every time; everything else is accepted.
    let endpoint = Endpoint::start(Arc::new(|v: &serde_json::Value| {
        if v["data"]["FIELDS"]["ID"] == "13" {
            422
        } else {
            200
        }
    }))
    .await;
    let config = write_config(dir.path(), &sim, None, "", &http_sink(&endpoint.url));
    let running = Running::start(&config, &tokens).await;
    emit_deals(&sim, 1, 100);

    // The normal-lane copy is errored upstream (moves to the error lane); the error-lane poll
    // fetches it, it fails again, stays dead in the journal and is cleared upstream.
    wait_for(
        "the poison event cleared from the error lane",
        Duration::from_secs(60),
        || upstream_empty(&sim) && sim.stats().errored >= 1,
    )
    .await;
    let counts = running.journal.counts().await.unwrap();
    let journal = running.journal.clone();
    running.stop().await;

    let ids = endpoint.accepted_ids();
    assert_eq!(ids.len(), 99, "every other event was delivered");
    assert_eq!(
        counts.dead, 2,
        "dead in the normal lane and again in the error lane"
    );
    assert_eq!(counts.errored, 1, "reported with event.offline.error once");
    let dead: Vec<(String, String, String)> = running_dead(&journal);
    assert_eq!(dead.len(), 2);
    assert!(
        dead.iter().all(|(_, _, err)| err.contains("422")),
        "the error is recorded: {dead:?}"
    );
    assert_eq!(dead[0].1, "normal");
    assert_eq!(dead[1].1, "error");
}

fn running_dead(journal: &Journal) -> Vec<(String, String, String)> {
    sql_rows(
        journal,
        "SELECT e.envelope_id, e.lane, d.last_error FROM events e JOIN deliveries d ON d.event_id = e.id
         WHERE e.status = 'dead' ORDER BY e.id",
    )
    .iter()
    .map(|r| {
        (
            sql_text(r, "envelope_id").unwrap(),
            sql_text(r, "lane").unwrap(),
            sql_text(r, "last_error").unwrap_or_default(),
        )
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_get_responses_are_adopted_and_nothing_stays_reserved() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    // Events first, so the first gets reserve something before their answers are dropped.
    emit_deals(&sim, 1, 400);
    sim.set_faults(Faults {
        drop_get_after_commit: 0.15,
        fail_500: 0.05,
        truncate: 0.05,
        ..Faults::default()
    });
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "batch_size = 25",
        &file_sink(dir.path()),
    );
    let running = Running::start(&config, &tokens).await;
    wait_for(
        "all settled despite lost responses",
        Duration::from_secs(90),
        || upstream_empty(&sim),
    )
    .await;
    let counts = running.journal.counts().await.unwrap();
    running.stop().await;
    let stats = sim.stats();
    assert!(
        stats.dropped_after_commit >= 1,
        "the fault was exercised ({stats:?})"
    );
    assert!(
        counts.adopted_batches >= 1,
        "lost reservations were adopted ({counts:?})"
    );
    assert_eq!(
        file_entities(&dir.path().join("events.jsonl")),
        expected_entities(1, 400)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphan_is_adopted_even_when_the_counts_mislead() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    // A sink that refuses everything until told otherwise: the first 100 events stay unsettled.
    let up = Arc::new(AtomicBool::new(false));
    let flag = up.clone();
    let endpoint = Endpoint::start(Arc::new(move |_| {
        if flag.load(Ordering::SeqCst) {
            200
        } else {
            503
        }
    }))
    .await;
    emit_deals(&sim, 1, 100);
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "idle_poll_max = \"200ms\"",
        &http_sink(&endpoint.url),
    );
    let running = Running::start(&config, &tokens).await;
    let unsettled = || {
        running
            .journal
            .counts_blocking()
            .unwrap()
            .unsettled_upstream
    };
    wait_for(
        "100 events reserved and journaled",
        Duration::from_secs(30),
        || unsettled() == 100,
    )
    .await;
    // The portal's daily agent purges those reservations (after ~34 days on a real portal): the
    // journal still counts 100 unsettled, the portal holds none.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(sim.purge_reservations(Duration::ZERO), 100);
    // A get whose answer is lost: 30 events reserved upstream, unknown to the journal, and
    // fewer than the journal's unsettled count, so comparing counts would find nothing.
    sim.set_faults(Faults {
        drop_next_gets: 1,
        ..Faults::default()
    });
    emit_deals(&sim, 1001, 30);
    wait_for("the orphan adopted", Duration::from_secs(30), || {
        running.journal.counts_blocking().unwrap().adopted_batches >= 1
    })
    .await;
    up.store(true, Ordering::SeqCst);
    wait_for(
        "everything settled upstream and in the journal",
        Duration::from_secs(60),
        || upstream_empty(&sim) && unsettled() == 0,
    )
    .await;
    running.stop().await;
    assert_eq!(
        sim.stats().dropped_after_commit,
        1,
        "the fault was exercised"
    );
    let delivered = endpoint.accepted_entities();
    assert!(
        expected_entities(1001, 30).is_subset(&delivered),
        "the orphaned events were delivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_portal_is_followed_with_a_re_post() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let moved = sim.moved_endpoint();
    let config = write_config(dir.path(), &sim, Some(&moved), "", &file_sink(dir.path()));
    let running = Running::start(&config, &tokens).await;
    emit_deals(&sim, 1, 60);
    wait_for(
        "events settled through the redirect",
        Duration::from_secs(30),
        || upstream_empty(&sim),
    )
    .await;
    running.stop().await;
    assert_eq!(
        file_entities(&dir.path().join("events.jsonl")),
        expected_entities(1, 60)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_settles_what_was_delivered() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let running = Running::start(&config, &tokens).await;
    emit_deals(&sim, 1, 150);
    wait_for("events journaled", Duration::from_secs(30), || {
        sim.stats().reserved > 0 || upstream_empty(&sim)
    })
    .await;
    let journal = running.journal.clone();
    running.stop().await;
    let counts = journal.counts().await.unwrap();
    // Whatever was delivered before the stop is settled; nothing delivered is left unsettled.
    assert_eq!(counts.delivered, counts.cleared, "{counts:?}");
    assert_eq!(counts.pending + counts.cleared, counts.events, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_connector_reads_and_settles_only_its_own_queue() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    for e in EVENTS {
        sim.bind_offline(e, "erp-sync");
    }
    // Every change is queued twice: once for the connector-less binding, once for erp-sync.
    emit_deals(&sim, 1, 100);
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "auth_connector = \"erp-sync\"",
        &file_sink(dir.path()),
    );
    let running = Running::start(&config, &tokens).await;
    wait_for(
        "the erp-sync queue drained",
        Duration::from_secs(30),
        || sim.rows().iter().all(|r| r.connector_id.is_empty()),
    )
    .await;
    running.stop().await;
    let rows = sim.rows();
    assert_eq!(rows.len(), 100, "the connector-less queue is untouched");
    assert!(rows.iter().all(|r| r.process_id.is_empty() && !r.error));
    assert_eq!(
        file_entities(&dir.path().join("events.jsonl")),
        expected_entities(1, 100)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_not_held_up_by_a_long_operating_limit_wait() {
    init();
    let dir = tempfile::tempdir().unwrap();
    // A plan whose limit is far below the configured operating_budget: the third get (each
    // takes 122 ms, stored on its own) passes it and the portal bans the method for 300 s.
    let (sim, tokens) = portal(SimulatorConfig {
        operating_limit: Some(b24eventd_simulator::OperatingLimit {
            budget: Duration::from_millis(200),
            ..Default::default()
        }),
        operating_cost: Duration::from_millis(120),
        ..SimulatorConfig::default()
    })
    .await;
    emit_deals(&sim, 1, 500);
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "batch_size = 10",
        &file_sink(dir.path()),
    );
    let running = Running::start(&config, &tokens).await;
    wait_for("the portal answering 429", Duration::from_secs(30), || {
        sim.stats().rejected_429 > 0
    })
    .await;
    let started = std::time::Instant::now();
    running.stop().await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "shutdown took {took:?}");
    assert!(!upstream_empty(&sim), "the backlog waits upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_payloads_flow_as_null_or_as_received() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let payloads = [
        serde_json::Value::Bool(false),
        serde_json::Value::Null,
        serde_json::json!([1, "two", null]),
        serde_json::json!("a string"),
        serde_json::json!({"FIELDS": {"ID": "7", "TITLE": "Ünïcödé \u{1F600} \"quoted\" \\ back"}}),
    ];
    for p in &payloads {
        sim.emit("ONCRMDEALUPDATE", p.clone(), "", 0);
    }
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let running = Running::start(&config, &tokens).await;
    wait_for("odd payloads settled", Duration::from_secs(30), || {
        upstream_empty(&sim)
    })
    .await;
    running.stop().await;
    let text = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    let datas: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["data"].clone())
        .collect();
    assert_eq!(datas.len(), payloads.len());
    // EVENT_DATA false (no data) becomes null; everything else arrives as it was raised.
    assert_eq!(datas.iter().filter(|d| d.is_null()).count(), 2);
    for p in &payloads[2..] {
        assert!(datas.contains(p), "{p} delivered unchanged");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_without_reserve_mode_stops_the_portal_with_a_clear_message() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig {
        rest_offline_extended: false,
        ..SimulatorConfig::default()
    })
    .await;
    emit_deals(&sim, 1, 10);
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let running = Running::start(&config, &tokens).await;
    // The only portal refused reserve mode: the pipeline ends by itself with a config error.
    let result = tokio::time::timeout(Duration::from_secs(20), running.task)
        .await
        .expect("the pipeline stops by itself")
        .expect("pipeline task did not panic");
    let err = result.expect_err("a refused mode is an error");
    let config_err = err
        .downcast_ref::<b24eventd::config::ConfigError>()
        .expect("a configuration error (exit 78)");
    assert_eq!(config_err.key, "portals.main.mode");
    assert!(
        config_err.message.contains("WRONG_LICENSE")
            && config_err.message.contains("reserve mode")
            && config_err.message.contains("mode = \"fetch-delete\""),
        "{config_err}"
    );
    let rows = sim.rows();
    assert_eq!(rows.len(), 10, "nothing was taken or deleted");
    assert!(rows.iter().all(|r| r.process_id.is_empty()));
    let get = sim
        .stats()
        .calls_by_method
        .get("event.offline.get")
        .copied()
        .unwrap_or(0);
    assert_eq!(get, 1, "one refused get, then the portal is left alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_delete_mode_delivers_everything_on_a_plan_without_reserve_mode() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig {
        rest_offline_extended: false,
        ..SimulatorConfig::default()
    })
    .await;
    let endpoint = Endpoint::start(Arc::new(|_| 200)).await;
    let sinks = format!("{}\n{}", file_sink(dir.path()), http_sink(&endpoint.url));
    // A small max_unsettled: in this mode it caps what the sinks still have to take.
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "mode = \"fetch-delete\"\nmax_unsettled = 100",
        &sinks,
    );
    let running = Running::start(&config, &tokens).await;
    for wave in 0..3 {
        emit_deals(&sim, 1 + wave * 200, 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let journal = running.journal.clone();
    wait_for("600 events delivered", Duration::from_secs(60), || {
        let c = journal.counts_blocking().unwrap();
        c.delivered == 600 && upstream_empty(&sim)
    })
    .await;
    let counts = running.journal.counts().await.unwrap();
    running.stop().await;

    let jsonl = dir.path().join("events.jsonl");
    assert_eq!(file_entities(&jsonl), expected_entities(1, 600));
    assert_eq!(endpoint.accepted_ids().len(), 600);
    assert_eq!(
        (counts.events, counts.cleared, counts.unsettled_upstream),
        (600, 600, 0),
        "journaled as already settled: the portal deleted them when it answered"
    );
    let stats = sim.stats();
    assert_eq!(stats.cleared, 600, "every row was deleted by its get");
    assert_eq!(
        stats
            .calls_by_method
            .get("event.offline.clear")
            .copied()
            .unwrap_or(0),
        0
    );
    assert!(sim.rows().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prune_job_deletes_settled_events_past_retention_and_keeps_dead_ones() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    // Deal 3 is refused (422): dead, so kept by the prune.
    let endpoint = Endpoint::start(Arc::new(|v| {
        if v["data"]["FIELDS"]["ID"] == "3" {
            422
        } else {
            200
        }
    }))
    .await;
    let config = write_config(dir.path(), &sim, None, "", &http_sink(&endpoint.url));
    let config = {
        let text = std::fs::read_to_string(&config).unwrap().replace(
            "[journal]\n",
            "[journal]\nretention = \"1s\"\nprune_schedule = \"* * * * * *\"\n",
        );
        std::fs::write(&config, text).unwrap();
        config
    };
    let running = Running::start(&config, &tokens).await;
    emit_deals(&sim, 1, 20);
    let journal = running.journal.clone();
    wait_for(
        "everything settled, then pruned but the dead",
        Duration::from_secs(30),
        || {
            let c = journal.counts_blocking().unwrap();
            upstream_empty(&sim) && c.pending == 0 && c.events == c.dead && c.dead > 0
        },
    )
    .await;
    let counts = running.journal.counts().await.unwrap();
    running.stop().await;
    assert_eq!(endpoint.accepted_ids().len(), 19);
    // Deal 3's first row (errored) and its error-lane copy (cleared) are both dead and kept.
    assert_eq!((counts.events, counts.dead), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_id_the_portal_hands_out_again_is_a_new_batch() {
    init();
    let dir = tempfile::tempdir().unwrap();
    // A portal whose reservations all carry one process id: after the first batch is cleared,
    // the id comes back for new events.
    let (sim, tokens) = portal(SimulatorConfig {
        reused_process_id: Some("r".repeat(32)),
        ..SimulatorConfig::default()
    })
    .await;
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "idle_poll_max = \"200ms\"",
        &file_sink(dir.path()),
    );
    let running = Running::start(&config, &tokens).await;
    let unsettled = || {
        running
            .journal
            .counts_blocking()
            .unwrap()
            .unsettled_upstream
    };
    for (wave, first) in [1, 101, 201].into_iter().enumerate() {
        emit_deals(&sim, first, 100);
        wait_for(
            &format!("wave {wave} delivered and settled upstream and in the journal"),
            Duration::from_secs(30),
            || {
                file_entities(&dir.path().join("events.jsonl")).len() == 100 * (wave + 1)
                    && upstream_empty(&sim)
                    && unsettled() == 0
            },
        )
        .await;
    }
    running.stop().await;
    assert_eq!(
        file_entities(&dir.path().join("events.jsonl")),
        expected_entities(1, 300)
    );
    assert_eq!(sim.stats().reserved, 0, "nothing left reserved upstream");
}
