//! The pipeline: a poller per portal (reserve → journal → settle, orphan sweep, error lane), a
//! dispatcher per sink (due deliveries → sink → retry schedule → journal), and the cron
//! schedules that wake them. Everything is driven by the journal, so a restart resumes exactly
//! where the last run stopped.

pub mod dispatcher;
pub mod poller;
pub mod retry;
pub mod settle;

use crate::bitrix::{ClientSettings, PortalClient, TokenStore};
use crate::config::{Config, PortalConfig, resolve_secret};
use crate::journal::Journal;
use crate::sinks::Route;
use anyhow::Context;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Wake-ups shared between the pollers and the dispatchers.
#[derive(Default)]
pub struct Wakers {
    /// Per portal: deliveries finished, there may be settle work.
    pub settle: HashMap<String, Arc<Notify>>,
    /// Per sink: new deliveries were journaled.
    pub deliver: HashMap<String, Arc<Notify>>,
}

impl Wakers {
    pub fn wake_sinks(&self) {
        for n in self.deliver.values() {
            n.notify_one();
        }
    }

    pub fn wake_portal(&self, portal: &str) {
        if let Some(n) = self.settle.get(portal) {
            n.notify_one();
        }
    }
}

/// Builds the Bitrix24 client of one portal from its config, with tokens from the journal.
pub async fn portal_client(
    portal: &PortalConfig,
    journal: &Journal,
) -> anyhow::Result<PortalClient> {
    client_with_limit_wait(portal, journal, Duration::from_secs(15 * 60)).await
}

/// Like [`portal_client`], for operator commands (`doctor`, `subscribe`, `auth login`): it waits
/// out the portal's rate and operating limits for at most 30 s, so a command answers with the
/// limit error instead of hanging for minutes.
pub async fn operator_client(
    portal: &PortalConfig,
    journal: &Journal,
) -> anyhow::Result<PortalClient> {
    client_with_limit_wait(portal, journal, Duration::from_secs(30)).await
}

async fn client_with_limit_wait(
    portal: &PortalConfig,
    journal: &Journal,
    max_limit_wait: Duration,
) -> anyhow::Result<PortalClient> {
    let secret = resolve_secret(portal)?;
    let tokens = journal.load_tokens(&portal.name).await?;
    let settings = ClientSettings {
        portal: portal.name.clone(),
        client_endpoint: portal.client_endpoint.clone(),
        oauth_token_url: portal.oauth_token_url.clone(),
        client_id: portal.client_id.clone(),
        client_secret: secret.expose().to_string(),
        auth_connector: portal.auth_connector.clone(),
        burst: portal.rate_limit.burst,
        per_second: portal.rate_limit.per_second,
        request_timeout: portal.request_timeout,
        max_limit_wait,
    };
    let store: Arc<dyn TokenStore> = Arc::new(journal.clone());
    PortalClient::new(settings, tokens, store).map_err(anyhow::Error::from)
}

/// A running pipeline's handles, for callers that want to look inside (the demo's summary).
pub struct Running {
    pub clients: Vec<PortalClient>,
}

/// Runs the daemon until `shutdown` is cancelled, then stops fetching, lets in-flight deliveries
/// finish within `shutdown_timeout`, settles what is settled, and returns.
pub async fn run(
    config: Config,
    journal: Journal,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with(config, journal, shutdown, |_| {}).await
}

/// [`run`], calling `started` once every task is up.
pub async fn run_with(
    config: Config,
    journal: Journal,
    shutdown: CancellationToken,
    started: impl FnOnce(&Running),
) -> anyhow::Result<()> {
    let mut wakers = Wakers::default();
    for name in config.portals.keys() {
        wakers.settle.insert(name.clone(), Arc::new(Notify::new()));
    }
    let mut sinks = Vec::new();
    for (name, sink_config) in &config.sinks {
        let sink = crate::sinks::build(sink_config)
            .with_context(|| format!("cannot start sink {name}"))?;
        wakers.deliver.insert(name.clone(), Arc::new(Notify::new()));
        sinks.push((sink, sink_config.clone()));
    }
    let routes: Vec<(String, Route)> = config
        .sinks
        .iter()
        .map(|(name, s)| (name.clone(), s.route.clone()))
        .collect();

    let known_sinks: Vec<String> = config.sinks.keys().cloned().collect();
    for (sink, count) in journal
        .drop_deliveries_to_unknown_sinks(known_sinks)
        .await?
    {
        tracing::warn!(
            %sink,
            deliveries = count,
            "sink no longer configured: its pending deliveries were dropped"
        );
    }

    let mut clients = Vec::new();
    for portal in config.portals.values() {
        clients.push(portal_client(portal, &journal).await?);
    }
    let wakers = Arc::new(wakers);

    // The pollers stop on `shutdown`; the dispatchers get their own token, cancelled after the
    // pollers have stopped fetching, so nothing new is journaled while deliveries drain.
    let dispatch_stop = CancellationToken::new();
    let mut dispatchers = tokio::task::JoinSet::new();
    for (sink, sink_config) in sinks {
        let worker = dispatcher::Dispatcher {
            wake: wakers.deliver[&sink_config.name].clone(),
            sink,
            policy: sink_config.retry,
            journal: journal.clone(),
            wakers: wakers.clone(),
            stop: dispatch_stop.clone(),
        };
        dispatchers.spawn(worker.run());
    }

    let scheduler = poller::Schedules::start(&config).await?;
    let mut pollers = tokio::task::JoinSet::new();
    let mut settlers = Vec::new();
    for (portal, client) in config.portals.values().zip(clients.iter()) {
        let poller = poller::Poller::new(
            portal.clone(),
            client.clone(),
            journal.clone(),
            routes.clone(),
            wakers.clone(),
            scheduler.triggers(&portal.name),
            shutdown.clone(),
        );
        settlers.push(poller.settler());
        pollers.spawn(poller.run());
    }
    started(&Running { clients });
    tracing::info!(
        portals = config.portals.len(),
        sinks = config.sinks.len(),
        journal = %journal.path().display(),
        "b24eventd running"
    );

    shutdown.cancelled().await;
    tracing::info!("stopping: no new fetches; letting in-flight deliveries finish");
    while let Some(res) = pollers.join_next().await {
        if let Err(e) = res {
            tracing::error!(error = %e, "poller task failed");
        }
    }
    scheduler.stop().await;

    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
    dispatch_stop.cancel();
    loop {
        match tokio::time::timeout_at(deadline, dispatchers.join_next()).await {
            Ok(Some(Err(e))) => tracing::error!(error = %e, "dispatcher task failed"),
            Ok(Some(Ok(()))) => {}
            Ok(None) => break,
            Err(_) => {
                tracing::warn!(
                    timeout = ?config.shutdown_timeout,
                    "shutdown deadline reached with deliveries in flight: they will be retried on the next start"
                );
                dispatchers.abort_all();
                break;
            }
        }
    }
    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
    let final_settle = async {
        for settler in &settlers {
            settler.settle_all().await;
        }
    };
    if tokio::time::timeout(remaining.max(Duration::from_secs(5)), final_settle)
        .await
        .is_err()
    {
        tracing::warn!(
            "shutdown deadline reached while settling: pending settle calls are resent on the next start"
        );
    }
    tracing::info!("b24eventd stopped");
    Ok(())
}
