//! Connectivity faults between the instances of a cluster and their PostgreSQL journal, on the
//! real binary: one instance's route to the server blackholed (it self-fences before its leases
//! can run out, the others take its portals, it rejoins when the route heals, and a stop while
//! blackholed ends in bounded time), the server itself restarted and stopped mid-drain (every
//! instance recovers and holds its instance lock again, every event is delivered), and a start
//! against a server that accepts and never answers (given up after `connect_timeout`). Ignored
//! like the other cluster tests: the first and the last need PostgreSQL (`B24TEST_POSTGRES`,
//! else the local server CI runs), the second a server of its own (initdb and pg_ctl
//! installed); each fails loudly without.

use crate::support::cluster::{Cluster, TTL, cluster, cluster_on, spawn};
use crate::support::daemon::{Daemon, signal, spawn_daemon, stop_with_sigterm};
use crate::support::private_postgres::PrivatePostgres;
use crate::support::proxy::TcpProxy;
use crate::support::*;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The cluster harness's `shutdown_timeout`, and how much longer the daemon's stop may go on
/// when the journal does not answer: the daemon's `JOURNAL_CHECK` (the final settle and the
/// lease release are skipped after it), plus the process's own start and end on a busy machine.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
const SILENT_JOURNAL_TAIL: Duration = Duration::from_secs(2);
const SLACK: Duration = Duration::from_secs(2);

/// The journal URL of `config` (the first `url =`, in `[journal]`).
fn journal_url(config: &Path) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("url = \""))
        .expect("the config names the journal's url");
    line["url = \"".len()..line.len() - 1].to_string()
}

/// `host:port` of a `postgres://` URL, and the URL with it replaced by `addr` (when given).
fn reroute(url: &str, addr: Option<std::net::SocketAddr>) -> (String, String) {
    let rest = url.split_once("://").unwrap().1;
    let authority = rest.split(['/', '?']).next().unwrap();
    let host_port = authority.rsplit('@').next().unwrap();
    let upstream = if host_port.contains(':') {
        host_port.to_string()
    } else {
        format!("{host_port}:5432")
    };
    let rerouted = match addr {
        Some(addr) => url.replacen(
            authority,
            &authority.replacen(host_port, &addr.to_string(), 1),
            1,
        ),
        None => url.to_string(),
    };
    (upstream, rerouted)
}

