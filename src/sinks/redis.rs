//! The `redis` sink: appends each envelope to a Redis stream with `XADD` (fields `id`, `event`,
//! `portal`, `envelope`), optionally trimmed with `MAXLEN ~ N`.
//!
//! A batch goes out in pipelines of [`PIPELINE_LEN`] commands (one round trip each, up to
//! `concurrency` pipelines in flight) over one `ConnectionManager`, which reconnects by itself
//! after a broken connection. An envelope counts as delivered when its `XADD` answered with an
//! entry id. Connection errors, timeouts and every error reply (OOM, WRONGTYPE, NOPERM, READONLY,
//! LOADING, ...) are retried: none of them depends on the event, all of them on the server or
//! the key, so an operator's fix lets the same events through. Only an envelope too large for
//! any Redis bulk string is dead. Error texts never contain the URL's credentials.

use super::{Health, Sink, SinkResult, name_template, scrub};
use super::{SinkConfig, SinkKind};
use crate::BoxFuture;
use crate::envelope::Envelope;
use crate::options::{ConfigError, SinkOptions, redact_url};
use anyhow::Context;
use futures_util::stream::{self, StreamExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncConnectionConfig, Value};
use serde::Deserialize;
use std::fmt;
use std::time::Duration;
use tokio::sync::OnceCell;

/// The stream when the config names none.
pub(crate) const DEFAULT_STREAM: &str = "b24eventd:events";
/// `XADD` commands per pipeline (one round trip).
const PIPELINE_LEN: usize = 100;
/// Redis's largest bulk string (`proto-max-bulk-len`, 512 MiB): a bigger envelope can never be
/// stored, and sending it would make the server drop the connection for its neighbours too.
const MAX_ENVELOPE_BYTES: usize = 512 * 1024 * 1024;

/// `type = "redis"`: `XADD` every envelope to a stream.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSinkConfig {
    /// `redis://` or `rediss://` (TLS); may carry a password: print it with [`redact_url`].
    pub url: String,
    /// The stream's key; `{portal}` and `{event}` are replaced per envelope.
    pub stream: String,
    /// `XADD ... MAXLEN ~ N`: trim the stream to about this many entries.
    pub maxlen: Option<u64>,
}

impl super::SinkTypeConfig for RedisSinkConfig {
    fn register_credentials(&self) {
        super::register_url_credentials(&self.url);
    }
}

impl fmt::Debug for RedisSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSinkConfig")
            .field("url", &redact_url(&self.url))
            .field("stream", &self.stream)
            .field("maxlen", &self.maxlen)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    url: Option<String>,
    stream: Option<String>,
    maxlen: Option<u64>,
}

/// Reads and checks `[sinks.NAME]` of `type = "redis"`.
pub(crate) fn parse_config(options: &SinkOptions) -> Result<SinkKind, ConfigError> {
    let raw: Raw = options.parse()?;
    let url = check_url(options, raw.url)?;
    let stream = raw.stream.unwrap_or_else(|| DEFAULT_STREAM.to_string());
    name_template::check(&stream).map_err(|message| options.err("stream", message))?;
    if raw.maxlen == Some(0) {
        return Err(options.err(
            "maxlen",
            "must be at least 1; leave it out to keep every entry",
        ));
    }
    Ok(SinkKind::Redis(RedisSinkConfig {
        url,
        stream,
        maxlen: raw.maxlen,
    }))
}

