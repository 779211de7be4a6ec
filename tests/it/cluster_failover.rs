//! Failover at scale on the real binary: three daemon processes sharing one PostgreSQL journal
//! and 200 portals. A SIGKILLed owner's portals are owned again within the lease TTL plus the
//! grace, and a rolling restart under load leaves no portal without a live owner for longer
//! than the TTL; in both every event reaches the deduplicating consumer, nothing stays reserved
//! upstream or unsettled in the journal, and the duplicates are counted. They need PostgreSQL
//! (`B24TEST_POSTGRES`, else the local server CI runs), so they are ignored unless asked for,
//! and fail loudly when it is down.

use crate::support::cluster::{Cluster, Options, TTL, cluster_with, spawn, tcp_connections_to};
use crate::support::daemon::{Daemon, stop_with_sigterm};
use crate::support::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const PORTALS: usize = 200;
const INSTANCES: usize = 3;
/// Each instance's journal pool (`[journal] max_connections`); it holds one more connection,
/// the instance lock's.
const POOL: usize = 4;

/// 200 portals polled every second (an idle portal ever more slowly), swept every 10 s: three
/// daemons and 200 simulators share two cores here.
fn options() -> Options {
    Options {
        poll_interval: "1s",
        orphan_sweep_schedule: "*/10 * * * * *",
        journal_extra: "max_connections = 4\n",
        ..Options::default()
    }
}

/// Fails unless the server takes three instances' connections next to what it serves already.
fn connections_fit(c: &Cluster) {
    let max = sql_rows(
        &c.journal,
        "SELECT setting::int AS n FROM pg_settings WHERE name = 'max_connections'",
    );
    let max = sql_int(&max[0], "n") as usize;
    let used = sql_count(
        &c.journal,
        "SELECT count(*)::int AS n FROM pg_stat_activity",
    ) as usize;
    let needed = INSTANCES * (POOL + OWN_CONNECTIONS);
    assert!(
        used + needed <= max,
        "the server's max_connections ({max}) cannot take {needed} more next to the {used} open"
    );
}

/// The connections an instance keeps besides its pool: the instance lock's, the
/// lease-change listener's and the lease task's.
const OWN_CONNECTIONS: usize = 3;

/// The most journal connections the instances had open together (TCP: the journal URL names a
/// host, as CI's does) is within their pools plus their lock, listener and lease connections, and was
/// seen at all.
fn journal_connections_bounded(connections: usize) {
    assert!(
        connections > 0 && connections <= INSTANCES * (POOL + OWN_CONNECTIONS),
        "{connections} journal connections sampled: none seen, or more than {INSTANCES} × ({POOL} + {OWN_CONNECTIONS})"
    );
}

/// Every daemon log in `dir`, concatenated.
fn daemon_logs(dir: &Path) -> String {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?.to_string();
            (name.starts_with("daemon") && name.ends_with(".log"))
                .then(|| std::fs::read_to_string(&path).unwrap_or_default())
        })
        .collect()
}

/// What the daemons logged of leases lost by surprise: a portal's lease lost to another
/// instance, or not renewed before its deadline (self-fencing).
fn leases_lost(dir: &Path) -> usize {
    let logs = daemon_logs(dir);
    logs.matches("portal lease lost to another instance")
        .count()
        + logs
            .matches("portal lease not renewed before its deadline")
            .count()
}

