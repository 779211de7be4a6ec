//! Sinks: where delivered events go. A trait, one file per sink type, one registry line per type
//! (`sink_types!`), and the routing (`events` globs, `portals`) that decides which sinks an event
//! goes to.
//!
//! Retry is decided outside the sink (pipeline/retry.rs): a sink only says, per envelope, whether
//! it was delivered, failed in a way worth retrying, or failed for good.

pub mod amqp;
pub mod bitrix_form;
pub mod exec;
pub mod file;
pub mod http;
pub mod mqtt;
pub(crate) mod name_template;
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

/// The results of a [`Sink::deliver_with_output`] without the output: [`Sink::deliver`] of a
/// sink whose delivery keeps output.
pub(crate) fn without_output<'a>(
    delivery: BoxFuture<'a, Vec<(SinkResult, Option<String>)>>,
) -> BoxFuture<'a, Vec<SinkResult>> {
    Box::pin(async move {
        delivery
            .await
            .into_iter()
            .map(|(result, _)| result)
            .collect()
    })
}

/// Reads a sink type's typed config from the type-specific keys of a `[sinks.NAME]`.
pub(crate) type ConfigParser = fn(&SinkOptions) -> Result<SinkKind, ConfigError>;

/// What every sink type's typed config provides besides its keys.
pub(crate) trait SinkTypeConfig {
    /// Registers the credentials the config holds (a URL's userinfo, a credential header) with
    /// [`crate::redact`] when the config is loaded; most hold none, or hold them as `Secret`s.
    fn register_credentials(&self) {}
}

/// The userinfo of `url` with [`crate::redact`]: as written and decoded.
pub(crate) fn register_url_credentials(url: &str) {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return;
    };
    // Userinfo is percent-encoded; a `+` in it is a plus, not a space.
    let decode = |text: &str| crate::bitrix::form::percent_decode(&text.replace('+', "%2B"));
    let user = parsed.username();
    if let Some(password) = parsed.password() {
        crate::redact::register(password);
        crate::redact::register_credentials(&decode(user), &decode(password));
    } else if !user.is_empty() {
        crate::redact::register(user);
        crate::redact::register_credentials(&decode(user), "");
    }
}

/// The password of a `postgres://` URL with [`crate::redact`], as written and decoded, and the
/// `user:password` credentials made of it. The user alone is a role name, not a secret (and
/// `postgres`, the usual one, would blank out every mention of PostgreSQL's URLs).
pub(crate) fn register_url_password(url: &str) {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return;
    };
    let decode = |text: &str| crate::bitrix::form::percent_decode(&text.replace('+', "%2B"));
    if let Some(password) = parsed.password() {
        crate::redact::register(password);
        crate::redact::register(&decode(password));
        crate::redact::register_credentials(&decode(parsed.username()), &decode(password));
    }
}

/// The registry of sink types, one line each: `Variant(module::Config) = "type" =>
/// module::Sink, module::parse_config;`. It makes [`SinkKind`] (a variant per type),
/// [`SinkKind::type_name`], [`SINK_TYPES`] (each type's config parser) and [`build`]. Adding a
/// sink type is one module (its typed config, its parser, its `Sink`) and one line here.
macro_rules! sink_types {
    ($($variant:ident($config:ty) = $name:literal => $sink:ty, $parse:path;)*) => {
        /// The type-specific part of a sink: one variant per registered type.
        #[derive(Debug, Clone, PartialEq)]
        pub enum SinkKind {
            $($variant($config),)*
        }

        impl SinkKind {
            /// The `type` as written in the config.
            pub fn type_name(&self) -> &'static str {
                match self {
                    $(SinkKind::$variant(_) => $name,)*
                }
            }

            /// Registers the credentials this sink's config holds with [`crate::redact`].
            pub(crate) fn register_credentials(&self) {
                match self {
                    $(SinkKind::$variant(config) => SinkTypeConfig::register_credentials(config),)*
                }
            }
        }

        /// Every sink `type`, in registry order, with the parser of its keys.
        pub(crate) const SINK_TYPES: &[(&str, ConfigParser)] = &[$(($name, $parse),)*];

        /// Builds the sink a `[sinks.NAME]` describes. Fails when the sink cannot work at all (a
        /// file sink's directory is missing, an http client cannot be built, an exec sink's
        /// program is not on `PATH`).
        pub fn build(config: &SinkConfig) -> anyhow::Result<Arc<dyn Sink>> {
            Ok(match &config.kind {
                $(SinkKind::$variant(kind) => Arc::new(<$sink>::new(config, kind)?),)*
            })
        }
    };
}

