//! Sinks: where delivered events go. A trait, one file per sink type, one `match` as the registry,
//! and the routing (`events` globs, `portals`) that decides which sinks an event goes to.
//!
//! Retry is decided outside the sink (pipeline/retry.rs): a sink only says, per envelope, whether
//! it was delivered, failed in a way worth retrying, or failed for good.

pub mod amqp;
pub mod bitrix_form;
pub mod exec;
pub mod file;
pub mod http;
pub mod mqtt;
pub mod name_template;
pub mod nats;
pub mod postgres;
pub mod redis;
pub mod route;
pub mod standard_webhooks;

use crate::BoxFuture;
use crate::envelope::Envelope;
use crate::options::{ConfigError, SinkOptions};
use std::sync::Arc;
use std::time::Duration;

pub use route::Route;

/// `[sinks.NAME]`: one destination and the events routed to it.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    pub name: String,
    pub route: Route,
    /// Bound on one delivery attempt.
    pub timeout: Duration,
    /// Deliveries in flight at once.
    pub concurrency: usize,
    pub retry: RetryPolicy,
    pub kind: SinkKind,
}

/// `[sinks.NAME.retry]`: exponential backoff between attempts, then dead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, the first one included; after the last failure the event is dead.
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

/// The type-specific part of a sink.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkKind {
    File(file::FileSinkConfig),
    Http(http::HttpSinkConfig),
    Exec(exec::ExecSinkConfig),
    Amqp(amqp::AmqpSinkConfig),
    Redis(redis::RedisSinkConfig),
    Mqtt(mqtt::MqttSinkConfig),
    Nats(nats::NatsSinkConfig),
    Postgres(postgres::PostgresSinkConfig),
}

impl SinkKind {
    /// The `type` as written in the config.
    pub fn type_name(&self) -> &'static str {
        match self {
            SinkKind::File(_) => "file",
            SinkKind::Http(_) => "http",
            SinkKind::Exec(_) => "exec",
            SinkKind::Amqp(_) => "amqp",
            SinkKind::Redis(_) => "redis",
            SinkKind::Mqtt(_) => "mqtt",
            SinkKind::Nats(_) => "nats",
            SinkKind::Postgres(_) => "postgres",
        }
    }
}

/// What one delivery attempt of one envelope came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkResult {
    /// Durably accepted by the sink (written and synced, 2xx, ...).
    Delivered,
    /// Failed, worth another attempt (timeout, reset, 5xx, 408, 429). `after` is a hint from the
    /// sink (e.g. `Retry-After`) that the retry schedule may honour.
    Retry {
        error: String,
        after: Option<Duration>,
    },
    /// Failed for good (e.g. 422): the event becomes dead for this sink at once.
    Dead { error: String },
}

/// How a sink's health check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthLevel {
    /// A delivery would succeed now.
    Ok,
    /// A delivery would be retried (e.g. the endpoint answers 5xx): it may heal by itself.
    Warn,
    /// A delivery cannot succeed until someone fixes something.
    Fail,
}

/// The verdict of [`Sink::health`]: a level, what was found, and for warn/fail how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub level: HealthLevel,
    pub detail: String,
    /// What to do about a warning or a failure; `None` when the detail says it already.
    pub fix: Option<String>,
}

