//! Secrets stay secret: every command and a full pipeline run at `trace` log level,
//! with a token refresh, signed and authenticated sinks and a bitrix-form sink; no client secret,
//! OAuth token, signing secret, URL password, header value, exec environment value or application
//! token may appear in any output, in what sinks receive (beyond what a sink is configured to
//! send), or in the journal outside its `tokens` table. The journal files are 0600.
//!
//! Remote ends that echo what they were sent (a token endpoint echoing its query, a sink
//! endpoint echoing its headers) get no form of a secret into the log, `/readyz`, the status
//! page or `doctor`; a redirect to another host is refused before anything goes there; secret
//! files must be small regular files; a secret holds no line break or NUL.

use crate::support::daemon::{spawn_daemon_with_env, stop_with_sigterm};
use crate::support::*;
use b24eventd_simulator::{Faults, SimulatorConfig};
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
    cli_with_env(config, args, stdin, &[]).await
}

/// [`cli`] with extra environment variables.
async fn cli_with_env(
    config: &Path,
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &str)],
) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_b24eventd"));
    cmd.arg("-c")
        .arg(config)
        .args(args)
        .env_remove("B24EVENTD_CONFIG")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env("B24EVENTD_LOG", "trace")
        .envs(env.iter().copied())
        .kill_on_drop(true)
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
url = "http://{endpoint}/events"
headers = {{ Authorization = "{HEADER_VALUE}" }}
signing_secret = "{SIGNING_SECRET}"
timeout = "5s"

[sinks.legacy]
type = "http"
url = "http://erp:{URL_PASSWORD}@{endpoint}/handler.php"
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
    let journal = open_journal(dir.path()).await;
    let postgres = b24eventd::journal::test_support::postgres_url().is_some();
    let tables: Vec<String> = sql_rows(
        &journal,
        if postgres {
            "SELECT table_name::text AS name FROM information_schema.tables
             WHERE table_schema = current_schema() AND table_name <> 'tokens'"
        } else {
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name <> 'tokens'"
        },
    )
    .iter()
    .map(|r| sql_text(r, "name").unwrap())
    .collect();
    assert!(tables.contains(&"events".to_string()));
    for table in tables {
        // Every text value as stored (not JSON-escaped, which could hide a quote or a backslash).
        let dump: String = sql_rows(&journal, &format!("SELECT * FROM \"{table}\""))
            .iter()
            .flat_map(|row| row.values())
            .filter_map(|value| value.as_str())
            .collect::<Vec<_>>()
            .join("\n");
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
    assert!(postgres || dir.path().join("journal.db").exists());
}

/// A client secret with characters that every encoding writes differently: a query (`%20`), a
/// form (`+`), JSON (`\"`), HTML (`&amp;`).
const ODD_SECRET: &str = "S3cr3t +/&=?#%é'<>\"x~*";

/// `secret` as it would appear raw, percent-encoded (either hex case), form-encoded (a space as
/// `+`, with and without `*` and `~` kept), inside a JSON string and in HTML text: written here
/// independently of the daemon's own scrubber.
fn every_form(secret: &str) -> Vec<String> {
    let escape = |keep: &str, plus: bool| -> String {
        secret
            .bytes()
            .map(|b| match b {
                b' ' if plus => "+".to_string(),
                b if b.is_ascii_alphanumeric() || keep.as_bytes().contains(&b) => {
                    (b as char).to_string()
                }
                b => format!("%{b:02X}"),
            })
            .collect()
    };
    let html = secret
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;");
    let json = serde_json::to_string(secret).unwrap();
    let mut forms = vec![
        secret.to_string(),
        escape("-._~", false),
        escape("-._~", false).to_lowercase(),
        escape("*-._", true),
        escape("-._", true),
        json.trim_matches('"').to_string(),
        html,
    ];
    forms.dedup();
    forms
}

