//! The `amqp` sink: publishes each envelope to a RabbitMQ exchange (persistent, publisher
//! confirms, `message_id` = envelope id), optionally declaring the exchange and a bound queue.
//!
//! A batch is split over up to `concurrency` confirm channels of one connection, published, and
//! then its confirms are awaited. An envelope counts as delivered only when the broker acked its
//! publish and did not return it as unroutable. A nack, a return (with `mandatory`), a closed
//! connection or channel and the `timeout` are retried; after a closed connection or channel or
//! a timeout the connection is dropped and the next attempt connects again. An envelope larger
//! than `max_message_size`, or whose routing key does not fit AMQP's 255 bytes, is dead at once.
//! Error texts never contain the URL's password.

use super::name_template::{self, Piece, TemplateError};
use super::{Health, Sink, SinkResult};
use super::{SinkConfig, SinkKind};
use crate::BoxFuture;
use crate::envelope::Envelope;
use crate::options::{ConfigError, SinkOptions, parse_bytes, redact_url};
use futures_util::future::join_all;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde::Deserialize;
use std::fmt;
use std::time::Duration;
use tokio::sync::Mutex;

/// `routing_key` when none is configured.
pub(crate) const DEFAULT_ROUTING_KEY: &str = "{portal}.{event}";
/// `max_message_size` when none is configured: RabbitMQ's own default (`max_message_size`).
pub(crate) const DEFAULT_MAX_MESSAGE_SIZE: u64 = 128 << 20;
/// The largest message RabbitMQ accepts whatever its configuration (512 MiB).
const BROKER_MAX_MESSAGE_SIZE: u64 = 512 << 20;
/// The most bytes in an AMQP short string (exchange, queue, routing key, message id).
const SHORT_STRING_MAX: usize = 255;
/// `max_batch` is this many times `concurrency`: envelopes published per channel and batch.
const BATCH_PER_CHANNEL: usize = 100;
/// `app_id` of every message.
const APP_ID: &str = "b24eventd";
/// AMQP delivery mode 2: the broker writes the message to disk (in a durable queue).
const PERSISTENT: u8 = 2;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// The exchange type `declare_exchange` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    Topic,
    Direct,
    Fanout,
    Headers,
}

impl ExchangeType {
    const NAMES: [(&'static str, ExchangeType); 4] = [
        ("topic", ExchangeType::Topic),
        ("direct", ExchangeType::Direct),
        ("fanout", ExchangeType::Fanout),
        ("headers", ExchangeType::Headers),
    ];

    fn parse(text: &str) -> Option<ExchangeType> {
        Self::NAMES
            .iter()
            .find(|(name, _)| *name == text)
            .map(|(_, kind)| *kind)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Topic => "topic",
            ExchangeType::Direct => "direct",
            ExchangeType::Fanout => "fanout",
            ExchangeType::Headers => "headers",
        }
    }

    fn lapin_kind(self) -> lapin::ExchangeKind {
        match self {
            ExchangeType::Topic => lapin::ExchangeKind::Topic,
            ExchangeType::Direct => lapin::ExchangeKind::Direct,
            ExchangeType::Fanout => lapin::ExchangeKind::Fanout,
            ExchangeType::Headers => lapin::ExchangeKind::Headers,
        }
    }
}

/// `type = "amqp"`: publish to a RabbitMQ exchange.
#[derive(Clone, PartialEq)]
pub struct AmqpSinkConfig {
    /// `amqp://` or `amqps://`; may carry a password: print it with [`redact_url`].
    pub url: String,
    /// The exchange to publish to; `""` is the default exchange (routes by queue name).
    pub exchange: String,
    /// The routing key template with `{portal}` and `{event}`.
    pub routing_key: String,
    /// Declare `exchange` (durable) with this type on every new connection.
    pub declare_exchange: Option<ExchangeType>,
    /// Declare this durable queue on every new connection (and bind it, see `queue_binding`).
    pub queue: Option<String>,
    /// The binding key of `queue` on `exchange` (required when both are set).
    pub queue_binding: Option<String>,
    /// Publish as mandatory: an unroutable message is returned and retried, not dropped.
    pub mandatory: bool,
    /// Envelopes larger than this (bytes of JSON) are dead without being published.
    pub max_message_size: u64,
}

impl super::SinkTypeConfig for AmqpSinkConfig {
    fn register_credentials(&self) {
        super::register_url_credentials(&self.url);
    }
}

impl fmt::Debug for AmqpSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSinkConfig")
            .field("url", &redact_url(&self.url))
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("declare_exchange", &self.declare_exchange)
            .field("queue", &self.queue)
            .field("queue_binding", &self.queue_binding)
            .field("mandatory", &self.mandatory)
            .field("max_message_size", &self.max_message_size)
            .finish()
    }
}

/// The keys of an `amqp` sink as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    url: String,
    exchange: String,
    routing_key: Option<String>,
    declare_exchange: Option<String>,
    queue: Option<String>,
    queue_binding: Option<String>,
    mandatory: Option<bool>,
    max_message_size: Option<String>,
}

