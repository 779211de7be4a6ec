//! The pipeline: a poller per portal (reserve → journal → settle, orphan sweep, error lane), a
//! dispatcher per sink (due deliveries → sink → retry schedule → journal), and the cron
//! schedules that wake them. Everything is driven by the journal, so a restart resumes exactly
//! where the last run stopped.

pub mod backoff;
pub mod clock;
pub mod dispatcher;
pub mod economy;
pub mod liveness;
pub mod orphans;
pub mod poller;
pub mod retry;

use crate::admin::{AdminServer, AdminState};
use crate::bitrix::{ClientSettings, PortalClient, TokenStore};
use crate::config::{Config, PortalConfig, SinkConfig, resolve_secret};
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::sinks::Route;
use crate::supervisor::Supervisor;
use futures_util::FutureExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Wake-ups shared between the pollers and the dispatchers.
#[derive(Default)]
pub struct Wakers {
    /// Per portal: deliveries finished, there may be settle work.
    pub settle: HashMap<String, Arc<Notify>>,
    /// Per sink: new deliveries were journaled. Sinks come and go on reload.
    pub deliver: RwLock<HashMap<String, Arc<Notify>>>,
}

impl Wakers {
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
pub struct SharedRoutes(Arc<RwLock<Arc<RouteTable>>>);

/// `(sink name, its route)` for every configured sink.
pub type RouteTable = Vec<(String, Route)>;

impl SharedRoutes {
    pub fn new(config: &Config) -> SharedRoutes {
        let routes = SharedRoutes::default();
        routes.replace(config);
        routes
    }

    pub fn current(&self) -> Arc<RouteTable> {
        read(&self.0).clone()
    }

