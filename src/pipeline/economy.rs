//! Request economy (pure): how many reservations one combined request asks for, and how long an
//! idle portal waits between polls.
//!
//! A combined request is one `batch` carrying the settle calls that are ready and up to
//! [`MAX_GETS`] `get` commands (`clear=0`, each its own reservation). The number of gets — the
//! *width* — starts at one and doubles while every get comes back full (a backlog), drops to what
//! the last answer showed when the queue runs dry, and halves when a request was slow. The
//! `event.offline.get` operating budget bounds it too: each get is charged server time, so a
//! request carries no more gets than the budget left can pay for at the cost learned from earlier
//! answers, and none once 90% is spent, until the oldest minute of the window drops out.
//! `max_unsettled` caps the events asked for.

use std::time::Duration;

/// Sub-commands per `batch` request (`CRestUtil::BATCH_MAX_LENGTH`).
pub const MAX_COMMANDS: usize = crate::bitrix::client::MAX_BATCH;
/// The most gets in one request: the other slots stay free for settle calls.
pub const MAX_GETS: u32 = 40;
/// A request that took longer than this halves the width (the portal allows 60 s per request).
pub const SLOW_REQUEST: Duration = Duration::from_secs(15);
/// The share of the operating budget fetches may use; the rest is margin for estimates.
const OPERATING_CEILING: f64 = 0.9;

/// The adaptive number of `get` commands per request, and what one get costs.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchWidth {
    width: u32,
    get: CallBudget,
}

impl Default for FetchWidth {
    fn default() -> Self {
        FetchWidth {
            width: 1,
            get: CallBudget::default(),
        }
    }
}

/// What the poller of one portal has learned about its requests: the fetch width and the
/// cost of each `event.offline.*` method.
#[derive(Debug, Clone, Default)]
pub struct Economy {
    pub fetch: FetchWidth,
    pub clear: CallBudget,
    pub error: CallBudget,
}

/// What one call of a REST method costs in operating time, learned from answers, and how many
/// calls the method's budget left pays for. Every method has its own budget (`get`, `clear`
/// and `error` each).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallBudget {
    /// Server seconds one call was charged, smoothed over recent answers.
    cost: Option<f64>,
}

impl CallBudget {
    /// How many calls the budget left pays for (`u32::MAX`: no limit known).
    pub fn affordable(&self, operating: Operating, now: f64) -> u32 {
        if operating.stale(now) {
            return 1; // the window has moved on: one call learns where it stands
        }
        let Some(used) = operating.current_use(now) else {
            return u32::MAX; // nothing charged yet
        };
        let left = operating.budget * OPERATING_CEILING - used;
        if left <= 0.0 {
            return 0;
        }
        match self.cost {
            Some(cost) if cost > 0.0 => (left / cost).floor().min(f64::from(u32::MAX)) as u32,
            _ => 1, // cost not known yet: one call measures it
        }
    }

    /// How long to hold calls back (`now`: Unix seconds), if at all: once the next call would
    /// pass 90% of the budget, until the oldest minute of the window drops out.
    pub fn pause(&self, operating: Operating, now: f64) -> Option<Duration> {
        let used = operating.current_use(now)?;
        let cost = self.cost.unwrap_or(0.0);
        if used + cost < operating.budget * OPERATING_CEILING {
            return None;
        }
        let until = operating.reset_at.map_or(60.0, |at| at as f64 - now + 0.5);
        Some(Duration::from_secs_f64(until.max(0.5)).min(crate::bitrix::client::MAX_OPERATING_WAIT))
    }

    /// Learns the cost of one call from a request that carried `calls` of the method: the
    /// server's own `processing` time of the call when it reports one, else the growth of the
    /// operating time (ignored when the window moved on in between).
    pub fn observe(
        &mut self,
        before: Option<f64>,
        after: Option<f64>,
        calls: usize,
        processing: Option<f64>,
    ) {
        if calls == 0 {
            return;
        }
        let cost = match (processing, before, after) {
            (Some(p), _, _) if p >= 0.0 => p,
            (_, Some(before), Some(after)) if after >= before => (after - before) / calls as f64,
            _ => return,
        };
        self.cost = Some(match self.cost {
            // The larger of the last cost and a slow average: cheap answers must not talk the
            // estimate down faster than expensive ones raise it.
            Some(old) => cost.max(old * 0.8 + cost * 0.2),
            None => cost,
        });
    }
}

/// What the portal last said of the `event.offline.get` operating budget, and the budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Operating {
    /// Seconds used in the current 10-minute window, as of the last answer.
    pub used: Option<f64>,
    /// Unix seconds when the oldest minute of the window drops out.
    pub reset_at: Option<i64>,
    /// Seconds the portal allows per window (`rate_limit.operating_budget`, 480 on the cloud).
    pub budget: f64,
}

