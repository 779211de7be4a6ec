//! The `nats` sink against a real nats-server with JetStream (127.0.0.1:4222; ignored
//! unless asked for): 1,000 events read back from the stream, a broker cut mid-run, SIGKILLs of the
//! real binary with the server dropping the redeliveries by `Nats-Msg-Id`, the healthcheck and
//! `validate --online`.

use crate::support::daemon;
use crate::support::proxy::TcpProxy;
use crate::support::sink::*;
use crate::support::*;
use async_nats::jetstream;
use b24eventd_simulator::SimulatorConfig;
use futures_util::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const NATS: &str = "127.0.0.1:4222";
const START_NATS: &str = "nats-server -js -p 4222";

/// A JetStream context on the shared server; fails the test naming the service when it is down.
async fn jetstream() -> jetstream::Context {
    let server = format!("nats-server at {NATS}");
    let client = tokio::time::timeout(
        Duration::from_secs(5),
        async_nats::connect(format!("nats://{NATS}")),
    )
    .await
    .unwrap_or_else(|_| service_down(&server, START_NATS, "no answer within 5 s"))
    .unwrap_or_else(|e| service_down(&server, START_NATS, e));
    jetstream::new(client)
}

/// A stream name and subject prefix no other run uses.
fn unique(prefix: &str) -> (String, String) {
    let tag = format!("{}{:08x}", std::process::id(), fastrand::u32(..));
    (format!("{prefix}_{tag}"), format!("b24t{tag}"))
}

fn nats_sink(url: &str, stream: &str, prefix: &str, create_stream: bool) -> String {
    format!(
        r#"[sinks.bus]
type = "nats"
url = "{url}"
subject = "{prefix}.{{portal}}.{{event}}"
stream = "{stream}"
create_stream = {create_stream}
timeout = "2s"
concurrency = 2
[sinks.bus.retry]
max_attempts = 100
initial_backoff = "100ms"
max_backoff = "1s"
"#
    )
}

/// One stored message: subject, `Nats-Msg-Id`, the envelope.
struct Stored {
    subject: String,
    msg_id: Option<String>,
    envelope: serde_json::Value,
}

/// Every message of `stream`, read with an ordered consumer.
async fn read_stream(js: &jetstream::Context, stream: &str) -> Vec<Stored> {
    let mut handle = js.get_stream(stream).await.expect("the stream exists");
    let count = handle.info().await.unwrap().state.messages as usize;
    let consumer = handle
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("the stream's messages arrive")
            .expect("the consumer stays open")
            .unwrap();
        out.push(Stored {
            subject: message.subject.to_string(),
            msg_id: message
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.to_string()),
            envelope: serde_json::from_slice(&message.payload).expect("a JSON envelope"),
        });
    }
    out
}

