//! The `mqtt` sink: publishes each envelope with QoS 1 over MQTT 5 to a topic template
//! (`{portal}`, `{event}`), with the envelope id as the user property `id`, and counts it as
//! delivered when the broker's PUBACK for that packet says success.
//!
//! rumqttc's event loop runs in its own task ([`Driver`]), polled continuously. Packet ids are
//! assigned inside the event loop, in request order, so the driver keeps the publishes it sent
//! in order and pairs each `Outgoing::Publish(pkid)` event with the oldest one, then each PUBACK
//! with its packet id. A session (client, event loop and the publishes sent through it) never
//! outlives its connection: on any connection error every unacknowledged publish of it is
//! retried (the daemon sends it again later; a duplicate is possible, a loss is not) and a new
//! session is made. Credentials never appear in error texts.

use super::{Health, Sink, SinkResult, name_template};
use super::{SinkConfig, SinkKind};
use crate::BoxFuture;
use crate::envelope::Envelope;
use crate::options::{ConfigError, SinkOptions, redact_url};
use anyhow::{Context, bail};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Packet, PubAck, PubAckReason, PublishProperties,
};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use serde::Deserialize;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{OnceCell, oneshot};
use tokio_util::sync::CancellationToken;

/// The topic when the config names none.
pub(crate) const DEFAULT_TOPIC: &str = "bitrix/{portal}/{event}";
/// Keep-alive when the config names none.
pub(crate) const DEFAULT_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// MQTT strings (topics, client ids) are at most this many bytes.
const MAX_MQTT_STRING: usize = 65_535;
/// The largest packet MQTT can express, when the broker names no smaller maximum.
const MAX_PACKET_BYTES: usize = 268_435_455;
/// Publishes per `deliver` call and concurrency slot (the broker's receive maximum limits how
/// many are unacknowledged at once; rumqttc holds the rest).
const BATCH_PER_SLOT: usize = 100;
/// Requests rumqttc's channel holds before a publish is refused (retried).
const REQUEST_CAPACITY: usize = 10_000;
/// Waits between connection attempts: doubling from the first to the last.
const RECONNECT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(2));

/// `type = "mqtt"`: publish every envelope with QoS 1.
#[derive(Clone, PartialEq, Eq)]
pub struct MqttSinkConfig {
    /// `mqtt://[user:password@]host[:port]` or `mqtts://`; print it with [`redact_url`].
    pub url: String,
    /// The topic; `{portal}` and `{event}` are replaced per envelope.
    pub topic: String,
    pub client_id: String,
    /// The broker keeps the last message per topic for new subscribers.
    pub retain: bool,
    pub keep_alive: Duration,
}

impl super::SinkTypeConfig for MqttSinkConfig {
    fn register_credentials(&self) {
        super::register_url_credentials(&self.url);
    }
}

impl fmt::Debug for MqttSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSinkConfig")
            .field("url", &redact_url(&self.url))
            .field("topic", &self.topic)
            .field("client_id", &self.client_id)
            .field("retain", &self.retain)
            .field("keep_alive", &self.keep_alive)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    url: Option<String>,
    topic: Option<String>,
    client_id: Option<String>,
    retain: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    keep_alive: Option<Duration>,
}

/// Reads and checks `[sinks.NAME]` of `type = "mqtt"`.
pub(crate) fn parse_config(options: &SinkOptions) -> Result<SinkKind, ConfigError> {
    let raw: Raw = options.parse()?;
    let url = raw.url.ok_or_else(|| {
        options.err(
            "url",
            "missing required key; write url = \"mqtt://host:1883\" (or mqtts:// for TLS)",
        )
    })?;
    Broker::parse(&url).map_err(|message| options.err("url", message))?;
    let topic = raw.topic.unwrap_or_else(|| DEFAULT_TOPIC.to_string());
    check_topic_template(&topic).map_err(|message| options.err("topic", message))?;
    let client_id = raw
        .client_id
        .unwrap_or_else(|| format!("b24eventd-{}", options.sink_name()));
    check_client_id(&client_id).map_err(|message| options.err("client_id", message))?;
    let keep_alive = options.duration("keep_alive", raw.keep_alive, DEFAULT_KEEP_ALIVE)?;
    Ok(SinkKind::Mqtt(MqttSinkConfig {
        url,
        topic,
        client_id,
        retain: raw.retain.unwrap_or(false),
        keep_alive,
    }))
}

