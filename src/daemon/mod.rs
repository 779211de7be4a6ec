//! The composition root: `b24eventd run` starts everything here, runs until shutdown, reloads on
//! SIGHUP and drains within a bounded time.
//!
//! **Start order.** [`serve`] (the `run` command) checks the journal path, takes the daemon lock
//! (held until the process exits), opens the journal and installs the signal handlers; then
//! [`run_with`] (which the demo and the tests call directly) starts, in this order:
//!
//! 1. every configured sink is built (a sink that cannot start stops the start, named), and the
//!    routing table is made;
//! 2. one Bitrix24 client per portal, all on one HTTP client, each waiting out its portal's
//!    limits for up to 15 minutes;
//! 3. the metrics, the supervisor every task runs under, and the liveness record;
//! 4. the admin endpoint, bound before anything polls (a bind failure stops the start);
//! 5. the dispatchers, one per sink, after the pending deliveries to sinks no longer
//!    configured were dropped (so their events can settle);
//! 6. what the last conformance probe found (a portal refused there stops the start, exit 78),
//!    the cron schedules, and one poller per portal;
//! 7. the helpers: the prune job, the alerts, the systemd notifier and the clock watch.
//!
//! Every task from 4 on runs under [`Supervisor::supervise`] (restarted when it dies; the fifth
//! death within 10 minutes stops the daemon as at a signal and `run_with` returns
//! [`crate::supervisor::GaveUp`], exit 70).
//!
//! **Running.** Until the shutdown token is cancelled (SIGTERM/SIGINT) the daemon reloads on
//! request, plans the cron jobs again after the wall clock was set back, and stops by itself
//! when a task keeps dying or when every portal refused its configured mode (a `ConfigError`
//! naming `portals.<name>.mode`, exit 78).
//!
//! **Reload** (SIGHUP, `reload.rs`). The configuration file is read again; only the routing
//! table and the dispatcher set are swapped. A changed or removed sink's dispatcher is stopped
//! and awaited (its in-flight batch is journaled) before a new one starts, so two dispatchers
//! never hold the same delivery; a new sink that cannot be built rejects the whole reload; keys
//! that need a restart are named in the log. Portals stopped by an error an operator had to fix
//! try again at once.
//!
//! **Shutdown** (the drain). Every phase is bounded, and the log says what it waited for:
//!
//! 1. the pollers stop fetching and finish their round; they and the deliveries share one
//!    deadline, `shutdown_timeout` after the stop began, past which a poller is aborted (what
//!    it reserved is resumed at the next start);
//! 2. the clock watch, the prune job and the alerts are aborted; the cron scheduler and the
//!    systemd notifier get `AUX_STOP` (2 s) between them;
//! 3. the dispatchers finish the batch in hand until the deadline, then are aborted (those
//!    deliveries are retried at the next start);
//! 4. every portal sends its due settle calls, within what is left plus `STOP_TAIL`, less
//!    `AUX_STOP`; clustered, the leases are then released and the instance retired;
//! 5. the admin endpoint stops, by `shutdown_timeout` + `STOP_TAIL` at the latest.
//!
//! The process thus ends within `shutdown_timeout` + `STOP_TAIL` whatever is in flight. Steps 4
//! and 5 first ask the journal a trivial query: when it gives no answer within `JOURNAL_CHECK`
//! (a blackholed route, a server down), nothing of step 4 could be recorded, so it is skipped
//! (the due settle calls are sent at the next start, the leases expire by themselves) and the
//! admin endpoint gets `AUX_STOP`: the stop then ends within `shutdown_timeout` + `AUX_STOP` +
//! `JOURNAL_CHECK` + `AUX_STOP` (6 s; about 2 s in practice, the helpers stop at once).

mod dispatchers;
mod pollers;
mod reload;
mod tasks;

use crate::admin::AdminState;
use crate::bitrix::PortalClient;
use crate::cluster::lease_task::{LeaseSettings, LeaseTask};
use crate::config::Config;
use crate::journal::{InstanceIdentity, Journal};
use crate::metrics::Metrics;
use crate::pipeline::liveness::Liveness;
use crate::pipeline::poller::{Schedules, Shared};
use crate::pipeline::{SharedRoutes, Wakers};
use crate::sinks::Sink;
use crate::supervisor::{GaveUp, Supervisor};
use crate::systemd::Notifier;
use anyhow::Context;
use dispatchers::Dispatchers;
use pollers::Pollers;
use std::sync::Arc;
use std::time::Duration;
use tasks::{AUX_STOP, AdminEndpoint, HelperInputs, Helpers};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a stop may go on after `shutdown_timeout`: the due settle calls, then the cron
/// scheduler and the admin endpoint.
const STOP_TAIL: Duration = Duration::from_secs(10);
/// How long the stop waits for the journal to answer a trivial query before the final settle
/// and the lease release, which are skipped when it does not (see [`journal_answers`]).
const JOURNAL_CHECK: Duration = Duration::from_secs(2);
/// How long the daemon's clients wait out a portal's rate and operating limits.
const DAEMON_LIMIT_WAIT: Duration = Duration::from_secs(15 * 60);

