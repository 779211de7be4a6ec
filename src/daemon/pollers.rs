//! The poller of every portal this instance works: started under supervision (all of them at
//! start alone, or as the lease task takes and gives up portals in a cluster, each with its own
//! cancellation token, a child of the shutdown token), their ends collected (a portal that
//! refused its mode), stopped within the shared deadline, and their final settle.

use crate::BoxFuture;
use crate::bitrix::PortalClient;
use crate::cluster::lease_task::PortalWork;
use crate::config::{Config, PortalConfig};
use crate::conformance::PortalConformance;
use crate::pipeline::lease_clock::LeaseClock;
use crate::pipeline::liveness::{Liveness, LoopHandle};
use crate::pipeline::poller::{ConfigMismatch, Poller, Schedules, Settler, Shared, Triggers};
use crate::supervisor::Supervisor;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How a poller ended: `None` when the supervisor gave up on it, `Some(Some(_))` when its
/// portal refused the configured mode.
type Ended = Option<Option<ConfigMismatch>>;

/// The running pollers and what the daemon keeps of them.
pub(super) struct Pollers {
    work: Arc<PortalPollers>,
    ended: UnboundedReceiver<Ended>,
    refusals: Refusals,
}

/// The portals that refused their configured mode, out of how many.
struct Refusals {
    refused: Vec<ConfigMismatch>,
    portals: usize,
}

impl Refusals {
    /// Notes how a poller ended.
    fn ended(&mut self, done: Ended) {
        if let Some(Some(mismatch)) = done {
            self.refused.push(mismatch);
        }
    }

    /// Every portal refused its configured mode (the first refusal), when there are portals.
    fn all_refused(&self) -> Option<&ConfigMismatch> {
        (self.portals > 0 && self.refused.len() == self.portals).then(|| &self.refused[0])
    }
}

/// What a portal's poller is made of, kept to start it again when its lease comes back.
struct Parts {
    config: PortalConfig,
    client: PortalClient,
    triggers: Triggers,
    liveness: LoopHandle,
    conformance: PortalConformance,
}

struct RunningPoller {
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
    settler: Settler,
}

/// The pollers as the lease task starts and stops them ([`PortalWork`]).
pub(super) struct PortalPollers {
    parts: BTreeMap<String, Parts>,
    running: Mutex<BTreeMap<String, RunningPoller>>,
    shared: Shared,
    supervisor: Supervisor,
    ended: UnboundedSender<Ended>,
}

impl Pollers {
    /// Every portal's poller ready to start, with its client, its schedules' triggers and
    /// what the last conformance probe found; none runs yet (see [`Pollers::start_all`]).
    pub(super) fn new(
        config: &Config,
        clients: &[PortalClient],
        shared: Shared,
        scheduler: &Schedules,
        liveness: &Arc<Liveness>,
        mut conformance: BTreeMap<String, PortalConformance>,
        supervisor: &Supervisor,
    ) -> Pollers {
        let parts = config
            .portals
            .values()
            .zip(clients.iter())
            .map(|(portal, client)| {
                (
                    portal.name.clone(),
                    Parts {
                        config: portal.clone(),
                        client: client.clone(),
                        triggers: scheduler.triggers(&portal.name),
                        liveness: liveness.handle(&portal.name),
                        conformance: conformance.remove(&portal.name).unwrap_or_default(),
                    },
                )
            })
            .collect();
        let (ended_tx, ended) = unbounded_channel();
        Pollers {
            work: Arc::new(PortalPollers {
                parts,
                running: Mutex::new(BTreeMap::new()),
                shared,
                supervisor: supervisor.clone(),
                ended: ended_tx,
            }),
            ended,
            refusals: Refusals {
                refused: Vec::new(),
                portals: config.portals.len(),
            },
        }
    }

    /// Starts every portal's poller, with no lease limit: this daemon has the journal to
    /// itself.
    pub(super) fn start_all(&self) {
        for portal in self.work.parts.keys() {
            self.work.start(portal, LeaseClock::unlimited());
        }
    }

    /// The pollers, for the lease task to start and stop.
    pub(super) fn work(&self) -> Arc<PortalPollers> {
        self.work.clone()
    }

    /// Waits for the next poller to end (pending forever while none runs).
    pub(super) async fn next_ended(&mut self) -> Option<Ended> {
        self.ended.recv().await
    }

