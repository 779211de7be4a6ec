//! Routing: which events a sink receives, by portal name and by event-name glob (`*`, `?`).

/// The `events` and `portals` filters of one `[sinks.NAME]`. An empty list means "all".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Route {
    /// Globs on the event name (`ONCRMDEAL*`, `*UPDATE`), matched ASCII case-insensitively.
    pub events: Vec<String>,
    /// Portal names, matched exactly.
    pub portals: Vec<String>,
}

impl Route {
    /// Whether an event named `event` from portal `portal` goes to this sink.
    pub fn matches(&self, portal: &str, event: &str) -> bool {
        let portal_ok = self.portals.is_empty() || self.portals.iter().any(|p| p == portal);
        portal_ok && (self.events.is_empty() || self.events.iter().any(|g| glob_match(g, event)))
    }
}

/// Matches `text` against `pattern`, where `*` stands for any run of characters (also none) and
/// `?` for exactly one; everything else matches itself, ASCII case-insensitively.
///
/// Greedy with a single backtrack point (the last `*`), so the cost is at most
/// `pattern.len() * text.len()` steps: no exponential blowup on patterns like `*a*a*a*b`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    // Position after the last `*` seen, and the text position that star currently covers up to.
    let mut star: Option<(usize, usize)> = None;

    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi + 1, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c.eq_ignore_ascii_case(&t[ti]) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                // Let the last star swallow one more character and retry from just after it.
                Some((after_star, covered)) => {
                    pi = after_star;
                    ti = covered + 1;
                    star = Some((after_star, covered + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_and_case_insensitive() {
        assert!(glob_match("ONCRMDEALADD", "ONCRMDEALADD"));
        assert!(glob_match("oncrmdealadd", "ONCRMDEALADD"));
        assert!(!glob_match("ONCRMDEALADD", "ONCRMDEALADDX"));
        assert!(!glob_match("ONCRMDEALADDX", "ONCRMDEALADD"));
        assert!(glob_match("", ""));
        assert!(!glob_match("", "A"));
    }

    #[test]
    fn star_prefix_and_suffix() {
        assert!(glob_match("ONCRMDEAL*", "ONCRMDEALUPDATE"));
        assert!(glob_match("ONCRMDEAL*", "ONCRMDEAL"));
        assert!(!glob_match("ONCRMDEAL*", "ONCRMLEADADD"));
        assert!(glob_match("*UPDATE", "ONCRMDEALUPDATE"));
        assert!(glob_match("*update", "ONTASKUPDATE"));
        assert!(!glob_match("*UPDATE", "ONCRMDEALADD"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "ANYTHING"));
        assert!(glob_match("ON*DEAL*ADD", "ONCRMDEALADD"));
        assert!(glob_match("**", "X"));
    }

    #[test]
    fn question_mark_is_exactly_one_char() {
        assert!(glob_match("ONCRMDEAL?PDATE", "ONCRMDEALUPDATE"));
        assert!(glob_match("???", "ABC"));
        assert!(!glob_match("???", "AB"));
        assert!(!glob_match("???", "ABCD"));
        assert!(glob_match("?*", "A"));
        assert!(!glob_match("?*", ""));
    }

    #[test]
    fn backtracking_stays_linear_enough() {
        let text = "a".repeat(10_000);
        let started = std::time::Instant::now();
        assert!(!glob_match("*a*a*a*b", &text));
        assert!(!glob_match("*a*a*a*a*a*a*a*a*b", &text));
        assert!(glob_match("*a*a*a*a", &text));
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn non_ascii_text_does_not_panic() {
        assert!(glob_match("*Ж?", "событиеЖЯ"));
        assert!(!glob_match("ONCRM*", "событие"));
    }

    #[test]
    fn route_empty_lists_match_everything() {
        let route = Route::default();
        assert!(route.matches("main", "ONCRMDEALADD"));
    }

    #[test]
    fn route_filters_portals_and_events() {
        let route = Route {
            events: vec!["ONCRMDEAL*".into(), "ONTASKUPDATE".into()],
            portals: vec!["main".into()],
        };
        assert!(route.matches("main", "ONCRMDEALUPDATE"));
        assert!(route.matches("main", "ontaskupdate"));
        assert!(!route.matches("main", "ONCRMLEADADD"));
        assert!(!route.matches("other", "ONCRMDEALUPDATE"));

        let any_portal = Route {
            events: vec!["*ADD".into()],
            portals: vec![],
        };
        assert!(any_portal.matches("other", "ONCRMLEADADD"));
    }
}
