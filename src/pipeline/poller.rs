//! The poller of one portal: settles finished events first, adopts orphaned reservations, polls
//! the error lane on its schedule, and reserves new batches (`clear=0`) while fewer than
//! `max_unsettled` events are open. Also the cron schedules that wake it.

use super::backoff::{Backoff, Operation};
use super::economy::{self, Budget, Budgets, FetchWidth, MAX_COMMANDS};
use super::liveness::LoopHandle;
use super::orphans;
use super::{SharedRoutes, Wakers};
use crate::bitrix::client::EntityOutcome;
use crate::bitrix::client::{ClearTarget, GetRequest, OfflineCommand, OfflineOutcome};
use crate::bitrix::entities::{self, Getter};
use crate::bitrix::{BitrixError, ErrorClass, OfflineEvent, PortalClient};
use crate::config::{Config, Mode, PortalConfig};
use crate::conformance::{ClearBy, PortalConformance, ReservedListing};
use crate::envelope::Lane;
use crate::journal::SettleAction;
use crate::journal::{BatchOrigin, Enriched, Journal, NewBatch, NewEvent, PendingSettlement};
use crate::metrics::Metrics;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

/// How many rows a `get` with a known `process_id` may return: more than any batch we reserve.
const RESUME_LIMIT: u32 = 1000;
/// Backoff after a fatal (operator-needed) error: the portal keeps trying at this pace.
const FATAL_RETRY: Duration = Duration::from_secs(300);
/// How long a poller round may go on after shutdown was requested.
const STEP_GRACE: Duration = Duration::from_secs(10);

/// The instant `wait` from now, saturating (a year at most): no wait, whatever its source,
/// overflows the clock.
fn later(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// A wake-up flag set by a schedule (or by the poller itself) and taken by the poller.
#[derive(Default)]
pub struct Trigger {
    flag: AtomicBool,
    notify: Notify,
}

impl Trigger {
    pub fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    fn take(&self) -> bool {
        self.flag.swap(false, Ordering::SeqCst)
    }

    /// Waits until the trigger is set, and takes it.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.take() {
                return;
            }
            notified.await;
        }
    }
}

/// The schedule-driven work of one portal.
#[derive(Clone, Default)]
pub struct Triggers {
    pub error_lane: Arc<Trigger>,
    pub orphan_sweep: Arc<Trigger>,
    /// Set on SIGHUP: a portal stopped by an error that needed an operator tries again now,
    /// instead of at the end of its [`FATAL_RETRY`] wait.
    pub resume: Arc<Trigger>,
}

/// The cron schedules (tokio-cron-scheduler, local time, with seconds) of every portal.
pub struct Schedules {
    scheduler: JobScheduler,
    plans: Vec<CronPlan>,
    /// The jobs now registered, one per plan.
    jobs: Vec<Job>,
    triggers: HashMap<String, Triggers>,
    prune: Arc<Trigger>,
}

/// One cron job: its schedule, the config key that names it (for errors), the triggers it sets.
struct CronPlan {
    schedule: String,
    key: String,
    triggers: Arc<Vec<Arc<Trigger>>>,
}

impl Schedules {
    /// One cron job per distinct schedule, setting the triggers of every portal on it: a
    /// thousand portals on the default schedules make two jobs, not two thousand.
    pub async fn start(config: &Config) -> anyhow::Result<Schedules> {
        let scheduler = JobScheduler::new().await?;
        let mut triggers = HashMap::new();
        // schedule → (the first key that names it, for errors; the triggers it sets)
        let mut jobs: BTreeMap<String, (String, Vec<Arc<Trigger>>)> = BTreeMap::new();
        for portal in config.portals.values() {
            let t = Triggers::default();
            for (what, schedule, trigger) in [
                (
                    "error_lane_schedule",
                    &portal.error_lane_schedule,
                    t.error_lane.clone(),
                ),
                (
                    "orphan_sweep_schedule",
                    &portal.orphan_sweep_schedule,
                    t.orphan_sweep.clone(),
                ),
            ] {
                jobs.entry(schedule.clone())
                    .or_insert_with(|| (format!("portals.{}.{what}", portal.name), Vec::new()))
                    .1
                    .push(trigger);
            }
            triggers.insert(portal.name.clone(), t);
        }
        let prune = Arc::new(Trigger::default());
        let mut plans: Vec<_> = jobs
            .into_iter()
            .map(|(schedule, (key, set))| CronPlan {
                schedule,
                key,
                triggers: Arc::new(set),
            })
            .collect();
        plans.push(CronPlan {
            schedule: config.journal.prune_schedule.clone(),
            key: "journal.prune_schedule".to_string(),
            triggers: Arc::new(vec![prune.clone()]),
        });
        let mut schedules = Schedules {
            scheduler,
            plans,
            jobs: Vec::new(),
            triggers,
            prune,
        };
        schedules.add_jobs().await?;
        schedules.scheduler.start().await?;
        Ok(schedules)
    }

    /// Registers one cron job per plan; each computes its next run from the wall clock now.
    async fn add_jobs(&mut self) -> anyhow::Result<()> {
        for plan in &self.plans {
            let set = plan.triggers.clone();
            let job = Job::new_async_tz(plan.schedule.as_str(), chrono::Local, move |_, _| {
                for trigger in set.iter() {
                    trigger.set();
                }
                Box::pin(async {})
            })
            .map_err(|e| anyhow::anyhow!("{}: invalid schedule: {e}", plan.key))?;
            self.scheduler.add(job.clone()).await?;
            self.jobs.push(job);
        }
        Ok(())
    }

    /// Plans every cron job again from the wall clock now. The scheduler computes a job's next
    /// run once, in wall time: after the clock was set back by an hour, every job would wait
    /// an hour longer than its schedule says.
    pub async fn replan(&mut self) {
        for job in std::mem::take(&mut self.jobs) {
            if let Err(e) = self.scheduler.remove(&job.guid()).await {
                tracing::warn!(error = %e, "cron job could not be removed for replanning");
            }
        }
        if let Err(e) = self.add_jobs().await {
            tracing::error!(
                error = format!("{e:#}"),
                "cron jobs could not be planned again"
            );
        }
    }

    /// Set on `journal.prune_schedule`.
    pub fn prune_trigger(&self) -> Arc<Trigger> {
        self.prune.clone()
    }

    /// Wakes every portal stopped by an error that needed an operator (the operator says the
    /// cause is fixed by reloading).
    pub fn resume_stopped(&self) {
        for t in self.triggers.values() {
            t.resume.set();
        }
    }

