//! The `redis` sink against the real local Redis (127.0.0.1:6379), with the real pipeline and the
//! portal simulator: 1,000 events arrive exactly once as stream entries, a broker cut off
//! mid-run loses nothing, `validate --online` passes against the live server and fails clearly
//! against a closed port or a key that is not a stream, and error replies are per envelope.
//! Ignored unless asked for (`--include-ignored`); then a Redis that does not answer fails them.

use crate::support::proxy::TcpProxy;
use crate::support::sink::{envelope, sink_check, validate_online};
use crate::support::*;
use b24eventd::config::{self, SinkKind};
use b24eventd::envelope::Envelope;
use b24eventd::sinks::SinkResult;
use b24eventd_simulator::SimulatorConfig;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

const REDIS: &str = "127.0.0.1:6379";
const START_REDIS: &str = "redis-server --port 6379 --daemonize yes";

/// A connection to the local Redis; panics (the test fails) when it does not answer.
async fn redis_conn() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(format!("redis://{REDIS}/")).unwrap();
    match tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => service_down(&format!("redis at {REDIS}"), START_REDIS, e),
        Err(_) => service_down(
            &format!("redis at {REDIS}"),
            START_REDIS,
            "no answer within 5 s",
        ),
    }
}

/// A key prefix no other run or test uses; every key under it is deleted on drop.
struct Keys(String);

impl Keys {
    fn new(test: &str) -> Keys {
        Keys(format!(
            "b24eventd-test:{test}:{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ))
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        // Blocking and best effort: runs on panics too.
        let Ok(client) = redis::Client::open(format!("redis://{REDIS}/")) else {
            return;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_secs(2)) else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.0))
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(keys).query(&mut conn);
        }
    }
}

fn redis_sink(url: &str, stream: &str) -> String {
    format!(
        "[sinks.stream]\ntype = \"redis\"\nurl = \"{url}\"\nstream = \"{stream}\"\ntimeout = \"2s\"\nconcurrency = 2\n[sinks.stream.retry]\nmax_attempts = 50\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n"
    )
}

/// One stream entry: its fields.
type Entry = HashMap<String, String>;

async fn read_stream(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<Entry> {
    let entries: Vec<(String, Entry)> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    entries.into_iter().map(|(_, fields)| fields).collect()
}

async fn stream_len(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> usize {
    redis::cmd("XLEN").arg(key).query_async(conn).await.unwrap()
}

/// Checks every entry's fields against its envelope; returns envelope id → entries with it and
/// the (event, entity id) pairs seen.
fn check_entries(entries: &[Entry]) -> (BTreeMap<String, usize>, BTreeSet<(String, String)>) {
    let mut ids = BTreeMap::new();
    let mut entities = BTreeSet::new();
    for fields in entries {
        let mut names: Vec<&str> = fields.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["envelope", "event", "id", "portal"], "{fields:?}");
        let envelope: Envelope =
            serde_json::from_str(&fields["envelope"]).expect("the envelope field is an envelope");
        assert_eq!(fields["id"], envelope.id);
        assert_eq!(fields["event"], envelope.event);
        assert_eq!(fields["portal"], envelope.portal);
        assert_eq!(envelope.portal, "main");
        assert_eq!(
            envelope.id,
            Envelope::make_id(&envelope.portal, envelope.offline_id, &envelope.timestamp)
        );
        *ids.entry(envelope.id.clone()).or_insert(0) += 1;
        entities.insert((
            envelope.event.clone(),
            envelope.data["FIELDS"]["ID"]
                .as_str()
                .expect("a deal id")
                .to_string(),
        ));
    }
    (ids, entities)
}

#[ignore = "needs Redis on 127.0.0.1:6379: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_events_arrive_exactly_once_as_stream_entries() {
    init();
    let mut conn = redis_conn().await;
    let keys = Keys::new("all");
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let sinks = redis_sink(
        &format!("redis://{REDIS}/"),
        &format!("{}:{{portal}}", keys.0),
    );
    let config = write_config(dir.path(), &sim, None, "", &sinks);
    let running = Running::start(&config, &tokens).await;

    let started = Instant::now();
    emit_deals(&sim, 1, 1000);
    wait_for(
        "1,000 events delivered and cleared upstream",
        Duration::from_secs(45),
        || upstream_empty(&sim),
    )
    .await;
    let elapsed = started.elapsed();
    let journal = running.journal.clone();
    running.stop().await;

    let key = format!("{}:main", keys.0);
    let entries = read_stream(&mut conn, &key).await;
    let (ids, entities) = check_entries(&entries);
    eprintln!(
        "redis: 1000 events emitted to {} stream entries in {:.2} s",
        entries.len(),
        elapsed.as_secs_f64()
    );
    assert_eq!(entries.len(), 1000, "one entry per event");
    assert_eq!(ids.len(), 1000);
    assert!(
        ids.values().all(|n| *n == 1),
        "no duplicates without faults"
    );
    assert_eq!(entities, expected_entities(1, 1000));
    let counts = journal.counts().await.unwrap();
    assert_eq!((counts.delivered, counts.dead), (1000, 0), "{counts:?}");
    assert_eq!(counts.cleared, 1000, "{counts:?}");
}

