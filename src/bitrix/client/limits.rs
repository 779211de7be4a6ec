//! The portal's limits as the client keeps them: the client-side leaky bucket, the waits after
//! 503 `QUERY_LIMIT_EXCEEDED` and 429 `OPERATION_TIME_LIMIT`, and the glue that feeds each
//! answer's `time` stamps to [`crate::bitrix::operating`] and its figures to the stats.

use super::{PortalClient, lock};
use crate::bitrix::operating::{self, Answered, MethodTime, OperatingTimes};
use std::time::{Duration, Instant};

/// First backoff after a 503 `QUERY_LIMIT_EXCEEDED`; doubles per repeat up to the cap.
const LIMIT_BACKOFF_START: Duration = Duration::from_secs(1);
const LIMIT_BACKOFF_CAP: Duration = Duration::from_secs(60);
/// The longest wait for an operating window: the 10-minute window plus a minute of margin.
pub(crate) const MAX_OPERATING_WAIT: Duration = Duration::from_secs(11 * 60);

#[derive(Default)]
pub(super) struct OperatingState {
    /// What the portal said of each method's operating time, and what was spent since.
    pub(super) times: OperatingTimes,
    /// The portal's clock as of the last answer (its `time.finish`) and when that answer came,
    /// on the monotonic clock: reset times are the portal's Unix seconds, and comparing them
    /// with this machine's wall clock would stall fetching for as long as that clock was set
    /// back (or skewed).
    pub(super) portal_clock: Option<(f64, Instant)>,
}

impl PortalClient {
    /// What the portal last reported of `method`'s operating time (seconds used in the current
    /// 10-minute window, when its oldest minute drops out), what this client's calls may have
    /// added since, what one call may take, and a ban the portal imposed.
    pub(crate) fn operating(&self, method: &str) -> MethodTime {
        lock(&self.inner.operating).times.get(method)
    }

    /// The portal's Unix time now, in seconds: its clock as of the last answer plus the
    /// monotonic time since, so that neither a step of this machine's clock nor a skew between
    /// the two clocks moves the operating windows the portal reports. This machine's clock
    /// until the portal has answered.
    pub(crate) fn portal_now(&self) -> f64 {
        match lock(&self.inner.operating).portal_clock {
            Some((finish, at)) => finish + at.elapsed().as_secs_f64(),
            None => chrono::Utc::now().timestamp_millis() as f64 / 1000.0,
        }
    }

    pub(super) async fn acquire_slot(&self, method: &str) {
        let mut waited = Duration::ZERO;
        loop {
            let slot = lock(&self.inner.bucket).try_acquire(Instant::now());
            match slot {
                Ok(()) => break,
                Err(wait) => {
                    tokio::time::sleep(wait).await;
                    waited += wait;
                }
            }
        }
        if !waited.is_zero() {
            self.stat(|s| s.rate_wait_seconds += waited.as_secs_f64());
            tracing::debug!(
                portal = self.portal(),
                method,
                wait_seconds = waited.as_secs_f64(),
                "waited for the client-side rate limit"
            );
        }
    }

    pub(super) async fn wait_for_limit(&self, method: &str, code: &str, wait: Duration) {
        tracing::info!(
            portal = self.portal(),
            method,
            code,
            wait_seconds = wait.as_secs_f64(),
            "the portal's limit was hit; waiting before retrying"
        );
        self.stat(|s| s.rate_wait_seconds += wait.as_secs_f64());
        tokio::time::sleep(wait).await;
    }

    /// How long to wait after a 429 on `method`: the answer's own hint, else until the ban the
    /// portal imposed ends (a method that passes its limit is refused for
    /// [`operating::BAN`]), at most [`MAX_OPERATING_WAIT`].
    pub(crate) fn operating_wait(&self, method: &str, hint: Option<Duration>) -> Duration {
        if let Some(hint) = hint.filter(|h| !h.is_zero()) {
            return hint.min(MAX_OPERATING_WAIT);
        }
        let now = self.portal_now();
        let until = lock(&self.inner.operating)
            .times
            .get(method)
            .banned(now)
            .unwrap_or(now + operating::BAN.as_secs_f64());
        Duration::try_from_secs_f64(until - now + 0.5)
            .unwrap_or(MAX_OPERATING_WAIT)
            .min(MAX_OPERATING_WAIT)
    }

