//! How long ago something happened, for people: one unit, rounded down ("45 s", "12 min",
//! "3 h", "1 day", "7 days"), and "... ago". The one formatter every command uses for an age,
//! where `humantime`'s "7days 2h 3m 4s" (no space before the unit) is for durations a user
//! types back into a config.

use std::time::Duration;

/// `d` as one unit, rounded down: `45 s`, `12 min`, `3 h`, `1 day`, `7 days`.
pub fn span(d: Duration) -> String {
    let secs = d.as_secs();
    const MINUTE: u64 = 60;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;
    match secs {
        s if s < MINUTE => format!("{s} s"),
        s if s < HOUR => format!("{} min", s / MINUTE),
        s if s < DAY => format!("{} h", s / HOUR),
        s => {
            let days = s / DAY;
            format!("{days} day{}", if days == 1 { "" } else { "s" })
        }
    }
}

/// `d` before now: `7 days ago`, `3 h ago`, `just now` under a second.
pub fn ago(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return "just now".to_string();
    }
    format!("{} ago", span(d))
}

/// [`ago`] of `at` as seen at `now`; a time in the future (a clock step) counts as now.
pub fn ago_at(at: chrono::DateTime<chrono::Utc>, now: chrono::DateTime<chrono::Utc>) -> String {
    ago((now - at).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_unit_rounded_down_with_a_space_and_the_right_plural() {
        let s = Duration::from_secs;
        for (secs, text) in [
            (0, "just now"),
            (1, "1 s ago"),
            (59, "59 s ago"),
            (60, "1 min ago"),
            (3599, "59 min ago"),
            (3 * 3600 + 1800, "3 h ago"),
            (86_399, "23 h ago"),
            (86_400, "1 day ago"),
            (2 * 86_400 - 1, "1 day ago"),
            (7 * 86_400, "7 days ago"),
            (400 * 86_400, "400 days ago"),
        ] {
            assert_eq!(ago(s(secs)), text, "{secs} s");
        }
        assert_eq!(span(s(7 * 86_400)), "7 days");
        assert_eq!(span(Duration::from_millis(500)), "0 s");
        let now = chrono::Utc::now();
        assert_eq!(ago_at(now - chrono::Duration::hours(3), now), "3 h ago");
        assert_eq!(ago_at(now + chrono::Duration::hours(1), now), "just now");
    }
}