    pub fn triggers(&self, portal: &str) -> Triggers {
        self.triggers.get(portal).cloned().unwrap_or_default()
    }

    pub async fn stop(mut self) {
        if let Err(e) = self.scheduler.shutdown().await {
            tracing::warn!(error = %e, "cron scheduler did not stop cleanly");
        }
    }
}

/// Sends the pending `event.offline.clear` / `event.offline.error` calls of one portal.
#[derive(Clone)]
pub struct Settler {
    portal: String,
    client: PortalClient,
    journal: Journal,
    /// How `event.offline.clear` addresses rows on this portal (the conformance findings).
    clear_by: ClearBy,
}

impl Settler {
    /// Settles everything that is ready. A call the portal rejects (a problem with that one
    /// reservation) is logged and left pending without holding up the others; any other
    /// failure (limits, auth, transport) stops the round.
    pub async fn settle(&self) -> anyhow::Result<usize> {
        let mut settled = 0;
        for group in self.journal.pending_settlements(&self.portal).await? {
            if self.send(&group).await? {
                settled += group.events.len();
            }
        }
        Ok(settled)
    }

    /// Sends one settle call on its own and marks its events settled. Returns false when the
    /// portal rejected it (logged; it stays pending); other failures are errors.
    pub async fn send(&self, group: &PendingSettlement) -> anyhow::Result<bool> {
        let sent = match self.command(group) {
            OfflineCommand::Clear { process_id, target } => {
                self.client.offline_clear(&process_id, &target).await
            }
            OfflineCommand::Error {
                process_id,
                message_ids,
            } => self.client.offline_error(&process_id, &message_ids).await,
            OfflineCommand::Get(_) => unreachable!("settle_command makes clear or error calls"),
        };
        match sent {
            Ok(()) => {}
            Err(e) if e.class == ErrorClass::Rejected => {
                self.log_rejected(group, &e);
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
        let ids = group.events.iter().map(|e| e.0).collect();
        self.journal.mark_settled(ids, group.action).await?;
        self.log_settled(group);
        Ok(true)
    }

    /// The settle call for one group of finished events.
    fn command(&self, group: &PendingSettlement) -> OfflineCommand {
        settle_command(group, self.clear_by)
    }

    fn log_rejected(&self, group: &PendingSettlement, e: &BitrixError) {
        tracing::error!(
            portal = %self.portal,
            process_id = %group.process_id,
            method = group.action.method(),
            events = group.events.len(),
            error = %e,
            "the portal rejected a settle call; it stays pending and is retried"
        );
    }

    fn log_settled(&self, group: &PendingSettlement) {
        tracing::info!(
            portal = %self.portal,
            process_id = %group.process_id,
            lane = group.lane.as_str(),
            method = group.action.method(),
            events = group.events.len(),
            "settled upstream"
        );
    }

    /// Settles what it can, logging failures (used at shutdown).
    pub async fn settle_all(&self) {
        if let Err(e) = self.settle().await {
            tracing::warn!(portal = %self.portal, error = format!("{e:#}"), "settle at shutdown failed: resent on the next start");
        }
    }
}

/// Whether an exchange of settle calls reserves new events too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fetch {
    /// The fetch is due.
    Due,
    /// Not due, but a request with settle calls may carry gets in its free slots.
    WithSettles,
    /// Settle only (room first, before the error lane reserves).
    No,
}

/// How a fetch went.
enum Fetched {
    /// As many events as asked for: fetch again at once.
    Full,
    /// Fewer (`events` of them): the queue is drained for now.
    Partial { events: usize },
    /// No fetch now: the portal's operating budget for `get` needs this long to recover.
    Paused(Duration),
}

/// What one poller carries from round to round.
struct RoundState {
    /// Open reservations of an earlier run have been re-read.
    resumed: bool,
    /// No normal-lane fetch before this.
    next_fetch: Instant,
    /// Gets per combined request.
    width: FetchWidth,
    /// Empty polls in a row (the idle backoff).
    empty_polls: u32,
    /// Settle calls were held back for their method's operating budget: the next round comes
    /// no later than this, whatever the fetch waits for.
    settles_held_until: Option<Instant>,
    /// Failures in a row of each operation, and the backoff they give.
    backoff: Backoff,
}

#[derive(Clone)]
pub struct Poller {
    config: PortalConfig,
    client: PortalClient,
    journal: Journal,
    routes: SharedRoutes,
    wakers: Arc<Wakers>,
    metrics: Metrics,
    triggers: Triggers,
    shutdown: CancellationToken,
    settler: Settler,
    liveness: LoopHandle,
    conformance: PortalConformance,
}

/// What every poller shares with the rest of the pipeline.
#[derive(Clone)]
pub struct Shared {
    pub journal: Journal,
    pub routes: SharedRoutes,
    pub wakers: Arc<Wakers>,
    pub metrics: Metrics,
    pub shutdown: CancellationToken,
}

impl Poller {
    pub fn new(
        config: PortalConfig,
        client: PortalClient,
        shared: Shared,
        triggers: Triggers,
        liveness: LoopHandle,
        conformance: PortalConformance,
    ) -> Poller {
        let mut config = config;
        config.batch_size = conformance.batch_size(config.batch_size);
        let Shared {
            journal,
            routes,
            wakers,
            metrics,
            shutdown,
        } = shared;
        let settler = Settler {
            portal: config.name.clone(),
            client: client.clone(),
            journal: journal.clone(),
            clear_by: conformance.clear_by(),
        };
        Poller {
            config,
            client,
            journal,
            routes,
            wakers,
            metrics,
            triggers,
            shutdown,
            settler,
            liveness,
            conformance,
        }
    }

    /// What the last conformance probe found on this portal (`batch_size` and the settle
    /// calls already follow it). The orphan sweep reads
    /// [`PortalConformance::reserved_listing`] from here: whether the `>PROCESS_ID` filter of
    /// `event.offline.list` can be trusted to find orphaned reservations.
    pub fn conformance(&self) -> &PortalConformance {
        &self.conformance
    }

    pub fn settler(&self) -> Settler {
        self.settler.clone()
    }

    fn portal(&self) -> &str {
        &self.config.name
    }

    fn reserving(&self) -> bool {
        self.config.mode == Mode::Reserve
    }