    /// The portal refused `method` with 429 `OPERATION_TIME_LIMIT`: it is banned (for the
    /// answer's hint, else [`operating::BAN`]) and its stored time is gone. The request economy
    /// exists to keep every method under its limit, so this is logged as the defect it is.
    pub(super) fn operating_refused(&self, method: &str, hint: Option<Duration>) {
        let now = self.portal_now();
        let ban = hint.filter(|h| !h.is_zero()).unwrap_or(operating::BAN);
        let before = {
            let mut op = lock(&self.inner.operating);
            let before = op.times.get(method);
            op.times.refused(method, now, ban);
            before
        };
        if before.banned(now).is_none() {
            tracing::error!(
                portal = self.portal(),
                method,
                ban_seconds = ban.as_secs_f64(),
                operating_reported = ?before.reported,
                operating_unreported = before.unreported,
                call_seconds = ?before.call,
                "the portal banned a method for passing its operating-time limit (429 OPERATION_TIME_LIMIT); the request economy plans to use 90% of rate_limit.operating_budget: if the portal's plan allows less, lower that setting; otherwise this is a defect, please report it with this log line"
            );
        }
    }

    /// Records a successful answer's `time` stamps (a single call, or a `batch` with its
    /// sub-commands in the order they ran) and publishes each method's figure to the stats.
    pub(super) fn record_answer(&self, answer: Answered<'_>, commands: &operating::Commands<'_>) {
        let reported: Vec<(String, Option<f64>)> = {
            let mut op = lock(&self.inner.operating);
            op.times.record(answer, commands);
            std::iter::once(answer.method)
                .chain(commands.iter().map(|(m, _)| *m))
                .map(|m| (m.to_string(), op.times.get(m).reported))
                .collect()
        };
        tracing::trace!(
            portal = self.portal(),
            method = answer.method,
            ?reported,
            "operating time"
        );
        self.stat(|s| {
            for (method, seconds) in reported {
                if let Some(seconds) = seconds {
                    s.methods.entry(method).or_default().operating_seconds = Some(seconds);
                }
            }
        });
    }
}

