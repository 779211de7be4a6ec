//! The `nats` sink: publishes each envelope to a JetStream subject built from a template and
//! counts it delivered only when the stream's PubAck came back.
//!
//! Every message carries `Nats-Msg-Id: <envelope id>`, so the server drops a redelivery that
//! arrives within the stream's duplicate window (the PubAck then says `duplicate`, which counts
//! as delivered too). A batch is published at once and its acks awaited together. The client
//! reconnects by itself after a broken connection; a failed first connect is retried on the next
//! delivery. Credentials from the URL are handed to the client separately, so neither a log line
//! of ours nor one of the client library carries them.

use super::name_template;
use super::{Health, Sink, SinkResult};
use super::{SinkConfig, SinkKind};
use crate::BoxFuture;
use crate::envelope::Envelope;
use crate::options::{ConfigError, Secret, SinkOptions};
use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use serde::Deserialize;
use std::time::Duration;
use tokio::sync::Mutex;

/// Messages in flight per batch for each unit of `concurrency`.
const BATCH_PER_SLOT: usize = 64;
/// The duplicate window of a stream the sink creates, unless configured.
const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(600);
/// The shortest duplicate window accepted: shorter ones let a redelivery after a restart through.
const MIN_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// The header JetStream deduplicates on.
const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// `type = "nats"`: JetStream publish. `Debug` shows no credentials ([`Secret`] is redacted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsSinkConfig {
    /// The server URL without credentials (`nats://host:4222`, `tls://host:4222`).
    pub server: String,
    pub auth: NatsAuth,
    /// The subject template (`bitrix.{portal}.{event}`).
    pub subject: String,
    /// The stream that must capture the subjects.
    pub stream: String,
    /// Create the stream (file storage, subjects from the template) when it is missing.
    pub create_stream: bool,
    /// The duplicate window of a stream this sink creates.
    pub duplicate_window: Duration,
}

impl super::SinkTypeConfig for NatsSinkConfig {
    // Its token or password is a `Secret`, registered when it is made.
}

/// How the sink authenticates, taken from the URL's userinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    None,
    /// `nats://TOKEN@host`.
    Token(Secret),
    /// `nats://USER:PASSWORD@host`.
    UserPassword(String, Secret),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    url: String,
    subject: String,
    stream: String,
    #[serde(default)]
    create_stream: bool,
    #[serde(default, with = "humantime_serde")]
    duplicate_window: Option<Duration>,
}

/// Reads `[sinks.NAME]` of `type = "nats"`.
pub(crate) fn parse_config(options: &SinkOptions) -> Result<SinkKind, ConfigError> {
    let raw: Raw = options.parse()?;
    let (server, auth) = split_url(&raw.url).map_err(|m| options.err("url", m))?;
    validate_template(&raw.subject).map_err(|m| options.err("subject", m))?;
    validate_stream_name(&raw.stream).map_err(|m| options.err("stream", m))?;
    let duplicate_window = raw.duplicate_window.unwrap_or(DEFAULT_DUPLICATE_WINDOW);
    if duplicate_window < MIN_DUPLICATE_WINDOW {
        return Err(options.err(
            "duplicate_window",
            format!(
                "must be at least {} so a redelivery after a restart is still dropped by the \
                 server, got {}",
                humantime::format_duration(MIN_DUPLICATE_WINDOW),
                humantime::format_duration(duplicate_window)
            ),
        ));
    }
    options.duration("duplicate_window", raw.duplicate_window, duplicate_window)?;
    if raw.duplicate_window.is_some() && !raw.create_stream {
        return Err(options.err(
            "duplicate_window",
            "only used when the sink creates the stream: set create_stream = true, or set the \
             window on the stream itself (nats stream edit --dupe-window)",
        ));
    }
    Ok(SinkKind::Nats(NatsSinkConfig {
        server,
        auth,
        subject: raw.subject,
        stream: raw.stream,
        create_stream: raw.create_stream,
        duplicate_window,
    }))
}

