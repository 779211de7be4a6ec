//! The dispatcher of one sink: takes due deliveries from the journal, hands them to the sink,
//! turns the answers into retry/dead/delivered with the retry schedule, and records them.
//!
//! **Logs.** A retry of one delivery is logged at DEBUG (an outage makes thousands); what an
//! operator needs at INFO/WARN is the sink's state changing: one WARN when its deliveries start
//! failing (a batch without a single delivery), one INFO when it delivers again, saying for how
//! long and how many attempts failed ([`SinkHealth`]). A delivery going dead stays a WARN each:
//! it is final.

use super::Wakers;
use super::retry::{Step, next_step};
use crate::config::RetryPolicy;
use crate::journal::{Fenced, Journal, Outcome};
use crate::metrics::{DeliveryOutcome, Metrics};
use crate::sinks::Sink;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How long an idle dispatcher sleeps when nothing is scheduled. The daemon's own new work wakes
/// it at once; this bounds how soon it sees deliveries another process made due (`replay`,
/// `dead retry` from the CLI).
const IDLE_WAIT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub(crate) struct Dispatcher {
    pub(crate) sink: Arc<dyn Sink>,
    pub(crate) policy: RetryPolicy,
    pub(crate) journal: Journal,
    pub(crate) wake: Arc<Notify>,
    pub(crate) wakers: Arc<Wakers>,
    pub(crate) metrics: Metrics,
    pub(crate) stop: CancellationToken,
}

/// A batch the sink has answered, with the outcomes still to be journaled.
struct Answered {
    outcomes: Vec<(i64, Outcome, Option<String>)>,
    /// Per envelope: portal, metrics outcome and fetched → delivered latency.
    counted: Vec<(String, DeliveryOutcome, Option<Duration>)>,
}

impl Answered {
    /// Takes out the outcomes of `portal` (its lease moved: the journal refuses them, its new
    /// owner delivers those events again); returns how many. A batch mixes the portals this
    /// instance owns, and the others' outcomes are still to be journaled: dropping them too
    /// would have this instance deliver them again.
    fn drop_portal(&mut self, portal: &str) -> usize {
        // `outcomes` and `counted` are built side by side, one entry per envelope.
        let keep: Vec<bool> = self.counted.iter().map(|(p, _, _)| p != portal).collect();
        let before = self.outcomes.len();
        let mut flags = keep.iter();
        self.outcomes
            .retain(|_| flags.next().copied().unwrap_or(true));
        let mut flags = keep.iter();
        self.counted
            .retain(|_| flags.next().copied().unwrap_or(true));
        before - self.outcomes.len()
    }
}