/// Exponential backoff with jitter (±25 %) for repeated 503s: ~1 s, 2 s, 4 s, … up to 60 s.
pub(super) fn limit_backoff(attempt: u32) -> Duration {
    let base = LIMIT_BACKOFF_START
        .saturating_mul(1u32 << attempt.min(10))
        .min(LIMIT_BACKOFF_CAP);
    base.mul_f64(0.75 + fastrand::f64() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::bitrix::ErrorClass;
    use serde_json::{Value, json};

    #[tokio::test]
    async fn retries_after_503_then_succeeds() {
        let (base, srv) = serve(|_, n| {
            if n == 0 {
                api_error(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
            } else {
                ok(json!(true))
            }
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let started = Instant::now();
        let resp = client
            .call("event.offline.clear", json!({"process_id": "p"}))
            .await
            .unwrap();
        assert_eq!(resp.result, json!(true));
        assert!(
            started.elapsed() >= Duration::from_millis(700),
            "{:?}",
            started.elapsed()
        );
        let stats = client.stats();
        assert_eq!(
            (stats.requests, stats.ok, stats.rate_limited_503),
            (2, 1, 1)
        );
        assert!(stats.rate_wait_seconds >= 0.7);
    }

    #[tokio::test]
    async fn gives_up_on_limits_after_max_limit_wait() {
        let (base, srv) =
            serve(|_, _| api_error(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")).await;
        let mut s = settings(&base);
        s.max_limit_wait = Duration::ZERO;
        let (client, _) = client_with(s, Some(tokens("a1", "r1", 3600)), &srv);
        let err = client
            .call("event.offline.get", json!({}))
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Retryable);
        assert_eq!(err.code, "QUERY_LIMIT_EXCEEDED");
        assert!(!err.maybe_executed);
        assert!(err.retry_after.is_some());
        assert_eq!(err.status, Some(503));
        assert_eq!(
            err.to_string(),
            "portal main: event.offline.get failed: QUERY_LIMIT_EXCEEDED (too many requests)"
        );
        assert_eq!(client.stats().requests, 1);
    }

    /// A first answer with `time`, then a 429: how long the client waited before repeating.
    /// A first call answered with `first_time`, then a 429 carrying `ban_time` (the current
    /// server sends none), then success: how long the second call took.
    async fn wait_after_429(first_time: Value, ban_time: Value) -> (PortalClient, Duration) {
        let (base, srv) = serve(move |_, n| match n {
            0 => json_reply(200, json!({"result": true, "time": first_time.clone()})),
            1 => json_reply(
                429,
                json!({
                    "error": "OPERATION_TIME_LIMIT",
                    "error_description": "Method is blocked due to operation time limit.",
                    "time": ban_time.clone(),
                }),
            ),
            _ => ok(json!(true)),
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        client.call("crm.deal.get", json!({"id": 1})).await.unwrap();
        let started = Instant::now();
        client.call("crm.deal.get", json!({"id": 2})).await.unwrap();
        (client, started.elapsed())
    }

    #[tokio::test]
    async fn a_429_that_says_when_the_ban_ends_is_waited_out() {
        let now = chrono::Utc::now().timestamp();
        let (client, waited) = wait_after_429(
            json!({"operating": 3.5, "operating_reset_at": now + 500}),
            json!({"operating_reset_at": now + 2}),
        )
        .await;
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert_eq!(client.stats().operating_429, 1);
        // Answered again: the ban is over, and the portal forgot the method's time.
        assert_eq!(client.operating("crm.deal.get").banned_until, None);
    }

    #[tokio::test]
    async fn operating_windows_are_read_on_the_portals_clock_not_this_machines() {
        // The portal's clock is an hour behind ours (or ours was set ahead an hour): its ban
        // ends 2 s after its own `finish`. By our clock the end is an hour past: waiting the
        // whole ban would be wrong, and so would waiting an hour had the clocks differed the
        // other way.
        let portal_finish = chrono::Utc::now().timestamp() as f64 - 3600.0;
        let (client, waited) = wait_after_429(
            json!({"finish": portal_finish, "operating": 3.5}),
            json!({"operating_reset_at": portal_finish as i64 + 2}),
        )
        .await;
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        let portal_now = client.portal_now();
        assert!(
            (portal_now - portal_finish).abs() < 10.0,
            "{portal_now} against {portal_finish}"
        );
    }

    #[tokio::test]
    async fn a_429_bans_the_method_for_five_minutes_and_is_returned_past_max_wait() {
        let (base, srv) =
            serve(|_, _| api_error(429, "OPERATION_TIME_LIMIT", "Method is blocked")).await;
        let mut s = settings(&base);
        s.max_limit_wait = Duration::from_secs(5);
        let (client, _) = client_with(s, Some(tokens("a1", "r1", 3600)), &srv);
        let err = client.call("crm.deal.get", json!({})).await.unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Retryable, "OPERATION_TIME_LIMIT")
        );
        // LoadLimiter::BAN_DURATION: the current server bans the method for 300 s.
        let wait = err.retry_after.unwrap();
        assert!(
            wait > Duration::from_secs(299) && wait <= Duration::from_secs(301),
            "{wait:?}"
        );
        let now = client.portal_now();
        let banned = client.operating("crm.deal.get").banned(now).unwrap();
        assert!((banned - now - 300.0).abs() < 2.0);
        assert_eq!(client.stats().requests, 1);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let first = limit_backoff(0);
        assert!(first >= Duration::from_millis(750) && first <= Duration::from_millis(1250));
        let fourth = limit_backoff(3);
        assert!(fourth >= Duration::from_secs(6) && fourth <= Duration::from_secs(10));
        assert!(limit_backoff(30) <= Duration::from_secs(75));
    }
}
