//! The data path: a poller per portal (reserve → journal → settle, orphan sweep, error lane), a
//! dispatcher per sink (due deliveries → sink → retry schedule → journal), the cron schedules
//! that wake them, and what they share (wake-ups, the routing table, the portal clients).
//! Everything is driven by the journal, so a restart resumes exactly where the last run
//! stopped. The `daemon` module starts, stops and reloads these parts.

pub(crate) mod backoff;
pub(crate) mod clock;
pub(crate) mod dispatcher;
pub(crate) mod economy;
pub(crate) mod lease_clock;
pub mod liveness;
pub(crate) mod orphans;
pub(crate) mod poller;
pub(crate) mod retry;

use crate::bitrix::{ClientSettings, PortalClient, TokenStore};
use crate::config::{Config, PortalConfig, resolve_secret};
use crate::journal::Journal;
use crate::sinks::Route;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::Notify;

/// Wake-ups shared between the pollers and the dispatchers.
#[derive(Default)]
pub(crate) struct Wakers {
    /// Per portal: deliveries finished, there may be settle work.
    pub settle: HashMap<String, Arc<Notify>>,
    /// Per sink: new deliveries were journaled. Sinks come and go on reload.
    pub deliver: RwLock<HashMap<String, Arc<Notify>>>,
}

impl Wakers {
    /// A settle wake-up for each portal; the sinks' come with their dispatchers.
    pub fn new<'a>(portals: impl IntoIterator<Item = &'a String>) -> Wakers {
        let settle = portals
            .into_iter()
            .map(|name| (name.clone(), Arc::new(Notify::new())))
            .collect();
        Wakers {
            settle,
            deliver: RwLock::default(),
        }
    }

    pub fn wake_sinks(&self) {
        for n in read(&self.deliver).values() {
            n.notify_one();
        }
    }

    pub fn wake_portal(&self, portal: &str) {
        if let Some(n) = self.settle.get(portal) {
            n.notify_one();
        }
    }
}

/// The routing table (`[sinks.NAME]` → its `events`/`portals` route), swapped whole on reload;
/// a poller takes the current one for each batch it journals.
#[derive(Clone, Default)]
pub(crate) struct SharedRoutes(Arc<RwLock<Arc<RouteTable>>>);

/// `(sink name, its route)` for every configured sink.
pub(crate) type RouteTable = Vec<(String, Route)>;

impl SharedRoutes {
    pub fn new(config: &Config) -> SharedRoutes {
        let routes = SharedRoutes::default();
        routes.replace(config);
        routes
    }

    pub fn current(&self) -> Arc<RouteTable> {
        read(&self.0).clone()
    }

    /// Swaps in the routes of `config` (a reload).
    pub(crate) fn replace(&self, config: &Config) {
        let table = config
            .sinks
            .iter()
            .map(|(name, s)| (name.clone(), s.route.clone()))
            .collect();
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

/// The Bitrix24 client of one portal for operator commands (`doctor`, `subscribe`, `auth login`): it waits
/// out the portal's rate and operating limits for at most 30 s, so a command answers with the
/// limit error instead of hanging for minutes.
pub(crate) async fn operator_client(
    portal: &PortalConfig,
    journal: &Journal,
) -> anyhow::Result<PortalClient> {
    let http = crate::bitrix::client::http_client()?;
    client_with_limit_wait(portal, journal, Duration::from_secs(30), http).await
}

/// [`operator_client`] on a token pair not stored yet, kept by `store` (`auth import`/`login`
/// try a new pair this way before it replaces the stored one).
pub(crate) fn candidate_client(
    portal: &PortalConfig,
    tokens: Option<crate::bitrix::Tokens>,
    store: Arc<dyn TokenStore>,
) -> anyhow::Result<PortalClient> {
    let http = crate::bitrix::client::http_client()?;
    client_on(portal, tokens, store, None, Duration::from_secs(30), http)
}

/// A portal's client that waits out its limits for up to `max_limit_wait`, on `http`.
pub(crate) async fn client_with_limit_wait(
    portal: &PortalConfig,
    journal: &Journal,
    max_limit_wait: Duration,
    http: reqwest::Client,
) -> anyhow::Result<PortalClient> {
    let tokens = journal.load_tokens(&portal.name).await?;
    let store: Arc<dyn TokenStore> = Arc::new(journal.clone());
    // Absolute, so the NO_TOKENS error names the file whatever the reader's directory.
    let path = std::path::PathBuf::from(journal.location());
    client_on(portal, tokens, store, Some(path), max_limit_wait, http)
}

fn client_on(
    portal: &PortalConfig,
    tokens: Option<crate::bitrix::Tokens>,
    store: Arc<dyn TokenStore>,
    journal: Option<std::path::PathBuf>,
    max_limit_wait: Duration,
    http: reqwest::Client,
) -> anyhow::Result<PortalClient> {
    let secret = resolve_secret(portal)?;
    let (burst, per_second) = portal.rate_limit.client_bucket();
    let settings = ClientSettings {
        portal: portal.name.clone(),
        client_endpoint: portal.client_endpoint.clone(),
        oauth_token_url: portal.oauth_token_url.clone(),
        client_id: portal.client_id.clone(),
        client_secret: secret.expose().to_string(),
        auth_connector: portal.auth_connector.clone(),
        burst,
        per_second,
        request_timeout: portal.request_timeout,
        max_limit_wait,
        journal,
    };
    PortalClient::with_http(settings, tokens, store, http).map_err(anyhow::Error::from)
}
