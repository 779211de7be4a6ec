//! The lease task of a clustered daemon. Every `lease_ttl / 3`:
//!
//! 1. **renew**: one heartbeat renews every lease this instance holds (one statement whatever
//!    their number); each renewed portal's [`LeaseClock`] runs until the instant the renewal
//!    was *sent* plus the time granted, less a margin (so never past the database's expiry);
//!    a portal the renewal no longer returns (taken by another instance) is lost: its work
//!    stops; a lease it returns that is not held here (an acquisition or renewal whose answer
//!    came after its deadline here) is released at once, or every heartbeat would renew it
//!    with nobody working the portal;
//! 2. **self-fence**: a portal whose clock ran out without renewal (the database unreachable,
//!    this process paused) stops its work by itself; the journal refuses its writes anyway
//!    (the fence), and its clock stopped its upstream calls before that. The task wakes when
//!    the first held clock runs out, if that comes before the next tick; the portals whose
//!    clock runs out while that work stops (nothing is renewed meanwhile) are fenced with it;
//! 3. **plan** (`super::plan`) on the live instances and the leases as the database sees them;
//! 4. **release** the portals above this instance's share: their work stops first (its last
//!    round and final settle done), then the lease is given up, so the next owner can start
//!    at once. The work stops in the background while the task goes on ticking and renewing
//!    every lease, theirs included: a release never holds up a renewal;
//! 5. **acquire** the share's missing portals: each is fenced under its new epoch, then its work
//!    starts; the orphan sweep waits for the grace (the former owner's calls are over by then).
//!
//! A renewal is sent a tick's interval after the previous one was (at once if a tick took
//! longer), so a slow tick does not eat into the leases' time. Every statement of steps 1, 3,
//! 4 and 5 is given up after a tick's interval, or when the
//! first held clock runs out if sooner: a journal that stopped answering (a blackholed route)
//! never keeps the task from self-fencing. The statements run on a journal connection of the
//! task's own, so a busy pipeline (every pooled connection taken, dozens of writes waiting)
//! never delays a renewal.
//!
//! At the daemon's stop the task keeps renewing (the drain still writes) until the daemon calls
//! [`LeaseTask::leave`]: every lease is then released and the instance retired, so the other
//! instances take the portals at once.
//!
//! Besides its period, the task ticks when it hears a lease change (`LISTEN`; the journal
//! `NOTIFY`s when an instance joins, releases portals or retires): released portals are taken,
//! and a new instance's share handed to it, within a tick's work rather than a third of the
//! TTL. A change missed while the listener reconnects is caught by the next periodic tick.