fn check_topic_template(topic: &str) -> Result<(), String> {
    name_template::check(topic)?;
    if topic.contains(['+', '#']) {
        return Err(format!(
            "{topic:?} has a wildcard (+ or #), which only subscriptions may use; publish to a plain topic"
        ));
    }
    if topic.contains('\0') {
        return Err("must not contain a NUL character".to_string());
    }
    if topic.starts_with('$') {
        return Err(format!(
            "{topic:?} starts with '$', which brokers reserve for themselves ($SYS); choose another topic"
        ));
    }
    if topic.len() > MAX_MQTT_STRING {
        return Err(format!(
            "is {} bytes, more than MQTT allows (65535)",
            topic.len()
        ));
    }
    Ok(())
}

fn check_client_id(client_id: &str) -> Result<(), String> {
    if client_id.is_empty() {
        return Err("must not be empty; leave it out for b24eventd-<sink name>".to_string());
    }
    if client_id.contains('\0') || client_id.len() > MAX_MQTT_STRING {
        return Err("must be at most 65535 bytes without NUL characters".to_string());
    }
    Ok(())
}

/// Why a rendered topic cannot be published to (the event is dead), or `None` when it can.
fn topic_problem(topic: &str) -> Option<String> {
    if topic.is_empty() {
        Some("the rendered topic is empty".to_string())
    } else if topic.contains(['+', '#']) {
        Some(format!(
            "the rendered topic {topic:?} contains a wildcard (+ or #)"
        ))
    } else if topic.contains('\0') {
        Some(format!(
            "the rendered topic {topic:?} contains a NUL character"
        ))
    } else if topic.len() > MAX_MQTT_STRING {
        Some(format!(
            "the rendered topic is {} bytes, more than MQTT allows (65535)",
            topic.len()
        ))
    } else {
        None
    }
}

/// Where to connect, from the `url`.
#[derive(Clone, PartialEq, Eq)]
struct Broker {
    host: String,
    port: u16,
    tls: bool,
    username: Option<String>,
    password: Option<String>,
    /// The URL without userinfo, for texts.
    shown: String,
}

impl Broker {
    fn parse(url: &str) -> Result<Broker, String> {
        let example = "write url = \"mqtt://user:password@host:1883\" (or mqtts:// for TLS)";
        let shown = redact_url(url);
        if url.trim().is_empty() {
            return Err(format!("must not be empty; {example}"));
        }
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| format!("invalid URL {shown:?}: {e}; {example}"))?;
        let (tls, default_port) = match parsed.scheme() {
            "mqtt" | "tcp" => (false, 1883),
            "mqtts" | "ssl" => (true, 8883),
            other => {
                return Err(format!(
                    "unsupported scheme {other:?} in {shown:?}; {example}"
                ));
            }
        };
        let host = match parsed.host_str() {
            Some(host) if !host.is_empty() => host.trim_matches(['[', ']']).to_string(),
            _ => return Err(format!("no host in {shown:?}; {example}")),
        };
        if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() {
            return Err(format!(
                "{shown:?} has a path or query, which MQTT does not use; the topic is the sink's topic key"
            ));
        }
        let username = Some(percent_decode(parsed.username())?).filter(|u| !u.is_empty());
        let password = parsed.password().map(percent_decode).transpose()?;
        Ok(Broker {
            host,
            port: parsed.port().unwrap_or(default_port),
            tls,
            username,
            password,
            shown: shown.trim_end_matches('/').to_string(),
        })
    }

    /// rumqttc's options for a session with `client_id`.
    fn options(
        &self,
        client_id: &str,
        keep_alive: Duration,
        timeout: Duration,
    ) -> anyhow::Result<MqttOptions> {
        let mut options = MqttOptions::new(client_id, self.host.clone(), self.port);
        options
            .set_keep_alive(keep_alive)
            .set_clean_start(true)
            .set_connection_timeout(timeout.as_secs().max(1))
            .set_request_channel_capacity(REQUEST_CAPACITY);
        if self.username.is_some() || self.password.is_some() {
            options.set_credentials(
                self.username.clone().unwrap_or_default(),
                self.password.clone().unwrap_or_default(),
            );
        }
        if self.tls {
            options.set_transport(Transport::tls_with_config(tls_config()?));
        }
        Ok(options)
    }

    /// `text` with the password replaced, however it got there.
    fn scrub(&self, text: &str) -> String {
        super::scrub(text, self.password.as_slice())
    }
}

