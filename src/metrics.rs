//! The daemon's Prometheus metrics (every name prefixed `b24eventd_`, documented in
//! `docs/METRICS.md`): the counters and poll state the pipeline updates as it works, and the
//! values read at scrape time (the Bitrix24 clients' counters, unsettled events, journal size),
//! rendered as OpenMetrics text for `/metrics`.

use crate::bitrix::PortalClient;
use crate::bitrix::client::ClientStats;
use crate::journal::Journal;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// Upper bounds (seconds) of the delivery latency buckets: from a fast local sink to a sink that
/// was down for hours.
const LATENCY_BUCKETS: [f64; 16] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
    21600.0,
];

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortalLabels {
    portal: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandoverLabels {
    kind: String,
}

/// Since when the lease renewals have been failing, and the lease TTL (`/readyz`).
type LeaseFailing = Arc<std::sync::Mutex<Option<(tokio::time::Instant, Duration)>>>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    portal: String,
    sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    portal: String,
    sink: String,
    outcome: &'static str,
}

/// How one delivery attempt ended (the `outcome` label of `b24eventd_deliveries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryOutcome {
    Delivered,
    Retry,
    Dead,
}

impl DeliveryOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryOutcome::Delivered => "delivered",
            DeliveryOutcome::Retry => "retry",
            DeliveryOutcome::Dead => "dead",
        }
    }
}

/// The metrics of one running pipeline. Cheap to clone; clones share every value.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    events_fetched: Family<PortalLabels, Counter>,
    deliveries: Family<DeliveryLabels, Counter>,
    delivery_latency: Family<SinkLabels, Histogram, fn() -> Histogram>,
    unsettled: Family<PortalLabels, Gauge>,
    journal_bytes: Gauge,
    last_successful_poll: Family<PortalLabels, Gauge<f64, AtomicU64>>,
    clock_steps: Family<DirectionLabels, Counter>,
    task_restarts: Family<TaskLabels, Counter>,
    admin_refused: Counter,
    portals_owned: Gauge,
    lease_renewals: Family<OutcomeLabels, Counter>,
    lease_handovers: Family<HandoverLabels, Counter>,
    lease_failing: LeaseFailing,
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