/// Reads and checks the keys of an `amqp` sink (registered in [`super::SINK_TYPES`]).
pub(crate) fn parse_config(options: &SinkOptions) -> Result<SinkKind, ConfigError> {
    let raw: Raw = options.parse()?;
    check_url(options, &raw.url)?;
    check_name(options, "exchange", &raw.exchange)?;
    let routing_key = raw
        .routing_key
        .clone()
        .unwrap_or_else(|| DEFAULT_ROUTING_KEY.to_string());
    check_template(&routing_key).map_err(|problem| options.err("routing_key", problem))?;

    let declare_exchange = match raw.declare_exchange.as_deref() {
        None => None,
        Some(text) => Some(check_declare_exchange(options, text, &raw.exchange)?),
    };
    if let Some(queue) = &raw.queue {
        check_name(options, "queue", queue)?;
        if queue.is_empty() {
            return Err(options.err(
                "queue",
                "must not be empty; name the durable queue to declare, or leave the key out",
            ));
        }
    }
    check_binding(options, &raw)?;

    let max_message_size = match raw.max_message_size {
        None => DEFAULT_MAX_MESSAGE_SIZE,
        Some(text) => check_size(options, &text)?,
    };
    Ok(SinkKind::Amqp(AmqpSinkConfig {
        url: raw.url,
        exchange: raw.exchange,
        routing_key,
        declare_exchange,
        queue: raw.queue,
        queue_binding: raw.queue_binding,
        mandatory: raw.mandatory.unwrap_or(true),
        max_message_size,
    }))
}

fn check_url(options: &SinkOptions, url: &str) -> Result<(), ConfigError> {
    let shown = redact_url(url);
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err(options.err(
            "url",
            format!(
                "{shown:?} is not an amqp url; write e.g. \"amqp://user:password@host:5672/%2f\" \
                 (or amqps:// for TLS)"
            ),
        ));
    }
    match url.parse::<AMQPUri>() {
        Ok(uri) if uri.authority.host.is_empty() => Err(options.err(
            "url",
            format!("{shown:?} names no host; write e.g. \"amqp://user:password@host:5672/%2f\""),
        )),
        Ok(_) => Ok(()),
        Err(problem) => Err(options.err(
            "url",
            format!(
                "invalid amqp url {shown:?}: {}; write e.g. \"amqp://user:password@host:5672/%2f\"",
                scrub(&problem, url)
            ),
        )),
    }
}

