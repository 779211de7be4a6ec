//! Request economy (pure): how many reservations one combined request asks for, and how long an
//! idle portal waits between polls.
//!
//! A combined request is one `batch` carrying the settle calls that are ready and up to
//! [`MAX_GETS`] `get` commands (`clear=0`, each its own reservation). The number of gets — the
//! *width* — starts at one and doubles while every get comes back full (a backlog), drops to what
//! the last answer showed when the queue runs dry, halves when a request was slow, and stays at
//! one while the `event.offline.get` operating budget is nearly spent. `max_unsettled` caps the
//! events asked for.

use std::time::Duration;

/// Sub-commands per `batch` request (`CRestUtil::BATCH_MAX_LENGTH`).
pub const MAX_COMMANDS: usize = crate::bitrix::client::MAX_BATCH;
/// The most gets in one request: the other slots stay free for settle calls.
pub const MAX_GETS: u32 = 40;
/// A request that took longer than this halves the width (the portal allows 60 s per request).
pub const SLOW_REQUEST: Duration = Duration::from_secs(15);
/// The operating budget of one method per 10 minutes on a cloud portal (notes §8).
pub const OPERATING_BUDGET_SECONDS: f64 = 480.0;
/// Above this share of the budget, one get per request.
const OPERATING_NARROW: f64 = 0.6;
/// Above this share, no gets until the oldest minute of the window drops out.
const OPERATING_PAUSE: f64 = 0.9;

/// The adaptive number of `get` commands per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchWidth {
    width: u32,
}

impl Default for FetchWidth {
    fn default() -> Self {
        FetchWidth { width: 1 }
    }
}

/// What the portal last said of the `event.offline.get` operating budget.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Operating {
    /// Seconds used in the current 10-minute window.
    pub used: Option<f64>,
    /// Unix seconds when the oldest minute of the window drops out.
    pub reset_at: Option<i64>,
}

impl FetchWidth {
    pub fn width(&self) -> u32 {
        self.width
    }

    /// The `limit`s of the gets to send next: at most the width, the free command slots, and
    /// `room` events in total (`max_unsettled` minus what is open), each at most `batch_size`.
    /// Empty when there is no room, no slot, or the operating budget asks for a pause.
    pub fn plan(
        &self,
        room: u64,
        batch_size: u32,
        free_slots: usize,
        operating: Operating,
    ) -> Vec<u32> {
        let share = operating.used.unwrap_or(0.0) / OPERATING_BUDGET_SECONDS;
        if share >= OPERATING_PAUSE || batch_size == 0 {
            return Vec::new();
        }
        let width = if share >= OPERATING_NARROW {
            1
        } else {
            self.width
        };
        let slots = u32::try_from(free_slots).unwrap_or(u32::MAX);
        let mut left = room;
        let mut limits = Vec::new();
        while left > 0 && (limits.len() as u32) < width.min(slots) {
            let limit = left.min(u64::from(batch_size)) as u32;
            limits.push(limit);
            left -= u64::from(limit);
        }
        limits
    }

    /// How long to hold fetches back for the operating budget (`now`: Unix seconds), if at all.
    pub fn operating_pause(operating: Operating, now: f64) -> Option<Duration> {
        let used = operating.used?;
        if used / OPERATING_BUDGET_SECONDS < OPERATING_PAUSE {
            return None;
        }
        let until = operating.reset_at.map(|at| at as f64 - now).unwrap_or(60.0);
        Some(Duration::from_secs_f64(until.clamp(1.0, 660.0)))
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

    #[test]
    fn width_grows_while_every_get_is_full_and_falls_when_the_queue_drains() {
        let mut w = FetchWidth::default();
        let none = Operating::default();
        assert_eq!(w.plan(5000, 50, 50, none), vec![50]);
        let mut widths = Vec::new();
        for _ in 0..7 {
            let asked = w.plan(1_000_000, 50, 50, none).len();
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
        let w = FetchWidth { width: 40 };
        let none = Operating::default();
        assert_eq!(w.plan(120, 50, 50, none), vec![50, 50, 20]);
        assert_eq!(w.plan(0, 50, 50, none), Vec::<u32>::new());
        assert_eq!(w.plan(10_000, 50, 3, none).len(), 3);
        assert_eq!(w.plan(10_000, 50, 0, none).len(), 0);
        assert_eq!(w.plan(10_000, 50, 50, none).len(), 40);
        assert!(w.plan(10_000, 50, 50, none).iter().all(|l| *l == 50));
    }

    #[test]
    fn operating_budget_narrows_then_pauses() {
        let w = FetchWidth { width: 16 };
        let at = |used: f64| Operating {
            used: Some(used),
            reset_at: Some(1_000),
        };
        assert_eq!(w.plan(10_000, 50, 50, at(100.0)).len(), 16);
        assert_eq!(w.plan(10_000, 50, 50, at(300.0)).len(), 1);
        assert!(w.plan(10_000, 50, 50, at(440.0)).is_empty());
        assert_eq!(FetchWidth::operating_pause(at(300.0), 900.0), None);
        assert_eq!(
            FetchWidth::operating_pause(at(440.0), 900.0),
            Some(Duration::from_secs(100))
        );
        // A reset time already past still waits a moment; an unknown one a minute.
        assert_eq!(
            FetchWidth::operating_pause(at(440.0), 2_000.0),
            Some(Duration::from_secs(1))
        );
        let unknown = Operating {
            used: Some(470.0),
            reset_at: None,
        };
        assert_eq!(
            FetchWidth::operating_pause(unknown, 0.0),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn a_slow_request_halves_the_width() {
        let mut w = FetchWidth { width: 16 };
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