/// `b24eventd run`: takes the daemon lock, opens the journal, installs the signal handlers
/// (SIGTERM/SIGINT stop, SIGHUP reloads) and runs until a signal, with systemd notifications.
pub(crate) async fn serve(config: Config) -> anyhow::Result<()> {
    raise_open_file_limit(config.portals.len());
    // Held until the daemon exits: a second `run` or a conformance probe on this journal is
    // refused while it lives. Nothing, not even the lock file, is made beside a path that is
    // not a journal of ours.
    let (journal, _lock) =
        Journal::open_for_daemon(&config.journal, crate::journal::Access::Create).await?;
    let shutdown = CancellationToken::new();
    let reload = Arc::new(Notify::new());
    crate::shutdown::watch_signals(shutdown.clone(), Some(reload.clone()))
        .context("cannot install signal handlers")?;
    let controls = Controls {
        reload: Some(reload),
        notifier: Notifier::from_env(),
    };
    run_with(config, journal, shutdown, controls, |_| {}).await
}

/// Raises the soft limit on open descriptors to the hard one: the daemon keeps about one
/// connection per portal (each portal is its own host), so 1,000 portals already pass the
/// usual soft default of 1,024 (the bench's 3,333 portals per instance held about 3,300),
/// while the hard limit is usually far higher. The packaged unit sets `LimitNOFILE=65536`;
/// this covers a daemon started from a shell. A failure is only logged.
fn raise_open_file_limit(portals: usize) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (Some(soft), hard) = (limit.current, limit.maximum) else {
        return; // unlimited already
    };
    let wanted = hard.unwrap_or(u64::MAX);
    if wanted <= soft {
        return;
    }
    let raised = Rlimit {
        current: hard,
        maximum: hard,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => {
            tracing::debug!(from = soft, to = ?hard, "open-file limit raised to the hard limit")
        }
        Err(error) => {
            tracing::warn!(soft, ?hard, portals, %error, "cannot raise the open-file limit; about one descriptor per portal is needed")
        }
    }
}