/// Splits the configured URL into the server address (no userinfo) and the credentials.
fn split_url(url: &str) -> Result<(String, NatsAuth), String> {
    let mut parsed = reqwest::Url::parse(url).map_err(|e| {
        format!("invalid URL ({e}); write nats://host:4222, nats://user:password@host:4222 or nats://token@host:4222")
    })?;
    if !matches!(parsed.scheme(), "nats" | "tls") {
        return Err(format!(
            "unsupported scheme {:?}; write nats://host:4222 (or tls://host:4222 for TLS)",
            parsed.scheme()
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("the URL has no host; write nats://host:4222".into());
    }
    if !matches!(parsed.path(), "" | "/") || parsed.query().is_some() {
        return Err("the URL must not have a path or query; write nats://host:4222".into());
    }
    let decode = |s: &str| {
        percent_decode(s).ok_or_else(|| "the URL's credentials are not valid UTF-8".to_string())
    };
    let user = decode(parsed.username())?;
    let auth = match parsed.password() {
        Some(password) => NatsAuth::UserPassword(user, Secret::new(decode(password)?)),
        None if !user.is_empty() => NatsAuth::Token(Secret::new(user)),
        None => NatsAuth::None,
    };
    let _ = parsed.set_username("");
    let _ = parsed.set_password(None);
    let server = parsed.to_string().trim_end_matches('/').to_string();
    Ok((server, auth))
}

/// `%XX` escapes of URL userinfo decoded.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A subject template: dot-separated tokens, none empty, no whitespace or wildcards, and only the
/// placeholders `{portal}` and `{event}`.
fn validate_template(template: &str) -> Result<(), String> {
    if template.is_empty() {
        return Err("must not be empty; write e.g. \"bitrix.{portal}.{event}\"".into());
    }
    if template
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("must not contain spaces or control characters".into());
    }
    if template.contains(['*', '>']) {
        return Err(
            "must not contain the wildcards * or >: a message is published to one subject".into(),
        );
    }
    if template.split('.').any(str::is_empty) {
        return Err("has an empty token (a leading, trailing or doubled \".\")".into());
    }
    name_template::parse(template)
        .map(|_| ())
        .map_err(|_| "unknown placeholder; the placeholders are {portal} and {event}".into())
}

/// A stream name: what the server accepts (no spaces, `.`, `*`, `>`, path separators).
fn validate_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty; write e.g. \"BITRIX\"".into());
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err(
            "must not contain spaces, \".\", \"*\", \">\" or path separators; write e.g. \"BITRIX\""
                .into(),
        );
    }
    Ok(())
}