    fn replace(&self, config: &Config) {
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
pub async fn operator_client(
    portal: &PortalConfig,
    journal: &Journal,
) -> anyhow::Result<PortalClient> {
    let http = crate::bitrix::client::http_client()?;
    client_with_limit_wait(portal, journal, Duration::from_secs(30), http).await
}

/// [`operator_client`] on a token pair not stored yet, kept by `store` (`auth import`/`login`
/// try a new pair this way before it replaces the stored one).
pub fn candidate_client(
    portal: &PortalConfig,
    tokens: Option<crate::bitrix::Tokens>,
    store: Arc<dyn TokenStore>,
) -> anyhow::Result<PortalClient> {
    let http = crate::bitrix::client::http_client()?;
    client_on(portal, tokens, store, Duration::from_secs(30), http)
}

async fn client_with_limit_wait(
    portal: &PortalConfig,
    journal: &Journal,
    max_limit_wait: Duration,
    http: reqwest::Client,
) -> anyhow::Result<PortalClient> {
    let tokens = journal.load_tokens(&portal.name).await?;
    let store: Arc<dyn TokenStore> = Arc::new(journal.clone());
    client_on(portal, tokens, store, max_limit_wait, http)
}

fn client_on(
    portal: &PortalConfig,
    tokens: Option<crate::bitrix::Tokens>,
    store: Arc<dyn TokenStore>,
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
    };
    PortalClient::with_http(settings, tokens, store, http).map_err(anyhow::Error::from)
}

/// A running pipeline's handles, for callers that want to look inside (the demo's summary, the
/// tests that scrape the admin endpoint).
pub struct Running {
    pub clients: Vec<PortalClient>,
    /// Where the admin endpoint listens (the bound port when `admin.listen` asked for `:0`).
    pub admin_addr: Option<std::net::SocketAddr>,
}

/// Runs the daemon until `shutdown` is cancelled, then stops fetching, lets in-flight deliveries
/// finish within `shutdown_timeout`, settles what is settled, and returns.
pub async fn run(
    config: Config,
    journal: Journal,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    run_with(config, journal, shutdown, Controls::default(), |_| {}).await
}

/// What the daemon (as opposed to a test or the demo) adds to a pipeline run.
#[derive(Default)]
pub struct Controls {
    /// Notified on SIGHUP: re-read the config file.
    pub reload: Option<Arc<Notify>>,
    /// systemd notifications (a no-op outside systemd).
    pub notifier: crate::systemd::Notifier,
}

/// [`run`], with the daemon's [`Controls`], calling `started` once every task is up.
pub async fn run_with(
    config: Config,
    journal: Journal,
    shutdown: CancellationToken,
    controls: Controls,
    started: impl FnOnce(&Running),
) -> anyhow::Result<()> {
    let Controls { reload, notifier } = controls;
    let mut wakers = Wakers::default();
    for name in config.portals.keys() {
        wakers.settle.insert(name.clone(), Arc::new(Notify::new()));
    }
    let wakers = Arc::new(wakers);
    // The pollers stop on `shutdown`; the dispatchers get their own token, cancelled after the
    // pollers have stopped fetching, so nothing new is journaled while deliveries drain.
    let dispatch_stop = CancellationToken::new();
    let mut built = Vec::new();
    for sink_config in config.sinks.values() {
        // Build errors name the sink ("sink erp: ...").
        let sink = crate::sinks::build(sink_config)?;
        built.push((sink, sink_config.clone()));
    }
    let routes = SharedRoutes::new(&config);

    // One HTTP client (connection pool, TLS configuration) for every portal: a daemon serving
    // a thousand portals must not hold a thousand of each.
    let http = crate::bitrix::client::http_client()?;
    let mut clients = Vec::new();
    for portal in config.portals.values() {
        clients.push(
            client_with_limit_wait(portal, &journal, Duration::from_secs(15 * 60), http.clone())
                .await?,
        );
    }
    let metrics = Metrics::new(clients.clone());
    let supervisor = Supervisor::new(metrics.clone());
    let liveness = liveness::Liveness::new(config.portals.keys());
    let admin_state = AdminState {
        metrics: metrics.clone(),
        liveness: liveness.clone(),
        journal: journal.clone(),
        portals: config.portals.keys().cloned().collect(),
        tasks: supervisor.clone(),
    };
    let admin = match config.admin.listen {
        Some(listen) => Some(AdminServer::start(listen, admin_state.clone()).await?),
        None => None,
    };
    let admin_addr = admin.as_ref().map(AdminServer::local_addr);
    // Stopped after the final settle, as before; the endpoint is restarted on its address
    // should its task die.
    let admin_stop = CancellationToken::new();
    // An early return (a refused start) stops the endpoint too, as dropping it did.
    let _admin_stopped_on_return = admin_stop.clone().drop_guard();
    let admin = admin.map(|first| {
        let mut first = Some(first);
        let stop = admin_stop.clone();
        let addr = first.as_ref().map(AdminServer::local_addr);
        tokio::spawn(supervisor.supervise("admin", admin_stop.clone(), move || {
            let first = first.take();
            let state = admin_state.clone();
            let stop = stop.clone();
            async move {
                let mut server = match (first, addr) {
                    (Some(server), _) => server,
                    (None, Some(addr)) => AdminServer::start(addr, state).await?,
                    (None, None) => return Ok(()),
                };
                tokio::select! {
                    ended = server.finished() => Err(ended),
                    _ = stop.cancelled() => {
                        server.stop().await;
                        Ok(())
                    }
                }
            }
        }))
    });
    let mut dispatchers = Dispatchers {
        running: BTreeMap::new(),
        directory: crate::alerts::SinkDirectory::default(),
        journal: journal.clone(),
        wakers: wakers.clone(),
        metrics: metrics.clone(),
        stop: dispatch_stop.clone(),
        supervisor: supervisor.clone(),
    };
    dispatchers.drop_unknown(&config).await?;
    for (sink, sink_config) in built {
        dispatchers.start(sink, sink_config);
    }

    // What the last conformance probe found: adapt, or refuse a portal (exit 78) before
    // anything starts.
    let mut conformance = crate::conformance::for_daemon(&config, &journal).await?;
    let mut scheduler = poller::Schedules::start(&config).await?;
    let mut pollers = tokio::task::JoinSet::new();
    let mut settlers = Vec::new();
    for (portal, client) in config.portals.values().zip(clients.iter()) {
        let poller = poller::Poller::new(
            portal.clone(),
            client.clone(),
            poller::Shared {
                journal: journal.clone(),
                routes: routes.clone(),
                wakers: wakers.clone(),
                metrics: metrics.clone(),
                shutdown: shutdown.clone(),
            },
            scheduler.triggers(&portal.name),
            liveness.handle(&portal.name),
            conformance.remove(&portal.name).unwrap_or_default(),
        );
        settlers.push(poller.settler());
        // A restarted poller starts as at a daemon start: it re-reads its open reservations
        // and sweeps for orphans, so the round that died loses nothing.
        pollers.spawn(supervisor.supervise(
            format!("poller/{}", portal.name),
            shutdown.clone(),
            move || {
                let poller = poller.clone();
                async move { Ok(poller.run().await) }
            },
        ));
    }
    let pruner = {
        let (journal, retention) = (journal.clone(), config.journal.retention);
        let (trigger, shutdown) = (scheduler.prune_trigger(), shutdown.clone());
        tokio::spawn(supervisor.supervise("prune", shutdown.clone(), move || {
            let run = prune_on_schedule(
                journal.clone(),
                retention,
                trigger.clone(),
                shutdown.clone(),
            );
            run.map(Ok)
        }))
    };
    let alerts = config.alerts.clone().map(|alerts| {
        let (journal, liveness) = (journal.clone(), liveness.clone());
        let (sinks, shutdown) = (dispatchers.directory.clone(), shutdown.clone());
        tokio::spawn(supervisor.supervise("alerts", shutdown.clone(), move || {
            let run = crate::alerts::run(
                alerts.clone(),
                journal.clone(),
                liveness.clone(),
                sinks.clone(),
                shutdown.clone(),
            );
            run.map(Ok)
        }))
    });
    let systemd = {
        let (notifier, liveness) = (notifier.clone(), liveness.clone());
        let (tasks, journal, shutdown) = (supervisor.clone(), journal.clone(), shutdown.clone());
        tokio::spawn(supervisor.supervise("systemd", shutdown.clone(), move || {
            let run = liveness::notify_systemd(
                notifier.clone(),
                liveness.clone(),
                tasks.clone(),
                journal.clone(),
                shutdown.clone(),
            );
            run.map(Ok)
        }))
    };
    let (steps_tx, mut clock_steps) = tokio::sync::mpsc::unbounded_channel();
    let clock_watch = {
        let shutdown = shutdown.clone();
        tokio::spawn(supervisor.supervise("clock", shutdown.clone(), move || {
            let steps_tx = steps_tx.clone();
            let run = clock::watch(shutdown.clone(), move |seconds| {
                let _ = steps_tx.send(seconds);
            });
            run.map(Ok)
        }))
    };
    started(&Running {
        clients,
        admin_addr,
    });
    tracing::info!(
        portals = config.portals.len(),
        sinks = config.sinks.len(),
        journal = %journal.path().display(),
        "b24eventd running"
    );

    // Until shutdown: reload on request, and stop when every portal refused its mode.
    let mut running_config = config;
    let mut refused: Vec<poller::ConfigMismatch> = Vec::new();
    let reload = reload.unwrap_or_default();
    let portal_count = running_config.portals.len();
    let mut gave_up = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            given_up = supervisor.gave_up() => {
                tracing::error!(error = %given_up, "stopping: a task keeps dying");
                gave_up = Some(given_up);
                shutdown.cancel();
                break;
            }
            _ = reload.notified() => {
                notifier.reloading();
                reload_config(&mut running_config, &mut dispatchers, &routes).await;
                scheduler.resume_stopped();
                notifier.ready();
            }
            Some(seconds) = clock_steps.recv() => {
                metrics.clock_step(seconds);
                if seconds < 0.0 {
                    scheduler.replan().await;
                }
            }
            Some(done) = pollers.join_next(), if !pollers.is_empty() => {
                match done {
                    Ok(Some(Some(mismatch))) => refused.push(mismatch),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "poller task failed"),
                }
                if portal_count > 0 && refused.len() == portal_count {
                    tracing::error!("every portal refused its configured mode: stopping");
                    shutdown.cancel();
                }
            }
        }
    }
    // Every phase of the stop is bounded: the pollers and the deliveries share one deadline,
    // `shutdown_timeout` after the signal; the due settle calls, the cron scheduler and the
    // admin endpoint get what is left of it plus STOP_TAIL. The process ends within
    // `shutdown_timeout` + STOP_TAIL whatever is in flight, and the log says what it waited for.
    let stop_started = tokio::time::Instant::now();
    let deadline = stop_started + running_config.shutdown_timeout;
    let end = deadline + STOP_TAIL;
    tracing::info!(timeout = ?running_config.shutdown_timeout, "stopping: no new fetches; letting in-flight deliveries finish");
    notifier.stopping();
    let pollers_stopped = tokio::time::timeout_at(deadline, async {
        while let Some(res) = pollers.join_next().await {
            match res {
                Ok(Some(Some(mismatch))) => refused.push(mismatch),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "poller task failed"),
            }
        }
    })
    .await
    .is_ok();
    if !pollers_stopped {
        tracing::warn!(portals = pollers.len(), timeout = ?running_config.shutdown_timeout, "shutdown deadline reached with portal calls in flight: abandoned; what they reserved is resumed on the next start");
        pollers.abort_all();
    }
    let pollers_took = stop_started.elapsed();
    clock_watch.abort();
    pruner.abort();
    if let Some(alerts) = alerts {
        alerts.abort();
    }
    let helpers_stopped = tokio::time::timeout(AUX_STOP, async {
        scheduler.stop().await;
        let _ = systemd.await;
    })
    .await
    .is_ok();
    if !helpers_stopped {
        tracing::warn!(timeout = ?AUX_STOP, "the cron scheduler or the systemd notifier did not stop in time: abandoned");
    }

    dispatch_stop.cancel();
    let in_flight = dispatchers.join_all(deadline).await;
    if !in_flight.is_empty() {
        tracing::warn!(
            sinks = %in_flight.join(","),
            timeout = ?running_config.shutdown_timeout,
            "shutdown deadline reached with deliveries in flight: they will be retried on the next start"
        );
    }
    let deliveries_took = stop_started.elapsed().saturating_sub(pollers_took);
    let settle_started = tokio::time::Instant::now();
    let final_settle = async {
        for settler in &settlers {
            settler.settle_all().await;
        }
    };
    let settle_by = end.checked_sub(AUX_STOP).unwrap_or(end);
    if tokio::time::timeout_at(settle_by, final_settle)
        .await
        .is_err()
    {
        tracing::warn!(
            "shutdown deadline reached while settling: pending settle calls are resent on the next start"
        );
    }
    let settle_took = settle_started.elapsed();
    admin_stop.cancel();
    if let Some(admin) = admin
        && tokio::time::timeout_at(end, admin).await.is_err()
    {
        tracing::warn!("the admin endpoint did not stop in time: abandoned");
    }
    tracing::info!(
        took = ?stop_started.elapsed(),
        pollers = ?pollers_took,
        deliveries = ?deliveries_took,
        settle = ?settle_took,
        "stop waited for: the pollers' last round, the deliveries in flight, the due settle calls"
    );
    tracing::info!("b24eventd stopped");
    if let Some(gave_up) = gave_up.or_else(|| supervisor.given_up()) {
        return Err(gave_up.into());
    }
    if portal_count > 0 && refused.len() == portal_count {
        let first = &refused[0];
        return Err(crate::config::ConfigError::new(
            running_config.source.display().to_string(),
            format!("portals.{}.mode", first.portal),
            first.message.clone(),
        )
        .into());
    }
    Ok(())
}

