//! Start-up of a cluster on the real binary: three daemons started together on one PostgreSQL
//! journal each take their share from the start (no portal taken twice, no instance ever above
//! its share, none taken before a renewal period after the last registration), and a lone
//! daemon owns every portal one renewal period after it registered (its discovery window). They need PostgreSQL (`B24TEST_POSTGRES`, else the local server CI runs),
//! so they are ignored unless asked for, and fail loudly when it is down.

use crate::support::cluster::{Cluster, Options, cluster_with, spawn};
use crate::support::daemon::{Daemon, stop_with_sigterm};
use crate::support::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Milliseconds, as one integer column `n` the database computes.
fn millis(c: &Cluster, sql: &str) -> i64 {
    sql_count(&c.journal, sql)
}

/// The least and the most time from an owner's registration to its acquisition of a lease
/// (database clock, ms): the discovery window as the database saw it.
fn registered_to_acquired(c: &Cluster) -> (i64, i64) {
    let of = |agg: &str| {
        millis(
            c,
            &format!(
                "SELECT {agg}((EXTRACT(EPOCH FROM l.acquired_at - i.started_at) * 1000)::bigint) AS n
                 FROM portal_leases l JOIN instances i ON i.id = l.owner"
            ),
        )
    };
    (of("min"), of("max"))
}

fn stop_all(daemons: Vec<(Daemon, PathBuf)>) {
    for (mut daemon, log) in daemons {
        stop_with_sigterm(&mut daemon, &log);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test) and runs three daemons"]
async fn three_instances_started_together_each_take_their_share_and_no_portal_moves() {
    const PORTALS: usize = 60;
    const SHARE: usize = PORTALS / 3;
    // A renewal period (the discovery window) of 5 s: three daemons spawned at once on a busy
    // two-core machine register well within it.
    let window = Duration::from_secs(5);
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        poll_interval: "1s",
        orphan_sweep_schedule: "*/10 * * * * *",
        journal_extra: "max_connections = 4\n",
        lease_ttl: "15s",
    };
    let c = cluster_with(dir.path(), PORTALS, &options).await;
    let daemons: Vec<(Daemon, PathBuf)> = (0..3).map(|n| spawn(dir.path(), &c.config, n)).collect();
    let spawned = Instant::now();
    // Sampled every 100 ms until balanced: the most portals any instance owned at once.
    let mut most = 0;
    while !c.balanced(3) {
        most = most.max(c.owners().values().map(Vec::len).max().unwrap_or(0));
        assert!(
            spawned.elapsed() < Duration::from_secs(60),
            "60 portals not balanced over three instances after 60 s: {:?}",
            c.owners()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let balanced = spawned.elapsed();
    let spread = millis(
        &c,
        "SELECT (EXTRACT(EPOCH FROM max(started_at) - min(started_at)) * 1000)::bigint AS n FROM instances",
    );
    let gap = millis(
        &c,
        "SELECT (EXTRACT(EPOCH FROM max(gap)) * 1000)::bigint AS n FROM
           (SELECT started_at - lag(started_at) OVER (ORDER BY started_at) AS gap FROM instances) g",
    );
    assert!(
        gap < window.as_millis() as i64,
        "the premise: each registered within the discovery window ({window:?}) of the one before, not {gap} ms after"
    );
    assert!(
        most <= SHARE,
        "an instance owned {most} portals during the start-up, more than its share ({SHARE})"
    );
    let moved = sql_count(
        &c.journal,
        "SELECT count(*)::int AS n FROM portal_leases WHERE epoch <> 1 OR handovers <> 0",
    );
    assert_eq!(moved, 0, "every portal taken once (epoch 1, no handover)");
    let (first, last) = registered_to_acquired(&c);
    // The local window is measured from when the registering heartbeat was sent, before the
    // database's `started_at`; a few ms of slack for the two clocks' rates.
    assert!(
        first >= window.as_millis() as i64 - 50,
        "a lease taken {first} ms after its owner registered, within the discovery window"
    );
    // Everyone takes its share one renewal period after the last registration (plus how long
    // a tick takes on a loaded machine), and not before.
    let late = millis(
        &c,
        "SELECT (EXTRACT(EPOCH FROM (SELECT max(acquired_at) FROM portal_leases)
                                  - (SELECT max(started_at) FROM instances)) * 1000)::bigint AS n",
    );
    let window_ms = window.as_millis() as i64;
    let earliest = millis(
        &c,
        "SELECT (EXTRACT(EPOCH FROM (SELECT min(acquired_at) FROM portal_leases)
                                  - (SELECT max(started_at) FROM instances)) * 1000)::bigint AS n",
    );
    assert!(
        earliest >= window_ms - 50,
        "a lease taken {earliest} ms after the last instance registered: within its window"
    );
    assert!(
        late <= window_ms + 2_000,
        "the last lease taken {late} ms after the last instance registered (window {window:?})"
    );
    let logs: String = daemons
        .iter()
        .map(|(_, log)| std::fs::read_to_string(log).unwrap_or_default())
        .collect();
    assert!(
        !logs.contains("portal leases released to rebalance"),
        "no instance handed portals back during the start-up"
    );
    eprintln!(
        "three instances, {PORTALS} portals: registered within {spread} ms, leases taken {first}–{last} ms after their owner registered, balanced {:.1} s after the spawn; at most {most} portals owned by one instance",
        balanced.as_secs_f64()
    );

    // And the portals are worked: every event delivered, each once.
    const EVENTS: u64 = 5;
    for (_, sim) in &c.portals {
        emit_deals(sim, 1, EVENTS);
    }
    c.drained(Duration::from_secs(60)).await;
    let duplicates = c.every_event_delivered(EVENTS);
    eprintln!(
        "{} events delivered, {duplicates} duplicates",
        PORTALS as u64 * EVENTS
    );
    stop_all(daemons);
    c.drop_schema();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test) and runs a daemon"]
async fn a_lone_instance_owns_every_portal_one_renewal_period_after_it_registered() {
    let window = Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        lease_ttl: "6s",
        ..Options::default()
    };
    let c = cluster_with(dir.path(), 6, &options).await;
    let daemon = spawn(dir.path(), &c.config, 0);
    let spawned = Instant::now();
    wait_for(
        "every portal owned by the lone instance",
        Duration::from_secs(20),
        || c.balanced(1),
    )
    .await;
    let owned = spawned.elapsed();
    let (first, last) = registered_to_acquired(&c);
    let window_ms = window.as_millis() as i64;
    assert!(
        first >= window_ms - 50 && last <= window_ms + 1_500,
        "leases taken {first}–{last} ms after the registration: one renewal period ({window:?}) expected"
    );
    eprintln!(
        "a lone instance: every portal owned {:.1} s after the spawn, {first}–{last} ms after it registered",
        owned.as_secs_f64()
    );
    stop_all(vec![daemon]);
    c.drop_schema();
}