fn check_url(options: &SinkOptions, url: Option<String>) -> Result<String, ConfigError> {
    let example = "write url = \"redis://host:6379/0\" (or rediss:// for TLS)";
    let url = match url {
        None => return Err(options.err("url", format!("missing required key; {example}"))),
        Some(url) if url.trim().is_empty() => {
            return Err(options.err("url", format!("must not be empty; {example}")));
        }
        Some(url) => url,
    };
    let shown = redact_url(&url);
    let parsed = reqwest::Url::parse(&url)
        .map_err(|e| options.err("url", format!("invalid URL {shown:?}: {e}; {example}")))?;
    if !matches!(parsed.scheme(), "redis" | "rediss") {
        return Err(options.err(
            "url",
            format!(
                "unsupported scheme {:?} in {shown:?}; {example}",
                parsed.scheme()
            ),
        ));
    }
    if let Err(e) = redis::Client::open(url.as_str()) {
        let detail = scrub(&e.to_string(), &secrets_of(&parsed));
        return Err(options.err(
            "url",
            format!("invalid redis URL {shown:?}: {detail}; {example}"),
        ));
    }
    Ok(url)
}

/// The userinfo of a URL (as written and decoded), to scrub from any text shown.
fn secrets_of(url: &reqwest::Url) -> Vec<String> {
    let mut secrets = Vec::new();
    if let Some(password) = url.password() {
        secrets.push(password.to_string());
        if let Ok(decoded) = percent_decode(password) {
            secrets.push(decoded);
        }
    }
    secrets.retain(|s| !s.is_empty());
    secrets
}

/// `%XX` decoding of a URL component.
fn percent_decode(text: &str) -> Result<String, ()> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).ok_or(())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

/// Delivers envelopes with `XADD`.
pub(crate) struct RedisSink {
    name: String,
    client: redis::Client,
    /// Made on first use (it spawns a task, so it needs the runtime); reconnects by itself.
    manager: OnceCell<ConnectionManager>,
    /// `url` without userinfo, for logs and error texts.
    shown_url: String,
    /// The URL's password, never to appear in an error text.
    secrets: Vec<String>,
    stream: String,
    maxlen: Option<u64>,
    timeout: Duration,
    concurrency: usize,
}

impl RedisSink {
    /// Checks the URL; connects only on the first delivery, so a server that is down at start
    /// only delays deliveries.
    pub fn new(config: &SinkConfig, redis: &RedisSinkConfig) -> anyhow::Result<RedisSink> {
        let shown_url = redact_url(&redis.url);
        let parsed = reqwest::Url::parse(&redis.url)
            .with_context(|| format!("sink {}: invalid url {shown_url}", config.name))?;
        let secrets = secrets_of(&parsed);
        super::ensure_crypto_provider();
        let client = redis::Client::open(redis.url.as_str()).map_err(|e| {
            anyhow::anyhow!(
                "sink {}: invalid redis url {shown_url}: {}",
                config.name,
                scrub(&e.to_string(), &secrets)
            )
        })?;
        Ok(RedisSink {
            name: config.name.clone(),
            client,
            manager: OnceCell::new(),
            shown_url,
            secrets,
            stream: redis.stream.clone(),
            maxlen: redis.maxlen,
            timeout: config.timeout,
            concurrency: config.concurrency.max(1),
        })
    }

