//! The retry schedule: what a sink's answer means for a delivery, given the sink's retry policy.
//! Pure; jitter is passed in so the schedule is testable.

use crate::config::RetryPolicy;
use crate::sinks::SinkResult;
use std::time::Duration;

/// What to record for one delivery attempt.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Step {
    Delivered,
    /// Try again after this long.
    RetryAfter {
        error: String,
        after: Duration,
    },
    /// Give up: the delivery is dead.
    Dead {
        error: String,
    },
}

/// The pause before attempt `attempts_made + 1`: `initial_backoff * 2^(attempts_made-1)`, capped
/// at `max_backoff`, then scaled by `jitter` in `[0.8, 1.2)` (pass `rand` in `[0, 1)`), and never
/// shorter than a sink's hint (e.g. `Retry-After`), which is itself capped at `max_backoff`.
pub(crate) fn backoff(
    policy: &RetryPolicy,
    attempts_made: u32,
    hint: Option<Duration>,
    rand: f64,
) -> Duration {
    let exponent = attempts_made.saturating_sub(1).min(30);
    let base = policy
        .initial_backoff
        .saturating_mul(1u32 << exponent)
        .min(policy.max_backoff);
    let jittered = base
        .mul_f64(0.8 + 0.4 * rand.clamp(0.0, 1.0))
        .min(policy.max_backoff);
    match hint {
        Some(h) => jittered.max(h.min(policy.max_backoff)),
        None => jittered,
    }
}

/// The latest time a retry is written for (2262, the end of `i64` nanoseconds): the journal
/// keeps RFC 3339 text, whose order is the time order only up to the year 9999.
const LATEST_RETRY: chrono::DateTime<chrono::Utc> =
    chrono::DateTime::from_timestamp_nanos(i64::MAX);

/// When a retry `after` this long from `now` is due: saturating (never past
/// [`LATEST_RETRY`]), whatever the policy or a sink's hint said.
pub(crate) fn retry_at(
    now: chrono::DateTime<chrono::Utc>,
    after: Duration,
) -> chrono::DateTime<chrono::Utc> {
    chrono::Duration::from_std(after)
        .ok()
        .and_then(|after| now.checked_add_signed(after))
        .map_or(LATEST_RETRY, |at| at.min(LATEST_RETRY))
}