/// An exchange or queue name: at most 255 bytes, not in the broker's reserved `amq.` space for
/// names we declare.
fn check_name(options: &SinkOptions, key: &str, name: &str) -> Result<(), ConfigError> {
    if name.len() > SHORT_STRING_MAX {
        return Err(options.err(
            key,
            format!("is {} bytes long; AMQP names are at most 255", name.len()),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(options.err(key, "contains control characters; use a plain name"));
    }
    Ok(())
}

fn check_declare_exchange(
    options: &SinkOptions,
    text: &str,
    exchange: &str,
) -> Result<ExchangeType, ConfigError> {
    let Some(kind) = ExchangeType::parse(text) else {
        return Err(options.err(
            "declare_exchange",
            format!(
                "unknown exchange type {text:?}; write \"topic\", \"direct\", \"fanout\" or \
                 \"headers\", or leave the key out to use an existing exchange"
            ),
        ));
    };
    if exchange.is_empty() {
        return Err(options.err(
            "declare_exchange",
            "the default exchange (exchange = \"\") cannot be declared; name an exchange or \
             leave declare_exchange out",
        ));
    }
    if exchange.starts_with("amq.") {
        return Err(options.err(
            "declare_exchange",
            format!(
                "{exchange:?} is in the broker's reserved amq. namespace and cannot be declared; \
                 leave declare_exchange out to use it as it is, or choose another name"
            ),
        ));
    }
    Ok(kind)
}

/// `queue_binding` goes with `queue` on a named exchange, and only there.
fn check_binding(options: &SinkOptions, raw: &Raw) -> Result<(), ConfigError> {
    match (&raw.queue, &raw.queue_binding) {
        (Some(queue), _) if queue.starts_with("amq.") => Err(options.err(
            "queue",
            format!("{queue:?} is in the broker's reserved amq. namespace; choose another name"),
        )),
        (None, Some(_)) => Err(options.err(
            "queue_binding",
            "needs a queue to bind; set queue, or leave queue_binding out",
        )),
        (Some(_), Some(_)) if raw.exchange.is_empty() => Err(options.err(
            "queue_binding",
            "the default exchange (exchange = \"\") routes by queue name and takes no bindings; \
             leave queue_binding out (and make routing_key the queue's name), or name an exchange",
        )),
        (Some(_), None) if !raw.exchange.is_empty() => Err(options.err(
            "queue_binding",
            "missing: a queue on a named exchange needs a binding key; write e.g. \"#\" (every \
             message of a topic exchange) or \"main.*\"",
        )),
        (_, Some(binding)) if binding.len() > SHORT_STRING_MAX => Err(options.err(
            "queue_binding",
            format!(
                "is {} bytes long; binding keys are at most 255",
                binding.len()
            ),
        )),
        _ => Ok(()),
    }
}

fn check_size(options: &SinkOptions, text: &str) -> Result<u64, ConfigError> {
    match parse_bytes(text) {
        Some(0) | None => Err(options.err(
            "max_message_size",
            format!("invalid size {text:?}; use e.g. \"128MiB\" (the broker's max_message_size)"),
        )),
        Some(size) if size > BROKER_MAX_MESSAGE_SIZE => Err(options.err(
            "max_message_size",
            format!("{text:?} is larger than RabbitMQ's limit of 512MiB; use at most \"512MiB\""),
        )),
        Some(size) => Ok(size),
    }
}

// ---------------------------------------------------------------------------------------------
// Routing key template
// ---------------------------------------------------------------------------------------------

/// Splits a routing key template into text and `{portal}`/`{event}`; any other `{...}` or a
/// stray brace is an error naming it.
fn parse_template(template: &str) -> Result<Vec<Piece<'_>>, String> {
    name_template::parse(template).map_err(|error| match error {
        TemplateError::StrayClose => format!(
            "has a '}}' without '{{' in {template:?}; placeholders are {{portal}} and {{event}}"
        ),
        TemplateError::Unclosed => format!(
            "has a '{{' without '}}' in {template:?}; placeholders are {{portal}} and {{event}}"
        ),
        TemplateError::Unknown(other) => {
            format!("unknown placeholder {{{other}}} in {template:?}; use {{portal}} and {{event}}")
        }
    })
}

/// Checks a routing key template: known placeholders only, and its fixed text within 255 bytes.
fn check_template(template: &str) -> Result<(), String> {
    let pieces = parse_template(template)?;
    let fixed: usize = pieces
        .iter()
        .map(|piece| match piece {
            Piece::Text(text) => text.len(),
            _ => 0,
        })
        .sum();
    if fixed > SHORT_STRING_MAX {
        return Err(format!(
            "is {fixed} bytes long without its placeholders; routing keys are at most 255 bytes"
        ));
    }
    Ok(())
}

/// The routing key of one envelope. The template was checked when the config was read.
fn render_routing_key(template: &str, envelope: &Envelope) -> String {
    let pieces = parse_template(template).unwrap_or_else(|_| vec![Piece::Text(template)]);
    pieces
        .iter()
        .map(|piece| match piece {
            Piece::Text(text) => *text,
            Piece::Portal => envelope.portal.as_str(),
            Piece::Event => envelope.event.as_str(),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------------------------

/// One envelope ready to publish.
struct Message {
    routing_key: ShortString,
    payload: Vec<u8>,
    properties: BasicProperties,
}

/// Builds the message of one envelope, or says why it can never be published (dead).
fn message(config: &AmqpSinkConfig, envelope: &Envelope) -> Result<Message, String> {
    let payload = serde_json::to_vec(envelope)
        .map_err(|e| format!("cannot encode the envelope as JSON: {e}"))?;
    if payload.len() as u64 > config.max_message_size {
        return Err(format!(
            "the envelope is {} bytes, larger than max_message_size ({} bytes)",
            payload.len(),
            config.max_message_size
        ));
    }
    let key = render_routing_key(&config.routing_key, envelope);
    let routing_key = ShortString::try_new(key.clone()).map_err(|_| {
        format!(
            "the routing key is {} bytes, AMQP allows 255: {:?}",
            key.len(),
            key.chars().take(60).collect::<String>()
        )
    })?;
    let short = |what: &str, value: &str| {
        ShortString::try_new(value)
            .map_err(|_| format!("the {what} is longer than AMQP's 255 bytes"))
    };
    let mut headers = FieldTable::default();
    headers.insert(
        "portal".into(),
        AMQPValue::LongString(envelope.portal.as_str().into()),
    );
    headers.insert(
        "event".into(),
        AMQPValue::LongString(envelope.event.as_str().into()),
    );
    let properties = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type("application/json".into())
        .with_message_id(short("envelope id", &envelope.id)?)
        .with_type(short("event name", &envelope.event)?)
        .with_app_id(APP_ID.into())
        .with_timestamp(event_timestamp(&envelope.timestamp))
        .with_headers(headers);
    Ok(Message {
        routing_key,
        payload,
        properties,
    })
}

/// The event's time in Unix seconds (stable across redeliveries); now when it does not parse.
fn event_timestamp(timestamp: &str) -> u64 {
    let when = chrono::DateTime::parse_from_rfc3339(timestamp)
        .map(|t| t.timestamp())
        .unwrap_or_else(|_| chrono::Utc::now().timestamp());
    u64::try_from(when).unwrap_or(0)
}

/// What the broker said to one publish.
fn classify(confirmation: Confirmation, exchange: &str) -> SinkResult {
    match confirmation {
        Confirmation::Ack(None) => SinkResult::Delivered,
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            SinkResult::Retry {
                error: format!(
                    "unroutable: exchange {exchange:?} returned the message with routing key {:?} \
                     ({} {}); bind a queue that matches it (queue and queue_binding), or set \
                     mandatory = false to let the broker drop such messages",
                    returned.delivery.routing_key.as_str(),
                    returned.reply_code,
                    returned.reply_text.as_str()
                ),
                after: None,
            }
        }
        Confirmation::Nack(None) => SinkResult::Retry {
            error: "the broker nacked the publish (it could not store the message)".to_string(),
            after: None,
        },
        Confirmation::NotRequested => SinkResult::Retry {
            error: "the channel is not in confirm mode, so the publish was not confirmed"
                .to_string(),
            after: None,
        },
    }
}

/// `text` with `url`'s password (raw and percent-decoded) and the whole url replaced.
fn scrub(text: &str, url: &str) -> String {
    let decoded = url
        .parse::<AMQPUri>()
        .map(|uri| uri.authority.userinfo.password)
        .unwrap_or_default();
    let raw = raw_password(url).unwrap_or_default();
    super::scrub(
        &text.replace(url, &redact_url(url)),
        &[decoded.as_str(), raw],
    )
}

/// The password as written in `scheme://user:password@host...`.
fn raw_password(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    let userinfo = &rest[..rest.rfind('@')?];
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then_some(password)
}

// ---------------------------------------------------------------------------------------------
// The sink
// ---------------------------------------------------------------------------------------------

/// An open connection with its confirm channels.
struct Link {
    /// Dropping it closes the connection.
    connection: Connection,
    channels: Vec<Channel>,
}

impl Link {
    fn is_usable(&self) -> bool {
        self.connection.status().connected() && self.channels.iter().all(|c| c.status().connected())
    }
}

/// Publishes envelopes to RabbitMQ.
pub(crate) struct AmqpSink {
    name: String,
    config: AmqpSinkConfig,
    /// `url` without its password, for logs and error texts.
    shown_url: String,
    timeout: Duration,
    concurrency: usize,
    /// The connection deliveries use; `None` until the first delivery and after a failure.
    link: Mutex<Option<Link>>,
}

impl AmqpSink {
    /// Builds the sink without connecting: the first delivery connects.
    pub fn new(config: &SinkConfig, amqp: &AmqpSinkConfig) -> anyhow::Result<AmqpSink> {
        super::ensure_crypto_provider();
        Ok(AmqpSink {
            name: config.name.clone(),
            config: amqp.clone(),
            shown_url: redact_url(&amqp.url),
            timeout: config.timeout,
            concurrency: config.concurrency.max(1),
            link: Mutex::new(None),
        })
    }

    /// A lapin error as text, without the URL's password.
    fn error_text(&self, what: &str, e: &lapin::Error) -> String {
        scrub(
            &format!("{what} ({}): {e}", self.shown_url),
            &self.config.url,
        )
    }

    async fn connect(&self) -> Result<Connection, String> {
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("b24eventd sink {}", self.name).into());
        Connection::connect(&self.config.url, properties)
            .await
            .map_err(|e| self.error_text("cannot connect", &e))
    }

    /// Connects, declares what the config asks for, and opens the confirm channels.
    async fn open_link(&self) -> Result<Link, String> {
        let connection = self.connect().await?;
        let setup = connection
            .create_channel()
            .await
            .map_err(|e| self.error_text("cannot open a channel", &e))?;
        self.declare(&setup).await?;
        let _ = setup.close(200, "OK".into()).await;
        let mut channels = Vec::with_capacity(self.concurrency);
        for _ in 0..self.concurrency {
            let channel = connection
                .create_channel()
                .await
                .map_err(|e| self.error_text("cannot open a channel", &e))?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(|e| self.error_text("cannot turn on publisher confirms", &e))?;
            channels.push(channel);
        }
        tracing::debug!(sink = %self.name, url = %self.shown_url, channels = channels.len(), "amqp connected");
        Ok(Link {
            connection,
            channels,
        })
    }

    /// Declares the exchange and the queue (durable) and binds the queue, as configured.
    async fn declare(&self, channel: &Channel) -> Result<(), String> {
        let config = &self.config;
        if let Some(kind) = config.declare_exchange {
            let options = ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            };
            channel
                .exchange_declare(
                    config.exchange.as_str().into(),
                    kind.lapin_kind(),
                    options,
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    self.error_text(
                        &format!(
                            "cannot declare the {} exchange {:?}",
                            kind.as_str(),
                            config.exchange
                        ),
                        &e,
                    )
                })?;
        }
        if let Some(queue) = &config.queue {
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions::durable(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| self.error_text(&format!("cannot declare queue {queue:?}"), &e))?;
            if let Some(binding) = &config.queue_binding {
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        config.exchange.as_str().into(),
                        binding.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| {
                        self.error_text(
                            &format!(
                                "cannot bind queue {queue:?} to exchange {:?} with {binding:?}",
                                config.exchange
                            ),
                            &e,
                        )
                    })?;
            }
        }
        Ok(())
    }

    /// Publishes `messages` on one channel, then awaits their confirms.
    async fn publish_on(
        &self,
        channel: &Channel,
        messages: Vec<(usize, Message)>,
    ) -> Vec<(usize, SinkResult)> {
        let options = BasicPublishOptions {
            mandatory: self.config.mandatory,
            ..BasicPublishOptions::default()
        };
        let mut pending = Vec::with_capacity(messages.len());
        let mut results = Vec::with_capacity(messages.len());
        for (index, message) in messages {
            let published = channel
                .basic_publish(
                    self.config.exchange.as_str().into(),
                    message.routing_key,
                    options,
                    &message.payload,
                    message.properties,
                )
                .await;
            match published {
                Ok(confirm) => pending.push((index, confirm)),
                Err(e) => results.push((
                    index,
                    SinkResult::Retry {
                        error: self.error_text("cannot publish", &e),
                        after: None,
                    },
                )),
            }
        }
        for (index, confirm) in pending {
            let result = match confirm.await {
                Ok(confirmation) => classify(confirmation, &self.config.exchange),
                Err(e) => SinkResult::Retry {
                    error: self.error_text("no publisher confirm", &e),
                    after: None,
                },
            };
            results.push((index, result));
        }
        results
    }

    /// Publishes `messages` split over the link's channels, one contiguous chunk per channel.
    async fn publish_all(
        &self,
        link: &Link,
        messages: Vec<(usize, Message)>,
    ) -> Vec<(usize, SinkResult)> {
        let per_channel = messages.len().div_ceil(link.channels.len()).max(1);
        let mut chunks: Vec<Vec<(usize, Message)>> = Vec::new();
        for item in messages {
            match chunks.last_mut() {
                Some(chunk) if chunk.len() < per_channel => chunk.push(item),
                _ => chunks.push(vec![item]),
            }
        }
        let publishes = chunks
            .into_iter()
            .zip(&link.channels)
            .map(|(chunk, channel)| self.publish_on(channel, chunk));
        join_all(publishes).await.into_iter().flatten().collect()
    }

    /// Delivers a batch within the timeout. The link is dropped when it failed or the timeout
    /// passed, so the next attempt starts on a fresh connection.
    async fn deliver_batch(&self, batch: &[Envelope]) -> Vec<SinkResult> {
        let mut results: Vec<Option<SinkResult>> = vec![None; batch.len()];
        let mut messages = Vec::with_capacity(batch.len());
        for (index, envelope) in batch.iter().enumerate() {
            match message(&self.config, envelope) {
                Ok(message) => messages.push((index, message)),
                Err(error) => results[index] = Some(SinkResult::Dead { error }),
            }
        }
        if !messages.is_empty() {
            let mut link = self.link.lock().await;
            let attempt =
                tokio::time::timeout(self.timeout, self.publish_with(&mut link, messages));
            match attempt.await {
                Ok(Ok(published)) => {
                    for (index, result) in published {
                        results[index] = Some(result);
                    }
                }
                Ok(Err(error)) => {
                    *link = None;
                    fill(&mut results, &error);
                }
                Err(_) => {
                    *link = None;
                    let error = format!(
                        "no publisher confirm within {} ({})",
                        humantime::format_duration(self.timeout),
                        self.shown_url
                    );
                    fill(&mut results, &error);
                }
            }
        }
        results
            .into_iter()
            .zip(batch)
            .map(|(result, envelope)| {
                let result = result.unwrap_or_else(|| SinkResult::Retry {
                    error: "not published".to_string(),
                    after: None,
                });
                if !matches!(result, SinkResult::Delivered) {
                    tracing::debug!(portal = %envelope.portal, event_id = %envelope.id, sink = %self.name, result = ?result, "amqp delivery failed");
                }
                result
            })
            .collect()
    }

    /// Connects when needed, publishes, and drops a link that broke while publishing.
    async fn publish_with(
        &self,
        link: &mut Option<Link>,
        messages: Vec<(usize, Message)>,
    ) -> Result<Vec<(usize, SinkResult)>, String> {
        // Taken out while in use: a failure or a timeout leaves `None`, so the next attempt
        // connects afresh.
        let open = match link.take() {
            Some(open) if open.is_usable() => open,
            _ => self.open_link().await?,
        };
        let published = self.publish_all(&open, messages).await;
        if open.is_usable() {
            *link = Some(open);
        } else {
            tracing::info!(sink = %self.name, url = %self.shown_url, "amqp connection or channel closed; reconnecting on the next attempt");
        }
        Ok(published)
    }

    /// The healthcheck: connect, open a channel, passively declare the exchange and the queue.
    async fn probe(&self) -> Health {
        match tokio::time::timeout(self.timeout, self.check()).await {
            Ok(health) => health,
            Err(_) => Health::fail(
                format!(
                    "no answer from {} within {}",
                    self.shown_url,
                    humantime::format_duration(self.timeout)
                ),
                "check that RabbitMQ is running and reachable (host, port, TLS) from this host",
            ),
        }
    }

    async fn check(&self) -> Health {
        let connection = match self.connect().await {
            Ok(connection) => connection,
            Err(problem) => {
                return Health::fail(
                    problem,
                    "check the sink's url (host, port, vhost, user and password) and that \
                     RabbitMQ is running and reachable from this host",
                );
            }
        };
        let health = self.check_topology(&connection).await;
        let _ = connection.close(200, "OK".into()).await;
        health
    }

    async fn check_topology(&self, connection: &Connection) -> Health {
        let config = &self.config;
        let mut found = vec![format!("connected to {}", self.shown_url)];
        if config.exchange.is_empty() {
            found.push("the default exchange is always there".to_string());
        } else {
            match self.exchange_exists(connection).await {
                Ok(true) => found.push(format!("exchange {:?} exists", config.exchange)),
                Ok(false) if config.declare_exchange.is_some() => found.push(format!(
                    "exchange {:?} does not exist yet and will be declared on connecting",
                    config.exchange
                )),
                Ok(false) => {
                    return Health::fail(
                        format!(
                            "exchange {:?} does not exist on {}",
                            config.exchange, self.shown_url
                        ),
                        "create the exchange, or set declare_exchange (e.g. \"topic\") so the \
                         sink declares it",
                    );
                }
                Err(problem) => {
                    return Health::fail(problem, "check the user's permissions on the vhost");
                }
            }
        }
        if let Some(queue) = &config.queue {
            match self.queue_state(connection, queue).await {
                Ok(Some((messages, consumers))) => found.push(format!(
                    "queue {queue:?} exists ({messages} messages, {consumers} consumers)"
                )),
                Ok(None) => found.push(format!(
                    "queue {queue:?} does not exist yet and will be declared on connecting"
                )),
                Err(problem) => {
                    return Health::fail(problem, "check the user's permissions on the vhost");
                }
            }
        }
        Health::ok(format!("{}; nothing was published", found.join("; ")))
    }

    /// Whether the exchange exists (a passive declare; a 404 closes only that channel).
    async fn exchange_exists(&self, connection: &Connection) -> Result<bool, String> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| self.error_text("cannot open a channel", &e))?;
        let options = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        let kind = self
            .config
            .declare_exchange
            .map(ExchangeType::lapin_kind)
            .unwrap_or_default();
        let answer = channel
            .exchange_declare(
                self.config.exchange.as_str().into(),
                kind,
                options,
                FieldTable::default(),
            )
            .await;
        self.existence(answer.map(|_| ()), &channel, "exchange")
            .await
    }

    /// The queue's message and consumer counts, or `None` when it does not exist.
    async fn queue_state(
        &self,
        connection: &Connection,
        queue: &str,
    ) -> Result<Option<(u32, u32)>, String> {
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| self.error_text("cannot open a channel", &e))?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let answer = channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await;
        let counts = answer
            .as_ref()
            .ok()
            .map(|q| (q.message_count(), q.consumer_count()));
        let exists = self
            .existence(answer.map(|_| ()), &channel, "queue")
            .await?;
        Ok(if exists { counts } else { None })
    }

    /// A passive declare's answer: ok → exists, 404 → does not, anything else → the error.
    async fn existence(
        &self,
        answer: lapin::Result<()>,
        channel: &Channel,
        what: &str,
    ) -> Result<bool, String> {
        match answer {
            Ok(()) => {
                let _ = channel.close(200, "OK".into()).await;
                Ok(true)
            }
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(self.error_text(&format!("cannot check the {what}"), &e)),
        }
    }
}