/// Sends SIGTERM and waits for the exit, failing the test if it takes longer than `bound`.
/// Returns the exit code and how long the stop took.
async fn stop_within(child: &mut Daemon, log: &Path, bound: Duration) -> (Option<i32>, Duration) {
    let started = Instant::now();
    signal(child.id(), "TERM");
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code(), started.elapsed());
        }
        if started.elapsed() > bound {
            panic!(
                "the daemon did not stop within {bound:?} of SIGTERM; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The instance id of the daemon with `pid`.
fn id_of(c: &Cluster, pid: u32) -> String {
    let rows = sql_rows(
        &c.journal,
        &format!("SELECT id FROM instances WHERE pid = {pid} ORDER BY started_at DESC LIMIT 1"),
    );
    sql_text(&rows[0], "id").unwrap()
}

/// The database's clock now, as SQL text.
fn db_now(c: &Cluster) -> String {
    sql_text(&sql_rows(&c.journal, "SELECT now()::text AS t")[0], "t").unwrap()
}

/// Every one of `n` instances heartbeated since `since` (the database's clock) and the portals
/// are balanced between them, every lease renewed or taken since then.
fn back_to_work(c: &Cluster, n: usize, since: &str) -> bool {
    let beating = sql_rows(
        &c.journal,
        &format!("SELECT id FROM instances WHERE heartbeat_at > '{since}'"),
    )
    .len();
    let stale = sql_rows(
        &c.journal,
        &format!(
            "SELECT portal FROM portal_leases WHERE expires_at <= '{since}'::timestamptz + interval '{} seconds'",
            TTL.as_secs()
        ),
    )
    .len();
    beating == n && stale == 0 && c.balanced(n)
}

/// How many processes hold the journal's instance lock shared (a session advisory lock keyed
/// `0x62323464` and `hashtext(schema)`, one per running daemon).
fn instance_lock_holders(c: &Cluster) -> usize {
    sql_rows(
        &c.journal,
        "SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND mode = 'ShareLock'
           AND objsubid = 2 AND classid = 1647457380::oid AND objid = hashtext(current_schema())::oid
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .len()
}

/// The line of `log` that says what the stop waited for.
fn stop_summary(log: &Path) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("stop waited for"))
        .map(|l| {
            l.split_once("INFO")
                .map_or(l, |(_, rest)| rest)
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// The first time `log` says `message` for `portal`.
fn logged_at(log: &Path, message: &str, portal: &str) -> Option<DateTime<Utc>> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let line = text
        .lines()
        .find(|l| l.contains(message) && l.contains(&format!("portal={portal}")))?;
    let stamp = line.split_whitespace().next()?;
    Some(
        DateTime::parse_from_rfc3339(stamp)
            .ok()?
            .with_timezone(&Utc),
    )
}

/// When each lease was last acquired, on the database's clock.
fn acquired_at(c: &Cluster) -> BTreeMap<String, DateTime<Utc>> {
    sql_rows(
        &c.journal,
        "SELECT portal, to_char(acquired_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS at FROM portal_leases",
    )
    .iter()
    .map(|row| {
        let at = sql_text(row, "at").unwrap();
        (
            sql_text(row, "portal").unwrap(),
            DateTime::parse_from_rfc3339(&at).unwrap().with_timezone(&Utc),
        )
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test) and runs three daemons"]
async fn a_blackholed_instance_self_fences_its_portals_move_and_it_rejoins_when_the_route_heals() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path(), 6).await;
    // Instance 0 reaches the server through a proxy; the other two directly.
    let url = journal_url(&c.config);
    let (upstream, _) = reroute(&url, None);
    let proxy = TcpProxy::start(&upstream).await;
    let (_, proxied) = reroute(&url, Some(proxy.addr()));
    let cut_config = dir.path().join("config-cut.toml");
    let text = std::fs::read_to_string(&c.config).unwrap();
    std::fs::write(&cut_config, text.replacen(&url, &proxied, 1)).unwrap();
    let cut_log = dir.path().join("daemon0.log");
    let mut cut = spawn_daemon(&cut_config, &cut_log);
    let mut others: Vec<(Daemon, PathBuf)> =
        (1..3).map(|n| spawn(dir.path(), &c.config, n)).collect();
    wait_for(
        "6 portals owned, 2 by each instance",
        Duration::from_secs(30),
        || c.balanced(3),
    )
    .await;
    let cut_id = id_of(&c, cut.id());

    const EVENTS: u64 = 300;
    for (_, sim) in &c.portals {
        emit_deals(sim, 1, EVENTS);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let its_portals = c
        .owners()
        .remove(&cut_id)
        .expect("the cut instance owns portals");
    let before = acquired_at(&c);

    proxy.blackhole();
    let holed_at = Instant::now();
    let holed_wall = Utc::now();
    wait_for(
        "the blackholed instance's portals owned by the other two",
        TTL * 5,
        || {
            let owners = c.owners();
            !owners.contains_key(&cut_id) && owners.values().map(Vec::len).sum::<usize>() == 6
        },
    )
    .await;
    let taken_over = holed_at.elapsed();
    // Each of its portals: its work stopped by itself (the lease clock ran out without a
    // renewal), before another instance could take the lease, which needs it expired.
    let after = acquired_at(&c);
    let mut fenced_in = Vec::new();
    for portal in &its_portals {
        let fenced = logged_at(&cut_log, "stopping its work (self-fencing)", portal)
            .unwrap_or_else(|| {
                panic!(
                    "{portal}: no self-fencing logged; log:\n{}",
                    std::fs::read_to_string(&cut_log).unwrap()
                )
            });
        assert!(after[portal] > before[portal], "{portal} taken again");
        assert!(
            fenced < after[portal],
            "{portal}: self-fenced at {fenced}, after the lease was taken at {}",
            after[portal]
        );
        assert!(
            fenced > holed_wall,
            "{portal}: fenced after the blackhole began"
        );
        fenced_in.push((fenced - holed_wall).num_milliseconds());
    }
    // Its journal operations end at their deadline (lease TTL, 10 s at least) instead of
    // hanging on the silent connections. The journal logs each abandoned operation itself: the
    // caller's error ("no answer within") is only logged when a caller is still waiting, and a
    // self-fenced portal's work may have stopped waiting before the deadline.
    wait_for(
        "the blackholed instance's journal operations abandoned at their deadline",
        Duration::from_secs(20),
        || {
            // An operation on a pooled connection ends at the deadline (the journal logs
            // that itself); one that needed a new connection may end at the connection's
            // timeout instead, as long.
            let log = std::fs::read_to_string(&cut_log).unwrap_or_default();
            log.contains("journal operation abandoned at its deadline")
                || log.contains("(connect_timeout)")
        },
    )
    .await;
    let holed_for = holed_at.elapsed();
    proxy.lift();
    let lifted_at = Instant::now();
    wait_for(
        "the healed instance rejoins: 2 portals each again",
        Duration::from_secs(30),
        || c.balanced(3),
    )
    .await;
    let rejoined = lifted_at.elapsed();
    c.drained(Duration::from_secs(60)).await;
    let duplicates = c.every_event_delivered(EVENTS);
    eprintln!(
        "blackhole of the owner of {} portals for {:.1} s: self-fenced {:?} ms after it began, portals owned by the others after {:.1} s (TTL {} s); rejoined {:.1} s after it lifted; {} events delivered, {duplicates} duplicates",
        its_portals.len(),
        holed_for.as_secs_f64(),
        fenced_in,
        taken_over.as_secs_f64(),
        TTL.as_secs(),
        rejoined.as_secs_f64(),
        6 * EVENTS
    );

    // A stop while blackholed ends in bounded time: nothing waits for the silent server
    // longer than the drain's deadlines.
    for (_, sim) in &c.portals {
        emit_deals(sim, EVENTS + 1, 50);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.blackhole();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (code, took) = stop_within(
        &mut cut,
        &cut_log,
        SHUTDOWN_TIMEOUT + SILENT_JOURNAL_TAIL + SLACK,
    )
    .await;
    proxy.lift();
    eprintln!(
        "SIGTERM while blackholed: exited {code:?} after {:.1} s (shutdown_timeout {} s); {}",
        took.as_secs_f64(),
        SHUTDOWN_TIMEOUT.as_secs(),
        stop_summary(&cut_log)
    );
    assert_eq!(
        code,
        Some(0),
        "a stop while blackholed exits 0; log:\n{}",
        std::fs::read_to_string(&cut_log).unwrap()
    );
    assert!(
        std::fs::read_to_string(&cut_log).unwrap().contains(
            "stopping without the final settle and the lease release: the journal does not answer"
        ),
        "the silent journal was noticed before the settle"
    );
    wait_for("the two others own every portal", TTL * 5, || c.balanced(2)).await;
    c.drained(Duration::from_secs(60)).await;
    c.every_event_delivered(EVENTS + 50);
    for (mut daemon, log) in others.drain(..) {
        stop_with_sigterm(&mut daemon, &log);
    }
    c.drop_schema();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs initdb and pg_ctl (a PostgreSQL server of its own) and runs three daemons"]
async fn every_instance_recovers_from_a_server_restart_and_a_stop_mid_drain() {
    let server = PrivatePostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let c = cluster_on(dir.path(), 6, &server.url()).await;
    let mut daemons: Vec<(Daemon, PathBuf)> =
        (0..3).map(|n| spawn(dir.path(), &c.config, n)).collect();
    wait_for(
        "6 portals owned, 2 by each instance",
        Duration::from_secs(30),
        || c.balanced(3),
    )
    .await;
    wait_for(
        "every instance holding the instance lock",
        Duration::from_secs(5),
        || instance_lock_holders(&c) == 3,
    )
    .await;
    // The test's own connections break with the server too: wait until it answers again.
    let answers = |c: &Cluster| c.journal.sql_rows("SELECT 1").is_ok();

    const EVENTS: u64 = 300;
    for (_, sim) in &c.portals {
        emit_deals(sim, 1, EVENTS);
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let started = Instant::now();
    server.restart_fast();
    let restart_took = started.elapsed();
    wait_for(
        "the test's connection to answer",
        Duration::from_secs(10),
        || answers(&c),
    )
    .await;
    let restarted = db_now(&c);
    // The restart ended every session and with them every instance lock: each daemon takes
    // its lock again, so the conformance probe stays kept out.
    wait_for(
        "every instance holding the instance lock again after the restart",
        Duration::from_secs(5),
        || instance_lock_holders(&c) == 3,
    )
    .await;
    let relocked_restart = started.elapsed();
    wait_for(
        "every instance working its share again after the restart",
        Duration::from_secs(30),
        || back_to_work(&c, 3, &restarted),
    )
    .await;
    let recovered_restart = started.elapsed();

    // A stop of a few seconds: every connection refused meanwhile.
    for (_, sim) in &c.portals {
        emit_deals(sim, EVENTS + 1, 100);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stopped = Instant::now();
    server.stop_fast();
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    server.start_again();
    let down_for = stopped.elapsed();
    wait_for(
        "the test's connection to answer",
        Duration::from_secs(10),
        || answers(&c),
    )
    .await;
    let started_again = db_now(&c);
    wait_for(
        "every instance holding the instance lock again after the stop",
        Duration::from_secs(5),
        || instance_lock_holders(&c) == 3,
    )
    .await;
    let relocked_stop = stopped.elapsed();
    wait_for(
        "every instance working its share again after the stop",
        Duration::from_secs(30),
        || back_to_work(&c, 3, &started_again),
    )
    .await;
    let recovered_stop = stopped.elapsed();
    c.drained(Duration::from_secs(60)).await;
    let duplicates = c.every_event_delivered(EVENTS + 100);
    for (daemon, log) in daemons.iter_mut() {
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "every instance still runs; log:\n{}",
            std::fs::read_to_string(log).unwrap()
        );
    }
    eprintln!(
        "server restart (fast, {:.1} s) mid-drain: every instance back to its share {:.1} s after it began, every instance lock held again after {:.1} s; server stopped for {:.1} s: back {:.1} s after the stop began, locks held again after {:.1} s; {} events delivered, {duplicates} duplicates",
        restart_took.as_secs_f64(),
        recovered_restart.as_secs_f64(),
        relocked_restart.as_secs_f64(),
        down_for.as_secs_f64(),
        recovered_stop.as_secs_f64(),
        relocked_stop.as_secs_f64(),
        6 * (EVENTS + 100)
    );
    for (mut daemon, log) in daemons.drain(..) {
        stop_with_sigterm(&mut daemon, &log);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test)"]
async fn a_daemon_started_against_a_silent_server_exits_naming_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path(), 1).await;
    // The server's address accepts connections and never answers (a blackholed route).
    let url = journal_url(&c.config);
    let (upstream, _) = reroute(&url, None);
    let proxy = TcpProxy::start(&upstream).await;
    proxy.blackhole();
    let (_, proxied) = reroute(&url, Some(proxy.addr()));
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
    let separator = if proxied.contains('?') { '&' } else { '?' };
    let silent = format!(
        "{proxied}{separator}connect_timeout={}",
        CONNECT_TIMEOUT.as_secs()
    );
    let config = dir.path().join("config-silent.toml");
    let text = std::fs::read_to_string(&c.config).unwrap();
    std::fs::write(&config, text.replacen(&url, &silent, 1)).unwrap();
    let log = dir.path().join("daemon.log");
    let started = Instant::now();
    let mut daemon = spawn_daemon(&config, &log);
    // Given up after connect_timeout; the rest is the process starting and ending.
    let bound = CONNECT_TIMEOUT + Duration::from_secs(3);
    let code = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status.code();
        }
        assert!(
            started.elapsed() < bound,
            "the daemon still waits for the silent server {bound:?} after its start; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = started.elapsed();
    let text = std::fs::read_to_string(&log).unwrap();
    let error = text
        .lines()
        .find(|l| l.starts_with("b24eventd: "))
        .unwrap_or_else(|| panic!("no error printed; log:\n{text}"));
    eprintln!("start against a silent server: exit {code:?} after {took:?}: {error}");
    assert!(
        matches!(code, Some(code) if code != 0),
        "exit {code:?}; log:\n{text}"
    );
    // Lowercase, naming the journal (once) and what it waited for.
    assert!(
        error.starts_with("b24eventd: cannot open journal postgres")
            && error.matches(&proxy.addr().to_string()).count() == 1
            && error.contains(&format!(
                "no connection: the server did not answer within {CONNECT_TIMEOUT:?} (connect_timeout)"
            )),
        "{error}"
    );
    assert!(
        took >= CONNECT_TIMEOUT,
        "given up after {took:?}, before connect_timeout"
    );
    c.drop_schema();
}