/// A running daemon's handles, for callers that want to look inside (the tests that scrape
/// the admin endpoint).
pub struct Running {
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

/// What the daemon (as opposed to a test or the demo) adds to a run.
#[derive(Default)]
pub struct Controls {
    /// Notified on SIGHUP: re-read the config file.
    pub reload: Option<Arc<Notify>>,
    /// systemd notifications (a no-op outside systemd).
    pub notifier: Notifier,
}

/// [`run`], with the daemon's [`Controls`], calling `started` once every task is up.
pub async fn run_with(
    config: Config,
    journal: Journal,
    shutdown: CancellationToken,
    controls: Controls,
    started: impl FnOnce(&Running),
) -> anyhow::Result<()> {
    let (mut daemon, running) = Daemon::start(config, journal.clone(), shutdown, controls).await?;
    started(&running);
    tracing::info!(
        portals = daemon.config.portals.len(),
        sinks = daemon.config.sinks.len(),
        journal = %journal.location(),
        "b24eventd running"
    );
    let gave_up = daemon.run_until_stopped().await;
    daemon.drain(gave_up).await
}

/// Everything a started daemon runs, until its drain.
struct Daemon {
    /// The running configuration (a reload swaps its sinks).
    config: Config,
    journal: Journal,
    shutdown: CancellationToken,
    reload: Arc<Notify>,
    notifier: Notifier,
    supervisor: Supervisor,
    metrics: Metrics,
    routes: SharedRoutes,
    dispatchers: Dispatchers,
    scheduler: Schedules,
    pollers: Pollers,
    /// Several instances share the journal: the leases of the portals this one works.
    lease_task: Option<LeaseTask>,
    helpers: Helpers,
    admin: AdminEndpoint,
}

impl Daemon {
    /// Starts everything, in the order the module documentation gives.
    async fn start(
        config: Config,
        journal: Journal,
        shutdown: CancellationToken,
        controls: Controls,
    ) -> anyhow::Result<(Daemon, Running)> {
        let Controls { reload, notifier } = controls;
        let wakers = Arc::new(Wakers::new(config.portals.keys()));
        let sinks = build_sinks(&config)?;
        let routes = SharedRoutes::new(&config);
        let clients = portal_clients(&config, &journal).await?;
        let metrics = Metrics::new(clients.clone());
        let supervisor = Supervisor::new(metrics.clone());
        let liveness = Liveness::new(config.portals.keys());
        let admin_state = AdminState {
            metrics: metrics.clone(),
            liveness: liveness.clone(),
            journal: journal.clone(),
            portals: config.portals.keys().cloned().collect(),
            tasks: supervisor.clone(),
        };
        let admin = AdminEndpoint::start(config.admin.listen, admin_state, &supervisor).await?;
        let mut dispatchers = Dispatchers::new(
            journal.clone(),
            wakers.clone(),
            metrics.clone(),
            supervisor.clone(),
        );
        dispatchers.drop_unknown(&config).await?;
        for (sink, sink_config) in sinks {
            dispatchers.start(sink, sink_config);
        }
        // What the last conformance probe found: adapt, or refuse a portal (exit 78) before
        // anything polls.
        let conformance = crate::conformance::for_daemon(&config, &journal).await?;
        let scheduler = Schedules::start(&config).await?;
        let shared = Shared {
            journal: journal.clone(),
            routes: routes.clone(),
            wakers,
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
        };
        let pollers = Pollers::new(
            &config,
            &clients,
            shared,
            &scheduler,
            &liveness,
            conformance,
            &supervisor,
        );
        // PostgreSQL: the portals this instance works come and go with their leases.
        // SQLite: this daemon works them all.
        let identity = InstanceIdentity::this_process();
        let lease_task = match journal.join_cluster(&identity, config.journal.lease_ttl) {
            Some(cluster) => {
                tracing::info!(instance = %identity.id, lease_ttl = ?config.journal.lease_ttl, "sharing the portals with the other instances of this journal");
                Some(LeaseTask::start(
                    LeaseSettings {
                        me: identity,
                        cluster,
                        portals: config.portals.keys().cloned().collect(),
                        ttl: config.journal.lease_ttl,
                    },
                    pollers.work(),
                    metrics.clone(),
                    shutdown.clone(),
                ))
            }
            None => {
                pollers.start_all();
                None
            }
        };
        let helpers = Helpers::start(
            HelperInputs {
                config: &config,
                journal: &journal,
                liveness: &liveness,
                sinks: dispatchers.directory(),
                notifier: &notifier,
                prune_trigger: scheduler.prune_trigger(),
            },
            &supervisor,
            &shutdown,
        );
        let running = Running {
            admin_addr: admin.addr(),
        };
        let daemon = Daemon {
            config,
            journal: journal.clone(),
            shutdown,
            reload: reload.unwrap_or_default(),
            notifier,
            supervisor,
            metrics,
            routes,
            dispatchers,
            scheduler,
            pollers,
            lease_task,
            helpers,
            admin,
        };
        Ok((daemon, running))
    }

