//! The poll loops as seen from outside, the one record of how each portal's rounds go: each
//! poller marks the start and end of its rounds and how they ended. systemd's watchdog is fed
//! only while no round has been running for longer than any round legitimately can and every
//! supervised task (`crate::supervisor`) is running, and
//! `READY=1` waits for every portal's first round (recovery: resume, sweep, settle); `/readyz`
//! and the alerts read the failures from here. Also the one-line `STATUS=` summary.

use crate::journal::Journal;
use crate::supervisor::Supervisor;
use crate::systemd::Notifier;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Longer than any round can take while working: the longest rate-limit wait the client accepts
/// (15 min) plus several request timeouts. A round running longer is stuck.
pub(crate) const STUCK_ROUND: Duration = Duration::from_secs(20 * 60);
/// `READY=1` is sent at the latest this long after start, even if a portal's first round is
/// still running (a portal down at start must not fail the service's start-up).
const READY_AT_THE_LATEST: Duration = Duration::from_secs(60);
/// How often `STATUS=` is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// How a portal's rounds have gone (settle, sweep, error lane, fetch).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct PollState {
    /// Rounds in a row in which the portal answered nothing before failing; 0 after a round
    /// that succeeded (or before the first round has ended).
    pub failures: u32,
    /// The last failure needs an operator (bad credentials, a revoked application, …): the
    /// poller retries only every few minutes, or on reload.
    pub fatal: bool,
    /// The error of the last failed round.
    pub last_error: Option<String>,
    /// When a round last succeeded.
    pub last_success: Option<chrono::DateTime<chrono::Utc>>,
    /// The poller ended: the portal refused the configured mode.
    pub stopped: Option<String>,
    /// Since when every round has failed (monotonic); `None` while rounds succeed.
    pub failing_since: Option<Instant>,
}

/// One portal's poll loop, as seen from outside.
#[derive(Default)]
pub(crate) struct LoopState {
    /// Milliseconds since `Liveness::start` when the current round began; 0 when between rounds.
    round_started_ms: AtomicU64,
    first_round_done: AtomicBool,
    poll: std::sync::Mutex<PollState>,
}

impl LoopState {
    fn poll(&self) -> std::sync::MutexGuard<'_, PollState> {
        self.poll.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The poll loops of every portal.
pub struct Liveness {
    start: Instant,
    loops: BTreeMap<String, Arc<LoopState>>,
    first_rounds: Notify,
}

/// A poller's handle on its own [`LoopState`].
#[derive(Clone)]
pub(crate) struct LoopHandle {
    liveness: Arc<Liveness>,
    state: Arc<LoopState>,
}

impl LoopHandle {
    pub(crate) fn round_started(&self) {
        let ms = self.liveness.start.elapsed().as_millis() as u64;
        self.state
            .round_started_ms
            .store(ms.max(1), Ordering::SeqCst);
    }

    /// A round ended without an error.
    pub(crate) fn round_succeeded(&self) {
        {
            let mut poll = self.state.poll();
            poll.failures = 0;
            poll.fatal = false;
            poll.last_error = None;
            poll.last_success = Some(chrono::Utc::now());
            poll.failing_since = None;
        }
        self.round_ended();
    }

    /// A round failed (a failed round is still a live loop); `failures` counts such rounds in
    /// a row, `fatal` says the error needs an operator.
    pub(crate) fn round_failed(&self, failures: u32, error: &str, fatal: bool) {
        {
            let mut poll = self.state.poll();
            poll.failures = failures;
            poll.fatal = fatal;
            poll.last_error = Some(error.to_string());
            poll.failing_since.get_or_insert_with(Instant::now);
        }
        self.round_ended();
    }

    /// The poller ended for good: the portal refused the configured mode.
    pub(crate) fn stopped(&self, reason: &str) {
        {
            let mut poll = self.state.poll();
            poll.stopped = Some(reason.to_string());
            poll.last_error = Some(reason.to_string());
            poll.failing_since.get_or_insert_with(Instant::now);
        }
        self.round_ended();
    }

