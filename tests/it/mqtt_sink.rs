//! The `mqtt` sink against the real local broker (mosquitto, 127.0.0.1:1883, MQTT 5), with the
//! real pipeline and the portal simulator: a second client subscribed with QoS 1 receives the
//! 1,000 events (count and content, the envelope id as user property), a broker cut mid-run
//! loses nothing (duplicates are counted and reported), and `validate --online` passes against
//! the live broker and fails clearly against a closed port. Ignored unless asked
//! for (`--include-ignored`); then a broker that does not answer fails the tests.

use crate::support::proxy::TcpProxy;
use crate::support::sink::{sink_check, validate_online};
use crate::support::*;
use b24eventd::envelope::Envelope;
use b24eventd_simulator::SimulatorConfig;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BROKER: (&str, u16) = ("127.0.0.1", 1883);
const START_MOSQUITTO: &str = "mosquitto -d";

/// One message the subscriber received.
#[derive(Debug, Clone)]
struct Received {
    topic: String,
    payload: Vec<u8>,
    user_properties: Vec<(String, String)>,
    content_type: Option<String>,
}

/// A QoS 1 subscriber to `prefix/#`, on its own connection straight to the broker.
struct Subscriber {
    received: Arc<Mutex<Vec<Received>>>,
    /// Why the subscriber's connection ended early: messages may be missing, the test fails.
    lost: Arc<Mutex<Option<String>>>,
    client: AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Subscribes and waits for the SUBACK; panics (the test fails) when the broker does not answer.
    async fn start(prefix: &str) -> Subscriber {
        let mut options = MqttOptions::new(
            format!("b24eventd-test-sub-{:08x}", fastrand::u32(..)),
            BROKER.0,
            BROKER.1,
        );
        options
            .set_clean_start(true)
            .set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        client
            .subscribe(format!("{prefix}/#"), QoS::AtLeastOnce)
            .await
            .unwrap();
        let subscribed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        let broker = format!("the mqtt broker at {}:{}", BROKER.0, BROKER.1);
        match subscribed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => service_down(&broker, START_MOSQUITTO, e),
            Err(_) => service_down(&broker, START_MOSQUITTO, "no answer within 5 s"),
        }
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let lost = Arc::new(Mutex::new(None));
        let lost_by_task = lost.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let props = p.properties.clone().unwrap_or_default();
                        log.lock().unwrap().push(Received {
                            topic: String::from_utf8(p.topic.to_vec()).unwrap(),
                            payload: p.payload.to_vec(),
                            user_properties: props.user_properties,
                            content_type: props.content_type,
                        });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        *lost_by_task.lock().unwrap() = Some(e.to_string());
                        break;
                    }
                }
            }
        });
        Subscriber {
            received,
            lost,
            client,
            task,
        }
    }

    fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    fn messages(&self) -> Vec<Received> {
        if let Some(e) = self.lost.lock().unwrap().as_ref() {
            panic!("the test subscriber lost its connection to the broker: {e}");
        }
        self.received.lock().unwrap().clone()
    }

    async fn stop(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.task.abort();
    }
}

