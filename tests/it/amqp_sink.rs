//! The `amqp` sink against a real RabbitMQ on 127.0.0.1:5672 (guest/guest), ignored unless
//! asked for (`--include-ignored`): 1,000 events read back from the queue exactly once with their
//! properties, RabbitMQ cut off mid-run through a TCP proxy without a loss, an unroutable
//! message not counted delivered, and `validate --online` against the live broker and a closed
//! port. Every test uses its own exchange and queue, deleted at the end (also on a failure).

use crate::support::proxy::TcpProxy;
use crate::support::sink::{envelope, validate_online};
use crate::support::*;
use b24eventd::envelope::Envelope;
use b24eventd::sinks::{self, SinkResult};
use b24eventd_simulator::SimulatorConfig;
use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

const BROKER: &str = "127.0.0.1:5672";
const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A channel on the test's own connection to RabbitMQ; fails the test when it is down.
async fn broker() -> (Connection, Channel) {
    let connection = Connection::connect(URL, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| {
            service_down(
                &format!("RabbitMQ at {BROKER} (guest/guest)"),
                "rabbitmq-server -detached",
                e,
            )
        });
    let channel = connection.create_channel().await.expect("channel opens");
    (connection, channel)
}

/// A name no other run or test uses.
fn unique(what: &str) -> String {
    format!(
        "b24test.{what}.{}.{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

/// Deletes the test's exchanges and queues when dropped, on success and on panic alike.
struct Cleanup {
    exchanges: Vec<String>,
    queues: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let exchanges = std::mem::take(&mut self.exchanges);
        let queues = std::mem::take(&mut self.queues);
        // Its own thread and runtime: Drop cannot await, and may run inside a runtime.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let Ok(connection) =
                    Connection::connect(URL, ConnectionProperties::default()).await
                else {
                    return;
                };
                for queue in queues {
                    if let Ok(channel) = connection.create_channel().await {
                        let _ = channel
                            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                for exchange in exchanges {
                    if let Ok(channel) = connection.create_channel().await {
                        let _ = channel
                            .exchange_delete(
                                exchange.as_str().into(),
                                ExchangeDeleteOptions::default(),
                            )
                            .await;
                    }
                }
                let _ = connection.close(200, "OK".into()).await;
            });
        })
        .join();
    }
}

/// One message read back from a queue.
#[derive(Debug)]
struct Received {
    routing_key: String,
    message_id: Option<String>,
    delivery_mode: Option<u8>,
    content_type: Option<String>,
    kind: Option<String>,
    app_id: Option<String>,
    portal_header: Option<AMQPValue>,
    body: serde_json::Value,
}

/// Takes every message out of `queue` (acknowledged by the get).
async fn drain(channel: &Channel, queue: &str) -> Vec<Received> {
    let mut received = Vec::new();
    let options = BasicGetOptions { no_ack: true };
    while let Some(message) = channel
        .basic_get(queue.into(), options)
        .await
        .expect("basic.get")
    {
        let delivery = message.delivery;
        let p = &delivery.properties;
        received.push(Received {
            routing_key: delivery.routing_key.to_string(),
            message_id: p.message_id().as_ref().map(|s| s.to_string()),
            delivery_mode: *p.delivery_mode(),
            content_type: p.content_type().as_ref().map(|s| s.to_string()),
            kind: p.kind().as_ref().map(|s| s.to_string()),
            app_id: p.app_id().as_ref().map(|s| s.to_string()),
            portal_header: p
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("portal").cloned()),
            body: serde_json::from_slice(&delivery.data).expect("the body is a JSON envelope"),
        });
    }
    received
}

/// Messages waiting in `queue` (a passive declare on a channel of its own: the broker closes
/// the channel when the queue does not exist yet); 0 while it does not.
async fn queue_depth(connection: &Connection, queue: &str) -> u32 {
    let channel = connection.create_channel().await.expect("channel opens");
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    match channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
    {
        Ok(declared) => {
            let _ = channel.close(200, "OK".into()).await;
            declared.message_count()
        }
        Err(_) => 0,
    }
}