    fn round_ended(&self) {
        self.state.round_started_ms.store(0, Ordering::SeqCst);
        if !self.state.first_round_done.swap(true, Ordering::SeqCst) {
            self.liveness.first_rounds.notify_waiters();
        }
    }
}

impl Liveness {
    pub fn new<'a>(portals: impl IntoIterator<Item = &'a String>) -> Arc<Liveness> {
        Arc::new(Liveness {
            start: Instant::now(),
            loops: portals
                .into_iter()
                .map(|p| (p.clone(), Arc::default()))
                .collect(),
            first_rounds: Notify::new(),
        })
    }

    pub(crate) fn handle(self: &Arc<Liveness>, portal: &str) -> LoopHandle {
        LoopHandle {
            liveness: self.clone(),
            state: self.loops.get(portal).cloned().unwrap_or_default(),
        }
    }

    /// Portals whose current round has run longer than `limit`.
    pub(crate) fn stuck(&self, limit: Duration) -> Vec<(String, Duration)> {
        let now = self.start.elapsed();
        self.loops
            .iter()
            .filter_map(|(portal, state)| {
                let started = state.round_started_ms.load(Ordering::SeqCst);
                let running = now.saturating_sub(Duration::from_millis(started));
                (started > 0 && running > limit).then(|| (portal.clone(), running))
            })
            .collect()
    }

    /// Portals whose every round has failed for longer than `limit`, with the last error.
    pub(crate) fn failing(&self, limit: Duration) -> Vec<(String, Duration, String)> {
        self.loops
            .iter()
            .filter_map(|(portal, state)| {
                let poll = state.poll();
                let how_long = poll.failing_since?.elapsed();
                let error = poll.last_error.clone().unwrap_or_default();
                (how_long >= limit).then(|| (portal.clone(), how_long, error))
            })
            .collect()
    }

    /// How every portal's rounds have gone, by name.
    pub(crate) fn poll_states(&self) -> BTreeMap<String, PollState> {
        self.loops
            .iter()
            .map(|(portal, state)| (portal.clone(), state.poll().clone()))
            .collect()
    }

    pub(crate) fn portals(&self) -> impl Iterator<Item = &String> {
        self.loops.keys()
    }

    fn all_first_rounds_done(&self) -> bool {
        self.loops
            .values()
            .all(|s| s.first_round_done.load(Ordering::SeqCst))
    }

    /// Waits until every portal finished its first round, or `limit` passed.
    async fn first_rounds(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.first_rounds.notified();
            if self.all_first_rounds_done() {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.all_first_rounds_done();
            }
        }
    }
}