    /// Runs until shutdown, or until the portal refuses the configured mode (returned as a
    /// configuration error for the daemon to report).
    pub async fn run(self) -> Option<ConfigMismatch> {
        // At start: look for reservations lost by an earlier run, and poll the error lane once.
        if self.reserving() {
            self.triggers.orphan_sweep.set();
        } else {
            tracing::warn!(
                portal = %self.portal(),
                "fetch-delete mode (clear=1): the portal deletes events as it answers, so a get response lost in transit loses that batch; use mode = \"reserve\" where the plan has rest_offline_extended"
            );
        }
        self.triggers.error_lane.set();
        let settle_wake = self
            .wakers
            .settle
            .get(self.portal())
            .cloned()
            .unwrap_or_default();
        let mut state = RoundState {
            resumed: false,
            next_fetch: Instant::now(),
            width: FetchWidth::default(),
            empty_polls: 0,
            settles_held_until: None,
            backoff: Backoff::default(),
        };
        // Rounds failed in a row (readiness); the backoff counts failures per operation.
        let mut failures = 0u32;
        let mut last_error = String::new();
        while !self.shutdown.is_cancelled() {
            // A round stuck in a long wait (a 429 can ask for minutes) must not hold up a
            // shutdown: once it is requested, the round gets STEP_GRACE, then is dropped. Whatever
            // it was doing is recovered on the next start (open batches, pending settles, sweep).
            self.liveness.round_started();
            let round = tokio::select! {
                round = self.step(&mut state) => round,
                _ = async {
                    self.shutdown.cancelled().await;
                    tokio::time::sleep(STEP_GRACE).await;
                } => {
                    tracing::warn!(portal = %self.portal(), "abandoning a portal call at shutdown: it is resumed on the next start");
                    break;
                }
            };
            let wait = match round {
                Ok(wait) => {
                    if failures > 0 {
                        tracing::info!(portal = %self.portal(), "portal recovered");
                    }
                    self.liveness.round_succeeded();
                    self.metrics.poll_succeeded(self.portal());
                    state.backoff.round_succeeded();
                    failures = 0;
                    last_error.clear();
                    wait
                }
                Err(e) => {
                    // The backoff grows with the failures in a row of the operation that failed:
                    // another one working (a sweep, a settle) does not start it over.
                    let (operation, op_failures, backoff) = state.backoff.round_failed();
                    failures = failures.saturating_add(1);
                    let bitrix = e.downcast_ref::<BitrixError>();
                    let fatal = bitrix.is_some_and(|b| b.class == ErrorClass::Fatal);
                    let message = format!("{e:#}");
                    if let Some(b) = bitrix
                        && self.reserving()
                        && refuses_reserve_mode(b)
                    {
                        tracing::error!(portal = %self.portal(), error = %message, "portal stopped: its plan has no reserve mode");
                        self.liveness.stopped(&message);
                        return Some(ConfigMismatch {
                            portal: self.portal().to_string(),
                            message,
                        });
                    }
                    self.liveness.round_failed(failures, &message, fatal);
                    let wait = if fatal { FATAL_RETRY } else { backoff };
                    let operation = operation.as_str();
                    if fatal && message == last_error {
                        tracing::debug!(portal = %self.portal(), operation, error = %message, "portal still failing");
                    } else if fatal {
                        tracing::error!(portal = %self.portal(), operation, error = %message, retry_in = ?wait, "portal stopped until the cause is fixed: trying again after retry_in, or at once on reload (SIGHUP)");
                    } else {
                        tracing::warn!(portal = %self.portal(), operation, failures = op_failures, error = %message, retry_in = ?wait, "portal call failed; backing off");
                    }
                    last_error = message;
                    state.next_fetch = state.next_fetch.max(later(wait));
                    // Schedules do not cut a backoff short (their flags stay set). Finished
                    // deliveries do after a transient failure, so settles are not held up (the
                    // fetch still waits out the backoff). A portal failing for a reason an
                    // operator must fix waits for a reload, which says the cause is fixed: it
                    // fetches at once. A reload from before this failure says nothing about it.
                    self.triggers.resume.take();
                    let woken = async {
                        if fatal {
                            self.triggers.resume.wait().await;
                            true
                        } else {
                            settle_wake.notified().await;
                            false
                        }
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        resumed = woken => {
                            if resumed {
                                tracing::info!(portal = %self.portal(), "reloaded: trying the stopped portal again");
                                state.next_fetch = Instant::now();
                            }
                        }
                        _ = self.shutdown.cancelled() => {}
                    }
                    continue;
                }
            };
            let Some(mut wait) = wait else { continue };
            if let Some(at) = state.settles_held_until {
                wait = wait.min(at.saturating_duration_since(Instant::now()));
            }
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = settle_wake.notified() => {}
                _ = self.triggers.error_lane.notify.notified() => {}
                _ = self.triggers.orphan_sweep.notify.notified() => {}
                _ = self.shutdown.cancelled() => {}
            }
        }
        tracing::debug!(portal = %self.portal(), "poller stopped");
        None
    }