/// How long a stop may go on after `shutdown_timeout`: the due settle calls, then the cron
/// scheduler and the admin endpoint.
pub const STOP_TAIL: Duration = Duration::from_secs(10);
/// How long the cron scheduler, the systemd notifier, each, get to stop (part of the bounds).
const AUX_STOP: Duration = Duration::from_secs(2);

/// The dispatcher of every configured sink, started and stopped as the config says.
struct Dispatchers {
    running: BTreeMap<String, RunningSink>,
    /// The running sinks by name, for the alerts task.
    directory: crate::alerts::SinkDirectory,
    journal: Journal,
    wakers: Arc<Wakers>,
    metrics: Metrics,
    /// Parent of every dispatcher's token: cancelled at shutdown.
    stop: CancellationToken,
    /// Restarts a dispatcher that died.
    supervisor: Supervisor,
}

struct RunningSink {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Option<()>>,
}

impl Dispatchers {
    fn start(&mut self, sink: Arc<dyn crate::sinks::Sink>, config: SinkConfig) {
        let wake = Arc::new(Notify::new());
        self.wakers
            .deliver
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(config.name.clone(), wake.clone());
        let stop = self.stop.child_token();
        self.directory
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(config.name.clone(), sink.clone());
        let worker = dispatcher::Dispatcher {
            wake,
            sink,
            policy: config.retry,
            journal: self.journal.clone(),
            wakers: self.wakers.clone(),
            metrics: self.metrics.clone(),
            stop: stop.clone(),
        };
        let task = tokio::spawn(self.supervisor.supervise(
            format!("dispatcher/{}", config.name),
            stop.clone(),
            move || {
                let worker = worker.clone();
                async move {
                    worker.run().await;
                    Ok(())
                }
            },
        ));
        self.running.insert(config.name, RunningSink { stop, task });
    }

