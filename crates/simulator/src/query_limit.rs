//! The portal's request-rate limit, as the REST limits page describes it
//! (<https://apidocs.bitrix24.com/limits.html>, "Request intensity limits"): a leaky bucket per
//! portal. Every incoming request raises a counter by one; once it has reached the threshold X,
//! further requests are refused with 503 `QUERY_LIMIT_EXCEEDED` (and not counted); the counter
//! drains by Y a second. The page gives X = 50, Y = 2 (X = 250, Y = 5 on Enterprise plans); the simulator
//! takes both from `SimulatorConfig::rate_limit`. The operating-time limit
//! (`Bitrix\Rest\Engine\Access\LoadLimiter`) is `limits.rs`'s.

use std::time::Instant;

/// The counter of one portal.
#[derive(Debug, Clone)]
pub struct QueryLimit {
    threshold: f64,
    drain_per_second: f64,
    counter: f64,
    drained_at: Instant,
}

impl QueryLimit {
    /// `threshold` (X, at least 1) and `drain_per_second` (Y, above 0), counter at zero.
    pub fn new(threshold: u32, drain_per_second: f64, now: Instant) -> QueryLimit {
        QueryLimit {
            threshold: f64::from(threshold.max(1)),
            drain_per_second: drain_per_second.max(f64::MIN_POSITIVE),
            counter: 0.0,
            drained_at: now,
        }
    }

    /// Counts a request arriving at `now`; false when it is refused (and then not counted).
    pub fn admit(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.drained_at).as_secs_f64();
        self.counter = (self.counter - elapsed * self.drain_per_second).max(0.0);
        self.drained_at = self.drained_at.max(now);
        let admitted = self.counter + 1.0 <= self.threshold;
        if admitted {
            self.counter += 1.0;
        }
        admitted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_up_to_the_threshold_passes_then_one_request_per_drained_unit() {
        let t0 = Instant::now();
        let mut limit = QueryLimit::new(50, 2.0, t0);
        for _ in 0..50 {
            assert!(limit.admit(t0));
        }
        assert!(!limit.admit(t0), "the 51st request at once");
        assert!(!limit.admit(t0 + Duration::from_millis(499)));
        assert!(
            limit.admit(t0 + Duration::from_millis(500)),
            "one unit drained"
        );
        assert!(!limit.admit(t0 + Duration::from_millis(500)));
    }

    #[test]
    fn an_idle_portal_drains_to_zero() {
        let t0 = Instant::now();
        let mut limit = QueryLimit::new(3, 1.0, t0);
        for _ in 0..3 {
            assert!(limit.admit(t0));
        }
        let later = t0 + Duration::from_secs(10);
        for _ in 0..3 {
            assert!(limit.admit(later));
        }
        assert!(!limit.admit(later), "drained to zero, not below");
    }
}
