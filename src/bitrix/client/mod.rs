//! The per-portal REST client: every HTTP request to a Bitrix24 portal goes through
//! [`PortalClient::call`], which owns authentication (single-flight refresh, rotation-safe
//! persistence), the client-side leaky bucket, the portal's limits (503 `QUERY_LIMIT_EXCEEDED`,
//! 429 `OPERATION_TIME_LIMIT`), domain-change redirects and response classification.
//!
//! This module holds [`PortalClient`] itself, its settings and the facade; the concerns live in
//! the children, each using only those before it: `stats` ([`ClientStats`]); `limits` (the
//! bucket, 503/429 waits, operating-time accounting) and `tokens` (the pair, refresh, adoption,
//! persistence); `transport` (the one `call` path: HTTP, redirects, classification); `offline`
//! (`event.offline.*`, `batch`, entity getters) and `operator` (`event.*` bindings,
//! `feature.get`, `server.time`, `user.admin`, `app.info`). `bitrix::layering` checks this.

mod limits;
mod offline;
mod operator;
mod stats;
#[cfg(test)]
mod test_support;
mod tokens;
mod transport;

pub(crate) use limits::MAX_OPERATING_WAIT;
pub use offline::{ClearTarget, GetRequest};
pub(crate) use offline::{EntityOutcome, MAX_BATCH, OfflineCommand, OfflineOutcome};
pub(crate) use operator::BindOutcome;
pub(crate) use stats::ClientStats;
pub(crate) use transport::http_client;

use super::error::{BitrixError, codes};
use super::oauth::{TokenStore, Tokens};
use super::ratelimit::LeakyBucket;
use limits::OperatingState;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokens::TokenState;

const SETUP: &str = "client setup";

/// How to reach and authenticate against one portal.
#[derive(Clone)]
pub struct ClientSettings {
    /// The portal's name in the config (used in logs and errors).
    pub portal: String,
    /// `https://example.bitrix24.com/rest/` (a missing trailing `/` is added).
    pub client_endpoint: String,
    pub oauth_token_url: String,
    pub client_id: String,
    pub client_secret: String,
    /// Sent as `auth_connector` on every call when set.
    pub auth_connector: Option<String>,
    /// Client-side leaky bucket mirroring the portal's (50 and 2/s; Enterprise 250 and 5/s).
    pub burst: u32,
    pub per_second: f64,
    /// Timeout of one HTTP request, body included.
    pub request_timeout: Duration,
    /// How long `call` keeps waiting out 503/429 limit answers before returning the
    /// Retryable error (zero: return the first one).
    pub max_limit_wait: Duration,
    /// The journal the portal's tokens are kept in, named by the NO_TOKENS error so the
    /// operator stores them where this process looks (None: tokens kept elsewhere).
    pub journal: Option<std::path::PathBuf>,
}

impl fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSettings")
            .field("portal", &self.portal)
            .field("client_endpoint", &self.client_endpoint)
            .field("oauth_token_url", &self.oauth_token_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("auth_connector", &self.auth_connector)
            .field("burst", &self.burst)
            .field("per_second", &self.per_second)
            .field("request_timeout", &self.request_timeout)
            .field("max_limit_wait", &self.max_limit_wait)
            .field("journal", &self.journal)
            .finish()
    }
}

/// A client for one portal. Cheap to clone; clones share tokens, bucket and counters.
#[derive(Clone)]
pub struct PortalClient {
    inner: Arc<Inner>,
}

struct Inner {
    settings: ClientSettings,
    http: reqwest::Client,
    /// The current `client_endpoint` (changes when the portal redirects to a new domain).
    endpoint: Mutex<String>,
    tokens: Mutex<TokenState>,
    /// Single-flight token refresh (and retried persistence), held across the HTTP request and
    /// the store's save.
    refresh_lock: tokio::sync::Mutex<()>,
    bucket: Mutex<LeakyBucket>,
    operating: Mutex<OperatingState>,
    stats: Mutex<ClientStats>,
    store: Arc<dyn TokenStore>,
}

