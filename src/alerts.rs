//! Alerts: the `[alerts]` conditions (unsettled backlog, new dead events, a failing portal, an
//! old pending delivery, a large journal), checked on an interval; each sends one alert envelope
//! to the configured sink when it starts and one when it ends.

use crate::config::AlertsConfig;
use crate::envelope::{Envelope, Lane};
use crate::journal::Journal;
use crate::pipeline::liveness::Liveness;
use crate::sinks::{Sink, SinkResult};
use serde_json::{Value, json};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The `event` of an alert envelope; route a sink to it (or give it `events = ["B24EVENTD_ALERT"]`
/// to keep Bitrix24 events away from it).
pub(crate) const ALERT_EVENT: &str = "B24EVENTD_ALERT";
/// How many times an alert is offered to a sink that answers "retry".
const DELIVERY_TRIES: u32 = 10;

/// The sinks a pipeline runs, by name, as the alerts task finds them (they change on reload).
pub(crate) type SinkDirectory = Arc<RwLock<BTreeMap<String, Arc<dyn Sink>>>>;

/// What a condition did between two checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    Fire,
    Resolve,
}

/// One condition's state: firing after it held for `hold`, resolved when it stops holding.
#[derive(Debug, Default, Clone)]
pub(crate) struct AlertState {
    holding_since: Option<Instant>,
    firing: bool,
}

impl AlertState {
    pub fn observe(&mut self, now: Instant, holds: bool, hold: Duration) -> Option<Transition> {
        if !holds {
            self.holding_since = None;
            return std::mem::take(&mut self.firing).then_some(Transition::Resolve);
        }
        let since = *self.holding_since.get_or_insert(now);
        if !self.firing && now.duration_since(since) >= hold {
            self.firing = true;
            return Some(Transition::Fire);
        }
        None
    }
}

/// One alert about to be sent.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Alert {
    /// `unsettled_backlog`, `dead_events`, `portal_failing`, `oldest_pending`, `journal_size`.
    pub kind: &'static str,
    pub portal: Option<String>,
    pub transition: Transition,
    pub summary: String,
    pub value: Value,
    pub threshold: Value,
}

impl Alert {
    /// The envelope a sink receives: `event` is [`ALERT_EVENT`], `data` the alert.
    pub fn envelope(&self, at: chrono::DateTime<chrono::Utc>) -> Envelope {
        let state = match self.transition {
            Transition::Fire => "firing",
            Transition::Resolve => "resolved",
        };
        let portal = self.portal.clone().unwrap_or_default();
        Envelope {
            id: format!(
                "alert:{}:{}:{}:{}",
                self.kind,
                if portal.is_empty() { "-" } else { &portal },
                state,
                at.timestamp_millis()
            ),
            portal: portal.clone(),
            event: ALERT_EVENT.to_string(),
            offline_id: 0,
            message_id: String::new(),
            timestamp: at.to_rfc3339(),
            data: json!({
                "alert": self.kind,
                "state": state,
                "portal": self.portal,
                "summary": self.summary,
                "value": self.value,
                "threshold": self.threshold,
            }),
            additional: Value::Null,
            lane: Lane::Normal,
            attempt: 1,
            entity: Value::Null,
            entity_error: None,
        }
    }
}

/// Everything the conditions look at, read once per check.
#[derive(Debug, Clone, Default)]
pub(crate) struct Snapshot {
    pub unsettled: BTreeMap<String, u64>,
    /// `(portal, failing for, last error)`.
    pub failing: Vec<(String, Duration, String)>,
    pub new_dead: u64,
    pub new_dead_ids: Vec<String>,
    pub oldest_pending_age: Option<Duration>,
    pub journal_bytes: u64,
}

