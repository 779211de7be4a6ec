//! The REST server's operating-time limiter, in both versions a client may meet: the current
//! one (`Bitrix\Rest\Engine\Access\LoadLimiter`, version 2) and the older model the public
//! docs describe (float `processing`, `batch` not counted, blocked until the oldest minute drops
//! out). Pure: time is passed in.
//!
//! The current limiter, as the rest module's source has it (`modules/rest/lib/engine/access/
//! loadlimiter.php`, found by its field `minimalFixTime`; `CRestServer::processCall` and
//! `appendDebugInfo` in `modules/rest/classes/general/rest.php`):
//! - per method and application, ten one-minute buckets numbered `intdiv(time(), 60)`; a bucket
//!   expires ten minutes after the first call stored in it;
//! - every call of a request is registered (`registerStarting`/`registerEnding`); after the
//!   answer (`finalize`) the time of all calls of one method in the request is summed, `batch`
//!   weighted by `BATCH_TIME_WEIGHT = 0.5`, and stored only when the sum exceeds
//!   `minimalFixTime = 0.1` s;
//! - before each call (`LoadLimiter::is`): a banned method answers 429; otherwise the stored
//!   buckets plus this request's finished calls of the method (each counted when above 0.1 s)
//!   are compared with the limit (420 s unless the plan says otherwise); passing it sets a ban of
//!   `BAN_DURATION = 300` s and deletes the method's buckets;
//! - `time.operating` is that same sum (`getRestTime`); `time.operating_reset_at`
//!   (`getResetTime`) is the ban's end while banned, else the expiry of the oldest stored bucket,
//!   else the first registered call of this request plus ten minutes, else absent.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use super::{LimiterModel, OperatingLimit};

/// `LoadLimiter::$bucketCount`.
const BUCKETS: i64 = 10;
/// `LoadLimiter::$minimalFixTime`: sums at or below this are not stored.
pub const MINIMAL_FIX_TIME: f64 = 0.1;
/// `LoadLimiter::BATCH_TIME_WEIGHT`.
pub const BATCH_TIME_WEIGHT: f64 = 0.5;
/// Used when no limit is enforced: time is still accounted for `time.operating`.
const DEFAULT_WINDOW: Duration = Duration::from_secs(600);

/// One call of a REST method inside an HTTP request (`LoadLimiter::$timeRegistered`).
#[derive(Debug, Clone, PartialEq)]
struct Call {
    method: String,
    start: f64,
    finish: Option<f64>,
}

/// The calls of one HTTP request, in the order they started; `batch` and its sub-commands alike.
#[derive(Debug, Clone, Default)]
pub struct RequestCalls {
    calls: Vec<Call>,
}

impl RequestCalls {
    /// `registerStarting`.
    pub fn start(&mut self, method: &str, at: f64) {
        self.calls.push(Call {
            method: method.to_string(),
            start: at,
            finish: None,
        });
    }

    /// `registerEnding`: the last started, unfinished call of `method`.
    pub fn finish(&mut self, method: &str, at: f64) {
        if let Some(call) = self
            .calls
            .iter_mut()
            .rev()
            .find(|c| c.method == method && c.finish.is_none())
        {
            call.finish = Some(at);
        }
    }

    /// This request's finished calls of `method` that count on their own (`getRestTime`).
    fn counted(&self, method: &str) -> f64 {
        self.calls
            .iter()
            .filter(|c| c.method == method)
            .filter_map(|c| c.finish.map(|f| weighted(method, f - c.start)))
            .filter(|t| *t > MINIMAL_FIX_TIME)
            .sum()
    }
}

