//! `bench cluster`: three daemons share one PostgreSQL journal (a fresh schema, dropped after)
//! and N portals (default 10,000), all served from the bench process on one listener, each
//! under a path prefix of its own (`Simulator::start_many`: a listener and a port per portal
//! would need 10,000 listening descriptors in the bench). Measured: time until every portal is
//! owned and until the shares are balanced (each instance within 10% of N/3), the drain of a
//! small backlog (5 events per portal), each instance's memory, descriptors, threads, CPU and
//! database connections, the lease renewal statements per period (`pg_stat_statements`, when
//! the server has it), and the dispatcher's owned-portal query (`dueq`).

use super::Report;
use super::daemon::{self, Daemon, PortalSection, WorkDir};
use super::drain::count_lines;
use super::dueq;
use super::pg::{self, BackendSampler, Schema};
use anyhow::{Context, bail};
use b24eventd_simulator::{Simulator, SimulatorConfig};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Daemon processes sharing the journal.
const INSTANCES: usize = 3;
/// Events queued per portal before the start.
const EVENTS_PER_PORTAL: u64 = 5;
/// `[journal] lease_ttl`: renewed every third of it.
const LEASE_TTL: Duration = Duration::from_secs(30);
/// Each portal's `request_timeout` (the lease TTL must be at least twice it).
const PORTAL_KEYS: &str = "request_timeout = \"10s\"";
/// How far from N / INSTANCES an instance's share may be and still count as balanced.
const BALANCE_TOLERANCE: f64 = 0.10;
/// The longest the bench waits for ownership, balance and the drain.
const TIMEOUT: Duration = Duration::from_secs(8 * 60);
/// How long the renewals are counted once the cluster is steady.
const RENEWAL_WINDOW: Duration = Duration::from_secs(25);

/// One daemon of the cluster.
struct Instance {
    daemon: Daemon,
    /// `application_name` of its pooled connections.
    app: String,
    running_after: Option<Duration>,
}

/// What the lease table shows: portals owned per owner (instance id), live leases only.
async fn owned(client: &tokio_postgres::Client) -> anyhow::Result<BTreeMap<String, u64>> {
    let rows = client
        .query(
            "SELECT owner, count(*) FROM portal_leases
             WHERE owner IS NOT NULL AND expires_at > now() GROUP BY owner",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
        .collect())
}

/// Whether `counts` covers `portals` with `instances` owners, each within the tolerance of
/// its share.
pub fn balanced(counts: &BTreeMap<String, u64>, portals: u64, instances: usize) -> bool {
    let share = portals as f64 / instances as f64;
    counts.len() == instances
        && counts.values().sum::<u64>() == portals
        && counts
            .values()
            .all(|&c| (c as f64 - share).abs() <= BALANCE_TOLERANCE * share)
}

/// The pid in an instance id `host-pid-boot-random` (the host may hold `-`).
pub fn pid_of_instance(id: &str) -> Option<u32> {
    let mut parts = id.rsplitn(4, '-');
    let (_random, _boot, pid) = (parts.next()?, parts.next()?, parts.next()?);
    pid.parse().ok()
}