    /// Stops a sink's dispatcher and waits for the batch it has in flight to finish (its
    /// outcome is journaled), so no other dispatcher takes the same deliveries meanwhile.
    async fn stop(&mut self, name: &str) {
        self.wakers
            .deliver
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.directory
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Some(sink) = self.running.remove(name) {
            sink.stop.cancel();
            if let Err(e) = sink.task.await {
                tracing::error!(sink = %name, error = %e, "dispatcher task failed");
            }
        }
    }

    /// Drops pending deliveries to sinks the config no longer has (see the journal).
    async fn drop_unknown(&self, config: &Config) -> anyhow::Result<()> {
        let known: Vec<String> = config.sinks.keys().cloned().collect();
        for (sink, count) in self.journal.drop_deliveries_to_unknown_sinks(known).await? {
            tracing::warn!(
                %sink,
                deliveries = count,
                "sink no longer configured: its pending deliveries were dropped"
            );
        }
        Ok(())
    }

    /// Waits for every dispatcher until `deadline`, then aborts the rest; false if any was
    /// still delivering.
    /// Waits for every dispatcher until `deadline`; the names of the sinks whose deliveries
    /// were still in flight then (their tasks are aborted).
    async fn join_all(&mut self, deadline: tokio::time::Instant) -> Vec<String> {
        let mut in_flight = Vec::new();
        for (name, sink) in std::mem::take(&mut self.running) {
            let mut task = sink.task;
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(sink = %name, error = %e, "dispatcher task failed"),
                Err(_) => {
                    task.abort();
                    in_flight.push(name);
                }
            }
        }
        in_flight
    }
}

