//! Several daemon processes sharing one PostgreSQL journal: every portal owned and balanced; a
//! SIGKILLed owner's portals owned again within the lease TTL plus the grace with nothing lost;
//! a SIGSTOPped owner fenced by the epoch, stopping by itself when it resumes; a graceful stop
//! handing over at once. They need PostgreSQL (`B24TEST_POSTGRES`, else the local server CI
//! runs), so they are ignored unless asked for, and fail loudly when it is down.

use crate::support::daemon::{Daemon, signal, spawn_daemon, stop_with_sigterm};
use crate::support::*;
use b24eventd::bitrix::Tokens;
use b24eventd::config;
use b24eventd::journal::test_support::{DEFAULT_TEST_URL, postgres_url, unique_schema};
use b24eventd::journal::{Access, Journal};
use b24eventd_simulator::{Simulator, SimulatorConfig};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The lease TTL of these tests (renewed every second).
const TTL: Duration = Duration::from_secs(3);

struct Cluster {
    config: PathBuf,
    journal: Journal,
    schema: String,
    portals: Vec<(String, Simulator)>,
    sink: DedupEndpoint,
}

/// `count` simulated portals, a deduplicating HTTP consumer, and a config every instance shares:
/// the journal in a schema of its own, `lease_ttl` = [`TTL`], `request_timeout` = 1 s.
async fn cluster(dir: &Path, count: usize) -> Cluster {
    init();
    let url = postgres_url().unwrap_or_else(|| DEFAULT_TEST_URL.to_string());
    let schema = unique_schema();
    let sink = DedupEndpoint::start().await;
    let mut text = format!(
        "shutdown_timeout = \"10s\"\n[journal]\nurl = \"{url}\"\nschema = \"{schema}\"\nlease_ttl = \"3s\"\n[admin]\nlisten = \"\"\n"
    );
    let mut portals = Vec::new();
    let mut tokens: Vec<(String, Tokens)> = Vec::new();
    let defaults = SimulatorConfig::default();
    for n in 0..count {
        let (sim, pair) = portal(SimulatorConfig::default()).await;
        let name = format!("p{n:02}");
        write!(
            text,
            "\n[portals.{name}]\nclient_endpoint = \"{}\"\noauth_token_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nevents = [\"ONCRMDEALADD\", \"ONCRMDEALUPDATE\"]\npoll_interval = \"200ms\"\nrequest_timeout = \"1s\"\norphan_sweep_schedule = \"*/2 * * * * *\"\n",
            sim.client_endpoint(),
            sim.oauth_token_url(),
            defaults.client_id,
            defaults.client_secret,
        )
        .unwrap();
        tokens.push((name.clone(), pair));
        portals.push((name, sim));
    }
    writeln!(text, "\n{}", http_sink(&sink.url)).unwrap();
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    let loaded = config::load(&path).expect("config loads");
    let journal = match Journal::open_configured(&loaded.journal, Access::Create).await {
        Ok(journal) => journal,
        Err(e) => service_down(
            "PostgreSQL",
            "pg_ctlcluster 16 main start",
            format!("{e:#}"),
        ),
    };
    for (name, pair) in &tokens {
        journal.save_tokens(name, pair).await.unwrap();
    }
    Cluster {
        config: path,
        journal,
        schema,
        portals,
        sink,
    }
}

impl Cluster {
    /// Live leases by owner: instance id → portals.
    fn owners(&self) -> BTreeMap<String, Vec<String>> {
        let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for row in sql_rows(
            &self.journal,
            "SELECT portal, owner FROM portal_leases WHERE owner IS NOT NULL AND expires_at > now() ORDER BY portal",
        ) {
            owners
                .entry(sql_text(&row, "owner").unwrap())
                .or_default()
                .push(sql_text(&row, "portal").unwrap());
        }
        owners
    }

    /// The pid of instance `id`.
    fn pid_of(&self, id: &str) -> u32 {
        let rows = sql_rows(
            &self.journal,
            &format!("SELECT pid FROM instances WHERE id = '{id}'"),
        );
        sql_int(&rows[0], "pid") as u32
    }

    /// Every portal owned, by `instances` instances, each within one portal of its share.
    fn balanced(&self, instances: usize) -> bool {
        let owners = self.owners();
        let owned: usize = owners.values().map(Vec::len).sum();
        let share = self.portals.len() / instances;
        owned == self.portals.len()
            && owners.len() == instances
            && owners
                .values()
                .all(|p| p.len() == share || p.len() == share + 1)
    }

    async fn drained(&self, timeout: Duration) {
        wait_for("every portal drained upstream", timeout, || {
            self.portals.iter().all(|(_, sim)| upstream_empty(sim))
        })
        .await;
        wait_for("nothing unsettled in the journal", timeout, || {
            self.journal.counts_blocking().unwrap().unsettled_upstream == 0
        })
        .await;
    }

    /// Every emitted event delivered at least once; returns the duplicates the consumer saw.
    fn every_event_delivered(&self, per_portal: u64) -> usize {
        let accepted = self.sink.accepted();
        let mut delivered: BTreeMap<String, usize> = BTreeMap::new();
        for envelope in &accepted {
            *delivered
                .entry(envelope["portal"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        for (name, _) in &self.portals {
            assert_eq!(
                delivered.get(name).copied().unwrap_or(0) as u64,
                per_portal,
                "portal {name}: every event delivered once to the deduplicating consumer"
            );
        }
        self.sink.keys_received().len() - accepted.len()
    }

    fn drop_schema(&self) {
        self.journal
            .sql_execute(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .unwrap();
    }
}

fn spawn(dir: &Path, config: &Path, n: usize) -> (Daemon, PathBuf) {
    let log = dir.join(format!("daemon{n}.log"));
    (spawn_daemon(config, &log), log)
}

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
