//! Wall-clock steps: notices when this machine's clock jumps (an NTP step, `date -s`, a VM
//! restored from a snapshot, a resume from suspend), says so in the log and the metrics, and
//! re-plans the cron schedules after a step back.
//!
//! Everything that waits inside the daemon waits on the monotonic clock, which no step moves.
//! The wall clock is kept only where a time must outlive the process or be shown: retry times
//! in the journal (the dispatcher brings forward any that lie beyond a sink's `max_backoff`,
//! see `Dispatcher::latest_retry`), token expiry (a token the portal refuses as expired is
//! refreshed and the call repeated), and the cron schedules. The portal's operating windows are
//! compared with the portal's own clock (`PortalClient::portal_now`), never with ours. A cron
//! job's next run is computed once, in wall time: after a step back by an hour it would wait an
//! hour longer, so the schedules are planned again from the new time.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

/// How often the two clocks are compared.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(1);
/// The smallest difference taken for a step. NTP slews small offsets (at most 0.5 ms/s) and
/// a busy runtime may wake a tick late, so only a jump of whole seconds counts.
pub(crate) const STEP_THRESHOLD: Duration = Duration::from_secs(2);

/// How far the wall clock moved past the monotonic clock between two readings (seconds,
/// negative when set back), when that is at least [`STEP_THRESHOLD`].
pub(crate) fn step(wall_before: f64, wall_now: f64, monotonic_elapsed: Duration) -> Option<f64> {
    let step = (wall_now - wall_before) - monotonic_elapsed.as_secs_f64();
    (step.abs() >= STEP_THRESHOLD.as_secs_f64()).then_some(step)
}

fn wall_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or_else(|e| -e.duration().as_secs_f64(), |d| d.as_secs_f64())
}

/// Compares the clocks every [`CHECK_EVERY`] until `stop`; calls `on_step` with each step found
/// (seconds, negative when the clock was set back).
pub(crate) async fn watch(stop: CancellationToken, mut on_step: impl FnMut(f64)) {
    let mut wall = wall_seconds();
    let mut mono = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = stop.cancelled() => return,
        }
        let (wall_now, mono_now) = (wall_seconds(), Instant::now());
        if let Some(seconds) = step(wall, wall_now, mono_now - mono) {
            if seconds < 0.0 {
                tracing::warn!(
                    step_seconds = seconds,
                    "system clock was set back: planning the cron schedules again; retries the journal holds for later than a sink's max_backoff are made due"
                );
            } else {
                tracing::warn!(
                    step_seconds = seconds,
                    "system clock jumped forward (or the machine was suspended): cron jobs due in between run once, access tokens may be refreshed early"
                );
            }
            on_step(seconds);
        }
        (wall, mono) = (wall_now, mono_now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_clocks_are_no_step() {
        assert_eq!(step(1000.0, 1001.0, Duration::from_secs(1)), None);
        // A tick that woke late moved both clocks alike.
        assert_eq!(step(1000.0, 1009.0, Duration::from_secs(9)), None);
        // NTP slewing: a few milliseconds apart.
        assert_eq!(step(1000.0, 1001.004, Duration::from_secs(1)), None);
    }

    #[test]
    fn a_jump_of_whole_seconds_either_way_is_a_step() {
        let back = step(1000.0, 1001.0 - 3600.0, Duration::from_secs(1)).unwrap();
        assert!((back + 3600.0).abs() < 1e-9, "{back}");
        let forward = step(1000.0, 1001.0 + 86_400.0, Duration::from_secs(1)).unwrap();
        assert!((forward - 86_400.0).abs() < 1e-9, "{forward}");
        assert!(step(1000.0, 1003.5, Duration::from_secs(1)).is_some());
        assert!(step(1000.0, 999.0, Duration::from_secs(1)).is_some());
        assert!(step(1000.0, 1000.5, Duration::from_secs(1)).is_none());
    }
}