    async fn manager(&self) -> Result<ConnectionManager, String> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        self.manager
            .get_or_try_init(|| async {
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            })
            .await
            .cloned()
            .map_err(|e| self.error_text("cannot set up the connection", &e))
    }

    /// `what (url): error`, without credentials.
    fn error_text(&self, what: &str, e: &redis::RedisError) -> String {
        scrub(&format!("{what} ({}): {e}", self.shown_url), &self.secrets)
    }

    /// The `XADD` for one envelope, or its result when it can never be sent.
    fn xadd(&self, envelope: &Envelope) -> Result<redis::Cmd, SinkResult> {
        let json = serde_json::to_string(envelope).map_err(|e| SinkResult::Dead {
            error: format!("cannot encode the envelope as JSON: {e}"),
        })?;
        if json.len() > MAX_ENVELOPE_BYTES {
            return Err(SinkResult::Dead {
                error: format!(
                    "the envelope is {} bytes, more than redis stores in one value ({MAX_ENVELOPE_BYTES})",
                    json.len()
                ),
            });
        }
        let stream = name_template::render(&self.stream, &envelope.portal, &envelope.event);
        Ok(xadd_command(&stream, self.maxlen, envelope, &json))
    }

    /// One pipeline: a result per envelope of `chunk`, in order.
    async fn send_chunk(&self, chunk: &[Envelope]) -> Vec<SinkResult> {
        let mut results: Vec<Option<SinkResult>> = vec![None; chunk.len()];
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut sent = Vec::with_capacity(chunk.len());
        for (index, envelope) in chunk.iter().enumerate() {
            match self.xadd(envelope) {
                Ok(cmd) => {
                    pipe.add_command(cmd);
                    sent.push(index);
                }
                Err(result) => results[index] = Some(result),
            }
        }
        if !sent.is_empty() {
            let replies = self.query(&pipe, sent.len()).await;
            for (index, result) in sent.into_iter().zip(replies) {
                results[index] = Some(result);
            }
        }
        let results: Vec<SinkResult> = results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| SinkResult::Retry {
                    error: "no reply for this command".to_string(),
                    after: None,
                })
            })
            .collect();
        for (envelope, result) in chunk.iter().zip(&results) {
            if !matches!(result, SinkResult::Delivered) {
                tracing::debug!(sink = %self.name, event_id = %envelope.id, result = ?result, "redis delivery failed");
            }
        }
        results
    }

    /// Sends a pipeline of `count` commands: one result per command.
    async fn query(&self, pipe: &redis::Pipeline, count: usize) -> Vec<SinkResult> {
        let retry_all = |error: String| {
            tracing::warn!(sink = %self.name, events = count, error = %error, "redis pipeline failed");
            vec![SinkResult::Retry { error, after: None }; count]
        };
        let mut conn = match self.manager().await {
            Ok(conn) => conn,
            Err(error) => return retry_all(error),
        };
        let sent = tokio::time::timeout(self.timeout, pipe.query_async::<Vec<Value>>(&mut conn));
        match sent.await {
            Ok(Ok(replies)) if replies.len() == count => {
                replies.into_iter().map(|r| self.classify(r)).collect()
            }
            Ok(Ok(replies)) => retry_all(format!(
                "redis answered {} replies to {count} commands ({})",
                replies.len(),
                self.shown_url
            )),
            Ok(Err(e)) => retry_all(self.error_text("XADD failed", &e)),
            Err(_) => retry_all(format!(
                "XADD timed out after {} ({})",
                humantime::format_duration(self.timeout),
                self.shown_url
            )),
        }
    }

    fn classify(&self, reply: Value) -> SinkResult {
        match classify_reply(reply) {
            SinkResult::Retry { error, after } => SinkResult::Retry {
                error: scrub(&error, &self.secrets),
                after,
            },
            other => other,
        }
    }

    /// The healthcheck: a fresh connection (not the delivering one), `PING`, and the `TYPE` of
    /// the stream's key when the name has no placeholders. Writes nothing.
    async fn probe(&self) -> Health {
        let started = std::time::Instant::now();
        let health = match tokio::time::timeout(self.timeout, self.check()).await {
            Ok(health) => health,
            Err(_) => Health::fail(
                format!(
                    "redis at {} did not answer within {}",
                    self.shown_url,
                    humantime::format_duration(self.timeout)
                ),
                "check the sink's url, that redis is running, and firewalls in between",
            ),
        };
        with_elapsed(health, started.elapsed())
    }

    async fn check(&self) -> Health {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let mut conn = match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(conn) => conn,
            Err(e) => {
                return Health::fail(
                    self.error_text("cannot connect to redis", &e),
                    "check the sink's url (host, port, password, redis:// or rediss://), that \
                     redis is running, and firewalls in between",
                );
            }
        };
        if let Err(e) = redis::cmd("PING").query_async::<String>(&mut conn).await {
            return Health::fail(
                self.error_text("PING failed", &e),
                "check the password or ACL user in the url",
            );
        }
        if name_template::has_placeholders(&self.stream) {
            return Health::ok(format!(
                "redis at {} answered PING; the stream {:?} is named per event, so its keys' types are checked by each XADD",
                self.shown_url, self.stream
            ));
        }
        match redis::cmd("TYPE")
            .arg(&self.stream)
            .query_async::<String>(&mut conn)
            .await
        {
            Ok(kind) => stream_type_health(&self.shown_url, &self.stream, &kind),
            Err(e) => Health::fail(
                self.error_text(&format!("TYPE {} failed", self.stream), &e),
                "give the url's user permission for TYPE and XADD on the stream's key",
            ),
        }
    }
}

