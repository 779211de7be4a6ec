//! Finding orphaned reservations by set (pure): which `event.offline.list` queries cover every
//! `process_id` the portal may hold that the journal does not know as open, and what their
//! answers say.
//!
//! A reservation whose `get` answer was lost is known only to the portal. Comparing counts
//! (rows reserved upstream against events unsettled in the journal) cannot find it: the counts
//! drift apart for good reasons — a clear whose answer was lost, `event.offline.error` deleting
//! other copies of the same MESSAGE_ID (`markError` in the rest module's
//! `modules/rest/lib/eventoffline.php`), the portal's purge of reservations older than
//! `PROCESS_ID_LIFETIME` (`cleanProcessAgent`, about 34 days) — and an orphan then hides behind
//! the gap. So the sweep compares sets: the journal's open reservations split the ordered range
//! of `process_id`s into gaps, and one `event.offline.list` per gap (`>PROCESS_ID` and
//! `<PROCESS_ID`, the operations `IRestService::sanitizeFilter` allows; `!` is refused) tells by
//! its `total` whether the portal holds any row there. Gaps go 50 to a `batch` request; an empty
//! gap returns no rows, so a sweep with no orphan costs one request per 50 open reservations and
//! transfers no payloads.

use serde_json::{Value, json};

/// Rows in one page of `event.offline.list` (`IRestService::LIST_LIMIT`).
pub(crate) const PAGE: u64 = 50;

/// One range of `process_id`s strictly between two open reservations of the journal (`None`:
/// unbounded above).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Gap {
    pub(crate) after: String,
    pub(crate) before: Option<String>,
}

impl Gap {
    /// The `event.offline.list` filter of the gap: every reserved row in it (a row with no
    /// reservation has `PROCESS_ID` '' and is never greater than anything).
    pub(crate) fn filter(&self) -> Value {
        match &self.before {
            Some(before) => json!({">PROCESS_ID": self.after, "<PROCESS_ID": before}),
            None => json!({">PROCESS_ID": self.after}),
        }
    }

    /// The same gap without its part up to `seen` (inclusive): the rest of a gap whose first
    /// page was read, ordered by `PROCESS_ID`.
    pub(crate) fn after(&self, seen: &str) -> Gap {
        Gap {
            after: seen.to_string(),
            before: self.before.clone(),
        }
    }
}

/// The order in which the portal compares `process_id`s: its columns use a case-insensitive
/// collation, and the ids it makes (`Random::getString(32)`) are lower-case letters and digits.
pub(crate) fn collation_key(process_id: &str) -> String {
    process_id.to_ascii_lowercase()
}

/// The gaps around the journal's open reservations, in order: `("", p1)`, `(p1, p2)`, …,
/// `(pn, ∞)`. Duplicates (under the collation) and empty ids are ignored.
pub(crate) fn gaps(open: &[String]) -> Vec<Gap> {
    let mut ids: Vec<String> = open
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| collation_key(p))
        .collect();
    ids.sort();
    ids.dedup();
    let mut gaps = Vec::with_capacity(ids.len() + 1);
    let mut after = String::new();
    for id in ids {
        gaps.push(Gap {
            after: std::mem::replace(&mut after, id.clone()),
            before: Some(id),
        });
    }
    gaps.push(Gap {
        after,
        before: None,
    });
    gaps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_open_reservation_is_one_gap_over_every_reserved_row() {
        let g = gaps(&[]);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].filter(), json!({">PROCESS_ID": ""}));
    }

    #[test]
    fn open_reservations_split_the_range_in_collation_order() {
        let g = gaps(&ids(&["zz9", "A1b", "", "a1b", "k"]));
        let filters: Vec<Value> = g.iter().map(Gap::filter).collect();
        assert_eq!(
            filters,
            vec![
                json!({">PROCESS_ID": "", "<PROCESS_ID": "a1b"}),
                json!({">PROCESS_ID": "a1b", "<PROCESS_ID": "k"}),
                json!({">PROCESS_ID": "k", "<PROCESS_ID": "zz9"}),
                json!({">PROCESS_ID": "zz9"}),
            ]
        );
    }

    #[test]
    fn the_rest_of_a_gap_starts_after_what_was_seen() {
        let g = gaps(&ids(&["m"]));
        assert_eq!(
            g[0].after("c").filter(),
            json!({">PROCESS_ID": "c", "<PROCESS_ID": "m"})
        );
        assert_eq!(g[1].after("q").filter(), json!({">PROCESS_ID": "q"}));
    }
}
