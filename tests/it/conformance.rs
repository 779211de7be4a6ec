//! The conformance probe (`doctor --conformance`) on the real binary against the simulator, and
//! what the daemon does with its findings: a faithful portal passes every check and keeps
//! nothing of the probe; a portal that clamps `get`'s limit or ignores clear by `message_id`
//! is found out, and the daemon then caps `batch_size` or clears by `id` and still drains; a
//! refusing finding stops `run` with exit 78; the daemon lock keeps the probe and a second `run`
//! away from a journal the daemon works.

use crate::support::*;
use b24eventd::bitrix::Tokens;
use b24eventd::conformance::{Check, Finding};
use b24eventd_simulator::{Simulator, SimulatorConfig};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn report(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is one JSON document ({e}):\n{}\nstderr:\n{}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

/// The finding `check` of a probe report.
fn finding<'a>(report: &'a Value, check: &str) -> &'a Value {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no finding {check} in {report:#}"))
}

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    config: PathBuf,
}

/// A config for portal `main` on `sim` (with `extra` in `[portals.main]`) and a journal holding
/// its tokens.
async fn setup(sim: &Simulator, tokens: &Tokens, extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let config = write_config(&path, sim, None, extra, &file_sink(&path));
    open_journal(&path)
        .await
        .save_tokens("main", tokens)
        .await
        .unwrap();
    Setup {
        _dir: dir,
        dir: path,
        config,
    }
}

async fn probe(setup: &Setup) -> Output {
    crate::support::cli::b24eventd(
        &[
            "-c",
            setup.config.to_str().unwrap(),
            "doctor",
            "--conformance",
            "--portal",
            "main",
            "--json",
        ],
        None,
    )
    .await
}