/// Locks a std mutex, ignoring poisoning (every critical section leaves consistent state).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PortalClient {
    /// Builds the client. Fails (Fatal `INVALID_SETTINGS`) on an unusable endpoint or token URL,
    /// a zero timeout, or when the HTTP client cannot be built.
    pub fn new(
        settings: ClientSettings,
        tokens: Option<Tokens>,
        store: Arc<dyn TokenStore>,
    ) -> Result<PortalClient, BitrixError> {
        let http = http_client().map_err(|e| {
            BitrixError::new(
                &settings.portal,
                SETUP,
                codes::INVALID_SETTINGS,
                format!("the HTTP client could not be built: {e}"),
                None,
            )
        })?;
        PortalClient::with_http(settings, tokens, store, http)
    }

    /// [`PortalClient::new`] on an HTTP client shared with other portals (one connection pool
    /// and TLS configuration for a daemon serving many portals). Each request still has the
    /// portal's own `request_timeout`.
    pub(crate) fn with_http(
        settings: ClientSettings,
        tokens: Option<Tokens>,
        store: Arc<dyn TokenStore>,
        http: reqwest::Client,
    ) -> Result<PortalClient, BitrixError> {
        let portal = settings.portal.clone();
        let invalid =
            |what: String| BitrixError::new(&portal, SETUP, codes::INVALID_SETTINGS, what, None);
        let endpoint = normalize_endpoint(&settings.client_endpoint)
            .map_err(|e| invalid(format!("client_endpoint {}: {e}", settings.client_endpoint)))?;
        match reqwest::Url::parse(&settings.oauth_token_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => {
                return Err(invalid(format!(
                    "oauth_token_url {} is not an http(s) URL",
                    settings.oauth_token_url
                )));
            }
        }
        if settings.request_timeout.is_zero() {
            return Err(invalid("request_timeout must be above zero".to_string()));
        }
        if !(settings.per_second > 0.0 && settings.per_second.is_finite()) || settings.burst == 0 {
            return Err(invalid(format!(
                "rate limit burst {} per_second {} must both be above zero",
                settings.burst, settings.per_second
            )));
        }
        let bucket = LeakyBucket::new(settings.burst, settings.per_second, Instant::now());
        crate::redact::register(&settings.client_secret);
        if let Some(tokens) = &tokens {
            tokens.register_secrets(&portal);
        }
        Ok(PortalClient {
            inner: Arc::new(Inner {
                http,
                endpoint: Mutex::new(endpoint),
                tokens: Mutex::new(TokenState::holding(tokens)),
                refresh_lock: tokio::sync::Mutex::new(()),
                bucket: Mutex::new(bucket),
                operating: Mutex::new(OperatingState::default()),
                stats: Mutex::new(ClientStats::default()),
                store,
                settings,
            }),
        })
    }

    /// The timeout of one HTTP request to this portal.
    pub(crate) fn request_timeout(&self) -> Duration {
        self.inner.settings.request_timeout
    }

    pub(crate) fn portal(&self) -> &str {
        &self.inner.settings.portal
    }

    /// The endpoint calls currently go to (differs from the config after a domain redirect).
    pub(crate) fn client_endpoint(&self) -> String {
        lock(&self.inner.endpoint).clone()
    }

    /// A successful answer whose `result` has the wrong shape: the call did run.
    fn shape_error(&self, method: &str, what: String) -> BitrixError {
        BitrixError::new(
            self.portal(),
            method,
            codes::INVALID_RESPONSE,
            format!("unexpected result: {what}"),
            Some(200),
        )
        .with_maybe_executed(true)
    }
}

/// Checks an endpoint URL and gives it exactly one trailing `/`.
fn normalize_endpoint(endpoint: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(endpoint.trim()).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("scheme {} is not http or https", url.scheme()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("no host".to_string());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a query or fragment is not allowed".to_string());
    }
    let mut s = url.to_string();
    if !s.ends_with('/') {
        s.push('/');
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use crate::bitrix::ErrorClass;

    #[test]
    fn settings_are_checked_and_secret_free_in_debug() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store: Arc<dyn TokenStore> = unwatched_store();
        let mut s = settings("https://example.bitrix24.com");
        s.client_endpoint = "https://example.bitrix24.com/rest".into();
        let client = PortalClient::new(s.clone(), None, store.clone()).unwrap();
        assert_eq!(
            client.client_endpoint(),
            "https://example.bitrix24.com/rest/"
        );
        assert!(!format!("{s:?}").contains("s3cr3t"));
        s.client_endpoint = "example.bitrix24.com/rest/".into();
        let err = PortalClient::new(s, None, store).err().unwrap();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Fatal, "INVALID_SETTINGS")
        );
    }
}