sink_types! {
    File(file::FileSinkConfig) = "file" => file::FileSink, file::parse_config;
    Http(http::HttpSinkConfig) = "http" => http::HttpSink, http::parse_config;
    Exec(exec::ExecSinkConfig) = "exec" => exec::ExecSink, exec::parse_config;
    Redis(redis::RedisSinkConfig) = "redis" => redis::RedisSink, redis::parse_config;
    Nats(nats::NatsSinkConfig) = "nats" => nats::NatsSink, nats::parse_config;
    Amqp(amqp::AmqpSinkConfig) = "amqp" => amqp::AmqpSink, amqp::parse_config;
    Postgres(postgres::PostgresSinkConfig) = "postgres" => postgres::PostgresSink, postgres::parse_config;
    Mqtt(mqtt::MqttSinkConfig) = "mqtt" => mqtt::MqttSink, mqtt::parse_config;
}

/// The entry of [`SINK_TYPES`] for `kind`.
pub(crate) fn sink_type(kind: &str) -> Option<(&'static str, ConfigParser)> {
    SINK_TYPES.iter().copied().find(|(name, _)| *name == kind)
}

/// The typed config of a `[sinks.NAME]` of type `kind` holding the TOML `keys`, as the type's
/// own parser reads it when `config` hands the keys over (from the file `c.toml`, with one
/// portal `main` at `https://main.bitrix24.com/rest/`).
#[cfg(test)]
pub(crate) fn parse_test_config(
    name: &str,
    kind: &str,
    keys: &str,
) -> Result<SinkKind, ConfigError> {
    parse_test_config_routed(name, kind, keys, &["main"], &[])
}

/// Asserts that the TOML `keys` of `[sinks.NAME]` of type `kind` are refused with an error about
/// `key` (in full, `sinks.NAME.…`) whose message contains `needle`; returns the error.
#[cfg(test)]
#[track_caller]
pub(crate) fn assert_config_err(
    name: &str,
    kind: &str,
    keys: &str,
    key: &str,
    needle: &str,
) -> ConfigError {
    let err = parse_test_config(name, kind, keys).expect_err("keys should be rejected");
    assert_eq!(err.key, key, "wrong key in {err}");
    assert!(
        err.message.contains(needle),
        "message {:?} should contain {needle:?}",
        err.message
    );
    err
}

/// [`parse_test_config`] with the portals `portals` configured (portal `P` at
/// `https://P.bitrix24.com/rest/`) and `routed` named by the sink's `portals` key.
#[cfg(test)]
pub(crate) fn parse_test_config_routed(
    name: &str,
    kind: &str,
    keys: &str,
    portals: &[&str],
    routed: &[&str],
) -> Result<SinkKind, ConfigError> {
    use figment::Provider;
    use figment::providers::Format;
    let data = figment::providers::Toml::string(keys)
        .data()
        .expect("valid TOML");
    let values = data.into_values().next().unwrap_or_default();
    let (kind, parse) = sink_type(kind).expect("a registered sink type");
    let portals = portals
        .iter()
        .map(|p| crate::options::PortalRef {
            name: p.to_string(),
            client_endpoint: format!("https://{p}.bitrix24.com/rest/"),
            oauth_token_url: "https://oauth.bitrix.info/oauth/token/".to_string(),
        })
        .collect();
    let routed = routed.iter().map(|p| p.to_string()).collect();
    parse(&SinkOptions::new("c.toml", name, kind, values).with_portals(portals, routed))
}
