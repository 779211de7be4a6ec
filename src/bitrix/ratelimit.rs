//! The leaky bucket Bitrix24 applies per portal (burst X, drain Y per second): the client uses it
//! to stay under the limit (the simulator enforces its own). Pure: time is passed in.

use std::time::{Duration, Instant};

/// A counter that rises by one per request and drains at `per_second`; a request that would
/// lift it above `burst` is refused (the portal answers 503 `QUERY_LIMIT_EXCEEDED`).
#[derive(Debug, Clone)]
pub struct LeakyBucket {
    burst: f64,
    per_second: f64,
    level: f64,
    last: Instant,
}

impl LeakyBucket {
    pub fn new(burst: u32, per_second: f64, now: Instant) -> LeakyBucket {
        LeakyBucket {
            burst: f64::from(burst.max(1)),
            per_second: per_second.max(f64::MIN_POSITIVE),
            level: 0.0,
            last: now,
        }
    }

    fn drain(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level - elapsed * self.per_second).max(0.0);
        self.last = self.last.max(now);
    }

    /// Takes one request slot, or says how long to wait before one is free.
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Duration> {
        self.drain(now);
        if self.level + 1.0 <= self.burst {
            self.level += 1.0;
            Ok(())
        } else {
            let excess = self.level + 1.0 - self.burst;
            // Saturating: a drain rate near zero must not overflow the wait.
            Err(Duration::try_from_secs_f64(excess / self.per_second).unwrap_or(Duration::MAX))
        }
    }

    /// The portal said the bucket is full (a 503): assume it is, so the next request waits for a
    /// slot to drain instead of adding to the storm.
    pub(super) fn mark_full(&mut self, now: Instant) {
        self.drain(now);
        self.level = self.burst;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_paces_at_the_drain_rate() {
        let t0 = Instant::now();
        let mut b = LeakyBucket::new(50, 2.0, t0);
        for _ in 0..50 {
            assert!(b.try_acquire(t0).is_ok());
        }
        let wait = b.try_acquire(t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(b.try_acquire(t0 + Duration::from_millis(499)).is_err());
        assert!(b.try_acquire(t0 + Duration::from_millis(500)).is_ok());
    }

    #[test]
    fn drains_fully_when_idle() {
        let t0 = Instant::now();
        let mut b = LeakyBucket::new(3, 1.0, t0);
        for _ in 0..3 {
            b.try_acquire(t0).unwrap();
        }
        let later = t0 + Duration::from_secs(10);
        for _ in 0..3 {
            b.try_acquire(later).unwrap();
        }
        assert!(b.try_acquire(later).is_err());
    }

    #[test]
    fn mark_full_forces_a_wait() {
        let t0 = Instant::now();
        let mut b = LeakyBucket::new(10, 5.0, t0);
        b.mark_full(t0);
        assert_eq!(b.try_acquire(t0).unwrap_err(), Duration::from_millis(200));
    }
}