impl Dispatcher {
    pub(crate) async fn run(self) {
        let name = self.sink.name().to_string();
        let mut journal_failures = 0u32;
        // Outcomes the journal could not take (disk full, a lock held too long): kept and
        // recorded before anything new is delivered, so a failing journal does not turn into
        // the same batch delivered again and again.
        let mut unrecorded: Option<Answered> = None;
        let mut health = SinkHealth::default();
        while !self.stop.is_cancelled() {
            let step = match unrecorded.take() {
                Some(answered) => self.record(answered).await.map(|()| 1),
                None => match self.deliver_due().await {
                    Ok(None) => Ok(0),
                    Ok(Some(answered)) => {
                        let outcomes = answered.outcomes.iter().map(|(_, o, _)| o);
                        match health.observe(outcomes, std::time::Instant::now()) {
                            Some(Change::Failing { error }) => tracing::warn!(
                                sink = %name,
                                error = %error,
                                "sink failing: its deliveries are retried on the retry schedule (each retry is logged at debug)"
                            ),
                            Some(Change::Recovered {
                                failed_attempts,
                                after,
                            }) => tracing::info!(
                                sink = %name,
                                failed_attempts,
                                failing_for = %humantime::format_duration(Duration::from_secs(after.as_secs())),
                                "sink delivers again"
                            ),
                            None => {}
                        }
                        let count = answered.outcomes.len();
                        self.record(answered).await.map(|()| count)
                    }
                    Err(e) => Err((e, None)),
                },
            };
            match step {
                Ok(0) => {
                    journal_failures = 0;
                    let wait = match self.journal.next_due(&name).await {
                        Ok(Some(at)) if self.beyond_backoff(at) => {
                            self.bring_forward(&name).await;
                            continue;
                        }
                        Ok(Some(at)) => (at - chrono::Utc::now())
                            .to_std()
                            .unwrap_or(Duration::ZERO)
                            .min(IDLE_WAIT),
                        _ => IDLE_WAIT,
                    };
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.wake.notified() => {}
                        _ = self.stop.cancelled() => {}
                    }
                }
                Ok(_) => journal_failures = 0,
                Err((e, answered)) => {
                    journal_failures += 1;
                    let wait = Duration::from_millis(500 * u64::from(journal_failures.min(20)));
                    let kept = answered.as_ref().map_or(0, |a| a.outcomes.len());
                    tracing::error!(sink = %name, error = format!("{e:#}"), unrecorded_outcomes = kept, "journal failed in the dispatcher; retrying");
                    unrecorded = answered;
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stop.cancelled() => {}
                    }
                }
            }
        }
        if let Some(answered) = unrecorded
            && let Err((e, _)) = self.record(answered).await
        {
            tracing::warn!(sink = %name, error = format!("{e:#}"), "outcomes not journaled at shutdown: those events are delivered again after the restart");
        }
    }

    /// The latest retry time this sink could have scheduled by now: it never waits longer
    /// than its `max_backoff` (a second of slack for rounding). A later time means the wall
    /// clock was set back since it was written.
    fn latest_retry(&self) -> chrono::DateTime<chrono::Utc> {
        let horizon = chrono::Duration::from_std(self.policy.max_backoff + Duration::from_secs(1))
            .unwrap_or(chrono::Duration::MAX);
        chrono::Utc::now()
            .checked_add_signed(horizon)
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
    }

    fn beyond_backoff(&self, at: chrono::DateTime<chrono::Utc>) -> bool {
        at > self.latest_retry()
    }

    /// Makes every retry of this sink due whose time lies beyond [`Self::latest_retry`].
    async fn bring_forward(&self, name: &str) {
        let latest = self.latest_retry();
        match self.journal.bring_forward(name, latest).await {
            Ok(count) => tracing::warn!(
                sink = %name,
                deliveries = count,
                max_backoff = ?self.policy.max_backoff,
                "retry times lie beyond the sink's max_backoff (the system clock was set back, or max_backoff lowered): retrying them now"
            ),
            Err(e) => {
                tracing::error!(sink = %name, error = format!("{e:#}"), "journal failed bringing retry times forward");
                tokio::select! {
                    _ = tokio::time::sleep(IDLE_WAIT) => {}
                    _ = self.stop.cancelled() => {}
                }
            }
        }
    }

    /// Delivers one batch of due deliveries; `None` when nothing is due.
    async fn deliver_due(&self) -> anyhow::Result<Option<Answered>> {
        let name = self.sink.name();
        let due = self
            .journal
            .due_deliveries(name, self.sink.max_batch())
            .await?;
        if due.is_empty() {
            return Ok(None);
        }
        // The envelopes move to the sink's batch (no copy of their payloads); what is left of
        // each due delivery is its row, attempts and fetch time, in the same order.
        let (due, envelopes): (Vec<_>, Vec<_>) = due
            .into_iter()
            .map(|d| ((d.event_id, d.attempts, d.fetched_at), d.envelope))
            .unzip();
        let results = self.sink.deliver_with_output(&envelopes).await;
        if results.len() != envelopes.len() {
            anyhow::bail!(
                "sink {name} returned {} results for {} envelopes",
                results.len(),
                envelopes.len()
            );
        }
        let now = chrono::Utc::now();
        let outcomes: Vec<(i64, Outcome, Option<String>)> = due
            .iter()
            .zip(&envelopes)
            .zip(results)
            .map(|((&(event_id, attempts, _), envelope), (result, output))| {
                let attempts = attempts + 1;
                let outcome = match next_step(&self.policy, attempts, result, fastrand::f64()) {
                    Step::Delivered => {
                        tracing::debug!(portal = %envelope.portal, event_id = %envelope.id, sink = %name, attempt = attempts, "delivered");
                        Outcome::Delivered
                    }
                    Step::RetryAfter { error, after } => {
                        tracing::debug!(portal = %envelope.portal, event_id = %envelope.id, sink = %name, attempt = attempts, retry_in = ?after, error = %error, "delivery failed, will retry");
                        Outcome::Retry {
                            error,
                            next_attempt_at: super::retry::retry_at(now, after),
                        }
                    }
                    Step::Dead { error } => {
                        tracing::warn!(portal = %envelope.portal, event_id = %envelope.id, sink = %name, attempt = attempts, error = %error, "delivery dead");
                        Outcome::Dead { error }
                    }
                };
                (event_id, outcome, output)
            })
            .collect();
        let counted = due
            .iter()
            .zip(&envelopes)
            .zip(&outcomes)
            .map(|((&(_, _, fetched_at), envelope), (_, outcome, _))| {
                let (outcome, latency) = match outcome {
                    Outcome::Delivered => (
                        DeliveryOutcome::Delivered,
                        fetched_at.and_then(|at| (now - at).to_std().ok()),
                    ),
                    Outcome::Retry { .. } => (DeliveryOutcome::Retry, None),
                    Outcome::Dead { .. } => (DeliveryOutcome::Dead, None),
                };
                (envelope.portal.clone(), outcome, latency)
            })
            .collect();
        Ok(Some(Answered { outcomes, counted }))
    }

    /// Journals a batch's outcomes (handing them back when the journal fails), then counts them
    /// and wakes the portals that have settle work.
    async fn record(
        &self,
        mut answered: Answered,
    ) -> Result<(), (anyhow::Error, Option<Answered>)> {
        let name = self.sink.name();
        let portals = loop {
            match self
                .journal
                .record_outcomes(name, answered.outcomes.clone())
                .await
            {
                Ok(portals) => break portals,
                Err(e) => {
                    let Some(fenced) = e.chain().find_map(|c| c.downcast_ref::<Fenced>()) else {
                        return Err((e, Some(answered)));
                    };
                    // The portal's lease moved to another instance while this batch was out:
                    // its new owner delivers these events again (a duplicate, never a loss).
                    // The rest of the batch is journaled without them (each round takes out
                    // one portal, so this ends).
                    let dropped = answered.drop_portal(&fenced.portal);
                    tracing::info!(sink = %name, portal = %fenced.portal, deliveries = dropped, "outcomes not journaled: the portal's lease moved to another instance, which redelivers them");
                    if dropped == 0 || answered.outcomes.is_empty() {
                        return Ok(());
                    }
                }
            }
        };
        // Counted once journaled, so the counters never run ahead of the journal.
        for (portal, outcome, latency) in answered.counted {
            self.metrics.delivery(&portal, name, outcome, latency);
        }
        for portal in portals {
            self.wakers.wake_portal(&portal);
        }
        Ok(())
    }
}