impl Metrics {
    /// Registers every metric; `clients` (one per portal) are read at each scrape.
    pub fn new(clients: Vec<PortalClient>) -> Metrics {
        let mut registry = Registry::with_prefix("b24eventd");
        let events_fetched = Family::<PortalLabels, Counter>::default();
        registry.register(
            "events_fetched",
            "Events journaled from the portal's offline queue (new rows; re-reads of known events are not counted)",
            events_fetched.clone(),
        );
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "deliveries",
            "Delivery attempts by outcome: delivered, retry (failed, scheduled again) or dead (retries exhausted or refused)",
            deliveries.clone(),
        );
        let delivery_latency: Family<SinkLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "delivery_latency",
            "Time from journaling an event (fetched_at) to its successful delivery to a sink",
            Unit::Seconds,
            delivery_latency.clone(),
        );
        let unsettled = Family::<PortalLabels, Gauge>::default();
        registry.register(
            "unsettled_events",
            "Events reserved upstream and not yet cleared or errored (the max_unsettled measure), read from the journal at scrape time",
            unsettled.clone(),
        );
        let journal_bytes = Gauge::default();
        registry.register_with_unit(
            "journal",
            "Size of the journal file plus its write-ahead log, read at scrape time",
            Unit::Bytes,
            journal_bytes.clone(),
        );
        let last_successful_poll = Family::<PortalLabels, Gauge<f64, AtomicU64>>::default();
        registry.register_with_unit(
            "last_successful_poll_timestamp",
            "Unix time at which the portal's poller last finished a round without an error",
            Unit::Seconds,
            last_successful_poll.clone(),
        );
        let clock_steps = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "clock_steps",
            "Jumps of this machine's wall clock of 2 s or more against the monotonic clock, by direction (backward: set back; forward: set ahead or resumed from suspend)",
            clock_steps.clone(),
        );
        let task_restarts = Family::<TaskLabels, Counter>::default();
        registry.register(
            "task_restarts",
            "Restarts of a supervised task (poller/NAME, dispatcher/NAME, prune, alerts, clock, systemd, admin) after it panicked or failed",
            task_restarts.clone(),
        );
        let admin_refused = Counter::default();
        registry.register(
            "admin_connections_refused",
            "Connections to the admin endpoint closed as soon as they were accepted: all of its 64 connections had a request in flight (an idle one gives its place to a new connection instead)",
            admin_refused.clone(),
        );
        let portals_owned = Gauge::default();
        registry.register(
            "portals_owned",
            "Portals whose lease this instance holds (several instances sharing a PostgreSQL journal; every configured portal otherwise stays 0)",
            portals_owned.clone(),
        );
        let lease_renewals = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "lease_renewals",
            "Heartbeats renewing every lease this instance holds, by outcome (ok, failed)",
            lease_renewals.clone(),
        );
        let lease_handovers = Family::<HandoverLabels, Counter>::default();
        registry.register(
            "lease_handovers",
            "Portal leases by kind of change: acquired, released (rebalance or stop), lost (taken by another instance, or not renewed in time)",
            lease_handovers.clone(),
        );
        registry.register_collector(Box::new(UpstreamCollector { clients }));
        Metrics {
            registry: Arc::new(registry),
            events_fetched,
            deliveries,
            delivery_latency,
            unsettled,
            journal_bytes,
            last_successful_poll,
            clock_steps,
            task_restarts,
            admin_refused,
            portals_owned,
            lease_renewals,
            lease_handovers,
            lease_failing: LeaseFailing::default(),
        }
    }

    /// How many portal leases this instance holds.
    pub fn portals_owned(&self, count: usize) {
        self.portals_owned.set(count as i64);
    }

    /// A lease heartbeat went through (`ok`) or failed; `ttl` is the lease TTL.
    pub fn lease_renewal(&self, ok: bool, ttl: Duration) {
        let outcome = if ok { "ok" } else { "failed" };
        self.lease_renewals
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
        let mut failing = self.lease_failing.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            *failing = None;
        } else if failing.is_none() {
            *failing = Some((tokio::time::Instant::now(), ttl));
        }
    }

    /// `count` leases changed: `acquired`, `released` or `lost`.
    pub fn handover(&self, kind: &str, count: u64) {
        self.lease_handovers
            .get_or_create(&HandoverLabels { kind: kind.into() })
            .inc_by(count);
    }

    /// Why this instance is not ready as a cluster member: its lease renewals have been
    /// failing for more than half the TTL.
    pub fn lease_not_ready(&self) -> Option<String> {
        let failing = *self.lease_failing.lock().unwrap_or_else(|p| p.into_inner());
        let (since, ttl) = failing?;
        let for_ = since.elapsed();
        (for_ > ttl / 2).then(|| {
            format!(
                "lease renewals have been failing for {} s (lease TTL {} s): this instance's portals stop by themselves at their deadline",
                for_.as_secs(),
                ttl.as_secs()
            )
        })
    }

    /// The supervisor started `task` again after it died.
    pub fn task_restarted(&self, task: &str) {
        self.task_restarts
            .get_or_create(&TaskLabels {
                task: task.to_string(),
            })
            .inc();
    }

    /// The admin endpoint closed a new connection at once: each of its open ones had a request
    /// in flight.
    pub fn admin_connection_refused(&self) {
        self.admin_refused.inc();
    }

    /// The wall clock jumped by `seconds` (negative: set back).
    pub fn clock_step(&self, seconds: f64) {
        let direction = if seconds < 0.0 { "backward" } else { "forward" };
        self.clock_steps
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    /// `count` new events of `portal` were journaled.
    pub fn fetched(&self, portal: &str, count: u64) {
        self.events_fetched
            .get_or_create(&PortalLabels {
                portal: portal.to_string(),
            })
            .inc_by(count);
    }

    /// One delivery attempt to `sink` ended; `latency` (journaled → delivered) is observed for
    /// a delivery that succeeded.
    pub fn delivery(
        &self,
        portal: &str,
        sink: &str,
        outcome: DeliveryOutcome,
        latency: Option<Duration>,
    ) {
        self.deliveries
            .get_or_create(&DeliveryLabels {
                portal: portal.to_string(),
                sink: sink.to_string(),
                outcome: outcome.as_str(),
            })
            .inc();
        if let (DeliveryOutcome::Delivered, Some(latency)) = (outcome, latency) {
            self.delivery_latency
                .get_or_create(&SinkLabels {
                    portal: portal.to_string(),
                    sink: sink.to_string(),
                })
                .observe(latency.as_secs_f64());
        }
    }

    /// A round of `portal`'s poller ended without an error (the round's state itself is kept
    /// by `pipeline::liveness`).
    pub fn poll_succeeded(&self, portal: &str) {
        self.last_successful_poll
            .get_or_create(&PortalLabels {
                portal: portal.to_string(),
            })
            .set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
    }

    /// Reads the scrape-time values from the journal: unsettled events of each of `portals`
    /// and the journal's size on disk.
    pub async fn refresh_from_journal(
        &self,
        journal: &Journal,
        portals: &[String],
    ) -> anyhow::Result<()> {
        for portal in portals {
            let unsettled = journal.unsettled_count(portal).await?;
            self.unsettled
                .get_or_create(&PortalLabels {
                    portal: portal.clone(),
                })
                .set(i64::try_from(unsettled).unwrap_or(i64::MAX));
        }
        let path = journal.location();
        let size = journal
            .size_bytes()
            .await
            .map_err(|e| anyhow::anyhow!("journal {path}: cannot read its size: {e}"))?;
        self.journal_bytes
            .set(i64::try_from(size).unwrap_or(i64::MAX));
        Ok(())
    }

    /// Every metric as OpenMetrics text (which Prometheus scrapes), ending in `# EOF`.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail, and every metric encodes with valid names.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "metrics could not be encoded");
        }
        text
    }
}

