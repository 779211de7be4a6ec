//! Several daemon processes sharing one PostgreSQL journal: every portal owned and balanced; a
//! SIGKILLed owner's portals owned again within the lease TTL plus the grace with nothing lost;
//! a SIGSTOPped owner fenced by the epoch, stopping by itself when it resumes; a graceful stop
//! handing over at once. They need PostgreSQL (`B24TEST_POSTGRES`, else the local server CI
//! runs), so they are ignored unless asked for, and fail loudly when it is down.

use crate::support::cluster::{Options, TTL, cluster, cluster_with, spawn};
use crate::support::daemon::{Daemon, signal, stop_with_sigterm};
use crate::support::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test) and runs three daemons"]
async fn three_instances_share_the_portals_survive_a_sigkill_and_hand_over_on_stop() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path(), 12).await;
    let mut daemons: Vec<(Daemon, PathBuf)> =
        (0..3).map(|n| spawn(dir.path(), &c.config, n)).collect();
    wait_for(
        "12 portals owned, 4 by each instance",
        Duration::from_secs(30),
        || c.balanced(3),
    )
    .await;

    const EVENTS: u64 = 300;
    for (_, sim) in &c.portals {
        emit_deals(sim, 1, EVENTS);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SIGKILL the instance owning the most portals while the events drain.
    let owners = c.owners();
    let (victim, its_portals) = owners.iter().max_by_key(|(_, p)| p.len()).unwrap();
    let pid = c.pid_of(victim);
    let index = daemons.iter().position(|(d, _)| d.id() == pid).unwrap();
    let (mut killed, _) = daemons.remove(index);
    killed.kill().unwrap();
    killed.wait().unwrap();
    let killed_at = Instant::now();
    wait_for(
        "the killed instance's portals owned again",
        TTL + TTL / 3 + Duration::from_secs(2),
        || {
            let owners = c.owners();
            !owners.contains_key(victim.as_str())
                && owners.values().map(Vec::len).sum::<usize>() == 12
        },
    )
    .await;
    let taken_over = killed_at.elapsed();
    assert!(c.balanced(2), "6 portals each: {:?}", c.owners());
    c.drained(Duration::from_secs(120)).await;
    let duplicates = c.every_event_delivered(EVENTS);
    eprintln!(
        "SIGKILL of the owner of {} portals: owned again after {:.1} s (TTL {} s); {} events delivered, {duplicates} duplicates",
        its_portals.len(),
        taken_over.as_secs_f64(),
        TTL.as_secs(),
        12 * EVENTS
    );

    // A graceful stop hands over at once (the next tick of the other), not after the TTL.
    let (mut first, first_log) = daemons.remove(0);
    let stopped_at = Instant::now();
    stop_with_sigterm(&mut first, &first_log);
    wait_for("the last instance owns every portal", TTL, || c.balanced(1)).await;
    eprintln!(
        "graceful stop: every portal with the last instance {:.1} s after SIGTERM",
        stopped_at.elapsed().as_secs_f64()
    );
    for (_, sim) in &c.portals {
        emit_deals(sim, EVENTS + 1, 20);
    }
    c.drained(Duration::from_secs(60)).await;
    c.every_event_delivered(EVENTS + 20);
    let (mut last, last_log) = daemons.remove(0);
    stop_with_sigterm(&mut last, &last_log);
    assert!(c.owners().is_empty(), "every lease released at the stop");
    c.drop_schema();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test) and runs two daemons"]
async fn a_paused_owner_is_fenced_by_the_epoch_and_stops_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path(), 6).await;
    let (mut one, one_log) = spawn(dir.path(), &c.config, 0);
    let (mut two, two_log) = spawn(dir.path(), &c.config, 1);
    wait_for(
        "6 portals owned, 3 by each instance",
        Duration::from_secs(30),
        || c.balanced(2),
    )
    .await;
    const EVENTS: u64 = 300;
    for (_, sim) in &c.portals {
        emit_deals(sim, 1, EVENTS);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Pause the owner of p00 for twice the TTL: the other takes its portals.
    let owners = c.owners();
    let paused = owners
        .iter()
        .find(|(_, p)| p.contains(&"p00".to_string()))
        .map(|(id, _)| id.clone())
        .unwrap();
    let (paused_child, paused_log, other_child, other_log) = if c.pid_of(&paused) == one.id() {
        (&mut one, &one_log, &mut two, &two_log)
    } else {
        (&mut two, &two_log, &mut one, &one_log)
    };
    signal(paused_child.id(), "STOP");
    tokio::time::sleep(TTL * 2).await;
    let owners = c.owners();
    assert_eq!(
        owners.get(&paused).map(Vec::len).unwrap_or(0),
        0,
        "the paused instance's leases moved: {owners:?}"
    );
    signal(paused_child.id(), "CONT");
    wait_for(
        "the resumed instance to stop its former portals' work by itself",
        Duration::from_secs(10),
        || {
            let log = std::fs::read_to_string(paused_log).unwrap_or_default();
            log.contains("portal lease not renewed before its deadline")
                || log.contains("portal lease lost to another instance")
        },
    )
    .await;
    wait_for(
        "the portals balanced again",
        Duration::from_secs(20),
        || c.balanced(2),
    )
    .await;
    c.drained(Duration::from_secs(120)).await;
    let duplicates = c.every_event_delivered(EVENTS);
    eprintln!(
        "SIGSTOP for {} s: {} events delivered, {duplicates} duplicates",
        (TTL * 2).as_secs(),
        6 * EVENTS
    );
    stop_with_sigterm(paused_child, paused_log);
    stop_with_sigterm(other_child, other_log);
    c.drop_schema();
}

/// With a long TTL (a tick every 20 s), an instance that joins gets its share, and a gracefully
/// stopped one's portals are taken, within seconds: the others hear the change (`LISTEN`)
/// instead of waiting for their next tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test) and runs two daemons"]
async fn a_join_and_a_graceful_stop_are_heard_at_once_not_at_the_next_tick() {
    const HEARD_WITHIN: Duration = Duration::from_secs(8);
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        lease_ttl: "60s",
        ..Options::default()
    };
    let c = cluster_with(dir.path(), 6, &options).await;
    let (mut first, first_log) = spawn(dir.path(), &c.config, 0);
    wait_for(
        "the first instance owns every portal",
        Duration::from_secs(30),
        || c.balanced(1),
    )
    .await;
    // Its first tick is done: its next is 20 s away.
    let joined_at = Instant::now();
    let (mut second, second_log) = spawn(dir.path(), &c.config, 1);
    wait_for(
        "the second instance has its share, before the first instance's next tick",
        HEARD_WITHIN,
        || c.balanced(2),
    )
    .await;
    let balanced_after = joined_at.elapsed();
    let stopped_at = Instant::now();
    stop_with_sigterm(&mut first, &first_log);
    wait_for(
        "the second instance owns every portal, before its next tick",
        HEARD_WITHIN,
        || c.balanced(1),
    )
    .await;
    eprintln!(
        "lease_ttl 60 s: a join balanced {:.1} s after the spawn; a graceful stop's portals taken {:.1} s after SIGTERM",
        balanced_after.as_secs_f64(),
        stopped_at.elapsed().as_secs_f64()
    );
    stop_with_sigterm(&mut second, &second_log);
}