/// Turns a sink's answer into the step to record, after `attempts_made` attempts (this one
/// included). A retryable failure on the last allowed attempt is dead.
pub(crate) fn next_step(
    policy: &RetryPolicy,
    attempts_made: u32,
    result: SinkResult,
    rand: f64,
) -> Step {
    match result {
        SinkResult::Delivered => Step::Delivered,
        SinkResult::Dead { error } => Step::Dead { error },
        SinkResult::Retry { error, after } => {
            if attempts_made >= policy.max_attempts {
                Step::Dead {
                    error: format!("gave up after {attempts_made} attempts: {error}"),
                }
            } else {
                Step::RetryAfter {
                    after: backoff(policy, attempts_made, after, rand),
                    error,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
        }
    }

    #[test]
    fn retry_times_saturate_instead_of_overflowing() {
        let now = chrono::Utc::now();
        assert_eq!(
            retry_at(now, Duration::from_secs(10)),
            now + chrono::Duration::seconds(10)
        );
        // 500000000 years, and the largest Duration there is: no panic, a time that still
        // sorts as a time in the journal.
        for after in [Duration::from_secs(500_000_000 * 31_557_600), Duration::MAX] {
            let at = retry_at(now, after);
            assert_eq!(at, LATEST_RETRY);
            assert!(crate::journal::timestamp(at).starts_with("2262-"));
        }
    }

    #[test]
    fn doubles_from_the_initial_backoff_and_caps() {
        let p = policy();
        let got: Vec<u64> = (1..=6)
            .map(|n| backoff(&p, n, None, 0.5).as_millis() as u64)
            .collect();
        assert_eq!(got, vec![1000, 2000, 4000, 8000, 10000, 10000]);
    }

    #[test]
    fn jitter_stays_within_twenty_percent_and_under_the_cap() {
        let p = policy();
        assert_eq!(backoff(&p, 1, None, 0.0), Duration::from_millis(800));
        assert_eq!(backoff(&p, 1, None, 0.999_999).as_millis(), 1199);
        assert_eq!(backoff(&p, 10, None, 0.999), Duration::from_secs(10));
    }

    #[test]
    fn a_retry_after_hint_lengthens_but_never_past_the_cap() {
        let p = policy();
        assert_eq!(
            backoff(&p, 1, Some(Duration::from_secs(7)), 0.5),
            Duration::from_secs(7)
        );
        assert_eq!(
            backoff(&p, 1, Some(Duration::from_secs(70)), 0.5),
            Duration::from_secs(10)
        );
        assert_eq!(
            backoff(&p, 3, Some(Duration::from_millis(10)), 0.5),
            Duration::from_secs(4)
        );
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let p = RetryPolicy {
            max_attempts: u32::MAX,
            ..policy()
        };
        assert_eq!(backoff(&p, u32::MAX, None, 0.5), Duration::from_secs(10));
    }

    #[test]
    fn retries_until_max_attempts_then_dead() {
        let p = policy();
        let retry = || SinkResult::Retry {
            error: "http 503".into(),
            after: None,
        };
        assert!(matches!(
            next_step(&p, 4, retry(), 0.5),
            Step::RetryAfter { .. }
        ));
        match next_step(&p, 5, retry(), 0.5) {
            Step::Dead { error } => assert_eq!(error, "gave up after 5 attempts: http 503"),
            other => panic!("expected dead, got {other:?}"),
        }
    }

    #[test]
    fn permanent_failures_are_dead_at_once_and_successes_delivered() {
        let p = policy();
        assert_eq!(
            next_step(
                &p,
                1,
                SinkResult::Dead {
                    error: "http 422".into()
                },
                0.5
            ),
            Step::Dead {
                error: "http 422".into()
            }
        );
        assert_eq!(
            next_step(&p, 1, SinkResult::Delivered, 0.5),
            Step::Delivered
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn policies() -> impl Strategy<Value = RetryPolicy> {
        (1u32..20, 1u64..5_000, 1u64..600_000).prop_map(|(max_attempts, initial, max)| {
            RetryPolicy {
                max_attempts,
                initial_backoff: Duration::from_millis(initial.min(max)),
                max_backoff: Duration::from_millis(max.max(initial)),
            }
        })
    }

    proptest! {
        #[test]
        fn retries_stay_within_the_policy_and_end_dead(
            policy in policies(),
            attempts in 1u32..40,
            hint_ms in proptest::option::of(0u64..10_000_000),
            rand in 0.0f64..1.0,
        ) {
            let hint = hint_ms.map(Duration::from_millis);
            let step = next_step(
                &policy,
                attempts,
                SinkResult::Retry { error: "busy".into(), after: hint },
                rand,
            );
            match step {
                Step::RetryAfter { after, .. } => {
                    prop_assert!(attempts < policy.max_attempts);
                    prop_assert!(after <= policy.max_backoff);
                    prop_assert!(after >= policy.initial_backoff.mul_f64(0.8).min(policy.max_backoff));
                    if let Some(h) = hint {
                        prop_assert!(after >= h.min(policy.max_backoff));
                    }
                }
                Step::Dead { .. } => prop_assert!(attempts >= policy.max_attempts),
                Step::Delivered => prop_assert!(false, "a retry never counts as delivered"),
            }
        }

        #[test]
        fn the_pause_never_shrinks_as_attempts_grow(
            policy in policies(),
            attempts in 1u32..39,
            rand in 0.0f64..1.0,
        ) {
            let now = backoff(&policy, attempts, None, rand);
            let next = backoff(&policy, attempts + 1, None, rand);
            prop_assert!(next >= now, "{now:?} then {next:?}");
        }

        #[test]
        fn delivered_and_dead_answers_are_final_whatever_the_count(
            policy in policies(),
            attempts in 1u32..40,
            rand in 0.0f64..1.0,
        ) {
            prop_assert_eq!(next_step(&policy, attempts, SinkResult::Delivered, rand), Step::Delivered);
            let dead = next_step(&policy, attempts, SinkResult::Dead { error: "422".into() }, rand);
            prop_assert_eq!(dead, Step::Dead { error: "422".into() });
        }
    }
}