/// The application's handlers as `event.get` lists them.
async fn bindings(sim: &Simulator) -> Vec<Value> {
    let (access, _) = sim.issue_tokens();
    let body: Value = reqwest::Client::new()
        .post(format!("{}event.get", sim.client_endpoint()))
        .json(&json!({"auth": access}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["result"].as_array().unwrap().clone()
}

/// The probe left no row and no binding of its own behind (the daemon's stand).
async fn assert_nothing_left(sim: &Simulator) {
    let rows = sim.rows();
    assert!(
        rows.iter()
            .all(|r| r.connector_id.is_empty() && r.event_name != "ONAPPTEST"),
        "probe rows left: {rows:?}"
    );
    let handlers = bindings(sim).await;
    assert!(
        handlers.iter().all(|h| h["event"] != "ONAPPTEST"
            && !h["connector_id"]
                .as_str()
                .unwrap_or("")
                .starts_with("b24eventd-probe-")),
        "{handlers:?}"
    );
    assert_eq!(
        handlers.len(),
        EVENTS.len(),
        "the daemon's bindings: {handlers:?}"
    );
}

#[tokio::test]
async fn the_probe_finds_a_faithful_portal_conformant_and_leaves_nothing_behind() {
    init();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    // A row in the daemon's own queue (connector ''): the probe must not touch it.
    sim.emit_change("ONCRMDEALUPDATE", 7);
    let daemons_row: Vec<(i64, String, String)> = sim
        .rows()
        .iter()
        .map(|r| (r.id, r.process_id.clone(), r.timestamp_x.clone()))
        .collect();
    let s = setup(&sim, &tokens, "").await;
    let out = probe(&s).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let doc = report(&out);
    for check in Check::ALL {
        let f = finding(&doc, check.name());
        assert_eq!(f["status"], "ok", "{f}");
        assert!(!f["source"].as_str().unwrap().is_empty(), "{f}");
    }
    assert_eq!(finding(&doc, "get_limit_above_50")["value"], 60);
    assert_eq!(doc["daemon"]["effective_batch_size"], 50);
    assert_eq!(doc["daemon"]["clear_by"], "message_id");
    assert_eq!(doc["daemon"]["reserved_listing"], "works");
    assert_eq!(doc["daemon"]["refuses"], Value::Null);
    assert_eq!(doc["summary"], json!({"ok": 18, "fail": 0, "skipped": 0}));
    assert!(
        doc["connector"]
            .as_str()
            .unwrap()
            .starts_with("b24eventd-probe-")
    );
    assert!(sim.stats().event_tests >= 64, "rows came from event.test");
    let now: Vec<(i64, String, String)> = sim
        .rows()
        .iter()
        .map(|r| (r.id, r.process_id.clone(), r.timestamp_x.clone()))
        .collect();
    assert_eq!(now, daemons_row, "the daemon's row is as it was");
    assert_nothing_left(&sim).await;
    let journal = open_journal(&s.dir).await;
    let stored = journal.conformance("main").await.unwrap();
    assert_eq!(stored.len(), Check::ALL.len());
    assert!(stored.iter().all(|f| f.status == "ok"), "{stored:?}");
    drop(journal);
    // The table says the same to a person.
    let out = crate::support::cli::b24eventd(
        &[
            "-c",
            s.config.to_str().unwrap(),
            "doctor",
            "--conformance",
            "--portal",
            "main",
        ],
        None,
    )
    .await;
    let table = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{table}");
    assert!(table.contains("18 ok, 0 failed, 0 skipped"), "{table}");
    assert!(table.contains("clears by message_id"), "{table}");
    assert_nothing_left(&sim).await;
}

#[tokio::test]
async fn a_limit_clamp_is_found_and_the_daemon_caps_batch_size_and_drains() {
    init();
    let (sim, tokens) = portal(SimulatorConfig {
        get_limit_clamp: Some(50),
        ..SimulatorConfig::default()
    })
    .await;
    let s = setup(&sim, &tokens, "batch_size = 100\nmax_unsettled = 1000").await;
    let out = probe(&s).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("1 check failed"),
        "{}",
        text(&out.stderr)
    );
    let doc = report(&out);
    let limit = finding(&doc, "get_limit_above_50");
    assert_eq!(limit["status"], "fail", "{limit}");
    assert_eq!(limit["value"], 50);
    assert!(limit["observed"].as_str().unwrap().contains("returned 50"));
    assert_eq!(doc["daemon"]["configured_batch_size"], 100);
    assert_eq!(doc["daemon"]["effective_batch_size"], 50);
    assert!(sim.rows().is_empty(), "the probe cleaned up");
    let probe_largest = sim.stats().largest_get_limit;
    assert_eq!(probe_largest, 60, "the probe's own get");

    emit_deals(&sim, 1, 600);
    let running = Running::start(&s.config, &tokens).await;
    wait_for("the queue drained", Duration::from_secs(60), || {
        upstream_empty(&sim)
    })
    .await;
    wait_for("nothing unsettled", Duration::from_secs(30), || {
        running
            .journal
            .counts_blocking()
            .unwrap()
            .unsettled_upstream
            == 0
    })
    .await;
    let largest_batch: i64 = sql_count(
        &running.journal,
        "SELECT MAX(c) AS n FROM (SELECT COUNT(*) AS c FROM events GROUP BY batch_id) per_batch",
    );
    running.stop().await;
    assert!(largest_batch <= 50, "a reservation of {largest_batch}");
    assert_eq!(
        sim.stats().largest_get_limit,
        probe_largest,
        "the daemon never asked a get for more than the clamp (configured batch_size 100)"
    );
    let delivered = file_ids(&s.dir.join("events.jsonl"));
    assert_eq!(delivered.len(), 600);
}

#[tokio::test]
async fn ignored_clear_by_message_id_is_found_and_the_daemon_clears_by_id() {
    init();
    let (sim, tokens) = portal(SimulatorConfig {
        clear_ignores_message_id: true,
        ..SimulatorConfig::default()
    })
    .await;
    let s = setup(&sim, &tokens, "").await;
    let out = probe(&s).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let doc = report(&out);
    assert_eq!(finding(&doc, "clear_by_message_id")["status"], "fail");
    assert_eq!(finding(&doc, "clear_by_id")["status"], "ok");
    assert_eq!(doc["daemon"]["clear_by"], "id");
    assert_eq!(doc["daemon"]["refuses"], Value::Null);
    assert!(
        sim.rows().is_empty(),
        "the probe cleaned up: {:?}",
        sim.rows()
    );
    let ignored_by_probe = sim.stats().ignored_message_id_clears;

    emit_deals(&sim, 1, 300);
    let running = Running::start(&s.config, &tokens).await;
    wait_for("the queue drained", Duration::from_secs(60), || {
        upstream_empty(&sim)
    })
    .await;
    wait_for("nothing unsettled", Duration::from_secs(30), || {
        running
            .journal
            .counts_blocking()
            .unwrap()
            .unsettled_upstream
            == 0
    })
    .await;
    running.stop().await;
    assert_eq!(
        sim.stats().ignored_message_id_clears,
        ignored_by_probe,
        "the daemon sent no clear by message_id"
    );
    assert_eq!(file_ids(&s.dir.join("events.jsonl")).len(), 300);
}

#[tokio::test]
async fn a_refusing_finding_stops_run_with_78_naming_it() {
    init();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let s = setup(&sim, &tokens, "").await;
    let at = chrono::DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let journal = open_journal(&s.dir).await;
    journal
        .replace_conformance(
            "main",
            vec![
                Finding::ok(Check::Reserve, "fine").to_stored("feedbeef", at),
                Finding::fail(
                    Check::ReservationHides,
                    "a second get returned rows [1, 2, 3] already reserved",
                )
                .to_stored("feedbeef", at),
            ],
        )
        .await
        .unwrap();
    drop(journal);
    emit_deals(&sim, 1, 10);
    // A daemon that does not refuse would run on: stop it after a minute instead of hanging.
    let mut child = Command::new(env!("CARGO_BIN_EXE_b24eventd"))
        .args(["-c", s.config.to_str().unwrap(), "run"])
        .env_remove("B24EVENTD_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("run did not refuse the portal within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    for part in [
        "reservation_hides",
        "a second get returned rows [1, 2, 3] already reserved",
        "2026-11-23T10:00:00Z",
        "run feedbeef",
        "doctor --conformance --portal main --json",
    ] {
        assert!(stderr.contains(part), "{part:?} missing from: {stderr}");
    }
    assert_eq!(sim.stats().reserved, 0, "nothing was fetched");
    assert_eq!(sim.stats().queued, 10);
}

#[tokio::test]
async fn the_daemon_lock_keeps_the_probe_and_a_second_run_away() {
    init();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let s = setup(&sim, &tokens, "").await;
    let log = s.dir.join("daemon.log");
    let mut daemon = crate::support::daemon::spawn_daemon(&s.config, &log);
    wait_for("the daemon runs", Duration::from_secs(30), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("b24eventd running")
    })
    .await;
    let pid = daemon.id().to_string();
    // SQLite: the lock file beside the journal; PostgreSQL: the lock's session names the holder.
    let lock = if b24eventd::journal::test_support::postgres_url().is_some() {
        String::new()
    } else {
        format!("{}.lock", s.dir.join("journal.db").display())
    };
    let probe_out = probe(&s).await;
    let stderr = text(&probe_out.stderr);
    assert_eq!(probe_out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("pid {pid}")) && stderr.contains(&lock),
        "{stderr}"
    );
    assert_eq!(sim.stats().event_tests, 0, "the probe touched nothing");
    assert!(
        bindings(&sim)
            .await
            .iter()
            .all(|h| h["event"] != "ONAPPTEST")
    );
    // SQLite: a second `run` is refused. On PostgreSQL it joins the first as a second instance
    // of a cluster (docs/CLUSTER.md; tests/it/cluster.rs), so only the probe is refused here.
    if b24eventd::journal::test_support::postgres_url().is_none() {
        let second =
            crate::support::cli::b24eventd(&["-c", s.config.to_str().unwrap(), "run"], None).await;
        let stderr = text(&second.stderr);
        assert_eq!(second.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!("pid {pid}")) && stderr.contains(&lock),
            "{stderr}"
        );
    }
    crate::support::daemon::stop_with_sigterm(&mut daemon, &log);
    // Once the daemon is gone the probe runs.
    let out = probe(&s).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[tokio::test]