    /// One round: recover, settle and fetch. Returns how long to wait before the next round
    /// (`None`: go on at once).
    async fn step(&self, state: &mut RoundState) -> anyhow::Result<Option<Duration>> {
        if !state.resumed {
            if self.reserving() {
                let resumed = self.resume_open_batches().await;
                state.backoff.track(Operation::Sweep, resumed)?;
            }
            state.resumed = true;
        }
        if !self.reserving() {
            // Fetch-delete mode settles nothing upstream: pending rows are only ever local.
            let settled = self.settler.settle().await;
            state.backoff.track(Operation::Settle, settled)?;
        }
        if self.triggers.orphan_sweep.take() && self.reserving() {
            if !state.backoff.due(Operation::Sweep) {
                self.triggers.orphan_sweep.set_quietly();
            } else if let Err(e) = state
                .backoff
                .track(Operation::Sweep, self.sweep_orphans().await)
            {
                // The sweep waits out its own backoff and the round goes on: a reservation the
                // portal cannot answer readably (or a listing that fails) must not stop the
                // fetching of new events. What it would adopt stays reserved upstream.
                self.triggers.orphan_sweep.set_quietly();
                let (failures, retry_in) = state.backoff.failed_alone(Operation::Sweep);
                tracing::warn!(portal = %self.portal(), error = format!("{e:#}"), failures, retry_in = ?retry_in, "the orphan sweep failed; it runs again after retry_in, fetching goes on");
            }
        }
        let now_unix = self.client.portal_now();
        let get_paused =
            self.reserving() && self.budget("event.offline.get").pause(now_unix).is_some();
        if get_paused && self.triggers.error_lane.take() {
            // The get budget is spent: the error lane waits for it like the normal lane.
            self.triggers.error_lane.set_quietly();
        } else if self.triggers.error_lane.take() {
            if self.reserving() {
                // Room first: what is finished is settled before the error lane reserves more.
                self.exchange(Fetch::No, state).await?;
            }
            loop {
                if self.shutdown.is_cancelled() {
                    return Ok(None);
                }
                let Some(limit) = self.fetch_limit().await? else {
                    // At the cap: poll the error lane again once settles have made room.
                    self.triggers.error_lane.set_quietly();
                    break;
                };
                let fetched = self.fetch(Lane::Error, limit).await;
                match state.backoff.track(Operation::Fetch, fetched) {
                    Ok(Fetched::Full) => continue,
                    Ok(_) => break,
                    Err(e) => {
                        self.triggers.error_lane.set_quietly();
                        return Err(e);
                    }
                }
            }
        }
        let now = Instant::now();
        let fetch_due = now >= state.next_fetch;
        // Lowest priority, after settles and fetches: the entities of events already journaled.
        let enriched = self.enrich().await;
        let more_to_enrich = state.backoff.track(Operation::Enrich, enriched)?;
        let fetched = if self.reserving() {
            self.exchange(
                if fetch_due {
                    Fetch::Due
                } else {
                    Fetch::WithSettles
                },
                state,
            )
            .await?
        } else if fetch_due {
            match self.fetch_limit().await? {
                Some(limit) => {
                    let fetched = self.fetch(Lane::Normal, limit).await;
                    Some(state.backoff.track(Operation::Fetch, fetched)?)
                }
                None => None,
            }
        } else {
            None
        };
        if more_to_enrich {
            return Ok(None);
        }
        let wait = match fetched {
            None if !fetch_due => return Ok(Some(state.next_fetch - now)),
            // At max_unsettled: settles wake the poller, the interval is a fallback.
            None => self.config.poll_interval,
            Some(Fetched::Full) => {
                state.empty_polls = 0;
                state.next_fetch = Instant::now();
                return Ok(None);
            }
            Some(Fetched::Partial { events }) => {
                state.empty_polls = if events == 0 {
                    state.empty_polls.saturating_add(1)
                } else {
                    0
                };
                economy::idle_wait(
                    self.config.poll_interval,
                    self.config.idle_poll_max,
                    state.empty_polls,
                )
            }
            Some(Fetched::Paused(wait)) => {
                let get = self.client.operating("event.offline.get");
                tracing::info!(
                    portal = %self.portal(),
                    wait = ?wait,
                    used = ?get.used(),
                    reset_at = ?get.reset_at,
                    banned = get.banned_until.is_some(),
                    "event.offline.get has used its share of the operating-time limit: fetching again when the oldest minute of its window drops out"
                );
                wait
            }
        };
        state.next_fetch = later(wait);
        Ok(Some(wait))
    }

    /// Reserve mode: sends the settle calls that are ready and, when `fetch` and there is room,
    /// new reservations — together in one `batch` request when there is more than one call.
    /// Settles go first: a request carries gets only in the slots settles leave free. Each
    /// method, `batch` included, gets no more calls than its operating time left pays for; when
    /// `batch` has none left, calls go one at a time. Returns how the fetch went (`None`: no get
    /// was sent).
    async fn exchange(
        &self,
        fetch: Fetch,
        state: &mut RoundState,
    ) -> anyhow::Result<Option<Fetched>> {
        loop {
            let now = self.client.portal_now();
            let budgets = self.budgets();
            let mut groups = self.journal.pending_settlements(self.portal()).await?;
            let mut clears = budgets.clear.affordable(now);
            let mut errors = budgets.error.affordable(now);
            let wanted = groups.len();
            groups.retain(|g| {
                let left = match g.action {
                    SettleAction::Clear => &mut clears,
                    SettleAction::Error => &mut errors,
                };
                let take = *left > 0;
                *left = left.saturating_sub(1);
                take
            });
            // Held back for the time limit: come back when it allows (the fetch may wait longer).
            state.settles_held_until = (groups.len() < wanted).then(|| {
                let pause = [budgets.clear, budgets.error]
                    .iter()
                    .filter_map(|b| b.pause(now))
                    .min();
                later(pause.unwrap_or(self.config.poll_interval))
            });
            let batched = budgets.batch.affordable(now) > 0;
            if !batched {
                // No time left for `batch` itself: one call per request.
                groups.truncate(1);
            }
            groups.truncate(MAX_COMMANDS);
            let mut limits = Vec::new();
            let fetch = match fetch {
                Fetch::Due => true,
                // A request that goes anyway costs a tick of the bucket either way: its free
                // slots carry gets (the portal's bucket, not the idle wait, is what a busy
                // portal runs into; a settle sent alone would delay the next fetch by a tick).
                Fetch::WithSettles => batched && !groups.is_empty(),
                Fetch::No => false,
            };
            if fetch && groups.len() < MAX_COMMANDS && (batched || groups.is_empty()) {
                if let Some(wait) = budgets.get.pause(now) {
                    if groups.is_empty() {
                        return Ok(Some(Fetched::Paused(wait)));
                    }
                } else if let Some(room) = self.fetch_room().await? {
                    let free = (MAX_COMMANDS - groups.len()) as u32;
                    let max_gets = if batched { free } else { 1 };
                    limits = state.width.plan(
                        room,
                        self.config.batch_size,
                        max_gets.min(budgets.get.affordable(now)),
                    );
                }
            }
            match (groups.len(), limits.len()) {
                (0, 0) => return Ok(None),
                (0, 1) => {
                    let fetched = self.fetch(Lane::Normal, limits[0]).await;
                    let fetched = state.backoff.track(Operation::Fetch, fetched)?;
                    state.width.observe(
                        1,
                        usize::from(matches!(fetched, Fetched::Full)),
                        Duration::ZERO,
                    );
                    return Ok(Some(fetched));
                }
                (1, 0) => {
                    // A lone settle call goes without `batch`, which would only add its time.
                    // One request per round, as a combined one: the next comes with the next
                    // fetch or wake-up, so lone settles never crowd fetches out of the bucket.
                    let group = groups.remove(0);
                    let sent = self.settler.send(&group).await;
                    state.backoff.track(Operation::Settle, sent)?;
                    return Ok(None);
                }
                _ => {}
            }
            tracing::debug!(
                portal = %self.portal(),
                settles = groups.len(),
                gets = limits.len(),
                get_used = ?budgets.get.time.used(),
                get_call = ?budgets.get.time.call,
                batch_used = ?budgets.batch.time.used(),
                "combined request"
            );
            let more_settles = groups.len() == MAX_COMMANDS;
            let settles = !groups.is_empty();
            let operation = if limits.is_empty() {
                Operation::Settle
            } else {
                Operation::Fetch
            };
            let fetched = self.combined(groups, &limits, &mut state.width).await;
            let fetched = state.backoff.track(operation, fetched)?;
            if settles {
                state.backoff.succeeded(Operation::Settle);
            }
            if more_settles && !self.shutdown.is_cancelled() {
                continue;
            }
            return Ok(fetched);
        }
    }