/// Whether the broker answered 404 NOT_FOUND.
fn is_not_found(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp)
        if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}

/// Sets every still-open result to a retry with `error`.
fn fill(results: &mut [Option<SinkResult>], error: &str) {
    for result in results.iter_mut().filter(|r| r.is_none()) {
        *result = Some(SinkResult::Retry {
            error: error.to_string(),
            after: None,
        });
    }
}

impl Sink for AmqpSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn max_batch(&self) -> usize {
        self.concurrency * BATCH_PER_CHANNEL
    }

    fn deliver<'a>(&'a self, batch: &'a [Envelope]) -> BoxFuture<'a, Vec<SinkResult>> {
        Box::pin(self.deliver_batch(batch))
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(self.probe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::RetryPolicy;

    const URL: &str = "amqp://guest:hunter2@127.0.0.1:5672/%2f";

    /// The typed config of `[sinks.bus]` of type amqp with `keys`.
    fn load(keys: &str) -> Result<AmqpSinkConfig, ConfigError> {
        match crate::sinks::parse_test_config("bus", "amqp", keys)? {
            SinkKind::Amqp(amqp) => Ok(amqp),
            other => panic!("expected an amqp sink, got {other:?}"),
        }
    }

    #[track_caller]
    fn assert_err(keys: &str, key: &str, needle: &str) -> ConfigError {
        let key = format!("sinks.bus.{key}");
        let err = crate::sinks::assert_config_err("bus", "amqp", keys, &key, needle);
        assert!(!err.message.contains("hunter2"), "{err}");
        err
    }

    #[test]
    fn defaults_apply() {
        let config = load(&format!("url = \"{URL}\"\nexchange = \"b24\"")).unwrap();
        assert_eq!(
            config,
            AmqpSinkConfig {
                url: URL.to_string(),
                exchange: "b24".into(),
                routing_key: "{portal}.{event}".into(),
                declare_exchange: None,
                queue: None,
                queue_binding: None,
                mandatory: true,
                max_message_size: 128 << 20,
            }
        );
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("127.0.0.1:5672"), "{debug}");
    }

    #[test]
    fn every_key_is_read() {
        let config = load(&format!(
            "url = \"{URL}\"\nexchange = \"b24\"\nrouting_key = \"crm.{{event}}.{{portal}}\"\n\
             declare_exchange = \"direct\"\nqueue = \"erp\"\nqueue_binding = \"crm.#\"\n\
             mandatory = false\nmax_message_size = \"1MiB\""
        ))
        .unwrap();
        assert_eq!(config.routing_key, "crm.{event}.{portal}");
        assert_eq!(config.declare_exchange, Some(ExchangeType::Direct));
        assert_eq!(config.queue.as_deref(), Some("erp"));
        assert_eq!(config.queue_binding.as_deref(), Some("crm.#"));
        assert!(!config.mandatory);
        assert_eq!(config.max_message_size, 1 << 20);

        let default_exchange = load(&format!(
            "url = \"{URL}\"\nexchange = \"\"\nrouting_key = \"events\"\nqueue = \"events\""
        ))
        .unwrap();
        assert_eq!(default_exchange.exchange, "");
        assert_eq!(default_exchange.queue.as_deref(), Some("events"));
    }

    #[test]
    fn config_errors_name_their_key() {
        let base = format!("url = \"{URL}\"\nexchange = \"b24\"\n");
        assert_err("exchange = \"b24\"", "url", "missing required key");
        assert_err(
            &format!("url = \"{URL}\""),
            "exchange",
            "missing required key",
        );
        assert_err(
            "url = \"http://guest:hunter2@host/\"\nexchange = \"b24\"",
            "url",
            "not an amqp url",
        );
        assert_err(
            "url = \"amqp://guest:hunter2@host:notaport/\"\nexchange = \"b24\"",
            "url",
            "invalid amqp url",
        );
        assert_err(
            &format!("{base}stream = \"x\""),
            "stream",
            "not a key of a \"amqp\" sink",
        );
        assert_err(
            &format!("{base}path = \"/tmp/x\""),
            "path",
            "not a key of a \"amqp\" sink",
        );
        assert_err(
            &format!("{base}routing_key = \"{{portal}}.{{entity}}\""),
            "routing_key",
            "unknown placeholder {entity}",
        );
        assert_err(
            &format!("{base}routing_key = \"{{portal\""),
            "routing_key",
            "without '}'",
        );
        assert_err(
            &format!("{base}routing_key = \"a}}\""),
            "routing_key",
            "without '{'",
        );
        assert_err(
            &format!("{base}routing_key = \"{}\"", "k".repeat(256)),
            "routing_key",
            "at most 255",
        );
        assert_err(
            &format!("{base}routing_key = 5"),
            "routing_key",
            "invalid type: found an integer, expected a string",
        );
        assert_err(
            &format!("{base}declare_exchange = \"fan\""),
            "declare_exchange",
            "unknown exchange type \"fan\"",
        );
        assert_err(
            &format!("url = \"{URL}\"\nexchange = \"\"\ndeclare_exchange = \"topic\""),
            "declare_exchange",
            "default exchange",
        );
        assert_err(
            &format!("url = \"{URL}\"\nexchange = \"amq.topic\"\ndeclare_exchange = \"topic\""),
            "declare_exchange",
            "reserved amq.",
        );
        assert_err(
            &format!("{base}queue = \"erp\""),
            "queue_binding",
            "missing",
        );
        assert_err(
            &format!("{base}queue_binding = \"#\""),
            "queue_binding",
            "needs a queue",
        );
        assert_err(&format!("{base}queue = \"\""), "queue", "must not be empty");
        assert_err(
            &format!("{base}queue = \"amq.x\"\nqueue_binding = \"#\""),
            "queue",
            "reserved amq.",
        );
        assert_err(
            &format!("url = \"{URL}\"\nexchange = \"\"\nqueue = \"erp\"\nqueue_binding = \"#\""),
            "queue_binding",
            "takes no bindings",
        );
        assert_err(
            &format!("url = \"{URL}\"\nexchange = \"{}\"", "x".repeat(256)),
            "exchange",
            "at most 255",
        );
        assert_err(
            &format!("{base}mandatory = \"yes\""),
            "mandatory",
            "invalid type: found a string, expected a boolean",
        );
        assert_err(
            &format!("{base}max_message_size = \"big\""),
            "max_message_size",
            "invalid size",
        );
        assert_err(
            &format!("{base}max_message_size = \"0\""),
            "max_message_size",
            "invalid size",
        );
        assert_err(
            &format!("{base}max_message_size = \"1GiB\""),
            "max_message_size",
            "512MiB",
        );
    }

    #[test]
    fn routing_keys_render_from_the_template() {
        let envelope = Envelope::sample(7);
        assert_eq!(
            render_routing_key("{portal}.{event}", &envelope),
            "main.ONCRMDEALUPDATE"
        );
        assert_eq!(render_routing_key("crm", &envelope), "crm");
        assert_eq!(render_routing_key("", &envelope), "");
        assert_eq!(
            render_routing_key("b24/{event}/{portal}/{event}", &envelope),
            "b24/ONCRMDEALUPDATE/main/ONCRMDEALUPDATE"
        );
        assert_eq!(
            parse_template("a{portal}b").unwrap(),
            vec![Piece::Text("a"), Piece::Portal, Piece::Text("b")]
        );
        assert!(check_template("{portal}.{event}").is_ok());
        assert!(
            check_template("{}")
                .unwrap_err()
                .contains("unknown placeholder {}")
        );
    }

    fn config() -> AmqpSinkConfig {
        AmqpSinkConfig {
            url: URL.into(),
            exchange: "b24".into(),
            routing_key: DEFAULT_ROUTING_KEY.into(),
            declare_exchange: None,
            queue: None,
            queue_binding: None,
            mandatory: true,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }

    #[test]
    fn messages_carry_the_envelope_and_its_properties() {
        let envelope = Envelope::sample(42);
        let message = message(&config(), &envelope).unwrap();
        assert_eq!(message.routing_key.as_str(), "main.ONCRMDEALUPDATE");
        let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        assert_eq!(body, serde_json::to_value(&envelope).unwrap());
        let p = &message.properties;
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(
            p.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(
            p.message_id().as_ref().unwrap().as_str(),
            "main:42:1795330800"
        );
        assert_eq!(p.kind().as_ref().unwrap().as_str(), "ONCRMDEALUPDATE");
        assert_eq!(p.app_id().as_ref().unwrap().as_str(), "b24eventd");
        // 2026-11-22T10:00:00+03:00
        assert_eq!(*p.timestamp(), Some(1_795_330_800));
        let headers = p.headers().as_ref().unwrap().inner();
        assert_eq!(headers["portal"], AMQPValue::LongString("main".into()));
        assert_eq!(
            headers["event"],
            AMQPValue::LongString("ONCRMDEALUPDATE".into())
        );
    }

    #[test]
    fn envelopes_that_can_never_be_published_are_refused() {
        let mut small = config();
        small.max_message_size = 100;
        let error = message(&small, &Envelope::sample(1)).err().unwrap();
        assert!(
            error.contains("larger than max_message_size (100 bytes)"),
            "{error}"
        );

        let mut long_event = Envelope::sample(1);
        long_event.event = "E".repeat(300);
        let error = message(&config(), &long_event).err().unwrap();
        assert!(error.contains("routing key is 305 bytes"), "{error}");

        let mut fixed_key = config();
        fixed_key.routing_key = "crm".into();
        let error = message(&fixed_key, &long_event).err().unwrap();
        assert!(error.contains("event name is longer"), "{error}");
    }

    #[test]
    fn event_time_or_now() {
        assert_eq!(event_timestamp("1970-01-01T00:01:00Z"), 60);
        let now = chrono::Utc::now().timestamp() as u64;
        assert!(event_timestamp("yesterday") >= now);
    }

    #[test]
    fn confirmations_map_to_results() {
        assert_eq!(
            classify(Confirmation::Ack(None), "b24"),
            SinkResult::Delivered
        );
        assert!(matches!(
            classify(Confirmation::Nack(None), "b24"),
            SinkResult::Retry { error, after: None } if error.contains("nacked")
        ));
        assert!(matches!(
            classify(Confirmation::NotRequested, "b24"),
            SinkResult::Retry { .. }
        ));
    }

    #[test]
    fn passwords_are_scrubbed_raw_and_decoded() {
        let url = "amqp://bob:p%40ss@host:5672/%2f";
        assert_eq!(raw_password(url), Some("p%40ss"));
        assert_eq!(raw_password("amqp://host/"), None);
        let text = scrub(&format!("failed for {url}: p@ss and p%40ss"), url);
        assert!(!text.contains("p@ss") && !text.contains("p%40ss"), "{text}");
        assert!(text.contains("amqp://host:5672/%2f"), "{text}");
    }

    #[tokio::test]
    async fn a_closed_port_is_retried_and_fails_the_healthcheck_without_the_password() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let amqp = AmqpSinkConfig {
            url: format!("amqp://guest:hunter2@127.0.0.1:{port}/%2f"),
            max_message_size: 1000,
            ..config()
        };
        let sink_config = SinkConfig {
            name: "bus".into(),
            route: Default::default(),
            timeout: Duration::from_secs(5),
            concurrency: 2,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(5),
            },
            kind: SinkKind::Amqp(amqp.clone()),
        };
        let sink = AmqpSink::new(&sink_config, &amqp).unwrap();
        assert_eq!(sink.max_batch(), 200);
        let mut too_big = Envelope::sample(2);
        too_big.data = serde_json::json!({"blob": "x".repeat(2000)});
        let results = sink.deliver(&[Envelope::sample(1), too_big]).await;
        match &results[0] {
            SinkResult::Retry { error, .. } => {
                assert!(error.contains("cannot connect"), "{error}");
                assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
                assert!(!error.contains("hunter2"), "{error}");
            }
            other => panic!("expected retry, got {other:?}"),
        }
        assert!(
            matches!(&results[1], SinkResult::Dead { error } if error.contains("max_message_size"))
        );

        let health = sink.health().await;
        assert_eq!(health.level, super::super::HealthLevel::Fail, "{health:?}");
        assert!(health.detail.contains("cannot connect"), "{health:?}");
        assert!(!health.detail.contains("hunter2"), "{health:?}");
        assert_eq!(sink.health().await.level, crate::sinks::HealthLevel::Fail);
    }

    #[tokio::test]
    async fn amqps_goes_through_rustls_on_ring() {
        // A plain TCP listener that answers the TLS client hello with garbage: the handshake
        // must fail as a retry (no crypto-provider panic, no password in the text).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                use tokio::io::AsyncWriteExt;
                let _ = socket.write_all(b"AMQP not tls\r\n").await;
            }
        });
        let amqp = AmqpSinkConfig {
            url: format!("amqps://guest:hunter2@localhost:{}/%2f", addr.port()),
            ..config()
        };
        let sink_config = SinkConfig {
            name: "bus".into(),
            route: Default::default(),
            timeout: Duration::from_secs(5),
            concurrency: 1,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(5),
            },
            kind: SinkKind::Amqp(amqp.clone()),
        };
        let sink = AmqpSink::new(&sink_config, &amqp).unwrap();
        let results = sink.deliver(&[Envelope::sample(1)]).await;
        match &results[0] {
            SinkResult::Retry { error, .. } => {
                assert!(error.contains("cannot connect"), "{error}");
                assert!(!error.contains("hunter2"), "{error}");
                eprintln!("{error}");
            }
            other => panic!("expected retry, got {other:?}"),
        }
    }
}
