//! The daemon's supervised helper tasks: the admin endpoint, the prune job, the alerts, the
//! systemd notifier and the clock watch; how each starts and how each is stopped.

use crate::admin::{AdminServer, AdminState};
use crate::config::Config;
use crate::journal::Journal;
use crate::pipeline::clock;
use crate::pipeline::liveness::{self, Liveness};
use crate::pipeline::poller::{Schedules, Trigger};
use crate::supervisor::Supervisor;
use futures_util::FutureExt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

/// How long the cron scheduler and the systemd notifier get to stop, together (part of the
/// bounds).
pub(super) const AUX_STOP: Duration = Duration::from_secs(2);

/// The admin endpoint, bound before the pollers start (a bind failure stops the start) and
/// restarted on its address should its task die.
pub(super) struct AdminEndpoint {
    addr: Option<SocketAddr>,
    /// Cancelled after the final settle.
    stop: CancellationToken,
    task: Option<JoinHandle<Option<()>>>,
    /// An early return (a refused start) stops the endpoint too, as dropping it did.
    _stopped_on_return: DropGuard,
}

impl AdminEndpoint {
    /// Binds `listen` (when `admin.listen` is set) and serves it under `supervisor`.
    pub(super) async fn start(
        listen: Option<SocketAddr>,
        state: AdminState,
        supervisor: &Supervisor,
    ) -> anyhow::Result<AdminEndpoint> {
        let server = match listen {
            Some(listen) => Some(AdminServer::start(listen, state.clone()).await?),
            None => None,
        };
        let addr = server.as_ref().map(AdminServer::local_addr);
        let stop = CancellationToken::new();
        let _stopped_on_return = stop.clone().drop_guard();
        let task = server.map(|first| {
            let mut first = Some(first);
            let stop = stop.clone();
            tokio::spawn(supervisor.supervise("admin", stop.clone(), move || {
                let first = first.take();
                let state = state.clone();
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
        Ok(AdminEndpoint {
            addr,
            stop,
            task,
            _stopped_on_return,
        })
    }

    /// Where the endpoint listens (the bound port when `admin.listen` asked for `:0`).
    pub(super) fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// Stops the endpoint and waits for it until `end`.
    pub(super) async fn stop(self, end: Instant) {
        self.stop.cancel();
        if let Some(task) = self.task
            && tokio::time::timeout_at(end, task).await.is_err()
        {
            tracing::warn!("the admin endpoint did not stop in time: abandoned");
        }
    }
}

/// The prune job, the alerts, the systemd notifier and the clock watch, each supervised and
/// stopped by `shutdown`.
pub(super) struct Helpers {
    pruner: JoinHandle<Option<()>>,
    alerts: Option<JoinHandle<Option<()>>>,
    systemd: JoinHandle<Option<()>>,
    clock_watch: JoinHandle<Option<()>>,
    /// The wall clock's steps, in seconds (negative: set back), as the clock watch saw them.
    pub(super) clock_steps: UnboundedReceiver<f64>,
}

/// What the helper tasks read.
pub(super) struct HelperInputs<'a> {
    pub(super) config: &'a Config,
    pub(super) journal: &'a Journal,
    pub(super) liveness: &'a Arc<Liveness>,
    pub(super) sinks: crate::alerts::SinkDirectory,
    pub(super) notifier: &'a crate::systemd::Notifier,
    pub(super) prune_trigger: Arc<Trigger>,
}

impl Helpers {
    pub(super) fn start(
        inputs: HelperInputs<'_>,
        supervisor: &Supervisor,
        shutdown: &CancellationToken,
    ) -> Helpers {
        let HelperInputs {
            config,
            journal,
            liveness,
            sinks,
            notifier,
            prune_trigger,
        } = inputs;
        let pruner = {
            let (journal, retention) = (journal.clone(), config.journal.retention);
            spawn_supervised(supervisor, "prune", shutdown, move |stop| {
                prune_on_schedule(journal.clone(), retention, prune_trigger.clone(), stop)
            })
        };
        let alerts = config.alerts.clone().map(|alerts| {
            let (journal, liveness) = (journal.clone(), liveness.clone());
            spawn_supervised(supervisor, "alerts", shutdown, move |stop| {
                let (alerts, journal) = (alerts.clone(), journal.clone());
                crate::alerts::run(alerts, journal, liveness.clone(), sinks.clone(), stop)
            })
        });
        let systemd = {
            let (notifier, liveness) = (notifier.clone(), liveness.clone());
            let (tasks, journal) = (supervisor.clone(), journal.clone());
            spawn_supervised(supervisor, "systemd", shutdown, move |stop| {
                let (notifier, liveness) = (notifier.clone(), liveness.clone());
                liveness::notify_systemd(notifier, liveness, tasks.clone(), journal.clone(), stop)
            })
        };
        let (steps_tx, clock_steps) = tokio::sync::mpsc::unbounded_channel();
        let clock_watch = spawn_supervised(supervisor, "clock", shutdown, move |stop| {
            let steps_tx = steps_tx.clone();
            clock::watch(stop, move |seconds| {
                let _ = steps_tx.send(seconds);
            })
        });
        Helpers {
            pruner,
            alerts,
            systemd,
            clock_watch,
            clock_steps,
        }
    }

    /// Aborts the clock watch, the prune job and the alerts, then gives the cron scheduler and
    /// the systemd notifier (its `STOPPING=1` sent) [`AUX_STOP`] to stop.
    pub(super) async fn stop(self, scheduler: Schedules) {
        self.clock_watch.abort();
        self.pruner.abort();
        if let Some(alerts) = self.alerts {
            alerts.abort();
        }
        let systemd = self.systemd;
        let helpers_stopped = tokio::time::timeout(AUX_STOP, async {
            scheduler.stop().await;
            let _ = systemd.await;
        })
        .await
        .is_ok();
        if !helpers_stopped {
            tracing::warn!(timeout = ?AUX_STOP, "the cron scheduler or the systemd notifier did not stop in time: abandoned");
        }
    }
}

/// Spawns the task `make` gives under `supervisor` (made again after a death), handing it
/// `shutdown`, at which it ends.
fn spawn_supervised<F, Fut>(
    supervisor: &Supervisor,
    name: &'static str,
    shutdown: &CancellationToken,
    mut make: F,
) -> JoinHandle<Option<()>>
where
    F: FnMut(CancellationToken) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let stop = shutdown.clone();
    tokio::spawn(supervisor.supervise(name, shutdown.clone(), move || make(stop.clone()).map(Ok)))
}

/// The retention job: on `journal.prune_schedule`, deletes events settled longer than
/// `retention` ago (dead ones are kept for `dead list`).
async fn prune_on_schedule(
    journal: Journal,
    retention: Duration,
    trigger: Arc<Trigger>,
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