fn unique_prefix(test: &str) -> String {
    format!(
        "b24eventd-test/{test}-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

fn mqtt_sink(url: &str, prefix: &str) -> String {
    format!(
        "[sinks.bus]\ntype = \"mqtt\"\nurl = \"{url}\"\ntopic = \"{prefix}/{{portal}}/{{event}}\"\nclient_id = \"b24eventd-test-{:08x}\"\ntimeout = \"2s\"\nconcurrency = 2\n[sinks.bus.retry]\nmax_attempts = 50\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n",
        fastrand::u32(..)
    )
}

/// Checks every message against its envelope; returns envelope id → copies and the
/// (event, entity id) pairs seen.
fn check_messages(
    prefix: &str,
    messages: &[Received],
) -> (BTreeMap<String, usize>, BTreeSet<(String, String)>) {
    let mut ids = BTreeMap::new();
    let mut entities = BTreeSet::new();
    for m in messages {
        let envelope: Envelope =
            serde_json::from_slice(&m.payload).expect("the payload is an envelope");
        assert_eq!(
            m.topic,
            format!("{prefix}/{}/{}", envelope.portal, envelope.event)
        );
        assert_eq!(
            m.user_properties,
            vec![
                ("id".to_string(), envelope.id.clone()),
                ("event".to_string(), envelope.event.clone()),
                ("portal".to_string(), envelope.portal.clone()),
            ]
        );
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
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

#[ignore = "needs Mosquitto on 127.0.0.1:1883: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_events_arrive_with_their_id_as_user_property() {
    init();
    let prefix = unique_prefix("all");
    let subscriber = Subscriber::start(&prefix).await;
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let sinks = mqtt_sink(&format!("mqtt://{}:{}", BROKER.0, BROKER.1), &prefix);
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
    // PUBACK came before the broker forwarded to the subscriber: give it a moment.
    wait_for(
        "the subscriber got 1,000 messages",
        Duration::from_secs(10),
        || subscriber.count() >= 1000,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let messages = subscriber.messages();
    subscriber.stop().await;
    let (ids, entities) = check_messages(&prefix, &messages);
    eprintln!(
        "mqtt: 1000 events emitted, {} messages received, all cleared in {:.2} s",
        messages.len(),
        elapsed.as_secs_f64()
    );
    assert_eq!(messages.len(), 1000, "one message per event");
    assert_eq!(ids.len(), 1000);
    assert_eq!(entities, expected_entities(1, 1000));
    let counts = journal.counts().await.unwrap();
    assert_eq!(
        (counts.delivered, counts.dead, counts.cleared),
        (1000, 0, 1000),
        "{counts:?}"
    );
}

#[ignore = "needs Mosquitto on 127.0.0.1:1883: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_cut_mid_run_loses_nothing() {
    init();
    let prefix = unique_prefix("cut");
    let subscriber = Subscriber::start(&prefix).await;
    let proxy = TcpProxy::start(&format!("{}:{}", BROKER.0, BROKER.1)).await;
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let sinks = mqtt_sink(&format!("mqtt://{}", proxy.addr()), &prefix);
    let config = write_config(dir.path(), &sim, None, "", &sinks);
    let running = Running::start(&config, &tokens).await;

    let started = Instant::now();
    emit_deals(&sim, 1, 500);
    wait_for(
        "100 messages before the cut",
        Duration::from_secs(30),
        || subscriber.count() >= 100,
    )
    .await;
    proxy.cut();
    let at_cut = subscriber.count();
    emit_deals(&sim, 501, 500);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during_cut = subscriber.count();
    proxy.restore();
    let restored = Instant::now();
    wait_for(
        "1,000 messages after the restore",
        Duration::from_secs(45),
        || subscriber.count() >= 1000,
    )
    .await;
    let redelivered = restored.elapsed();
    wait_for(
        "every event delivered after the cut",
        Duration::from_secs(45),
        || upstream_empty(&sim),
    )
    .await;
    let recovered = restored.elapsed();
    let elapsed = started.elapsed();
    let journal = running.journal.clone();
    running.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let messages = subscriber.messages();
    subscriber.stop().await;
    let (ids, entities) = check_messages(&prefix, &messages);
    let duplicates = messages.len() - ids.len();
    eprintln!(
        "mqtt cut: {at_cut} messages at the cut, {during_cut} after 3 s cut off, {} messages for {} events ({duplicates} duplicates) in {:.2} s, 1,000 received {:.2} s and all cleared {:.2} s after the restore",
        messages.len(),
        ids.len(),
        elapsed.as_secs_f64(),
        redelivered.as_secs_f64(),
        recovered.as_secs_f64()
    );
    assert!(at_cut < 1000, "the cut came mid-run ({at_cut} delivered)");
    assert_eq!(ids.len(), 1000, "every event arrived");
    assert_eq!(entities, expected_entities(1, 1000));
    let counts = journal.counts().await.unwrap();
    assert!(
        counts.retried_attempts > 0,
        "the cut made deliveries retry: {counts:?}"
    );
    assert_eq!((counts.delivered, counts.dead), (1000, 0), "{counts:?}");
}

#[ignore = "needs Mosquitto on 127.0.0.1:1883: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_online_connects_and_fails_clearly() {
    init();
    let prefix = unique_prefix("validate");
    let subscriber = Subscriber::start(&prefix).await;
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    crate::support::cli::store_tokens(dir.path(), &tokens).await;

    let live = mqtt_sink(&format!("mqtt://{}:{}", BROKER.0, BROKER.1), &prefix);
    let out = validate_online(dir.path(), &sim, &live, &["--json"]).await;
    let check = sink_check(&out, "bus", "mqtt");
    assert_eq!(out.status.code(), Some(0), "{check:#}");
    assert_eq!(check["status"], "ok", "{check:#}");
    assert!(
        check["detail"].as_str().unwrap().contains("CONNACK ok"),
        "{check:#}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(subscriber.count(), 0, "the check publishes nothing");
    subscriber.stop().await;

    let closed = mqtt_sink("mqtt://ops:hunter2@127.0.0.1:1", &prefix);
    let out = validate_online(dir.path(), &sim, &closed, &["--json"]).await;
    let check = sink_check(&out, "bus", "mqtt");
    assert_eq!(out.status.code(), Some(1), "{check:#}");
    assert_eq!(check["status"], "fail");
    let detail = check["detail"].as_str().unwrap();
    assert!(
        detail.contains("127.0.0.1:1") && detail.contains("cannot connect"),
        "{detail}"
    );
    for text in [&out.stdout, &out.stderr] {
        assert!(!String::from_utf8_lossy(text).contains("hunter2"));
    }

    let out = validate_online(
        dir.path(),
        &sim,
        "[sinks.bus]\ntype = \"mqtt\"\nurl = \"mqtt://h\"\ntopic = \"a/+/{event}\"\n",
        &["--json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("sinks.bus.topic") && stderr.contains("wildcard"),
        "{stderr}"
    );
}