/// Checks that every expected event is stored exactly once, with its id as `Nats-Msg-Id` and
/// on its subject; returns the envelopes by id.
fn assert_exactly_once(
    stored: &[Stored],
    prefix: &str,
    first: u64,
    count: u64,
) -> BTreeMap<String, serde_json::Value> {
    let mut by_id = BTreeMap::new();
    for m in stored {
        let id = m.envelope["id"].as_str().unwrap().to_string();
        assert_eq!(
            m.msg_id.as_deref(),
            Some(id.as_str()),
            "Nats-Msg-Id is the id"
        );
        let event = m.envelope["event"].as_str().unwrap().to_lowercase();
        assert_eq!(m.subject, format!("{prefix}.main.{event}"));
        assert!(
            by_id.insert(id.clone(), m.envelope.clone()).is_none(),
            "{id} stored twice"
        );
    }
    let entities: BTreeSet<(String, String)> = by_id
        .values()
        .map(|v| {
            (
                v["event"].as_str().unwrap().to_string(),
                v["data"]["FIELDS"]["ID"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected = expected_entities(first, count);
    let missing: Vec<_> = expected.difference(&entities).collect();
    assert!(missing.is_empty(), "lost events: {missing:?}");
    assert_eq!(
        stored.len(),
        count as usize,
        "exactly one message per event"
    );
    by_id
}

#[ignore = "needs nats-server (JetStream) on 127.0.0.1:4222: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_events_are_stored_once_with_their_ids() {
    init();
    let js = jetstream().await;
    let (stream, prefix) = unique("B24T_BULK");
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let sinks = nats_sink(&format!("nats://{NATS}"), &stream, &prefix, true);
    let config = write_config(dir.path(), &sim, None, "batch_size = 200", &sinks);
    let started = Instant::now();
    let running = Running::start(&config, &tokens).await;
    emit_deals(&sim, 1, 1000);
    wait_for("the portal queue drained", Duration::from_secs(60), || {
        upstream_empty(&sim)
    })
    .await;
    let elapsed = started.elapsed();
    let journal = running.journal.clone();
    running.stop().await;

    let stored = read_stream(&js, &stream).await;
    let by_id = assert_exactly_once(&stored, &prefix, 1, 1000);
    // The content is the envelope, field for field.
    let sample = by_id
        .values()
        .find(|v| v["offline_id"] == 1)
        .expect("offline ID 1 is stored");
    assert_eq!(sample["portal"], "main");
    assert_eq!(sample["offline_id"], 1);
    assert_eq!(sample["lane"], "normal");
    assert!(sample["message_id"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(sample.as_object().unwrap().len(), 11);
    for (id, envelope) in &by_id {
        assert_eq!(id, &expected_key(envelope), "the key of the change");
    }
    let info = js
        .get_stream(&stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.subjects, vec![format!("{prefix}.*.*")]);
    assert_eq!(info.config.duplicate_window, Duration::from_secs(600));
    assert_eq!(info.config.storage, jetstream::stream::StorageType::File);
    assert_eq!(
        journal_duplicates(&journal, "bus"),
        0,
        "no redelivery without faults"
    );
    eprintln!(
        "nats: 1000 events delivered and drained in {:.1} s",
        elapsed.as_secs_f64()
    );
    js.delete_stream(&stream).await.unwrap();
}

/// An event stored in the stream and dead at another sink is errored into Bitrix24's error lane;
/// a later change merges into that row (same ID, new TIMESTAMP_X). The error-lane poll publishes
/// the later change with a new `Nats-Msg-Id`, so the server stores it instead of dropping it as
/// a duplicate within its window; the unchanged error-lane copy of another event is not
/// published again.
#[ignore = "needs nats-server (JetStream) on 127.0.0.1:4222: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_lane_merge_is_stored_not_dropped_as_a_duplicate() {
    init();
    let js = jetstream().await;
    let (stream, prefix) = unique("B24T_MERGE");
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let sinks = nats_sink(&format!("nats://{NATS}"), &stream, &prefix, true);
    let merge = error_lane::error_lane_merge(dir.path(), &sim, &tokens, &sinks, |journal| {
        error_lane::delivered_to(journal, "bus") == 2
    })
    .await;
    let stored = read_stream(&js, &stream).await;
    let ids: Vec<String> = stored
        .iter()
        .map(|m| {
            let id = m.envelope["id"].as_str().unwrap().to_string();
            assert_eq!(
                m.msg_id.as_deref(),
                Some(id.as_str()),
                "Nats-Msg-Id is the id"
            );
            id
        })
        .collect();
    let merged_key = error_lane::key_of(&merge.merged);
    assert_eq!(ids.len(), 3, "three messages: {ids:?}");
    assert_eq!(
        ids.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            error_lane::key_of(&merge.deal1),
            error_lane::key_of(&merge.deal2),
            merged_key.clone()
        ])
    );
    assert_eq!(ids[2], merged_key, "the later change came last");
    assert_eq!(stored[2].envelope["lane"], "error");
    let events = error_lane::journal_events(&merge.journal);
    let copy1 = events
        .iter()
        .find(|r| r.1 == merge.deal1.id && r.3 == "error")
        .expect("deal 1's error-lane copy");
    assert!(
        !error_lane::journal_deliveries(&merge.journal, copy1.0).contains_key("bus"),
        "the unchanged copy is not published again"
    );
    assert_eq!(
        journal_duplicates(&merge.journal, "bus"),
        0,
        "no PubAck said duplicate"
    );
    js.delete_stream(&stream).await.unwrap();
}

#[ignore = "needs nats-server (JetStream) on 127.0.0.1:4222: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_cut_mid_run_loses_nothing_and_stores_nothing_twice() {
    init();
    let js = jetstream().await;
    let (stream, prefix) = unique("B24T_CUT");
    // The operator made the stream (create_stream = false).
    js.create_stream(jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{prefix}.>")],
        duplicate_window: Duration::from_secs(300),
        ..Default::default()
    })
    .await
    .unwrap();
    let proxy = TcpProxy::start(NATS).await;
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let sinks = nats_sink(&format!("nats://{}", proxy.addr()), &stream, &prefix, false);
    let config = write_config(dir.path(), &sim, None, "batch_size = 50", &sinks);
    let running = Running::start(&config, &tokens).await;

    emit_deals(&sim, 1, 300);
    let journal = running.journal.clone();
    wait_for(
        "some deliveries before the cut",
        Duration::from_secs(30),
        || journal.counts_blocking().unwrap().delivered > 0,
    )
    .await;
    proxy.cut();
    emit_deals(&sim, 301, 400);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let retried = journal.counts_blocking().unwrap().retried_attempts;
    proxy.restore();
    emit_deals(&sim, 701, 300);
    wait_for("the portal queue drained", Duration::from_secs(90), || {
        upstream_empty(&sim)
    })
    .await;
    running.stop().await;

    let stored = read_stream(&js, &stream).await;
    assert_exactly_once(&stored, &prefix, 1, 1000);
    assert!(retried > 0, "the cut made deliveries fail and retry");
    eprintln!(
        "nats cut: {retried} retried attempts during the cut, {} duplicates dropped by the server",
        journal_duplicates(&journal, "bus")
    );
    js.delete_stream(&stream).await.unwrap();
}

