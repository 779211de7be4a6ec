//! The poller of one portal: settles finished events first, adopts orphaned reservations, polls
//! the error lane on its schedule, and reserves new batches (`clear=0`) while fewer than
//! `max_unsettled` events are open. `round` is the poll loop; `settler` picks and sends the
//! settle calls; `fetch` reserves and journals; `sweep` adopts orphans; `enrich` reads the
//! entities of waiting events; `schedules` are the cron jobs that wake it.

mod enrich;
mod fetch;
mod round;
mod schedules;
mod settler;
mod sweep;

pub(crate) use schedules::{Schedules, Trigger, Triggers};
pub(crate) use settler::Settler;

use super::economy::{Budget, Budgets};
use super::lease_clock::LeaseClock;
use super::liveness::LoopHandle;
use super::{SharedRoutes, Wakers};
use crate::bitrix::{BitrixError, PortalClient};
use crate::config::{Mode, PortalConfig};
use crate::conformance::PortalConformance;
use crate::journal::Journal;
use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The instant `wait` from now, saturating (a year at most): no wait, whatever its source,
/// overflows the clock.
fn later(wait: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// How a fetch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fetched {
    /// As many events as asked for: fetch again at once.
    Full,
    /// Fewer (`events` of them): the queue is drained for now.
    Partial { events: usize },
    /// No fetch now: the portal's operating budget for `get` needs this long to recover.
    Paused(Duration),
}

#[derive(Clone)]
pub(crate) struct Poller {
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
    /// How long this instance may still act on the portal upstream (unlimited alone).
    lease: LeaseClock,
}

/// What every poller shares with the rest of the pipeline.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) journal: Journal,
    pub(crate) routes: SharedRoutes,
    pub(crate) wakers: Arc<Wakers>,
    pub(crate) metrics: Metrics,
    pub(crate) shutdown: CancellationToken,
}

impl Poller {
    pub(crate) fn new(
        config: PortalConfig,
        client: PortalClient,
        shared: Shared,
        triggers: Triggers,
        liveness: LoopHandle,
        conformance: PortalConformance,
        lease: LeaseClock,
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
        let settler = Settler::new(
            config.name.clone(),
            client.clone(),
            journal.clone(),
            conformance.clear_by(),
            lease.clone(),
        );
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
            lease,
        }
    }

    /// Whether an upstream call (at most `request_timeout`) ends while the lease lasts.
    fn lease_allows_call(&self) -> bool {
        self.lease.allows(self.config.request_timeout)
    }

    /// What the last conformance probe found on this portal (`batch_size` and the settle
    /// calls already follow it). The orphan sweep reads
    /// [`PortalConformance::reserved_listing`] from here: whether the `>PROCESS_ID` filter of
    /// `event.offline.list` can be trusted to find orphaned reservations.
    fn conformance(&self) -> &PortalConformance {
        &self.conformance
    }

    pub(crate) fn settler(&self) -> Settler {
        self.settler.clone()
    }

    fn portal(&self) -> &str {
        &self.config.name
    }

    fn reserving(&self) -> bool {
        self.config.mode == Mode::Reserve
    }

    /// `method`'s operating time as the client knows it, against the configured limit.
    fn budget(&self, method: &str) -> Budget {
        Budget {
            time: self.client.operating(method),
            limit: self.config.rate_limit.operating_budget.as_secs_f64(),
        }
    }

    /// How many combined requests one wave may send at once ([`super::economy::pipeline`]):
    /// what the client's bucket (`rate_limit`, its share applied) refills in a second.
    fn pipeline(&self) -> usize {
        let rate = &self.config.rate_limit;
        super::economy::pipeline(
            rate.per_second * rate.share,
            f64::from(rate.burst) * rate.share,
        )
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
}

/// A portal that refused the configured mode: reserve mode on a plan without
/// `rest_offline_extended`. The poller stops; the daemon reports it.
#[derive(Debug, Clone)]
pub(crate) struct ConfigMismatch {
    pub(crate) portal: String,
    pub(crate) message: String,
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