/// `%XX` decoding of a URL component.
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let byte = text
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                .ok_or("invalid %-escape in the URL's user or password")?;
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the URL's user or password is not UTF-8".to_string())
}

/// rustls with the ring provider and the system's root certificates.
fn tls_config() -> anyhow::Result<TlsConfiguration> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        bail!("no usable root certificates found on this system for mqtts");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("rustls cannot use its default protocol versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConfiguration::Rustls(Arc::new(config)))
}

/// What a PUBACK's reason code means for the event.
fn classify_puback(ack: &PubAck) -> SinkResult {
    let reason = ack
        .properties
        .as_ref()
        .and_then(|p| p.reason_string.as_deref())
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    match ack.reason {
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers => SinkResult::Delivered,
        // About this message: sending it again cannot help.
        PubAckReason::TopicNameInvalid | PubAckReason::PayloadFormatInvalid => SinkResult::Dead {
            error: format!("the broker refused the message ({:?}){reason}", ack.reason),
        },
        // About the broker, its ACLs or its load: an operator's fix or time lets it through.
        other => SinkResult::Retry {
            error: format!("the broker did not accept the message ({other:?}){reason}"),
            after: None,
        },
    }
}

/// An upper bound of the PUBLISH packet's size, to refuse what the broker would disconnect for.
fn packet_size_bound(topic: &str, payload: usize, properties: &PublishProperties) -> usize {
    let user: usize = properties
        .user_properties
        .iter()
        .map(|(k, v)| 1 + 2 + k.len() + 2 + v.len())
        .sum();
    let content_type = properties
        .content_type
        .as_ref()
        .map_or(0, |c| 1 + 2 + c.len());
    // fixed header 5, topic 2+len, packet id 2, properties length 4, format indicator 2
    5 + 2 + topic.len() + 2 + 4 + 2 + user + content_type + payload
}

/// A publish handed to rumqttc: who waits for its outcome.
type Waiter = oneshot::Sender<SinkResult>;

/// The current session's bookkeeping, shared by the sink and the driver task.
struct Session {
    client: Option<AsyncClient>,
    /// Sent to rumqttc, no packet id yet, in request order.
    queued: VecDeque<Waiter>,
    /// Published, waiting for PUBACK, by packet id.
    inflight: HashMap<u16, Waiter>,
    /// Why the last connection failed; publishes are retried at once while it is set.
    down: Option<String>,
    /// The broker's maximum packet size from its CONNACK.
    max_packet: Option<u32>,
    /// A DISCONNECT's reason from the broker, for the error text.
    disconnect_reason: Option<String>,
}

impl Session {
    /// Every publish of the ending session is retried with `error`.
    fn fail_all(&mut self, error: &str) {
        let waiting = self
            .queued
            .drain(..)
            .chain(self.inflight.drain().map(|(_, w)| w));
        for waiter in waiting {
            let _ = waiter.send(SinkResult::Retry {
                error: error.to_string(),
                after: None,
            });
        }
    }
}

/// Owns rumqttc's event loop; polls it continuously and settles the waiters.
struct Driver {
    session: Arc<Mutex<Session>>,
    broker: Broker,
    options: MqttOptions,
    sink: String,
    stop: CancellationToken,
}

