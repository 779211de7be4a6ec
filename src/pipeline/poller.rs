//! The poller of one portal: settles finished events first, adopts orphaned reservations, polls
//! the error lane on its schedule, and reserves new batches (`clear=0`) while fewer than
//! `max_unsettled` events are open. Also the cron schedules that wake it.

use super::liveness::LoopHandle;
use super::settle::SettleAction;
use super::{SharedRoutes, Wakers};
use crate::bitrix::client::{ClearTarget, GetRequest};
use crate::bitrix::{BitrixError, ErrorClass, OfflineEvent, PortalClient};
use crate::config::{Config, Mode, PortalConfig};
use crate::envelope::Lane;
use crate::journal::{BatchOrigin, Journal, NewBatch, NewEvent};
use crate::metrics::Metrics;
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
/// Longest backoff after transient failures.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

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
}

/// The cron schedules (tokio-cron-scheduler, local time, with seconds) of every portal.
pub struct Schedules {
    scheduler: JobScheduler,
    triggers: HashMap<String, Triggers>,
    prune: Arc<Trigger>,
}

impl Schedules {
    pub async fn start(config: &Config) -> anyhow::Result<Schedules> {
        let scheduler = JobScheduler::new().await?;
        let mut triggers = HashMap::new();
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
                let job = Job::new_async_tz(schedule.as_str(), chrono::Local, move |_, _| {
                    trigger.set();
                    Box::pin(async {})
                })
                .map_err(|e| {
                    anyhow::anyhow!("portals.{}.{what}: invalid schedule: {e}", portal.name)
                })?;
                scheduler.add(job).await?;
            }
            triggers.insert(portal.name.clone(), t);
        }
        let prune = Arc::new(Trigger::default());
        let trigger = prune.clone();
        let job = Job::new_async_tz(
            config.journal.prune_schedule.as_str(),
            chrono::Local,
            move |_, _| {
                trigger.set();
                Box::pin(async {})
            },
        )
        .map_err(|e| anyhow::anyhow!("journal.prune_schedule: invalid schedule: {e}"))?;
        scheduler.add(job).await?;
        scheduler.start().await?;
        Ok(Schedules {
            scheduler,
            triggers,
            prune,
        })
    }

    /// Set on `journal.prune_schedule`.
    pub fn prune_trigger(&self) -> Arc<Trigger> {
        self.prune.clone()
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
}

