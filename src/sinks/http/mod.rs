//! The `http` sink: POSTs each envelope, up to `concurrency` requests at once, as a JSON object
//! (`format = "json"`) or as the form a Bitrix24 outbound webhook would have posted
//! (`format = "bitrix-form"`, see `bitrix_form.rs`), signed with Standard Webhooks headers when
//! `signing_secret` is set (see `standard_webhooks.rs`).
//!
//! 2xx is delivered; 408, 429, 5xx, timeouts and connection errors are retried (honouring
//! `Retry-After`); any other status (3xx, 4xx) is dead; `retry_on` / `dead_on` override the
//! class of single statuses. Redirects are not followed. Every request carries
//! `Idempotency-Key: <envelope id>`. Error texts never contain the URL's credentials, the
//! configured header values or the application token.

use super::SinkConfig;
use super::standard_webhooks::{self, HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP, SigningKey};
use super::{Health, Sink, SinkResult, bitrix_form};
use crate::BoxFuture;
use crate::envelope::Envelope;
use crate::options::{
    ConfigError, Secret, SecretKeys, credentials_directory, read_secret, redact_url,
};
use anyhow::Context;
use futures_util::stream::{self, StreamExt};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use std::path::Path;
use std::time::Duration;

mod config;

pub(crate) use config::parse_config;
pub use config::{HttpFormat, HttpSinkConfig, StatusOverrides};

/// The secrets an http sink needs, read and checked.
#[derive(Debug, Clone, Default)]
pub(crate) struct HttpSecrets {
    /// The Standard Webhooks key, when `signing_secret`/`signing_secret_file` is set.
    pub signing_key: Option<standard_webhooks::SigningKey>,
    /// The `auth[application_token]` of a bitrix-form sink.
    pub application_token: Option<Secret>,
}

/// Reads an http sink's secrets (signing secret, application token) from where the config says
/// they are, with `$CREDENTIALS_DIRECTORY` from the process environment.
pub(crate) fn resolve_http_secrets(
    sink: &str,
    http: &HttpSinkConfig,
) -> Result<HttpSecrets, ConfigError> {
    resolve_http_secrets_in(sink, http, credentials_directory().as_deref())
}

/// [`resolve_http_secrets`] with an explicit credentials directory.
pub(crate) fn resolve_http_secrets_in(
    sink: &str,
    http: &HttpSinkConfig,
    credentials_dir: Option<&Path>,
) -> Result<HttpSecrets, ConfigError> {
    let signing_key = match &http.signing_secret {
        None => None,
        Some(source) => {
            let keys = SecretKeys {
                what: "signing secret",
                table: ["sinks", sink],
                inline: "signing_secret",
                file: "signing_secret_file",
            };
            let secret = read_secret(source, &keys, credentials_dir)?;
            let key = standard_webhooks::parse_secret(secret.expose())
                .map_err(|problem| keys.error(source, problem))?;
            Some(key)
        }
    };
    let application_token = match &http.format {
        HttpFormat::Json => None,
        HttpFormat::BitrixForm(form) => {
            let keys = SecretKeys {
                what: "application token",
                table: ["sinks", sink],
                inline: "application_token",
                file: "application_token_file",
            };
            Some(read_secret(
                &form.application_token,
                &keys,
                credentials_dir,
            )?)
        }
    };
    Ok(HttpSecrets {
        signing_key,
        application_token,
    })
}

/// `max_batch` is this many times `concurrency`: enough to keep every slot busy.
const BATCH_PER_SLOT: usize = 4;
/// How much of an error response's body goes into the error text.
const BODY_EXCERPT_CHARS: usize = 200;
/// The most body bytes read from a response (to reuse the connection, or for the excerpt).
const BODY_READ_LIMIT: usize = 64 * 1024;