impl Driver {
    async fn run(self) {
        let mut backoff = RECONNECT_BACKOFF.0;
        while !self.stop.is_cancelled() {
            let (client, eventloop) = AsyncClient::new(self.options.clone(), REQUEST_CAPACITY);
            lock(&self.session).client = Some(client.clone());
            let error = self.run_session(eventloop, &mut backoff).await;
            {
                let mut session = lock(&self.session);
                session.client = None;
                let error = match session.disconnect_reason.take() {
                    Some(reason) => format!("{error} (the broker disconnected: {reason})"),
                    None => error,
                };
                let error = self
                    .broker
                    .scrub(&format!("mqtt {}: {error}", self.broker.shown));
                if !self.stop.is_cancelled() {
                    tracing::warn!(sink = %self.sink, unacknowledged = session.queued.len() + session.inflight.len(), error = %error, "mqtt connection lost; unacknowledged publishes are retried");
                }
                session.fail_all(&error);
                session.down = Some(error);
            }
            if self.stop.is_cancelled() {
                let _ = client.try_disconnect();
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = self.stop.cancelled() => break,
            }
            backoff = (backoff * 2).min(RECONNECT_BACKOFF.1);
        }
    }

    /// Polls one session until its connection fails; returns why.
    async fn run_session(&self, mut eventloop: EventLoop, backoff: &mut Duration) -> String {
        loop {
            let event = tokio::select! {
                event = eventloop.poll() => event,
                _ = self.stop.cancelled() => return "the sink stopped".to_string(),
            };
            match event {
                Ok(event) => {
                    if let Err(desync) = self.handle(event, backoff) {
                        return desync;
                    }
                }
                Err(e) => return connection_error(&e),
            }
        }
    }

    /// One event of the loop; `Err` when the bookkeeping cannot pair it (the session is reset).
    fn handle(&self, event: Event, backoff: &mut Duration) -> Result<(), String> {
        let mut session = lock(&self.session);
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                session.down = None;
                session.max_packet = ack.properties.and_then(|p| p.max_packet_size);
                *backoff = RECONNECT_BACKOFF.0;
                tracing::debug!(sink = %self.sink, broker = %self.broker.shown, "mqtt connected");
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                let waiter = session
                    .queued
                    .pop_front()
                    .ok_or_else(|| format!("packet {pkid} was published for no waiting event"))?;
                if session.inflight.insert(pkid, waiter).is_some() {
                    return Err(format!("packet id {pkid} was reused before its PUBACK"));
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(pkid)) => {
                return Err(format!(
                    "packet id {pkid} is still unacknowledged (the broker acknowledges out of order)"
                ));
            }
            Event::Incoming(Packet::PubAck(ack)) => match session.inflight.remove(&ack.pkid) {
                Some(waiter) => {
                    let _ = waiter.send(classify_puback(&ack));
                }
                None => {
                    tracing::debug!(sink = %self.sink, pkid = ack.pkid, "PUBACK for an unknown packet")
                }
            },
            Event::Incoming(Packet::Disconnect(disconnect)) => {
                let reason = disconnect
                    .properties
                    .and_then(|p| p.reason_string)
                    .map(|r| format!("{:?}: {r}", disconnect.reason_code))
                    .unwrap_or_else(|| format!("{:?}", disconnect.reason_code));
                session.disconnect_reason = Some(reason);
            }
            _ => {}
        }
        Ok(())
    }
}

fn lock(session: &Mutex<Session>) -> MutexGuard<'_, Session> {
    session
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A connection error as text: rumqttc's, with the refusal reasons spelled out.
fn connection_error(e: &ConnectionError) -> String {
    match e {
        ConnectionError::ConnectionRefused(code) => {
            let hint = match code {
                ConnectReturnCode::BadUserNamePassword | ConnectReturnCode::NotAuthorized => {
                    ": check the user and password in the url"
                }
                ConnectReturnCode::ClientIdentifierNotValid => ": check the sink's client_id",
                _ => "",
            };
            format!("the broker refused the connection ({code:?}){hint}")
        }
        ConnectionError::Io(io) => format!("cannot connect or lost the connection: {io}"),
        ConnectionError::Timeout(_) => "the connection timed out".to_string(),
        other => other.to_string(),
    }
}