#[ignore = "needs nats-server (JetStream) on 127.0.0.1:4222: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_of_the_binary_store_every_event_once_by_server_dedupe() {
    init();
    let js = jetstream().await;
    let (stream, prefix) = unique("B24T_KILL");
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig {
        seed: 11,
        ..SimulatorConfig::default()
    })
    .await;
    let slow = crate::support::slow_proxy::start(NATS, Duration::from_millis(150)).await;
    let sinks = nats_sink(&format!("nats://{slow}"), &stream, &prefix, true);
    let config = write_config(dir.path(), &sim, None, "batch_size = 50", &sinks);
    crate::support::cli::store_tokens(dir.path(), &tokens).await;
    let log = dir.path().join("daemon.log");

    // Events keep arriving while the daemon is killed, and acks reach it 150 ms late, so kills
    // land while published batches wait for their acks. Killing continues (up to 30 times)
    // until the journal shows the server dropped a redelivery: a kill between the PubAck and
    // the journal's commit.
    const TOTAL: u64 = 2000;
    let started = Instant::now();
    let kills = sigkill_until_a_duplicate(&config, &log, &sim, "bus", TOTAL, 5).await;

    let journal = daemon::last_run_drains_and_stops(
        &config,
        &log,
        &sim,
        dir.path(),
        Duration::from_secs(120),
    )
    .await;

    let stored = read_stream(&js, &stream).await;
    assert_exactly_once(&stored, &prefix, 1, TOTAL);
    let duplicates = journal_duplicates(&journal, "bus");
    eprintln!(
        "nats crash test: {kills} SIGKILLs in {:.1} s, {TOTAL} events stored once each, \
         {duplicates} redeliveries dropped by the server as duplicates (journal)",
        started.elapsed().as_secs_f64()
    );
    assert!(
        duplicates > 0,
        "no kill landed between a PubAck and the journal commit: the dedupe was not exercised"
    );
    js.delete_stream(&stream).await.unwrap();
}

#[ignore = "needs nats-server (JetStream) on 127.0.0.1:4222: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_and_validate_online() {
    init();
    let js = jetstream().await;
    let (stream, prefix) = unique("B24T_HEALTH");
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    crate::support::cli::store_tokens(dir.path(), &tokens).await;
    let health = |sinks: String| {
        let sink = build_sink(dir.path(), &sim, &sinks, "bus");
        async move { sink.health().await }
    };
    use b24eventd::sinks::HealthLevel;

    // Missing stream: fail without create_stream, ok with it (and nothing is created).
    let h = health(nats_sink(
        &format!("nats://{NATS}"),
        &stream,
        &prefix,
        false,
    ))
    .await;
    assert_eq!(h.level, HealthLevel::Fail, "{h:?}");
    assert!(h.detail.contains("does not exist"), "{h:?}");
    assert!(h.fix.as_deref().unwrap().contains("create_stream"), "{h:?}");
    let h = health(nats_sink(&format!("nats://{NATS}"), &stream, &prefix, true)).await;
    assert_eq!(h.level, HealthLevel::Ok, "{h:?}");
    assert!(h.detail.contains("created"), "{h:?}");
    assert!(
        js.get_stream(&stream).await.is_err(),
        "the check created nothing"
    );

    // A stream whose subjects do not cover the template.
    js.create_stream(jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{prefix}.main.only")],
        duplicate_window: Duration::from_secs(300),
        ..Default::default()
    })
    .await
    .unwrap();
    let h = health(nats_sink(
        &format!("nats://{NATS}"),
        &stream,
        &prefix,
        false,
    ))
    .await;
    assert_eq!(h.level, HealthLevel::Fail, "{h:?}");
    assert!(h.detail.contains("does not cover"), "{h:?}");

    // Covering subjects: ok, through the real binary's `validate --online` too.
    js.update_stream(jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{prefix}.>")],
        duplicate_window: Duration::from_secs(300),
        ..Default::default()
    })
    .await
    .unwrap();
    let sinks = nats_sink(&format!("nats://{NATS}"), &stream, &prefix, false);
    let h = health(sinks.clone()).await;
    assert_eq!(h.level, HealthLevel::Ok, "{h:?}");
    assert!(
        h.detail.contains(&format!("captures {prefix}.*.*")),
        "{h:?}"
    );
    let out = validate_online(dir.path(), &sim, &sinks, &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("stream {stream} captures")),
        "{stdout}"
    );

    // A closed port: a clear failure that never shows the password.
    let port = free_port();
    let closed = nats_sink(
        &format!("nats://user:hunter2@127.0.0.1:{port}"),
        &stream,
        &prefix,
        false,
    );
    let h = health(closed.clone()).await;
    assert_eq!(h.level, HealthLevel::Fail, "{h:?}");
    assert!(
        h.detail
            .contains(&format!("cannot connect to nats://127.0.0.1:{port}")),
        "{h:?}"
    );
    assert!(!format!("{h:?}").contains("hunter2"), "{h:?}");
    a_closed_port_fails_clearly(dir.path(), &sim, &closed, "bus", "hunter2").await;
    js.delete_stream(&stream).await.unwrap();
}
