//! The admin endpoint against the real pipeline and the portal simulator: `/metrics` scraped while
//! events flow and checked against the journal, `/healthz`, `/readyz` when the portal fails and
//! goes away, and the binary's refusal of an unsafe or unusable `admin.listen`.

use crate::support::*;
use b24eventd::journal::EventFilter;
use b24eventd_simulator::{Faults, SimulatorConfig};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One sample of the exposition: metric name (with its `_total`/`_bucket` suffix), labels, value.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the OpenMetrics text (`# HELP/TYPE/UNIT/EOF` lines skipped). Label values here never
/// hold commas, quotes or braces.
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').expect("labels end with }");
                    let labels = inner
                        .split(',')
                        .map(|pair| {
                            let (k, v) = pair.split_once('=').expect("label k=v");
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            Sample {
                name,
                labels,
                value,
            }
        })
        .collect()
}

/// The sum of the samples named `name` whose labels include `labels` (0 when there are none).
fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    matching(samples, name, labels).map(|s| s.value).sum()
}

fn matching<'a>(
    samples: &'a [Sample],
    name: &'a str,
    labels: &'a [(&str, &str)],
) -> impl Iterator<Item = &'a Sample> + 'a {
    samples.iter().filter(move |s| {
        s.name == name
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

/// The one sample named `name` with `labels`; panics when there is none or several.
fn one(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = matching(samples, name, labels).collect();
    assert_eq!(found.len(), 1, "one sample {name} {labels:?}: {found:?}");
    found[0].value
}

async fn get(client: &reqwest::Client, admin: SocketAddr, path: &str) -> (u16, String) {
    let resp = client
        .get(format!("http://{admin}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

async fn scrape(client: &reqwest::Client, admin: SocketAddr) -> Vec<Sample> {
    let resp = client
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(resp.status().as_u16(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = resp.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "complete exposition");
    let samples = parse(&text);
    for s in &samples {
        assert!(s.name.starts_with("b24eventd_"), "prefixed: {}", s.name);
    }
    samples
}

/// A config for the shared harness with the admin endpoint on a port the OS picks.
fn admin_config(dir: &Path, sim: &b24eventd_simulator::Simulator, sinks: &str) -> PathBuf {
    let path = write_config(dir, sim, None, "", sinks);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("listen = \"\""));
    std::fs::write(
        &path,
        text.replace("listen = \"\"", "listen = \"127.0.0.1:0\""),
    )
    .unwrap();
    path
}

/// Per sink of portal `main` in the journal: (delivered, dead).
fn journal_sink_counts(journal: &b24eventd::journal::Journal) -> BTreeMap<String, (u64, u64)> {
    let stats = journal.stats(&EventFilter::default()).unwrap();
    let main = stats
        .iter()
        .find(|p| p.portal == "main")
        .expect("portal main in the journal");
    main.sinks
        .iter()
        .map(|s| (s.sink.clone(), (s.delivered, s.dead)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scraped_while_events_flow_match_the_journal() {
    init();
    let started_at = chrono::Utc::now().timestamp() as f64;
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    // The ERP refuses the first attempt of every fifth deal (retries), and everything while down.
    let down = Arc::new(AtomicBool::new(false));
    let refused_once = Arc::new(Mutex::new(HashSet::new()));
    let endpoint = {
        let down = down.clone();
        Endpoint::start(Arc::new(move |v| {
            let id = v["data"]["FIELDS"]["ID"].as_str().unwrap().to_string();
            if down.load(Ordering::SeqCst) {
                return 503;
            }
            let deal: u64 = id.parse().unwrap();
            if deal.is_multiple_of(5) && refused_once.lock().unwrap().insert(id) {
                return 500;
            }
            200
        }))
        .await
    };
    let sinks = format!("{}\n{}", file_sink(dir.path()), http_sink(&endpoint.url));
    let config = admin_config(dir.path(), &sim, &sinks);
    let running = Running::start(&config, &tokens).await;
    let admin = running.admin.expect("the admin endpoint is bound");
    assert_eq!(admin.ip().to_string(), "127.0.0.1");
    assert_ne!(admin.port(), 0, "the bound port is reported");
    let http = reqwest::Client::new();

    let (status, body) = get(&http, admin, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, r#"{"alive":true}"#));

    // Phase 1: 200 deals in waves, scraped while they flow.
    let mut last_fetched = 0.0;
    let mut scrapes = 0;
    for wave in 0..4 {
        emit_deals(&sim, 1 + wave * 50, 50);
        for _ in 0..3 {
            let samples = scrape(&http, admin).await;
            let fetched = sum(&samples, "b24eventd_events_fetched_total", &[]);
            let delivered = sum(
                &samples,
                "b24eventd_deliveries_total",
                &[("sink", "archive"), ("outcome", "delivered")],
            );
            assert!(fetched >= last_fetched, "a counter never goes down");
            assert!(
                fetched <= 200.0 && delivered <= fetched,
                "{fetched} {delivered}"
            );
            last_fetched = fetched;
            scrapes += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(scrapes, 12);
    wait_for("200 events settled", Duration::from_secs(60), || {
        upstream_empty(&sim) && sim.stats().emitted == 200
    })
    .await;

    // Phase 2: the ERP is down; 20 more deals stay unsettled upstream, a stable state to compare.
    down.store(true, Ordering::SeqCst);
    emit_deals(&sim, 1001, 20);
    // Wait until all 20 are reserved and each was refused by the ERP at least once (40 first
    // attempts were refused in phase 1).
    let journal = running.journal.clone();
    let start = std::time::Instant::now();
    loop {
        let counts = journal.counts().await.unwrap();
        if counts.unsettled_upstream == 20
            && counts.retried_attempts >= 60
            && sim.rows().iter().all(|r| !r.process_id.is_empty())
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "20 events reserved and refused: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let samples = scrape(&http, admin).await;
    let counts = journal.counts().await.unwrap();
    assert_eq!(counts.unsettled_upstream, 20);
    assert_eq!(
        one(
            &samples,
            "b24eventd_unsettled_events",
            &[("portal", "main")]
        ),
        20.0
    );
    assert_eq!(
        one(
            &samples,
            "b24eventd_events_fetched_total",
            &[("portal", "main")]
        ),
        counts.events as f64
    );
    assert_eq!(counts.events, 220);

    // Phase 3: the ERP is back; everything settles. Compare every counter with the journal.
    down.store(false, Ordering::SeqCst);
    // The portal empties its queue before its answer reaches the journal: wait for both.
    wait_for("220 events settled", Duration::from_secs(60), || {
        upstream_empty(&sim)
            && sim.stats().emitted == 220
            && journal.counts_blocking().unwrap().unsettled_upstream == 0
    })
    .await;
    let counts = journal.counts().await.unwrap();
    let sinks = journal_sink_counts(&journal);
    let samples = scrape(&http, admin).await;

    assert_eq!(
        (counts.events, counts.delivered, counts.dead),
        (220, 220, 0)
    );
    assert_eq!(
        one(
            &samples,
            "b24eventd_events_fetched_total",
            &[("portal", "main")]
        ),
        220.0
    );
    assert_eq!(sinks.len(), 2, "{sinks:?}");
    for (sink, (delivered, dead)) in &sinks {
        let labels = |outcome| {
            [
                ("portal", "main"),
                ("sink", sink.as_str()),
                ("outcome", outcome),
            ]
        };
        assert_eq!(
            one(&samples, "b24eventd_deliveries_total", &labels("delivered")),
            *delivered as f64,
            "{sink}"
        );
        assert_eq!(
            sum(&samples, "b24eventd_deliveries_total", &labels("dead")),
            *dead as f64,
            "{sink}"
        );
        assert_eq!(
            one(
                &samples,
                "b24eventd_delivery_latency_seconds_count",
                &[("portal", "main"), ("sink", sink.as_str())]
            ),
            *delivered as f64,
            "every successful delivery is timed ({sink})"
        );
        assert_eq!(
            one(
                &samples,
                "b24eventd_delivery_latency_seconds_bucket",
                &[("portal", "main"), ("sink", sink.as_str()), ("le", "+Inf")]
            ),
            *delivered as f64
        );
    }
    assert_eq!(sinks["archive"], (220, 0));
    assert_eq!(sinks["erp"], (220, 0));
    // Every retry was the ERP's: 40 first attempts refused, plus the attempts while it was down.
    let retries = sum(
        &samples,
        "b24eventd_deliveries_total",
        &[("outcome", "retry")],
    );
    assert_eq!(retries, counts.retried_attempts as f64);
    assert!(retries >= 60.0, "{retries}");
    assert_eq!(
        sum(
            &samples,
            "b24eventd_deliveries_total",
            &[("sink", "archive"), ("outcome", "retry")]
        ),
        0.0
    );
    assert_eq!(
        one(
            &samples,
            "b24eventd_unsettled_events",
            &[("portal", "main")]
        ),
        counts.unsettled_upstream as f64
    );
    assert_eq!(counts.unsettled_upstream, 0);

    // Upstream: the gets and clears answered; every answer the simulator gave is counted once.
    let ok = |method| {
        one(
            &samples,
            "b24eventd_upstream_requests_total",
            &[("portal", "main"), ("method", method), ("outcome", "ok")],
        )
    };
    assert!(ok("event.offline.get") > 0.0);
    // Clears travel alone or, with the next gets, inside a combined `batch` request.
    let settled_calls = |method| {
        sum(
            &samples,
            "b24eventd_upstream_requests_total",
            &[("portal", "main"), ("method", method), ("outcome", "ok")],
        )
    };
    assert!(settled_calls("event.offline.clear") + settled_calls("batch") > 0.0);
    // The poller keeps polling (every 200 ms): compare at a moment with no request in flight.
    let mut attempts = 0;
    loop {
        let served_before = sim.stats().requests;
        let counted = sum(
            &scrape(&http, admin).await,
            "b24eventd_upstream_requests_total",
            &[],
        );
        if counted == served_before as f64 && sim.stats().requests == served_before {
            break;
        }
        attempts += 1;
        assert!(
            attempts < 50,
            "answers counted ({counted}) = requests the simulator served ({served_before})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        sum(
            &samples,
            "b24eventd_upstream_requests_total",
            &[("outcome", "transport")]
        ),
        0.0
    );
    assert!(
        one(
            &samples,
            "b24eventd_operating_seconds",
            &[("portal", "main"), ("method", "event.offline.get")]
        ) >= 0.0
    );
    assert_eq!(
        one(
            &samples,
            "b24eventd_token_refreshes_total",
            &[("portal", "main")]
        ),
        0.0
    );
    assert!(
        one(
            &samples,
            "b24eventd_rate_limit_wait_seconds_total",
            &[("portal", "main")]
        ) >= 0.0
    );
    assert!(one(&samples, "b24eventd_journal_bytes", &[]) > 0.0);
    let polled = one(
        &samples,
        "b24eventd_last_successful_poll_timestamp_seconds",
        &[("portal", "main")],
    );
    let now = chrono::Utc::now().timestamp() as f64 + 1.0;
    assert!(
        polled >= started_at && polled <= now,
        "{started_at} <= {polled} <= {now}"
    );

    let (status, body) = get(&http, admin, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, r#"{"ready":true}"#));
    running.stop().await;
    assert!(
        tokio::net::TcpStream::connect(admin).await.is_err(),
        "the endpoint stops with the daemon"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_the_portal_that_fails_or_goes_away() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let config = admin_config(dir.path(), &sim, &file_sink(dir.path()));
    let running = Running::start(&config, &tokens).await;
    let admin = running.admin.expect("the admin endpoint is bound");
    let http = reqwest::Client::new();

    emit_deals(&sim, 1, 10);
    wait_for("events settled", Duration::from_secs(30), || {
        upstream_empty(&sim)
    })
    .await;
    let (status, body) = get(&http, admin, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, r#"{"ready":true}"#));

    // The portal answers every call with 500: not ready once the retry after the backoff fails.
    sim.set_faults(Faults {
        fail_500: 1.0,
        ..Faults::default()
    });
    let body = wait_not_ready(&http, admin).await;
    let reason = portal_reason(&body);
    assert!(reason.contains("rounds failed in a row"), "{reason}");
    assert!(reason.contains("INTERNAL_SERVER_ERROR"), "{reason}");
    let samples = scrape(&http, admin).await;
    assert!(
        sum(
            &samples,
            "b24eventd_upstream_requests_total",
            &[("outcome", "other")]
        ) >= 2.0
    );

    // Healthy again: ready after the next successful round.
    sim.set_faults(Faults::default());
    let start = std::time::Instant::now();
    loop {
        let (status, body) = get(&http, admin, "/readyz").await;
        if status == 200 {
            assert_eq!(body, r#"{"ready":true}"#);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "ready again: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The portal goes away: not ready, named, with the transport error.
    sim.shutdown();
    let body = wait_not_ready(&http, admin).await;
    let reason = portal_reason(&body);
    assert!(reason.contains("unreachable since 20"), "{reason}");
    let samples = scrape(&http, admin).await;
    assert!(
        sum(
            &samples,
            "b24eventd_upstream_requests_total",
            &[("outcome", "transport")]
        ) >= 2.0
    );
    let (status, _) = get(&http, admin, "/healthz").await;
    assert_eq!(status, 200, "alive while the portal is away");
    running.stop().await;
}

/// 200 idle TCP connections (a hostile or broken client) never hold more than the admin
/// endpoint's cap of the daemon's descriptors: beyond 64 the oldest idle ones are closed at once,
/// `/healthz` answers promptly in the middle of them, and every idle one is closed once the
/// header-read timeout (5 s) has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_capped_and_timed_out_while_healthz_answers() {
    use tokio::io::AsyncReadExt;
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let config = admin_config(dir.path(), &sim, &file_sink(dir.path()));
    let running = Running::start(&config, &tokens).await;
    let admin = running.admin.expect("the admin endpoint is bound");
    let opened = std::time::Instant::now();
    // Each idle connection reads until the server closes it; the task ends then.
    let mut idle = Vec::new();
    for _ in 0..200 {
        let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
        idle.push(tokio::spawn(async move {
            let mut buf = [0u8; 256];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            opened.elapsed()
        }));
    }
    let closed = |idle: &[tokio::task::JoinHandle<Duration>]| {
        idle.iter().filter(|task| task.is_finished()).count()
    };
    let http = reqwest::Client::new();
    let asked = std::time::Instant::now();
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(2), get(&http, admin, "/healthz"))
            .await
            .expect("/healthz answers among 200 idle connections");
    assert_eq!((status, body.as_str()), (200, r#"{"alive":true}"#));
    let healthz = asked.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let closed_at_once = closed(&idle);
    assert!(
        closed_at_once >= 200 - 64,
        "at most 64 connections stay open: {closed_at_once} of 200 closed"
    );
    assert!(
        opened.elapsed() < Duration::from_secs(4),
        "measured before the header-read timeout"
    );
    wait_for(
        "every idle connection closed",
        Duration::from_secs(10),
        || closed(&idle) == 200,
    )
    .await;
    let mut lifetimes = Vec::new();
    for task in idle {
        lifetimes.push(task.await.unwrap());
    }
    let longest = lifetimes.iter().max().unwrap();
    assert!(
        *longest >= Duration::from_secs(4) && *longest < Duration::from_secs(8),
        "the last idle connections were closed by the 5 s header-read timeout: {longest:?}"
    );
    let (status, _) = get(&http, admin, "/healthz").await;
    assert_eq!(status, 200);
    eprintln!(
        "200 idle connections: {closed_at_once} closed at once, the rest after {longest:?}; /healthz answered in {healthz:?}"
    );
    running.stop().await;
}

/// Answers the portal cut off after it reserved their events, and one whose `EVENT_DATA` is
/// nested deeper than the daemon parses (1,000 levels): each is logged at error and counted in
/// `b24eventd_unparsable_answers_total`; the cut-off reservations are adopted by the orphan
/// sweep (nothing lost), the too-deep one stays reserved upstream, and the portal goes on
/// fetching the events raised after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_answers_are_counted_and_never_stop_the_portal() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    sim.set_faults(Faults {
        unparsable_next_gets: 2,
        ..Faults::default()
    });
    emit_deals(&sim, 1, 100);
    let config = admin_config(dir.path(), &sim, &file_sink(dir.path()));
    let running = Running::start(&config, &tokens).await;
    let admin = running.admin.expect("the admin endpoint is bound");
    let http = reqwest::Client::new();
    wait_for("100 events settled", Duration::from_secs(60), || {
        upstream_empty(&sim) && sim.stats().cleared == 100
    })
    .await;
    assert_eq!(sim.stats().unparsable, 2);
    let unparsable = |samples: &[Sample]| {
        one(
            samples,
            "b24eventd_unparsable_answers_total",
            &[("portal", "main")],
        )
    };
    assert_eq!(unparsable(&scrape(&http, admin).await), 2.0);

    // Too deep to parse, raised through the simulator's control API.
    let emitted = http
        .post(format!("{}/_sim/emit", sim.base_url()))
        .body(r#"{"event": "ONCRMDEALUPDATE", "entity_id": 5000, "nest": 1500}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(emitted.status().as_u16(), 200);
    wait_for("the deep event reserved", Duration::from_secs(30), || {
        sim.stats().reserved == 1
    })
    .await;
    emit_deals(&sim, 101, 50);
    wait_for(
        "the 50 events raised after it settled",
        Duration::from_secs(60),
        || sim.stats().cleared == 150 && sim.stats().queued == 0,
    )
    .await;
    let stats = sim.stats();
    assert_eq!(stats.reserved, 1, "the deep event stays reserved upstream");
    assert!(unparsable(&scrape(&http, admin).await) >= 3.0);
    let delivered = file_ids(&dir.path().join("events.jsonl"));
    assert_eq!(delivered.len(), 150);
    assert!(delivered.values().all(|n| *n == 1), "no duplicates");
    running.stop().await;
}

/// Polls `/readyz` until it answers 503, and returns the parsed body.
async fn wait_not_ready(http: &reqwest::Client, admin: SocketAddr) -> serde_json::Value {
    let start = std::time::Instant::now();
    loop {
        let (status, body) = get(http, admin, "/readyz").await;
        if status == 503 {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["ready"], false, "{body}");
            return v;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not ready in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The reason given for `portal main`, the only component not ready.
fn portal_reason(body: &serde_json::Value) -> String {
    let not_ready = body["not_ready"].as_array().expect("not_ready list");
    assert_eq!(not_ready.len(), 1, "{body}");
    assert_eq!(not_ready[0]["component"], "portal main", "{body}");
    not_ready[0]["reason"].as_str().unwrap().to_string()
}

fn b24eventd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_b24eventd"))
        .args(args)
        .env_remove("B24EVENTD_CONFIG")
        .env_remove("B24EVENTD_ADMIN__LISTEN")
        .env_remove("B24EVENTD_ADMIN__ALLOW_REMOTE")
        .output()
        .expect("the binary runs")
}

fn daemon_config(dir: &Path, admin: &str) -> String {
    let text = format!(
        r#"
[journal]
path = "{dir}/j.db"
[admin]
{admin}
[portals.main]
client_endpoint = "https://example.bitrix24.com/rest/"
client_id = "local.1"
client_secret = "s3cret-value"
events = ["ONCRMDEALADD"]
[sinks.archive]
type = "file"
path = "{dir}/e.jsonl"
"#,
        dir = dir.display()
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_non_loopback_listen_needs_allow_remote() {
    let dir = tempfile::tempdir().unwrap();
    let path = daemon_config(dir.path(), "listen = \"0.0.0.0:9464\"");
    for command in ["validate", "run"] {
        let out = b24eventd(&["-c", &path, command]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{command}: {stderr}");
        assert!(
            stderr.contains("admin.listen")
                && stderr.contains("not a loopback address")
                && stderr.contains("admin.allow_remote = true"),
            "{command}: {stderr}"
        );
        assert!(!stderr.contains("s3cret-value"));
    }
    let path = daemon_config(dir.path(), "listen = \"0.0.0.0:9464\"\nallow_remote = true");
    let out = b24eventd(&["-c", &path, "validate"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_fails_when_the_admin_address_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let path = daemon_config(dir.path(), &format!("listen = \"{addr}\""));
    let out = b24eventd(&["-c", &path, "run"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("admin.listen {addr}: cannot listen")),
        "{stderr}"
    );
    drop(taken);
}

/// A portal whose `time` blocks hold absurd numbers (huge, negative, NaN-like, missing, not
/// even an object), in its answers and in 429 `OPERATION_TIME_LIMIT` refusals: nothing panics,
/// nothing stalls, every event is delivered and settled, `/readyz` stays honest and no task
/// was restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_time_blocks_neither_panic_nor_stop_the_portal() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let config = admin_config(dir.path(), &sim, &file_sink(dir.path()));
    let running = Running::start(&config, &tokens).await;
    let admin = running.admin.expect("the admin endpoint is bound");
    let http = reqwest::Client::new();
    let file = dir.path().join("events.jsonl");
    let hostile = [
        serde_json::json!({"operating_reset_at": i64::MAX, "finish": -1e300, "start": 1e300,
            "operating": 1e300, "processing": -1e300}),
        serde_json::json!({"operating_reset_at": i64::MIN, "finish": 1e300, "operating": -5}),
        serde_json::json!({"operating": 1e300, "operating_reset_at": i64::MAX}),
        serde_json::json!({"operating": "NaN", "finish": "inf", "start": "-inf",
            "operating_reset_at": "NaN", "processing": "NaN"}),
        serde_json::json!({"operating": 1e300}),
        serde_json::json!({}),
        serde_json::json!("garbage"),
        serde_json::Value::Null,
    ];
    let mut emitted = 0;
    for time in &hostile {
        sim.set_faults(Faults {
            time_block: Some(time.clone()),
            operating_limit_next: 2,
            ..Faults::default()
        });
        emit_deals(&sim, emitted + 1, 20);
        emitted += 20;
        wait_for(
            &format!("{emitted} events delivered and settled under time {time}"),
            Duration::from_secs(30),
            || file_ids(&file).len() == emitted as usize && upstream_empty(&sim),
        )
        .await;
        let (status, body) = get(&http, admin, "/readyz").await;
        assert_eq!(
            (status, body.as_str()),
            (200, r#"{"ready":true}"#),
            "{time}"
        );
    }
    // The portal behaves again: the daemon goes on as before.
    sim.set_faults(Faults::default());
    emit_deals(&sim, emitted + 1, 20);
    emitted += 20;
    wait_for("the last events delivered", Duration::from_secs(30), || {
        file_ids(&file).len() == emitted as usize && upstream_empty(&sim)
    })
    .await;
    assert!(sim.stats().rejected_429 >= 2 * hostile.len() as u64);
    let samples = scrape(&http, admin).await;
    assert_eq!(sum(&samples, "b24eventd_task_restarts_total", &[]), 0.0);
    assert!(!running.task.is_finished(), "still running");
    running.stop().await;
    assert!(file_ids(&file).values().all(|n| *n == 1), "no duplicates");
}

/// A supervised task that panics: `/readyz` names it until it runs again, the restart is
/// counted in `/metrics`, and a finished task (at shutdown) is neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervised_task_that_panics_is_restarted_counted_and_not_ready_meanwhile() {
    use b24eventd::supervisor::{Policy, Supervisor};
    init();
    let dir = tempfile::tempdir().unwrap();
    let journal = open_journal(dir.path()).await;
    let metrics = b24eventd::metrics::Metrics::new(Vec::new());
    let policy = Policy {
        backoff: Duration::from_secs(2),
        ..Policy::default()
    };
    let tasks = Supervisor::with_policy(metrics.clone(), policy);
    let server = b24eventd::admin::AdminServer::start(
        "127.0.0.1:0".parse().unwrap(),
        b24eventd::admin::AdminState {
            metrics: metrics.clone(),
            liveness: b24eventd::pipeline::liveness::Liveness::new(&Vec::<String>::new()),
            journal,
            portals: Vec::new(),
            tasks: tasks.clone(),
        },
    )
    .await
    .unwrap();
    let admin = server.local_addr();
    let http = reqwest::Client::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let task = {
        let (runs, stop) = (runs.clone(), stop.clone());
        tokio::spawn(tasks.supervise("dispatcher/erp", stop.clone(), move || {
            let run = runs.fetch_add(1, Ordering::SeqCst);
            let stop = stop.clone();
            async move {
                if run == 0 {
                    panic!("a defect in the dispatcher");
                }
                stop.cancelled().await;
                Ok(())
            }
        }))
    };
    let body = wait_not_ready(&http, admin).await;
    let not_ready = body["not_ready"].as_array().unwrap();
    assert_eq!(not_ready.len(), 1, "{body}");
    assert_eq!(not_ready[0]["component"], "task dispatcher/erp");
    let reason = not_ready[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("panicked: a defect in the dispatcher"),
        "{reason}"
    );
    assert_eq!(
        sum(
            &scrape(&http, admin).await,
            "b24eventd_task_restarts_total",
            &[]
        ),
        0.0
    );
    wait_for("the restart", Duration::from_secs(10), || {
        runs.load(Ordering::SeqCst) == 2
    })
    .await;
    let (status, body) = get(&http, admin, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, r#"{"ready":true}"#));
    let samples = scrape(&http, admin).await;
    assert_eq!(
        one(
            &samples,
            "b24eventd_task_restarts_total",
            &[("task", "dispatcher/erp")]
        ),
        1.0
    );
    stop.cancel();
    assert_eq!(task.await.unwrap(), Some(()));
    assert_eq!(tasks.given_up(), None);
    server.stop().await;
}