use super::plan::{self, LeaseSeen};
use crate::BoxFuture;
use crate::journal::{ClusterHandle, HeldLease, InstanceIdentity};
use crate::metrics::Metrics;
use crate::pipeline::lease_clock::LeaseClock;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Starts and stops the work on one portal (the daemon's pollers).
pub(crate) trait PortalWork: Send + Sync {
    /// Starts working `portal` for as long as `clock` allows.
    fn start(&self, portal: &str, clock: LeaseClock);
    /// Stops working `portal` and waits for its last round, then its final settle, each for
    /// `within` at most (what is abandoned is resumed by the next owner).
    fn stop<'a>(&'a self, portal: &'a str, within: Duration) -> BoxFuture<'a, ()>;
}

/// What the lease task needs.
pub(crate) struct LeaseSettings {
    pub(crate) me: InstanceIdentity,
    pub(crate) cluster: ClusterHandle,
    /// Every configured portal.
    pub(crate) portals: Vec<String>,
    pub(crate) ttl: Duration,
}

/// A held lease: its epoch and its clock.
struct Held {
    epoch: i64,
    clock: LeaseClock,
    /// Being released: its work is stopping (its last round and final settle, under the
    /// lease, which the heartbeats go on renewing); the lease is given up once it has.
    stopping: bool,
}

/// The running lease task.
pub(crate) struct LeaseTask {
    leave: CancellationToken,
    /// Aborted when the task is dropped without [`LeaseTask::leave`] (a daemon start that
    /// failed half-way): its leases then expire.
    task: Option<JoinHandle<()>>,
}

impl Drop for LeaseTask {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl LeaseTask {
    /// Starts the task. After `shutdown` it only renews (nothing is taken or given up) until
    /// [`LeaseTask::leave`].
    pub(crate) fn start(
        settings: LeaseSettings,
        work: Arc<dyn PortalWork>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> LeaseTask {
        let leave = CancellationToken::new();
        let (stopped, mut stopped_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut state = State {
            margin: settings.ttl / 10,
            grace: settings.ttl / 3,
            settings,
            work,
            metrics,
            held: BTreeMap::new(),
            renewal_sent: None,
            stopped,
        };
        let task = {
            let leave = leave.clone();
            tokio::spawn(async move {
                let every = state.settings.ttl / 3;
                let changes = state.settings.cluster.leases.changes();
                loop {
                    state.tick(!shutdown.is_cancelled()).await;
                    // A tick's interval after the last renewal was sent (at once if this tick
                    // took longer), or when the first held lease's clock runs out without a
                    // renewal, whichever comes first: its work stops then, not a tick later.
                    // Or at once when another instance joined, released portals or retired:
                    // a graceful stop's portals are taken now, a new instance gets its share
                    // now (a change heard during a tick is kept for after it). Or when the work
                    // of portals being released has stopped: their leases are given up now.
                    let wait = next_wait(every, state.since_renewal_sent(), state.earliest_left());
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = changes.notified() => {
                            tracing::debug!("lease change heard: planning again now");
                        }
                        Some(portals) = stopped_rx.recv() => state.release_stopped(portals).await,
                        _ = leave.cancelled() => break,
                    }
                }
                // Releases under way finish first: their work's final settle runs under the
                // lease (each stop is bounded).
                while state.held.values().any(|held| held.stopping) {
                    let Some(portals) = stopped_rx.recv().await else {
                        break;
                    };
                    state.release_stopped(portals).await;
                }
                state.leave().await;
            })
        };
        LeaseTask {
            leave,
            task: Some(task),
        }
    }

    /// Releases every lease and retires this instance (the daemon's work has stopped); waits
    /// until `deadline` at most.
    pub(crate) async fn leave(mut self, deadline: Instant) {
        self.leave.cancel();
        let Some(mut task) = self.task.take() else {
            return;
        };
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            task.abort();
            tracing::warn!(
                "releasing the portal leases did not finish in time: they expire by themselves"
            );
        }
    }
}

/// How long the lease task waits before its next tick: until a tick's interval has passed since
/// the last renewal was sent (`since_renewal_sent`; none at once if the tick took longer, so a
/// long tick does not eat the leases' time), less if a held lease's clock runs out sooner
/// (`earliest_left`).
fn next_wait(
    every: Duration,
    since_renewal_sent: Option<Duration>,
    earliest_left: Option<Duration>,
) -> Duration {
    let next = since_renewal_sent.map_or(every, |since| every.saturating_sub(since));
    earliest_left.map_or(next, |left| left.min(next))
}

/// How long one statement of the lease task may take: a tick's interval, less if a held
/// lease's clock runs out sooner.
fn statement_budget(every: Duration, earliest_left: Option<Duration>) -> Duration {
    earliest_left.map_or(every, |left| left.min(every))
}

/// The held portals to self-fence, given how long each one's clock runs yet (`lefts`): none
/// while every clock runs; once one has run out, every portal whose clock runs out within
/// `drop_bound` (the task is busy stopping work that long, and renews nothing).
fn fence_due<'a>(lefts: &BTreeMap<&'a String, Duration>, drop_bound: Duration) -> Vec<&'a String> {
    if !lefts.values().any(Duration::is_zero) {
        return Vec::new();
    }
    lefts
        .iter()
        .filter(|(_, left)| **left <= drop_bound)
        .map(|(portal, _)| *portal)
        .collect()
}