/// A value put into one subject token: characters a token cannot hold (`.`, `*`, `>`, whitespace)
/// become `_`.
fn subject_token(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c == '.' || c == '*' || c == '>' || c.is_whitespace() || c.is_control() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// The subject of one envelope: the portal as configured, the event name in lower case.
pub(crate) fn render_subject(template: &str, portal: &str, event: &str) -> String {
    name_template::render(
        template,
        &subject_token(portal),
        &subject_token(&event.to_lowercase()),
    )
}

/// The subject filter covering every subject the template can produce: each token holding a
/// placeholder becomes `*` (`bitrix.{portal}.{event}` → `bitrix.*.*`).
pub(crate) fn template_filter(template: &str) -> String {
    template
        .split('.')
        .map(|token| {
            if name_template::has_placeholders(token) {
                "*"
            } else {
                token
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Whether the stream subject `pattern` captures every subject matched by `filter`.
fn subject_covers(pattern: &str, filter: &str) -> bool {
    let mut pattern = pattern.split('.');
    let mut filter = filter.split('.');
    loop {
        match (pattern.next(), filter.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(f)) if f != ">" => {}
            (Some(p), Some(f)) if p == f && f != "*" && f != ">" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// A connected client and its JetStream context.
struct Connection {
    js: jetstream::Context,
}

/// Publishes envelopes to JetStream.
pub(crate) struct NatsSink {
    name: String,
    config: NatsSinkConfig,
    timeout: Duration,
    concurrency: usize,
    /// `None` until the first successful connect; the client reconnects by itself afterwards.
    connection: Mutex<Option<Connection>>,
}

impl NatsSink {
    pub fn new(config: &SinkConfig, nats: &NatsSinkConfig) -> anyhow::Result<NatsSink> {
        Ok(NatsSink {
            name: config.name.clone(),
            config: nats.clone(),
            timeout: config.timeout,
            concurrency: config.concurrency.max(1),
            connection: Mutex::new(None),
        })
    }

    fn connect_options(&self) -> async_nats::ConnectOptions {
        let options = match &self.config.auth {
            NatsAuth::None => async_nats::ConnectOptions::new(),
            NatsAuth::Token(token) => {
                async_nats::ConnectOptions::with_token(token.expose().to_string())
            }
            NatsAuth::UserPassword(user, password) => {
                async_nats::ConnectOptions::with_user_and_password(
                    user.clone(),
                    password.expose().to_string(),
                )
            }
        };
        options
            .name(format!("b24eventd sink {}", self.name))
            .connection_timeout(self.timeout)
            .request_timeout(Some(self.timeout))
    }

    /// A new connection and JetStream context (acks awaited up to the sink's timeout).
    async fn connect(&self) -> Result<Connection, String> {
        super::ensure_crypto_provider();
        let attempt = self.connect_options().connect(self.config.server.as_str());
        let client = match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(format!("cannot connect to {}: {e}", self.config.server)),
            Err(_) => {
                return Err(format!(
                    "cannot connect to {}: no answer within {}",
                    self.config.server,
                    humantime::format_duration(self.timeout)
                ));
            }
        };
        let js = jetstream::ContextBuilder::new()
            .timeout(self.timeout)
            .build(client);
        Ok(Connection { js })
    }

    /// The JetStream context, connecting (and creating the stream when configured) if needed.
    async fn context(&self) -> Result<jetstream::Context, String> {
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.js.clone());
        }
        let connection = self.connect().await?;
        if self.config.create_stream {
            self.ensure_stream(&connection.js).await?;
        }
        let js = connection.js.clone();
        *slot = Some(connection);
        Ok(js)
    }

    /// The stream configuration this sink creates when `create_stream` is on.
    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.config.stream.clone(),
            subjects: vec![template_filter(&self.config.subject)],
            storage: stream::StorageType::File,
            duplicate_window: self.config.duplicate_window,
            ..Default::default()
        }
    }

    /// Creates the stream when it does not exist (an existing one is left as it is).
    async fn ensure_stream(&self, js: &jetstream::Context) -> Result<(), String> {
        match js.get_stream(&self.config.stream).await {
            Ok(_) => Ok(()),
            Err(e) if is_stream_not_found(&e) => {
                js.create_stream(self.stream_config())
                    .await
                    .map_err(|e| format!("cannot create the stream {}: {e}", self.config.stream))?;
                tracing::info!(sink = %self.name, stream = %self.config.stream, subjects = %template_filter(&self.config.subject), "created the JetStream stream");
                Ok(())
            }
            Err(e) => Err(format!(
                "cannot look up the stream {}: {e}",
                self.config.stream
            )),
        }
    }

    /// Publishes one envelope and waits for its ack. The output (kept in the journal's attempt
    /// record) says when the server dropped the message as a duplicate of one already stored.
    async fn publish(
        &self,
        js: &jetstream::Context,
        envelope: &Envelope,
    ) -> (SinkResult, Option<String>) {
        let subject = render_subject(&self.config.subject, &envelope.portal, &envelope.event);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(MSG_ID_HEADER, envelope.id.as_str());
        headers.insert("Content-Type", "application/json");
        let payload = envelope.to_json_line().into_bytes();
        let publish = async {
            let ack = js
                .publish_with_headers(subject.clone(), headers, payload.into())
                .await?;
            ack.await
        };
        let result = match tokio::time::timeout(self.timeout, publish).await {
            Ok(Ok(ack)) if ack.duplicate => {
                let output = format!(
                    "duplicate: already stored in stream {} at sequence {}",
                    ack.stream, ack.sequence
                );
                tracing::debug!(sink = %self.name, event_id = %envelope.id, subject = %subject, sequence = ack.sequence, "JetStream dropped a duplicate of a stored message");
                return (SinkResult::Delivered, Some(output));
            }
            Ok(Ok(_ack)) => SinkResult::Delivered,
            Ok(Err(e)) => self.classify(&subject, &e),
            Err(_) => SinkResult::Retry {
                error: format!(
                    "no JetStream ack for {subject} within {}",
                    humantime::format_duration(self.timeout)
                ),
                after: None,
            },
        };
        if !matches!(result, SinkResult::Delivered) {
            tracing::debug!(sink = %self.name, event_id = %envelope.id, subject = %subject, result = ?result, "nats delivery failed");
        }
        (result, None)
    }

    fn classify(&self, subject: &str, e: &jetstream::context::PublishError) -> SinkResult {
        match classify_publish(e) {
            Class::NoStream => {
                if self.config.create_stream {
                    // The stream may have been deleted: create it again on the next attempt.
                    if let Ok(mut slot) = self.connection.try_lock() {
                        *slot = None;
                    }
                }
                SinkResult::Retry {
                    error: format!(
                        "no JetStream stream captures the subject {subject}: create the stream {} \
                         with subjects covering {} (or set create_stream = true)",
                        self.config.stream,
                        template_filter(&self.config.subject)
                    ),
                    after: None,
                }
            }
            Class::Dead => SinkResult::Dead {
                error: format!("JetStream refused the message on {subject}: {e}"),
            },
            Class::Retry => SinkResult::Retry {
                error: format!("publish to {subject} failed: {e}"),
                after: None,
            },
        }
    }

    /// What a delivery needs: a connection, JetStream enabled for the account, the stream
    /// (or `create_stream`), and stream subjects that capture the template.
    async fn probe(&self) -> Health {
        let connection = match self.connect().await {
            Ok(c) => c,
            Err(e) => {
                return Health::fail(
                    e,
                    "check the sink's url (host, port, credentials) and that nats-server runs",
                );
            }
        };
        let js = &connection.js;
        if let Err(e) = jetstream_enabled(js).await {
            return Health::fail(
                format!("JetStream is not available on {}: {e}", self.config.server),
                "start nats-server with JetStream (-js, or jetstream {} in its config) and enable it for the account",
            );
        }
        let filter = template_filter(&self.config.subject);
        let info = match js.get_stream(&self.config.stream).await {
            Ok(mut stream) => match stream.info().await {
                Ok(info) => info.clone(),
                Err(e) => {
                    return Health::fail(
                        format!("cannot read the stream {}: {e}", self.config.stream),
                        "check the account's permissions on $JS.API.STREAM.INFO",
                    );
                }
            },
            Err(e) if is_stream_not_found(&e) => {
                return if self.config.create_stream {
                    Health::ok(format!(
                        "{}: JetStream is on; the stream {} does not exist yet and is created \
                         (subjects {filter}, file storage, duplicate window {}) by the first delivery",
                        self.config.server,
                        self.config.stream,
                        humantime::format_duration(self.config.duplicate_window)
                    ))
                } else {
                    Health::fail(
                        format!(
                            "the stream {} does not exist on {}",
                            self.config.stream, self.config.server
                        ),
                        format!(
                            "create it (nats stream add {} --subjects '{filter}' --storage file --dupe-window 10m) or set create_stream = true",
                            self.config.stream
                        ),
                    )
                };
            }
            Err(e) => {
                return Health::fail(
                    format!("cannot look up the stream {}: {e}", self.config.stream),
                    "check the account's JetStream permissions",
                );
            }
        };
        let subjects = &info.config.subjects;
        if !subjects.iter().any(|s| subject_covers(s, &filter)) {
            return Health::fail(
                format!(
                    "the stream {} captures {:?}, which does not cover the sink's subjects {filter}",
                    self.config.stream, subjects
                ),
                format!(
                    "add {filter} to the stream's subjects (nats stream edit {}) or change the sink's subject",
                    self.config.stream
                ),
            );
        }
        let detail = format!(
            "{}: stream {} captures {filter} ({} messages, duplicate window {})",
            self.config.server,
            self.config.stream,
            info.state.messages,
            humantime::format_duration(info.config.duplicate_window)
        );
        if info.config.duplicate_window < MIN_DUPLICATE_WINDOW {
            return Health::warn(
                detail,
                format!(
                    "raise the stream's duplicate window to at least {} (nats stream edit {} --dupe-window 10m): redeliveries after a restart are duplicates otherwise",
                    humantime::format_duration(MIN_DUPLICATE_WINDOW),
                    self.config.stream
                ),
            );
        }
        Health::ok(detail)
    }
}

/// `$JS.API.INFO` answered without an error. Read as plain JSON rather than the client's account
/// type, whose fields follow newer servers than 2.9.
async fn jetstream_enabled(js: &jetstream::Context) -> Result<(), String> {
    let response: serde_json::Value = js
        .request("INFO", &serde_json::json!({}))
        .await
        .map_err(|e| e.to_string())?;
    match response.get("error") {
        Some(error) => Err(error
            .get("description")
            .and_then(|d| d.as_str())
            .unwrap_or("JetStream answered with an error")
            .to_string()),
        None => Ok(()),
    }
}

fn is_stream_not_found(e: &jetstream::context::GetStreamError) -> bool {
    match e.kind() {
        jetstream::context::GetStreamErrorKind::JetStream(err) => {
            err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
        }
        _ => false,
    }
}

/// How a publish failure is treated.
#[derive(Debug, PartialEq, Eq)]
enum Class {
    /// No stream captures the subject: retried until an operator creates it.
    NoStream,
    /// The message can never be stored (too large for the server or the stream).
    Dead,
    /// Anything else: timeouts, a broken connection, a full stream, JetStream unavailable.
    Retry,
}

fn classify_publish(e: &jetstream::context::PublishError) -> Class {
    match e.kind() {
        PublishErrorKind::StreamNotFound => Class::NoStream,
        PublishErrorKind::MaxPayloadExceeded => Class::Dead,
        PublishErrorKind::Other => {
            let code = std::error::Error::source(e)
                .and_then(|s| s.downcast_ref::<jetstream::Error>())
                .map(|e| e.error_code());
            classify_code(code)
        }
        _ => Class::Retry,
    }
}

fn classify_code(code: Option<jetstream::ErrorCode>) -> Class {
    match code {
        Some(
            jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
            | jetstream::ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM,
        ) => Class::Dead,
        Some(jetstream::ErrorCode::STREAM_NOT_FOUND) => Class::NoStream,
        _ => Class::Retry,
    }
}

impl Sink for NatsSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn max_batch(&self) -> usize {
        self.concurrency * BATCH_PER_SLOT
    }

    fn deliver<'a>(&'a self, batch: &'a [Envelope]) -> BoxFuture<'a, Vec<SinkResult>> {
        super::without_output(self.deliver_with_output(batch))
    }

    fn deliver_with_output<'a>(
        &'a self,
        batch: &'a [Envelope],
    ) -> BoxFuture<'a, Vec<(SinkResult, Option<String>)>> {
        Box::pin(async move {
            if batch.is_empty() {
                return Vec::new();
            }
            let js = match self.context().await {
                Ok(js) => js,
                Err(error) => {
                    tracing::warn!(sink = %self.name, events = batch.len(), error = %error, "nats sink cannot publish");
                    return vec![(SinkResult::Retry { error, after: None }, None); batch.len()];
                }
            };
            // Every message of the batch is in flight at once; the acks are awaited together.
            let publishes = batch.iter().map(|envelope| self.publish(&js, envelope));
            futures_util::future::join_all(publishes).await
        })
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(self.probe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The typed config of `[sinks.bus]` holding `keys`.
    fn load(keys: &str) -> Result<SinkKind, ConfigError> {
        crate::sinks::parse_test_config("bus", "nats", keys)
    }

    fn assert_config_err(keys: &str, key: &str, needle: &str) -> ConfigError {
        let err = load(keys).expect_err(keys);
        assert_eq!(err.key, key, "{err}");
        assert!(err.message.contains(needle), "{err}");
        err
    }

    const GOOD: &str = "url = \"nats://127.0.0.1:4222\"\nsubject = \"bitrix.{portal}.{event}\"\nstream = \"BITRIX\"";

    #[test]
    fn config_reads_every_key_with_defaults() {
        let config = load(GOOD).unwrap();
        let SinkKind::Nats(nats) = &config else {
            panic!("nats sink expected")
        };
        assert_eq!(nats.server, "nats://127.0.0.1:4222");
        assert_eq!(nats.auth, NatsAuth::None);
        assert_eq!(nats.subject, "bitrix.{portal}.{event}");
        assert_eq!(nats.stream, "BITRIX");
        assert!(!nats.create_stream);
        assert_eq!(nats.duplicate_window, DEFAULT_DUPLICATE_WINDOW);

        let config = load(&format!(
            "{}\ncreate_stream = true\nduplicate_window = \"30m\"",
            GOOD.replace("nats://", "nats://app:s3cret@")
        ))
        .unwrap();
        let SinkKind::Nats(nats) = &config else {
            panic!("nats sink expected")
        };
        assert!(nats.create_stream);
        assert_eq!(nats.duplicate_window, Duration::from_secs(1800));
        assert_eq!(
            nats.auth,
            NatsAuth::UserPassword("app".into(), Secret::new("s3cret"))
        );
        assert_eq!(config.type_name(), "nats");
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn config_errors_name_their_key() {
        assert_config_err(
            "subject = \"a.b\"\nstream = \"S\"",
            "sinks.bus.url",
            "missing required key",
        );
        assert_config_err(
            "url = \"nats://h:4222\"\nstream = \"S\"",
            "sinks.bus.subject",
            "missing required key",
        );
        assert_config_err(
            "url = \"nats://h:4222\"\nsubject = \"a\"",
            "sinks.bus.stream",
            "missing required key",
        );
        let err = assert_config_err(
            &GOOD.replace("nats://", "http://u:hunter2@"),
            "sinks.bus.url",
            "unsupported scheme",
        );
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert_config_err(
            &GOOD.replace("bitrix.{portal}.{event}", "bitrix.*"),
            "sinks.bus.subject",
            "wildcards",
        );
        assert_config_err(
            &GOOD.replace("bitrix.{portal}.{event}", "bitrix {event}"),
            "sinks.bus.subject",
            "spaces",
        );
        assert_config_err(
            &GOOD.replace("bitrix.{portal}.{event}", "bitrix.{entity}"),
            "sinks.bus.subject",
            "unknown placeholder",
        );
        assert_config_err(
            &GOOD.replace("BITRIX", "BIT.RIX"),
            "sinks.bus.stream",
            "must not contain",
        );
        assert_config_err(
            &format!("{GOOD}\ncreate_stream = true\nduplicate_window = \"30s\""),
            "sinks.bus.duplicate_window",
            "at least 2m",
        );
        assert_config_err(
            &format!("{GOOD}\nduplicate_window = \"30m\""),
            "sinks.bus.duplicate_window",
            "create_stream = true",
        );
        assert_config_err(
            &format!("{GOOD}\ncreate_stream = \"yes\""),
            "sinks.bus.create_stream",
            "invalid",
        );
        assert_config_err(
            &format!("{GOOD}\nqueue = \"x\""),
            "sinks.bus.queue",
            "not a key of a \"nats\" sink",
        );
        assert_config_err(
            &format!("{GOOD}\npath = \"/tmp/x\""),
            "sinks.bus.path",
            "not a key of a \"nats\" sink",
        );
    }

    #[test]
    fn subjects_render_from_the_template() {
        assert_eq!(
            render_subject("bitrix.{portal}.{event}", "main", "ONCRMDEALADD"),
            "bitrix.main.oncrmdealadd"
        );
        assert_eq!(
            render_subject("b24.{event}", "my.portal", "ONTASKUPDATE"),
            "b24.ontaskupdate"
        );
        assert_eq!(
            render_subject("x.{portal}-in.{event}", "a.b *c>", "E"),
            "x.a_b__c_-in.e"
        );
        assert_eq!(template_filter("bitrix.{portal}.{event}"), "bitrix.*.*");
        assert_eq!(template_filter("bitrix.events"), "bitrix.events");
        assert_eq!(template_filter("x.{portal}-in.y"), "x.*.y");
    }

    #[test]
    fn templates_are_validated() {
        assert!(validate_template("bitrix.{portal}.{event}").is_ok());
        assert!(validate_template("plain").is_ok());
        for bad in [
            "",
            "a b",
            "a.*",
            "a.>",
            ".a",
            "a.",
            "a..b",
            "a.{portl}",
            "a.{event",
        ] {
            assert!(validate_template(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn stream_subjects_cover_filters() {
        assert!(subject_covers("bitrix.>", "bitrix.*.*"));
        assert!(subject_covers("bitrix.*.*", "bitrix.*.*"));
        assert!(subject_covers(">", "a.b"));
        assert!(subject_covers("a.b", "a.b"));
        assert!(!subject_covers("bitrix.*", "bitrix.*.*"));
        assert!(!subject_covers("bitrix.main.*", "bitrix.*.*"));
        assert!(!subject_covers("other.>", "bitrix.*.*"));
        assert!(!subject_covers("a.b.c", "a.b"));
    }

    #[test]
    fn urls_split_into_server_and_credentials() {
        let (server, auth) = split_url("nats://user:p%40ss@127.0.0.1:4222").unwrap();
        assert_eq!(server, "nats://127.0.0.1:4222");
        assert_eq!(
            auth,
            NatsAuth::UserPassword("user".into(), Secret::new("p@ss"))
        );
        let (server, auth) = split_url("tls://s3cr3t@nats.internal:4222").unwrap();
        assert_eq!(server, "tls://nats.internal:4222");
        assert_eq!(auth, NatsAuth::Token(Secret::new("s3cr3t")));
        let (_, auth) = split_url("nats://localhost:4222").unwrap();
        assert_eq!(auth, NatsAuth::None);
        assert!(split_url("http://localhost:4222").is_err());
        assert!(split_url("nats://h:4222/path").is_err());
        assert!(split_url("not a url").is_err());
        assert_eq!(percent_decode("a%2Fb%"), None);
        assert_eq!(percent_decode("a%2Fb").as_deref(), Some("a/b"));
    }

    #[test]
    fn publish_errors_classify() {
        assert_eq!(
            classify_code(Some(jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)),
            Class::Dead
        );
        assert_eq!(
            classify_code(Some(jetstream::ErrorCode::INSUFFICIENT_RESOURCES)),
            Class::Retry
        );
        assert_eq!(
            classify_code(Some(jetstream::ErrorCode::STREAM_NOT_FOUND)),
            Class::NoStream
        );
        assert_eq!(classify_code(None), Class::Retry);
        let e = jetstream::context::PublishError::new(PublishErrorKind::StreamNotFound);
        assert_eq!(classify_publish(&e), Class::NoStream);
        let e = jetstream::context::PublishError::new(PublishErrorKind::TimedOut);
        assert_eq!(classify_publish(&e), Class::Retry);
        let e = jetstream::context::PublishError::new(PublishErrorKind::MaxPayloadExceeded);
        assert_eq!(classify_publish(&e), Class::Dead);
    }
}