/// The conditions of `[alerts]` and their states: pure, fed with [`Snapshot`]s.
pub(crate) struct Evaluator {
    config: AlertsConfig,
    states: BTreeMap<(&'static str, String), AlertState>,
    /// Deliveries that went dead while `oldest_pending` fired (how many, up to 5 ids): when it
    /// resolves, they are why the backlog cleared, and its message says so.
    dead_while_waiting: (u64, Vec<String>),
}

impl Evaluator {
    pub fn new(config: AlertsConfig) -> Evaluator {
        Evaluator {
            config,
            states: BTreeMap::new(),
            dead_while_waiting: (0, Vec::new()),
        }
    }

    pub fn check(&mut self, now: Instant, s: &Snapshot) -> Vec<Alert> {
        let mut alerts = Vec::new();
        let c = self.config.clone();
        if let Some(limit) = c.unsettled_above {
            for (portal, &n) in &s.unsettled {
                let t = self.observe("unsettled_backlog", portal, now, n > limit, c.unsettled_for);
                push(&mut alerts, t, || Alert {
                    kind: "unsettled_backlog",
                    portal: Some(portal.clone()),
                    transition: Transition::Fire,
                    summary: match t {
                        Some(Transition::Resolve) => {
                            format!("portal {portal}: unsettled events back to {n} (limit {limit})")
                        }
                        _ => format!(
                            "portal {portal}: {n} unsettled events, above {limit} for {}",
                            humantime::format_duration(c.unsettled_for)
                        ),
                    },
                    value: json!(n),
                    threshold: json!(limit),
                });
            }
        }
        if let Some(limit) = c.portal_failing_for {
            let portals: Vec<String> = s.unsettled.keys().cloned().collect();
            for portal in portals {
                let failing = s.failing.iter().find(|f| f.0 == portal);
                let t = self.observe(
                    "portal_failing",
                    &portal,
                    now,
                    failing.is_some(),
                    Duration::ZERO,
                );
                push(&mut alerts, t, || Alert {
                    kind: "portal_failing",
                    portal: Some(portal.clone()),
                    transition: Transition::Fire,
                    summary: match failing {
                        Some((_, how_long, error)) => format!(
                            "portal {portal}: failing for {}: {error}",
                            humantime::format_duration(Duration::from_secs(how_long.as_secs()))
                        ),
                        None => format!("portal {portal}: answering again"),
                    },
                    value: json!(failing.map(|f| f.1.as_secs())),
                    threshold: json!(limit.as_secs()),
                });
            }
        }
        if let Some(limit) = c.oldest_pending_older_than {
            let age = s.oldest_pending_age.unwrap_or_default();
            let was_firing = self
                .states
                .get(&("oldest_pending", String::new()))
                .is_some_and(|state| state.firing);
            if was_firing {
                let (count, ids) = &mut self.dead_while_waiting;
                *count += s.new_dead;
                ids.extend(s.new_dead_ids.iter().take(5 - ids.len().min(5)).cloned());
            }
            let t = self.observe("oldest_pending", "", now, age > limit, Duration::ZERO);
            let (dead, dead_ids) = match t {
                Some(_) => std::mem::take(&mut self.dead_while_waiting),
                None => (0, Vec::new()),
            };
            push(&mut alerts, t, || Alert {
                kind: "oldest_pending",
                portal: None,
                transition: Transition::Fire,
                summary: if age > limit {
                    format!(
                        "the oldest pending delivery has waited {} (limit {})",
                        humantime::format_duration(Duration::from_secs(age.as_secs())),
                        humantime::format_duration(limit)
                    )
                } else {
                    recovered(limit, dead, &dead_ids)
                },
                value: json!(age.as_secs()),
                threshold: json!(limit.as_secs()),
            });
        }
        if let Some(limit) = c.journal_larger_than {
            let big = s.journal_bytes > limit;
            let t = self.observe("journal_size", "", now, big, Duration::ZERO);
            push(&mut alerts, t, || Alert {
                kind: "journal_size",
                portal: None,
                transition: Transition::Fire,
                summary: format!(
                    "the journal is {} bytes (limit {limit}){}",
                    s.journal_bytes,
                    if big {
                        ": prune it or lower journal.retention"
                    } else {
                        ""
                    }
                ),
                value: json!(s.journal_bytes),
                threshold: json!(limit),
            });
        }
        // Dead events are events, not states: one alert per check that saw new ones.
        if c.on_dead && s.new_dead > 0 {
            alerts.push(Alert {
                kind: "dead_events",
                portal: None,
                transition: Transition::Fire,
                summary: format!(
                    "{} new dead deliver{} (e.g. {}): see `b24eventd dead list`",
                    s.new_dead,
                    if s.new_dead == 1 { "y" } else { "ies" },
                    s.new_dead_ids.join(", ")
                ),
                value: json!(s.new_dead),
                threshold: json!(0),
            });
        }
        alerts
    }

