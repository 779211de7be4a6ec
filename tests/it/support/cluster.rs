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

/// What [`cluster_with`] may set differently from [`cluster`].
pub struct Options {
    /// Every portal's `poll_interval`.
    pub poll_interval: &'static str,
    /// Every portal's `orphan_sweep_schedule`.
    pub orphan_sweep_schedule: &'static str,
    /// Appended to the shared `[journal]` table (e.g. `max_connections = 4`).
    pub journal_extra: &'static str,
    /// `[journal] lease_ttl` ([`TTL`] unless set).
    pub lease_ttl: &'static str,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            poll_interval: "200ms",
            orphan_sweep_schedule: "*/2 * * * * *",
            journal_extra: "",
            lease_ttl: "3s",
        }
    }
}

/// `count` simulated portals, a deduplicating HTTP consumer, and a config every instance shares:
/// the journal in a schema of its own, `lease_ttl` = [`TTL`], `request_timeout` = 1 s.
pub async fn cluster(dir: &Path, count: usize) -> Cluster {
    cluster_with(dir, count, &Options::default()).await
}

/// [`cluster`] with `options`.
pub async fn cluster_with(dir: &Path, count: usize, options: &Options) -> Cluster {
    let url = postgres_url().unwrap_or_else(|| DEFAULT_TEST_URL.to_string());
    cluster_at(dir, count, options, &url).await
}

/// [`cluster`] with the journal on the server at `url`.
pub async fn cluster_on(dir: &Path, count: usize, url: &str) -> Cluster {
    cluster_at(dir, count, &Options::default(), url).await
}

async fn cluster_at(dir: &Path, count: usize, options: &Options, url: &str) -> Cluster {
    init();
    let schema = unique_schema();
    let sink = DedupEndpoint::start().await;
    let mut text = format!(
        "shutdown_timeout = \"10s\"\n[journal]\nurl = \"{url}\"\nschema = \"{schema}\"\nlease_ttl = \"{}\"\n{}[admin]\nlisten = \"\"\n",
        options.lease_ttl, options.journal_extra
    );
    let mut portals = Vec::new();
    let mut tokens: Vec<(String, Tokens)> = Vec::new();
    let defaults = SimulatorConfig::default();
    for n in 0..count {
        let (sim, pair) = portal(SimulatorConfig::default()).await;
        let name = format!("p{n:02}");
        write!(
            text,
            "\n[portals.{name}]\nclient_endpoint = \"{}\"\noauth_token_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"{}\"\nevents = [\"ONCRMDEALADD\", \"ONCRMDEALUPDATE\"]\npoll_interval = \"{}\"\nrequest_timeout = \"1s\"\norphan_sweep_schedule = \"{}\"\n",
            sim.client_endpoint(),
            sim.oauth_token_url(),
            defaults.client_id,
            defaults.client_secret,
            options.poll_interval,
            options.orphan_sweep_schedule,
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

impl Cluster {
    /// The pid of every live instance, by instance id.
    pub fn live_instances(&self) -> BTreeMap<String, u32> {
        sql_rows(
            &self.journal,
            "SELECT id, pid FROM instances WHERE expires_at > now() ORDER BY id",
        )
        .iter()
        .map(|row| (sql_text(row, "id").unwrap(), sql_int(row, "pid") as u32))
        .collect()
    }

    /// The id of the live instance whose process is `pid`, once it has registered.
    pub fn instance_of(&self, pid: u32) -> Option<String> {
        self.live_instances()
            .into_iter()
            .find(|(_, p)| *p == pid)
            .map(|(id, _)| id)
    }

    /// The TCP port of the journal's PostgreSQL server (5432 unless the URL names one).
    pub fn journal_port(&self) -> u16 {
        let url = postgres_url().unwrap_or_else(|| DEFAULT_TEST_URL.to_string());
        let authority = url
            .split_once("://")
            .map_or(url.as_str(), |(_, rest)| rest)
            .split(['/', '?'])
            .next()
            .unwrap_or_default();
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        host.rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
            .unwrap_or(5432)
    }
}

/// The established TCP connections process `pid` has open to `port` (its sockets in `/proc`
/// matched with the kernel's TCP table, each counted once: the table is read in chunks, and
/// while connections come and go a read can list one twice, as seen: 25 for 7 open, which
/// an immediate second read confirmed); 0 when the process is gone.
pub fn tcp_connections_to(pid: u32, port: u16) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let inodes: std::collections::BTreeSet<String> = fds
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let remote = format!(":{port:04X}");
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok())
        .flat_map(|text| text.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() > 9
                && fields[2].ends_with(&remote)
                && fields[3] == "01"
                && inodes.contains(fields[9]))
            .then(|| fields[9].to_string())
        })
        .collect::<std::collections::BTreeSet<String>>()
        .len()
}