/// The time a call of `method` is charged.
fn weighted(method: &str, seconds: f64) -> f64 {
    if method == "batch" {
        seconds * BATCH_TIME_WEIGHT
    } else {
        seconds
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Bucket {
    seconds: f64,
    expire_at: f64,
}

/// The current limiter (`LoadLimiter` v2).
#[derive(Debug, Clone)]
pub struct LoadLimiter {
    limit: Option<f64>,
    window: f64,
    bucket_len: f64,
    ban: f64,
    /// method → bucket number → stored time.
    buckets: HashMap<String, BTreeMap<i64, Bucket>>,
    /// method → when its ban ends.
    bans: HashMap<String, f64>,
}

impl LoadLimiter {
    fn bucket_of(&self, at: f64) -> i64 {
        (at / self.bucket_len).floor() as i64
    }

    /// The stored buckets of `method` in the window that ends in the bucket of `now`, oldest
    /// first.
    fn window(&self, method: &str, now: f64) -> Vec<Bucket> {
        let current = self.bucket_of(now);
        self.buckets
            .get(method)
            .map(|b| {
                b.range(current - (BUCKETS - 1)..=current)
                    .map(|(_, bucket)| *bucket)
                    .filter(|bucket| bucket.expire_at > now)
                    .collect()
            })
            .unwrap_or_default()
    }

    fn banned_until(&self, method: &str, now: f64) -> Option<f64> {
        self.bans.get(method).copied().filter(|end| *end > now)
    }

    fn rest_time(&self, method: &str, request: &RequestCalls, now: f64) -> f64 {
        // `0.0 +`: an empty float sum is -0.0, which PHP's `array_sum` never gives.
        0.0 + self
            .window(method, now)
            .iter()
            .map(|b| b.seconds)
            .sum::<f64>()
            + request.counted(method)
    }

    fn reset_time(&self, method: &str, request: &RequestCalls, now: f64) -> Option<i64> {
        if let Some(end) = self.banned_until(method, now) {
            return Some(end.ceil() as i64);
        }
        if let Some(oldest) = self.window(method, now).iter().find(|b| b.seconds > 0.0) {
            return Some(oldest.expire_at as i64);
        }
        request
            .calls
            .first()
            .map(|first| (first.start + self.window) as i64)
    }

    fn check(&mut self, method: &str, request: &RequestCalls, now: f64) -> Result<(), i64> {
        if let Some(end) = self.banned_until(method, now) {
            return Err(end.ceil() as i64);
        }
        let Some(limit) = self.limit else {
            return Ok(());
        };
        if self.rest_time(method, request, now) > limit {
            let end = now + self.ban;
            self.bans.insert(method.to_string(), end);
            self.buckets.remove(method);
            return Err(end.ceil() as i64);
        }
        Ok(())
    }

    fn finalize(&mut self, request: &RequestCalls, started: f64) {
        let bucket = self.bucket_of(started);
        let mut methods: Vec<&str> = Vec::new();
        for call in &request.calls {
            if !methods.contains(&call.method.as_str()) {
                methods.push(&call.method);
            }
        }
        for method in methods {
            let calls: Vec<&Call> = request
                .calls
                .iter()
                .filter(|c| c.method == method)
                .collect();
            let sum: f64 = calls
                .iter()
                .filter_map(|c| c.finish.map(|f| f - c.start))
                .sum();
            let time = weighted(method, sum);
            if time <= MINIMAL_FIX_TIME {
                continue;
            }
            let first = calls.first().map_or(started, |c| c.start);
            let window = self.window;
            self.buckets
                .entry(method.to_string())
                .or_default()
                .entry(bucket)
                .and_modify(|b| b.seconds += time)
                .or_insert(Bucket {
                    seconds: time,
                    expire_at: first + window,
                });
        }
    }
}

/// The older model: one basket per minute from its first call, every call charged its time at
/// once, `batch` not counted, a method over budget answers 429 until its oldest basket drops out.
#[derive(Debug, Clone)]
pub struct LegacyBudget {
    budget: Option<f64>,
    window: f64,
    basket_len: f64,
    methods: HashMap<String, VecDeque<(f64, f64)>>,
}

impl LegacyBudget {
    fn baskets(&mut self, method: &str, now: f64) -> &mut VecDeque<(f64, f64)> {
        let window = self.window;
        let baskets = self.methods.entry(method.to_string()).or_default();
        while baskets
            .front()
            .is_some_and(|(start, _)| start + window <= now)
        {
            baskets.pop_front();
        }
        baskets
    }

    fn used(&mut self, method: &str, now: f64) -> f64 {
        self.baskets(method, now).iter().map(|(_, s)| s).sum()
    }

    fn reset_at(&mut self, method: &str, now: f64) -> i64 {
        let window = self.window;
        let at = self
            .baskets(method, now)
            .front()
            .map_or(now, |(start, _)| start + window);
        at.ceil() as i64
    }

    fn check(&mut self, method: &str, now: f64) -> Result<(), i64> {
        let Some(budget) = self.budget else {
            return Ok(());
        };
        if self.used(method, now) > budget {
            Err(self.reset_at(method, now))
        } else {
            Ok(())
        }
    }

    fn charge(&mut self, method: &str, seconds: f64, now: f64) {
        let basket_len = self.basket_len;
        let baskets = self.baskets(method, now);
        match baskets.back_mut() {
            Some((start, used)) if now < *start + basket_len => *used += seconds,
            _ => baskets.push_back((now, seconds)),
        }
    }
}

/// What the answer's `time` block says of a method's operating time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Operating {
    pub operating: f64,
    pub reset_at: Option<i64>,
}

/// The limiter of the simulated portal, in the configured model.
#[derive(Debug, Clone)]
pub enum Limiter {
    Current(LoadLimiter),
    Legacy(LegacyBudget),
}

impl Limiter {
    pub fn new(model: LimiterModel, limit: Option<OperatingLimit>) -> Limiter {
        let window = limit
            .map_or(DEFAULT_WINDOW, |l| l.window)
            .as_secs_f64()
            .max(f64::EPSILON);
        let budget = limit.map(|l| l.budget.as_secs_f64());
        match model {
            LimiterModel::Current => Limiter::Current(LoadLimiter {
                limit: budget,
                window,
                bucket_len: window / BUCKETS as f64,
                ban: limit.map_or(300.0, |l| l.ban.as_secs_f64()),
                buckets: HashMap::new(),
                bans: HashMap::new(),
            }),
            LimiterModel::Legacy => Limiter::Legacy(LegacyBudget {
                budget,
                window,
                basket_len: window / BUCKETS as f64,
                methods: HashMap::new(),
            }),
        }
    }

    pub fn model(&self) -> LimiterModel {
        match self {
            Limiter::Current(_) => LimiterModel::Current,
            Limiter::Legacy(_) => LimiterModel::Legacy,
        }
    }

    /// Whether a call of `method` may run now (`Err(reset_at)`: answer 429). The legacy model
    /// never limits `batch` itself.
    pub fn check(&mut self, method: &str, request: &RequestCalls, now: f64) -> Result<(), i64> {
        match self {
            Limiter::Current(l) => l.check(method, request, now),
            Limiter::Legacy(_) if method == "batch" => Ok(()),
            Limiter::Legacy(l) => l.check(method, now),
        }
    }

    /// A call of `method` ran from `start` to `finish`: the legacy model charges it at once.
    pub fn ran(&mut self, method: &str, start: f64, finish: f64) {
        if let Limiter::Legacy(l) = self
            && method != "batch"
        {
            l.charge(method, finish - start, start);
        }
    }

    /// The `operating` fields of the answer to a call of `method` (none for the legacy model's
    /// `batch`).
    pub fn operating(
        &mut self,
        method: &str,
        request: &RequestCalls,
        now: f64,
    ) -> Option<Operating> {
        match self {
            Limiter::Current(l) => Some(Operating {
                operating: l.rest_time(method, request, now),
                reset_at: l.reset_time(method, request, now),
            }),
            Limiter::Legacy(_) if method == "batch" => None,
            Limiter::Legacy(l) => Some(Operating {
                operating: l.used(method, now),
                reset_at: Some(l.reset_at(method, now)),
            }),
        }
    }

    /// After the answer: stores the request's time (`LoadLimiter::finalize`).
    pub fn finalize(&mut self, request: &RequestCalls, started: f64) {
        if let Limiter::Current(l) = self {
            l.finalize(request, started);
        }
    }

    /// Seconds stored for `method` in the window.
    #[cfg(test)]
    pub fn stored(&mut self, method: &str, now: f64) -> f64 {
        match self {
            Limiter::Current(l) => l.rest_time(method, &RequestCalls::default(), now),
            Limiter::Legacy(l) => l.used(method, now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(budget: u64, window: u64, ban: u64) -> Option<OperatingLimit> {
        Some(OperatingLimit {
            budget: Duration::from_secs(budget),
            window: Duration::from_secs(window),
            ban: Duration::from_secs(ban),
        })
    }

    /// One request with one call of `method` lasting `seconds`, at `at`; returns whether it ran.
    fn request(l: &mut Limiter, method: &str, seconds: f64, at: f64) -> Result<(), i64> {
        let mut calls = RequestCalls::default();
        l.check(method, &calls, at)?;
        calls.start(method, at);
        calls.finish(method, at + seconds);
        l.ran(method, at, at + seconds);
        l.finalize(&calls, at);
        Ok(())
    }

    const T0: f64 = 1_800_000_000.0; // a minute boundary

    #[test]
    fn short_calls_alone_are_not_stored_but_summed_in_one_request_they_are() {
        let mut l = Limiter::new(LimiterModel::Current, limit(420, 600, 300));
        for i in 0..20 {
            request(&mut l, "event.offline.get", 0.09, T0 + f64::from(i)).unwrap();
        }
        assert_eq!(l.stored("event.offline.get", T0 + 30.0), 0.0);
        // Five 0.05 s gets in one request: 0.25 s stored.
        let mut calls = RequestCalls::default();
        for i in 0..5 {
            let at = T0 + 40.0 + f64::from(i) * 0.05;
            l.check("event.offline.get", &calls, at).unwrap();
            calls.start("event.offline.get", at);
            calls.finish("event.offline.get", at + 0.05);
        }
        // The answer counts only calls above 0.1 s on their own.
        let op = l.operating("event.offline.get", &calls, T0 + 41.0).unwrap();
        assert_eq!(op.operating, 0.0);
        assert_eq!(op.reset_at, Some((T0 + 40.0 + 600.0) as i64));
        l.finalize(&calls, T0 + 40.0);
        assert!((l.stored("event.offline.get", T0 + 42.0) - 0.25).abs() < 1e-6);
    }

    #[test]
    fn batch_is_charged_at_half_weight_and_limited_like_any_method() {
        let mut l = Limiter::new(LimiterModel::Current, limit(1, 600, 300));
        let mut calls = RequestCalls::default();
        calls.start("batch", T0);
        calls.start("event.offline.get", T0);
        calls.finish("event.offline.get", T0 + 1.6);
        calls.finish("batch", T0 + 1.6);
        let op = l.operating("batch", &calls, T0 + 1.6).unwrap();
        assert!((op.operating - 0.8).abs() < 1e-6);
        l.finalize(&calls, T0);
        assert!((l.stored("batch", T0 + 2.0) - 0.8).abs() < 1e-6);
        assert!((l.stored("event.offline.get", T0 + 2.0) - 1.6).abs() < 1e-6);
        // get is over its 1 s budget; batch (0.8 s) is not.
        assert!(l.check("batch", &RequestCalls::default(), T0 + 3.0).is_ok());
        assert!(
            l.check("event.offline.get", &RequestCalls::default(), T0 + 3.0)
                .is_err()
        );
    }

    #[test]
    fn passing_the_limit_bans_the_method_for_the_ban_duration_and_forgets_its_buckets() {
        let mut l = Limiter::new(LimiterModel::Current, limit(2, 600, 300));
        request(&mut l, "m", 1.5, T0).unwrap();
        request(&mut l, "m", 1.0, T0 + 10.0).unwrap(); // 1.5 ≤ 2: runs, stores 2.5
        assert_eq!(
            request(&mut l, "m", 0.2, T0 + 20.0),
            Err((T0 + 320.0) as i64)
        );
        // Banned: the buckets are gone, the reset time is the ban's end.
        let op = l
            .operating("m", &RequestCalls::default(), T0 + 30.0)
            .unwrap();
        assert_eq!(op.operating, 0.0);
        assert_eq!(op.reset_at, Some((T0 + 320.0) as i64));
        assert!(request(&mut l, "m", 0.2, T0 + 319.0).is_err());
        // Other methods are untouched; after the ban the method starts from zero.
        assert!(request(&mut l, "other", 0.2, T0 + 30.0).is_ok());
        assert!(request(&mut l, "m", 0.2, T0 + 320.5).is_ok());
        assert!((l.stored("m", T0 + 321.0) - 0.2).abs() < 1e-6);
    }

    #[test]
    fn calls_earlier_in_the_same_request_count_against_the_limit() {
        let mut l = Limiter::new(LimiterModel::Current, limit(1, 600, 300));
        let mut calls = RequestCalls::default();
        for i in 0..3 {
            let at = T0 + f64::from(i) * 0.6;
            let checked = l.check("m", &calls, at);
            if i < 2 {
                checked.unwrap();
                calls.start("m", at);
                calls.finish("m", at + 0.6);
            } else {
                // 0.6 + 0.6 = 1.2 > 1 before the third call.
                assert!(checked.is_err());
            }
        }
    }

    #[test]
    fn buckets_leave_the_window_minute_by_minute() {
        let mut l = Limiter::new(LimiterModel::Current, limit(420, 600, 300));
        request(&mut l, "m", 2.0, T0 + 5.0).unwrap();
        request(&mut l, "m", 3.0, T0 + 65.0).unwrap();
        let none = RequestCalls::default();
        assert!((l.stored("m", T0 + 100.0) - 5.0).abs() < 1e-6);
        assert_eq!(
            l.operating("m", &none, T0 + 100.0).unwrap().reset_at,
            Some((T0 + 605.0) as i64)
        );
        // The minute of T0 leaves the window at T0 + 600.
        assert!((l.stored("m", T0 + 600.0) - 3.0).abs() < 1e-6);
        assert_eq!(
            l.operating("m", &none, T0 + 610.0).unwrap().reset_at,
            Some((T0 + 665.0) as i64)
        );
        assert_eq!(l.stored("m", T0 + 660.0), 0.0);
        assert_eq!(l.operating("m", &none, T0 + 700.0).unwrap().reset_at, None);
    }

    #[test]
    fn the_legacy_model_charges_every_call_and_blocks_until_the_oldest_basket_leaves() {
        let mut l = Limiter::new(LimiterModel::Legacy, limit(5, 600, 300));
        request(&mut l, "m", 4.0, 0.0).unwrap();
        request(&mut l, "m", 2.0, 70.0).unwrap();
        assert_eq!(request(&mut l, "m", 0.01, 100.0), Err(600));
        assert!(request(&mut l, "m", 0.01, 600.0).is_ok());
        // batch is neither limited nor reported.
        assert!(request(&mut l, "batch", 100.0, 600.0).is_ok());
        assert!(
            l.operating("batch", &RequestCalls::default(), 601.0)
                .is_none()
        );
    }

    #[test]
    fn nothing_stored_reads_as_zero_not_minus_zero() {
        let mut l = Limiter::new(LimiterModel::Current, limit(420, 600, 300));
        let op = l.operating("m", &RequestCalls::default(), T0).unwrap();
        assert!(op.operating.is_sign_positive(), "{}", op.operating);
    }

    #[test]
    fn without_a_limit_time_is_still_accounted() {
        let mut l = Limiter::new(LimiterModel::Current, None);
        request(&mut l, "m", 1000.0, T0).unwrap();
        assert!(request(&mut l, "m", 1.0, T0 + 1.0).is_ok());
        assert_eq!(l.stored("m", T0 + 2.0), 1001.0);
    }
}
