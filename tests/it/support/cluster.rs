//! The cluster harness: several real daemon processes sharing one PostgreSQL journal (a schema
//! per test, `B24TEST_POSTGRES` else the local server CI runs), simulated portals, a
//! deduplicating consumer, and the reads of `portal_leases` the cluster tests assert on.

use super::daemon::{Daemon, spawn_daemon};
use super::*;
use b24eventd::bitrix::Tokens;
use b24eventd::config;
use b24eventd::journal::test_support::{DEFAULT_TEST_URL, postgres_url, unique_schema};
use b24eventd::journal::{Access, Journal};
use b24eventd_simulator::{Simulator, SimulatorConfig};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The lease TTL of these tests (renewed every second).
pub const TTL: Duration = Duration::from_secs(3);

pub struct Cluster {
    pub config: PathBuf,
    pub journal: Journal,
    pub schema: String,
    pub portals: Vec<(String, Simulator)>,
    pub sink: DedupEndpoint,
}

/// `count` simulated portals, a deduplicating HTTP consumer, and a config every instance shares:
/// the journal in a schema of its own, `lease_ttl` = [`TTL`], `request_timeout` = 1 s.
pub async fn cluster(dir: &Path, count: usize) -> Cluster {
    let url = postgres_url().unwrap_or_else(|| DEFAULT_TEST_URL.to_string());
    cluster_on(dir, count, &url).await
}

/// [`cluster`] with the journal on the server at `url`.
pub async fn cluster_on(dir: &Path, count: usize, url: &str) -> Cluster {
    init();
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
    pub fn owners(&self) -> BTreeMap<String, Vec<String>> {
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
    pub fn pid_of(&self, id: &str) -> u32 {
        let rows = sql_rows(
            &self.journal,
            &format!("SELECT pid FROM instances WHERE id = '{id}'"),
        );
        sql_int(&rows[0], "pid") as u32
    }

    /// Every portal owned, by `instances` instances, each within one portal of its share.
    pub fn balanced(&self, instances: usize) -> bool {
        let owners = self.owners();
        let owned: usize = owners.values().map(Vec::len).sum();
        let share = self.portals.len() / instances;
        owned == self.portals.len()
            && owners.len() == instances
            && owners
                .values()
                .all(|p| p.len() == share || p.len() == share + 1)
    }

    pub async fn drained(&self, timeout: Duration) {
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
    pub fn every_event_delivered(&self, per_portal: u64) -> usize {
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

    pub fn drop_schema(&self) {
        self.journal
            .sql_execute(&format!("DROP SCHEMA {} CASCADE", self.schema))
            .unwrap();
    }
}

/// Starts instance `n` of the cluster with its own log file `dir/daemon{n}.log`.
pub fn spawn(dir: &Path, config: &Path, n: usize) -> (Daemon, PathBuf) {
    let log = dir.join(format!("daemon{n}.log"));
    (spawn_daemon(config, &log), log)
}