/// What a heartbeat's answer means for the leases held here (by epoch).
#[derive(Debug, Default, PartialEq)]
struct Renewal {
    /// Held and renewed under the same epoch: their clocks run on.
    renewed: Vec<(String, HeldLease)>,
    /// Held here but not renewed (taken by another instance, or under another epoch).
    lost: Vec<String>,
    /// Renewed in the journal but not held here: a lease whose acquisition or renewal got
    /// its answer too late (timed out here, committed there), or kept after this instance
    /// stopped its work (self-fenced while the lease still ran). Nobody works those portals and
    /// every heartbeat would renew them for ever: they are released at once.
    strays: Vec<String>,
}

fn sort_renewal(held: &BTreeMap<String, i64>, answer: &BTreeMap<String, HeldLease>) -> Renewal {
    let mut renewal = Renewal::default();
    for (portal, epoch) in held {
        match answer.get(portal) {
            Some(lease) if lease.epoch == *epoch => {
                renewal.renewed.push((portal.clone(), *lease));
            }
            _ => renewal.lost.push(portal.clone()),
        }
    }
    renewal.strays = answer
        .iter()
        .filter(|(portal, lease)| held.get(*portal) != Some(&lease.epoch))
        .map(|(portal, _)| portal.clone())
        .collect();
    renewal
}

/// Whether a process with this pid exists on this machine (`/proc`). A reused pid reads as
/// existing: the dead instance's leases then run out by themselves.
fn process_exists(pid: i32) -> bool {
    pid <= 0 || std::path::Path::new(&format!("/proc/{pid}")).exists()
}

struct State {
    settings: LeaseSettings,
    work: Arc<dyn PortalWork>,
    metrics: Metrics,
    held: BTreeMap<String, Held>,
    /// Taken off every lease's local deadline (clock rates differ a little).
    margin: Duration,
    /// How long a new owner waits before its first orphan sweep.
    grace: Duration,
    /// When the last renewal was sent (whether it went through or not).
    renewal_sent: Option<Instant>,
    /// Where a release's stopping work reports the portals whose work has stopped.
    stopped: tokio::sync::mpsc::UnboundedSender<Vec<String>>,
}

impl State {
    fn me(&self) -> &str {
        &self.settings.me.id
    }

    /// How long ago the last renewal was sent (`None`: never).
    fn since_renewal_sent(&self) -> Option<Duration> {
        self.renewal_sent.map(|sent| sent.elapsed())
    }

    /// How long the first held lease's clock runs yet (`None`: nothing held).
    fn earliest_left(&self) -> Option<Duration> {
        self.held.values().map(|held| held.clock.left()).min()
    }

