//! Per REST method, what the portal last said of its operating time (`time.operating`,
//! `time.operating_reset_at`) and what this client's calls may have added since: the input of
//! the request economy. Pure: the client feeds it each answer's stamps.
//!
//! The portal's operating-time limiter (`Bitrix\Rest\Engine\Access\LoadLimiter` in the rest
//! module, with `CRestServer::appendDebugInfo` in `modules/rest/classes/general/rest.php`)
//! reports per method the seconds stored in its ten-minute window plus this request's own calls
//! of the method that took more than 0.1 s each; it stores a request's time only after
//! answering (summed per method, stored above 0.1 s, `batch` at half weight). It does not report
//! what one call cost: `time.processing` is a difference of whole seconds on the current
//! server (the start and finish are kept in `int` properties), 0 for any fast call. So the
//! cost of a call is bounded here from the stamps the portal does give: the sub-commands of a
//! `batch` run one after the other and each carries its `finish` (a float), so the gap between
//! two finishes bounds the later command's time; a whole request takes at most the time this
//! client waited for it, and at most `finish − start` (`start` is truncated to whole seconds,
//! which only makes that larger).

use std::collections::HashMap;
use std::time::Duration;

use super::types::TimeInfo;

/// `LoadLimiter::BAN_DURATION`: a method that passed its limit is refused this long, and its
/// stored time is forgotten.
pub(super) const BAN: Duration = Duration::from_secs(300);
/// `LoadLimiter::BATCH_TIME_WEIGHT`: a `batch` request is charged half its time.
const BATCH_WEIGHT: f64 = 0.5;
/// `LoadLimiter`'s window (`$limitTime` per ten minutes, in one-minute baskets): a second
/// stored now has left it this long later, so a reset time further ahead (a minute of slack
/// for the clocks) is no real one.
const WINDOW: f64 = 600.0;
const RESET_SLACK: f64 = 60.0;

/// What is known of one method's operating time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MethodTime {
    /// `time.operating` of the last answer that carried the method: seconds the portal counts
    /// against its limit in the current window.
    pub reported: Option<f64>,
    /// `time.operating_reset_at` of that answer: when the oldest stored minute leaves the window
    /// (portal Unix seconds).
    pub reset_at: Option<i64>,
    /// What the calls of that request may have added beyond `reported` (the portal stores them
    /// after answering): the sum of their upper bounds.
    pub unreported: f64,
    /// What one call may take: a maximum of the bounds seen that decays only slowly.
    pub call: Option<f64>,
    /// The portal refused the method with 429 `OPERATION_TIME_LIMIT`: banned until then
    /// (portal Unix seconds).
    pub banned_until: Option<f64>,
}

impl MethodTime {
    /// Seconds of the method's limit taken, at most: what the portal reported plus what the
    /// client added since. `None` when the portal has never reported the method's time.
    pub(crate) fn used(&self) -> Option<f64> {
        self.reported.map(|r| r + self.unreported)
    }

    /// Whether the portal's figure is out of date: its oldest minute has left the window since,
    /// so `used` is now an overestimate. A figure without a reset time, or with one further
    /// ahead than the window, would never go out of date: it is treated as out of date, so that
    /// one call learns where the method stands instead of the method waiting for ever (a 429
    /// is the backstop).
    pub(crate) fn stale(&self, now: f64) -> bool {
        self.reset_at
            .is_none_or(|at| (at as f64) <= now || (at as f64) > now + WINDOW + RESET_SLACK)
    }

    /// Whether a ban is still running at `now`.
    pub(crate) fn banned(&self, now: f64) -> Option<f64> {
        self.banned_until.filter(|until| *until > now)
    }

    fn learn_call(&mut self, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        self.call = Some(match self.call {
            // Cheap answers must not talk the estimate down faster than dear ones raise it.
            Some(old) => seconds.max(old * 0.8 + seconds * 0.2),
            None => seconds,
        });
    }
}

/// One answered request, as the accounting needs it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Answered<'a> {
    /// The method of the request (`batch` for a batch).
    pub(super) method: &'a str,
    /// The request's `time` block.
    pub(super) time: &'a TimeInfo,
    /// How long this client waited for the answer, in seconds.
    pub(super) waited: f64,
}

/// The sub-commands of a `batch` request in the order they ran: their method and, when they
/// succeeded, their `time` block.
pub(super) type Commands<'a> = [(&'a str, Option<&'a TimeInfo>)];

/// What is known of every method's operating time on one portal.
#[derive(Debug, Clone, Default)]
pub(super) struct OperatingTimes {
    methods: HashMap<String, MethodTime>,
}

