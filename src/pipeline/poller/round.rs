//! The poll loop of one portal. Each round: resume open reservations (once), sweep orphans
//! when flagged, poll the error lane when its schedule fired, one combined request (settle
//! calls and gets), enrichment; then the wait before the next round: none after a full
//! fetch, `poll_interval` doubling to `idle_poll_max` while the queue is empty, the backoff
//! after a failure (5 minutes for an error an operator must fix, cut short by a reload).

use super::settler::{Fetch, Packed};
use super::{ConfigMismatch, Fetched, Poller, later, refuses_reserve_mode};
use crate::bitrix::client::{GetRequest, OfflineCommand, OfflineOutcome};
use crate::bitrix::{BitrixError, ErrorClass};
use crate::envelope::Lane;
use crate::journal::{BatchOrigin, PendingSettlement};
use crate::pipeline::backoff::{Backoff, Operation};
use crate::pipeline::economy::{self, FetchWidth};
use std::time::Duration;
use tokio::time::Instant;

/// Backoff after a fatal (operator-needed) error: the portal keeps trying at this pace.
const FATAL_RETRY: Duration = Duration::from_secs(300);
/// How long a poller waits for its lease's renewal when too little lease time is left.
const LEASE_WAIT: Duration = Duration::from_millis(500);
/// How long a poller round may go on after shutdown was requested.
const STEP_GRACE: Duration = Duration::from_secs(10);

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

/// When the next fetch comes, after a round.
#[derive(Debug, PartialEq, Eq)]
enum NextFetch {
    /// A full fetch: fetch again at once.
    AtOnce,
    /// No fetch this round, and none was due: the one planned stands.
    AsPlanned,
    /// Fetch again after this long.
    After(Duration),
}

/// A portal's idle pacing (`poll_interval`, `idle_poll_max`).
struct Pacing {
    poll_interval: Duration,
    idle_poll_max: Duration,
}

impl Pacing {
    /// The next fetch after a round whose fetch went as `fetched` (`None`: no get was sent;
    /// `fetch_due`: one was due), counting the empty polls in a row.
    fn next_fetch(
        &self,
        fetched: Option<Fetched>,
        fetch_due: bool,
        empty_polls: &mut u32,
    ) -> NextFetch {
        match fetched {
            None if !fetch_due => NextFetch::AsPlanned,
            // At max_unsettled: settles wake the poller, the interval is a fallback.
            None => NextFetch::After(self.poll_interval),
            Some(Fetched::Full) => {
                *empty_polls = 0;
                NextFetch::AtOnce
            }
            Some(Fetched::Partial { events }) => {
                *empty_polls = if events == 0 {
                    empty_polls.saturating_add(1)
                } else {
                    0
                };
                NextFetch::After(economy::idle_wait(
                    self.poll_interval,
                    self.idle_poll_max,
                    *empty_polls,
                ))
            }
            Some(Fetched::Paused(wait)) => NextFetch::After(wait),
        }
    }
}

/// The wait after a failed round: the failing operation's backoff, or [`FATAL_RETRY`] for an
/// error an operator must fix.
fn wait_after_failure(fatal: bool, backoff: Duration) -> Duration {
    if fatal { FATAL_RETRY } else { backoff }
}