/// `pg_stat_statements`' calls and rows of the lease renewal (`lease::heartbeat`'s `UPDATE`),
/// or `None` when the server does not have the extension in this database.
async fn renewal_statements(client: &tokio_postgres::Client) -> Option<(i64, i64)> {
    let row = client
        .query_one(
            "SELECT COALESCE(sum(calls), 0)::bigint, COALESCE(sum(rows), 0)::bigint
             FROM public.pg_stat_statements
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND query LIKE 'UPDATE portal_leases%SET expires_at = now() + make_interval%'",
            &[],
        )
        .await
        .ok()?;
    Some((row.get(0), row.get(1)))
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

pub async fn run(portals: u32, url: &str) -> anyhow::Result<Report> {
    let n = u64::from(portals.max(INSTANCES as u32));
    let mut report = Report::new("cluster");
    let dir = WorkDir::create("cluster")?;
    let schema = Schema::fresh(url, "cluster").await?;
    let result = run_in(n, &dir, &schema, &mut report).await;
    let dropped = schema.drop_now().await;
    result?;
    dropped?;
    Ok(report)
}

async fn run_in(n: u64, dir: &WorkDir, schema: &Schema, report: &mut Report) -> anyhow::Result<()> {
    let nofile = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    report.setup = vec![
        format!(
            "{n} portals shared by {INSTANCES} b24eventd processes (the real binary) on one \
PostgreSQL journal (a fresh schema, dropped after), lease_ttl = {LEASE_TTL:?} (renewed every \
{:?}), each portal `{PORTAL_KEYS}` and otherwise the defaults; one file sink per instance",
            LEASE_TTL / 3
        ),
        format!(
            "portals: simulators without limits in the bench process, all on one listener under \
/p/NAME (one port and listening socket for all), {EVENTS_PER_PORTAL} events each queued before \
the start; tokens seeded into the journal first; the daemons started together"
        ),
        format!(
            "open-file limit (inherited by the daemons): soft {:?}, hard {:?}",
            nofile.current, nofile.maximum
        ),
    ];
    let names: Vec<String> = (0..n).map(|i| format!("p{i:05}")).collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let started = Instant::now();
    let sims = Simulator::start_many(SimulatorConfig::default(), &names, listener).await?;
    let mut tokens = Vec::with_capacity(sims.len());
    for (name, sim) in names.iter().zip(&sims) {
        for event in daemon::EVENTS {
            sim.bind_offline(event, "");
        }
        daemon::emit_deals(sim, 1, EVENTS_PER_PORTAL);
        let (access, refresh) = sim.issue_tokens();
        tokens.push((
            name.clone(),
            b24eventd::bitrix::Tokens::from_pair(access, refresh),
        ));
    }
    let sims_ready = started.elapsed();
    let seeding = Instant::now();
    seed_tokens(schema, tokens).await?;
    report.row(
        "bench",
        "simulators started and events queued",
        sims_ready.as_secs_f64(),
        "s",
    );
    report.row(
        "bench",
        "tokens seeded into the journal",
        seeding.elapsed().as_secs_f64(),
        "s",
    );
    let sections: Vec<PortalSection<'_>> = names
        .iter()
        .zip(&sims)
        .map(|(name, sim)| PortalSection {
            name: name.clone(),
            sim,
            extra: PORTAL_KEYS.to_string(),
        })
        .collect();
    let run_tag = format!("b24bench-{}-{:04x}", std::process::id(), fastrand::u16(..));
    let mut instances = Vec::with_capacity(INSTANCES);
    let mut configs = Vec::with_capacity(INSTANCES);
    for i in 0..INSTANCES {
        let app = format!("{run_tag}-{i}");
        let journal =
            schema.journal_section(&app, &format!("lease_ttl = \"{}s\"", LEASE_TTL.as_secs()));
        let sink = daemon::file_sink(&dir.file(&format!("events-{i}.jsonl")));
        let config = daemon::write_config_with(
            &dir.path,
            &format!("config-{i}.toml"),
            &journal,
            &sections,
            &sink,
        )?;
        configs.push((app, config));
    }
    let config_bytes = std::fs::metadata(&configs[0].1)?.len();
    report.row(
        "bench",
        "config file size",
        config_bytes as f64 / 1024.0,
        "KiB",
    );
    let spawned = Instant::now();
    for (i, (app, config)) in configs.into_iter().enumerate() {
        let daemon = Daemon::spawn(&config, &dir.file(&format!("daemon-{i}.log")))?;
        instances.push(Instance {
            daemon,
            app,
            running_after: None,
        });
    }
    let client = schema.client();
    client
        .batch_execute(&format!("SET search_path TO {}", schema.name))
        .await?;
    let sampler = BackendSampler::start(
        &schema.url,
        instances
            .iter()
            .map(|i| (i.app.clone(), i.daemon.pid()))
            .collect(),
        Duration::from_secs(1),
    )
    .await?;
    let server_before = pg::server_cpu_seconds(client).await;
    let outcome = watch(n, &mut instances, &sims, client, spawned).await;
    let (all_owned, balanced_at, drained, counts) = match outcome {
        Ok(times) => times,
        Err(e) => {
            // What the instances logged says why.
            for (i, inst) in instances.iter().enumerate() {
                report
                    .notes
                    .push(format!("instance {i} log tail: {}", inst.daemon.log_tail()));
            }
            return Err(e);
        }
    };
    for (i, inst) in instances.iter().enumerate() {
        if let Some(t) = inst.running_after {
            report.row(
                &format!("instance {i}"),
                "\"running\" after the spawn",
                t.as_secs_f64(),
                "s",
            );
        }
    }
    report.row(
        "cluster",
        "every portal owned, after the spawn",
        all_owned.as_secs_f64(),
        "s",
    );
    report.row(
        "cluster",
        &format!(
            "balanced (each within {:.0}% of N/3)",
            BALANCE_TOLERANCE * 100.0
        ),
        balanced_at.as_secs_f64(),
        "s",
    );
    report.row(
        "cluster",
        &format!(
            "{} events drained (every queue empty)",
            n * EVENTS_PER_PORTAL
        ),
        drained.as_secs_f64(),
        "s",
    );
    let drained_cpu: Vec<f64> = instances
        .iter()
        .map(|i| i.daemon.cpu_seconds().unwrap_or(0.0))
        .collect();
    // Steady: count the renewals over a window.
    let before = renewal_statements(client).await;
    let window = Instant::now();
    tokio::time::sleep(RENEWAL_WINDOW).await;
    let after = renewal_statements(client).await;
    let window = window.elapsed();
    let periods = window.as_secs_f64() / (LEASE_TTL / 3).as_secs_f64();
    match before.zip(after) {
        Some(((c0, r0), (c1, r1))) => {
            let calls = (c1 - c0) as f64;
            report.row(
                "cluster",
                &format!("renewal statements in {:.0} s (all instances)", window.as_secs_f64()),
                calls,
                "",
            );
            report.row("cluster", "leases renewed by them", (r1 - r0) as f64, "");
            report.row(
                "cluster",
                "renewal statements per instance per period",
                calls / (INSTANCES as f64 * periods),
                "",
            );
            report.ratio(
                "renewal statements per instance per period",
                calls / (INSTANCES as f64 * periods),
                "1 when batched (one per instance per renewal); about N/3 if per portal",
            );
        }
        None => report.notes.push(
            "renewal statements not counted: the server has no pg_stat_statements in this database \
(shared_preload_libraries = 'pg_stat_statements' and CREATE EXTENSION pg_stat_statements)"
                .to_string(),
        ),
    }
    let conns = pg::backends(
        client,
        &instances
            .iter()
            .map(|i| (i.app.clone(), i.daemon.pid()))
            .collect::<Vec<_>>(),
    )
    .await?;
    let sampled = sampler.finish().await?;
    let server_after = pg::server_cpu_seconds(client).await;
    let mut by_pid: BTreeMap<u32, u64> = BTreeMap::new();
    for (owner, count) in &counts {
        if let Some(pid) = pid_of_instance(owner) {
            by_pid.insert(pid, *count);
        }
    }
    for (i, inst) in instances.iter().enumerate() {
        let pid = inst.daemon.pid();
        let subject = format!("instance {i}");
        let memory = inst.daemon.memory()?;
        report.row(
            &subject,
            "portals owned",
            by_pid.get(&pid).copied().unwrap_or(0) as f64,
            "",
        );
        report.row(&subject, "VmRSS (steady)", memory.rss_mib(), "MiB");
        report.row(&subject, "VmHWM", memory.hwm_mib(), "MiB");
        report.row(&subject, "open fds", open_fds(pid) as f64, "");
        report.row(&subject, "threads", threads(pid) as f64, "");
        report.row(&subject, "CPU until drained", drained_cpu[i], "s");
        report.row(
            &subject,
            "DB connections now",
            conns.get(i).map_or(0, Vec::len) as f64,
            "",
        );
        report.row(
            &subject,
            "DB connections, most at once",
            sampled.most_connections.get(i).copied().unwrap_or(0) as f64,
            "",
        );
        report.row(
            &subject,
            "its PostgreSQL backends' CPU",
            sampled.cpu_seconds.get(i).copied().unwrap_or(0.0),
            "s",
        );
    }
    if let Some(all) = server_before.zip(server_after).map(|(b, a)| a - b) {
        report.row(
            "PostgreSQL server",
            "CPU of every server process over the run",
            all,
            "s",
        );
    }
    let stops = futures_util::future::join_all(
        instances
            .into_iter()
            .map(|inst| async move { inst.daemon.stop().await }),
    )
    .await;
    for (i, stopped) in stops.into_iter().enumerate() {
        let took = stopped.with_context(|| format!("instance {i} did not stop cleanly"))?;
        report.row(
            &format!("instance {i}"),
            "stop (SIGTERM to exit)",
            took.as_secs_f64(),
            "s",
        );
    }
    let mut lines = 0;
    for i in 0..INSTANCES {
        lines += count_lines(&dir.file(&format!("events-{i}.jsonl"))).unwrap_or(0);
    }
    report.row(
        "cluster",
        "lines written by the three sinks",
        lines as f64,
        "",
    );
    if (lines as u64) < n * EVENTS_PER_PORTAL {
        bail!(
            "the sinks wrote {lines} lines for {} events",
            n * EVENTS_PER_PORTAL
        );
    }
    if let Some(sim) = sims.first() {
        sim.shutdown();
    }
    dueq::measure(client, &names, report).await?;
    Ok(())
}

/// Stores each portal's tokens in the journal (creating it), 16 at a time.
async fn seed_tokens(
    schema: &Schema,
    tokens: Vec<(String, b24eventd::bitrix::Tokens)>,
) -> anyhow::Result<()> {
    let journal = schema.open_journal().await?;
    let mut set = tokio::task::JoinSet::new();
    for (portal, pair) in tokens {
        if set.len() >= 16
            && let Some(done) = set.join_next().await
        {
            done??;
        }
        let journal = journal.clone();
        set.spawn(async move { journal.save_tokens(&portal, &pair).await });
    }
    while let Some(done) = set.join_next().await {
        done??;
    }
    Ok(())
}

/// Polls until every portal is owned, the shares are balanced and every queue is empty;
/// returns when each happened (from `spawned`) and the last ownership seen.
async fn watch(
    n: u64,
    instances: &mut [Instance],
    sims: &[Simulator],
    client: &tokio_postgres::Client,
    spawned: Instant,
) -> anyhow::Result<(Duration, Duration, Duration, BTreeMap<String, u64>)> {
    let (mut all_owned, mut balanced_at, mut drained) = (None, None, None);
    loop {
        for inst in instances.iter_mut() {
            inst.daemon.ensure_alive()?;
            if inst.running_after.is_none() && inst.daemon.is_running() {
                inst.running_after = Some(spawned.elapsed());
            }
        }
        let counts = owned(client).await?;
        let now = spawned.elapsed();
        if all_owned.is_none() && counts.values().sum::<u64>() == n {
            all_owned = Some(now);
        }
        if balanced_at.is_none() && balanced(&counts, n, instances.len()) {
            balanced_at = Some(now);
        }
        if drained.is_none() && sims.iter().all(daemon::upstream_empty) {
            drained = Some(now);
        }
        if let (Some(a), Some(b), Some(d)) = (all_owned, balanced_at, drained) {
            return Ok((a, b, d, counts));
        }
        if now > TIMEOUT {
            bail!(
                "after {now:?}: every portal owned: {all_owned:?}, balanced: {balanced_at:?}, \
drained: {drained:?}; owned now: {counts:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balance_needs_every_portal_and_every_share_within_ten_percent() {
        let counts = |v: &[u64]| -> BTreeMap<String, u64> {
            v.iter()
                .enumerate()
                .map(|(i, c)| (format!("i{i}"), *c))
                .collect()
        };
        assert!(balanced(&counts(&[3334, 3333, 3333]), 10_000, 3));
        assert!(balanced(&counts(&[3600, 3200, 3200]), 10_000, 3));
        assert!(!balanced(&counts(&[3700, 3150, 3150]), 10_000, 3));
        assert!(
            !balanced(&counts(&[3334, 3333, 3332]), 10_000, 3),
            "one not owned"
        );
        assert!(
            !balanced(&counts(&[5000, 5000]), 10_000, 3),
            "an instance owns none"
        );
    }

    #[test]
    fn the_pid_is_read_from_an_instance_id() {
        assert_eq!(pid_of_instance("vm-4242-0a1b2c3d-00ff"), Some(4242));
        assert_eq!(pid_of_instance("my-host-name-17-0-abcd"), Some(17));
        assert_eq!(pid_of_instance("nonsense"), None);
    }
}