impl Settler {
    /// Settles everything that is ready. A call the portal rejects (a problem with that one
    /// reservation) is logged and left pending without holding up the others; any other
    /// failure (limits, auth, transport) stops the round.
    pub async fn settle(&self) -> anyhow::Result<usize> {
        let mut settled = 0;
        for group in self.journal.pending_settlements(&self.portal).await? {
            let ids: Vec<i64> = group.events.iter().map(|e| e.0).collect();
            let message_ids: Vec<String> = group.events.iter().map(|e| e.2.clone()).collect();
            let sent = match group.action {
                SettleAction::Clear => {
                    // clear validates message_id as exactly 32 characters; fall back to ID otherwise
                    let target = if message_ids.iter().all(|m| m.len() == 32) {
                        ClearTarget::MessageIds(message_ids)
                    } else {
                        ClearTarget::Ids(group.events.iter().map(|e| e.1).collect())
                    };
                    self.client.offline_clear(&group.process_id, &target).await
                }
                SettleAction::Error => {
                    self.client
                        .offline_error(&group.process_id, &message_ids)
                        .await
                }
            };
            match sent {
                Ok(()) => {}
                Err(e) if e.class == ErrorClass::Rejected => {
                    tracing::error!(
                        portal = %self.portal,
                        process_id = %group.process_id,
                        method = group.action.method(),
                        events = group.events.len(),
                        error = %e,
                        "the portal rejected a settle call; it stays pending and is retried"
                    );
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            self.journal.mark_settled(ids, group.action).await?;
            tracing::info!(
                portal = %self.portal,
                process_id = %group.process_id,
                lane = group.lane.as_str(),
                method = group.action.method(),
                events = group.events.len(),
                "settled upstream"
            );
            settled += group.events.len();
        }
        Ok(settled)
    }

    /// Settles what it can, logging failures (used at shutdown).
    pub async fn settle_all(&self) {
        if let Err(e) = self.settle().await {
            tracing::warn!(portal = %self.portal, error = format!("{e:#}"), "settle at shutdown failed: resent on the next start");
        }
    }
}

/// How a fetch went.
enum Fetched {
    /// As many events as asked for: fetch again at once.
    Full,
    /// Fewer: the queue is drained for now.
    Partial,
}

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
    ) -> Poller {
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
        }
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
        let mut resumed = false;
        let mut next_fetch = Instant::now();
        let mut failures = 0u32;
        let mut last_error = String::new();
        while !self.shutdown.is_cancelled() {
            // A round stuck in a long wait (a 429 can ask for minutes) must not hold up a
            // shutdown: once it is requested, the round gets STEP_GRACE, then is dropped. Whatever
            // it was doing is recovered on the next start (open batches, pending settles, sweep).
            let answered_before = self.client.stats().ok;
            self.liveness.round_started();
            let round = tokio::select! {
                round = self.step(&mut resumed, &mut next_fetch) => round,
                _ = async {
                    self.shutdown.cancelled().await;
                    tokio::time::sleep(STEP_GRACE).await;
                } => {
                    tracing::warn!(portal = %self.portal(), "abandoning a portal call at shutdown: it is resumed on the next start");
                    break;
                }
            };
            self.liveness
                .round_finished(round.as_ref().err().map(|e| format!("{e:#}")));
            let wait = match round {
                Ok(wait) => {
                    if failures > 0 {
                        tracing::info!(portal = %self.portal(), "portal recovered");
                    }
                    self.metrics.poll_succeeded(self.portal());
                    failures = 0;
                    last_error.clear();
                    wait
                }
                Err(e) => {
                    // The backoff grows while the portal answers nothing; a round that got
                    // answers before failing starts it over (the portal is up, a call failed).
                    if self.client.stats().ok > answered_before {
                        failures = 0;
                    }
                    failures += 1;
                    let bitrix = e.downcast_ref::<BitrixError>();
                    let fatal = bitrix.is_some_and(|b| b.class == ErrorClass::Fatal);
                    let message = format!("{e:#}");
                    if let Some(b) = bitrix
                        && self.reserving()
                        && refuses_reserve_mode(b)
                    {
                        tracing::error!(portal = %self.portal(), error = %message, "portal stopped: its plan has no reserve mode");
                        self.metrics.poll_stopped(self.portal(), &message);
                        return Some(ConfigMismatch {
                            portal: self.portal().to_string(),
                            message,
                        });
                    }
                    self.metrics
                        .poll_failed(self.portal(), failures, &message, fatal);
                    let wait = if fatal {
                        FATAL_RETRY
                    } else {
                        (Duration::from_millis(250) * (1 << failures.min(8))).min(MAX_BACKOFF)
                    };
                    if fatal && message == last_error {
                        tracing::debug!(portal = %self.portal(), error = %message, "portal still failing");
                    } else if fatal {
                        tracing::error!(portal = %self.portal(), error = %message, retry_in = ?wait, "portal stopped until the cause is fixed");
                    } else {
                        tracing::warn!(portal = %self.portal(), error = %message, retry_in = ?wait, "portal call failed; backing off");
                    }
                    last_error = message;
                    next_fetch = next_fetch.max(Instant::now() + wait);
                    // Schedules do not cut a backoff short (their flags stay set). Finished
                    // deliveries do after a transient failure, so settles are not held up; a
                    // portal failing for a reason an operator must fix is left alone.
                    let settled = async {
                        if fatal {
                            std::future::pending::<()>().await
                        } else {
                            settle_wake.notified().await
                        }
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = settled => {}
                        _ = self.shutdown.cancelled() => {}
                    }
                    continue;
                }
            };
            let Some(wait) = wait else { continue };
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

    /// One round: settle, recover, fetch. Returns how long to wait before the next round
    /// (`None`: go on at once).
    async fn step(
        &self,
        resumed: &mut bool,
        next_fetch: &mut Instant,
    ) -> anyhow::Result<Option<Duration>> {
        if !*resumed {
            if self.reserving() {
                self.resume_open_batches().await?;
            }
            *resumed = true;
        }
        self.settler.settle().await?;
        if self.triggers.orphan_sweep.take()
            && self.reserving()
            && let Err(e) = self.sweep_orphans().await
        {
            self.triggers.orphan_sweep.set_quietly();
            return Err(e);
        }
        if self.triggers.error_lane.take() {
            loop {
                if self.shutdown.is_cancelled() {
                    return Ok(None);
                }
                let Some(limit) = self.fetch_limit().await? else {
                    // At the cap: poll the error lane again once settles have made room.
                    self.triggers.error_lane.set_quietly();
                    break;
                };
                match self.fetch(Lane::Error, limit).await {
                    Ok(Fetched::Full) => continue,
                    Ok(Fetched::Partial) => break,
                    Err(e) => {
                        self.triggers.error_lane.set_quietly();
                        return Err(e);
                    }
                }
            }
        }
        let now = Instant::now();
        if now < *next_fetch {
            return Ok(Some(*next_fetch - now));
        }
        let Some(limit) = self.fetch_limit().await? else {
            // Wait for settles (they wake us) rather than fetching more.
            return Ok(Some(self.config.poll_interval));
        };
        match self.fetch(Lane::Normal, limit).await? {
            Fetched::Full => {
                *next_fetch = Instant::now();
                Ok(None)
            }
            Fetched::Partial => {
                *next_fetch = Instant::now() + self.config.poll_interval;
                Ok(Some(self.config.poll_interval))
            }
        }
    }

    /// How many events the next fetch may reserve without passing `max_unsettled`; `None` when
    /// the portal is at the cap.
    async fn fetch_limit(&self) -> anyhow::Result<Option<u32>> {
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
        Ok(Some(
            u32::try_from(room)
                .unwrap_or(u32::MAX)
                .min(self.config.batch_size),
        ))
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
            return Ok(Fetched::Partial);
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
            .record(&process_id, lane, BatchOrigin::Fetched, batch.events, false)
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
            Fetched::Partial
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
            .record(&local_id, lane, BatchOrigin::Fetched, events, true)
            .await
        {
            tracing::error!(portal = %self.portal(), events = count, error = format!("{e:#}"), "fetch-delete mode: the journal failed after the portal deleted the batch; those events are lost");
            return Err(e);
        }
        tracing::info!(portal = %self.portal(), lane = lane.as_str(), batch = %local_id, events = count, "fetched (deleted upstream) and journaled");
        Ok(if count >= limit as usize {
            Fetched::Full
        } else {
            Fetched::Partial
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
    ) -> anyhow::Result<usize> {
        let portal = self.portal().to_string();
        let routes = self.routes.current();
        let events = events
            .into_iter()
            .map(|e| NewEvent {
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
        let recorded = self
            .journal
            .record_batch(NewBatch {
                portal,
                process_id: process_id.to_string(),
                lane,
                origin,
                events,
                deleted_upstream,
            })
            .await?;
        if recorded.inserted > 0 {
            self.metrics
                .fetched(self.portal(), recorded.inserted as u64);
            self.wakers.wake_sinks();
        }
        if !recorded.known_settled.is_empty() {
            let ids = recorded.known_settled.iter().map(|(id, _)| *id).collect();
            tracing::warn!(portal = %self.portal(), %process_id, events = recorded.known_settled.len(), "settled events still reserved upstream: clearing them again");
            self.client
                .offline_clear(process_id, &ClearTarget::Ids(ids))
                .await?;
        }
        Ok(recorded.inserted)
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
        let batch = self.client.offline_get(&request).await?;
        self.record(process_id, lane, origin, batch.events, false)
            .await
    }

    /// Finds reservations the portal holds but the journal does not know (their `get` answer was
    /// lost) and adopts them. One `event.offline.list` call when the counts agree.
    async fn sweep_orphans(&self) -> anyhow::Result<()> {
        let filter = serde_json::json!({">PROCESS_ID": ""});
        let first = self.client.offline_list(filter.clone(), 0).await?;
        let unsettled = self.journal.unsettled_count(self.portal()).await?;
        if first.total <= unsettled {
            tracing::debug!(portal = %self.portal(), upstream_reserved = first.total, unsettled, "orphan sweep: nothing to adopt");
            return Ok(());
        }
        let mut reservations: BTreeMap<String, bool> = BTreeMap::new();
        let mut page = first;
        loop {
            for item in &page.items {
                reservations.insert(item.process_id.clone(), item.error);
            }
            match page.next {
                Some(next) if !self.shutdown.is_cancelled() => {
                    page = self.client.offline_list(filter.clone(), next).await?;
                }
                _ => break,
            }
        }
        let known = self.journal.known_process_ids(self.portal()).await?;
        for (process_id, error) in reservations {
            if known.get(&process_id) == Some(&false) {
                continue; // ours and in progress
            }
            let lane = if error { Lane::Error } else { Lane::Normal };
            let adopted = self.reread(&process_id, lane, BatchOrigin::Adopted).await?;
            tracing::warn!(portal = %self.portal(), %process_id, lane = lane.as_str(), events = adopted, "adopted an orphaned reservation (its get response was lost)");
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
