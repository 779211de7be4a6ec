//! Secrets stay secret: every command and a full pipeline run at `trace` log level,
//! with a token refresh, signed and authenticated sinks and a bitrix-form sink; no client secret,
//! OAuth token, signing secret, URL password, header value, exec environment value or application
//! token may appear in any output, in what sinks receive (beyond what a sink is configured to
//! send), or in the journal outside its `tokens` table. The journal files are 0600.

mod common;

use b24eventd::simulator::SimulatorConfig;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::process::Command;

const CLIENT_SECRET: &str = "client-S3CR3T-5f1e9a";
const SIGNING_SECRET: &str = "whsec_c2lnbmluZy1rZXktdGhhdC1tdXN0LW5vdC1sZWFr";
const URL_PASSWORD: &str = "urlPassw0rd-77a1";
const HEADER_VALUE: &str = "Bearer header-T0KEN-91c2";
const EXEC_ENV_VALUE: &str = "exec-env-Secret-4b6d";
const APPLICATION_TOKEN: &str = "app-token-Secret-0d3f";

/// An endpoint that records every request (headers and body) as text and answers 200.
async fn recorder() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let app = axum::Router::new().fallback(
        move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let log = log.clone();
            async move {
                let mut text = format!("{headers:?}\n");
                text.push_str(&String::from_utf8_lossy(&body));
                log.lock().unwrap().push(text);
                axum::http::StatusCode::OK
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("127.0.0.1:{}", addr.port()), seen)
}

