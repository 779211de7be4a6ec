//! The operator's commands against the real daemon binary and the portal simulator: `journal
//! stats|list|show|tail`, `dead list|retry|purge`, `replay`, `prune`, and SIGHUP reload.

use crate::support::daemon::{signal, spawn_daemon, stop_with_sigterm};
use crate::support::*;
use b24eventd_simulator::SimulatorConfig;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::process::Command;

fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_b24eventd"));
    cmd.env_remove("B24EVENTD_CONFIG").stdin(Stdio::null());
    cmd
}

/// Runs one CLI command to its end.
async fn cli(config: &Path, args: &[&str]) -> Output {
    binary()
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .await
        .expect("the binary runs")
}

/// Runs a command that must succeed and print JSON.
async fn cli_json(config: &Path, args: &[&str]) -> Value {
    let out = cli(config, args).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "b24eventd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "b24eventd {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The journal counts as the daemon's peer would read them (`journal stats --json`).
async fn stats(config: &Path) -> Value {
    cli_json(config, &["journal", "stats", "--json"]).await
}

fn portal_stat(stats: &Value, key: &str) -> u64 {
    stats["portals"][0][key].as_u64().unwrap_or(0)
}

fn sink_stat(stats: &Value, sink: &str, key: &str) -> u64 {
    stats["portals"][0]["sinks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["sink"] == sink)
        .map(|s| s[key].as_u64().unwrap())
        .unwrap_or(0)
}

async fn wait_until(what: &str, timeout: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let start = std::time::Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn ids_of(events: &Value) -> Vec<String> {
    events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    log: PathBuf,
}

/// A journal with tokens for the simulator, and a config with the sinks `sinks(dir)` gives.
async fn setup(
    sim: &b24eventd_simulator::Simulator,
    tokens: &b24eventd::bitrix::Tokens,
    sinks: impl FnOnce(&Path) -> String,
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), sim, None, "", &sinks(dir.path()));
    let loaded = b24eventd::config::load(&config).unwrap();
    let journal = b24eventd::journal::Journal::open_configured(
        &loaded.journal,
        b24eventd::journal::Access::Create,
    )
    .await
    .unwrap();
    journal.save_tokens("main", tokens).await.unwrap();
    drop(journal);
    let log = dir.path().join("daemon.log");
    Setup { dir, config, log }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_dead_and_prune_commands_on_a_live_journal() {
    init();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    // The ERP refuses deal 7 (422) until it is "fixed".
    let fixed = Arc::new(AtomicBool::new(false));
    let gate = fixed.clone();
    let endpoint = Endpoint::start(Arc::new(move |v: &Value| {
        if v["data"]["FIELDS"]["ID"] == "7" && !gate.load(Ordering::SeqCst) {
            422
        } else {
            200
        }
    }))
    .await;
    let s = setup(&sim, &tokens, |dir| {
        format!("{}\n{}", file_sink(dir), http_sink(&endpoint.url))
    })
    .await;
    let config = s.config.as_path();
    let mut daemon = spawn_daemon(config, &s.log);

    // Deal 7 dies, is reported with event.offline.error, comes back from the error lane (a
    // second journal row with the same envelope id, for erp only: the archive has it), dies
    // again and is cleared.
    emit_deals(&sim, 1, 50);
    wait_until(
        "every event final and the portal empty",
        Duration::from_secs(60),
        async || {
            let st = stats(config).await;
            // The portal empties its queue before its answer reaches the journal: both.
            upstream_empty(&sim)
                && portal_stat(&st, "delivered") == 49
                && portal_stat(&st, "dead") == 2
                && portal_stat(&st, "pending") == 0
                && portal_stat(&st, "upstream_unsettled") == 0
        },
    )
    .await;

    // stats: per portal and per sink, read while the daemon runs.
    let st = stats(config).await;
    assert_eq!(portal_stat(&st, "events"), 51);
    assert_eq!(portal_stat(&st, "upstream_unsettled"), 0);
    assert_eq!(
        sink_stat(&st, "archive", "delivered"),
        50,
        "the error-lane copy of deal 7 does not go to the archive again"
    );
    assert_eq!(sink_stat(&st, "erp", "delivered"), 49);
    assert_eq!(sink_stat(&st, "erp", "dead"), 2);
    let human = cli(config, &["journal", "stats"]).await;
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("PORTAL") && human.contains("erp"), "{human}");

    // list: the newest N, oldest first; filters narrow.
    let listed = cli_json(config, &["journal", "list", "--limit", "5", "--json"]).await;
    let rows: Vec<i64> = listed["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["row"].as_i64().unwrap())
        .collect();
    assert_eq!(rows.len(), 5);
    assert!(
        rows.windows(2).all(|w| w[0] < w[1]),
        "oldest first: {rows:?}"
    );
    let adds = cli_json(
        config,
        &["journal", "list", "--event", "ONCRMDEALADD", "--json"],
    )
    .await;
    assert_eq!(ids_of(&adds).len(), 25);
    let dead = cli_json(
        config,
        &[
            "journal", "list", "--status", "dead", "--sink", "erp", "--json",
        ],
    )
    .await;
    let dead_ids = ids_of(&dead);
    assert_eq!(dead_ids.len(), 2);
    assert_eq!(dead_ids[0], dead_ids[1], "one deal, fetched twice");
    let dead_id = dead_ids[0].clone();

    // show: the envelope, each attempt with its error, the upstream settlement.
    let shown = cli_json(config, &["journal", "show", &dead_id, "--json"]).await;
    assert_eq!(shown["events"].as_array().unwrap().len(), 2);
    assert_eq!(
        shown["events"][1]["upstream"]["state"], "cleared",
        "the error lane's copy"
    );
    let event = &shown["events"][0];
    assert_eq!(event["envelope"]["id"], dead_id.as_str());
    assert_eq!(event["envelope"]["data"]["FIELDS"]["ID"], "7");
    assert_eq!(event["status"], "dead");
    assert_eq!(
        event["upstream"]["state"], "errored",
        "reported with event.offline.error"
    );
    let erp = event["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["sink"] == "erp")
        .unwrap();
    assert_eq!(erp["status"], "dead");
    assert!(erp["last_error"].as_str().unwrap().contains("422"), "{erp}");
    assert!(
        event["attempts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["outcome"] == "dead")
    );
    let human = cli(config, &["journal", "show", &dead_id]).await;
    assert!(String::from_utf8_lossy(&human.stdout).contains("422"));
    let missing = cli(config, &["journal", "show", "main:999999"]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no event main:999999"));

    // tail: follows new events live.
    let mut tail = binary()
        .arg("-c")
        .arg(config)
        .args(["journal", "tail", "--limit", "0", "--json"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    emit_deals(&sim, 101, 5);
    let mut lines = tokio::io::BufReader::new(tail.stdout.take().unwrap()).lines();
    let mut tailed = Vec::new();
    while tailed.len() < 5 {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("tail prints new events")
            .unwrap()
            .expect("tail keeps running");
        let v: Value = serde_json::from_str(&line).unwrap();
        tailed.push(v["event"].as_str().unwrap().to_string());
    }
    signal(tail.id().expect("still running"), "INT");
    let status = tokio::time::timeout(Duration::from_secs(5), tail.wait())
        .await
        .expect("tail stops on SIGINT")
        .unwrap();
    assert_eq!(status.code(), Some(0));

    // dead list, then retry after fixing the sink: delivered.
    let dead = cli_json(config, &["dead", "list", "--json"]).await;
    assert_eq!(ids_of(&dead), vec![dead_id.clone(), dead_id.clone()]);
    fixed.store(true, Ordering::SeqCst);
    let retried = cli_json(config, &["dead", "retry", "--sink", "erp", "--json"]).await;
    assert_eq!(
        (retried["events"].as_u64(), retried["deliveries"].as_u64()),
        (Some(2), Some(2))
    );
    wait_until(
        "the retried event reaches the fixed ERP",
        Duration::from_secs(20),
        async || endpoint.accepted_ids().contains(&dead_id),
    )
    .await;
    wait_until(
        "the retries are journaled",
        Duration::from_secs(10),
        async || {
            let shown = cli_json(config, &["journal", "show", &dead_id, "--json"]).await;
            shown["events"]
                .as_array()
                .unwrap()
                .iter()
                .all(|e| e["status"] == "delivered")
        },
    )
    .await;
    assert!(ids_of(&cli_json(config, &["dead", "list", "--json"]).await).is_empty());
    stop_with_sigterm(&mut daemon, &s.log);

    // prune: every settled event is older than 0s, and none is pending or dead.
    let before = portal_stat(&stats(config).await, "events");
    assert!(before >= 56, "{before}");
    let pruned = cli_json(config, &["prune", "--older-than", "0s", "--json"]).await;
    assert_eq!(pruned["events"].as_u64(), Some(before));
    assert!(pruned["batches"].as_u64().unwrap() >= 1);
    let st = stats(config).await;
    assert_eq!(portal_stat(&st, "events"), 0);
    let empty = cli(config, &["journal", "list"]).await;
    assert_eq!(empty.status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_of_a_date_range_delivers_exactly_that_range_again() {
    init();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let s = setup(&sim, &tokens, file_sink).await;
    let jsonl = s.dir.path().join("events.jsonl");
    let config = s.config.as_path();
    let mut daemon = spawn_daemon(config, &s.log);

    let mut marks = Vec::new();
    for wave in 0..3u64 {
        emit_deals(&sim, 1 + wave * 30, 30);
        wait_until("the wave delivered", Duration::from_secs(30), async || {
            file_ids(&jsonl).len() == 30 * (wave as usize + 1) && upstream_empty(&sim)
        })
        .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        marks.push(chrono::Utc::now().to_rfc3339());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let range = ["--since", marks[0].as_str(), "--until", marks[1].as_str()];
    let mut args = vec!["replay"];
    args.extend(range);
    args.extend(["--dry-run", "--json"]);
    let dry = cli_json(config, &args).await;
    let planned = ids_of(&dry);
    assert_eq!(planned.len(), 30, "the second wave only");
    assert_eq!(file_ids(&jsonl).len(), 90, "a dry run changes nothing");

    let unfiltered = cli(config, &["replay"]).await;
    assert_eq!(unfiltered.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unfiltered.stderr).contains("--all"));

    let mut args = vec!["replay"];
    args.extend(range);
    args.push("--json");
    let done = cli_json(config, &args).await;
    assert_eq!(
        (done["events"].as_u64(), done["deliveries"].as_u64()),
        (Some(30), Some(30))
    );
    wait_until(
        "the replayed range delivered again",
        Duration::from_secs(30),
        async || file_ids(&jsonl).values().sum::<usize>() == 120,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lines = file_ids(&jsonl);
    assert_eq!(
        lines.values().sum::<usize>(),
        120,
        "nothing else was replayed"
    );
    let twice: Vec<String> = lines
        .iter()
        .filter(|(_, n)| **n == 2)
        .map(|(id, _)| id.clone())
        .collect();
    let mut planned_sorted = planned.clone();
    planned_sorted.sort();
    assert_eq!(twice, planned_sorted, "exactly the range, once more");
    let shown = cli_json(config, &["journal", "show", &planned[0], "--json"]).await;
    assert_eq!(shown["events"][0]["deliveries"][0]["replays"], 1);
    assert_eq!(
        shown["events"][0]["upstream"]["state"], "cleared",
        "a replay is local"
    );
    stop_with_sigterm(&mut daemon, &s.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_sink_without_a_restart_and_ignores_a_bad_config() {
    init();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let s = setup(&sim, &tokens, file_sink).await;
    let base = std::fs::read_to_string(&s.config).unwrap();
    let config = s.config.as_path();
    let archive = s.dir.path().join("events.jsonl");
    let second = s.dir.path().join("second.jsonl");
    let mut daemon = spawn_daemon(config, &s.log);

    emit_deals(&sim, 1, 20);
    wait_until(
        "first wave delivered",
        Duration::from_secs(30),
        async || file_ids(&archive).len() == 20 && upstream_empty(&sim),
    )
    .await;

    // A config that does not validate is logged and ignored.
    std::fs::write(
        config,
        base.replace("poll_interval = \"200ms\"", "poll_interval = \"soon\""),
    )
    .unwrap();
    signal(daemon.id(), "HUP");
    wait_until(
        "the bad reload is logged",
        Duration::from_secs(10),
        async || log_text(&s.log).contains("configuration reload rejected"),
    )
    .await;

    // Add a sink (only deals) and change a portal key, which needs a restart.
    let with_second = base.replace("poll_interval = \"200ms\"", "poll_interval = \"300ms\"")
        + &format!(
            "[sinks.second]\ntype = \"file\"\npath = \"{}\"\nevents = [\"ONCRMDEALUPDATE\"]\n",
            second.display()
        );
    std::fs::write(config, with_second).unwrap();
    signal(daemon.id(), "HUP");
    wait_until(
        "the reload is logged",
        Duration::from_secs(10),
        async || log_text(&s.log).contains("sinks and routes updated"),
    )
    .await;
    let log = log_text(&s.log);
    assert!(
        log.contains("only after a restart") && log.contains("portals.main"),
        "{log}"
    );

    emit_deals(&sim, 21, 20);
    wait_until(
        "second wave delivered to both sinks",
        Duration::from_secs(30),
        async || {
            file_ids(&archive).len() == 40 && file_ids(&second).len() == 10 && upstream_empty(&sim)
        },
    )
    .await;
    let second_entities = file_entities(&second);
    assert!(
        second_entities
            .iter()
            .all(|(event, id)| event == "ONCRMDEALUPDATE" && id.parse::<u64>().unwrap() > 20),
        "the new sink gets the new events its route wants: {second_entities:?}"
    );

    // History goes to the new sink with a replay aimed at it.
    let done = cli_json(
        config,
        &[
            "replay",
            "--sink",
            "second",
            "--event",
            "ONCRMDEALUPDATE",
            "--json",
        ],
    )
    .await;
    assert_eq!(done["events"].as_u64(), Some(20));
    wait_until(
        "history reaches the new sink",
        Duration::from_secs(30),
        async || file_ids(&second).len() == 20,
    )
    .await;
    assert_eq!(
        file_ids(&archive).values().sum::<usize>(),
        40,
        "the old sink got no replay"
    );
    stop_with_sigterm(&mut daemon, &s.log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_purge_deletes_settled_dead_events_only() {
    init();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let endpoint = Endpoint::start(Arc::new(|v: &Value| {
        if v["data"]["FIELDS"]["ID"] == "2" {
            422
        } else {
            200
        }
    }))
    .await;
    let s = setup(&sim, &tokens, |_| http_sink(&endpoint.url)).await;
    let config = s.config.as_path();
    let mut daemon = spawn_daemon(config, &s.log);
    emit_deals(&sim, 1, 5);
    wait_until(
        "deal 2 dead in both lanes, the rest delivered",
        Duration::from_secs(30),
        async || {
            let st = stats(config).await;
            upstream_empty(&sim)
                && portal_stat(&st, "dead") == 2
                && portal_stat(&st, "pending") == 0
        },
    )
    .await;
    stop_with_sigterm(&mut daemon, &s.log);

    let human = cli(config, &["dead", "list"]).await;
    let human = String::from_utf8_lossy(&human.stdout).into_owned();
    assert!(
        human.contains("LAST ERROR") && human.contains("422"),
        "{human}"
    );

    // `| head` closing the pipe early ends the command quietly, not with a panic.
    let mut closed = std::process::Command::new(env!("CARGO_BIN_EXE_b24eventd"))
        .arg("-c")
        .arg(config)
        .args(["journal", "list", "--json"])
        .env_remove("B24EVENTD_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(closed.stdout.take());
    let out = closed.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "nothing on stderr: {err}");
    // No filter: refused, nothing deleted, as `replay` refuses without --all.
    let refused = cli(config, &["dead", "purge"]).await;
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("give a filter") && err.contains("--all"),
        "{err}"
    );
    assert_eq!(
        ids_of(&cli_json(config, &["dead", "list", "--json"]).await).len(),
        2
    );
    let purged = cli_json(config, &["dead", "purge", "--all", "--json"]).await;
    assert_eq!(
        (purged["events"].as_u64(), purged["kept_unsettled"].as_u64()),
        (Some(2), Some(0))
    );
    assert!(ids_of(&cli_json(config, &["dead", "list", "--json"]).await).is_empty());
    let st = stats(config).await;
    assert_eq!(
        (portal_stat(&st, "events"), portal_stat(&st, "delivered")),
        (4, 4)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_backup_copies_the_live_journal_into_a_private_file() {
    use b24eventd::journal::{Access, EventFilter, Journal};
    use std::os::unix::fs::PermissionsExt;
    init();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let s = setup(&sim, &tokens, file_sink).await;
    let config = s.config.as_path();
    let mut daemon = spawn_daemon(config, &s.log);
    emit_deals(&sim, 1, 20);
    wait_until("20 events delivered", Duration::from_secs(30), async || {
        let st = stats(config).await;
        upstream_empty(&sim)
            && portal_stat(&st, "delivered") == 20
            && portal_stat(&st, "upstream_unsettled") == 0
    })
    .await;

    // Taken while the daemon runs (and holds the journal).
    let copy = s.dir.path().join("backup.db");
    if b24eventd::journal::test_support::postgres_url().is_some() {
        // A PostgreSQL journal is backed up with the database's tools; nothing is written.
        let refused = cli(config, &["journal", "backup", copy.to_str().unwrap()]).await;
        assert_eq!(refused.status.code(), Some(1));
        let err = String::from_utf8_lossy(&refused.stderr);
        assert!(err.contains("pg_dump --schema="), "{err}");
        assert!(!copy.exists());
        stop_with_sigterm(&mut daemon, &s.log);
        return;
    }
    let done = cli_json(
        config,
        &["journal", "backup", copy.to_str().unwrap(), "--json"],
    )
    .await;
    assert_eq!(
        done["bytes"].as_u64(),
        Some(std::fs::metadata(&copy).unwrap().len())
    );
    assert_eq!(
        std::fs::metadata(&copy).unwrap().permissions().mode() & 0o777,
        0o600,
        "the copy holds the tokens"
    );
    // An existing file is never overwritten.
    let before = std::fs::read(&copy).unwrap();
    let again = cli(config, &["journal", "backup", copy.to_str().unwrap()]).await;
    assert_eq!(again.status.code(), Some(1));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("cannot create backup"), "{err}");
    assert_eq!(std::fs::read(&copy).unwrap(), before);
    stop_with_sigterm(&mut daemon, &s.log);

    let loaded = b24eventd::config::load(config).unwrap();
    let live = Journal::open_configured_blocking(&loaded.journal, Access::Read).unwrap();
    let backup = Journal::open_blocking_as(&copy, loaded.journal.synchronous, Access::Read)
        .expect("the copy opens as a journal");
    let all = EventFilter::default();
    let rows = |j: &Journal| serde_json::to_value(j.list_events(&all).unwrap()).unwrap();
    assert_eq!(rows(&backup).as_array().map(Vec::len), Some(20));
    assert_eq!(rows(&backup), rows(&live));
    assert_eq!(
        serde_json::to_value(backup.stats(&all).unwrap()).unwrap(),
        serde_json::to_value(live.stats(&all).unwrap()).unwrap()
    );
    let stored = backup
        .load_tokens("main")
        .await
        .unwrap()
        .expect("tokens in the copy");
    assert_eq!(
        Some(stored.refresh_token),
        live.load_tokens("main")
            .await
            .unwrap()
            .map(|t| t.refresh_token)
    );
}