/// Delivers envelopes by HTTP POST.
pub(crate) struct HttpSink {
    name: String,
    client: reqwest::Client,
    url: reqwest::Url,
    /// `url` without userinfo, for logs and error texts.
    shown_url: String,
    format: HttpFormat,
    /// The Standard Webhooks key when requests are signed.
    signing_key: Option<SigningKey>,
    /// `auth[application_token]` of a bitrix-form body.
    application_token: Option<Secret>,
    statuses: StatusOverrides,
    timeout: Duration,
    concurrency: usize,
}

/// What a response status means for the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusClass {
    Delivered,
    Retry,
    Dead,
}

impl HttpSink {
    pub fn new(config: &SinkConfig, http: &HttpSinkConfig) -> anyhow::Result<HttpSink> {
        let shown_url = redact_url(&http.url);
        let url = reqwest::Url::parse(&http.url)
            .with_context(|| format!("sink {}: invalid url {shown_url}", config.name))?;
        let secrets = resolve_http_secrets(&config.name, http)?;

        let mut headers = HeaderMap::new();
        for (name, value) in &http.headers {
            let header = HeaderName::from_bytes(name.as_bytes())
                .with_context(|| format!("sink {}: invalid header name {name:?}", config.name))?;
            let mut value = HeaderValue::from_str(value).with_context(|| {
                format!("sink {}: invalid value for header {name:?}", config.name)
            })?;
            // Configured headers often carry credentials: keep them out of debug output.
            value.set_sensitive(true);
            headers.insert(header, value);
        }

        super::ensure_crypto_provider();
        let client = reqwest::Client::builder()
            .user_agent(concat!("b24eventd/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.timeout)
            .pool_max_idle_per_host(config.concurrency)
            .build()
            .with_context(|| format!("sink {}: cannot build the http client", config.name))?;

        Ok(HttpSink {
            name: config.name.clone(),
            client,
            url,
            shown_url,
            format: http.format.clone(),
            signing_key: secrets.signing_key,
            application_token: secrets.application_token,
            statuses: http.statuses.clone(),
            timeout: config.timeout,
            concurrency: config.concurrency.max(1),
        })
    }

    /// The request body and its content type.
    fn body(&self, envelope: &Envelope) -> Result<(&'static str, Vec<u8>), String> {
        match &self.format {
            HttpFormat::Json => serde_json::to_vec(envelope)
                .map(|body| ("application/json", body))
                .map_err(|e| format!("cannot encode the envelope as JSON: {e}")),
            HttpFormat::BitrixForm(form) => {
                let token = self.application_token.as_ref().map_or("", Secret::expose);
                let body = bitrix_form::body(envelope, form, token, unix_now());
                Ok(("application/x-www-form-urlencoded", body.into_bytes()))
            }
        }
    }

    async fn post(&self, envelope: &Envelope) -> SinkResult {
        let (content_type, body) = match self.body(envelope) {
            Ok(encoded) => encoded,
            Err(error) => return SinkResult::Dead { error },
        };
        let mut request = self
            .client
            .post(self.url.clone())
            .timeout(self.timeout)
            .header(CONTENT_TYPE, content_type)
            .header("Idempotency-Key", envelope.id.as_str());
        if let Some(key) = &self.signing_key {
            // Signed at send time: every attempt carries its own timestamp.
            let signed = standard_webhooks::sign(key, &envelope.id, unix_now(), &body);
            request = request
                .header(HEADER_ID, signed.id)
                .header(HEADER_TIMESTAMP, signed.timestamp)
                .header(HEADER_SIGNATURE, signed.signature);
        }
        let request = request.body(body);

        let result = match request.send().await {
            Ok(response) => self.classify(response).await,
            Err(e) => SinkResult::Retry {
                error: self.transport_error(e),
                after: None,
            },
        };
        if !matches!(result, SinkResult::Delivered) {
            tracing::debug!(portal = %envelope.portal, event_id = %envelope.id, sink = %self.name, url = %self.shown_url, result = ?result, "http delivery failed");
        }
        result
    }

    async fn classify(&self, mut response: reqwest::Response) -> SinkResult {
        let status = response.status();
        let after = retry_after(response.headers());
        let class = classify_status(status, &self.statuses);
        // Read a small body: the connection can be reused, and failures quote it.
        let body = read_body(&mut response).await;
        if class == StatusClass::Delivered {
            return SinkResult::Delivered;
        }
        // Redacted before it is cut to an excerpt, so no part of the token survives; an endpoint
        // echoing the request would echo its credentials (the URL's as Basic) too.
        let body = crate::redact::scrub(&self.redact(body)).into_owned();
        let error = status_error(status, self.override_list(status), &body);
        match class {
            StatusClass::Retry => SinkResult::Retry { error, after },
            StatusClass::Dead | StatusClass::Delivered => SinkResult::Dead { error },
        }
    }

    /// `retry_on` or `dead_on` when that list decided `status`.
    fn override_list(&self, status: StatusCode) -> Option<&'static str> {
        let code = status.as_u16();
        if self.statuses.dead_on.contains(&code) {
            Some("dead_on")
        } else if self.statuses.retry_on.contains(&code) {
            Some("retry_on")
        } else {
            None
        }
    }

    /// `text` without the application token (an endpoint may echo the body it was sent).
    fn redact(&self, text: String) -> String {
        match &self.application_token {
            Some(token) => redact_secret(text, token.expose()),
            None => text,
        }
    }

    /// How requests are made, for the healthcheck's detail.
    fn describe(&self) -> String {
        let signing = if self.signing_key.is_some() {
            "signed with Standard Webhooks"
        } else {
            "unsigned"
        };
        format!("format {}, {signing}", self.format.as_str())
    }

    fn transport_error(&self, e: reqwest::Error) -> String {
        let what = if e.is_timeout() {
            format!(
                "timed out after {}",
                humantime::format_duration(self.timeout)
            )
        } else if e.is_connect() {
            "cannot connect".to_string()
        } else {
            "request failed".to_string()
        };
        let e = e.without_url();
        let mut causes = Vec::new();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            causes.push(cause.to_string());
            source = cause.source();
        }
        let detail = if causes.is_empty() {
            e.to_string()
        } else {
            causes.join(": ")
        };
        format!("{what} ({}): {detail}", self.shown_url)
    }
}