impl Health {
    pub fn ok(detail: impl Into<String>) -> Health {
        Health {
            level: HealthLevel::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn warn(detail: impl Into<String>, fix: impl Into<String>) -> Health {
        Health {
            level: HealthLevel::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn fail(detail: impl Into<String>, fix: impl Into<String>) -> Health {
        Health {
            level: HealthLevel::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// A configured destination. Implementations hold their typed config and clients.
pub trait Sink: Send + Sync {
    /// The `[sinks.NAME]` this sink was built from.
    fn name(&self) -> &str;

    /// The most envelopes one `deliver` call should receive (the dispatcher batches up to this).
    fn max_batch(&self) -> usize;

    /// Delivers a batch; returns exactly one result per envelope, in order. Must never panic on
    /// odd payloads, and must bound its own time by the sink's `timeout`.
    fn deliver<'a>(&'a self, batch: &'a [Envelope]) -> BoxFuture<'a, Vec<SinkResult>>;

    /// Like [`Sink::deliver`], with what the sink printed or answered per envelope (an exec
    /// sink's stdout/stderr), kept in the journal's attempt record. The default has none.
    fn deliver_with_output<'a>(
        &'a self,
        batch: &'a [Envelope],
    ) -> BoxFuture<'a, Vec<(SinkResult, Option<String>)>> {
        Box::pin(async move {
            self.deliver(batch)
                .await
                .into_iter()
                .map(|r| (r, None))
                .collect()
        })
    }

    /// Checks, without delivering an event or writing anything, that a delivery could succeed
    /// now (`doctor`, `validate --online`): ok, warn or fail, with how to fix it.
    fn health(&self) -> BoxFuture<'_, Health>;
}

/// Installs rustls's ring provider unless one is installed (the binary installs it in `main`;
/// tests and library users may not have). Sinks call it before building a TLS client.
pub(crate) fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// `text` with every non-empty secret replaced by `[redacted]` (error texts of clients that may
/// quote a URL or a password).
pub(crate) fn scrub<S: AsRef<str>>(text: &str, secrets: &[S]) -> String {
    secrets
        .iter()
        .map(AsRef::as_ref)
        .filter(|s| !s.is_empty())
        .fold(text.to_string(), |t, s| t.replace(s, "[redacted]"))
}

/// Reads the typed config of a sink type that defines its own keys from `[sinks.NAME]`.
pub type OptionParser = fn(&SinkOptions) -> Result<SinkKind, ConfigError>;

/// The sink types whose keys their own module defines (everything but `file`, `http` and
/// `exec`, whose keys `config::RawSink` names): the `type` and its config parser.
pub const OPTION_TYPES: &[(&str, OptionParser)] = &[
    ("redis", redis::parse_config),
    ("nats", nats::parse_config),
    ("amqp", amqp::parse_config),
    ("postgres", postgres::parse_config),
    ("mqtt", mqtt::parse_config),
];

/// The entry of [`OPTION_TYPES`] for `kind`.
pub fn option_type(kind: &str) -> Option<(&'static str, OptionParser)> {
    OPTION_TYPES.iter().copied().find(|(name, _)| *name == kind)
}

/// The typed config of a `[sinks.NAME]` of type `kind` holding the TOML `keys`, as the type's
/// own parser reads it when `config` hands the keys over (from the file `c.toml`).
#[cfg(test)]
pub(crate) fn parse_test_config(
    name: &str,
    kind: &str,
    keys: &str,
) -> Result<SinkKind, ConfigError> {
    use figment::Provider;
    use figment::providers::Format;
    let data = figment::providers::Toml::string(keys)
        .data()
        .expect("valid TOML");
    let values = data.into_values().next().unwrap_or_default();
    let (kind, parse) = option_type(kind).expect("a sink type with its own keys");
    parse(&SinkOptions::new("c.toml", name, kind, values))
}

/// Builds the sink a `[sinks.NAME]` describes: the registry of sink types. Fails when the sink
/// cannot work at all (a file sink's directory is missing, an http client cannot be built, an
/// exec sink's program is not on `PATH`).
pub fn build(config: &SinkConfig) -> anyhow::Result<Arc<dyn Sink>> {
    Ok(match &config.kind {
        SinkKind::File(file) => Arc::new(file::FileSink::new(config, file)?),
        SinkKind::Http(http) => Arc::new(http::HttpSink::new(config, http)?),
        SinkKind::Exec(exec) => Arc::new(exec::ExecSink::new(config, exec)?),
        SinkKind::Amqp(amqp) => Arc::new(amqp::AmqpSink::new(config, amqp)?),
        SinkKind::Redis(redis) => Arc::new(redis::RedisSink::new(config, redis)?),
        SinkKind::Mqtt(mqtt) => Arc::new(mqtt::MqttSink::new(config, mqtt)?),
        SinkKind::Nats(nats) => Arc::new(nats::NatsSink::new(config, nats)?),
        SinkKind::Postgres(pg) => Arc::new(postgres::PostgresSink::new(config, pg)?),
    })
}