/// `config` with its admin endpoint on `port` and `[portals.main]`'s client secret replaced by
/// `secret_line` (another key, or nothing).
fn rewrite_config(config: &Path, port: u16, secret_line: &str) {
    let text = std::fs::read_to_string(config)
        .unwrap()
        .replace("listen = \"\"", &format!("listen = \"127.0.0.1:{port}\""))
        .replace("client_secret = \"sim-secret\"", secret_line);
    std::fs::write(config, text).unwrap();
}

/// GET `path` on the admin endpoint: status and body.
async fn admin_get(port: u16, path: &str) -> (u16, String) {
    match reqwest::get(format!("http://127.0.0.1:{port}{path}")).await {
        Ok(response) => {
            let status = response.status().as_u16();
            (status, response.text().await.unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

/// Polls `/readyz` until the portal is not ready for a reason containing `needle`.
async fn readyz_saying(port: u16, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = admin_get(port, "/readyz").await;
        if status == 503 && body.contains(needle) {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never said {needle:?}; last answer {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_echoing_token_endpoint_leaks_no_form_of_the_client_secret() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig {
        client_secret: ODD_SECRET.into(),
        ..SimulatorConfig::default()
    })
    .await;
    let secret_file = dir.path().join("main.secret");
    std::fs::write(&secret_file, format!("{ODD_SECRET}\n")).unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let port = free_port();
    rewrite_config(
        &config,
        port,
        &format!("client_secret_file = \"{}\"", secret_file.display()),
    );
    crate::support::cli::store_tokens(dir.path(), &tokens).await;
    // Every call is refused for its expired token; the refresh meets the echoing endpoint.
    sim.expire_access_tokens();
    sim.set_faults(Faults {
        oauth_echo: true,
        ..Faults::default()
    });

    let log_path = dir.path().join("daemon.log");
    let mut daemon = spawn_daemon_with_env(&config, &log_path, &[("B24EVENTD_LOG", "trace")]);
    let mut outputs = vec![format!(
        "/readyz\n{}",
        readyz_saying(port, "invalid_request").await
    )];
    outputs.push(format!("status page\n{}", admin_get(port, "/").await.1));
    for args in [
        &["doctor"][..],
        &["doctor", "--json"],
        &["validate", "--online"],
    ] {
        let (code, text) = cli(&config, args, None).await;
        assert_eq!(code, Some(1), "the failing refresh fails the check: {text}");
        outputs.push(text);
    }
    stop_with_sigterm(&mut daemon, &log_path);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("invalid_request") && log.contains("[redacted]"),
        "the echo reached the daemon and was scrubbed: {log}"
    );
    outputs.push(format!("daemon log\n{log}"));

    let mut secrets = every_form(ODD_SECRET);
    secrets.extend(sim.issued_tokens());
    for output in &outputs {
        let what = output.lines().next().unwrap_or("output");
        if what != "status page" {
            assert!(output.contains("invalid_request"), "{output}");
        }
        assert_clean(what, output, &secrets);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_echoing_sink_endpoint_leaks_no_form_of_the_sink_credentials() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    // The endpoint refuses every request, quoting its headers (the Basic credentials among them).
    let app = axum::Router::new().fallback(|headers: axum::http::HeaderMap| async move {
        let echo: Vec<String> = headers
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("")))
            .collect();
        (
            axum::http::StatusCode::BAD_REQUEST,
            format!("refused: {}", echo.join("; ")),
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let password = "p@ss w0rd+Sink";
    let sinks = format!(
        "[sinks.erp]\ntype = \"http\"\nurl = \"http://erp-user:p%40ss%20w0rd%2BSink@{endpoint}/events\"\ntimeout = \"5s\"\n"
    );
    let config = write_config(dir.path(), &sim, None, "", &sinks);
    let port = free_port();
    rewrite_config(&config, port, "client_secret = \"sim-secret\"");
    crate::support::cli::store_tokens(dir.path(), &tokens).await;

    let log_path = dir.path().join("daemon.log");
    let mut daemon = spawn_daemon_with_env(&config, &log_path, &[("B24EVENTD_LOG", "trace")]);
    emit_deals(&sim, 1, 3);
    wait_for(
        "the refused events settled",
        Duration::from_secs(60),
        || upstream_empty(&sim) && sim.stats().errored >= 3,
    )
    .await;
    let mut outputs = vec![format!("status page\n{}", admin_get(port, "/").await.1)];
    stop_with_sigterm(&mut daemon, &log_path);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("refused: "), "the echo reached the log: {log}");
    outputs.push(format!("daemon log\n{log}"));
    for args in [
        &["dead", "list", "--json"][..],
        &["journal", "show", "main:1"],
        &["doctor", "--json"],
    ] {
        outputs.push(cli(&config, args, None).await.1);
    }
    assert!(
        outputs.iter().any(|o| o.contains("[redacted]")),
        "the Basic credentials were echoed and scrubbed"
    );
    use base64::Engine as _;
    let mut secrets = every_form(password);
    secrets.push(base64::engine::general_purpose::STANDARD.encode(format!("erp-user:{password}")));
    secrets.push("p%40ss%20w0rd%2BSink".to_string());
    for output in &outputs {
        assert_clean(output.lines().next().unwrap_or("output"), output, &secrets);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redirect_to_another_host_is_refused_and_nothing_goes_there() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let (elsewhere, received) = recorder().await;
    // The portal answers every REST call with a 302 to the same path on another host.
    sim.set_faults(Faults {
        redirect_to: Some(format!("http://{elsewhere}")),
        ..Faults::default()
    });
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let port = free_port();
    rewrite_config(&config, port, "client_secret = \"sim-secret\"");
    crate::support::cli::store_tokens(dir.path(), &tokens).await;
    let log_path = dir.path().join("daemon.log");
    let mut daemon = spawn_daemon_with_env(&config, &log_path, &[]);
    let readyz = readyz_saying(port, "REDIRECT_REFUSED").await;
    let new_endpoint = format!("http://{elsewhere}/rest/");
    assert!(readyz.contains(&new_endpoint), "{readyz}");
    stop_with_sigterm(&mut daemon, &log_path);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("new_client_endpoint")
            && l.contains(&new_endpoint)),
        "the new client_endpoint is logged for the operator: {log}"
    );
    assert!(
        received.lock().unwrap().is_empty(),
        "a request went to the other host: {:?}",
        received.lock().unwrap()
    );

    // The token server redirecting elsewhere: the refresh (client secret and refresh token in
    // its query) is not repeated there either.
    sim.set_faults(Faults {
        oauth_redirect_to: Some(format!("http://{elsewhere}")),
        ..Faults::default()
    });
    sim.expire_access_tokens();
    let mut daemon = spawn_daemon_with_env(&config, &log_path, &[]);
    let readyz = readyz_saying(port, "the token server redirected").await;
    assert!(readyz.contains("REDIRECT_REFUSED"), "{readyz}");
    stop_with_sigterm(&mut daemon, &log_path);
    assert!(
        received.lock().unwrap().is_empty(),
        "a token request went to the other host: {:?}",
        received.lock().unwrap()
    );
}

/// Runs `validate` on `config` (within 20 s, under a 2 GiB address-space limit: an unbounded
/// read fails instead of taking the machine's memory) and returns its exit code and output.
async fn validate_bounded(config: &Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("ulimit -v 2097152; exec \"$0\" -c \"$1\" validate")
        .arg(env!("CARGO_BIN_EXE_b24eventd"))
        .arg(config)
        .env_remove("B24EVENTD_CONFIG")
        .env_remove("CREDENTIALS_DIRECTORY")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("validate ends within 20 s")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_files_must_be_small_regular_files() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, _) = portal(SimulatorConfig::default()).await;
    let fifo = dir.path().join("secret.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let big = dir.path().join("big.secret");
    std::fs::write(&big, "x".repeat(64 * 1024 + 1)).unwrap();
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let original = std::fs::read_to_string(&config).unwrap();
    let cases: [(&Path, &str); 4] = [
        (Path::new("/dev/zero"), "a device"),
        (&fifo, "a FIFO"),
        (dir.path(), "a directory"),
        (&big, "65537 bytes"),
    ];
    for (path, why) in cases {
        let text = original.replace(
            "client_secret = \"sim-secret\"",
            &format!("client_secret_file = \"{}\"", path.display()),
        );
        std::fs::write(&config, text).unwrap();
        let (code, output) = validate_bounded(&config, &[]).await;
        assert_eq!(code, Some(78), "{}: {output}", path.display());
        assert!(
            output.contains("portals.main.client_secret_file")
                && output.contains(&path.display().to_string())
                && output.contains(why),
            "{output}"
        );
    }

    // The same for a systemd credential: a FIFO in $CREDENTIALS_DIRECTORY.
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(credentials.join("main.client_secret"))
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::write(
        &config,
        original.replace("client_secret = \"sim-secret\"", ""),
    )
    .unwrap();
    let (code, output) = validate_bounded(
        &config,
        &[("CREDENTIALS_DIRECTORY", credentials.to_str().unwrap())],
    )
    .await;
    assert_eq!(code, Some(78), "{output}");
    assert!(
        output.contains("portals.main.client_secret") && output.contains("a FIFO"),
        "{output}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_with_a_line_break_or_nul_is_refused() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, _) = portal(SimulatorConfig::default()).await;
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let original = std::fs::read_to_string(&config).unwrap();
    let file = dir.path().join("main.secret");
    let with_file = original.replace(
        "client_secret = \"sim-secret\"",
        &format!("client_secret_file = \"{}\"", file.display()),
    );

    // One final newline (or CRLF) is how files end: accepted.
    for content in ["sim-secret\n", "sim-secret\r\n", "sim-secret"] {
        std::fs::write(&file, content).unwrap();
        std::fs::write(&config, &with_file).unwrap();
        let (code, output) = validate_bounded(&config, &[]).await;
        assert_eq!(code, Some(0), "{content:?}: {output}");
    }
    for (content, why) in [
        ("sim-secret\n\n", "line break"),
        ("sim\nsecret\n", "line break"),
        ("sim\0secret", "NUL"),
    ] {
        std::fs::write(&file, content).unwrap();
        let (code, output) = validate_bounded(&config, &[]).await;
        assert_eq!(code, Some(78), "{content:?}: {output}");
        assert!(
            output.contains("portals.main.client_secret_file") && output.contains(why),
            "{content:?}: {output}"
        );
    }
    for (inline, why) in [
        ("sim\\nsecret", "line break"),
        ("sim\\rsecret", "line break"),
        ("sim\\u0000secret", "NUL"),
    ] {
        std::fs::write(
            &config,
            original.replace(
                "client_secret = \"sim-secret\"",
                &format!("client_secret = \"{inline}\""),
            ),
        )
        .unwrap();
        let (code, output) = validate_bounded(&config, &[]).await;
        assert_eq!(code, Some(78), "{inline}: {output}");
        assert!(
            output.contains("portals.main.client_secret:") && output.contains(why),
            "{inline}: {output}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_header_beside_url_credentials_is_refused() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, _) = portal(SimulatorConfig::default()).await;
    let sinks = "[sinks.erp]\ntype = \"http\"\nurl = \"http://erp:pass@127.0.0.1:9/events\"\nheaders = { authorization = \"Bearer abcdef\" }\n";
    let config = write_config(dir.path(), &sim, None, "", sinks);
    let (code, output) = validate_bounded(&config, &[]).await;
    assert_eq!(code, Some(78), "{output}");
    assert!(
        output.contains("sinks.erp.headers.authorization") && output.contains("keep one"),
        "{output}"
    );
    // Either alone is fine.
    for sinks in [
        "[sinks.erp]\ntype = \"http\"\nurl = \"http://erp:pass@127.0.0.1:9/events\"\n",
        "[sinks.erp]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/events\"\nheaders = { authorization = \"Bearer abcdef\" }\n",
    ] {
        let config = write_config(dir.path(), &sim, None, "", sinks);
        let (code, output) = validate_bounded(&config, &[]).await;
        assert_eq!(code, Some(0), "{output}");
    }
}
