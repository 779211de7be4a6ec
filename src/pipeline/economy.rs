//! Request economy (pure): how many reservations one combined request asks for, what each
//! method's operating-time limit still allows, and how long an idle portal waits between polls.
//!
//! A combined request is one `batch` carrying the settle calls that are ready and up to
//! [`MAX_GETS`] `get` commands (`clear=0`, each its own reservation). The number of gets — the
//! *width* — starts at one and doubles while every get comes back full (a backlog), drops to what
//! the last answer showed when the queue runs dry, and halves when a request was slow.
//!
//! Where the client's bucket refills several requests a second (a portal that limits nothing,
//! with `rate_limit` opened), a poller sends a *wave* of up to [`MAX_PIPELINE`] combined
//! requests at once ([`pipeline`]), the width then counting the gets of the whole wave: the
//! portal's server time per call is what bounds such a drain, and requests side by side
//! overlap it.
//!
//! The portal limits each method's operating time (420 s per 10 minutes on the cloud, `batch`
//! itself included at half weight; passing it bans the method for 5 minutes). What a method has
//! used is what the portal says in `time.operating`, plus what the calls of the answered request
//! may have added since (the portal stores a request's time after answering); what one call
//! takes is bounded from the portal's own stamps (see `bitrix::operating`). A request carries no
//! more calls of a method than the time left under [`OPERATING_CEILING`] of its limit pays for,
//! goes without `batch` when the `batch` method has no time left, and a method with no time left
//! waits until the oldest minute of its window drops out.

use std::time::Duration;

use crate::bitrix::client::MAX_OPERATING_WAIT;
use crate::bitrix::operating::MethodTime;

/// Sub-commands per `batch` request (`CRestUtil::BATCH_MAX_LENGTH`).
pub(crate) const MAX_COMMANDS: usize = crate::bitrix::client::MAX_BATCH;
/// The most gets in one request: the other slots stay free for settle calls.
pub(crate) const MAX_GETS: u32 = 40;
/// A request that took longer than this halves the width (the portal allows 60 s per request).
pub(crate) const SLOW_REQUEST: Duration = Duration::from_secs(15);
/// The share of each method's operating limit the daemon plans to use; the rest is the margin
/// for its estimates and for the operator's commands, which use the same application.
pub(crate) const OPERATING_CEILING: f64 = 0.9;

/// One method's operating time as the client knows it, against the limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Budget {
    pub(crate) time: MethodTime,
    /// Seconds per 10-minute window (`rate_limit.operating_budget`).
    pub(crate) limit: f64,
}

impl Budget {
    /// Seconds left under the ceiling, `None` when the portal has never reported the method's
    /// time (it enforces nothing this client can see).
    fn left(&self) -> Option<f64> {
        self.time
            .used()
            .map(|used| self.limit * OPERATING_CEILING - used)
    }

    /// How many calls the time left pays for (`u32::MAX`: no limit known). A banned method
    /// affords none. Once the portal's figure is out of date (its oldest minute has left the
    /// window) it still bounds the use from above; when it leaves nothing, one call learns
    /// where the method stands.
    pub(crate) fn affordable(&self, now: f64) -> u32 {
        if self.time.banned(now).is_some() {
            return 0;
        }
        let Some(left) = self.left() else {
            return u32::MAX;
        };
        let calls = match self.time.call {
            Some(cost) if cost > 0.0 => (left / cost).floor(),
            // Nothing measured yet: one call measures it, if there is time at all.
            _ if left > 0.0 => 1.0,
            _ => 0.0,
        };
        if calls >= 1.0 {
            calls.min(f64::from(u32::MAX)) as u32
        } else if self.time.stale(now) {
            1
        } else {
            0
        }
    }

    /// How long to hold the method back, if at all: while it is banned, and when no call is
    /// affordable until its oldest minute drops out (`now` and the result on the portal's
    /// clock).
    pub(crate) fn pause(&self, now: f64) -> Option<Duration> {
        if let Some(until) = self.time.banned(now) {
            return Some(wait_until(until - now));
        }
        if self.affordable(now) > 0 {
            return None;
        }
        // Not stale, so the reset time is known and within the window.
        Some(wait_until(
            self.time.reset_at.map_or(0.0, |at| at as f64 - now + 0.5),
        ))
    }
}

/// A wait of `seconds`, at least half a second, at most [`MAX_OPERATING_WAIT`], whatever the
/// portal's numbers were.
fn wait_until(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds.max(0.5))
        .unwrap_or(MAX_OPERATING_WAIT)
        .min(MAX_OPERATING_WAIT)
}

/// The operating time of every method a combined request may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Budgets {
    pub(crate) get: Budget,
    pub(crate) clear: Budget,
    pub(crate) error: Budget,
    /// The `batch` request itself.
    pub(crate) batch: Budget,
}

