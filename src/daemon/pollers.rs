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

#[cfg(test)]
mod tests {
    use super::*;

    fn pollers(portals: usize) -> Pollers {
        Pollers {
            tasks: JoinSet::new(),
            settlers: Vec::new(),
            refused: Vec::new(),
            portals,
        }
    }

    fn refused(portal: &str) -> Result<Option<Option<ConfigMismatch>>, JoinError> {
        Ok(Some(Some(ConfigMismatch {
            portal: portal.to_string(),
            message: format!("{portal}: WRONG_LICENSE"),
        })))
    }

    #[test]
    fn the_daemon_stops_only_once_every_portal_refused_its_mode_naming_the_first() {
        let mut pollers = pollers(2);
        pollers.ended(refused("b"));
        assert!(pollers.all_refused().is_none());
        // Finished at shutdown, or given up by the supervisor: not a refusal.
        pollers.ended(Ok(Some(None)));
        pollers.ended(Ok(None));
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

    #[tokio::test]
    async fn joining_no_pollers_ends_at_once_with_none_abandoned() {
        let mut pollers = pollers(0);
        assert_eq!(pollers.join(Instant::now()).await, None);
    }

    #[tokio::test]
    async fn a_poller_still_running_at_the_deadline_is_abandoned_and_counted() {
        let mut pollers = pollers(1);
        pollers
            .tasks
            .spawn(async { std::future::pending::<Option<Option<ConfigMismatch>>>().await });
        pollers.tasks.spawn(async { Some(None) });
        let deadline = Instant::now() + std::time::Duration::from_millis(50);
        assert_eq!(pollers.join(deadline).await, Some(1));
        let aborted = pollers
            .tasks
            .join_next()
            .await
            .expect("the abandoned poller");
        assert!(aborted.expect_err("aborted").is_cancelled());
    }
}