    /// Until shutdown: reloads on request, replans the cron jobs after the clock was set back,
    /// and stops when a task keeps dying (returned) or every portal refused its mode.
    async fn run_until_stopped(&mut self) -> Option<GaveUp> {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                given_up = self.supervisor.gave_up() => {
                    tracing::error!(error = %given_up, "stopping: a task keeps dying");
                    self.shutdown.cancel();
                    return Some(given_up);
                }
                _ = self.reload.notified() => {
                    self.notifier.reloading();
                    reload::reload_config(&mut self.config, &mut self.dispatchers, &self.routes)
                        .await;
                    self.scheduler.resume_stopped();
                    self.notifier.ready();
                }
                Some(seconds) = self.helpers.clock_steps.recv() => {
                    self.metrics.clock_step(seconds);
                    if seconds < 0.0 {
                        self.scheduler.replan().await;
                    }
                }
                Some(done) = self.pollers.next_ended() => {
                    self.pollers.ended(done);
                    if self.pollers.all_refused().is_some() {
                        tracing::error!("every portal refused its configured mode: stopping");
                        self.shutdown.cancel();
                    }
                }
            }
        }
    }

    /// The bounded stop (see the module documentation), then how the run ended.
    async fn drain(mut self, gave_up: Option<GaveUp>) -> anyhow::Result<()> {
        let timeout = self.config.shutdown_timeout;
        let stop_started = Instant::now();
        let deadline = stop_started + timeout;
        let end = deadline + STOP_TAIL;
        tracing::info!(timeout = ?timeout, "stopping: no new fetches; letting in-flight deliveries finish");
        self.notifier.stopping();
        if let Some(portals) = self.pollers.join(deadline).await {
            tracing::warn!(portals, timeout = ?timeout, "shutdown deadline reached with portal calls in flight: abandoned; what they reserved is resumed on the next start");
        }
        let pollers_took = stop_started.elapsed();
        self.helpers.stop(self.scheduler).await;

        let in_flight = self.dispatchers.drain(deadline).await;
        if !in_flight.is_empty() {
            tracing::warn!(
                sinks = %in_flight.join(","),
                timeout = ?timeout,
                "shutdown deadline reached with deliveries in flight: they will be retried on the next start"
            );
        }
        let deliveries_took = stop_started.elapsed().saturating_sub(pollers_took);
        let settle_started = Instant::now();
        if journal_answers(&self.journal).await {
            let settle_by = end.checked_sub(AUX_STOP).unwrap_or(end);
            if tokio::time::timeout_at(settle_by, self.pollers.settle_all())
                .await
                .is_err()
            {
                tracing::warn!(
                    "shutdown deadline reached while settling: pending settle calls are resent on the next start"
                );
            }
            if let Some(lease_task) = self.lease_task.take() {
                // Every portal's work has stopped: hand the portals over at once.
                lease_task.leave(end).await;
            }
            self.admin.stop(end).await;
        } else {
            // Each settle call and the lease release would wait the journal's operation
            // deadline for nothing: none of them can be recorded.
            tracing::warn!(
                journal = %self.journal.location(),
                waited = ?JOURNAL_CHECK,
                "stopping without the final settle and the lease release: the journal does not answer; the due settle calls are sent at the next start and the leases expire by themselves"
            );
            // Dropped: its task is aborted, its leases run out (the others take the portals
            // then).
            self.lease_task.take();
            self.admin.stop(end.min(Instant::now() + AUX_STOP)).await;
        }
        let settle_took = settle_started.elapsed();
        tracing::info!(
            took = ?stop_started.elapsed(),
            pollers = ?pollers_took,
            deliveries = ?deliveries_took,
            settle = ?settle_took,
            "stop waited for: the pollers' last round, the deliveries in flight, the due settle calls"
        );
        tracing::info!("b24eventd stopped");
        if let Some(gave_up) = gave_up.or_else(|| self.supervisor.given_up()) {
            return Err(gave_up.into());
        }
        if let Some(first) = self.pollers.all_refused() {
            return Err(crate::config::ConfigError::new(
                self.config.source.display().to_string(),
                format!("portals.{}.mode", first.portal),
                first.message.clone(),
            )
            .into());
        }
        Ok(())
    }
}

/// Whether the journal answers a trivial query within [`JOURNAL_CHECK`]. The final settle and
/// the lease release need it: against a journal that does not answer (a blackholed route, a
/// server down) each of their statements would wait for the journal's operation deadline (10 s
/// at least), and the stop would run to the end of its tail for nothing.
async fn journal_answers(journal: &Journal) -> bool {
    matches!(
        tokio::time::timeout(JOURNAL_CHECK, journal.ping()).await,
        Ok(Ok(()))
    )
}

/// Every configured sink, built (build errors name the sink: "sink erp: ...").
fn build_sinks(config: &Config) -> anyhow::Result<Vec<(Arc<dyn Sink>, crate::config::SinkConfig)>> {
    config
        .sinks
        .values()
        .map(|sink_config| Ok((crate::sinks::build(sink_config)?, sink_config.clone())))
        .collect()
}

/// One client per portal on one HTTP client (connection pool, TLS configuration): a daemon
/// serving a thousand portals must not hold a thousand of each.
async fn portal_clients(config: &Config, journal: &Journal) -> anyhow::Result<Vec<PortalClient>> {
    let http = crate::bitrix::client::http_client()?;
    let mut clients = Vec::new();
    for portal in config.portals.values() {
        clients.push(
            crate::pipeline::client_with_limit_wait(
                portal,
                journal,
                DAEMON_LIMIT_WAIT,
                http.clone(),
            )
            .await?,
        );
    }
    Ok(clients)
}