/// `health` with how long the check took appended to its detail.
fn with_elapsed(mut health: Health, elapsed: Duration) -> Health {
    health.detail = format!("{} ({} ms)", health.detail, elapsed.as_millis());
    health
}

/// What the `TYPE` of the stream's key says about deliveries.
fn stream_type_health(shown_url: &str, stream: &str, kind: &str) -> Health {
    match kind {
        "stream" => Health::ok(format!(
            "redis at {shown_url} answered PING; {stream:?} is a stream"
        )),
        "none" => Health::ok(format!(
            "redis at {shown_url} answered PING; the stream {stream:?} does not exist yet and is created by the first XADD"
        )),
        other => Health::fail(
            format!(
                "the key {stream:?} at {shown_url} holds a {other}, not a stream: every XADD fails with WRONGTYPE"
            ),
            format!(
                "delete or rename the key {stream:?}, or set the sink's stream to another name"
            ),
        ),
    }
}

/// `XADD stream [MAXLEN ~ N] * id .. event .. portal .. envelope ..`.
fn xadd_command(stream: &str, maxlen: Option<u64>, envelope: &Envelope, json: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream);
    if let Some(maxlen) = maxlen {
        cmd.arg("MAXLEN").arg("~").arg(maxlen);
    }
    cmd.arg("*")
        .arg("id")
        .arg(&envelope.id)
        .arg("event")
        .arg(&envelope.event)
        .arg("portal")
        .arg(&envelope.portal)
        .arg("envelope")
        .arg(json);
    cmd
}

/// One `XADD` reply: an entry id is delivered; an error reply is retried (see the module doc).
fn classify_reply(reply: Value) -> SinkResult {
    match reply {
        Value::BulkString(_) | Value::SimpleString(_) | Value::VerbatimString { .. } => {
            SinkResult::Delivered
        }
        Value::ServerError(e) => {
            let hint = match e.code() {
                "WRONGTYPE" => {
                    "; the stream's key exists and is not a stream: delete or rename it, or configure another stream"
                }
                "OOM" => {
                    "; redis is out of memory (maxmemory): free memory or set the sink's maxlen"
                }
                "NOPERM" | "NOAUTH" | "WRONGPASS" => "; the url's user may not XADD to this key",
                "READONLY" => "; the url points at a replica: point it at the primary",
                "MISCONF" => "; redis cannot persist to disk: check its logs",
                _ => "",
            };
            SinkResult::Retry {
                error: format!("redis refused XADD: {e}{hint}"),
                after: None,
            }
        }
        other => SinkResult::Retry {
            error: format!("unexpected reply to XADD: {other:?}"),
            after: None,
        },
    }
}