    /// One combined request: settle calls, then gets, in one `batch`. The reservations are
    /// journaled in one transaction before the settled events are marked. A failed sub-command
    /// is retried alone in a later round; a lost answer may have reserved batches, which the
    /// orphan sweep adopts.
    async fn combined(
        &self,
        groups: Vec<PendingSettlement>,
        limits: &[u32],
        width: &mut FetchWidth,
    ) -> anyhow::Result<Option<Fetched>> {
        let mut commands: Vec<OfflineCommand> =
            groups.iter().map(|g| self.settler.command(g)).collect();
        commands.extend(limits.iter().map(|&limit| {
            OfflineCommand::Get(GetRequest {
                limit,
                clear: false,
                process_id: None,
                error_lane: false,
            })
        }));
        let started = Instant::now();
        let answer = match self.client.offline_batch(&commands).await {
            Ok(answer) => answer,
            Err(e) => {
                if e.maybe_executed && !limits.is_empty() {
                    self.triggers.orphan_sweep.set_quietly();
                }
                return Err(e.into());
            }
        };
        let elapsed = started.elapsed();
        let outcomes = answer.outcomes;
        let mut outcomes = outcomes.into_iter();
        let settle_outcomes: Vec<OfflineOutcome> = outcomes.by_ref().take(groups.len()).collect();

        // Reservations first: journaled before anything else happens.
        let mut reservations = Vec::new();
        let mut get_error = None;
        let (mut full, mut events) = (0, 0);
        for (outcome, &limit) in outcomes.zip(limits) {
            match outcome {
                OfflineOutcome::Got(batch) if batch.events.is_empty() => {}
                OfflineOutcome::Got(batch) => {
                    let Some(process_id) = batch.process_id.filter(|p| !p.is_empty()) else {
                        self.triggers.orphan_sweep.set_quietly();
                        get_error.get_or_insert_with(|| {
                            anyhow::anyhow!(
                                "portal {}: event.offline.get with clear=0 returned {} events without a process_id",
                                self.portal(),
                                batch.events.len()
                            )
                        });
                        continue;
                    };
                    full += usize::from(batch.events.len() >= limit as usize);
                    events += batch.events.len();
                    reservations.push((process_id, batch.events));
                }
                OfflineOutcome::Failed(e) => {
                    if e.maybe_executed {
                        self.triggers.orphan_sweep.set_quietly();
                    }
                    get_error.get_or_insert(e.into());
                }
                OfflineOutcome::Settled => {}
            }
        }
        let reserved = reservations.len();
        if reserved > 0 {
            let pids: Vec<String> = reservations.iter().map(|(p, _)| p.clone()).collect();
            if let Err(e) = self
                .record_many(reservations, Lane::Normal, BatchOrigin::Fetched)
                .await
            {
                // Reserved upstream but not journaled: the sweep adopts them once the journal works.
                self.triggers.orphan_sweep.set_quietly();
                return Err(e);
            }
            tracing::info!(portal = %self.portal(), reservations = reserved, events, process_ids = ?pids, "reserved and journaled");
        }

        let mut settled = Vec::new();
        for (group, outcome) in groups.iter().zip(settle_outcomes) {
            match outcome {
                OfflineOutcome::Settled => settled.push(group),
                OfflineOutcome::Failed(e) if e.class == ErrorClass::Rejected => {
                    self.settler.log_rejected(group, &e);
                }
                OfflineOutcome::Failed(e) => {
                    tracing::warn!(portal = %self.portal(), process_id = %group.process_id, method = group.action.method(), error = %e, "a settle call in a combined request failed; it is sent again on its own");
                }
                OfflineOutcome::Got(_) => {}
            }
        }
        if !settled.is_empty() {
            self.journal
                .mark_settled_groups(
                    settled
                        .iter()
                        .map(|g| (g.events.iter().map(|e| e.0).collect(), g.action))
                        .collect(),
                )
                .await?;
            for group in &settled {
                self.settler.log_settled(group);
            }
        }

        if limits.is_empty() {
            return Ok(None);
        }
        width.observe(limits.len(), full, elapsed);
        if let Some(e) = get_error {
            if let Some(b) = e.downcast_ref::<BitrixError>()
                && b.is_code("OPERATION_TIME_LIMIT")
            {
                // A sub-command's 429 carries no time block: wait for the window the last
                // answer described, else a minute.
                let wait = self
                    .client
                    .operating_wait("event.offline.get", b.retry_after);
                return Ok(Some(Fetched::Paused(wait)));
            }
            return Err(e);
        }
        Ok(Some(if full == limits.len() {
            Fetched::Full
        } else {
            Fetched::Partial { events }
        }))
    }