impl Default for Operating {
    fn default() -> Self {
        Operating {
            used: None,
            reset_at: None,
            budget: 480.0,
        }
    }
}

impl Operating {
    /// Seconds used, when the last answer is still current: once its `reset_at` has passed,
    /// some of that time has dropped out of the window and the figure says nothing.
    fn current_use(&self, now: f64) -> Option<f64> {
        match (self.used, self.reset_at) {
            (Some(used), Some(at)) if (at as f64) > now => Some(used),
            (Some(used), None) => Some(used),
            _ => None,
        }
    }

    /// Whether a figure exists that is no longer current.
    fn stale(&self, now: f64) -> bool {
        self.used.is_some() && self.current_use(now).is_none()
    }
}

impl FetchWidth {
    pub fn width(&self) -> u32 {
        self.width
    }

    /// What one get is thought to cost (server seconds), once an answer told.
    pub fn get_cost(&self) -> Option<f64> {
        self.get.cost
    }

    /// The `limit`s of the gets to send next (`now`: Unix seconds): at most the width, the free
    /// command slots, what the operating budget left pays for, and `room` events in total
    /// (`max_unsettled` minus what is open), each at most `batch_size`. Empty when there is no
    /// room, no slot, or the budget is spent.
    pub fn plan(
        &self,
        room: u64,
        batch_size: u32,
        free_slots: usize,
        operating: Operating,
        now: f64,
    ) -> Vec<u32> {
        if batch_size == 0 || room == 0 || free_slots == 0 {
            return Vec::new();
        }
        if operating.stale(now) {
            // The window has moved on since the last answer and nobody knows by how much: a
            // get of one event (a few milliseconds of server time) learns where it stands.
            return vec![1];
        }
        let affordable = self.affordable_gets(operating, now);
        let slots = u32::try_from(free_slots).unwrap_or(u32::MAX);
        let count = self.width.min(slots).min(affordable);
        let mut left = room;
        let mut limits = Vec::new();
        while left > 0 && (limits.len() as u32) < count {
            let limit = left.min(u64::from(batch_size)) as u32;
            limits.push(limit);
            left -= u64::from(limit);
        }
        limits
    }

    /// How many gets the operating budget left pays for.
    fn affordable_gets(&self, operating: Operating, now: f64) -> u32 {
        self.get.affordable(operating, now).min(MAX_GETS)
    }

    /// How long to hold fetches back for the `get` operating budget, if at all.
    pub fn operating_pause(&self, operating: Operating, now: f64) -> Option<Duration> {
        self.get.pause(operating, now)
    }

    /// Learns what a get costs (see [`CallBudget::observe`]).
    pub fn observe_cost(
        &mut self,
        before: Option<f64>,
        after: Option<f64>,
        gets: usize,
        processing: Option<f64>,
    ) {
        self.get.observe(before, after, gets, processing);
    }

    /// Learns from a request that carried `asked` gets of which `full` came back full.
    pub fn observe(&mut self, asked: usize, full: usize, elapsed: Duration) {
        if asked == 0 {
            return;
        }
        let asked = asked as u32;
        let full = full as u32;
        self.width = if full >= asked {
            (self.width.max(asked) * 2).min(MAX_GETS)
        } else {
            // The queue ran dry within this request: as many as were full, plus one.
            (full + 1).clamp(1, MAX_GETS)
        };
        if elapsed > SLOW_REQUEST {
            self.width = (self.width / 2).max(1);
        }
    }
}