/// reqwest is built without a default rustls provider; the binary installs ring in `main`, this
/// covers every other way of building a sink (tests, tools).
fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// The class of a status: `dead_on`, then `retry_on`, then the default (2xx delivered; 408,
/// 429, 5xx retried; everything else dead).
fn classify_status(status: StatusCode, overrides: &StatusOverrides) -> StatusClass {
    let code = status.as_u16();
    if overrides.dead_on.contains(&code) {
        StatusClass::Dead
    } else if overrides.retry_on.contains(&code) {
        StatusClass::Retry
    } else if status.is_success() {
        StatusClass::Delivered
    } else if is_retryable(status) {
        StatusClass::Retry
    } else {
        StatusClass::Dead
    }
}

/// `http 422: <first 200 characters of the body>`, or `http 409 (in retry_on): ...` when an
/// override list decided.
fn status_error(status: StatusCode, list: Option<&str>, body: &str) -> String {
    let excerpt: String = body.trim().chars().take(BODY_EXCERPT_CHARS).collect();
    let mut error = format!("http {}", status.as_u16());
    if let Some(list) = list {
        error.push_str(&format!(" (in {list})"));
    }
    if !excerpt.is_empty() {
        error.push_str(": ");
        error.push_str(&excerpt);
    }
    error
}

/// `text` with `secret` (as sent, and form-encoded) replaced by `[redacted]`.
fn redact_secret(text: String, secret: &str) -> String {
    if secret.is_empty() {
        return text;
    }
    let encoded = bitrix_form::php_urlencode(secret);
    text.replace(secret, "[redacted]")
        .replace(&encoded, "[redacted]")
}

/// Reads at most [`BODY_READ_LIMIT`] bytes of the body, lossily as text.
async fn read_body(response: &mut reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < BODY_READ_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `Retry-After` as seconds or as an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let wait = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(wait.to_std().unwrap_or(Duration::ZERO))
}