async fn an_ignored_process_id_filter_is_found_and_the_sweep_reads_the_whole_queue() {
    init();
    let (sim, tokens) = portal(SimulatorConfig {
        list_ignores_process_id_filter: true,
        ..SimulatorConfig::default()
    })
    .await;
    let s = setup(&sim, &tokens, "").await;
    let out = probe(&s).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let doc = report(&out);
    assert_eq!(finding(&doc, "list_reserved_filter")["status"], "fail");
    assert_eq!(doc["daemon"]["reserved_listing"], "broken");
    assert_eq!(doc["daemon"]["refuses"], Value::Null);

    // A reservation nobody journaled (an earlier run's lost answer), behind 100 unreserved
    // rows: with the filter ignored, the listing's first page ordered by PROCESS_ID holds only
    // unreserved rows, and a sweep that trusts the filter never gets to the orphan.
    emit_deals(&sim, 1, 130);
    let (access, _) = sim.issue_tokens();
    let orphan: Value = reqwest::Client::new()
        .post(format!("{}event.offline.get", sim.client_endpoint()))
        .json(&json!({"auth": access, "clear": 0, "limit": 30}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let orphan_pid = orphan["result"]["process_id"].as_str().unwrap().to_string();
    // The sink refuses everything at first, so that at most 50 events are reserved and 50
    // stay unreserved upstream while the sweeps run.
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = up.clone();
    let endpoint = Endpoint::start(std::sync::Arc::new(move |_| {
        if flag.load(std::sync::atomic::Ordering::SeqCst) {
            200
        } else {
            503
        }
    }))
    .await;
    write_config(
        &s.dir,
        &sim,
        None,
        "max_unsettled = 80",
        &http_sink(&endpoint.url),
    );
    let running = Running::start(&s.config, &tokens).await;
    let adopted = || -> Vec<String> {
        sql_rows(
            &running.journal,
            "SELECT process_id FROM batches WHERE origin = 'adopted'",
        )
        .iter()
        .map(|r| sql_text(r, "process_id").unwrap())
        .collect()
    };
    wait_for("the orphan adopted", Duration::from_secs(30), || {
        !adopted().is_empty()
    })
    .await;
    assert_eq!(adopted(), vec![orphan_pid]);
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_for("all 130 drained", Duration::from_secs(60), || {
        upstream_empty(&sim)
            && running
                .journal
                .counts_blocking()
                .unwrap()
                .unsettled_upstream
                == 0
    })
    .await;
    running.stop().await;
    assert_eq!(endpoint.accepted_entities(), expected_entities(1, 130));
}
