//! A poller's failure counts per operation and the backoff they give: fetching, settling, the
//! orphan sweep (with the re-reads of recovery) and enrichment each keep their own count, so the
//! success of one never cuts short the backoff of another that keeps failing.

use std::time::Duration;
use tokio::time::Instant;

/// The wait after a first failure; it doubles with each failure in a row of the same operation.
pub(crate) const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait after transient failures (reached at the 8th failure in a row).
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What a poller does in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    /// `event.offline.get`, in either lane, alone or in a combined request.
    Fetch,
    /// `event.offline.clear` and `event.offline.error`.
    Settle,
    /// The orphan sweep and the re-reads of reservations (`event.offline.list`, `get` by
    /// `process_id`).
    Sweep,
    /// The entity getters.
    Enrich,
}

impl Operation {
    const COUNT: usize = 4;

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Operation::Fetch => "fetch",
            Operation::Settle => "settle",
            Operation::Sweep => "sweep",
            Operation::Enrich => "enrich",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The wait after `failures` failures in a row of one operation: 0.5 s, 1 s, 2 s, … 60 s.
pub(crate) fn wait(failures: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(7))
        .min(MAX_BACKOFF)
}

/// One poller's failure counts.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    failures: [u32; Operation::COUNT],
    /// The operation whose failure is ending the current round (the first one tracked).
    failed: Option<Operation>,
    /// Operations that wait out their own backoff without holding up the round.
    not_before: [Option<Instant>; Operation::COUNT],
}

impl Backoff {
    /// Notes how `op` went: a success clears its count (and no other); a failure names it as
    /// the cause of the round's failure, unless an operation inside it was named already.
    pub(crate) fn track<T, E>(&mut self, op: Operation, result: Result<T, E>) -> Result<T, E> {
        match &result {
            Ok(_) => self.succeeded(op),
            Err(_) => {
                self.failed.get_or_insert(op);
            }
        }
        result
    }

    /// `op` succeeded: its count starts over.
    pub(crate) fn succeeded(&mut self, op: Operation) {
        self.failures[op.index()] = 0;
        self.not_before[op.index()] = None;
    }

    /// The round failed: one more failure of the operation tracked as its cause (`Fetch` when
    /// none was: the journal, say, failed between calls). Returns that operation, its failures
    /// in a row and the wait before the next round.
    pub(crate) fn round_failed(&mut self) -> (Operation, u32, Duration) {
        let op = self.failed.take().unwrap_or(Operation::Fetch);
        let failures = &mut self.failures[op.index()];
        *failures = failures.saturating_add(1);
        (op, *failures, wait(*failures))
    }

    /// The round ended without an error (a failure tracked inside it was handled).
    pub(crate) fn round_succeeded(&mut self) {
        self.failed = None;
    }

    /// `op` failed without failing the round: it is not tried again before its own backoff
    /// has passed. Returns its failures in a row and that wait.
    pub(crate) fn failed_alone(&mut self, op: Operation) -> (u32, Duration) {
        if self.failed == Some(op) {
            self.failed = None;
        }
        let failures = &mut self.failures[op.index()];
        *failures = failures.saturating_add(1);
        let wait = wait(*failures);
        self.not_before[op.index()] = Some(Instant::now() + wait);
        (*failures, wait)
    }

    /// Whether `op` may run now (its own backoff after [`Backoff::failed_alone`] has passed).
    pub(crate) fn due(&self, op: Operation) -> bool {
        self.not_before[op.index()].is_none_or(|at| Instant::now() >= at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_up_to_the_cap() {
        let waits: Vec<u64> = (1..=10).map(|n| wait(n).as_millis() as u64).collect();
        assert_eq!(
            waits,
            [
                500, 1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000
            ]
        );
        assert_eq!(wait(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn the_success_of_one_operation_does_not_reset_another() {
        let mut backoff = Backoff::default();
        let mut waits = Vec::new();
        for _ in 0..4 {
            // Every round: the sweep works, then the fetch fails.
            let _ = backoff.track(Operation::Sweep, Ok::<(), ()>(()));
            let _ = backoff.track(Operation::Fetch, Err::<(), ()>(()));
            let (op, _, wait) = backoff.round_failed();
            assert_eq!(op, Operation::Fetch);
            waits.push(wait.as_millis());
        }
        assert_eq!(waits, [500, 1000, 2000, 4000]);
        let _ = backoff.track(Operation::Fetch, Ok::<(), ()>(()));
        let _ = backoff.track(Operation::Settle, Err::<(), ()>(()));
        assert_eq!(
            backoff.round_failed(),
            (Operation::Settle, 1, Duration::from_millis(500))
        );
        let _ = backoff.track(Operation::Fetch, Err::<(), ()>(()));
        assert_eq!(
            backoff.round_failed().1,
            1,
            "the fetch succeeded in between"
        );
    }

    #[test]
    fn the_innermost_operation_is_the_cause() {
        let mut backoff = Backoff::default();
        let inner = backoff.track(Operation::Settle, Err::<(), ()>(()));
        let _ = backoff.track(Operation::Fetch, inner);
        assert_eq!(backoff.round_failed().0, Operation::Settle);
        assert_eq!(
            backoff.round_failed().0,
            Operation::Fetch,
            "nothing tracked"
        );
    }

    #[test]
    fn an_operation_failing_alone_waits_its_own_backoff() {
        let mut backoff = Backoff::default();
        assert!(backoff.due(Operation::Sweep));
        let _ = backoff.track(Operation::Sweep, Err::<(), ()>(()));
        assert_eq!(
            backoff.failed_alone(Operation::Sweep),
            (1, Duration::from_millis(500))
        );
        assert!(!backoff.due(Operation::Sweep));
        assert!(backoff.due(Operation::Fetch));
        assert_eq!(
            backoff.round_failed().0,
            Operation::Fetch,
            "not the round's cause"
        );
        std::thread::sleep(Duration::from_millis(510));
        assert!(backoff.due(Operation::Sweep));
        assert_eq!(backoff.failed_alone(Operation::Sweep).0, 2);
        backoff.succeeded(Operation::Sweep);
        assert!(backoff.due(Operation::Sweep));
    }
}
