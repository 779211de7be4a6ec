//! A portal's lease clock: how much longer this instance may act on the portal upstream. The
//! lease task sets and renews it; the poller asks it before every upstream call that the
//! journal cannot fence (`event.offline.get`, `.clear`, `.error`, the orphan sweep), which runs
//! only while more lease time is left than the call's timeout. Without a cluster (SQLite, one
//! daemon) the clock is unlimited.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Cheap to clone; every clone sees the same clock.
#[derive(Clone, Debug)]
pub(crate) struct LeaseClock {
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    /// When the lease may have run out, with a margin (`None`: never, no cluster).
    until: Option<Instant>,
    /// When a new owner's grace ends and the orphan sweep may run.
    sweep_after: Instant,
}

impl LeaseClock {
    /// The clock of a portal this process has to itself.
    pub(crate) fn unlimited() -> LeaseClock {
        LeaseClock::with(None, Instant::now())
    }

    /// A lease held until `until`, its orphan sweep held back until `sweep_after`.
    pub(crate) fn held(until: Instant, sweep_after: Instant) -> LeaseClock {
        LeaseClock::with(Some(until), sweep_after)
    }

    fn with(until: Option<Instant>, sweep_after: Instant) -> LeaseClock {
        LeaseClock {
            state: Arc::new(Mutex::new(State { until, sweep_after })),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A renewal: the lease now lasts until `until` (never moved back).
    pub(crate) fn renew(&self, until: Instant) {
        let mut state = self.state();
        if let Some(current) = state.until {
            state.until = Some(current.max(until));
        }
    }

    /// The lease is gone (released, lost, or its deadline passed): no more upstream calls.
    pub(crate) fn end(&self) {
        let mut state = self.state();
        if state.until.is_some() {
            state.until = Some(Instant::now());
        }
    }

    /// How long the lease lasts yet (`Duration::MAX` without a cluster).
    pub(crate) fn left(&self) -> Duration {
        match self.state().until {
            None => Duration::MAX,
            Some(until) => until.saturating_duration_since(Instant::now()),
        }
    }

    /// Whether a call that may take up to `timeout` ends before the lease may run out.
    pub(crate) fn allows(&self, timeout: Duration) -> bool {
        self.left() > timeout
    }

    /// Whether the orphan sweep may run (a new owner's grace is over).
    pub(crate) fn sweep_due(&self) -> bool {
        Instant::now() >= self.state().sweep_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_held_clock_allows_calls_that_end_in_time_and_none_once_ended() {
        let now = Instant::now();
        let clock = LeaseClock::held(now + Duration::from_secs(20), now + Duration::from_secs(5));
        assert!(clock.allows(Duration::from_secs(10)));
        assert!(!clock.allows(Duration::from_secs(20)));
        assert!(!clock.sweep_due());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!clock.allows(Duration::from_secs(10)), "9 s left");
        assert!(clock.sweep_due());
        clock.renew(Instant::now() + Duration::from_secs(20));
        assert!(clock.allows(Duration::from_secs(10)));
        clock.renew(Instant::now());
        assert!(clock.allows(Duration::from_secs(10)), "never moved back");
        clock.end();
        assert_eq!(clock.left(), Duration::ZERO);
        let unlimited = LeaseClock::unlimited();
        unlimited.end();
        assert!(unlimited.allows(Duration::from_secs(3600)) && unlimited.sweep_due());
    }
}