/// The wait of an idle portal before its next poll: `poll_interval`, doubled for every empty
/// poll in a row after the first, up to `max`. The first event resets it.
pub fn idle_wait(poll_interval: Duration, max: Duration, empty_polls: u32) -> Duration {
    let doublings = empty_polls.saturating_sub(1).min(16);
    poll_interval
        .saturating_mul(1u32 << doublings)
        .min(max)
        .max(poll_interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_millis(200);
    const NOW: f64 = 900.0;

    fn width(width: u32) -> FetchWidth {
        FetchWidth {
            width,
            get: CallBudget::default(),
        }
    }

    #[test]
    fn width_grows_while_every_get_is_full_and_falls_when_the_queue_drains() {
        let mut w = FetchWidth::default();
        let none = Operating::default();
        assert_eq!(w.plan(5000, 50, 50, none, NOW), vec![50]);
        let mut widths = Vec::new();
        for _ in 0..7 {
            let asked = w.plan(1_000_000, 50, 50, none, NOW).len();
            w.observe(asked, asked, FAST);
            widths.push(w.width());
        }
        assert_eq!(widths, vec![2, 4, 8, 16, 32, 40, 40]);
        w.observe(40, 3, FAST);
        assert_eq!(w.width(), 4);
        w.observe(4, 0, FAST);
        assert_eq!(w.width(), 1);
    }

    #[test]
    fn plan_respects_room_slots_and_batch_size() {
        let w = width(40);
        let none = Operating::default();
        assert_eq!(w.plan(120, 50, 50, none, NOW), vec![50, 50, 20]);
        assert_eq!(w.plan(0, 50, 50, none, NOW), Vec::<u32>::new());
        assert_eq!(w.plan(10_000, 50, 3, none, NOW).len(), 3);
        assert_eq!(w.plan(10_000, 50, 0, none, NOW).len(), 0);
        assert_eq!(w.plan(10_000, 50, 50, none, NOW).len(), 40);
        assert!(w.plan(10_000, 50, 50, none, NOW).iter().all(|l| *l == 50));
    }

    #[test]
    fn the_operating_budget_bounds_the_gets_it_can_pay_for() {
        let mut w = width(40);
        let at = |used: f64| Operating {
            used: Some(used),
            reset_at: Some(1_000),
            budget: 480.0,
        };
        // Cost unknown: one get measures it.
        assert_eq!(w.plan(100_000, 50, 50, at(100.0), NOW).len(), 1);
        w.observe_cost(Some(100.0), Some(100.5), 1, None);
        // 0.9 * 480 - 400 = 32 s left at 0.5 s per get: 40 capped by the width; at 420, 24.
        assert_eq!(w.plan(100_000, 50, 50, at(100.0), NOW).len(), 40);
        assert_eq!(w.plan(100_000, 50, 50, at(420.0), NOW).len(), 24);
        assert!(w.plan(100_000, 50, 50, at(432.0), NOW).is_empty());
        assert_eq!(w.operating_pause(at(420.0), NOW), None);
        assert_eq!(
            w.operating_pause(at(431.8), NOW),
            Some(Duration::from_secs_f64(100.5))
        );
        // Once reset_at has passed the figure is stale: a get of one event learns where it stands.
        assert_eq!(w.operating_pause(at(470.0), 1_001.0), None);
        assert_eq!(w.plan(100_000, 50, 50, at(470.0), 1_001.0), vec![1]);
        // A cheaper answer lowers the estimate only slowly; a dearer one raises it at once.
        w.observe_cost(Some(10.0), Some(10.1), 1, None);
        assert!((w.get.cost.unwrap() - 0.42).abs() < 1e-9);
        w.observe_cost(Some(10.0), Some(12.0), 2, None);
        assert_eq!(w.get.cost, Some(1.0));
        // A window that moved on in between teaches nothing.
        w.observe_cost(Some(50.0), Some(10.0), 4, None);
        assert_eq!(w.get.cost, Some(1.0));
        // The server's own processing time wins over the growth of the operating time.
        w.observe_cost(Some(10.0), Some(20.0), 1, Some(3.0));
        assert_eq!(w.get.cost, Some(3.0));
    }

    #[test]
    fn a_small_budget_is_respected_too() {
        let mut w = width(40);
        w.observe_cost(Some(0.0), Some(0.2), 1, None);
        let small = Operating {
            used: Some(4.0),
            reset_at: Some(1_000),
            budget: 6.0,
        };
        // 0.9 * 6 - 4 = 1.4 s left at 0.2 s: 7 gets.
        assert_eq!(w.plan(100_000, 50, 50, small, NOW).len(), 7);
    }

    #[test]
    fn a_slow_request_halves_the_width() {
        let mut w = width(16);
        w.observe(16, 16, Duration::from_secs(20));
        assert_eq!(w.width(), 16); // doubled to 32, then halved
        w.observe(16, 16, Duration::from_secs(20));
        assert_eq!(w.width(), 16);
        w.observe(16, 2, Duration::from_secs(20));
        assert_eq!(w.width(), 1);
    }

    #[test]
    fn idle_polls_back_off_to_the_maximum() {
        let p = Duration::from_secs(5);
        let max = Duration::from_secs(30);
        let waits: Vec<u64> = (0..6).map(|n| idle_wait(p, max, n).as_secs()).collect();
        assert_eq!(waits, vec![5, 5, 10, 20, 30, 30]);
        assert_eq!(idle_wait(p, p, 10), p);
        assert_eq!(idle_wait(p, max, u32::MAX), max);
    }
}