/// The delivery outcomes the daemons could not journal because the portal's lease had moved
/// (its new owner delivers those events again): each one a duplicate the consumer sees.
fn outcomes_fenced(dir: &Path) -> usize {
    daemon_logs(dir)
        .lines()
        .filter(|line| line.contains("outcomes not journaled"))
        .filter_map(|line| {
            let count = line.split("deliveries=").nth(1)?;
            count
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum()
}

/// Starts `INSTANCES` daemons (logs `daemon0.log`…) and waits until the portals are balanced.
async fn start_all(dir: &Path, c: &Cluster) -> Vec<(Daemon, PathBuf)> {
    let daemons: Vec<(Daemon, PathBuf)> =
        (0..INSTANCES).map(|n| spawn(dir, &c.config, n)).collect();
    let started = Instant::now();
    wait_for(
        "200 portals owned, 66 or 67 by each of three instances",
        Duration::from_secs(60),
        || c.balanced(INSTANCES),
    )
    .await;
    eprintln!(
        "{PORTALS} portals balanced over {INSTANCES} instances {:.1} s after their start",
        started.elapsed().as_secs_f64()
    );
    daemons
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test) and runs three daemons"]
async fn two_hundred_portals_survive_a_sigkill_of_the_busiest_owner_mid_drain() {
    let dir = tempfile::tempdir().unwrap();
    let c = Arc::new(cluster_with(dir.path(), PORTALS, &options()).await);
    connections_fit(&c);
    let mut daemons = start_all(dir.path(), &c).await;
    let pids = Arc::new(std::sync::Mutex::new(
        daemons.iter().map(|(d, _)| d.id()).collect::<Vec<u32>>(),
    ));
    let sampler = Sampler::start(&c, pids.clone());

    const EVENTS: u64 = 100;
    let total = PORTALS * EVENTS as usize;
    for (_, sim) in &c.portals {
        emit_deals(sim, 1, EVENTS);
    }
    let emitted = Instant::now();
    // Mid-drain: a tenth delivered.
    wait_for(
        "a tenth of the events delivered",
        Duration::from_secs(60),
        || c.sink.accepted().len() >= total / 10,
    )
    .await;
    let owners = c.owners();
    let (victim, its_portals) = owners.iter().max_by_key(|(_, p)| p.len()).unwrap();
    let left_upstream: usize = c
        .portals
        .iter()
        .filter(|(name, _)| its_portals.contains(name))
        .map(|(_, sim)| sim.rows().len())
        .sum();
    assert!(
        left_upstream > 0,
        "the victim's portals still hold events upstream when it is killed (mid-drain)"
    );
    let pid = c.pid_of(victim);
    let index = daemons.iter().position(|(d, _)| d.id() == pid).unwrap();
    let (mut killed, _) = daemons.remove(index);
    killed.kill().unwrap();
    killed.wait().unwrap();
    let killed_at = Instant::now();
    pids.lock().unwrap().retain(|p| *p != pid);
    wait_for(
        "the killed instance's portals owned again",
        Duration::from_secs(30),
        || {
            let owners = c.owners();
            !owners.contains_key(victim.as_str())
                && owners.values().map(Vec::len).sum::<usize>() == PORTALS
        },
    )
    .await;
    let taken_over = killed_at.elapsed();
    let bound = TTL + TTL / 3;
    assert!(
        taken_over <= bound,
        "the killed instance's portals owned again after {taken_over:?}, more than the TTL plus the grace ({bound:?})"
    );
    assert!(c.balanced(INSTANCES - 1), "100 each: {:?}", c.owners());
    assert_eq!(
        leases_lost(dir.path()),
        0,
        "the surviving instances kept every lease they held"
    );

    c.drained(Duration::from_secs(120)).await;
    let drained_after = emitted.elapsed();
    let duplicates = c.every_event_delivered(EVENTS);
    let (_, connections) = sampler.finish();
    eprintln!(
        "SIGKILL of the owner of {} portals ({left_upstream} of their events still upstream), {:.1} s after {total} events were emitted: owned again after {:.2} s (bound: TTL {} s + grace {:.1} s); all {total} delivered {:.1} s after the emission, {duplicates} duplicates ({} outcomes refused by the fence); at most {connections} journal connections for {INSTANCES} instances (pool {POOL} + lock + lease-change listener + lease task each)",
        its_portals.len(),
        killed_at.duration_since(emitted).as_secs_f64(),
        taken_over.as_secs_f64(),
        TTL.as_secs(),
        (TTL / 3).as_secs_f64(),
        drained_after.as_secs_f64(),
        outcomes_fenced(dir.path()),
    );
    journal_connections_bounded(connections);
    for (mut daemon, log) in daemons {
        stop_with_sigterm(&mut daemon, &log);
    }
    assert!(c.owners().is_empty(), "every lease released at the stop");
    c.drop_schema();
}

/// Reads `portal_leases` every 100 ms until stopped: for each portal, the longest span seen
/// without a live owner (from the last sample with one to the next sample with one).
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(BTreeMap<String, Duration>, usize)>,
}

impl Sampler {
    fn start(c: &Arc<Cluster>, pids: Arc<std::sync::Mutex<Vec<u32>>>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (c, stop) = (c.clone(), stop.clone());
            std::thread::spawn(move || {
                let names: Vec<String> = c.portals.iter().map(|(n, _)| n.clone()).collect();
                let start = Instant::now();
                let mut last_owned: BTreeMap<String, Instant> =
                    names.iter().map(|n| (n.clone(), start)).collect();
                let mut longest: BTreeMap<String, Duration> =
                    names.iter().map(|n| (n.clone(), Duration::ZERO)).collect();
                let mut connections = 0;
                let port = c.journal_port();
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    let owned: std::collections::BTreeSet<String> =
                        c.owners().into_values().flatten().collect();
                    for name in &names {
                        let gap = now.duration_since(last_owned[name]);
                        if owned.contains(name) {
                            last_owned.insert(name.clone(), now);
                        } else if gap > longest[name] {
                            longest.insert(name.clone(), gap);
                        }
                    }
                    let open: usize = pids
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|pid| tcp_connections_to(*pid, port))
                        .sum();
                    connections = connections.max(open);
                    std::thread::sleep(Duration::from_millis(100));
                }
                (longest, connections)
            })
        };
        Sampler { stop, thread }
    }

    fn finish(self) -> (BTreeMap<String, Duration>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Emits one event on every portal per round, a round every 500 ms, until stopped; returns the
/// rounds (the events per portal).
struct Emitter {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Emitter {
    fn start(c: &Arc<Cluster>) -> Emitter {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let thread = {
            let (c, stop, rounds) = (c.clone(), stop.clone(), rounds.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let round = rounds.load(Ordering::Relaxed) + 1;
                    for (_, sim) in &c.portals {
                        emit_deals(sim, round, 1);
                    }
                    rounds.store(round, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        };
        Emitter {
            stop,
            rounds,
            thread,
        }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        self.rounds.load(Ordering::Relaxed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test) and runs three daemons"]
async fn a_rolling_restart_under_load_leaves_no_portal_unowned_longer_than_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let c = Arc::new(cluster_with(dir.path(), PORTALS, &options()).await);
    connections_fit(&c);
    let mut daemons = start_all(dir.path(), &c).await;
    let pids = Arc::new(std::sync::Mutex::new(
        daemons.iter().map(|(d, _)| d.id()).collect::<Vec<u32>>(),
    ));
    let emitter = Emitter::start(&c);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sampler = Sampler::start(&c, pids.clone());
    let rolling = Instant::now();
    for n in 0..INSTANCES {
        let (mut old, old_log) = daemons.remove(0);
        let stopping = Instant::now();
        stop_with_sigterm(&mut old, &old_log);
        let stopped = stopping.elapsed();
        let (new, new_log) = spawn(dir.path(), &c.config, INSTANCES + n);
        let new_pid = new.id();
        pids.lock().unwrap().retain(|pid| *pid != old.id());
        pids.lock().unwrap().push(new_pid);
        let started = Instant::now();
        wait_for(
            "the restarted instance owning its share again",
            Duration::from_secs(30),
            || {
                c.instance_of(new_pid).is_some_and(|id| {
                    c.owners()
                        .get(&id)
                        .is_some_and(|p| p.len() >= PORTALS / INSTANCES)
                }) && c.balanced(INSTANCES)
            },
        )
        .await;
        eprintln!(
            "restart {}: stopped in {:.1} s, its successor owns its share {:.1} s after its start",
            n + 1,
            stopped.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        daemons.push((new, new_log));
    }
    let rolled = rolling.elapsed();
    let rounds = emitter.finish();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (longest, connections) = sampler.finish();
    let (worst, gap) = longest.iter().max_by_key(|(_, gap)| **gap).unwrap();

    c.drained(Duration::from_secs(120)).await;
    let duplicates = c.every_event_delivered(rounds);
    eprintln!(
        "rolling restart of {INSTANCES} instances over {PORTALS} portals in {:.1} s under load ({} events, {rounds} per portal): longest span without a live owner {:.2} s ({worst}; TTL {} s); {duplicates} duplicates ({} outcomes refused by the fence); at most {connections} journal connections",
        rolled.as_secs_f64(),
        rounds * PORTALS as u64,
        gap.as_secs_f64(),
        TTL.as_secs(),
        outcomes_fenced(dir.path()),
    );
    assert_eq!(
        leases_lost(dir.path()),
        0,
        "a rolling restart hands every portal over gracefully: no lease lost or run out"
    );
    for (portal, gap) in &longest {
        assert!(
            *gap <= TTL,
            "portal {portal} had no live owner for {gap:?}, more than the TTL"
        );
    }
    journal_connections_bounded(connections);
    for (mut daemon, log) in daemons {
        stop_with_sigterm(&mut daemon, &log);
    }
    assert!(c.owners().is_empty(), "every lease released at the stop");
    c.drop_schema();
}