impl OperatingTimes {
    pub(super) fn get(&self, method: &str) -> MethodTime {
        self.methods.get(method).copied().unwrap_or_default()
    }

    /// Records a successful answer: a single call, or a `batch` with its sub-commands.
    pub(super) fn record(&mut self, answer: Answered<'_>, commands: &Commands<'_>) {
        let whole = bound(answer.time, answer.waited);
        if commands.is_empty() {
            self.update(answer.method, answer.time, whole, whole);
            return;
        }
        let weighted = whole * BATCH_WEIGHT;
        self.update(answer.method, answer.time, weighted, weighted);
        // The portal's clock when the batch began, at the earliest: its finish less the time
        // this client waited, and not before the (truncated) start.
        let began = match (answer.time.start, answer.time.finish) {
            (Some(start), Some(finish)) => start.max(finish - answer.waited),
            (None, Some(finish)) => finish - answer.waited,
            _ => f64::NAN,
        };
        let mut previous = began;
        // method → (the last time block, the sum of the bounds, the largest bound)
        let mut per_method: Vec<(&str, &TimeInfo, f64, f64)> = Vec::new();
        for (method, time) in commands {
            let Some(time) = time else { continue };
            let gap = match time.finish {
                Some(finish) if previous.is_finite() && finish.is_finite() => {
                    let gap = (finish - previous).clamp(0.0, whole);
                    previous = finish;
                    gap
                }
                _ => whole,
            };
            match per_method.iter_mut().find(|(m, ..)| m == method) {
                Some(entry) => {
                    entry.1 = time;
                    entry.2 += gap;
                    entry.3 = entry.3.max(gap);
                }
                None => per_method.push((method, time, gap, gap)),
            }
        }
        for (method, time, sum, largest) in per_method {
            self.update(method, time, sum, largest);
        }
    }

    fn update(&mut self, method: &str, time: &TimeInfo, unreported: f64, call: f64) {
        let reset_at = credible_reset(time);
        let entry = self.methods.entry(method.to_string()).or_default();
        if let Some(operating) = time.operating.filter(|o| o.is_finite() && *o >= 0.0) {
            entry.reported = Some(operating);
            entry.reset_at = reset_at;
            entry.unreported = unreported;
        } else if entry.reported.is_some() {
            entry.unreported += unreported;
        }
        entry.banned_until = None;
        entry.learn_call(call);
    }

    /// The portal refused `method` with 429 at `now` (portal Unix seconds): banned for `ban`.
    pub(super) fn refused(&mut self, method: &str, now: f64, ban: Duration) {
        let entry = self.methods.entry(method.to_string()).or_default();
        entry.banned_until = Some(now + ban.as_secs_f64());
        // The portal forgets the method's stored time when it bans it.
        entry.reported = Some(0.0);
        entry.unreported = 0.0;
        entry.reset_at = None;
    }
}

/// The answer's reset time when it is credible: within the window of the answer's own stamp
/// (`finish`, else `start`). Missing or out of range beside a stamp, the figure is out of date
/// one window after the stamp at the latest; with no stamp to check it against, it is taken as
/// given (`MethodTime::stale` still treats one too far ahead of the portal's clock, or none, as
/// out of date).
fn credible_reset(time: &TimeInfo) -> Option<i64> {
    let stamp = time.finish.or(time.start).filter(|t| t.is_finite());
    match (time.operating_reset_at, stamp) {
        (Some(at), Some(t))
            if (at as f64) > t - WINDOW && (at as f64) <= t + WINDOW + RESET_SLACK =>
        {
            Some(at)
        }
        (_, Some(t)) => Some((t + WINDOW).ceil() as i64),
        (at, None) => at,
    }
}