/// The most requests a wave sends at once. A portal runs a `batch`'s commands one after the
/// other (`CRestProvider::methodsBatch` in `modules/rest/classes/general/rest_provider.php`: a
/// `foreach` over `cmd`, each command processed by its own `CRestServerBatchItem` before the
/// next, which may refer to the results before it), so a wave's time is its longest request:
/// the more requests
/// share a wave's calls, the shorter each is. Measured with the defaults (`batch_size` 50,
/// `max_unsettled` 5,000: about 100 gets and as many settle calls a wave) on a simulated
/// server taking 5 ms a call plus 0.2 ms an event, a 100,000-event backlog drained at
/// 12,300–13,800 events/s with 16, 14,800–18,000 with 32 and 16,100–20,700 with 64, at about
/// the same CPU per event (`docs/BENCHMARKS.md`). An operator caps it with `burst` (`burst × share`
/// requests at once).
pub(crate) const MAX_PIPELINE: usize = 64;

/// How many requests one wave of a poller may send at once: as many as the client's bucket
/// refills in a second (`per_second`, its share applied) and holds (`burst`, its share
/// applied), at least one and at most [`MAX_PIPELINE`]. With the cloud's bucket (2 per second,
/// the default share 0.5) that is one: a wave is one combined request, as the request economy
/// wants where the bucket is what limits. On a portal that limits nothing (a self-hosted one
/// with its limiter off, where an operator opens `rate_limit`) the portal's server time is what
/// bounds a drain, and requests that run side by side overlap it.
pub(crate) fn pipeline(per_second: f64, burst: f64) -> usize {
    let fits = per_second.min(burst).floor();
    if fits >= MAX_PIPELINE as f64 {
        MAX_PIPELINE
    } else if fits >= 1.0 {
        fits as usize
    } else {
        1
    }
}

/// The adaptive number of `get` commands per wave.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FetchWidth {
    width: u32,
    /// [`MAX_GETS`] for each request of a wave.
    cap: u32,
}

impl Default for FetchWidth {
    fn default() -> Self {
        FetchWidth::for_requests(1)
    }
}

impl FetchWidth {
    /// The width of a poller whose waves send up to `requests` requests at once.
    pub(crate) fn for_requests(requests: usize) -> FetchWidth {
        FetchWidth {
            width: 1,
            cap: MAX_GETS.saturating_mul(requests.clamp(1, MAX_PIPELINE) as u32),
        }
    }

    #[cfg(test)]
    fn width(&self) -> u32 {
        self.width
    }

    /// The `limit`s of the gets to send next: at most the width, `max_gets` (the command slots
    /// and the operating time left), and `room` events in total (`max_unsettled` minus what is
    /// open), each at most `batch_size`. Empty when there is no room.
    pub(crate) fn plan(&self, room: u64, batch_size: u32, max_gets: u32) -> Vec<u32> {
        if batch_size == 0 || room == 0 {
            return Vec::new();
        }
        let count = self.width.min(max_gets).min(self.cap);
        let mut left = room;
        let mut limits = Vec::new();
        while left > 0 && (limits.len() as u32) < count {
            let limit = left.min(u64::from(batch_size)) as u32;
            limits.push(limit);
            left -= u64::from(limit);
        }
        limits
    }

    /// Learns from a request that carried `asked` gets of which `full` came back full.
    pub(crate) fn observe(&mut self, asked: usize, full: usize, elapsed: Duration) {
        if asked == 0 {
            return;
        }
        let asked = asked as u32;
        let full = full as u32;
        self.width = if full >= asked {
            (self.width.max(asked) * 2).min(self.cap)
        } else {
            // The queue ran dry within this request: as many as were full, plus one.
            (full + 1).clamp(1, self.cap)
        };
        if elapsed > SLOW_REQUEST {
            self.width = (self.width / 2).max(1);
        }
    }
}