#[ignore = "needs Redis on 127.0.0.1:6379: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_cut_mid_run_loses_nothing() {
    init();
    let mut conn = redis_conn().await;
    let keys = Keys::new("cut");
    let proxy = TcpProxy::start(REDIS).await;
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let sinks = redis_sink(&format!("redis://{}/", proxy.addr()), &keys.0);
    let config = write_config(dir.path(), &sim, None, "", &sinks);
    let running = Running::start(&config, &tokens).await;

    let started = Instant::now();
    emit_deals(&sim, 1, 500);
    let deadline = Instant::now() + Duration::from_secs(30);
    while stream_len(&mut conn, &keys.0).await < 100 {
        assert!(Instant::now() < deadline, "no deliveries before the cut");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.cut();
    let at_cut = stream_len(&mut conn, &keys.0).await;
    emit_deals(&sim, 501, 500);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during_cut = stream_len(&mut conn, &keys.0).await;
    proxy.restore();
    let restored = Instant::now();
    while stream_len(&mut conn, &keys.0).await < 1000 {
        assert!(
            restored.elapsed() < Duration::from_secs(45),
            "deliveries resume after the restore"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let redelivered = restored.elapsed();
    wait_for(
        "every event delivered after the cut",
        Duration::from_secs(45),
        || upstream_empty(&sim),
    )
    .await;
    let elapsed = started.elapsed();
    let recovered = restored.elapsed();
    let journal = running.journal.clone();
    running.stop().await;

    let entries = read_stream(&mut conn, &keys.0).await;
    let (ids, entities) = check_entries(&entries);
    let duplicates = entries.len() - ids.len();
    eprintln!(
        "redis cut: {at_cut} entries at the cut, {during_cut} after 3 s cut off, {} entries for {} events ({duplicates} duplicates) in {:.2} s, all in the stream {:.2} s after the restore, all cleared {:.2} s after it",
        entries.len(),
        ids.len(),
        elapsed.as_secs_f64(),
        redelivered.as_secs_f64(),
        recovered.as_secs_f64()
    );
    assert!(at_cut < 1000, "the cut came mid-run ({at_cut} delivered)");
    assert!(
        during_cut <= at_cut + 100,
        "nothing (but a pipeline in flight) arrives while cut off: {at_cut} -> {during_cut}"
    );
    assert_eq!(ids.len(), 1000, "every event arrived");
    assert_eq!(entities, expected_entities(1, 1000));
    let counts = journal.counts().await.unwrap();
    assert!(
        counts.retried_attempts > 0,
        "the cut made deliveries retry: {counts:?}"
    );
    assert_eq!((counts.delivered, counts.dead), (1000, 0), "{counts:?}");
}

#[ignore = "needs Redis on 127.0.0.1:6379: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_online_checks_the_server_and_the_key() {
    init();
    let mut conn = redis_conn().await;
    let keys = Keys::new("validate");
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    crate::support::cli::store_tokens(dir.path(), &tokens).await;

    // The live server, a stream that does not exist yet: ok, and nothing was written.
    let out = validate_online(
        dir.path(),
        &sim,
        &redis_sink(&format!("redis://{REDIS}/"), &keys.0),
        &["--json"],
    )
    .await;
    let check = sink_check(&out, "stream", "redis");
    assert_eq!(out.status.code(), Some(0), "{check:#}");
    assert_eq!(check["status"], "ok", "{check:#}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("does not exist yet"),
        "{check:#}"
    );
    assert_eq!(
        stream_len(&mut conn, &keys.0).await,
        0,
        "the check writes nothing"
    );

    // A key that is not a stream: fail, saying so.
    let _: () = redis::cmd("SET")
        .arg(&keys.0)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let out = validate_online(
        dir.path(),
        &sim,
        &redis_sink(&format!("redis://{REDIS}/"), &keys.0),
        &["--json"],
    )
    .await;
    let check = sink_check(&out, "stream", "redis");
    assert_eq!(out.status.code(), Some(1), "{check:#}");
    assert_eq!(check["status"], "fail");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("holds a string, not a stream"),
        "{check:#}"
    );
    assert!(
        check["fix"].as_str().unwrap().contains("delete or rename"),
        "{check:#}"
    );

    // A closed port: a clear fail naming the address, never the password.
    let out = validate_online(
        dir.path(),
        &sim,
        &redis_sink("redis://ops:hunter2@127.0.0.1:1/", &keys.0),
        &["--json"],
    )
    .await;
    let check = sink_check(&out, "stream", "redis");
    assert_eq!(out.status.code(), Some(1), "{check:#}");
    assert_eq!(check["status"], "fail");
    let detail = check["detail"].as_str().unwrap();
    assert!(
        detail.contains("cannot connect to redis") && detail.contains("127.0.0.1:1"),
        "{detail}"
    );
    for stream in [&out.stdout, &out.stderr] {
        assert!(!String::from_utf8_lossy(stream).contains("hunter2"));
    }

    // A config error: exit 78, naming the key.
    let out = validate_online(
        dir.path(),
        &sim,
        "[sinks.stream]\ntype = \"redis\"\nurl = \"redis://h/\"\nstream = \"s:{deal}\"\n",
        &["--json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sinks.stream.stream") && stderr.contains("unknown placeholder {deal}"),
        "{stderr}"
    );
}

