//! Shared harness for the integration tests: a simulator-backed portal, a generated config, the
//! real pipeline running in-process, a programmable HTTP sink endpoint, and polling helpers.

pub mod cli;
pub mod cluster;
pub mod daemon;
pub mod error_lane;
pub mod private_postgres;
pub mod proxy;
pub mod sink;
pub mod slow_proxy;

use b24eventd::bitrix::Tokens;
use b24eventd::config;
use b24eventd::journal::Journal;
use b24eventd_simulator::{Simulator, SimulatorConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub const EVENTS: [&str; 2] = ["ONCRMDEALADD", "ONCRMDEALUPDATE"];

pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("B24EVENTD_LOG")
                .unwrap_or_else(|_| "warn,tokio_cron_scheduler=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Fails a test that needs a local service (such tests are `#[ignore]`d, so it was asked for)
/// when the service does not answer: names the service, the error and how to start it.
#[track_caller]
pub fn service_down(service: &str, start: &str, error: impl std::fmt::Display) -> ! {
    panic!("{service} does not answer ({error}); this test needs it: start it with `{start}`")
}

/// A simulator with the demo events bound and a token pair issued.
pub async fn portal(config: SimulatorConfig) -> (Simulator, Tokens) {
    let sim = Simulator::start(config).await.expect("simulator starts");
    for e in EVENTS {
        sim.bind_offline(e, "");
    }
    let (access, refresh) = sim.issue_tokens();
    let tokens = Tokens::from_pair(access, refresh);
    (sim, tokens)
}

/// Writes a config for one portal `main` on `sim` plus the given sink tables; `portal_extra` is
/// appended to `[portals.main]` (the orphan sweep and the error lane run every 2 s unless it sets
/// their schedules).
pub fn write_config(
    dir: &Path,
    sim: &Simulator,
    endpoint: Option<&str>,
    portal_extra: &str,
    sinks: &str,
) -> PathBuf {
    let journal = b24eventd::journal::test_support::test_journal_toml(dir);
    write_config_with_journal(dir, &journal, sim, endpoint, portal_extra, sinks)
}

/// [`write_config`] with the journal in `dir/journal.db` whatever `B24TEST_POSTGRES` says: for
/// the tests of what only a SQLite journal has (its file, its locks, its disk).
pub fn write_sqlite_config(
    dir: &Path,
    sim: &Simulator,
    endpoint: Option<&str>,
    portal_extra: &str,
    sinks: &str,
) -> PathBuf {
    let journal = format!("path = \"{}/journal.db\"\n", dir.display());
    write_config_with_journal(dir, &journal, sim, endpoint, portal_extra, sinks)
}

fn write_config_with_journal(
    dir: &Path,
    journal: &str,
    sim: &Simulator,
    endpoint: Option<&str>,
    portal_extra: &str,
    sinks: &str,
) -> PathBuf {
    let defaults = SimulatorConfig::default();
    let text = format!(
        r#"shutdown_timeout = "10s"
[journal]
{journal}
[admin]
listen = ""

[portals.main]
client_endpoint = "{endpoint}"
oauth_token_url = "{oauth}"
client_id = "{client_id}"
client_secret = "{secret}"
events = ["ONCRMDEALADD", "ONCRMDEALUPDATE"]
poll_interval = "200ms"
{schedules}{portal_extra}

{sinks}
"#,
        endpoint = endpoint
            .map(str::to_string)
            .unwrap_or_else(|| sim.client_endpoint()),
        oauth = sim.oauth_token_url(),
        client_id = defaults.client_id,
        secret = defaults.client_secret,
        schedules = ["orphan_sweep_schedule", "error_lane_schedule"]
            .iter()
            .filter(|key| !portal_extra.contains(*key))
            .map(|key| format!("{key} = \"*/2 * * * * *\"\n"))
            .collect::<String>(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub fn file_sink(dir: &Path) -> String {
    format!(
        "[sinks.archive]\ntype = \"file\"\npath = \"{}/events.jsonl\"\n",
        dir.display()
    )
}

pub fn http_sink(url: &str) -> String {
    format!(
        "[sinks.erp]\ntype = \"http\"\nurl = \"{url}\"\ntimeout = \"2s\"\nconcurrency = 8\n[sinks.erp.retry]\nmax_attempts = 50\ninitial_backoff = \"100ms\"\nmax_backoff = \"2s\"\n"
    )
}

/// The journal of the test in `dir` (the one [`write_config`] names): `dir/journal.db`, or with
/// `B24TEST_POSTGRES` set, the test's own schema in that PostgreSQL database.
pub async fn open_journal(dir: &Path) -> Journal {
    let config = b24eventd::journal::test_support::test_journal_config(dir);
    Journal::open_configured(&config, b24eventd::journal::Access::Create)
        .await
        .unwrap_or_else(|e| panic!("cannot open the test journal {}: {e:#}", config.location()))
}

/// The rows of a `SELECT` on the journal, on either backend (`Journal::sql_rows`): each a map of
/// column name to value. Name every computed column (`COUNT(*) AS n`): the backends name them
/// differently.
pub fn sql_rows(journal: &Journal, sql: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    journal
        .sql_rows(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e:#}"))
        .into_iter()
        .map(|row| match row {
            serde_json::Value::Object(map) => map,
            other => panic!("{sql}: a row that is not an object: {other}"),
        })
        .collect()
}

/// The integer column `n` of the one row a `SELECT … AS n` returns.
pub fn sql_count(journal: &Journal, sql: &str) -> i64 {
    let rows = sql_rows(journal, sql);
    assert_eq!(rows.len(), 1, "{sql}: one row");
    rows[0]["n"]
        .as_i64()
        .unwrap_or_else(|| panic!("{sql}: n is not an integer: {:?}", rows[0]))
}

/// A text column of a row from [`sql_rows`] (`None` for NULL).
pub fn sql_text(row: &serde_json::Map<String, serde_json::Value>, column: &str) -> Option<String> {
    match row.get(column) {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Null) => None,
        other => panic!("column {column} is not text: {other:?} in {row:?}"),
    }
}

/// An integer column of a row from [`sql_rows`].
pub fn sql_int(row: &serde_json::Map<String, serde_json::Value>, column: &str) -> i64 {
    row.get(column)
        .and_then(serde_json::Value::as_i64)
        .unwrap_or_else(|| panic!("column {column} is not an integer in {row:?}"))
}

/// The pipeline running in-process on a config file.
pub struct Running {
    pub journal: Journal,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Where the admin endpoint listens, when the config turned it on.
    pub admin: Option<std::net::SocketAddr>,
}

impl Running {
    pub async fn start(config_path: &Path, tokens: &Tokens) -> Running {
        Running::start_with(config_path, tokens, b24eventd::daemon::Controls::default()).await
    }

    /// [`Running::start`] with the daemon's controls (a reload notifier, say).
    pub async fn start_with(
        config_path: &Path,
        tokens: &Tokens,
        controls: b24eventd::daemon::Controls,
    ) -> Running {
        let config = config::load(config_path).expect("config loads");
        let journal = Journal::open_configured(&config.journal, b24eventd::journal::Access::Create)
            .await
            .unwrap();
        if journal.load_tokens("main").await.unwrap().is_none() {
            journal.save_tokens("main", tokens).await.unwrap();
        }
        let shutdown = CancellationToken::new();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(b24eventd::daemon::run_with(
            config,
            journal.clone(),
            shutdown.clone(),
            controls,
            move |running| {
                let _ = started_tx.send(running.admin_addr);
            },
        ));
        // A pipeline that fails before it is up drops the sender: the task holds its error.
        let admin = tokio::time::timeout(Duration::from_secs(30), started_rx)
            .await
            .expect("pipeline starts within 30 s")
            .unwrap_or(None);
        Running {
            journal,
            shutdown,
            task,
            admin,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("pipeline stops within 30 s")
            .expect("pipeline task did not panic")
            .expect("pipeline returned ok");
    }
}

/// A loopback port nothing listens on (bound once by the system's choice, then let go).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `cond` every 100 ms until it holds, or panics with `what` after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// True when the portal holds nothing: no queued, reserved or error-lane rows.
pub fn upstream_empty(sim: &Simulator) -> bool {
    sim.rows().is_empty()
}

/// The idempotency key one change of a queue row must carry, computed here (not through the
/// crate): `<portal>:<offline ID>:<TIMESTAMP_X as Unix seconds>`.
pub fn portal_rows_key(portal: &str, offline_id: i64, timestamp: &str) -> String {
    let unix = chrono::DateTime::parse_from_rfc3339(timestamp)
        .unwrap_or_else(|e| panic!("TIMESTAMP_X {timestamp:?} parses: {e}"))
        .timestamp();
    format!("{portal}:{offline_id}:{unix}")
}

/// [`portal_rows_key`] of an envelope's own fields.
pub fn expected_key(envelope: &serde_json::Value) -> String {
    portal_rows_key(
        envelope["portal"].as_str().expect("a portal"),
        envelope["offline_id"].as_i64().expect("an offline ID"),
        envelope["timestamp"].as_str().expect("a timestamp"),
    )
}

/// Reads the JSONL file sink: envelope id → number of lines with it. One id is one change of
/// one queue record (a redelivery repeats it); every id is checked against [`expected_key`].
pub fn file_ids(path: &Path) -> BTreeMap<String, usize> {
    let mut ids = BTreeMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return ids;
    };
    for line in text.lines() {
        let v = b24eventd::json_depth::from_str(line).expect("every line is a JSON envelope");
        let id = v["id"].as_str().unwrap().to_string();
        assert_eq!(id, expected_key(&v), "the key of the change: {line}");
        *ids.entry(id).or_insert(0) += 1;
    }
    ids
}

/// Every envelope in a JSONL file sink, in order (data nested up to the daemon's bound reads).
pub fn file_envelopes(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| b24eventd::json_depth::from_str(line).expect("every line is a JSON envelope"))
        .collect()
}

/// The (event, entity ID) pairs in a JSONL file sink.
pub fn file_entities(path: &Path) -> std::collections::BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            (
                v["event"].as_str().unwrap().to_string(),
                v["data"]["FIELDS"]["ID"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Serves `app` on a loopback port until the test's runtime ends; returns its `/events` URL.
async fn serve_events(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// What the test HTTP endpoint answers for one envelope.
pub type Responder = dyn Fn(&serde_json::Value) -> u16 + Send + Sync;

/// An HTTP endpoint for the `http` sink that records every envelope and answers as told.
pub struct Endpoint {
    pub url: String,
    pub received: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Endpoint {
    pub async fn start(responder: Arc<Responder>) -> Endpoint {
        Endpoint::start_with_delay(responder, Duration::ZERO).await
    }

    /// Like [`Endpoint::start`], answering each request only after `delay`.
    pub async fn start_with_delay(responder: Arc<Responder>, delay: Duration) -> Endpoint {
        use axum::http::StatusCode;
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let app = axum::Router::new().route(
            "/events",
            axum::routing::post(move |body: axum::body::Bytes| {
                let log = log.clone();
                let responder = responder.clone();
                async move {
                    tokio::time::sleep(delay).await;
                    let v: serde_json::Value = match serde_json::from_slice(&body) {
                        Ok(v) => v,
                        Err(_) => return StatusCode::BAD_REQUEST,
                    };
                    let status = responder(&v);
                    if (200..300).contains(&status) {
                        log.lock().unwrap().push(v);
                    }
                    StatusCode::from_u16(status).unwrap()
                }
            }),
        );
        let url = serve_events(app).await;
        Endpoint { url, received }
    }

    /// How many envelopes were accepted in all, duplicates included.
    pub fn accepted_count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// The (event, entity id) pairs accepted.
    pub fn accepted_entities(&self) -> std::collections::BTreeSet<(String, String)> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["event"].as_str().unwrap().to_string(),
                    v["data"]["FIELDS"]["ID"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    pub fn accepted_ids(&self) -> std::collections::BTreeSet<String> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect()
    }
}

/// An HTTP consumer that deduplicates as a real one does: it records the `Idempotency-Key` of
/// every request (repeats included), keeps the envelope of the first request with each key, and
/// answers 200 to a repeat without keeping it.
pub struct DedupEndpoint {
    pub url: String,
    /// Every `Idempotency-Key` received, in order.
    pub keys: Arc<Mutex<Vec<String>>>,
    /// The envelopes taken: the first with each key.
    pub accepted: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl DedupEndpoint {
    pub async fn start() -> DedupEndpoint {
        use axum::http::{HeaderMap, StatusCode};
        let keys = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let (key_log, kept) = (keys.clone(), accepted.clone());
        let app = axum::Router::new().route(
            "/events",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (key_log, kept) = (key_log.clone(), kept.clone());
                async move {
                    let Some(key) = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string)
                    else {
                        return StatusCode::BAD_REQUEST;
                    };
                    let Ok(envelope) = serde_json::from_slice::<serde_json::Value>(&body) else {
                        return StatusCode::BAD_REQUEST;
                    };
                    let mut seen = key_log.lock().unwrap();
                    if !seen.contains(&key) {
                        kept.lock().unwrap().push(envelope);
                    }
                    seen.push(key);
                    StatusCode::OK
                }
            }),
        );
        let url = serve_events(app).await;
        DedupEndpoint {
            url,
            keys,
            accepted,
        }
    }

    /// Every key received, repeats included, in order.
    pub fn keys_received(&self) -> Vec<String> {
        self.keys.lock().unwrap().clone()
    }

    /// The envelopes taken (one per key), in order.
    pub fn accepted(&self) -> Vec<serde_json::Value> {
        self.accepted.lock().unwrap().clone()
    }
}

/// Raises `count` changes of distinct deals (ids from `first`), alternating ADD and UPDATE.
pub fn emit_deals(sim: &Simulator, first: u64, count: u64) {
    for id in first..first + count {
        sim.emit_change(EVENTS[(id % 2) as usize], id);
    }
}

/// Every (event, entity id) that `emit_deals(first, count)` raised.
pub fn expected_entities(first: u64, count: u64) -> std::collections::BTreeSet<(String, String)> {
    (first..first + count)
        .map(|id| (EVENTS[(id % 2) as usize].to_string(), id.to_string()))
        .collect()
}