/// Publishes envelopes with QoS 1.
pub(crate) struct MqttSink {
    name: String,
    broker: Broker,
    topic: String,
    client_id: String,
    retain: bool,
    keep_alive: Duration,
    timeout: Duration,
    concurrency: usize,
    options: MqttOptions,
    session: Arc<Mutex<Session>>,
    /// Spawns the driver on first use (it needs the runtime).
    started: OnceCell<()>,
    stop: CancellationToken,
}

impl MqttSink {
    /// Checks the URL and TLS setup; connects only on the first delivery.
    pub fn new(config: &SinkConfig, mqtt: &MqttSinkConfig) -> anyhow::Result<MqttSink> {
        let broker =
            Broker::parse(&mqtt.url).map_err(|e| anyhow::anyhow!("sink {}: {e}", config.name))?;
        let options = broker
            .options(&mqtt.client_id, mqtt.keep_alive, config.timeout)
            .with_context(|| format!("sink {}: cannot set up mqtt", config.name))?;
        Ok(MqttSink {
            name: config.name.clone(),
            broker,
            topic: mqtt.topic.clone(),
            client_id: mqtt.client_id.clone(),
            retain: mqtt.retain,
            keep_alive: mqtt.keep_alive,
            timeout: config.timeout,
            concurrency: config.concurrency.max(1),
            options,
            session: Arc::new(Mutex::new(Session {
                client: None,
                queued: VecDeque::new(),
                inflight: HashMap::new(),
                down: None,
                max_packet: None,
                disconnect_reason: None,
            })),
            started: OnceCell::new(),
            stop: CancellationToken::new(),
        })
    }

    async fn start_driver(&self) {
        self.started
            .get_or_init(|| async {
                let driver = Driver {
                    session: Arc::clone(&self.session),
                    broker: self.broker.clone(),
                    options: self.options.clone(),
                    sink: self.name.clone(),
                    stop: self.stop.clone(),
                };
                tokio::spawn(driver.run());
            })
            .await;
    }