/// An upper bound of a request's server time: the time this client waited for it, and its own
/// `finish − start`.
fn bound(time: &TimeInfo, waited: f64) -> f64 {
    let stamped = match (time.start, time.finish) {
        (Some(start), Some(finish)) if finish >= start => finish - start,
        _ => f64::INFINITY,
    };
    let waited = if waited.is_finite() && waited >= 0.0 {
        waited
    } else {
        f64::INFINITY
    };
    let bound = waited.min(stamped);
    if bound.is_finite() { bound } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(start: f64, finish: f64, operating: Option<f64>, reset_at: Option<i64>) -> TimeInfo {
        TimeInfo {
            start: Some(start),
            finish: Some(finish),
            operating,
            operating_reset_at: reset_at,
            processing: None,
        }
    }

    #[test]
    fn a_single_call_is_bounded_by_the_wait_and_its_stamps() {
        let mut t = OperatingTimes::default();
        // start is truncated: finish - start = 0.9, the client waited 0.05 s.
        let answer = time(100.0, 100.9, Some(12.0), Some(700));
        t.record(
            Answered {
                method: "event.offline.get",
                time: &answer,
                waited: 0.05,
            },
            &[],
        );
        let get = t.get("event.offline.get");
        assert_eq!(get.reported, Some(12.0));
        assert_eq!(get.reset_at, Some(700));
        assert!((get.unreported - 0.05).abs() < 1e-9);
        assert_eq!(get.call, Some(0.05));
        assert!((get.used().unwrap() - 12.05).abs() < 1e-9);
        assert!(!get.stale(699.0));
        assert!(get.stale(700.0));
    }

    #[test]
    fn batch_commands_are_bounded_by_the_gaps_between_their_finishes() {
        let mut t = OperatingTimes::default();
        // The portal began at 100.2 (the client waited 0.8 s for an answer stamped 101.0).
        let outer = time(100.0, 101.0, Some(3.0), Some(650));
        let clear = time(100.0, 100.3, Some(1.0), Some(640));
        let get1 = time(100.0, 100.5, Some(5.0), Some(660));
        let get2 = time(100.0, 100.9, Some(5.4), Some(660));
        t.record(
            Answered {
                method: "batch",
                time: &outer,
                waited: 0.8,
            },
            &[
                ("event.offline.clear", Some(&clear)),
                ("event.offline.get", None), // a failed command: no stamps
                ("event.offline.get", Some(&get1)),
                ("event.offline.get", Some(&get2)),
            ],
        );
        let batch = t.get("batch");
        assert_eq!(batch.reported, Some(3.0));
        assert!((batch.unreported - 0.4).abs() < 1e-9, "half of 0.8 s");
        let clear = t.get("event.offline.clear");
        assert!((clear.call.unwrap() - 0.1).abs() < 1e-9, "100.3 - 100.2");
        let get = t.get("event.offline.get");
        assert_eq!(get.reported, Some(5.4), "the last get's figure");
        assert!((get.unreported - 0.6).abs() < 1e-9, "0.2 + 0.4");
        assert!((get.call.unwrap() - 0.4).abs() < 1e-9, "the largest gap");
    }

    #[test]
    fn the_call_estimate_rises_at_once_and_falls_slowly() {
        let mut m = MethodTime::default();
        m.learn_call(1.0);
        m.learn_call(0.1);
        assert!((m.call.unwrap() - 0.82).abs() < 1e-9);
        m.learn_call(2.0);
        assert_eq!(m.call, Some(2.0));
        m.learn_call(f64::NAN);
        m.learn_call(-1.0);
        assert_eq!(m.call, Some(2.0));
    }

    #[test]
    fn answers_without_operating_time_keep_adding_to_the_last_figure() {
        let mut t = OperatingTimes::default();
        let plain = TimeInfo {
            finish: Some(10.5),
            start: Some(10.0),
            ..TimeInfo::default()
        };
        let answer = |time| Answered {
            method: "m",
            time,
            waited: 0.2,
        };
        t.record(answer(&plain), &[]);
        assert_eq!(t.get("m").used(), None, "nothing reported: no limit known");
        let reported = time(10.0, 10.5, Some(1.0), None);
        t.record(answer(&reported), &[]);
        t.record(answer(&plain), &[]);
        assert!((t.get("m").used().unwrap() - 1.4).abs() < 1e-9);
    }

    #[test]
    fn a_ban_is_remembered_until_the_method_answers_again() {
        let mut t = OperatingTimes::default();
        t.refused("m", 1000.0, BAN);
        let m = t.get("m");
        assert_eq!(m.banned(1100.0), Some(1300.0));
        assert_eq!(m.banned(1300.0), None);
        assert_eq!(m.used(), Some(0.0), "the portal forgot the method's time");
        let ok = time(1300.0, 1300.1, Some(0.0), None);
        t.record(
            Answered {
                method: "m",
                time: &ok,
                waited: 0.1,
            },
            &[],
        );
        assert_eq!(t.get("m").banned_until, None);
    }

    #[test]
    fn hostile_stamps_give_finite_bounds() {
        let mut t = OperatingTimes::default();
        let odd = TimeInfo {
            start: Some(f64::MAX),
            finish: Some(-1e300),
            operating: Some(f64::NAN),
            operating_reset_at: Some(i64::MAX),
            processing: Some(f64::NAN),
        };
        t.record(
            Answered {
                method: "batch",
                time: &odd,
                waited: 0.3,
            },
            &[("m", Some(&odd))],
        );
        assert!(t.get("m").call.unwrap().is_finite());
        assert_eq!(t.get("batch").reported, None);
    }
}