impl Poller {
    /// Runs until shutdown, or until the portal refuses the configured mode (returned as a
    /// configuration error for the daemon to report).
    pub(crate) async fn run(self) -> Option<ConfigMismatch> {
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
            width: FetchWidth::for_requests(self.pipeline()),
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
                    let wait = wait_after_failure(fatal, backoff);
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
        if !self.lease_allows_call() {
            // Clustered, and the lease may run out before a call would end: no upstream call
            // until it is renewed (or this portal's work is stopped).
            return Ok(Some(LEASE_WAIT));
        }
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
            if !state.backoff.due(Operation::Sweep) || !self.lease.sweep_due() {
                // Backing off, or a new owner's grace: the former owner's calls may still be
                // in flight, and what they reserve is theirs to journal until the grace ends.
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
                if self.shutdown.is_cancelled() || !self.lease_allows_call() {
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
        if let Some(Fetched::Paused(wait)) = fetched {
            let get = self.client.operating("event.offline.get");
            tracing::info!(
                portal = %self.portal(),
                wait = ?wait,
                used = ?get.used(),
                reset_at = ?get.reset_at,
                banned = get.banned_until.is_some(),
                "event.offline.get has used its share of the operating-time limit: fetching again when the oldest minute of its window drops out"
            );
        }
        let pacing = Pacing {
            poll_interval: self.config.poll_interval,
            idle_poll_max: self.config.idle_poll_max,
        };
        match pacing.next_fetch(fetched, fetch_due, &mut state.empty_polls) {
            NextFetch::AtOnce => {
                state.next_fetch = Instant::now();
                Ok(None)
            }
            NextFetch::AsPlanned => Ok(Some(state.next_fetch - now)),
            NextFetch::After(wait) => {
                state.next_fetch = later(wait);
                Ok(Some(wait))
            }
        }
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
            if !self.lease_allows_call() {
                return Ok(None);
            }
            let now = self.client.portal_now();
            let budgets = self.budgets();
            // Each request of a wave is a `batch` call: no more of them than its time pays for.
            let batches = budgets.batch.affordable(now);
            let requests = self.pipeline().min(batches as usize).max(1);
            let packed = Packed::choose(
                self.journal.pending_settlements(self.portal()).await?,
                budgets.clear.affordable(now),
                budgets.error.affordable(now),
                batches > 0,
                requests,
            );
            // Held back for the time limit: come back when it allows (the fetch may wait longer).
            state.settles_held_until = packed.held_back.then(|| {
                let pause = [budgets.clear, budgets.error]
                    .iter()
                    .filter_map(|b| b.pause(now))
                    .min();
                later(pause.unwrap_or(self.config.poll_interval))
            });
            let mut limits = Vec::new();
            if let Some(slots) = packed.get_slots(fetch) {
                if let Some(wait) = budgets.get.pause(now) {
                    if packed.groups.is_empty() {
                        return Ok(Some(Fetched::Paused(wait)));
                    }
                } else if let Some(room) = self.fetch_room().await? {
                    limits = state.width.plan(
                        room,
                        self.config.batch_size,
                        slots.min(budgets.get.affordable(now)),
                    );
                }
            }
            let capacity = packed.capacity;
            let mut groups = packed.groups;
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
                requests,
                get_used = ?budgets.get.time.used(),
                get_call = ?budgets.get.time.call,
                batch_used = ?budgets.batch.time.used(),
                "combined request"
            );
            let more_settles = groups.len() == capacity;
            let settles = !groups.is_empty();
            let operation = if limits.is_empty() {
                Operation::Settle
            } else {
                Operation::Fetch
            };
            let fetched = self.wave(groups, &limits, requests, &mut state.width).await;
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

    /// One wave: the settle calls and gets spread over up to `requests` combined requests sent
    /// at once ([`split_wave`]). The reservations of the requests that have answered are
    /// journaled while the others are still out: whatever answered while one journal call ran
    /// goes into the next, in one transaction (a group commit: at most one commit per request,
    /// one per wave when they answer together). When every request has answered and its
    /// reservations are journaled, the settle calls the portal confirmed are marked in one more
    /// transaction. A request that failed is retried in a later round (its settle calls stay
    /// pending; a lost answer may have reserved batches, which the orphan sweep adopts); the
    /// first failure is returned once the others' reservations are journaled. A journal call
    /// that fails stops the journaling of the rest of the wave: what it reserved stays reserved
    /// upstream for the orphan sweep. Bitrix24 allows gets side by side:
    /// "several parallel requests to /rest/event.offline.get are permitted (subject to rate
    /// limits), and each will receive a different set of records" (bitrix24/b24restdocs
    /// `api-reference/events/event-offline-get.md`); the server reserves with one
    /// `UPDATE … SET PROCESS_ID = <new id> WHERE PROCESS_ID = '' … LIMIT n`
    /// (`Bitrix\Rest\EventOfflineTable::markEvents` in `modules/rest/lib/eventoffline.php`,
    /// the statement from `EventOfflineQuery::getMarkQuery`), so two gets never share a row.
    async fn wave(
        &self,
        groups: Vec<PendingSettlement>,
        limits: &[u32],
        requests: usize,
        width: &mut FetchWidth,
    ) -> anyhow::Result<Option<Fetched>> {
        use futures_util::StreamExt;
        let parts = split_wave(groups, limits, requests);
        let mut answers: futures_util::stream::FuturesUnordered<_> = parts
            .iter()
            .enumerate()
            .map(|(i, (g, l))| async move { (i, self.combined(g, l).await) })
            .collect();
        // Each request's settle outcomes, by its place in `parts` (`None`: it failed).
        let mut settle_outcomes: Vec<Option<Vec<OfflineOutcome>>> =
            parts.iter().map(|_| None).collect();
        let mut wave = Combined::default();
        let mut failed = None;
        // Reservations answered and not yet journaled, and the journal call in flight.
        let mut waiting: Vec<(String, Vec<crate::bitrix::OfflineEvent>)> = Vec::new();
        let mut journaling: Option<futures_util::future::BoxFuture<'_, anyhow::Result<usize>>> =
            None;
        let mut journal_failed: Option<anyhow::Error> = None;
        let mut process_ids: Vec<String> = Vec::new();
        loop {
            if journaling.is_none() && journal_failed.is_none() && !waiting.is_empty() {
                let reservations = std::mem::take(&mut waiting);
                process_ids.extend(reservations.iter().map(|(p, _)| p.clone()));
                journaling = Some(Box::pin(self.record_many(
                    reservations,
                    Lane::Normal,
                    BatchOrigin::Fetched,
                )));
            }
            if answers.is_empty() && journaling.is_none() {
                break;
            }
            tokio::select! {
                Some((i, answer)) = answers.next(), if !answers.is_empty() => match answer {
                    Ok(c) => {
                        wave.asked += c.asked;
                        wave.full += c.full;
                        wave.events += c.events;
                        wave.elapsed = wave.elapsed.max(c.elapsed);
                        if wave.get_error.is_none() {
                            wave.get_error = c.get_error;
                        }
                        waiting.extend(c.reservations);
                        settle_outcomes[i] = Some(c.settle_outcomes);
                    }
                    Err(e) => {
                        failed.get_or_insert(e);
                    }
                },
                recorded = async { journaling.as_mut().expect("a journal call in flight").await },
                    if journaling.is_some() =>
                {
                    journaling = None;
                    if let Err(e) = recorded {
                        // Reserved upstream but not journaled: the sweep adopts them once the
                        // journal works.
                        self.triggers.orphan_sweep.set_quietly();
                        journal_failed = Some(e);
                    }
                }
            }
        }
        drop(answers);
        if let Some(e) = journal_failed {
            return Err(e);
        }
        if !process_ids.is_empty() {
            tracing::info!(portal = %self.portal(), reservations = process_ids.len(), events = wave.events, process_ids = ?process_ids, "reserved and journaled");
        }
        // Paired per request: a short answer leaves the rest of its calls pending.
        let (groups, outcomes): (Vec<PendingSettlement>, Vec<OfflineOutcome>) = parts
            .into_iter()
            .zip(settle_outcomes)
            .filter_map(|((groups, _), outcomes)| outcomes.map(|o| groups.into_iter().zip(o)))
            .flatten()
            .unzip();
        self.settler.record_outcomes(&groups, outcomes).await?;

        width.observe(wave.asked, wave.full, wave.elapsed);
        if let Some(e) = failed {
            return Err(e);
        }
        if wave.asked == 0 {
            return Ok(None);
        }
        if let Some(e) = wave.get_error {
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
        Ok(Some(if wave.full == wave.asked {
            Fetched::Full
        } else {
            Fetched::Partial {
                events: wave.events,
            }
        }))
    }

    /// One combined request: settle calls, then gets, in one `batch`; nothing is journaled
    /// here (the wave does it).
    async fn combined(
        &self,
        groups: &[PendingSettlement],
        limits: &[u32],
    ) -> anyhow::Result<Combined> {
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
        Ok(Combined {
            asked: limits.len(),
            full,
            events,
            elapsed,
            get_error,
            reservations,
            settle_outcomes,
        })
    }
}

/// What one combined request (or a whole wave) answered, before it is journaled.
#[derive(Default)]
struct Combined {
    /// Gets sent.
    asked: usize,
    /// Gets that came back full.
    full: usize,
    /// Events reserved.
    events: usize,
    /// How long the request took (a wave: its slowest).
    elapsed: Duration,
    /// The first get that failed.
    get_error: Option<anyhow::Error>,
    /// The reservations made, by `process_id`.
    reservations: Vec<(String, Vec<crate::bitrix::OfflineEvent>)>,
    /// The outcomes of the settle calls, in the order of the request's settle groups.
    settle_outcomes: Vec<OfflineOutcome>,
}

/// Spreads a wave's settle calls and gets over at most `requests` requests, round robin (the
/// settle calls first, each request's settles before its gets), so the requests take about
/// the same server time; none is empty.
fn split_wave(
    groups: Vec<PendingSettlement>,
    limits: &[u32],
    requests: usize,
) -> Vec<(Vec<PendingSettlement>, Vec<u32>)> {
    let n = requests.min(groups.len() + limits.len()).max(1);
    let mut parts: Vec<(Vec<PendingSettlement>, Vec<u32>)> =
        (0..n).map(|_| (Vec::new(), Vec::new())).collect();
    let settles = groups.len();
    for (i, group) in groups.into_iter().enumerate() {
        parts[i % n].0.push(group);
    }
    for (i, &limit) in limits.iter().enumerate() {
        parts[(settles + i) % n].1.push(limit);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::backoff::{FIRST_BACKOFF, MAX_BACKOFF};

    const PACING: Pacing = Pacing {
        poll_interval: Duration::from_secs(2),
        idle_poll_max: Duration::from_secs(30),
    };

    fn after(fetched: Option<Fetched>, fetch_due: bool, empty_polls: &mut u32) -> NextFetch {
        PACING.next_fetch(fetched, fetch_due, empty_polls)
    }

    #[test]
    fn a_full_fetch_is_followed_at_once_and_ends_the_idle_count() {
        let mut empty = 4;
        assert_eq!(
            after(Some(Fetched::Full), true, &mut empty),
            NextFetch::AtOnce
        );
        assert_eq!(empty, 0);
    }

    #[test]
    fn empty_polls_double_the_wait_from_poll_interval_up_to_idle_poll_max() {
        let mut empty = 0;
        let waits: Vec<NextFetch> = (0..6)
            .map(|_| after(Some(Fetched::Partial { events: 0 }), true, &mut empty))
            .collect();
        let secs = |s| NextFetch::After(Duration::from_secs(s));
        assert_eq!(
            waits,
            [secs(2), secs(4), secs(8), secs(16), secs(30), secs(30)]
        );
        assert_eq!(empty, 6);
        // Some events, fewer than asked for: the queue is drained, the idle count starts over.
        assert_eq!(
            after(Some(Fetched::Partial { events: 3 }), true, &mut empty),
            secs(2)
        );
        assert_eq!(empty, 0);
    }

    #[test]
    fn a_paused_get_waits_its_budget_and_no_fetch_keeps_the_plan() {
        let mut empty = 2;
        let wait = Duration::from_secs(41);
        assert_eq!(
            after(Some(Fetched::Paused(wait)), true, &mut empty),
            NextFetch::After(wait)
        );
        assert_eq!(after(None, false, &mut empty), NextFetch::AsPlanned);
        // Due but nothing sent (max_unsettled reached): poll_interval as a fallback.
        assert_eq!(
            after(None, true, &mut empty),
            NextFetch::After(Duration::from_secs(2))
        );
        assert_eq!(empty, 2, "only fetches that answered count as empty");
    }

    fn settles(n: usize) -> Vec<PendingSettlement> {
        (0..n)
            .map(|i| PendingSettlement {
                batch_id: i as i64,
                process_id: format!("p{i}"),
                lane: Lane::Normal,
                action: crate::journal::SettleAction::Clear,
                events: Vec::new(),
            })
            .collect()
    }

    #[test]
    fn a_wave_spreads_its_calls_evenly_and_sends_no_empty_request() {
        let parts = split_wave(settles(3), &[50, 50, 50, 50, 20], 4);
        let shape: Vec<(Vec<&str>, Vec<u32>)> = parts
            .iter()
            .map(|(g, l)| (g.iter().map(|g| g.process_id.as_str()).collect(), l.clone()))
            .collect();
        assert_eq!(
            shape,
            [
                (vec!["p0"], vec![50]),
                (vec!["p1"], vec![50]),
                (vec!["p2"], vec![50]),
                (vec![], vec![50, 20]),
            ]
        );
        // Fewer calls than requests: one request per call.
        assert_eq!(split_wave(settles(1), &[50], 16).len(), 2);
        // One request: everything in it, settles first.
        let one = split_wave(settles(2), &[50, 50], 1);
        assert_eq!((one.len(), one[0].0.len(), one[0].1.len()), (1, 2, 2));
        // At most 50 calls per request when the wave holds 50 per request.
        let full = split_wave(settles(70), &[50; 30], 2);
        assert!(full.iter().all(|(g, l)| g.len() + l.len() == 50));
    }

    #[test]
    fn a_failure_waits_its_operation_backoff_and_a_fatal_one_five_minutes() {
        let mut backoff = Backoff::default();
        let fail = |backoff: &mut Backoff| {
            let _ = backoff.track(Operation::Fetch, Err::<(), ()>(()));
            backoff.round_failed().2
        };
        let first = fail(&mut backoff);
        assert_eq!(wait_after_failure(false, first), FIRST_BACKOFF);
        let second = fail(&mut backoff);
        assert_eq!(wait_after_failure(false, second), FIRST_BACKOFF * 2);
        for _ in 0..20 {
            fail(&mut backoff);
        }
        assert_eq!(wait_after_failure(false, fail(&mut backoff)), MAX_BACKOFF);
        assert_eq!(
            wait_after_failure(true, first),
            Duration::from_secs(300),
            "an operator must fix it"
        );
    }
}