    /// Reads the entities of events waiting for enrichment: one `batch` request of up to 50
    /// distinct entities (events about the same entity share one getter). A deleted entity gives
    /// `entity = null` with `entity_error`; so does a getter the portal refuses for good (rights,
    /// scope), so that no event waits forever; a transient failure leaves the events waiting.
    /// Returns whether more events are waiting.
    async fn enrich(&self) -> anyhow::Result<bool> {
        if self.config.enrich.is_empty() {
            return Ok(false);
        }
        const SCAN: usize = 2000;
        let pending = self.journal.pending_enrichment(self.portal(), SCAN).await?;
        if pending.is_empty() {
            return Ok(false);
        }
        // The getters ride in one `batch`: it and each getter method need operating time left.
        let now = self.client.portal_now();
        if self.budget("batch").affordable(now) == 0 {
            tracing::debug!(portal = %self.portal(), "enrichment waits: batch has no operating time left");
            return Ok(false);
        }
        let mut affordable: HashMap<&'static str, u32> = HashMap::new();
        let mut held_back = false;
        let mut keys: Vec<(Getter, u64)> = Vec::new();
        let mut waiting: Vec<(i64, usize)> = Vec::new();
        let mut results = Vec::new();
        let mut taken = 0;
        for event in &pending {
            let Some(getter) = self.config.getter_for(&event.event) else {
                results.push(Enriched {
                    event_id: event.event_id,
                    entity: Value::Null,
                    error: Some(format!("no enrich rule matches {}", event.event)),
                });
                taken += 1;
                continue;
            };
            let Some(id) = entities::entity_id(&event.data) else {
                results.push(Enriched {
                    event_id: event.event_id,
                    entity: Value::Null,
                    error: Some(format!(
                        "no entity id in the event data (FIELDS.ID) for {}",
                        getter.method()
                    )),
                });
                taken += 1;
                continue;
            };
            let index = match keys.iter().position(|k| *k == (getter, id)) {
                Some(index) => index,
                None if keys.len() < MAX_COMMANDS => {
                    let left = affordable
                        .entry(getter.method())
                        .or_insert_with(|| self.budget(getter.method()).affordable(now));
                    if *left == 0 {
                        held_back = true;
                        continue;
                    }
                    *left -= 1;
                    keys.push((getter, id));
                    keys.len() - 1
                }
                None => break,
            };
            waiting.push((event.event_id, index));
            taken += 1;
        }
        let mut transient = 0;
        if !keys.is_empty() {
            let outcomes = match self.client.get_entities(&keys).await {
                Ok(outcomes) => outcomes,
                Err(e) => {
                    self.journal.record_enrichment(results).await?;
                    return Err(e.into());
                }
            };
            for (event_id, index) in waiting {
                let (entity, error) = match &outcomes[index] {
                    EntityOutcome::Found(entity) => (entity.clone(), None),
                    EntityOutcome::NotFound(why) => (Value::Null, Some(why.clone())),
                    EntityOutcome::Failed(e)
                        if matches!(e.class, ErrorClass::Fatal | ErrorClass::Rejected) =>
                    {
                        (Value::Null, Some(e.to_string()))
                    }
                    EntityOutcome::Failed(e) => {
                        transient += 1;
                        tracing::debug!(portal = %self.portal(), error = %e, "entity read failed; retried");
                        continue;
                    }
                };
                results.push(Enriched {
                    event_id,
                    entity,
                    error,
                });
            }
        }
        let enriched = results.len();
        if enriched > 0 {
            self.journal.record_enrichment(results).await?;
            self.wakers.wake_sinks();
        }
        tracing::debug!(portal = %self.portal(), events = enriched, entities = keys.len(), "entities attached");
        if transient > 0 {
            tracing::warn!(portal = %self.portal(), events = transient, "reading entities failed for some events; they wait for the next round");
            return Ok(false);
        }
        if held_back {
            tracing::debug!(portal = %self.portal(), "some entities wait for their getter's operating time");
            return Ok(false);
        }
        Ok(taken < pending.len() || pending.len() == SCAN)
    }

    /// `method`'s operating time as the client knows it, against the configured limit.
    fn budget(&self, method: &str) -> Budget {
        Budget {
            time: self.client.operating(method),
            limit: self.config.rate_limit.operating_budget.as_secs_f64(),
        }
    }

    /// The operating time of every method a combined request may use.
    fn budgets(&self) -> Budgets {
        Budgets {
            get: self.budget("event.offline.get"),
            clear: self.budget("event.offline.clear"),
            error: self.budget("event.offline.error"),
            batch: self.budget("batch"),
        }
    }

    /// How many events the next fetch may reserve without passing `max_unsettled`, at most
    /// `batch_size`; `None` when the portal is at the cap.
    async fn fetch_limit(&self) -> anyhow::Result<Option<u32>> {
        Ok(self.fetch_room().await?.map(|room| {
            u32::try_from(room)
                .unwrap_or(u32::MAX)
                .min(self.config.batch_size)
        }))
    }

    /// How many events may still be reserved (`max_unsettled` minus what is open); `None` at
    /// the cap.
    async fn fetch_room(&self) -> anyhow::Result<Option<u64>> {
        // Reserve mode counts what is open upstream; fetch-delete mode, where nothing stays
        // open upstream, counts what the sinks still have to take.
        let unsettled = if self.reserving() {
            self.journal.unsettled_count(self.portal()).await?
        } else {
            self.journal.undelivered_count(self.portal()).await?
        };
        let room = u64::from(self.config.max_unsettled).saturating_sub(unsettled);
        if room == 0 {
            tracing::debug!(portal = %self.portal(), unsettled, "max_unsettled reached: not fetching");
            return Ok(None);
        }
        Ok(Some(room))
    }

    /// Reserves (or, in fetch-delete mode, takes) up to `limit` events of `lane` and journals
    /// them before anything else happens.
    async fn fetch(&self, lane: Lane, limit: u32) -> anyhow::Result<Fetched> {
        let request = GetRequest {
            limit,
            clear: !self.reserving(),
            process_id: None,
            error_lane: lane == Lane::Error,
        };
        let batch = match self.client.offline_get(&request).await {
            Ok(batch) => batch,
            Err(e) => {
                if e.maybe_executed && self.reserving() {
                    // The portal may have reserved a batch whose answer we never saw.
                    self.triggers.orphan_sweep.set_quietly();
                } else if e.maybe_executed {
                    tracing::error!(portal = %self.portal(), lane = lane.as_str(), error = %e, "fetch-delete mode: a get response was lost after the portal may have deleted its events; those events are lost (reserve mode would have recovered them)");
                }
                return Err(e.into());
            }
        };
        if batch.events.is_empty() {
            tracing::debug!(portal = %self.portal(), lane = lane.as_str(), "queue empty");
            return Ok(Fetched::Partial { events: 0 });
        }
        if !self.reserving() {
            return self.record_deleted(lane, limit, batch.events).await;
        }
        let Some(process_id) = batch.process_id.filter(|p| !p.is_empty()) else {
            self.triggers.orphan_sweep.set_quietly();
            anyhow::bail!(
                "portal {}: event.offline.get with clear=0 returned {} events without a process_id",
                self.portal(),
                batch.events.len()
            );
        };
        let count = batch.events.len();
        if let Err(e) = self
            .record(
                &process_id,
                lane,
                BatchOrigin::Fetched,
                batch.events,
                false,
                true,
            )
            .await
        {
            // Reserved upstream but not journaled: the sweep adopts it once the journal works.
            self.triggers.orphan_sweep.set_quietly();
            return Err(e);
        }
        tracing::info!(portal = %self.portal(), lane = lane.as_str(), %process_id, events = count, "reserved and journaled");
        Ok(if count >= limit as usize {
            Fetched::Full
        } else {
            Fetched::Partial { events: count }
        })
    }