/// Reads each portal client's counters ([`ClientStats`]) at scrape time, so the
/// client keeps one counting path and knows nothing of Prometheus.
struct UpstreamCollector {
    clients: Vec<PortalClient>,
}

impl fmt::Debug for UpstreamCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let portals: Vec<&str> = self.clients.iter().map(PortalClient::portal).collect();
        f.debug_struct("UpstreamCollector")
            .field("portals", &portals)
            .finish()
    }
}

impl Collector for UpstreamCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let stats: Vec<(&str, ClientStats)> = self
            .clients
            .iter()
            .map(|c| (c.portal(), c.stats()))
            .collect();
        {
            let mut family = encoder.encode_descriptor(
                "upstream_requests",
                "Answers of the portal's REST API by method and outcome: ok, 503 (QUERY_LIMIT_EXCEEDED), 429 (OPERATION_TIME_LIMIT), auth (token refused), other (any other error or an unreadable answer), transport (no complete answer).",
                None,
                MetricType::Counter,
            )?;
            for (portal, s) in &stats {
                for (method, m) in &s.methods {
                    for (outcome, value) in [
                        ("ok", m.ok),
                        ("503", m.rate_limited_503),
                        ("429", m.operating_429),
                        ("auth", m.auth_errors),
                        ("other", m.other_errors),
                        ("transport", m.transport_errors),
                    ] {
                        let labels = [
                            ("portal", *portal),
                            ("method", method.as_str()),
                            ("outcome", outcome),
                        ];
                        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
                    }
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "operating",
                "Execution time the portal has counted against the method's operating budget in its 10-minute window (time.operating of the method's last successful answer); the portal answers 429 once it passes its limit (480 s by default).",
                Some(&Unit::Seconds),
                MetricType::Gauge,
            )?;
            for (portal, s) in &stats {
                for (method, m) in &s.methods {
                    if let Some(seconds) = m.operating_seconds {
                        let labels = [("portal", *portal), ("method", method.as_str())];
                        ConstGauge::new(seconds).encode(family.encode_family(&labels)?)?;
                    }
                }
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "rate_limit_wait",
                "Time spent waiting for rate limits: the client-side leaky bucket and the waits after 503 and 429 answers.",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            for (portal, s) in &stats {
                ConstCounter::new(s.rate_wait_seconds)
                    .encode(family.encode_family(&[("portal", *portal)])?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "unparsable_answers",
                "Answers of the portal with a success status whose body could not be parsed (cut off, broken, or JSON nested deeper than 1000 levels). What such an answer reserved stays reserved upstream for the orphan sweep.",
                None,
                MetricType::Counter,
            )?;
            for (portal, s) in &stats {
                ConstCounter::new(s.unparsable)
                    .encode(family.encode_family(&[("portal", *portal)])?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "token_refreshes",
                "OAuth access tokens refreshed (each rotates the refresh token).",
                None,
                MetricType::Counter,
            )?;
            for (portal, s) in &stats {
                ConstCounter::new(s.token_refreshes)
                    .encode(family.encode_family(&[("portal", *portal)])?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample `series` (name and labels exactly as rendered).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counters_and_histograms_render_with_the_prefix_and_labels() {
        let m = Metrics::new(Vec::new());
        m.fetched("main", 3);
        m.fetched("main", 2);
        m.delivery(
            "main",
            "erp",
            DeliveryOutcome::Delivered,
            Some(Duration::from_millis(40)),
        );
        m.delivery(
            "main",
            "erp",
            DeliveryOutcome::Delivered,
            Some(Duration::from_secs(20)),
        );
        m.delivery(
            "main",
            "erp",
            DeliveryOutcome::Retry,
            Some(Duration::from_secs(1)),
        );
        m.delivery("main", "erp", DeliveryOutcome::Dead, None);
        let text = m.render();
        assert_eq!(
            sample(&text, "b24eventd_events_fetched_total{portal=\"main\"}"),
            Some(5.0)
        );
        for (outcome, n) in [("delivered", 2.0), ("retry", 1.0), ("dead", 1.0)] {
            let series = format!(
                "b24eventd_deliveries_total{{portal=\"main\",sink=\"erp\",outcome=\"{outcome}\"}}"
            );
            assert_eq!(sample(&text, &series), Some(n), "{series} in\n{text}");
        }
        // Only successful deliveries are timed.
        assert_eq!(
            sample(
                &text,
                "b24eventd_delivery_latency_seconds_count{portal=\"main\",sink=\"erp\"}"
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "b24eventd_delivery_latency_seconds_bucket{le=\"0.05\",portal=\"main\",sink=\"erp\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "b24eventd_delivery_latency_seconds_bucket{le=\"30.0\",portal=\"main\",sink=\"erp\"}"
            ),
            Some(2.0),
            "{text}"
        );
        assert!(
            text.contains("# TYPE b24eventd_journal_bytes gauge"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_successful_round_sets_the_timestamp() {
        let m = Metrics::new(Vec::new());
        let before = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        m.poll_succeeded("main");
        let stamp = sample(
            &m.render(),
            "b24eventd_last_successful_poll_timestamp_seconds{portal=\"main\"}",
        )
        .expect("timestamp rendered");
        assert!(
            stamp >= before && stamp - before < 5.0,
            "{stamp} against {before}"
        );
    }

    #[tokio::test]
    async fn scrape_time_values_come_from_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(&dir.path().join("j.db"), crate::config::Synchronous::Full)
            .await
            .unwrap();
        let m = Metrics::new(Vec::new());
        m.refresh_from_journal(&journal, &["main".to_string()])
            .await
            .unwrap();
        let text = m.render();
        assert_eq!(
            sample(&text, "b24eventd_unsettled_events{portal=\"main\"}"),
            Some(0.0)
        );
        let bytes = sample(&text, "b24eventd_journal_bytes").expect("journal size rendered");
        assert_eq!(bytes, journal.size_bytes().await.unwrap() as f64);
    }
}
