//! Request economy against the simulator with cloud limits on: settle calls and the next
//! reservations travel in one `batch`, a backlog widens the request, a failed sub-command is
//! sent again alone, and an idle portal is polled ever more slowly.

use crate::support::*;
use b24eventd_simulator::{Faults, LimiterModel, OperatingLimit, SimulatorConfig};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// The cloud portal's limits: a 50-request bucket draining 2 per second, 420 s of operating
/// time per method per 10 minutes (the current limiter: `batch` counted, a 300 s ban).
fn cloud() -> SimulatorConfig {
    SimulatorConfig {
        rate_limit: Some((50, 2.0)),
        operating_limit: Some(OperatingLimit::default()),
        ..SimulatorConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_drains_in_wide_combined_requests_without_hitting_a_limit() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(cloud()).await;
    emit_deals(&sim, 1, 6000);
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let started = Instant::now();
    let running = Running::start(&config, &tokens).await;
    wait_for(
        "all 6000 events settled upstream",
        Duration::from_secs(120),
        || upstream_empty(&sim),
    )
    .await;
    let drained_in = started.elapsed();
    running.stop().await;

    let file = file_ids(&dir.path().join("events.jsonl"));
    assert_eq!(file.len(), 6000);
    assert!(
        file.values().all(|n| *n == 1),
        "no duplicates without faults"
    );
    let stats = sim.stats();
    let gets = stats.calls_by_method["event.offline.get"];
    let clears = stats.calls_by_method["event.offline.clear"];
    // The documented loop spends two requests per 50 events: 240 here.
    eprintln!(
        "6000 events: {} requests ({} gets, {} clears, widest batch {} gets), {} batches with clear+get, {:.1} s",
        stats.requests,
        gets,
        clears,
        stats.max_gets_per_batch,
        stats.batches_with_clear_and_get,
        drained_in.as_secs_f64()
    );
    assert!(
        stats.batches_with_clear_and_get > 0,
        "clears of finished batches travel with the next gets"
    );
    assert!(
        stats.max_gets_per_batch >= 8,
        "a backlog widens the request: at most {} gets in one",
        stats.max_gets_per_batch
    );
    assert!(
        stats.requests * 5 <= 240,
        "{} requests for 6000 events: not 5 times fewer than the documented loop's 240",
        stats.requests
    );
    assert_eq!(
        (stats.rejected_503, stats.rejected_429),
        (0, 0),
        "the daemon stays inside its share of the bucket and the operating budget"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_clear_inside_a_batch_is_sent_again_alone() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(cloud()).await;
    sim.set_faults(Faults {
        fail_next_batch_clears: 3,
        ..Faults::default()
    });
    emit_deals(&sim, 1, 2000);
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let running = Running::start(&config, &tokens).await;
    // The portal empties its queue before the answer reaches the journal: wait for both.
    wait_for(
        "all 2000 events settled upstream and in the journal",
        Duration::from_secs(90),
        || {
            upstream_empty(&sim)
                && running
                    .journal
                    .counts_blocking()
                    .unwrap()
                    .unsettled_upstream
                    == 0
        },
    )
    .await;
    let counts = running.journal.counts().await.unwrap();
    running.stop().await;

    let stats = sim.stats();
    assert_eq!(stats.failed_batch_clears, 3, "the fault was exercised");
    let file = file_ids(&dir.path().join("events.jsonl"));
    assert_eq!(file.len(), 2000);
    assert!(
        file.values().all(|n| *n == 1),
        "the gets of the failed requests were not repeated: every event delivered once"
    );
    assert_eq!((counts.cleared, counts.unsettled_upstream), (2000, 0));
    assert_eq!(stats.cleared, 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_portal_is_polled_ever_more_slowly_and_the_first_event_resets_it() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "idle_poll_max = \"1600ms\"",
        &file_sink(dir.path()),
    );
    let running = Running::start(&config, &tokens).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let idle_gets = sim.stats().calls_by_method["event.offline.get"];
    // poll_interval is 200 ms: 30 polls in 6 s without the backoff; with it
    // 200+200+400+800+1600+1600+... ms, about 7.
    assert!(
        (4..=10).contains(&idle_gets),
        "{idle_gets} polls of an idle portal in 6 s"
    );

    emit_deals(&sim, 1, 1);
    let emitted = Instant::now();
    wait_for("the event settled", Duration::from_secs(10), || {
        upstream_empty(&sim) && sim.stats().cleared == 1
    })
    .await;
    let picked_up = emitted.elapsed();
    assert!(
        picked_up < Duration::from_millis(1600 + 1500),
        "picked up after {picked_up:?}: longer than idle_poll_max allows"
    );
    // After an event the interval starts over at poll_interval.
    let before = sim.stats().calls_by_method["event.offline.get"];
    tokio::time::sleep(Duration::from_millis(700)).await;
    let after = sim.stats().calls_by_method["event.offline.get"];
    assert!(
        after - before >= 2,
        "{} polls in the 700 ms after an event: the backoff did not reset",
        after - before
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drain_longer_than_the_operating_budget_pauses_instead_of_hitting_429() {
    init();
    let dir = tempfile::tempdir().unwrap();
    // A small budget so that one drain spends it several times over: 6 s of server time per
    // 20 s for event.offline.get, which costs 5 ms + 4 ms per event (205 ms per 50 events).
    let (sim, tokens) = portal(SimulatorConfig {
        operating_limit: Some(OperatingLimit::scaled(
            Duration::from_secs(6),
            Duration::from_secs(20),
        )),
        operating_cost_per_event: Duration::from_millis(4),
        ..cloud()
    })
    .await;
    emit_deals(&sim, 1, 3000);
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "rate_limit = { burst = 50, per_second = 2.0, operating_budget = \"6s\" }",
        &file_sink(dir.path()),
    );
    let started = Instant::now();
    let running = Running::start(&config, &tokens).await;
    wait_for(
        "all 3000 events settled upstream",
        Duration::from_secs(120),
        || upstream_empty(&sim),
    )
    .await;
    let drained_in = started.elapsed();
    running.stop().await;

    let stats = sim.stats();
    eprintln!(
        "3000 events under a 6 s / 20 s operating budget: {:.1} s, {} requests, {} x 429, {} x 503",
        drained_in.as_secs_f64(),
        stats.requests,
        stats.rejected_429,
        stats.rejected_503
    );
    // 60 gets cost 12.3 s of server time: more than one window allows, so the daemon had to wait.
    assert!(
        drained_in > Duration::from_secs(10),
        "drained in {drained_in:?}: faster than the budget allows"
    );
    assert_eq!(
        stats.rejected_429, 0,
        "the daemon pauses before the limit: a 429 would ban get for the ban's length"
    );
    let file = file_ids(&dir.path().join("events.jsonl"));
    let ids: BTreeSet<_> = file.keys().collect();
    assert_eq!(ids.len(), 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_older_limiter_the_docs_describe_is_respected_too() {
    init();
    let dir = tempfile::tempdir().unwrap();
    // The docs' model: float `processing`, every call charged at once, `batch` not counted,
    // a method over budget refused until its oldest minute leaves the window.
    let (sim, tokens) = portal(SimulatorConfig {
        operating_limit: Some(OperatingLimit::scaled(
            Duration::from_secs(6),
            Duration::from_secs(20),
        )),
        limiter: LimiterModel::Legacy,
        operating_cost_per_event: Duration::from_millis(4),
        ..cloud()
    })
    .await;
    emit_deals(&sim, 1, 2000);
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "rate_limit = { burst = 50, per_second = 2.0, operating_budget = \"6s\" }",
        &file_sink(dir.path()),
    );
    let started = Instant::now();
    let running = Running::start(&config, &tokens).await;
    wait_for(
        "all 2000 events settled upstream",
        Duration::from_secs(120),
        || upstream_empty(&sim),
    )
    .await;
    let drained_in = started.elapsed();
    running.stop().await;
    let stats = sim.stats();
    eprintln!(
        "2000 events under the older limiter (6 s / 20 s): {:.1} s, {} requests, widest batch {} gets, {} x 429",
        drained_in.as_secs_f64(),
        stats.requests,
        stats.max_gets_per_batch,
        stats.rejected_429
    );
    // 40 gets cost 8.2 s of server time: more than one window allows.
    assert!(
        drained_in > Duration::from_secs(6),
        "drained in {drained_in:?}"
    );
    assert_eq!(stats.rejected_429, 0);
    assert!(stats.max_gets_per_batch >= 2, "requests still combine gets");
    assert_eq!(file_ids(&dir.path().join("events.jsonl")).len(), 2000);
}