    /// Fetch-delete mode: journals a batch the portal has already deleted, under a local id.
    async fn record_deleted(
        &self,
        lane: Lane,
        limit: u32,
        events: Vec<OfflineEvent>,
    ) -> anyhow::Result<Fetched> {
        let count = events.len();
        let first = events.first().map(|e| e.id).unwrap_or_default();
        let local_id = format!(
            "fetch-delete:{}:{first}",
            chrono::Utc::now().timestamp_micros()
        );
        if let Err(e) = self
            .record(&local_id, lane, BatchOrigin::Fetched, events, true, true)
            .await
        {
            tracing::error!(portal = %self.portal(), events = count, error = format!("{e:#}"), "fetch-delete mode: the journal failed after the portal deleted the batch; those events are lost");
            return Err(e);
        }
        tracing::info!(portal = %self.portal(), lane = lane.as_str(), batch = %local_id, events = count, "fetched (deleted upstream) and journaled");
        Ok(if count >= limit as usize {
            Fetched::Full
        } else {
            Fetched::Partial { events: count }
        })
    }

    /// Journals a reservation, routing each event to its sinks, and wakes the dispatchers. Events
    /// the journal had already settled but that are still reserved upstream are cleared again.
    async fn record(
        &self,
        process_id: &str,
        lane: Lane,
        origin: BatchOrigin,
        events: Vec<OfflineEvent>,
        deleted_upstream: bool,
        new_reservation: bool,
    ) -> anyhow::Result<usize> {
        let mut batch = self.new_batch(
            process_id.to_string(),
            lane,
            origin,
            events,
            deleted_upstream,
        );
        batch.new_reservation = new_reservation;
        self.record_batches(vec![batch]).await
    }

    /// [`Poller::record`] for the reservations of one combined request, in one transaction.
    async fn record_many(
        &self,
        reservations: Vec<(String, Vec<OfflineEvent>)>,
        lane: Lane,
        origin: BatchOrigin,
    ) -> anyhow::Result<usize> {
        let batches = reservations
            .into_iter()
            .map(|(process_id, events)| self.new_batch(process_id, lane, origin, events, false))
            .collect();
        self.record_batches(batches).await
    }

    /// A reservation with each event routed to its sinks.
    fn new_batch(
        &self,
        process_id: String,
        lane: Lane,
        origin: BatchOrigin,
        events: Vec<OfflineEvent>,
        deleted_upstream: bool,
    ) -> NewBatch {
        let portal = self.portal().to_string();
        let routes = self.routes.current();
        let events = events
            .into_iter()
            .map(|e| NewEvent {
                enrich: self.config.getter_for(&e.event_name).is_some(),
                sinks: routes
                    .iter()
                    .filter(|(_, route)| route.matches(&portal, &e.event_name))
                    .map(|(name, _)| name.clone())
                    .collect(),
                offline_id: e.id,
                event: e.event_name,
                message_id: e.message_id,
                timestamp: e.timestamp,
                data: e.data,
                additional: e.additional,
            })
            .collect();
        NewBatch {
            portal,
            process_id,
            lane,
            origin,
            events,
            deleted_upstream,
            // What the fetches made; a re-read says otherwise.
            new_reservation: true,
        }
    }

    async fn record_batches(&self, batches: Vec<NewBatch>) -> anyhow::Result<usize> {
        let process_ids: Vec<String> = batches.iter().map(|b| b.process_id.clone()).collect();
        let recorded = self.journal.record_batches(batches).await?;
        let inserted: usize = recorded.iter().map(|r| r.inserted).sum();
        if inserted > 0 {
            self.metrics.fetched(self.portal(), inserted as u64);
            self.wakers.wake_sinks();
        }
        for (process_id, recorded) in process_ids.iter().zip(&recorded) {
            if recorded.known_settled.is_empty() {
                continue;
            }
            let ids = recorded.known_settled.iter().map(|(id, _)| *id).collect();
            tracing::warn!(portal = %self.portal(), %process_id, events = recorded.known_settled.len(), "settled events still reserved upstream: clearing them again");
            self.client
                .offline_clear(process_id, &ClearTarget::Ids(ids))
                .await?;
        }
        Ok(inserted)
    }

    /// At start: re-reads every reservation the journal has not finished (`get` with its
    /// `process_id`, `clear=0`) and journals anything it did not have.
    async fn resume_open_batches(&self) -> anyhow::Result<()> {
        let open = self.journal.open_batches(self.portal()).await?;
        for batch in &open {
            if self.shutdown.is_cancelled() {
                break;
            }
            self.reread(&batch.process_id, batch.lane, BatchOrigin::Fetched)
                .await?;
        }
        if !open.is_empty() {
            tracing::info!(portal = %self.portal(), reservations = open.len(), "resumed unsettled reservations from the journal");
        }
        Ok(())
    }

    async fn reread(
        &self,
        process_id: &str,
        lane: Lane,
        origin: BatchOrigin,
    ) -> anyhow::Result<usize> {
        let request = GetRequest {
            limit: RESUME_LIMIT,
            clear: false,
            process_id: Some(process_id.to_string()),
            error_lane: lane == Lane::Error,
        };
        // A re-read is a get like any other: it waits for operating time like the fetches.
        if let Some(wait) = self
            .budget("event.offline.get")
            .pause(self.client.portal_now())
        {
            tracing::info!(portal = %self.portal(), %process_id, wait = ?wait, "re-reading a reservation waits for event.offline.get's operating time");
            tokio::time::sleep(wait).await;
        }
        let batch = self.client.offline_get(&request).await?;
        self.record(process_id, lane, origin, batch.events, false, false)
            .await
    }