/// Sends `READY=1` once recovery ran, then keeps `STATUS=` current and feeds the watchdog
/// while the poll loops are alive, until shutdown.
pub(crate) async fn notify_systemd(
    notifier: Notifier,
    liveness: Arc<Liveness>,
    tasks: Supervisor,
    journal: Journal,
    shutdown: CancellationToken,
) {
    if !notifier.is_active() {
        return;
    }
    let watchdog = notifier.watchdog_interval().map(|i| i / 2);
    let watchdog_task = watchdog.map(|every| {
        let notifier = notifier.clone();
        let liveness = liveness.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut warned = false;
            loop {
                let stuck = liveness.stuck(STUCK_ROUND);
                let dead = tasks.dead();
                if stuck.is_empty() && dead.is_empty() {
                    notifier.watchdog();
                    warned = false;
                } else if !warned {
                    for (portal, running) in &stuck {
                        tracing::error!(%portal, running = ?running, "a poll round is stuck: no longer feeding the systemd watchdog, so systemd restarts the daemon");
                    }
                    for task in &dead {
                        tracing::error!(task = %task.task, cause = %task.cause, "a supervised task is not running: not feeding the systemd watchdog until it runs again");
                    }
                    warned = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        })
    });

    tokio::select! {
        all = liveness.first_rounds(READY_AT_THE_LATEST) => {
            if !all {
                tracing::warn!(after = ?READY_AT_THE_LATEST, "telling systemd we are ready before every portal finished its first round");
            }
            notifier.ready();
        }
        _ = shutdown.cancelled() => {}
    }

    let mut status = StatusLine::default();
    while !shutdown.is_cancelled() {
        match status.refresh(&journal, liveness.loops.keys()).await {
            Ok(line) => notifier.status(&line),
            Err(e) => tracing::debug!(error = format!("{e:#}"), "no status line this time"),
        }
        tokio::select! {
            _ = tokio::time::sleep(STATUS_EVERY) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    if let Some(task) = watchdog_task {
        task.abort();
    }
}

/// The `STATUS=` summary: per portal the unsettled events, events fetched in the last minute,
/// and events still to be delivered.
#[derive(Default)]
struct StatusLine {
    /// `(when, highest event row then)`, oldest first, covering about a minute.
    marks: VecDeque<(Instant, i64)>,
}

impl StatusLine {
    async fn refresh<'a>(
        &mut self,
        journal: &Journal,
        portals: impl Iterator<Item = &'a String>,
    ) -> anyhow::Result<String> {
        let now = Instant::now();
        let since = self.marks.front().map(|m| m.1);
        let (max_row, fetched) = journal.events_since_row(since).await?;
        let window = self
            .marks
            .front()
            .map(|m| now - m.0)
            .unwrap_or(Duration::ZERO);
        self.marks.push_back((now, max_row));
        while self
            .marks
            .front()
            .is_some_and(|m| now - m.0 > Duration::from_secs(60))
        {
            self.marks.pop_front();
        }
        let mut parts = Vec::new();
        for portal in portals {
            let unsettled = journal.unsettled_count(portal).await?;
            let undelivered = journal.undelivered_count(portal).await?;
            let rate = match window.as_secs_f64() {
                w if w >= 1.0 => {
                    let n = fetched.get(portal).copied().unwrap_or(0) as f64;
                    format!("{:.0} ev/min", n * 60.0 / w)
                }
                _ => "starting".to_string(),
            };
            parts.push(format!(
                "{portal}: {unsettled} unsettled, {rate}, {undelivered} to deliver"
            ));
        }
        Ok(parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stuck_rounds_and_first_rounds() {
        let portals = vec!["a".to_string(), "b".to_string()];
        let liveness = Liveness::new(&portals);
        let a = liveness.handle("a");
        let b = liveness.handle("b");
        assert!(!liveness.first_rounds(Duration::from_millis(10)).await);
        a.round_started();
        b.round_started();
        b.round_failed(1, "portal down", false);
        assert_eq!(liveness.failing(Duration::ZERO).len(), 1);
        assert_eq!(liveness.poll_states()["b"].failures, 1);
        assert!(liveness.failing(Duration::from_secs(60)).is_empty());
        tokio::time::sleep(Duration::from_millis(30)).await;
        let stuck = liveness.stuck(Duration::from_millis(20));
        assert_eq!(stuck.len(), 1);
        assert_eq!(stuck[0].0, "a");
        assert!(liveness.stuck(Duration::from_secs(60)).is_empty());
        a.round_succeeded();
        assert!(
            liveness.stuck(Duration::from_millis(20)).is_empty(),
            "between rounds is alive"
        );
        b.round_succeeded();
        assert!(
            liveness.failing(Duration::ZERO).is_empty(),
            "a good round clears it"
        );
        let b = &liveness.poll_states()["b"];
        assert_eq!((b.failures, b.last_error.as_deref()), (0, None));
        assert!(b.last_success.is_some());
        assert!(liveness.first_rounds(Duration::from_millis(10)).await);
    }
}