async fn cli(config: &Path, args: &[&str], stdin: Option<&str>) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_b24eventd"));
    cmd.arg("-c")
        .arg(config)
        .args(args)
        .env_remove("B24EVENTD_CONFIG")
        .env("B24EVENTD_LOG", "trace")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("the binary runs");
    if let Some(input) = stdin {
        use tokio::io::AsyncWriteExt;
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes()).await.unwrap();
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the command ends within 60 s")
        .unwrap();
    // The first line names the command (its first two words: the arguments may hold a token).
    let text = format!(
        "$ b24eventd {}\n{}{}",
        args.iter().take(2).copied().collect::<Vec<_>>().join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// Keeps a command's output; `expect_ok` commands must exit 0.
fn record(outputs: &mut Vec<String>, output: (Option<i32>, String), expect_ok: bool) {
    if expect_ok {
        assert_eq!(output.0, Some(0), "{}", output.1);
    }
    outputs.push(output.1);
}

fn assert_clean(what: &str, text: &str, secrets: &[String]) {
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "{what} contains the secret {secret:?}:\n{}",
            text.lines()
                .filter(|l| l.contains(secret.as_str()))
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_secret_leaks_at_trace_level() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig {
        client_secret: CLIENT_SECRET.into(),
        ..SimulatorConfig::default()
    })
    .await;
    let (endpoint, received) = recorder().await;
    let sinks = format!(
        r#"[sinks.erp]
type = "http"
url = "http://erp:{URL_PASSWORD}@{endpoint}/events"
headers = {{ Authorization = "{HEADER_VALUE}" }}
signing_secret = "{SIGNING_SECRET}"
timeout = "5s"

[sinks.legacy]
type = "http"
url = "http://{endpoint}/handler.php"
format = "bitrix-form"
bitrix_member_id = "a223c6b3710f85df22e9377d6c4f7553"
application_token = "{APPLICATION_TOKEN}"

[sinks.hook]
type = "exec"
command = ["true"]
env = {{ HOOK_SECRET = "{EXEC_ENV_VALUE}" }}

{file}"#,
        file = file_sink(dir.path())
    );
    let config = write_config(dir.path(), &sim, None, "", &sinks);
    let config_text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("client_secret = \"sim-secret\"", "");
    std::fs::write(
        &config,
        config_text.replace(
            "[portals.main]",
            &format!("[portals.main]\nclient_secret = \"{CLIENT_SECRET}\""),
        ),
    )
    .unwrap();

    let mut outputs = Vec::new();
    record(
        &mut outputs,
        cli(
            &config,
            &[
                "auth",
                "import",
                "--portal",
                "main",
                "--refresh-token",
                &tokens.refresh_token,
                "--access-token",
                &tokens.access_token,
            ],
            None,
        )
        .await,
        true,
    );
    record(&mut outputs, cli(&config, &["validate"], None).await, true);
    record(
        &mut outputs,
        cli(&config, &["validate", "--online"], None).await,
        false,
    );
    record(
        &mut outputs,
        cli(&config, &["doctor", "--json"], None).await,
        false,
    );
    record(
        &mut outputs,
        cli(&config, &["auth", "status", "--json"], None).await,
        true,
    );
    record(&mut outputs, cli(&config, &["subscribe"], None).await, true);
    // A login through the simulator's authorization page: the code is exchanged and stored.
    let code = sim.authorization_code();
    record(
        &mut outputs,
        cli(&config, &["auth", "login", "--portal", "main"], Some(&code)).await,
        true,
    );

    // The daemon at trace level, with an access token expiring mid-run (a refresh rotates both).
    let log_path = dir.path().join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_b24eventd"))
        .arg("-c")
        .arg(&config)
        .arg("run")
        .env("B24EVENTD_LOG", "trace")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    emit_deals(&sim, 1, 60);
    wait_for(
        "the first 60 events settled",
        Duration::from_secs(60),
        || upstream_empty(&sim) && sim.stats().cleared == 60,
    )
    .await;
    sim.expire_access_tokens();
    emit_deals(&sim, 61, 40);
    wait_for("100 events settled", Duration::from_secs(60), || {
        upstream_empty(&sim) && sim.stats().cleared == 100
    })
    .await;
    assert!(sim.stats().token_refreshes > 0, "a refresh happened");
    let pid = daemon.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), daemon.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    outputs.push(std::fs::read_to_string(&log_path).unwrap());

    record(
        &mut outputs,
        cli(&config, &["journal", "stats", "--json"], None).await,
        true,
    );
    record(
        &mut outputs,
        cli(
            &config,
            &["journal", "list", "--json", "--limit", "5"],
            None,
        )
        .await,
        true,
    );
    record(
        &mut outputs,
        cli(&config, &["journal", "show", "main:1"], None).await,
        true,
    );
    record(
        &mut outputs,
        cli(&config, &["dead", "list", "--json"], None).await,
        true,
    );
    record(
        &mut outputs,
        cli(&config, &["replay", "--all", "--dry-run", "--json"], None).await,
        true,
    );

    // Every secret, including every token the portal ever issued.
    let mut secrets: Vec<String> = [
        CLIENT_SECRET,
        SIGNING_SECRET,
        SIGNING_SECRET.trim_start_matches("whsec_"),
        URL_PASSWORD,
        HEADER_VALUE,
        EXEC_ENV_VALUE,
        APPLICATION_TOKEN,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let issued = sim.issued_tokens();
    assert!(issued.len() >= 6, "installation, login and a refresh");
    secrets.extend(issued.iter().cloned());

    assert!(outputs.len() >= 12);
    for output in &outputs {
        assert_clean(output.lines().next().unwrap_or("output"), output, &secrets);
    }

    // What sinks receive: the bitrix-form handler is sent its application token (that is its
    // job) and the ERP its Authorization header; nothing else secret reaches any sink.
    let requests = received.lock().unwrap().clone();
    assert!(requests.len() >= 200, "both http sinks were used");
    let sink_secrets: Vec<String> = secrets
        .iter()
        .filter(|s| *s != APPLICATION_TOKEN && *s != HEADER_VALUE)
        .cloned()
        .collect();
    for request in &requests {
        assert_clean("a request to an http sink", request, &sink_secrets);
    }
    let jsonl = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    assert_clean("the file sink", &jsonl, &secrets);

    // The journal: secrets only in the tokens table; the files are 0600.
    let db = rusqlite::Connection::open(dir.path().join("journal.db")).unwrap();
    let tables: Vec<String> = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name <> 'tokens'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(tables.contains(&"events".to_string()));
    for table in tables {
        let mut stmt = db.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
        let columns = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        let mut dump = String::new();
        while let Some(row) = rows.next().unwrap() {
            for i in 0..columns {
                if let Ok(Some(text)) = row.get::<_, Option<String>>(i) {
                    dump.push_str(&text);
                    dump.push('\n');
                }
            }
        }
        assert_clean(&format!("journal table {table}"), &dump, &secrets);
    }
    for file in ["journal.db", "journal.db-wal", "journal.db-shm"] {
        let path = dir.path().join(file);
        if let Ok(meta) = std::fs::metadata(&path) {
            assert_eq!(
                meta.permissions().mode() & 0o777,
                0o600,
                "{file} must be readable by its owner only"
            );
        }
    }
    assert!(dir.path().join("journal.db").exists());
}