/// redis builds its rustls config with the process's default provider; the binary installs
/// ring in `main`, this covers every other way of building a sink (tests, tools).
impl Sink for RedisSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn max_batch(&self) -> usize {
        PIPELINE_LEN * self.concurrency
    }

    fn deliver<'a>(&'a self, batch: &'a [Envelope]) -> BoxFuture<'a, Vec<SinkResult>> {
        Box::pin(async move {
            let pipelines: Vec<_> = batch
                .chunks(PIPELINE_LEN)
                .map(|chunk| self.send_chunk(chunk))
                .collect();
            stream::iter(pipelines)
                .buffered(self.concurrency)
                .flat_map(stream::iter)
                .collect()
                .await
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

    fn load(sink_keys: &str) -> Result<SinkKind, ConfigError> {
        crate::sinks::parse_test_config("stream", "redis", sink_keys)
    }

    fn redis_config(sink_keys: &str) -> RedisSinkConfig {
        let config = load(sink_keys).unwrap_or_else(|e| panic!("{e}"));
        match &config {
            SinkKind::Redis(redis) => redis.clone(),
            other => panic!("redis sink expected, got {other:?}"),
        }
    }

    #[track_caller]
    fn assert_err(sink_keys: &str, key: &str, needle: &str) -> ConfigError {
        crate::sinks::assert_config_err("stream", "redis", sink_keys, key, needle)
    }

    #[test]
    fn config_defaults_and_keys() {
        let redis = redis_config("url = \"redis://127.0.0.1:6379/0\"");
        assert_eq!(
            redis,
            RedisSinkConfig {
                url: "redis://127.0.0.1:6379/0".into(),
                stream: DEFAULT_STREAM.into(),
                maxlen: None
            }
        );
        let redis = redis_config(
            "url = \"rediss://:pw@cache.internal:6380\"\nstream = \"bitrix:{portal}:{event}\"\nmaxlen = 100000",
        );
        assert_eq!(redis.stream, "bitrix:{portal}:{event}");
        assert_eq!(redis.maxlen, Some(100000));
    }

    #[test]
    fn config_errors_name_their_key() {
        assert_err("", "sinks.stream.url", "missing required key");
        assert_err("url = \"\"", "sinks.stream.url", "must not be empty");
        assert_err("url = \"not a url\"", "sinks.stream.url", "invalid URL");
        assert_err(
            "url = \"http://127.0.0.1:6379\"",
            "sinks.stream.url",
            "unsupported scheme \"http\"",
        );
        assert_err(
            "url = \"redis://h\"\nstream = \"\"",
            "sinks.stream.stream",
            "must not be empty",
        );
        assert_err(
            "url = \"redis://h\"\nstream = \"s:{entity}\"",
            "sinks.stream.stream",
            "unknown placeholder {entity}",
        );
        assert_err(
            "url = \"redis://h\"\nmaxlen = 0",
            "sinks.stream.maxlen",
            "at least 1",
        );
        assert_err(
            "url = \"redis://h\"\nmaxlen = -5",
            "sinks.stream.maxlen",
            "invalid value",
        );
        assert_err(
            "url = \"redis://h\"\nmaxlen = \"lots\"",
            "sinks.stream.maxlen",
            "invalid type: found a string, expected u64",
        );
        assert_err(
            "url = \"redis://h\"\nsubject = \"x\"",
            "sinks.stream.subject",
            "not a key of a \"redis\" sink",
        );
        assert_err(
            "url = \"redis://h\"\npath = \"/tmp/x\"",
            "sinks.stream.path",
            "not a key of a \"redis\" sink",
        );
    }

    #[test]
    fn passwords_stay_out_of_errors_and_debug() {
        let err = assert_err(
            "url = \"http://user:hunter2@h:6379\"",
            "sinks.stream.url",
            "unsupported scheme",
        );
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let redis = redis_config("url = \"redis://user:hunter2@h:6379\"");
        assert!(!format!("{redis:?}").contains("hunter2"));
        let config = load("url = \"redis://user:hunter2@h:6379\"").unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(
            scrub("auth hunter2 and hunter%32", &["hunter2"]),
            "auth [redacted] and hunter%32"
        );
        let url = reqwest::Url::parse("redis://:p%40ss@h").unwrap();
        assert_eq!(
            secrets_of(&url),
            vec!["p%40ss".to_string(), "p@ss".to_string()]
        );
    }

    #[test]
    fn replies_map_to_results() {
        let parse = |bytes: &[u8]| redis::parse_redis_value(bytes).unwrap();
        assert_eq!(
            classify_reply(parse(b"$15\r\n1700000000000-0\r\n")),
            SinkResult::Delivered
        );
        let wrongtype = classify_reply(parse(
            b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        ));
        match wrongtype {
            SinkResult::Retry { error, after: None } => {
                assert!(error.contains("WRONGTYPE"), "{error}");
                assert!(error.contains("not a stream"), "{error}");
            }
            other => panic!("WRONGTYPE is retried: {other:?}"),
        }
        let oom = classify_reply(parse(
            b"-OOM command not allowed when used memory > 'maxmemory'.\r\n",
        ));
        assert!(
            matches!(oom, SinkResult::Retry { ref error, .. } if error.contains("OOM")),
            "{oom:?}"
        );
        assert!(matches!(
            classify_reply(Value::Nil),
            SinkResult::Retry { .. }
        ));
    }

    #[test]
    fn xadd_carries_the_fields_and_maxlen() {
        let envelope = Envelope::sample(7);
        let json = envelope.to_json_line();
        let packed = |maxlen| {
            String::from_utf8(xadd_command("s:main", maxlen, &envelope, &json).get_packed_command())
                .unwrap()
        };
        let plain = packed(None);
        assert!(
            plain.contains(
                "XADD\r\n$6\r\ns:main\r\n$1\r\n*\r\n$2\r\nid\r\n$17\r\nmain:7:1795330800\r\n"
            ),
            "{plain}"
        );
        assert!(plain.contains(
            "event\r\n$15\r\nONCRMDEALUPDATE\r\n$6\r\nportal\r\n$4\r\nmain\r\n$8\r\nenvelope\r\n"
        ));
        assert!(plain.ends_with(&format!("{json}\r\n")));
        let trimmed = packed(Some(1000));
        assert!(
            trimmed.contains("s:main\r\n$6\r\nMAXLEN\r\n$1\r\n~\r\n$4\r\n1000\r\n$1\r\n*\r\n"),
            "{trimmed}"
        );
    }

    fn sink(url: &str, timeout: Duration) -> RedisSink {
        let redis = RedisSinkConfig {
            url: url.into(),
            stream: "b24eventd-unit:{portal}".into(),
            maxlen: None,
        };
        let config = SinkConfig {
            name: "stream".into(),
            route: Default::default(),
            timeout,
            concurrency: 2,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(5),
            },
            kind: SinkKind::Redis(redis.clone()),
        };
        RedisSink::new(&config, &redis).unwrap()
    }

    #[tokio::test]
    async fn a_closed_port_retries_every_envelope_without_the_password() {
        // Port 1 on loopback: nothing listens there.
        let sink = sink("redis://user:hunter2@127.0.0.1:1/0", Duration::from_secs(2));
        assert_eq!(sink.max_batch(), 200);
        let batch: Vec<Envelope> = (1..=150).map(Envelope::sample).collect();
        let results = sink.deliver(&batch).await;
        assert_eq!(results.len(), 150);
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
        assert!(health.detail.contains("cannot connect"), "{health:?}");
        assert!(!format!("{health:?}").contains("hunter2"));
        assert_eq!(sink.health().await.level, crate::sinks::HealthLevel::Fail);
    }

    #[test]
    fn stream_types_decide_health() {
        use crate::sinks::HealthLevel;
        assert_eq!(
            stream_type_health("redis://h/", "s", "stream").level,
            HealthLevel::Ok
        );
        let none = stream_type_health("redis://h/", "s", "none");
        assert_eq!(none.level, HealthLevel::Ok);
        assert!(none.detail.contains("created by the first XADD"));
        let hash = stream_type_health("redis://h/", "s", "hash");
        assert_eq!(hash.level, HealthLevel::Fail);
        assert!(hash.detail.contains("holds a hash"), "{hash:?}");
    }
}