    /// Notes how a poller ended.
    pub(super) fn ended(&mut self, done: Ended) {
        self.refusals.ended(done);
    }

    /// Every portal refused its configured mode (the first refusal), when there are portals.
    pub(super) fn all_refused(&self) -> Option<&ConfigMismatch> {
        self.refusals.all_refused()
    }

    /// Waits for every poller's last round until `deadline`; how many were still calling
    /// their portal then (aborted), if any.
    pub(super) async fn join(&mut self, deadline: Instant) -> Option<usize> {
        let tasks: Vec<JoinHandle<()>> = self
            .work
            .running()
            .values_mut()
            .filter_map(|r| {
                r.stop.cancel();
                r.task.take()
            })
            .collect();
        let mut abandoned = 0;
        for mut task in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                abandoned += 1;
            }
        }
        while let Ok(done) = self.ended.try_recv() {
            self.ended(done);
        }
        (abandoned > 0).then_some(abandoned)
    }

    /// Sends the due settle calls of every portal still worked (the final settle), logging
    /// failures.
    pub(super) async fn settle_all(&self) {
        let settlers: Vec<Settler> = self
            .work
            .running()
            .values()
            .map(|r| r.settler.clone())
            .collect();
        for settler in settlers {
            settler.settle_all().await;
        }
    }
}

impl PortalPollers {
    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, RunningPoller>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl PortalWork for PortalPollers {
    fn start(&self, portal: &str, clock: LeaseClock) {
        let Some(parts) = self.parts.get(portal) else {
            return;
        };
        let stop = self.shared.shutdown.child_token();
        let shared = Shared {
            shutdown: stop.clone(),
            ..self.shared.clone()
        };
        let poller = Poller::new(
            parts.config.clone(),
            parts.client.clone(),
            shared,
            parts.triggers.clone(),
            parts.liveness.clone(),
            parts.conformance.clone(),
            clock,
        );
        let settler = poller.settler();
        // A restarted poller starts as at a daemon start: it re-reads its open reservations
        // and sweeps for orphans, so the round that died loses nothing. So does a poller
        // started when its lease comes (back) to this instance.
        let run = self
            .supervisor
            .supervise(format!("poller/{portal}"), stop.clone(), move || {
                let poller = poller.clone();
                async move { Ok(poller.run().await) }
            });
        let ended = self.ended.clone();
        let task = tokio::spawn(async move {
            let _ = ended.send(run.await);
        });
        let previous = self.running().insert(
            portal.to_string(),
            RunningPoller {
                stop,
                task: Some(task),
                settler,
            },
        );
        if let Some(previous) = previous {
            previous.stop.cancel();
        }
    }

    fn stop<'a>(&'a self, portal: &'a str, within: Duration) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(running) = self.running().remove(portal) else {
                return;
            };
            running.stop.cancel();
            if let Some(mut task) = running.task
                && tokio::time::timeout(within, &mut task).await.is_err()
            {
                task.abort();
                tracing::warn!(%portal, "portal work did not stop in time: abandoned; its next owner resumes what it reserved");
            }
            // The settle calls run only while the lease clock allows them.
            if tokio::time::timeout(within, running.settler.settle_all())
                .await
                .is_err()
            {
                tracing::warn!(%portal, "final settle did not finish in time: the next owner sends it");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pollers(portals: usize) -> Refusals {
        Refusals {
            refused: Vec::new(),
            portals,
        }
    }

    fn refused(portal: &str) -> Ended {
        Some(Some(ConfigMismatch {
            portal: portal.to_string(),
            message: format!("{portal}: WRONG_LICENSE"),
        }))
    }

    #[test]
    fn the_daemon_stops_only_once_every_portal_refused_its_mode_naming_the_first() {
        let mut pollers = pollers(2);
        pollers.ended(refused("b"));
        assert!(pollers.all_refused().is_none());
        // Finished at shutdown, or given up by the supervisor: not a refusal.
        pollers.ended(Some(None));
        pollers.ended(None);
        assert!(pollers.all_refused().is_none());
        pollers.ended(refused("a"));
        let first = pollers.all_refused().expect("every portal refused");
        assert_eq!(first.portal, "b");
        assert_eq!(first.message, "b: WRONG_LICENSE");
    }

    #[test]
    fn a_daemon_without_portals_never_counts_as_all_refused() {
        assert!(pollers(0).all_refused().is_none());
    }
}
