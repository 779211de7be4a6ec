//! The poller of every portal: started under supervision, their ends collected (a portal that
//! refused its mode), stopped within the shared deadline, and their final settle.

use crate::bitrix::PortalClient;
use crate::config::Config;
use crate::conformance::PortalConformance;
use crate::pipeline::liveness::Liveness;
use crate::pipeline::poller::{ConfigMismatch, Poller, Schedules, Settler, Shared};
use crate::supervisor::Supervisor;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;

/// The running pollers and what the daemon keeps of them.
pub(super) struct Pollers {
    tasks: JoinSet<Option<Option<ConfigMismatch>>>,
    /// Each portal's settler, for the final settle at shutdown.
    settlers: Vec<Settler>,
    /// The portals that refused their configured mode.
    refused: Vec<ConfigMismatch>,
    portals: usize,
}

impl Pollers {
    /// One supervised poller per portal, with its client, its schedules' triggers and what
    /// the last conformance probe found.
    pub(super) fn start(
        config: &Config,
        clients: &[PortalClient],
        shared: Shared,
        scheduler: &Schedules,
        liveness: &Arc<Liveness>,
        mut conformance: BTreeMap<String, PortalConformance>,
        supervisor: &Supervisor,
    ) -> Pollers {
        let mut tasks = JoinSet::new();
        let mut settlers = Vec::new();
        for (portal, client) in config.portals.values().zip(clients.iter()) {
            let poller = Poller::new(
                portal.clone(),
                client.clone(),
                shared.clone(),
                scheduler.triggers(&portal.name),
                liveness.handle(&portal.name),
                conformance.remove(&portal.name).unwrap_or_default(),
            );
            settlers.push(poller.settler());
            // A restarted poller starts as at a daemon start: it re-reads its open reservations
            // and sweeps for orphans, so the round that died loses nothing.
            tasks.spawn(supervisor.supervise(
                format!("poller/{}", portal.name),
                shared.shutdown.clone(),
                move || {
                    let poller = poller.clone();
                    async move { Ok(poller.run().await) }
                },
            ));
        }
        Pollers {
            tasks,
            settlers,
            refused: Vec::new(),
            portals: config.portals.len(),
        }
    }

    /// Waits for the next poller to end (pending forever while none runs).
    pub(super) async fn next_ended(
        &mut self,
    ) -> Option<Result<Option<Option<ConfigMismatch>>, JoinError>> {
        if self.tasks.is_empty() {
            return std::future::pending().await;
        }
        self.tasks.join_next().await
    }

    /// Notes how a poller ended.
    pub(super) fn ended(&mut self, done: Result<Option<Option<ConfigMismatch>>, JoinError>) {
        match done {
            Ok(Some(Some(mismatch))) => self.refused.push(mismatch),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "poller task failed"),
        }
    }

    /// Every portal refused its configured mode (the first refusal), when there are portals.
    pub(super) fn all_refused(&self) -> Option<&ConfigMismatch> {
        (self.portals > 0 && self.refused.len() == self.portals).then(|| &self.refused[0])
    }

    /// Waits for every poller's last round until `deadline`; how many were still calling
    /// their portal then (aborted), if any.
    pub(super) async fn join(&mut self, deadline: Instant) -> Option<usize> {
        let stopped = tokio::time::timeout_at(deadline, async {
            while let Some(done) = self.tasks.join_next().await {
                self.ended(done);
            }
        })
        .await
        .is_ok();
        if stopped {
            return None;
        }
        let abandoned = self.tasks.len();
        self.tasks.abort_all();
        Some(abandoned)
    }

    /// Sends every portal's due settle calls (the final settle), logging failures.
    pub(super) async fn settle_all(&self) {
        for settler in &self.settlers {
            settler.settle_all().await;
        }
    }
}