#[ignore = "needs Redis on 127.0.0.1:6379: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_reply_fails_only_its_own_envelope() {
    init();
    let mut conn = redis_conn().await;
    let keys = Keys::new("wrongtype");
    let dir = tempfile::tempdir().unwrap();
    let (sim, _) = portal(SimulatorConfig::default()).await;
    let config_path = write_config(
        dir.path(),
        &sim,
        None,
        "",
        &redis_sink(
            &format!("redis://{REDIS}/"),
            &format!("{}:{{event}}", keys.0),
        ),
    );
    let config = config::load(&config_path).unwrap();
    let sink_config = &config.sinks["stream"];
    assert!(matches!(sink_config.kind, SinkKind::Redis(_)));
    let sink = b24eventd::sinks::build(sink_config).unwrap();

    // The UPDATE stream's key holds a string: its XADDs fail, the ADDs in the same pipeline land.
    let update_key = format!("{}:ONCRMDEALUPDATE", keys.0);
    let _: () = redis::cmd("SET")
        .arg(&update_key)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let batch: Vec<Envelope> = (1..=6)
        .map(|n| {
            envelope(
                n,
                if n % 2 == 0 {
                    "ONCRMDEALADD"
                } else {
                    "ONCRMDEALUPDATE"
                },
            )
        })
        .collect();
    let results = sink.deliver(&batch).await;
    assert_eq!(results.len(), 6);
    for (envelope, result) in batch.iter().zip(&results) {
        if envelope.event == "ONCRMDEALADD" {
            assert_eq!(result, &SinkResult::Delivered);
        } else {
            match result {
                SinkResult::Retry { error, .. } => assert!(error.contains("WRONGTYPE"), "{error}"),
                other => panic!("WRONGTYPE is retried: {other:?}"),
            }
        }
    }
    assert_eq!(
        stream_len(&mut conn, &format!("{}:ONCRMDEALADD", keys.0)).await,
        3
    );

    // Once an operator removes the key, the same envelopes go through.
    let _: () = redis::cmd("DEL")
        .arg(&update_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let retried: Vec<Envelope> = batch
        .into_iter()
        .filter(|e| e.event == "ONCRMDEALUPDATE")
        .collect();
    assert_eq!(sink.deliver(&retried).await, vec![SinkResult::Delivered; 3]);
    let entries = read_stream(&mut conn, &update_key).await;
    let ids: Vec<&str> = entries.iter().map(|e| e["id"].as_str()).collect();
    assert_eq!(
        ids,
        [
            "main:1:1795330800",
            "main:3:1795330800",
            "main:5:1795330800"
        ]
    );
}