impl HttpSink {
    /// The healthcheck: an `OPTIONS` request to the sink's URL through the same client a
    /// delivery uses (DNS, proxy, TLS, the configured headers, the sink's timeout).
    ///
    /// Why `OPTIONS`: it is a safe method (RFC 9110 §9.3.7), so no receiver can take it for an
    /// event, and unlike `HEAD` it is not routed to a `GET` handler that might do work. What
    /// it proves is that a delivery would reach the endpoint: a failure to resolve, connect,
    /// complete TLS or get an answer within the timeout fails (every delivery would fail the
    /// same way); a 5xx warns (deliveries are retried while the service is unwell); any other
    /// answer, including 404 or 405 from an endpoint that only routes `POST`, is ok, since the
    /// status of a request that is not a delivery says nothing about how a delivery would be
    /// answered.
    async fn probe(&self) -> Health {
        let started = std::time::Instant::now();
        let request = self
            .client
            .request(reqwest::Method::OPTIONS, self.url.clone())
            .timeout(self.timeout);
        match request.send().await {
            Err(e) => Health::fail(
                self.transport_error(e),
                "check the sink's url (host, port, scheme), DNS and firewalls between this host \
                 and the endpoint, and that the service is running",
            ),
            Ok(response) => {
                let status = response.status();
                let elapsed = started.elapsed().as_millis();
                if status.is_server_error() {
                    Health::warn(
                        format!(
                            "{} answered OPTIONS with http {} in {elapsed} ms ({})",
                            self.shown_url,
                            status.as_u16(),
                            self.describe()
                        ),
                        "deliveries are retried while the endpoint answers 5xx: check the \
                         receiving service and its logs",
                    )
                } else {
                    Health::ok(format!(
                        "{} answered OPTIONS with http {} in {elapsed} ms ({})",
                        self.shown_url,
                        status.as_u16(),
                        self.describe()
                    ))
                }
            }
        }
    }
}