    /// Finds reservations the portal holds that the journal does not know as open (a `get`
    /// whose answer was lost; rows left under a reservation the journal settled) and adopts
    /// them. Sets of `process_id`s are compared, not counts (see [`orphans`]): one
    /// `event.offline.list` per gap between the journal's open reservations, 50 to a request.
    /// Deferred (flagged again) while `event.offline.list` or `batch` has no operating time
    /// left.
    async fn sweep_orphans(&self) -> anyhow::Result<()> {
        /// More requests than this in one sweep means the portal ignores the filter.
        const MAX_SWEEP_REQUESTS: usize = 1000;
        let now = self.client.portal_now();
        if let Some(wait) = ["event.offline.list", "batch"]
            .into_iter()
            .filter_map(|m| self.budget(m).pause(now))
            .max()
        {
            self.triggers.orphan_sweep.set_quietly();
            tracing::debug!(portal = %self.portal(), wait = ?wait, "orphan sweep deferred: event.offline.list or batch has no operating time left");
            return Ok(());
        }
        let open: Vec<String> = self
            .journal
            .open_batches(self.portal())
            .await?
            .into_iter()
            .map(|b| b.process_id)
            .collect();
        let is_open = |pid: &str| {
            let key = orphans::collation_key(pid);
            open.iter().any(|p| orphans::collation_key(p) == key)
        };
        // process_id → whether its rows are in the error lane
        let mut found: BTreeMap<String, bool> = BTreeMap::new();
        let mut note = |items: &[crate::bitrix::types::ListedEvent]| {
            for item in items {
                if !item.process_id.is_empty() && !is_open(&item.process_id) {
                    found.entry(item.process_id.clone()).or_insert(item.error);
                }
            }
        };
        let (gaps, requests) = if self.conformance.reserved_listing() == ReservedListing::Broken {
            // The conformance probe found the PROCESS_ID filter not honoured: read every row
            // of the queue, by ID, and filter here.
            let by_id = serde_json::json!({"ID": "ASC"});
            let first = self
                .client
                .offline_list_pages(&by_id, &[(serde_json::json!({}), 0)])
                .await?
                .remove(0)?;
            note(&first.items);
            let mut start = first.items.len().max(1) as u64;
            let mut requests = 1;
            while start < first.total && !self.shutdown.is_cancelled() {
                let queries: Vec<(Value, u64)> = (0..MAX_COMMANDS as u64)
                    .map(|i| start + i * orphans::PAGE)
                    .take_while(|s| *s < first.total)
                    .map(|s| (serde_json::json!({}), s))
                    .collect();
                start += queries.len() as u64 * orphans::PAGE;
                for page in self.client.offline_list_pages(&by_id, &queries).await? {
                    note(&page?.items);
                }
                requests += 1;
            }
            (0, requests)
        } else {
            let by_process = serde_json::json!({"PROCESS_ID": "ASC"});
            let mut pending = orphans::gaps(&open);
            let gaps = pending.len();
            let mut requests = 0;
            while !pending.is_empty() && !self.shutdown.is_cancelled() {
                if requests >= MAX_SWEEP_REQUESTS {
                    anyhow::bail!(
                        "portal {}: the orphan sweep did not finish in {MAX_SWEEP_REQUESTS} requests: does event.offline.list honour its PROCESS_ID filter? (doctor --conformance checks it)",
                        self.portal()
                    );
                }
                let chunk: Vec<orphans::Gap> =
                    pending.drain(..pending.len().min(MAX_COMMANDS)).collect();
                let queries: Vec<(Value, u64)> = chunk.iter().map(|g| (g.filter(), 0)).collect();
                let pages = self
                    .client
                    .offline_list_pages(&by_process, &queries)
                    .await?;
                requests += 1;
                for (gap, page) in chunk.iter().zip(pages) {
                    let page = page?;
                    note(&page.items);
                    // More rows than one page: the rest of the gap lies after the last id seen
                    // (its remaining rows belong to a reservation already found).
                    if let Some(last) = page.items.last().map(|i| i.process_id.as_str())
                        && page.total > page.items.len() as u64
                        && orphans::collation_key(last) > gap.after
                    {
                        pending.push(gap.after(last));
                    }
                }
            }
            (gaps, requests)
        };
        tracing::debug!(portal = %self.portal(), open = open.len(), gaps, requests, found = found.len(), "orphan sweep");
        let known = self.journal.known_process_ids(self.portal()).await?;
        for (process_id, error) in found {
            if self.shutdown.is_cancelled() {
                break;
            }
            let lane = if error { Lane::Error } else { Lane::Normal };
            let adopted = self.reread(&process_id, lane, BatchOrigin::Adopted).await?;
            if known.contains_key(&process_id) {
                tracing::warn!(portal = %self.portal(), %process_id, lane = lane.as_str(), events = adopted, "the portal still holds rows of a reservation the journal settled: read again and settled again");
            } else {
                tracing::warn!(portal = %self.portal(), %process_id, lane = lane.as_str(), events = adopted, "adopted an orphaned reservation (its get response was lost)");
            }
        }
        Ok(())
    }
}

/// A portal that refused the configured mode: reserve mode on a plan without
/// `rest_offline_extended`. The poller stops; the daemon reports it.
#[derive(Debug, Clone)]
pub struct ConfigMismatch {
    pub portal: String,
    pub message: String,
}

/// `WRONG_LICENSE` from `event.offline.get` about extended offline handling (not about
/// `auth_connector`, which any method can answer).
fn refuses_reserve_mode(e: &BitrixError) -> bool {
    e.code.eq_ignore_ascii_case("WRONG_LICENSE")
        && e.method.eq_ignore_ascii_case("event.offline.get")
        && !e
            .description
            .to_ascii_lowercase()
            .contains("auth_connector")
}

impl Trigger {
    /// Sets the flag without waking the poller (used by the poller on itself).
    fn set_quietly(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }
}

/// The settle call for one group of finished events of a reservation; `clear_by` is
/// [`ClearBy::Id`] where the conformance probe found `message_id` ignored.
fn settle_command(group: &PendingSettlement, clear_by: ClearBy) -> OfflineCommand {
    let message_ids: Vec<String> = group.events.iter().map(|e| e.2.clone()).collect();
    match group.action {
        SettleAction::Clear => {
            // clear validates message_id as exactly 32 characters; fall back to ID otherwise
            let target =
                if clear_by == ClearBy::MessageId && message_ids.iter().all(|m| m.len() == 32) {
                    ClearTarget::MessageIds(message_ids)
                } else {
                    ClearTarget::Ids(group.events.iter().map(|e| e.1).collect())
                };
            OfflineCommand::Clear {
                process_id: group.process_id.clone(),
                target,
            }
        }
        SettleAction::Error => OfflineCommand::Error {
            process_id: group.process_id.clone(),
            message_ids,
        },
    }
}