    fn observe(
        &mut self,
        kind: &'static str,
        key: &str,
        now: Instant,
        holds: bool,
        hold: Duration,
    ) -> Option<Transition> {
        self.states
            .entry((kind, key.to_string()))
            .or_default()
            .observe(now, holds, hold)
    }
}

/// The text of `oldest_pending` resolving: no delivery waits over `limit` any more, either
/// because they were delivered or, when `dead` deliveries went dead meanwhile, because they
/// were given up on, which is no recovery and must not read as one.
fn recovered(limit: Duration, dead: u64, dead_ids: &[String]) -> String {
    if dead == 0 {
        return "pending deliveries are moving again".to_string();
    }
    format!(
        "no pending delivery waits over {} any more, but {dead} deliver{} went dead meanwhile (e.g. {}): the backlog cleared because they were given up on, not delivered; see `b24eventd dead list`",
        humantime::format_duration(limit),
        if dead == 1 { "y" } else { "ies" },
        dead_ids.join(", ")
    )
}

fn push(alerts: &mut Vec<Alert>, t: Option<Transition>, make: impl FnOnce() -> Alert) {
    if let Some(t) = t {
        let mut alert = make();
        alert.transition = t;
        alerts.push(alert);
    }
}

/// The alerts task of a running pipeline.
pub(crate) async fn run(
    config: AlertsConfig,
    journal: Journal,
    liveness: Arc<Liveness>,
    sinks: SinkDirectory,
    shutdown: CancellationToken,
) {
    let mut evaluator = Evaluator::new(config.clone());
    let mut outbox: VecDeque<(Envelope, u32)> = VecDeque::new();
    // Dead outcomes already in the journal at start were reported by an earlier run.
    let mut dead_seen = journal.dead_attempts_since(None).await.map(|r| r.0).ok();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(config.check_interval) => {}
            _ = shutdown.cancelled() => return,
        }
        let snapshot = match snapshot(&journal, &liveness, &config, &mut dead_seen).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "alert check failed; trying again");
                continue;
            }
        };
        let now = chrono::Utc::now();
        for alert in evaluator.check(Instant::now(), &snapshot) {
            tracing::warn!(alert = alert.kind, portal = alert.portal.as_deref().unwrap_or(""), state = ?alert.transition, summary = %alert.summary, "alert");
            outbox.push_back((alert.envelope(now), 0));
        }
        send(&config.sink, &sinks, &mut outbox).await;
    }
}

async fn snapshot(
    journal: &Journal,
    liveness: &Liveness,
    config: &AlertsConfig,
    dead_seen: &mut Option<i64>,
) -> anyhow::Result<Snapshot> {
    let mut s = Snapshot::default();
    for portal in liveness.portals() {
        s.unsettled
            .insert(portal.clone(), journal.unsettled_count(portal).await?);
    }
    if let Some(limit) = config.portal_failing_for {
        s.failing = liveness.failing(limit);
    }
    // Also without `on_dead`: `oldest_pending` says when deliveries went dead.
    if config.on_dead || config.oldest_pending_older_than.is_some() {
        let (max, count, ids) = journal.dead_attempts_since(*dead_seen).await?;
        if dead_seen.is_some() {
            s.new_dead = count;
            s.new_dead_ids = ids;
        }
        *dead_seen = Some(max);
    }
    if config.oldest_pending_older_than.is_some() {
        s.oldest_pending_age = journal
            .oldest_pending_fetched_at()
            .await?
            .and_then(|at| (chrono::Utc::now() - at).to_std().ok());
    }
    s.journal_bytes = journal.size_bytes().await?;
    Ok(s)
}