/// `[sinks.bus]` of type amqp; `extra` adds keys.
fn amqp_sink(url: &str, exchange: &str, extra: &str) -> String {
    format!(
        r#"[sinks.bus]
type = "amqp"
url = "{url}"
exchange = "{exchange}"
timeout = "3s"
concurrency = 4
{extra}
[sinks.bus.retry]
max_attempts = 50
initial_backoff = "100ms"
max_backoff = "1s"
"#
    )
}

/// Distinct envelope ids and how many ids came more than once.
fn distinct_ids(received: &[Received]) -> (BTreeSet<String>, usize) {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for message in received {
        *counts
            .entry(message.body["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let dupes = counts.values().filter(|&&n| n > 1).count();
    (counts.into_keys().collect(), dupes)
}

fn entities(received: &[Received]) -> BTreeSet<(String, String)> {
    received
        .iter()
        .map(|m| {
            (
                m.body["event"].as_str().unwrap().to_string(),
                m.body["data"]["FIELDS"]["ID"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[ignore = "needs RabbitMQ on 127.0.0.1:5672: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_sink_delivers_1000_events_exactly_once_with_their_properties() {
    init();
    let (connection, channel) = broker().await;
    let (exchange, queue) = (unique("events"), unique("erp"));
    let _cleanup = Cleanup {
        exchanges: vec![exchange.clone()],
        queues: vec![queue.clone()],
    };
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let sink = amqp_sink(
        URL,
        &exchange,
        &format!("declare_exchange = \"topic\"\nqueue = \"{queue}\"\nqueue_binding = \"main.#\""),
    );
    let config = write_config(dir.path(), &sim, None, "batch_size = 50", &sink);
    let running = Running::start(&config, &tokens).await;
    let started = Instant::now();
    emit_deals(&sim, 1, 1000);
    wait_for(
        "all 1,000 events cleared upstream",
        Duration::from_secs(45),
        || upstream_empty(&sim) && sim.stats().cleared >= 1000,
    )
    .await;
    let elapsed = started.elapsed();
    let journal = running.journal.clone();
    running.stop().await;

    let received = drain(&channel, &queue).await;
    let (ids, dupes) = distinct_ids(&received);
    eprintln!(
        "amqp: 1000 events emitted to cleared in {:.2}s, {} messages read back, {dupes} duplicated ids",
        elapsed.as_secs_f64(),
        received.len()
    );
    assert_eq!(received.len(), 1000, "each event exactly once");
    assert_eq!(ids.len(), 1000);
    assert_eq!(dupes, 0);
    assert_eq!(entities(&received), expected_entities(1, 1000));
    for message in &received {
        let id = message.body["id"].as_str().unwrap();
        let event = message.body["event"].as_str().unwrap();
        assert_eq!(message.message_id.as_deref(), Some(id), "{message:?}");
        assert_eq!(message.delivery_mode, Some(2), "persistent: {message:?}");
        assert_eq!(message.content_type.as_deref(), Some("application/json"));
        assert_eq!(message.kind.as_deref(), Some(event));
        assert_eq!(message.app_id.as_deref(), Some("b24eventd"));
        assert_eq!(message.routing_key, format!("main.{event}"));
        assert_eq!(
            message.portal_header,
            Some(AMQPValue::LongString("main".into()))
        );
        assert_eq!(message.body["portal"], "main");
        let key = Envelope::make_id(
            "main",
            message.body["offline_id"].as_i64().unwrap(),
            message.body["timestamp"].as_str().unwrap(),
        );
        assert_eq!(id, key, "the key of the change");
    }
    let counts = journal.counts().await.unwrap();
    assert_eq!(counts.delivered, 1000, "{counts:?}");
    assert_eq!(counts.dead, 0, "{counts:?}");
    assert_eq!(
        counts.retried_attempts, 0,
        "no retries without faults: {counts:?}"
    );
    assert_eq!(queue_depth(&connection, &queue).await, 0, "drained");
}

#[ignore = "needs RabbitMQ on 127.0.0.1:5672: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_sink_loses_nothing_when_rabbitmq_is_cut_off_mid_run() {
    init();
    let (connection, channel) = broker().await;
    let (exchange, queue) = (unique("events"), unique("erp"));
    let _cleanup = Cleanup {
        exchanges: vec![exchange.clone()],
        queues: vec![queue.clone()],
    };
    let proxy = TcpProxy::start(BROKER).await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr());
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let sink = amqp_sink(
        &url,
        &exchange,
        &format!("declare_exchange = \"topic\"\nqueue = \"{queue}\"\nqueue_binding = \"#\""),
    );
    let config = write_config(dir.path(), &sim, None, "batch_size = 50", &sink);
    let running = Running::start(&config, &tokens).await;

    // Cut the broker off once the first events are in the queue, while the rest still flow.
    emit_deals(&sim, 1, 1000);
    let started = Instant::now();
    while queue_depth(&connection, &queue).await < 100 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the first events never reached the queue"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    proxy.cut();
    let cut_at = started.elapsed();
    let depth_at_cut = queue_depth(&connection, &queue).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.restore();

    wait_for(
        "all 1,000 events cleared upstream after the cut",
        Duration::from_secs(45),
        || upstream_empty(&sim) && sim.stats().cleared >= 1000,
    )
    .await;
    let total = started.elapsed();
    let journal = running.journal.clone();
    running.stop().await;

    let received = drain(&channel, &queue).await;
    let (ids, dupes) = distinct_ids(&received);
    let counts = journal.counts().await.unwrap();
    eprintln!(
        "amqp cut: {depth_at_cut} messages queued at the cut ({:.2}s in), broker away 3s, \
         all cleared after {:.1}s; {} messages read back, {} distinct ids, {dupes} duplicated \
         ids, {} retried attempts",
        cut_at.as_secs_f64(),
        total.as_secs_f64(),
        received.len(),
        ids.len(),
        counts.retried_attempts
    );
    assert!(
        depth_at_cut < 1000,
        "the cut came while events were flowing"
    );
    assert!(
        counts.retried_attempts > 0,
        "the cut made deliveries fail and retry: {counts:?}"
    );
    assert_eq!(ids.len(), 1000, "every event arrived");
    assert_eq!(entities(&received), expected_entities(1, 1000));
    assert_eq!(counts.delivered, 1000, "{counts:?}");
    assert_eq!(counts.dead, 0, "{counts:?}");
}

/// Builds `[sinks.bus]` from a config file, as the daemon does.
async fn build_sink(dir: &Path, sink: &str) -> std::sync::Arc<dyn sinks::Sink> {
    let (sim, _tokens) = portal(SimulatorConfig::default()).await;
    crate::support::sink::build_sink(dir, &sim, sink, "bus")
}

#[ignore = "needs RabbitMQ on 127.0.0.1:5672: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_unroutable_message_with_mandatory_is_retried_not_delivered() {
    init();
    let (_connection, channel) = broker().await;
    let (exchange, queue) = (unique("nobody"), unique("late"));
    let _cleanup = Cleanup {
        exchanges: vec![exchange.clone()],
        queues: vec![queue.clone()],
    };
    let dir = tempfile::tempdir().unwrap();
    // The sink declares the exchange; no queue is bound to it.
    let mandatory = build_sink(
        dir.path(),
        &amqp_sink(URL, &exchange, "declare_exchange = \"direct\""),
    )
    .await;
    let results = mandatory
        .deliver(&[
            envelope(1, "ONCRMDEALUPDATE"),
            envelope(2, "ONCRMDEALUPDATE"),
        ])
        .await;
    for result in &results {
        match result {
            SinkResult::Retry { error, .. } => {
                assert!(error.contains("unroutable"), "{error}");
                assert!(error.contains("main.ONCRMDEALUPDATE"), "{error}");
                assert!(error.contains("NO_ROUTE"), "{error}");
            }
            other => panic!("an unroutable message is not delivered: {other:?}"),
        }
    }

    // Without mandatory the broker drops it and confirms: delivered, and documented so.
    let dropping = build_sink(dir.path(), &amqp_sink(URL, &exchange, "mandatory = false")).await;
    assert_eq!(
        dropping.deliver(&[envelope(3, "ONCRMDEALUPDATE")]).await,
        vec![SinkResult::Delivered]
    );

    // Once a queue is bound, the same sink delivers on its next attempt.
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "main.ONCRMDEALUPDATE".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        mandatory
            .deliver(&[
                envelope(1, "ONCRMDEALUPDATE"),
                envelope(2, "ONCRMDEALUPDATE")
            ])
            .await,
        vec![SinkResult::Delivered, SinkResult::Delivered]
    );
    let received = drain(&channel, &queue).await;
    // The two publishes of one batch are in flight together: either may reach the queue first.
    let mut ids: Vec<&str> = received
        .iter()
        .map(|m| m.body["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        vec!["main:1:1795330800", "main:2:1795330800"],
        "only the retried ones, once"
    );
}

#[ignore = "needs RabbitMQ on 127.0.0.1:5672: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_publish_to_a_missing_exchange_is_retried_and_the_sink_recovers() {
    init();
    let (_connection, channel) = broker().await;
    let (exchange, queue) = (unique("later"), unique("later"));
    let _cleanup = Cleanup {
        exchanges: vec![exchange.clone()],
        queues: vec![queue.clone()],
    };
    let dir = tempfile::tempdir().unwrap();
    let sink = build_sink(dir.path(), &amqp_sink(URL, &exchange, "")).await;
    let results = sink.deliver(&[envelope(1, "ONCRMDEALUPDATE")]).await;
    match &results[0] {
        SinkResult::Retry { error, .. } => {
            assert!(error.contains("NOT_FOUND"), "{error}");
            assert!(!error.contains("guest:guest"), "{error}");
        }
        other => panic!("expected retry, got {other:?}"),
    }
    // The broker closed the channel; the next attempt reconnects and succeeds.
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        sink.deliver(&[envelope(1, "ONCRMDEALUPDATE")]).await,
        vec![SinkResult::Delivered]
    );
    assert_eq!(drain(&channel, &queue).await.len(), 1);
}

#[ignore = "needs RabbitMQ on 127.0.0.1:5672: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_validate_online_passes_on_rabbitmq_and_fails_on_a_closed_port() {
    init();
    let (_connection, channel) = broker().await;
    let exchange = unique("checked");
    let _cleanup = Cleanup {
        exchanges: vec![exchange.clone()],
        queues: vec![],
    };
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    crate::support::cli::store_tokens(dir.path(), &tokens).await;

    let out = validate_online(dir.path(), &sim, &amqp_sink(URL, &exchange, ""), &[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("exchange \"{exchange}\" exists")),
        "{stdout}"
    );

    // The exchange is missing and not declared by the sink: a clear failure.
    let out = validate_online(
        dir.path(),
        &sim,
        &amqp_sink(URL, &unique("missing"), ""),
        &[],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("does not exist"), "{stdout}");

    // A wrong password: refused by the broker, said so, the password not echoed.
    let out = validate_online(
        dir.path(),
        &sim,
        &amqp_sink(
            "amqp://guest:wrong-pw-4711@127.0.0.1:5672/%2f",
            &exchange,
            "",
        ),
        &[],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("ACCESS_REFUSED"), "{stdout}");
    assert!(
        !stdout.contains("wrong-pw-4711") && !stderr.contains("wrong-pw-4711"),
        "{stdout}{stderr}"
    );

    let closed_port = free_port();
    let out = validate_online(
        dir.path(),
        &sim,
        &amqp_sink(
            &format!("amqp://guest:s3cret-pw@127.0.0.1:{closed_port}/%2f"),
            &exchange,
            "",
        ),
        &[],
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("cannot connect"), "{stdout}");
    assert!(
        stdout.contains(&format!("127.0.0.1:{closed_port}")),
        "{stdout}"
    );
    assert!(
        !stdout.contains("s3cret-pw") && !stderr.contains("s3cret-pw"),
        "{stdout}{stderr}"
    );
}