    /// `call` (one statement on the journal) within a tick's interval, and never past the
    /// first held lease's clock: a journal that stopped answering (a blackholed network) must
    /// not keep the task from self-fencing, and an answer after that deadline is of no use.
    async fn within<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let budget = statement_budget(self.settings.ttl / 3, self.earliest_left());
        tokio::time::timeout(budget, call)
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "portal leases: the journal did not answer the {what} within {budget:?}"
                ))
            })
    }

    /// One round; `plan`: give up and take leases too (not after the daemon's stop began).
    async fn tick(&mut self, plan: bool) {
        let renewed = self.renew().await;
        self.self_fence().await;
        if renewed
            && plan
            && let Err(e) = self.rebalance().await
        {
            tracing::warn!(
                error = format!("{e:#}"),
                "portal leases: planning failed; trying again at the next tick"
            );
        }
        self.metrics.portals_owned(self.held.len());
    }

    /// Step 1; whether the renewal went through.
    async fn renew(&mut self) -> bool {
        let sent = Instant::now();
        self.renewal_sent = Some(sent);
        let (me, ttl) = (&self.settings.me, self.settings.ttl);
        let heartbeat = self
            .settings
            .cluster
            .leases
            .heartbeat(me, ttl, &self.settings.portals);
        let answer = match self.within("renewal", heartbeat).await {
            Ok(answer) => answer,
            Err(e) => {
                self.metrics.lease_renewal(false, ttl);
                tracing::warn!(
                    error = format!("{e:#}"),
                    portals = self.held.len(),
                    "portal leases: renewal failed; each portal's work stops by itself at its lease's deadline"
                );
                return false;
            }
        };
        self.metrics.lease_renewal(true, ttl);
        let epochs = self
            .held
            .iter()
            .map(|(portal, held)| (portal.clone(), held.epoch))
            .collect();
        let Renewal {
            renewed,
            lost,
            strays,
        } = sort_renewal(&epochs, &answer);
        for (portal, lease) in &renewed {
            if let Some(held) = self.held.get(portal) {
                held.clock
                    .renew(sent + lease.left.saturating_sub(self.margin));
            }
        }
        for portal in &lost {
            tracing::warn!(%portal, "portal lease lost to another instance: stopping its work");
        }
        self.drop_portals(&lost, true).await;
        self.metrics.handover("lost", lost.len() as u64);
        if !strays.is_empty() {
            let me = self.me().to_string();
            let release = self.settings.cluster.leases.release(&me, &strays);
            match self.within("release", release).await {
                Ok(released) => tracing::warn!(
                    portals = released,
                    first = %strays[0],
                    "portal leases held in the journal but not worked here (an answer came too late): released"
                ),
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "portal leases held in the journal but not worked here could not be released: trying again at the next tick"
                ),
            }
        }
        true
    }

    /// Step 2. Stopping the work of the portals whose clock ran out takes up to
    /// [`State::drop_bound`], and nothing is renewed meanwhile: the portals whose clock runs
    /// out within it are fenced with them, not a pass later (when their lease may have been
    /// taken already).
    async fn self_fence(&mut self) {
        let lefts: BTreeMap<&String, Duration> = self
            .held
            .iter()
            .map(|(portal, held)| (portal, held.clock.left()))
            .collect();
        let due: Vec<String> = fence_due(&lefts, self.drop_bound())
            .into_iter()
            .cloned()
            .collect();
        for portal in &due {
            tracing::warn!(%portal, "portal lease not renewed before its deadline: stopping its work (self-fencing)");
        }
        self.drop_portals(&due, true).await;
        self.metrics.handover("lost", due.len() as u64);
    }

    /// Steps 3 to 5.
    async fn rebalance(&mut self) -> anyhow::Result<()> {
        let leases = &self.settings.cluster.leases;
        let (mut instances, mut rows) = self
            .within("view", leases.view(&self.settings.portals))
            .await?;
        let me = &self.settings.me;
        let crashed: Vec<String> = instances
            .iter()
            .filter(|i| me.same_boot(i) && i.pid as u32 != me.pid && !process_exists(i.pid))
            .map(|i| i.id.clone())
            .collect();
        if !crashed.is_empty() {
            for dead in &crashed {
                let freed = self.within("reap", leases.reap(dead)).await?;
                tracing::warn!(instance = %dead, portals = freed, "an instance on this host is gone without releasing its leases (crashed): its portals are freed now");
            }
            (instances, rows) = self
                .within("view", leases.view(&self.settings.portals))
                .await?;
        }
        let live: BTreeSet<String> = instances.into_iter().map(|i| i.id).collect();
        let portals: BTreeSet<String> = self.settings.portals.iter().cloned().collect();
        let seen: BTreeMap<String, LeaseSeen> = rows
            .iter()
            .map(|row| {
                (
                    row.portal.clone(),
                    LeaseSeen {
                        owner: row.owner.clone(),
                        expired: row.expired(),
                    },
                )
            })
            .collect();
        let wanted = plan::plan(self.me(), &live, &portals, &seen);
        let release: Vec<String> = wanted
            .release
            .into_iter()
            .filter(|p| self.held.get(p).is_some_and(|held| !held.stopping))
            .collect();
        if !release.is_empty() {
            self.stop_for_release(release);
        }
        if wanted.acquire.is_empty() {
            return Ok(());
        }
        let sent = Instant::now();
        let me = self.me().to_string();
        let acquire = self.settings.cluster.leases.acquire(
            &me,
            &wanted.acquire,
            self.settings.ttl,
            self.grace,
        );
        let taken = self.within("acquisition", acquire).await?;
        for (portal, lease) in &taken {
            self.settings.cluster.fence.hold(portal, lease.epoch);
            let clock = LeaseClock::held(
                sent + lease.left.saturating_sub(self.margin),
                Instant::now() + lease.sweep_in,
            );
            self.held.insert(
                portal.clone(),
                Held {
                    epoch: lease.epoch,
                    clock: clock.clone(),
                    stopping: false,
                },
            );
            self.work.start(portal, clock);
        }
        if !taken.is_empty() {
            self.metrics.handover("acquired", taken.len() as u64);
            tracing::info!(
                portals = taken.len(),
                owned = self.held.len(),
                "portal leases acquired: their work starts (orphan sweep after the grace)"
            );
        }
        Ok(())
    }

    /// Step 4, first half: the work of `portals` stops in the background (its last round and
    /// final settle, each bounded by a quarter of the TTL) while this task goes on renewing
    /// every lease held, theirs too: a release never holds up a renewal.
    /// [`State::release_stopped`] gives the leases up when the work has stopped.
    fn stop_for_release(&mut self, portals: Vec<String>) {
        for portal in &portals {
            if let Some(held) = self.held.get_mut(portal) {
                held.stopping = true;
            }
        }
        let (work, stopped) = (self.work.clone(), self.stopped.clone());
        let within = self.stop_within();
        tokio::spawn(async move {
            futures_util::future::join_all(portals.iter().map(|p| work.stop(p, within))).await;
            let _ = stopped.send(portals);
        });
    }

    /// Step 4, second half: `portals`' work has stopped; the leases still held (not lost
    /// meanwhile) are given up, so the next owner can start at once. One that cannot be
    /// released now is dropped here all the same: the next heartbeat finds it renewed but not
    /// held (a stray) and releases it.
    async fn release_stopped(&mut self, portals: Vec<String>) {
        let mut release = Vec::new();
        for portal in portals {
            if let Some(held) = self.held.remove(&portal) {
                self.let_go(&portal, &held);
                release.push(portal);
            }
        }
        if release.is_empty() {
            return;
        }
        self.metrics.portals_owned(self.held.len());
        let me = self.me().to_string();
        let released = self.settings.cluster.leases.release(&me, &release);
        match self.within("release", released).await {
            Ok(_) => {
                self.metrics.handover("released", release.len() as u64);
                tracing::info!(portals = release.len(), first = %release[0], "portal leases released to rebalance");
            }
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                portals = release.len(),
                "portal leases whose work stopped could not be released: the next heartbeat releases them"
            ),
        }
    }

    /// How long a portal's work is given to stop, for its last round and again for its final
    /// settle ([`PortalWork::stop`]).
    fn stop_within(&self) -> Duration {
        self.settings.ttl / 4
    }

    /// The longest [`State::drop_portals`] waits: a portal's last round, then its final
    /// settle.
    fn drop_bound(&self) -> Duration {
        self.stop_within() * 2
    }

    /// The end of a held lease here, once its work has stopped: its clock stops and the fence
    /// no longer passes its writes.
    fn let_go(&self, portal: &str, held: &Held) {
        held.clock.end();
        self.settings.cluster.fence.forget(portal);
    }

    /// Stops the work on `portals` and their writes, all at once, each bounded by a quarter of
    /// the TTL (the renewals of the other leases wait meanwhile). `lost`: the leases may be
    /// gone, so no upstream call is made any more (their clocks end first); otherwise (a
    /// release) the work finishes its round and final settle under the lease, then the clocks
    /// end.
    async fn drop_portals(&mut self, portals: &[String], lost: bool) {
        let dropped: Vec<(String, Held)> = portals
            .iter()
            .filter_map(|p| self.held.remove(p).map(|held| (p.clone(), held)))
            .collect();
        if lost {
            for (_, held) in &dropped {
                held.clock.end();
            }
        }
        let within = self.stop_within();
        futures_util::future::join_all(
            dropped
                .iter()
                .map(|(portal, _)| self.work.stop(portal, within)),
        )
        .await;
        for (portal, held) in &dropped {
            self.let_go(portal, held);
        }
    }

    /// The graceful stop: every lease released, the instance retired.
    async fn leave(&mut self) {
        let portals: Vec<String> = self.held.keys().cloned().collect();
        self.drop_portals(&portals, false).await;
        let me = self.me().to_string();
        let leases = &self.settings.cluster.leases;
        match leases.release(&me, &portals).await {
            Ok(released) => {
                self.metrics.handover("released", released);
                tracing::info!(
                    portals = released,
                    "portal leases released: the other instances take them now"
                );
            }
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                "portal leases could not be released: they expire by themselves"
            ),
        }
        if let Err(e) = leases.retire(&me).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "could not retire this instance: its heartbeat expires by itself"
            );
        }
        self.settings.cluster.fence.deactivate();
        self.metrics.portals_owned(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(epoch: i64) -> HeldLease {
        HeldLease {
            epoch,
            left: Duration::from_secs(30),
            sweep_in: Duration::ZERO,
        }
    }

    #[test]
    fn a_renewal_keeps_the_same_epochs_loses_the_rest_and_finds_the_strays() {
        let held: BTreeMap<String, i64> = [("a", 1), ("b", 4), ("c", 2)]
            .into_iter()
            .map(|(p, e)| (p.to_string(), e))
            .collect();
        // a renewed; b renewed under another epoch (retaken in between: lost here, and a stray
        // in the journal); c not renewed (taken by another instance); d renewed but never held
        // here (an acquisition whose answer came too late).
        let answer: BTreeMap<String, HeldLease> = [("a", 1), ("b", 5), ("d", 3)]
            .into_iter()
            .map(|(p, e)| (p.to_string(), lease(e)))
            .collect();
        let renewal = sort_renewal(&held, &answer);
        assert_eq!(renewal.renewed, vec![("a".to_string(), lease(1))]);
        assert_eq!(renewal.lost, ["b", "c"]);
        assert_eq!(renewal.strays, ["b", "d"]);
        let nothing = sort_renewal(&BTreeMap::new(), &BTreeMap::new());
        assert_eq!(nothing, Renewal::default());
    }

    #[test]
    fn a_run_out_clock_fences_with_it_every_clock_that_runs_out_while_its_work_stops() {
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let lefts = |secs: [u64; 3]| -> BTreeMap<&String, Duration> {
            names
                .iter()
                .zip(secs)
                .map(|(n, s)| (n, Duration::from_secs(s)))
                .collect()
        };
        let bound = Duration::from_secs(2);
        // Every clock running: nothing, however close.
        assert!(fence_due(&lefts([1, 1, 9]), bound).is_empty());
        // a ran out: b runs out before a's work is stopped, c does not.
        assert_eq!(fence_due(&lefts([0, 2, 9]), bound), [&names[0], &names[1]]);
        assert_eq!(fence_due(&lefts([0, 0, 0]), bound).len(), 3);
    }

    #[test]
    fn the_task_wakes_when_the_first_clock_runs_out_if_that_is_before_the_next_tick() {
        let every = Duration::from_secs(10);
        let secs = Duration::from_secs;
        assert_eq!(next_wait(every, None, None), every);
        assert_eq!(next_wait(every, None, Some(secs(25))), every);
        assert_eq!(next_wait(every, None, Some(secs(4))), secs(4));
        assert_eq!(next_wait(every, None, Some(Duration::ZERO)), Duration::ZERO);
        assert_eq!(statement_budget(every, Some(secs(4))), secs(4));
        assert_eq!(statement_budget(every, None), every);
    }

    #[test]
    fn the_next_renewal_is_a_tick_after_the_last_was_sent_not_after_the_tick_ended() {
        let every = Duration::from_secs(10);
        let secs = Duration::from_secs;
        // Sent 3 s ago: 7 s more; a tick that took 12 s renews at once.
        assert_eq!(next_wait(every, Some(secs(3)), Some(secs(25))), secs(7));
        assert_eq!(
            next_wait(every, Some(secs(12)), Some(secs(15))),
            Duration::ZERO
        );
        // A clock running out before then still comes first.
        assert_eq!(next_wait(every, Some(secs(3)), Some(secs(2))), secs(2));
    }
}
