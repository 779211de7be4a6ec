//! The operator commands that talk to the portal, on the real binary against the simulator: `auth login|status`, `subscribe`/`unsubscribe`, `doctor` and `validate --online`.
//! `auth login`, `auth status`, `subscribe`, `unsubscribe`, `doctor`, `validate --online`.

use crate::support::cli::*;
use crate::support::*;
use b24eventd::bitrix::Tokens;
use b24eventd_simulator::{Simulator, SimulatorConfig};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is one JSON document ({e}):\n{}\nstderr:\n{}",
            stdout(o),
            stderr(o)
        )
    })
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The finding `check` of portal `portal` in a doctor report.
fn finding<'a>(report: &'a Value, portal: &str, check: &str) -> &'a Value {
    let checks = report["portals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["portal"] == portal)
        .unwrap_or_else(|| panic!("portal {portal} in {report:#}"))["checks"]
        .as_array()
        .unwrap();
    checks
        .iter()
        .find(|c| c["check"] == check)
        .unwrap_or_else(|| panic!("check {check} in {report:#}"))
}

fn checks_of(report: &Value, portal: &str) -> Vec<String> {
    report["portals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["portal"] == portal)
        .unwrap()["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap().to_string())
        .collect()
}

/// Offline rows the simulator queued for `event`, by connector.
fn queued_connectors(sim: &Simulator, event: &str) -> Vec<String> {
    let mut connectors: Vec<String> = sim
        .rows()
        .into_iter()
        .filter(|r| r.event_name == event)
        .map(|r| r.connector_id)
        .collect();
    connectors.sort();
    connectors.dedup();
    connectors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_login_exchanges_a_pasted_code_and_status_shows_no_tokens() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimulatorConfig::default()).await.unwrap();
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let config = path(&config).to_string();

    // Before any login: status says so, as a table and as JSON, and creates no journal.
    let out = b24eventd(&["-c", &config, "auth", "status"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("main"), "{}", stdout(&out));
    assert!(stdout(&out).contains("auth login"), "{}", stdout(&out));
    assert!(!dir.path().join("journal.db").exists());
    let status = json(&b24eventd(&["-c", &config, "auth", "status", "--json"], None).await);
    assert_eq!(status["portals"][0]["portal"], "main");
    assert_eq!(status["portals"][0]["tokens"], false);

    // A pasted redirect address for another portal, or of another attempt, stores nothing.
    let code = sim.authorization_code();
    let foreign = format!("https://app.example/handler/?code={code}&domain=other.bitrix24.com");
    let out = b24eventd(
        &["-c", &config, "auth", "login", "--portal", "main"],
        Some(&format!("{foreign}\n")),
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("other.bitrix24.com"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains(&code), "the code is never echoed");
    let out = b24eventd(
        &["-c", &config, "auth", "login", "--portal", "main"],
        Some(&format!("?code={code}&state=not-ours\n")),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("state does not match"),
        "{}",
        stderr(&out)
    );
    assert!(stored_tokens(dir.path()).await.is_none());

    // The whole redirected address, as the browser shows it.
    let member_id = SimulatorConfig::default().member_id;
    let host = sim.base_url().trim_start_matches("http://").to_string();
    let redirect = format!(
        "https://app.example/handler/?code={code}&domain={host}&member_id={member_id}&scope=crm&server_domain=oauth.bitrix.info"
    );
    let out = b24eventd(
        &["-c", &config, "auth", "login", "--portal", "main"],
        Some(&format!("{redirect}\n")),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with("stored tokens for portal main in ")
            && text.contains(&format!(
                "{} (member_id {member_id}, scope crm,",
                b24eventd::journal::test_support::test_journal_config(dir.path()).location()
            )),
        "{text}"
    );
    let shown = stderr(&out);
    assert!(
        shown.contains(&format!(
            "{}/oauth/authorize/?client_id=local.sim.0001&state=",
            sim.base_url()
        )),
        "the authorize address is printed: {shown}"
    );
    assert!(shown.contains("30 seconds"), "{shown}");
    let stored = stored_tokens(dir.path()).await.expect("tokens stored");
    assert_eq!(stored.member_id.as_deref(), Some(member_id.as_str()));
    for secret in [&stored.access_token, &stored.refresh_token] {
        assert!(!text.contains(secret.as_str()) && !shown.contains(secret.as_str()));
    }

    // A code works once: pasting it again fails with a hint about the 30 seconds.
    let out = b24eventd(
        &["-c", &config, "auth", "login", "--portal", "main"],
        Some(&format!("{code}\n")),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("invalid_grant"), "{}", stderr(&out));
    assert!(stderr(&out).contains("30 seconds"), "{}", stderr(&out));

    // A bare code works too, and replaces the pair.
    let out = b24eventd(
        &["-c", &config, "auth", "login", "--portal", "main"],
        Some(&format!("{}\n", sim.authorization_code())),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let replaced = stored_tokens(dir.path()).await.unwrap();
    assert_ne!(replaced.refresh_token, stored.refresh_token);

    // Nothing on stdin: a clear error, nothing changed.
    let out = b24eventd(
        &["-c", &config, "auth", "login", "--portal", "main"],
        Some(""),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("stdin ended"), "{}", stderr(&out));

    let out = b24eventd(&["-c", &config, "auth", "status", "--json"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let status = json(&out);
    let main = &status["portals"][0];
    assert_eq!(main["tokens"], true);
    assert_eq!(main["has_refresh_token"], true);
    assert_eq!(main["access_expired"], false);
    assert_eq!(main["member_id"], member_id.as_str());
    assert_eq!(main["scope"], "crm,task,user,placement,pull");
    assert_eq!(main["user_id"], 1);
    assert!(main["access_expires_at"].as_str().unwrap().ends_with('Z'));
    assert!(main["last_refresh_at"].as_str().is_some());
    let table = b24eventd(&["-c", &config, "auth", "status"], None).await;
    let table_text = stdout(&table);
    assert!(
        table_text.contains("yes") && table_text.contains(&member_id),
        "{table_text}"
    );
    for text in [stdout(&out), table_text] {
        assert!(!text.contains(&replaced.access_token) && !text.contains(&replaced.refresh_token));
    }
    assert_eq!(sim.stats().token_refreshes, 0, "status refreshes nothing");

    let out = b24eventd(
        &["-c", &config, "auth", "login", "--portal", "nope"],
        Some("x\n"),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("unknown portal nope: the config has main"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_login_round_trip_through_the_printed_address() {
    use std::io::{BufRead, BufReader};
    init();
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimulatorConfig::default()).await.unwrap();
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_b24eventd"))
        .args(["-c", path(&config), "auth", "login", "--portal", "main"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // Read the instructions until the authorization address, as an operator would; keep
    // draining stderr afterwards so the child never writes into a closed pipe.
    let (found, address) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(at) = line.find("http://") {
                let _ = found.send(line[at..].trim().to_string());
            }
        }
    });
    let address = tokio::task::spawn_blocking(move || {
        address
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the address is printed")
    })
    .await
    .unwrap();
    // The browser: the simulated portal grants at once and redirects with the code.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let answer = browser.get(&address).send().await.unwrap();
    assert_eq!(answer.status().as_u16(), 302, "{address}");
    let redirected = answer.headers()["location"].to_str().unwrap().to_string();
    assert!(
        redirected.contains("code=") && redirected.contains("state="),
        "{redirected}"
    );
    let page = browser.get(&redirected).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let out = tokio::task::spawn_blocking(move || {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(format!("{redirected}\n").as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).starts_with("stored tokens for portal main"),
        "{}",
        stdout(&out)
    );
    assert!(stored_tokens(dir.path()).await.is_some());

    // A client_id the portal does not know gets the portal's error page, not a code.
    let foreign = address.replace("client_id=local.sim.0001", "client_id=local.other");
    let page = browser.get(&foreign).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_binds_what_is_missing_reports_extras_and_prunes_them() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimulatorConfig::default()).await.unwrap();
    sim.bind_offline("ONCRMDEALADD", "");
    sim.bind_offline("ONTASKADD", "");
    // Another connector's binding of a configured event feeds another queue: not ours.
    sim.bind_offline("ONCRMDEALUPDATE", "other");
    let (access, refresh) = sim.issue_tokens();
    store_tokens(dir.path(), &Tokens::from_pair(access, refresh)).await;
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let config = path(&config);

    let out = b24eventd(&["-c", config, "subscribe", "--json"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows = json(&out);
    let actions: Vec<(String, String)> = rows["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["portal"], "main");
            assert_eq!(r["connector"], "");
            (
                r["event"].as_str().unwrap().to_string(),
                r["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![
            ("ONCRMDEALADD".to_string(), "already bound".to_string()),
            ("ONCRMDEALUPDATE".to_string(), "bound".to_string()),
            ("ONTASKADD".to_string(), "extra".to_string()),
        ]
    );
    sim.emit_change("ONCRMDEALUPDATE", 7);
    assert_eq!(
        queued_connectors(&sim, "ONCRMDEALUPDATE"),
        vec![String::new(), "other".to_string()],
        "the new binding queues events for us; the other connector's stays"
    );

    // Idempotent: a second run changes nothing, and says so in the table.
    let out = b24eventd(&["-c", config, "subscribe"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.starts_with("PORTAL  EVENT"), "{table}");
    assert_eq!(table.matches("already bound").count(), 2, "{table}");
    assert!(table.contains("ONTASKADD        extra"), "{table}");
    assert!(table.contains("--prune"), "{table}");

    let out = b24eventd(&["-c", config, "subscribe", "--prune", "--json"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows = json(&out);
    let pruned = rows["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["event"] == "ONTASKADD")
        .unwrap();
    assert_eq!(pruned["action"], "unbound");
    sim.emit_change("ONTASKADD", 8);
    assert!(queued_connectors(&sim, "ONTASKADD").is_empty());

    // A binding of ours outside `events` (bound again by hand).
    sim.bind_offline("ONTASKADD", "");

    // unsubscribe --only-configured removes our bindings of `events`, and only ours.
    let out = b24eventd(
        &["-c", config, "unsubscribe", "--only-configured", "--json"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows = json(&out);
    let actions: Vec<&str> = rows["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, vec!["unbound", "unbound"]);
    let count = |sim: &Simulator, event: &str, connector: &str| {
        sim.rows()
            .iter()
            .filter(|r| r.event_name == event && r.connector_id == connector)
            .count()
    };
    let (ours_before, others_before) = (
        count(&sim, "ONCRMDEALUPDATE", ""),
        count(&sim, "ONCRMDEALUPDATE", "other"),
    );
    sim.emit_change("ONCRMDEALADD", 9);
    assert_eq!(
        count(&sim, "ONCRMDEALADD", ""),
        0,
        "ONCRMDEALADD is no longer queued"
    );
    sim.emit_change("ONCRMDEALUPDATE", 10);
    assert_eq!(
        count(&sim, "ONCRMDEALUPDATE", ""),
        ours_before,
        "nor ONCRMDEALUPDATE for us"
    );
    assert_eq!(
        count(&sim, "ONCRMDEALUPDATE", "other"),
        others_before + 1,
        "the other connector's binding is untouched"
    );
    sim.emit_change("ONTASKADD", 11);
    assert_eq!(
        queued_connectors(&sim, "ONTASKADD"),
        vec![String::new()],
        "--only-configured kept the binding outside `events`"
    );

    // Without it: every offline binding of our connector that event.get lists.
    let out = b24eventd(&["-c", config, "unsubscribe", "--json"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows = json(&out);
    let actions: Vec<(String, String)> = rows["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["event"].as_str().unwrap().to_string(),
                r["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        actions,
        vec![
            ("ONCRMDEALADD".to_string(), "not bound".to_string()),
            ("ONCRMDEALUPDATE".to_string(), "not bound".to_string()),
            ("ONTASKADD".to_string(), "unbound".to_string()),
        ]
    );
    let queued_tasks = count(&sim, "ONTASKADD", "");
    sim.emit_change("ONTASKADD", 12);
    assert_eq!(
        count(&sim, "ONTASKADD", ""),
        queued_tasks,
        "no longer queued"
    );
    sim.emit_change("ONCRMDEALUPDATE", 13);
    assert_eq!(
        count(&sim, "ONCRMDEALUPDATE", "other"),
        others_before + 2,
        "the other connector's binding is still untouched"
    );
    let out = b24eventd(&["-c", config, "unsubscribe", "--json"], None).await;
    let rows = json(&out);
    assert!(
        rows["bindings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["action"] == "not bound"),
        "{rows}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_uses_the_connector_and_stops_on_errors_that_repeat() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimulatorConfig {
        user_is_admin: false,
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let (access, refresh) = sim.issue_tokens();
    store_tokens(dir.path(), &Tokens::from_pair(access, refresh)).await;
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "auth_connector = \"erp-sync\"",
        &file_sink(dir.path()),
    );
    let out = b24eventd(&["-c", path(&config), "subscribe", "--json"], None).await;
    assert_eq!(out.status.code(), Some(1));
    let rows = json(&out);
    let rows = rows["bindings"].as_array().unwrap();
    assert_eq!(
        rows.len(),
        1,
        "ACCESS_DENIED would repeat: one attempt, {rows:?}"
    );
    assert_eq!(rows[0]["action"], "failed");
    assert_eq!(rows[0]["connector"], "erp-sync");
    assert!(rows[0]["error"].as_str().unwrap().contains("ACCESS_DENIED"));
    let err = stderr(&out);
    assert!(
        err.contains("subscribe failed") && err.contains("administrator"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_passes_a_healthy_portal_without_rotating_its_tokens() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    store_tokens(dir.path(), &tokens).await;
    let endpoint = Endpoint::start(std::sync::Arc::new(|_: &Value| 200)).await;
    let sinks = format!("{}{}", file_sink(dir.path()), http_sink(&endpoint.url));
    let config = write_config(dir.path(), &sim, None, "", &sinks);
    let config = path(&config);
    emit_deals(&sim, 1, 3);

    let out = b24eventd(&["-c", config, "doctor", "--json"], None).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    let report = json(&out);
    assert_eq!(report["status"], "ok", "{report:#}");
    assert_eq!(report["summary"]["fail"], 0);
    assert_eq!(
        checks_of(&report, "main"),
        [
            "reachable",
            "token",
            "admin",
            "clock",
            "application",
            "rest_offline_extended",
            "bindings",
            "backlog"
        ]
    );
    for check in checks_of(&report, "main") {
        let f = finding(&report, "main", &check);
        assert_eq!(f["status"], "ok", "{f}");
        assert!(f["fix"].is_null(), "{f}");
        assert!(!f["detail"].as_str().unwrap().is_empty());
    }
    assert!(
        finding(&report, "main", "backlog")["detail"]
            .as_str()
            .unwrap()
            .starts_with("3 waiting"),
        "{report:#}"
    );
    let sinks = report["sinks"].as_array().unwrap();
    assert_eq!(sinks.len(), 2);
    for sink in sinks {
        assert_eq!(sink["checks"][0]["check"], "healthcheck", "{sink}");
        assert_eq!(sink["checks"][0]["status"], "ok", "{sink}");
    }
    assert_eq!(
        endpoint.accepted_count(),
        0,
        "the healthcheck delivered nothing"
    );
    assert!(
        !dir.path().join("events.jsonl").exists(),
        "nor wrote an event"
    );
    assert_eq!(
        sim.stats().token_refreshes,
        0,
        "a valid access token is not refreshed"
    );
    assert_eq!(sim.stats().queued, 3, "doctor only looks at the queue");

    let out = b24eventd(&["-c", config, "doctor"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("portal main\n  ok    reachable"), "{text}");
    assert!(text.contains("sink erp (http)"), "{text}");
    assert!(text.ends_with("0 warnings, 0 failures\n"), "{text}");

    // An expired access token is refreshed (and the new pair stored), like the daemon would.
    sim.expire_access_tokens();
    let out = b24eventd(&["-c", config, "doctor", "--json"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let token = finding(&json(&out), "main", "token").clone();
    assert!(
        token["detail"]
            .as_str()
            .unwrap()
            .contains("refreshing it worked"),
        "{token}"
    );
    assert_eq!(sim.stats().token_refreshes, 1);
    let stored = stored_tokens(dir.path()).await.unwrap();
    assert_ne!(
        stored.refresh_token, tokens.refresh_token,
        "the rotated pair is stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_reports_a_plan_without_rest_offline_extended_per_mode() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig {
        rest_offline_extended: false,
        ..SimulatorConfig::default()
    })
    .await;
    store_tokens(dir.path(), &tokens).await;
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));

    let out = b24eventd(&["-c", path(&config), "doctor", "--json"], None).await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "reserve mode cannot work: {}",
        stdout(&out)
    );
    let report = json(&out);
    assert_eq!(report["status"], "fail");
    assert_eq!(report["summary"]["fail"], 1, "{report:#}");
    let f = finding(&report, "main", "rest_offline_extended");
    assert_eq!(f["status"], "fail");
    assert!(
        f["detail"].as_str().unwrap().contains("WRONG_LICENSE"),
        "{f}"
    );
    assert!(
        f["fix"]
            .as_str()
            .unwrap()
            .contains("mode = \"fetch-delete\""),
        "{f}"
    );
    assert!(
        stderr(&out).contains("doctor: 1 check failed"),
        "{}",
        stderr(&out)
    );

    let config = write_config(
        dir.path(),
        &sim,
        None,
        "mode = \"fetch-delete\"",
        &file_sink(dir.path()),
    );
    let out = b24eventd(&["-c", path(&config), "doctor", "--json"], None).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "a warning is not a failure: {}",
        stderr(&out)
    );
    let report = json(&out);
    assert_eq!(report["status"], "warn");
    let f = finding(&report, "main", "rest_offline_extended");
    assert_eq!(f["status"], "warn");
    assert!(
        f["detail"].as_str().unwrap().contains(
            "a get response lost in transit loses that batch: the portal deleted the events when it answered"
        ),
        "{f}"
    );
    let text = stdout(&b24eventd(&["-c", path(&config), "doctor"], None).await);
    assert!(text.contains("warn  rest_offline_extended"), "{text}");
    assert!(
        text.contains("fix: move the portal to a plan with rest_offline_extended"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_fails_each_broken_piece_with_its_fix() {
    init();
    let dir = tempfile::tempdir().unwrap();

    // No journal at all: the token check fails, and doctor does not create a journal.
    let sim = Simulator::start(SimulatorConfig {
        user_is_admin: false,
        rest_auth_connector: false,
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let closed = format!("http://127.0.0.1:{}/events", free_port());
    let sinks = format!(
        "{}\n[sinks.lost]\ntype = \"file\"\npath = \"{}/missing/dir/e.jsonl\"\n",
        http_sink(&closed),
        dir.path().display()
    );
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "auth_connector = \"erp-sync\"",
        &sinks,
    );
    let config = path(&config);
    let out = b24eventd(&["-c", config, "doctor", "--json"], None).await;
    assert_eq!(out.status.code(), Some(1));
    let report = json(&out);
    assert_eq!(checks_of(&report, "main"), ["token"]);
    let token = finding(&report, "main", "token");
    assert_eq!(token["status"], "fail");
    assert!(
        token["fix"]
            .as_str()
            .unwrap()
            .contains("auth login --portal main")
    );
    assert!(!dir.path().join("journal.db").exists());
    let sinks: Vec<(String, String, String)> = report["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["sink"].as_str().unwrap().to_string(),
                s["checks"][0]["check"].as_str().unwrap().to_string(),
                s["checks"][0]["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        sinks,
        [
            (
                "erp".to_string(),
                "healthcheck".to_string(),
                "fail".to_string()
            ),
            ("lost".to_string(), "build".to_string(), "fail".to_string()),
        ]
    );
    assert_eq!(report["summary"]["fail"], 3);

    // With tokens: a non-administrator on a plan without auth_connector, nothing bound.
    let (access, refresh) = sim.issue_tokens();
    store_tokens(dir.path(), &Tokens::from_pair(access, refresh)).await;
    let out = b24eventd(&["-c", config, "doctor", "--json"], None).await;
    assert_eq!(out.status.code(), Some(1));
    let report = json(&out);
    assert_eq!(finding(&report, "main", "reachable")["status"], "ok");
    assert_eq!(finding(&report, "main", "token")["status"], "ok");
    let admin = finding(&report, "main", "admin");
    assert_eq!(admin["status"], "fail");
    assert!(admin["fix"].as_str().unwrap().contains("administrator"));
    let connector = finding(&report, "main", "rest_auth_connector");
    assert_eq!(connector["status"], "fail");
    assert!(
        connector["fix"]
            .as_str()
            .unwrap()
            .contains("remove auth_connector")
    );
    assert!(
        !checks_of(&report, "main").contains(&"bindings".to_string()),
        "event.* checks are skipped when they cannot work: {report:#}"
    );
    let text = stdout(&b24eventd(&["-c", config, "doctor"], None).await);
    assert!(text.contains("fail  admin"), "{text}");
    assert!(
        text.contains("fix: run `b24eventd auth login --portal main`"),
        "{text}"
    );

    // An administrator, no connector, nothing bound: bindings fail with the subscribe fix.
    let sim = Simulator::start(SimulatorConfig::default()).await.unwrap();
    sim.bind_offline("ONCRMDEALADD", "");
    let (access, refresh) = sim.issue_tokens();
    store_tokens(dir.path(), &Tokens::from_pair(access, refresh)).await;
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let out = b24eventd(&["-c", path(&config), "doctor", "--json"], None).await;
    assert_eq!(out.status.code(), Some(1));
    let report = json(&out);
    let bindings = finding(&report, "main", "bindings");
    assert_eq!(bindings["status"], "fail", "{report:#}");
    assert!(
        bindings["detail"]
            .as_str()
            .unwrap()
            .contains("ONCRMDEALUPDATE")
    );
    assert_eq!(bindings["fix"], "run `b24eventd subscribe --portal main`");
    assert_eq!(report["summary"]["fail"], 1, "{report:#}");

    // After subscribe, doctor is clean.
    let out = b24eventd(&["-c", path(&config), "subscribe"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = b24eventd(&["-c", path(&config), "doctor", "--json"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_online_separates_config_errors_from_failed_checks() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    store_tokens(dir.path(), &tokens).await;
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));

    let out = b24eventd(&["-c", path(&config), "validate", "--online"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!(
            "{}: ok (1 portal, 1 sink)\nportal main\n",
            path(&config)
        )),
        "{text}"
    );

    let out = b24eventd(
        &["-c", path(&config), "validate", "--online", "--json"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = json(&out);
    assert_eq!(report["config"], path(&config));
    assert_eq!(report["status"], "ok");

    // A static error is still a configuration error (78), before anything goes online.
    let broken = write_config(
        dir.path(),
        &sim,
        None,
        "batch_size = 0",
        &file_sink(dir.path()),
    );
    let before = sim.stats().requests;
    let out = b24eventd(&["-c", path(&broken), "validate", "--online"], None).await;
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    assert!(stderr(&out).contains("batch_size"), "{}", stderr(&out));
    assert_eq!(sim.stats().requests, before, "no request was made");

    // A failed online check is a runtime failure (1).
    let missing: PathBuf = dir.path().join("gone");
    let sinks = format!(
        "[sinks.archive]\ntype = \"file\"\npath = \"{}/e.jsonl\"\n",
        missing.display()
    );
    let failing = write_config(dir.path(), &sim, None, "", &sinks);
    let out = b24eventd(&["-c", path(&failing), "validate", "--online"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("validate --online: 1 check failed"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).contains("fail  build"), "{}", stdout(&out));

    let out = b24eventd(&["-c", path(&config), "validate", "--json"], None).await;
    assert_eq!(out.status.code(), Some(2), "--json needs --online");
}