/// The wait of an idle portal before its next poll: `poll_interval`, doubled for every empty
/// poll in a row after the first, up to `max`. The first event resets it.
pub(crate) fn idle_wait(poll_interval: Duration, max: Duration, empty_polls: u32) -> Duration {
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

    fn budget(reported: f64, call: Option<f64>) -> Budget {
        Budget {
            time: MethodTime {
                reported: Some(reported),
                reset_at: Some(1_000),
                unreported: 0.0,
                call,
                banned_until: None,
            },
            limit: 420.0,
        }
    }

    #[test]
    fn width_grows_while_every_get_is_full_and_falls_when_the_queue_drains() {
        let mut w = FetchWidth::default();
        assert_eq!(w.plan(5000, 50, u32::MAX), vec![50]);
        let mut widths = Vec::new();
        for _ in 0..7 {
            let asked = w.plan(1_000_000, 50, u32::MAX).len();
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
    fn plan_respects_room_max_gets_and_batch_size() {
        let w = FetchWidth {
            width: 40,
            ..FetchWidth::default()
        };
        assert_eq!(w.plan(120, 50, 50), vec![50, 50, 20]);
        assert_eq!(w.plan(0, 50, 50), Vec::<u32>::new());
        assert_eq!(w.plan(10_000, 50, 3).len(), 3);
        assert_eq!(w.plan(10_000, 50, 0).len(), 0);
        assert_eq!(w.plan(10_000, 50, u32::MAX).len(), 40);
        assert!(w.plan(10_000, 50, 50).iter().all(|l| *l == 50));
    }

    #[test]
    fn the_time_left_under_the_ceiling_bounds_the_calls() {
        // 0.9 * 420 = 378 s; 300 used leaves 78 s: 156 calls of 0.5 s.
        assert_eq!(budget(300.0, Some(0.5)).affordable(NOW), 156);
        // Unreported time counts as used.
        let mut b = budget(300.0, Some(0.5));
        b.time.unreported = 28.0;
        assert_eq!(b.affordable(NOW), 100);
        // At the ceiling: nothing, until the oldest minute drops out.
        assert_eq!(budget(377.8, Some(0.5)).affordable(NOW), 0);
        assert_eq!(
            budget(377.8, Some(0.5)).pause(NOW),
            Some(Duration::from_secs_f64(100.5))
        );
        assert_eq!(budget(300.0, Some(0.5)).pause(NOW), None);
        // Cost not measured yet: one call measures it.
        assert_eq!(budget(10.0, None).affordable(NOW), 1);
        // Nothing reported: no limit known.
        let unknown = Budget {
            time: MethodTime::default(),
            limit: 420.0,
        };
        assert_eq!(unknown.affordable(NOW), u32::MAX);
        assert_eq!(unknown.pause(NOW), None);
    }

    #[test]
    fn a_stale_figure_still_bounds_the_use_and_one_call_learns_more() {
        // The window moved on (reset_at 1000 has passed): the old figure is an overestimate.
        assert_eq!(budget(300.0, Some(0.5)).affordable(1_001.0), 156);
        assert_eq!(budget(400.0, Some(0.5)).affordable(1_001.0), 1);
        assert_eq!(budget(400.0, Some(0.5)).pause(1_001.0), None);
    }

    #[test]
    fn a_banned_method_waits_for_the_ban_to_end() {
        let mut b = budget(0.0, Some(0.5));
        b.time.banned_until = Some(NOW + 250.0);
        assert_eq!(b.affordable(NOW), 0);
        assert_eq!(b.pause(NOW), Some(Duration::from_secs(250)));
        assert_eq!(b.affordable(NOW + 250.0), 756);
    }

    #[test]
    fn hostile_reset_times_give_bounded_waits() {
        let mut b = budget(420.0, Some(0.5));
        b.time.reset_at = Some(i64::MAX);
        assert_eq!(
            b.affordable(NOW),
            1,
            "no real reset time: one call learns more"
        );
        assert_eq!(b.pause(NOW), None);
        b.time.reset_at = None;
        assert_eq!(b.affordable(NOW), 1, "none at all: the same");
        assert_eq!(b.pause(NOW), None);
        b.time.reset_at = Some(i64::MIN);
        assert_eq!(b.affordable(NOW), 1, "a reset long past: stale, one call");
        b.time.banned_until = Some(f64::MAX);
        assert_eq!(b.pause(NOW), Some(MAX_OPERATING_WAIT));
    }

    #[test]
    fn a_wave_is_one_request_unless_the_bucket_refills_more_in_a_second() {
        // The cloud's bucket at the default share: 25 burst, 1 per second.
        assert_eq!(pipeline(1.0, 25.0), 1);
        assert_eq!(pipeline(0.5, 25.0), 1);
        // Enterprise at the default share: 2.5 per second.
        assert_eq!(pipeline(2.5, 125.0), 2);
        // A bucket that holds less than it refills: what it holds.
        assert_eq!(pipeline(100.0, 3.0), 3);
        assert_eq!(pipeline(1e6, 1e6), MAX_PIPELINE);
    }

    #[test]
    fn a_wave_of_several_requests_grows_to_40_gets_per_request() {
        let mut w = FetchWidth::for_requests(4);
        for _ in 0..10 {
            let asked = w.width();
            w.observe(asked as usize, asked as usize, FAST);
        }
        assert_eq!(w.width(), 4 * MAX_GETS);
        assert_eq!(w.plan(1_000_000, 50, u32::MAX).len(), 160);
        assert_eq!(
            FetchWidth::for_requests(1000),
            FetchWidth::for_requests(MAX_PIPELINE)
        );
    }

    #[test]
    fn a_slow_request_halves_the_width() {
        let mut w = FetchWidth {
            width: 16,
            ..FetchWidth::default()
        };
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
