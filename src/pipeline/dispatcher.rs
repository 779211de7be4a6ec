//! The dispatcher of one sink: takes due deliveries from the journal, hands them to the sink,
//! turns the answers into retry/dead/delivered with the retry schedule, and records them.

use super::Wakers;
use super::retry::{Step, next_step};
use crate::config::RetryPolicy;
use crate::journal::{Journal, Outcome};
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

pub struct Dispatcher {
    pub sink: Arc<dyn Sink>,
    pub policy: RetryPolicy,
    pub journal: Journal,
    pub wake: Arc<Notify>,
    pub wakers: Arc<Wakers>,
    pub metrics: Metrics,
    pub stop: CancellationToken,
}

impl Dispatcher {
    pub async fn run(self) {
        let name = self.sink.name().to_string();
        let mut journal_failures = 0u32;
        while !self.stop.is_cancelled() {
            match self.dispatch_once().await {
                Ok(0) => {
                    journal_failures = 0;
                    let wait = match self.journal.next_due(&name).await {
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
                Err(e) => {
                    journal_failures += 1;
                    let wait = Duration::from_millis(500 * u64::from(journal_failures.min(20)));
                    tracing::error!(sink = %name, error = format!("{e:#}"), "journal failed in the dispatcher; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.stop.cancelled() => {}
                    }
                }
            }
        }
    }

    /// Delivers one batch of due deliveries; returns how many there were.
    async fn dispatch_once(&self) -> anyhow::Result<usize> {
        let name = self.sink.name();
        let due = self
            .journal
            .due_deliveries(name, self.sink.max_batch())
            .await?;
        if due.is_empty() {
            return Ok(0);
        }
        let envelopes: Vec<_> = due.iter().map(|d| d.envelope.clone()).collect();
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
            .zip(results)
            .map(|(d, (result, output))| {
                let attempts = d.attempts + 1;
                let outcome = match next_step(&self.policy, attempts, result, fastrand::f64()) {
                    Step::Delivered => {
                        tracing::debug!(portal = %d.envelope.portal, event_id = %d.envelope.id, sink = %name, attempt = attempts, "delivered");
                        Outcome::Delivered
                    }
                    Step::RetryAfter { error, after } => {
                        tracing::info!(portal = %d.envelope.portal, event_id = %d.envelope.id, sink = %name, attempt = attempts, retry_in = ?after, error = %error, "delivery failed, will retry");
                        Outcome::Retry {
                            error,
                            next_attempt_at: now + chrono::Duration::from_std(after).unwrap_or(chrono::Duration::MAX),
                        }
                    }
                    Step::Dead { error } => {
                        tracing::warn!(portal = %d.envelope.portal, event_id = %d.envelope.id, sink = %name, attempt = attempts, error = %error, "delivery dead");
                        Outcome::Dead { error }
                    }
                };
                (d.event_id, outcome, output)
            })
            .collect();
        let counted: Vec<(DeliveryOutcome, Option<Duration>)> = due
            .iter()
            .zip(&outcomes)
            .map(|(d, (_, outcome, _))| match outcome {
                Outcome::Delivered => (
                    DeliveryOutcome::Delivered,
                    d.fetched_at.and_then(|at| (now - at).to_std().ok()),
                ),
                Outcome::Retry { .. } => (DeliveryOutcome::Retry, None),
                Outcome::Dead { .. } => (DeliveryOutcome::Dead, None),
            })
            .collect();
        let portals = self.journal.record_outcomes(name, outcomes).await?;
        // Counted once journaled, so the counters never run ahead of the journal.
        for (d, (outcome, latency)) in due.iter().zip(counted) {
            self.metrics
                .delivery(&d.envelope.portal, name, outcome, latency);
        }
        for portal in portals {
            self.wakers.wake_portal(&portal);
        }
        Ok(due.len())
    }
}