/// Offers queued alerts to the sink; what it asks to retry stays queued for the next check.
async fn send(sink_name: &str, sinks: &SinkDirectory, outbox: &mut VecDeque<(Envelope, u32)>) {
    let sink = sinks
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(sink_name)
        .cloned();
    let Some(sink) = sink else {
        if !outbox.is_empty() {
            tracing::error!(sink = %sink_name, alerts = outbox.len(), "the alerts sink is not running; alerts wait");
        }
        return;
    };
    let mut again = VecDeque::new();
    while let Some((envelope, tries)) = outbox.pop_front() {
        let result = sink.deliver(std::slice::from_ref(&envelope)).await;
        match result.into_iter().next() {
            Some(SinkResult::Delivered) => {}
            Some(SinkResult::Retry { error, .. }) if tries + 1 < DELIVERY_TRIES => {
                tracing::warn!(sink = %sink_name, event_id = %envelope.id, error = %error, "alert not delivered; trying again at the next check");
                again.push_back((envelope, tries + 1));
            }
            Some(SinkResult::Retry { error, .. } | SinkResult::Dead { error }) => {
                tracing::error!(sink = %sink_name, event_id = %envelope.id, error = %error, "alert dropped: the sink did not take it");
            }
            None => tracing::error!(sink = %sink_name, "the alerts sink returned no result"),
        }
    }
    *outbox = again;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> AlertsConfig {
        AlertsConfig {
            sink: "ops".into(),
            check_interval: Duration::from_secs(1),
            unsettled_above: Some(50),
            unsettled_for: Duration::from_secs(60),
            on_dead: true,
            portal_failing_for: Some(Duration::from_secs(600)),
            oldest_pending_older_than: Some(Duration::from_secs(1800)),
            journal_larger_than: Some(1000),
        }
    }

    fn unsettled(n: u64) -> Snapshot {
        Snapshot {
            unsettled: [("main".to_string(), n)].into(),
            ..Snapshot::default()
        }
    }

    #[test]
    fn a_state_fires_once_after_holding_and_resolves_once() {
        let mut s = AlertState::default();
        let t0 = Instant::now();
        let hold = Duration::from_secs(60);
        assert_eq!(s.observe(t0, true, hold), None);
        assert_eq!(s.observe(t0 + Duration::from_secs(30), true, hold), None);
        assert_eq!(
            s.observe(t0 + Duration::from_secs(61), true, hold),
            Some(Transition::Fire)
        );
        assert_eq!(
            s.observe(t0 + Duration::from_secs(90), true, hold),
            None,
            "once"
        );
        assert_eq!(
            s.observe(t0 + Duration::from_secs(91), false, hold),
            Some(Transition::Resolve)
        );
        assert_eq!(
            s.observe(t0 + Duration::from_secs(92), false, hold),
            None,
            "once"
        );
        // A blip shorter than `hold` never fires.
        assert_eq!(s.observe(t0 + Duration::from_secs(100), true, hold), None);
        assert_eq!(s.observe(t0 + Duration::from_secs(101), false, hold), None);
    }

    #[test]
    fn the_seed_example_more_than_fifty_unprocessed_events_tells_the_administrator() {
        let mut e = Evaluator::new(config());
        let t0 = Instant::now();
        assert!(e.check(t0, &unsettled(73)).is_empty());
        let fired = e.check(t0 + Duration::from_secs(61), &unsettled(80));
        assert_eq!(fired.len(), 1);
        assert_eq!(
            (fired[0].kind, fired[0].transition),
            ("unsettled_backlog", Transition::Fire)
        );
        assert!(
            fired[0].summary.contains("80 unsettled events, above 50"),
            "{}",
            fired[0].summary
        );
        assert!(
            e.check(t0 + Duration::from_secs(62), &unsettled(90))
                .is_empty()
        );
        let resolved = e.check(t0 + Duration::from_secs(63), &unsettled(3));
        assert_eq!(resolved.len(), 1);
        assert_eq!(resolved[0].transition, Transition::Resolve);
        let envelope = resolved[0].envelope(chrono::Utc::now());
        assert_eq!(envelope.event, ALERT_EVENT);
        assert_eq!(envelope.data["state"], "resolved");
        assert_eq!(envelope.data["portal"], "main");
    }

    #[test]
    fn a_backlog_that_cleared_because_deliveries_went_dead_says_so() {
        let waiting = |age: u64, new_dead: u64| Snapshot {
            oldest_pending_age: Some(Duration::from_secs(age)),
            new_dead,
            new_dead_ids: (0..new_dead).map(|i| format!("main:{i}")).collect(),
            ..Snapshot::default()
        };
        let t0 = Instant::now();
        let summary = |alerts: Vec<Alert>| {
            assert_eq!(alerts.len(), 1, "{alerts:?}");
            assert_eq!(alerts[0].kind, "oldest_pending");
            alerts[0].summary.clone()
        };
        let oldest = |alerts: Vec<Alert>| {
            alerts
                .into_iter()
                .filter(|a| a.kind == "oldest_pending")
                .collect::<Vec<_>>()
        };
        // Delivered: moving again.
        let mut e = Evaluator::new(config());
        summary(oldest(e.check(t0, &waiting(3600, 0))));
        assert_eq!(
            summary(oldest(e.check(t0, &waiting(0, 0)))),
            "pending deliveries are moving again"
        );
        // Given up on: three went dead while the alert fired (two checks), then it cleared.
        summary(oldest(e.check(t0, &waiting(3600, 0))));
        assert!(oldest(e.check(t0, &waiting(3700, 2))).is_empty());
        let text = summary(oldest(e.check(t0, &waiting(0, 1))));
        assert!(
            text.contains("3 deliveries went dead") && text.contains("not delivered"),
            "{text}"
        );
        assert!(!text.contains("moving again"), "{text}");
        assert!(text.contains("main:0, main:1, main:0"), "{text}");
        // The next episode starts from zero.
        summary(oldest(e.check(t0, &waiting(3600, 4))));
        assert_eq!(
            summary(oldest(e.check(t0, &waiting(0, 0)))),
            "pending deliveries are moving again",
            "dead before the alert fired are not counted"
        );
    }

    #[test]
    fn dead_events_failing_portals_old_deliveries_and_a_big_journal() {
        let mut e = Evaluator::new(config());
        let t0 = Instant::now();
        let snapshot = Snapshot {
            unsettled: [("main".to_string(), 0)].into(),
            failing: vec![(
                "main".into(),
                Duration::from_secs(700),
                "WRONG_LICENSE".into(),
            )],
            new_dead: 2,
            new_dead_ids: vec!["main:7".into(), "main:9".into()],
            oldest_pending_age: Some(Duration::from_secs(3600)),
            journal_bytes: 5000,
        };
        let kinds: Vec<&str> = e.check(t0, &snapshot).iter().map(|a| a.kind).collect();
        assert_eq!(
            kinds,
            [
                "portal_failing",
                "oldest_pending",
                "journal_size",
                "dead_events"
            ]
        );
        let quiet = Snapshot {
            unsettled: [("main".to_string(), 0)].into(),
            ..Snapshot::default()
        };
        let resolved: Vec<(&str, Transition)> = e
            .check(t0, &quiet)
            .iter()
            .map(|a| (a.kind, a.transition))
            .collect();
        assert_eq!(
            resolved,
            [
                ("portal_failing", Transition::Resolve),
                ("oldest_pending", Transition::Resolve),
                ("journal_size", Transition::Resolve)
            ]
        );
    }
}
