//! The per-method operating budget: execution time accumulated in one-minute
//! baskets over a sliding window; past the budget the method answers 429
//! `OPERATION_TIME_LIMIT` until its oldest basket drops out. Pure: time is passed in.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use super::OperatingLimit;

/// Used when no limit is enforced: time is still accounted for `time.operating`.
const DEFAULT_WINDOW: Duration = Duration::from_secs(600);
const BASKETS: u32 = 10;

#[derive(Debug, Clone, Copy)]
struct Basket {
    /// Unix time of the first call recorded in this basket.
    start: f64,
    seconds: f64,
}

#[derive(Debug, Clone)]
pub struct OperatingBudget {
    budget: Option<f64>,
    window: f64,
    basket_len: f64,
    methods: HashMap<String, VecDeque<Basket>>,
}

impl OperatingBudget {
    pub fn new(limit: Option<OperatingLimit>) -> OperatingBudget {
        let window = limit
            .map_or(DEFAULT_WINDOW, |l| l.window)
            .as_secs_f64()
            .max(f64::EPSILON);
        OperatingBudget {
            budget: limit.map(|l| l.budget.as_secs_f64()),
            window,
            basket_len: window / f64::from(BASKETS),
            methods: HashMap::new(),
        }
    }

    fn baskets(&mut self, method: &str, now: f64) -> &mut VecDeque<Basket> {
        let window = self.window;
        let baskets = self.methods.entry(method.to_string()).or_default();
        while baskets.front().is_some_and(|b| b.start + window <= now) {
            baskets.pop_front();
        }
        baskets
    }

    /// Seconds charged to `method` within the window.
    pub fn used(&mut self, method: &str, now: f64) -> f64 {
        self.baskets(method, now).iter().map(|b| b.seconds).sum()
    }

    /// Unix time at which the oldest basket drops out (`now` when there is none).
    pub fn reset_at(&mut self, method: &str, now: f64) -> i64 {
        let window = self.window;
        let at = self
            .baskets(method, now)
            .front()
            .map_or(now, |b| b.start + window);
        at.ceil() as i64
    }

    /// `Err(reset_at)` when the method has used more than its budget: it must not run.
    pub fn check(&mut self, method: &str, now: f64) -> Result<(), i64> {
        let Some(budget) = self.budget else {
            return Ok(());
        };
        if self.used(method, now) > budget {
            Err(self.reset_at(method, now))
        } else {
            Ok(())
        }
    }

    pub fn charge(&mut self, method: &str, seconds: f64, now: f64) {
        let basket_len = self.basket_len;
        let baskets = self.baskets(method, now);
        match baskets.back_mut() {
            Some(last) if now < last.start + basket_len => last.seconds += seconds,
            _ => baskets.push_back(Basket {
                start: now,
                seconds,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(budget: u64) -> Option<OperatingLimit> {
        Some(OperatingLimit {
            budget: Duration::from_secs(budget),
            window: Duration::from_secs(600),
        })
    }

    #[test]
    fn blocks_once_the_budget_is_exceeded() {
        let mut b = OperatingBudget::new(limit(10));
        let t0 = 1000.0;
        for i in 0..5 {
            assert!(b.check("event.offline.get", t0 + f64::from(i)).is_ok());
            b.charge("event.offline.get", 2.0, t0 + f64::from(i));
        }
        // Exactly at the budget is still allowed; over it is not.
        assert!(b.check("event.offline.get", t0 + 5.0).is_ok());
        b.charge("event.offline.get", 0.5, t0 + 5.0);
        assert_eq!(b.check("event.offline.get", t0 + 6.0), Err(1600));
        // Other methods are unaffected.
        assert!(b.check("event.offline.clear", t0 + 6.0).is_ok());
    }

    #[test]
    fn baskets_drop_out_after_the_window() {
        let mut b = OperatingBudget::new(limit(5));
        b.charge("m", 4.0, 0.0);
        b.charge("m", 2.0, 70.0);
        assert_eq!(b.used("m", 100.0), 6.0);
        assert_eq!(b.check("m", 100.0), Err(600));
        assert_eq!(b.used("m", 600.0), 2.0);
        assert!(b.check("m", 600.0).is_ok());
        assert_eq!(b.reset_at("m", 600.0), 670);
        assert_eq!(b.used("m", 670.0), 0.0);
        assert_eq!(b.reset_at("m", 700.0), 700);
    }

    #[test]
    fn calls_within_a_minute_share_a_basket() {
        let mut b = OperatingBudget::new(limit(100));
        b.charge("m", 1.0, 0.0);
        b.charge("m", 1.0, 59.0);
        b.charge("m", 1.0, 60.0);
        // The first basket (started at 0) expires at 600, taking both of its calls.
        assert_eq!(b.used("m", 599.0), 3.0);
        assert_eq!(b.used("m", 600.0), 1.0);
    }

    #[test]
    fn without_a_limit_time_is_still_accounted() {
        let mut b = OperatingBudget::new(None);
        b.charge("m", 1000.0, 0.0);
        assert!(b.check("m", 1.0).is_ok());
        assert_eq!(b.used("m", 1.0), 1000.0);
    }
}