    async fn publish(&self, envelope: &Envelope) -> SinkResult {
        let topic = name_template::render(&self.topic, &envelope.portal, &envelope.event);
        if let Some(problem) = topic_problem(&topic) {
            return SinkResult::Dead { error: problem };
        }
        let payload = match serde_json::to_vec(envelope) {
            Ok(payload) => payload,
            Err(e) => {
                return SinkResult::Dead {
                    error: format!("cannot encode the envelope as JSON: {e}"),
                };
            }
        };
        let properties = PublishProperties {
            payload_format_indicator: Some(1),
            content_type: Some("application/json".to_string()),
            user_properties: vec![
                ("id".to_string(), envelope.id.clone()),
                ("event".to_string(), envelope.event.clone()),
                ("portal".to_string(), envelope.portal.clone()),
            ],
            ..PublishProperties::default()
        };
        let size = packet_size_bound(&topic, payload.len(), &properties);
        let receiver = {
            let mut session = lock(&self.session);
            if let Some(down) = &session.down {
                return SinkResult::Retry {
                    error: down.clone(),
                    after: None,
                };
            }
            let limit = session.max_packet.map_or(MAX_PACKET_BYTES, |m| m as usize);
            if size > limit {
                return SinkResult::Dead {
                    error: format!(
                        "the message is about {size} bytes, more than the broker accepts ({limit})"
                    ),
                };
            }
            let Some(client) = session.client.clone() else {
                return SinkResult::Retry {
                    error: format!("mqtt {}: not connected yet", self.broker.shown),
                    after: None,
                };
            };
            if let Err(e) = client.try_publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                self.retain,
                payload,
                properties,
            ) {
                return SinkResult::Retry {
                    error: format!("mqtt {}: cannot queue the publish: {e}", self.broker.shown),
                    after: None,
                };
            }
            let (sender, receiver) = oneshot::channel();
            session.queued.push_back(sender);
            receiver
        };
        match tokio::time::timeout(self.timeout, receiver).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => SinkResult::Retry {
                error: format!("mqtt {}: the connection task ended", self.broker.shown),
                after: None,
            },
            Err(_) => SinkResult::Retry {
                error: format!(
                    "mqtt {}: no PUBACK within {}",
                    self.broker.shown,
                    humantime::format_duration(self.timeout)
                ),
                after: None,
            },
        }
    }

    /// The healthcheck: a separate connection (its own client id, so the daemon's session is
    /// not taken over) until CONNACK, then DISCONNECT. Publishes nothing.
    async fn probe(&self) -> Health {
        let check_id = format!("{}-check-{:04x}", self.client_id, fastrand::u16(..));
        let options = match self
            .broker
            .options(&check_id, self.keep_alive, self.timeout)
        {
            Ok(options) => options,
            Err(e) => return Health::fail(format!("cannot set up mqtt: {e:#}"), "see the error"),
        };
        let (client, mut eventloop) = AsyncClient::new(options, 10);
        let started = std::time::Instant::now();
        let connected = tokio::time::timeout(self.timeout, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(connection_error(&e)),
                }
            }
        })
        .await;
        let elapsed = started.elapsed().as_millis();
        match connected {
            Ok(Ok(())) => {
                let _ = client.try_disconnect();
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while let Ok(event) = eventloop.poll().await {
                        if event == Event::Outgoing(Outgoing::Disconnect) {
                            break;
                        }
                    }
                })
                .await;
                Health::ok(format!(
                    "mqtt {} accepted an MQTT 5 connection in {elapsed} ms (CONNACK ok); events go to {:?} with QoS 1",
                    self.broker.shown, self.topic
                ))
            }
            Ok(Err(error)) => Health::fail(
                self.broker
                    .scrub(&format!("mqtt {}: {error}", self.broker.shown)),
                "check the sink's url (host, port, user, password, mqtt:// or mqtts://), that the \
                 broker runs and speaks MQTT 5, and firewalls in between",
            ),
            Err(_) => Health::fail(
                format!(
                    "mqtt {}: no CONNACK within {}",
                    self.broker.shown,
                    humantime::format_duration(self.timeout)
                ),
                "check the sink's url and that the broker is running",
            ),
        }
    }
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Sink for MqttSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn max_batch(&self) -> usize {
        BATCH_PER_SLOT * self.concurrency
    }

    fn deliver<'a>(&'a self, batch: &'a [Envelope]) -> BoxFuture<'a, Vec<SinkResult>> {
        Box::pin(async move {
            self.start_driver().await;
            let results =
                futures_util::future::join_all(batch.iter().map(|e| self.publish(e))).await;
            for (envelope, result) in batch.iter().zip(&results) {
                if !matches!(result, SinkResult::Delivered) {
                    tracing::debug!(sink = %self.name, event_id = %envelope.id, result = ?result, "mqtt delivery failed");
                }
            }
            results
        })
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(self.probe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::RetryPolicy;
    use rumqttc::v5::mqttbytes::v5::PubAckProperties;

    fn load(sink_keys: &str) -> Result<SinkKind, ConfigError> {
        crate::sinks::parse_test_config("bus", "mqtt", sink_keys)
    }

    fn mqtt_config(sink_keys: &str) -> MqttSinkConfig {
        let config = load(sink_keys).unwrap_or_else(|e| panic!("{e}"));
        match &config {
            SinkKind::Mqtt(mqtt) => mqtt.clone(),
            other => panic!("mqtt sink expected, got {other:?}"),
        }
    }

    #[track_caller]
    fn assert_err(sink_keys: &str, key: &str, needle: &str) -> ConfigError {
        crate::sinks::assert_config_err("bus", "mqtt", sink_keys, key, needle)
    }

    #[test]
    fn config_defaults_and_keys() {
        assert_eq!(
            mqtt_config("url = \"mqtt://127.0.0.1\""),
            MqttSinkConfig {
                url: "mqtt://127.0.0.1".into(),
                topic: DEFAULT_TOPIC.into(),
                client_id: "b24eventd-bus".into(),
                retain: false,
                keep_alive: DEFAULT_KEEP_ALIVE,
            }
        );
        let mqtt = mqtt_config(
            "url = \"mqtts://u:p@broker:8884\"\ntopic = \"crm/{event}\"\nclient_id = \"erp-feed\"\nretain = true\nkeep_alive = \"1m\"",
        );
        assert_eq!(mqtt.topic, "crm/{event}");
        assert_eq!(mqtt.client_id, "erp-feed");
        assert!(mqtt.retain);
        assert_eq!(mqtt.keep_alive, Duration::from_secs(60));
    }

    #[test]
    fn config_errors_name_their_key() {
        assert_err("", "sinks.bus.url", "missing required key");
        assert_err("url = \"\"", "sinks.bus.url", "must not be empty");
        assert_err(
            "url = \"http://h\"",
            "sinks.bus.url",
            "unsupported scheme \"http\"",
        );
        assert_err("url = \"mqtt://h/topic\"", "sinks.bus.url", "path or query");
        assert_err(
            "url = \"mqtt://h\"\ntopic = \"a/+/b\"",
            "sinks.bus.topic",
            "wildcard",
        );
        assert_err(
            "url = \"mqtt://h\"\ntopic = \"a/#\"",
            "sinks.bus.topic",
            "wildcard",
        );
        assert_err(
            "url = \"mqtt://h\"\ntopic = \"\"",
            "sinks.bus.topic",
            "must not be empty",
        );
        assert_err(
            "url = \"mqtt://h\"\ntopic = \"$SYS/x\"",
            "sinks.bus.topic",
            "starts with '$'",
        );
        assert_err(
            "url = \"mqtt://h\"\ntopic = \"a/{deal}\"",
            "sinks.bus.topic",
            "unknown placeholder {deal}",
        );
        assert_err(
            "url = \"mqtt://h\"\nclient_id = \"\"",
            "sinks.bus.client_id",
            "must not be empty",
        );
        assert_err(
            "url = \"mqtt://h\"\nkeep_alive = \"1s\"",
            "sinks.bus.keep_alive",
            "at least 5s",
        );
        assert_err(
            "url = \"mqtt://h\"\nkeep_alive = \"1day\"",
            "sinks.bus.keep_alive",
            "at most 18h 12m 15s",
        );
        assert_err(
            "url = \"mqtt://h\"\nretain = \"yes\"",
            "sinks.bus.retain",
            "invalid type: found a string, expected a boolean",
        );
        assert_err(
            "url = \"mqtt://h\"\nqos = 2",
            "sinks.bus.qos",
            "not a key of a \"mqtt\" sink",
        );
        let err = assert_err(
            "url = \"http://u:hunter2@h\"",
            "sinks.bus.url",
            "unsupported scheme",
        );
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let mqtt = mqtt_config("url = \"mqtt://u:hunter2@h\"");
        assert!(!format!("{mqtt:?}").contains("hunter2"));
    }

    #[test]
    fn broker_from_url() {
        let broker = Broker::parse("mqtt://ops:p%40ss@10.0.0.5").unwrap();
        assert_eq!(
            (broker.host.as_str(), broker.port, broker.tls),
            ("10.0.0.5", 1883, false)
        );
        assert_eq!(broker.username.as_deref(), Some("ops"));
        assert_eq!(broker.password.as_deref(), Some("p@ss"));
        assert_eq!(broker.shown, "mqtt://10.0.0.5");
        assert_eq!(broker.scrub("auth p@ss failed"), "auth [redacted] failed");
        let broker = Broker::parse("mqtts://broker.example:9883/").unwrap();
        assert_eq!(
            (broker.port, broker.tls, broker.username.is_none()),
            (9883, true, true)
        );
        assert_eq!(Broker::parse("mqtts://[::1]").unwrap().host, "::1");
        assert_eq!(Broker::parse("mqtts://h").unwrap().port, 8883);
        // The TLS setup (ring, system roots) builds.
        let options = broker
            .options("id", DEFAULT_KEEP_ALIVE, Duration::from_secs(3))
            .unwrap();
        assert!(matches!(options.transport(), Transport::Tls(_)));
    }

    #[test]
    fn rendered_topics_are_checked() {
        assert_eq!(topic_problem("bitrix/main/ONCRMDEALADD"), None);
        assert!(topic_problem("").unwrap().contains("empty"));
        assert!(topic_problem("a/+").unwrap().contains("wildcard"));
        assert!(topic_problem("a/#").unwrap().contains("wildcard"));
        assert!(
            topic_problem(&"x".repeat(70_000))
                .unwrap()
                .contains("65535")
        );
    }

    #[test]
    fn puback_reasons_map_to_results() {
        let ack = |reason| PubAck {
            pkid: 1,
            reason,
            properties: None,
        };
        assert_eq!(
            classify_puback(&ack(PubAckReason::Success)),
            SinkResult::Delivered
        );
        assert_eq!(
            classify_puback(&ack(PubAckReason::NoMatchingSubscribers)),
            SinkResult::Delivered
        );
        for dead in [
            PubAckReason::TopicNameInvalid,
            PubAckReason::PayloadFormatInvalid,
        ] {
            assert!(matches!(
                classify_puback(&ack(dead)),
                SinkResult::Dead { .. }
            ));
        }
        for retry in [
            PubAckReason::UnspecifiedError,
            PubAckReason::ImplementationSpecificError,
            PubAckReason::NotAuthorized,
            PubAckReason::PacketIdentifierInUse,
            PubAckReason::QuotaExceeded,
        ] {
            assert!(matches!(
                classify_puback(&ack(retry)),
                SinkResult::Retry { .. }
            ));
        }
        let with_reason = PubAck {
            pkid: 1,
            reason: PubAckReason::QuotaExceeded,
            properties: Some(PubAckProperties {
                reason_string: Some("slow down".into()),
                user_properties: vec![],
            }),
        };
        match classify_puback(&with_reason) {
            SinkResult::Retry { error, .. } => {
                assert!(error.contains("(QuotaExceeded): slow down"), "{error}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn packet_size_bound_covers_the_encoding() {
        let properties = PublishProperties {
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            user_properties: vec![("id".into(), "main:1".into())],
            ..PublishProperties::default()
        };
        let bound = packet_size_bound("t/main", 1000, &properties);
        let mut publish = rumqttc::v5::mqttbytes::v5::Publish::new(
            "t/main",
            QoS::AtLeastOnce,
            vec![b'x'; 1000],
            Some(properties),
        );
        publish.pkid = 1;
        let mut buf = bytes::BytesMut::new();
        let written = Packet::Publish(publish).write(&mut buf, None).unwrap();
        assert!(
            bound >= written && bound < written + 16,
            "bound {bound}, encoded {written}"
        );
    }

    fn sink(url: &str, timeout: Duration) -> MqttSink {
        let mqtt = MqttSinkConfig {
            url: url.into(),
            topic: DEFAULT_TOPIC.into(),
            client_id: "b24eventd-unit".into(),
            retain: false,
            keep_alive: DEFAULT_KEEP_ALIVE,
        };
        let config = SinkConfig {
            name: "bus".into(),
            route: Default::default(),
            timeout,
            concurrency: 1,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(5),
            },
            kind: SinkKind::Mqtt(mqtt.clone()),
        };
        MqttSink::new(&config, &mqtt).unwrap()
    }

    #[tokio::test]
    async fn a_closed_port_retries_without_the_password() {
        let sink = sink("mqtt://ops:hunter2@127.0.0.1:1", Duration::from_secs(2));
        let batch: Vec<Envelope> = (1..=5).map(Envelope::sample).collect();
        let results = sink.deliver(&batch).await;
        assert_eq!(results.len(), 5);
        for result in &results {
            match result {
                SinkResult::Retry { error, after: None } => {
                    assert!(error.contains("127.0.0.1:1"), "{error}");
                    assert!(!error.contains("hunter2"), "{error}");
                }
                other => panic!("expected retry, got {other:?}"),
            }
        }
        let health = sink.health().await;
        assert_eq!(health.level, crate::sinks::HealthLevel::Fail, "{health:?}");
        assert!(!format!("{health:?}").contains("hunter2"));
        assert_eq!(sink.health().await.level, crate::sinks::HealthLevel::Fail);
    }
}