/// SIGHUP: re-reads the config file. Sinks and routes change in place (a changed sink's
/// in-flight batch finishes on the old one first); anything else needs a restart and is named
/// in the log; an invalid file is logged and the running config kept.
async fn reload_config(running: &mut Config, dispatchers: &mut Dispatchers, routes: &SharedRoutes) {
    let path = running.source.clone();
    tracing::info!(config = %path.display(), "reloading the configuration");
    let reloaded = match tokio::task::spawn_blocking(move || crate::config::load(&path)).await {
        Ok(Ok(config)) => config,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "configuration reload rejected: keeping the running configuration");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "configuration reload failed: keeping the running configuration");
            return;
        }
    };
    let restart = crate::config::changes_needing_restart(running, &reloaded);
    if !restart.is_empty() {
        tracing::warn!(
            keys = restart.join(", "),
            "these changes take effect only after a restart; the running values stay"
        );
    }
    let changes = crate::config::sink_changes(running, &reloaded);
    if changes.is_empty() {
        tracing::info!("configuration reloaded: sinks and routes unchanged");
        return;
    }
    // Build every new or changed sink first: one that cannot start rejects the whole reload.
    let mut built = Vec::new();
    for name in changes.added.iter().chain(&changes.changed) {
        let config = reloaded.sinks[name].clone();
        match crate::sinks::build(&config) {
            Ok(sink) => built.push((sink, config)),
            Err(e) => {
                tracing::error!(sink = %name, error = format!("{e:#}"), "configuration reload rejected: a sink cannot start; keeping the running configuration");
                return;
            }
        }
    }
    for name in changes.removed.iter().chain(&changes.changed) {
        dispatchers.stop(name).await;
    }
    running.sinks = reloaded.sinks;
    routes.replace(running);
    if let Err(e) = dispatchers.drop_unknown(running).await {
        tracing::error!(
            error = format!("{e:#}"),
            "cannot drop deliveries to removed sinks"
        );
    }
    for (sink, config) in built {
        dispatchers.start(sink, config);
    }
    dispatchers.wakers.wake_sinks();
    tracing::info!(
        added = changes.added.join(", "),
        removed = changes.removed.join(", "),
        changed = changes.changed.join(", "),
        "configuration reloaded: sinks and routes updated"
    );
}

/// The retention job: on `journal.prune_schedule`, deletes events settled longer than
/// `retention` ago (dead ones are kept for `dead list`).
async fn prune_on_schedule(
    journal: Journal,
    retention: Duration,
    trigger: Arc<poller::Trigger>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = trigger.wait() => {}
            _ = shutdown.cancelled() => return,
        }
        // Saturating: a retention longer than the calendar prunes nothing.
        let cutoff = chrono::Duration::from_std(retention)
            .ok()
            .and_then(|age| chrono::Utc::now().checked_sub_signed(age))
            .unwrap_or(chrono::DateTime::<chrono::Utc>::UNIX_EPOCH);
        match journal.prune(cutoff, false).await {
            Ok(pruned) => tracing::info!(
                events = pruned.events,
                batches = pruned.batches,
                kept_in_error_lane = pruned.kept_in_error_lane,
                retention = %humantime::format_duration(retention),
                "pruned settled events past retention"
            ),
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "prune failed; trying again at the next scheduled time"
            ),
        }
    }
}