impl Sink for HttpSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn max_batch(&self) -> usize {
        self.concurrency * BATCH_PER_SLOT
    }

    fn deliver<'a>(&'a self, batch: &'a [Envelope]) -> BoxFuture<'a, Vec<SinkResult>> {
        Box::pin(async move {
            // Futures made up front (not in a stream closure) so the borrow of `self` is plain.
            let posts: Vec<_> = batch.iter().map(|envelope| self.post(envelope)).collect();
            stream::iter(posts)
                .buffered(self.concurrency)
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
    use crate::sinks::{RetryPolicy, SinkKind};
    use axum::Router;
    use axum::extract::State;
    use axum::http::{HeaderMap as AxumHeaders, StatusCode as AxumStatus};
    use axum::response::IntoResponse;
    use axum::routing::post;
    use std::collections::BTreeMap;
    use std::sync::{Arc, Mutex};

    fn envelope(n: i64) -> Envelope {
        Envelope::sample(n)
    }

    #[derive(Default)]
    struct Seen {
        requests: Vec<(AxumHeaders, serde_json::Value)>,
    }

    type Shared = Arc<Mutex<Seen>>;

    /// The response depends on the envelope's offline id: 1..=99 ok, 503, 422, 408, 429, 301,
    /// 1000+ sleeps past the client timeout.
    async fn handler(
        State(seen): State<Shared>,
        headers: AxumHeaders,
        body: String,
    ) -> axum::response::Response {
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        let offline_id = value["offline_id"].as_i64().unwrap();
        seen.lock().unwrap().requests.push((headers, value));
        match offline_id {
            503 => (
                AxumStatus::SERVICE_UNAVAILABLE,
                [("retry-after", "7")],
                "busy",
            )
                .into_response(),
            422 => (AxumStatus::UNPROCESSABLE_ENTITY, "x".repeat(500)).into_response(),
            408 => AxumStatus::REQUEST_TIMEOUT.into_response(),
            429 => (AxumStatus::TOO_MANY_REQUESTS, "slow down").into_response(),
            301 => (AxumStatus::MOVED_PERMANENTLY, [("location", "/elsewhere")]).into_response(),
            n if n >= 1000 => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                AxumStatus::OK.into_response()
            }
            _ => (AxumStatus::OK, "ok").into_response(),
        }
    }

    async fn busy(State(seen): State<Shared>, headers: AxumHeaders) -> AxumStatus {
        seen.lock()
            .unwrap()
            .requests
            .push((headers, serde_json::Value::Null));
        AxumStatus::SERVICE_UNAVAILABLE
    }

    async fn server() -> (String, Shared) {
        let seen: Shared = Arc::default();
        let app = Router::new()
            .route("/events", post(handler))
            .route("/busy", axum::routing::options(busy))
            .route(
                "/slow",
                axum::routing::options(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    AxumStatus::NO_CONTENT
                }),
            )
            .with_state(Arc::clone(&seen));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/events"), seen)
    }

    fn sink(
        url: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
        concurrency: usize,
    ) -> HttpSink {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = HttpSinkConfig {
            url: url.to_string(),
            format: HttpFormat::Json,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>(),
            signing_secret: None,
            statuses: StatusOverrides::default(),
        };
        let config = SinkConfig {
            name: "erp".into(),
            route: Default::default(),
            timeout,
            concurrency,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(5),
            },
            kind: SinkKind::Http(http.clone()),
        };
        HttpSink::new(&config, &http).unwrap()
    }

    #[tokio::test]
    async fn statuses_map_to_results_in_order() {
        let (url, seen) = server().await;
        let sink = sink(&url, &[], Duration::from_secs(5), 3);
        assert_eq!(sink.max_batch(), 12);
        let batch: Vec<Envelope> = [1, 503, 422, 2, 408, 429, 301]
            .into_iter()
            .map(envelope)
            .collect();
        let results = sink.deliver(&batch).await;
        assert_eq!(results.len(), batch.len());
        assert_eq!(results[0], SinkResult::Delivered);
        assert_eq!(
            results[1],
            SinkResult::Retry {
                error: "http 503: busy".into(),
                after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(
            results[2],
            SinkResult::Dead {
                error: format!("http 422: {}", "x".repeat(200))
            }
        );
        assert_eq!(results[3], SinkResult::Delivered);
        assert_eq!(
            results[4],
            SinkResult::Retry {
                error: "http 408".into(),
                after: None
            }
        );
        assert_eq!(
            results[5],
            SinkResult::Retry {
                error: "http 429: slow down".into(),
                after: None
            }
        );
        assert_eq!(
            results[6],
            SinkResult::Dead {
                error: "http 301".into()
            }
        );
        assert_eq!(seen.lock().unwrap().requests.len(), batch.len());
    }

    #[tokio::test]
    async fn sends_json_with_idempotency_key_and_headers() {
        let (url, seen) = server().await;
        let sink = sink(
            &url,
            &[("Authorization", "Bearer t0k"), ("X-Source", "b24")],
            Duration::from_secs(5),
            4,
        );
        let results = sink.deliver(&[envelope(7)]).await;
        assert_eq!(results, vec![SinkResult::Delivered]);

        let seen = seen.lock().unwrap();
        let (headers, body) = &seen.requests[0];
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["idempotency-key"], "main:7:1795330800");
        assert_eq!(
            headers["user-agent"],
            concat!("b24eventd/", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(headers["authorization"], "Bearer t0k");
        assert_eq!(headers["x-source"], "b24");
        assert_eq!(body, &serde_json::to_value(envelope(7)).unwrap());
    }

    #[tokio::test]
    async fn timeout_is_retried() {
        let (url, _seen) = server().await;
        let sink = sink(&url, &[], Duration::from_millis(200), 2);
        let started = std::time::Instant::now();
        let results = sink.deliver(&[envelope(1000), envelope(1)]).await;
        assert!(started.elapsed() < Duration::from_secs(3));
        match &results[0] {
            SinkResult::Retry { error, after: None } => {
                assert!(error.contains("timed out after 200ms"), "{error}")
            }
            other => panic!("expected retry, got {other:?}"),
        }
        assert_eq!(results[1], SinkResult::Delivered);
    }

    #[tokio::test]
    async fn connection_errors_are_retried_without_credentials() {
        // Bind then drop a listener: nothing accepts on that port.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let sink = sink(
            &format!("http://user:hunter2@127.0.0.1:{port}/events"),
            &[],
            Duration::from_secs(2),
            1,
        );
        let results = sink.deliver(&[envelope(1)]).await;
        match &results[0] {
            SinkResult::Retry { error, after: None } => {
                assert!(error.contains("cannot connect"), "{error}");
                assert!(error.contains(&format!("127.0.0.1:{port}")), "{error}");
                assert!(
                    !error.contains("hunter2") && !error.contains("user:"),
                    "{error}"
                );
            }
            other => panic!("expected retry, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn url_credentials_become_basic_auth() {
        let (url, seen) = server().await;
        let url = url.replace("http://", "http://user:pw@");
        let sink = sink(&url, &[], Duration::from_secs(5), 1);
        assert_eq!(
            sink.deliver(&[envelope(1)]).await,
            vec![SinkResult::Delivered]
        );
        let seen = seen.lock().unwrap();
        assert!(
            seen.requests[0].0["authorization"]
                .to_str()
                .unwrap()
                .starts_with("Basic ")
        );
    }

    #[tokio::test]
    async fn healthcheck_probes_with_options_and_grades_the_answer() {
        use crate::sinks::HealthLevel;
        let (url, seen) = server().await;
        let base = url.trim_end_matches("/events").to_string();

        // /events routes only POST: 405 means the endpoint is there.
        let health = sink(&url, &[], Duration::from_secs(2), 1).health().await;
        assert_eq!(health.level, HealthLevel::Ok, "{health:?}");
        assert!(health.detail.contains("http 405"), "{health:?}");
        assert!(
            seen.lock().unwrap().requests.is_empty(),
            "nothing was delivered"
        );

        let busy = sink(
            &format!("{base}/busy"),
            &[("Authorization", "Bearer tok-123")],
            Duration::from_secs(2),
            1,
        );
        let health = busy.health().await;
        assert_eq!(health.level, HealthLevel::Warn, "{health:?}");
        assert!(health.detail.contains("503"), "{health:?}");
        assert_eq!(busy.health().await.level, HealthLevel::Warn, "probed again");
        let probes: Vec<AxumHeaders> = seen
            .lock()
            .unwrap()
            .requests
            .iter()
            .map(|(headers, _)| headers.clone())
            .collect();
        assert_eq!(probes.len(), 2, "each health check probed once");
        assert_eq!(
            probes[0]["authorization"], "Bearer tok-123",
            "the sink's headers go along"
        );
        assert!(probes[0].get("idempotency-key").is_none());

        let slow = sink(&format!("{base}/slow"), &[], Duration::from_millis(300), 1);
        let health = slow.health().await;
        assert_eq!(health.level, HealthLevel::Fail, "{health:?}");
        assert!(health.detail.contains("timed out"), "{health:?}");

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = format!("http://user:pw@{}/x", listener.local_addr().unwrap());
        drop(listener);
        let down = sink(&closed, &[], Duration::from_secs(2), 1);
        let health = down.health().await;
        assert_eq!(health.level, HealthLevel::Fail, "{health:?}");
        assert!(health.detail.contains("cannot connect"), "{health:?}");
        assert!(!health.detail.contains("pw"), "{health:?}");
        assert!(health.fix.is_some());
        assert_eq!(down.health().await.level, HealthLevel::Fail);
    }

    #[test]
    fn overrides_change_the_class_of_single_statuses() {
        let none = StatusOverrides::default();
        let overrides = StatusOverrides {
            retry_on: vec![409, 301],
            dead_on: vec![503],
        };
        let class = |code: u16, o: &StatusOverrides| {
            classify_status(StatusCode::from_u16(code).unwrap(), o)
        };
        assert_eq!(class(200, &none), StatusClass::Delivered);
        assert_eq!(class(204, &overrides), StatusClass::Delivered);
        assert_eq!(class(409, &none), StatusClass::Dead);
        assert_eq!(class(409, &overrides), StatusClass::Retry);
        assert_eq!(class(301, &overrides), StatusClass::Retry);
        assert_eq!(class(503, &none), StatusClass::Retry);
        assert_eq!(class(503, &overrides), StatusClass::Dead);
        assert_eq!(class(502, &overrides), StatusClass::Retry);
        assert_eq!(class(422, &overrides), StatusClass::Dead);
    }

    /// A bitrix-form sink, signed, against an endpoint that echoes the body in a 422: the
    /// request carries the form content type and the three signature headers, and the dead
    /// error quotes the body without the application token.
    #[tokio::test]
    async fn bitrix_form_signed_request_and_token_kept_out_of_errors() {
        use crate::options::SecretSource;
        use crate::sinks::bitrix_form::BitrixFormConfig;
        let seen: Arc<Mutex<Vec<AxumHeaders>>> = Arc::default();
        let log = seen.clone();
        let app = Router::new().route(
            "/hook",
            post(move |headers: AxumHeaders, body: String| {
                let log = log.clone();
                async move {
                    log.lock().unwrap().push(headers);
                    // The last pair (auth[application_token]) as sent, then decoded.
                    let last = body.rsplit('&').next().unwrap_or_default().to_string();
                    let answer = format!("bad request: {last}; token app+tok/secret value");
                    (AxumStatus::UNPROCESSABLE_ENTITY, answer)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

        let token = "app+tok/secret value";
        let http = HttpSinkConfig {
            url,
            format: HttpFormat::BitrixForm(BitrixFormConfig {
                domain: "x.bitrix24.com".into(),
                client_endpoint: "https://x.bitrix24.com/rest/".into(),
                server_endpoint: "https://oauth.bitrix.info/rest/".into(),
                member_id: "m1".into(),
                application_token: SecretSource::Inline(Secret::new(token)),
                event_handler_id: 0,
            }),
            headers: BTreeMap::new(),
            signing_secret: Some(SecretSource::Inline(Secret::new(
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            ))),
            statuses: StatusOverrides::default(),
        };
        let config = SinkConfig {
            name: "erp".into(),
            route: Default::default(),
            timeout: Duration::from_secs(5),
            concurrency: 1,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(5),
            },
            kind: SinkKind::Http(http.clone()),
        };
        let sink = HttpSink::new(&config, &http).unwrap();
        let results = sink.deliver(&[envelope(7)]).await;
        let SinkResult::Dead { error } = &results[0] else {
            panic!("expected dead: {results:?}")
        };
        assert_eq!(
            error,
            "http 422: bad request: auth%5Bapplication_token%5D=[redacted]; token [redacted]"
        );
        assert!(
            !error.contains("app+tok") && !error.contains("app%2Btok"),
            "{error}"
        );

        let headers = seen.lock().unwrap()[0].clone();
        assert_eq!(headers["content-type"], "application/x-www-form-urlencoded");
        assert_eq!(headers["idempotency-key"], "main:7:1795330800");
        assert_eq!(headers["webhook-id"], "main:7:1795330800");
        let ts: i64 = headers["webhook-timestamp"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((ts - unix_now()).abs() < 10, "{ts}");
        assert!(
            headers["webhook-signature"]
                .to_str()
                .unwrap()
                .starts_with("v1,")
        );

        let health = sink.health().await;
        assert!(
            health
                .detail
                .contains("format bitrix-form, signed with Standard Webhooks"),
            "{health:?}"
        );
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(120)));
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn status_classes() {
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(is_retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [300, 301, 400, 401, 403, 404, 409, 410, 422] {
            assert!(!is_retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        assert_eq!(
            status_error(StatusCode::BAD_REQUEST, None, "  ошибка\n"),
            "http 400: ошибка"
        );
        assert_eq!(
            status_error(StatusCode::CONFLICT, Some("retry_on"), ""),
            "http 409 (in retry_on)"
        );
    }
}