/// A sink's state as its logs tell it: delivering, or failing since a batch came back without a
/// single delivery. Pure; fed the outcomes of each batch.
#[derive(Debug, Default)]
struct SinkHealth {
    /// Since when, and how many attempts failed since.
    failing: Option<(std::time::Instant, u64)>,
}

/// A change of [`SinkHealth`], logged once.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    /// A batch came back without a delivery; `error` is its first failure.
    Failing { error: String },
    /// Delivering again after `failed_attempts` failed attempts over `after`.
    Recovered {
        failed_attempts: u64,
        after: Duration,
    },
}

impl SinkHealth {
    fn observe<'a>(
        &mut self,
        outcomes: impl Iterator<Item = &'a Outcome>,
        now: std::time::Instant,
    ) -> Option<Change> {
        let (mut delivered, mut failed, mut first_error) = (0u64, 0u64, None);
        for outcome in outcomes {
            match outcome {
                Outcome::Delivered => delivered += 1,
                Outcome::Retry { error, .. } | Outcome::Dead { error } => {
                    failed += 1;
                    first_error.get_or_insert_with(|| error.clone());
                }
            }
        }
        match &mut self.failing {
            None if delivered == 0 && failed > 0 => {
                self.failing = Some((now, failed));
                Some(Change::Failing {
                    error: first_error.unwrap_or_default(),
                })
            }
            None => None,
            Some((_, count)) if delivered == 0 => {
                *count += failed;
                None
            }
            Some((since, count)) => {
                let change = Change::Recovered {
                    failed_attempts: *count + failed,
                    after: now.saturating_duration_since(*since),
                };
                self.failing = None;
                Some(change)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fenced_portal_takes_only_its_own_outcomes_out_of_a_batch() {
        let mut answered = Answered {
            outcomes: vec![
                (1, Outcome::Delivered, None),
                (2, retry(), Some("out".into())),
                (3, Outcome::Delivered, None),
                (4, Outcome::Delivered, None),
            ],
            counted: ["a", "moved", "b", "moved"]
                .iter()
                .map(|p| (p.to_string(), DeliveryOutcome::Delivered, None))
                .collect(),
        };
        assert_eq!(answered.drop_portal("moved"), 2);
        let ids: Vec<i64> = answered.outcomes.iter().map(|(id, _, _)| *id).collect();
        assert_eq!(ids, [1, 3], "the other portals' outcomes kept, in order");
        let portals: Vec<&str> = answered
            .counted
            .iter()
            .map(|(p, _, _)| p.as_str())
            .collect();
        assert_eq!(portals, ["a", "b"], "each outcome still beside its portal");
        assert_eq!(answered.drop_portal("unknown"), 0);
        assert_eq!(answered.drop_portal("a"), 1);
        assert_eq!(answered.drop_portal("b"), 1);
        assert!(answered.outcomes.is_empty() && answered.counted.is_empty());
    }

    fn retry() -> Outcome {
        Outcome::Retry {
            error: "http 503".into(),
            next_attempt_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn a_sink_logs_when_it_starts_failing_and_when_it_delivers_again_not_per_attempt() {
        let mut h = SinkHealth::default();
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Delivering, and a batch where one event fails while others go through: no change.
        assert_eq!(h.observe([Outcome::Delivered].iter(), at(0)), None);
        assert_eq!(
            h.observe([Outcome::Delivered, retry()].iter(), at(1)),
            None,
            "one event's failure is not the sink failing"
        );
        // A batch without a delivery: failing, once.
        assert_eq!(
            h.observe([retry(), retry()].iter(), at(10)),
            Some(Change::Failing {
                error: "http 503".into()
            })
        );
        for s in 11..20 {
            assert_eq!(
                h.observe([retry()].iter(), at(s)),
                None,
                "no log per attempt"
            );
        }
        let dead = Outcome::Dead {
            error: "http 503".into(),
        };
        assert_eq!(h.observe([dead].iter(), at(25)), None);
        // Delivers again: once, with how long and how many failed.
        assert_eq!(
            h.observe([retry(), Outcome::Delivered].iter(), at(70)),
            Some(Change::Recovered {
                failed_attempts: 2 + 9 + 1 + 1,
                after: Duration::from_secs(60),
            })
        );
        assert_eq!(h.observe([Outcome::Delivered].iter(), at(71)), None);
        // A later outage is a new episode.
        assert!(matches!(
            h.observe([retry()].iter(), at(100)),
            Some(Change::Failing { .. })
        ));
    }
}
