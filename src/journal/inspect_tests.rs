//! The operator commands' behaviour (`journal list|show|stats`, `replay`, `dead retry|purge`,
//! `prune`) through the journal's interface, so the same tests run on each backend: SQLite by
//! default, PostgreSQL with `B24TEST_POSTGRES` (see `test_support`).
use super::test_support::{TestJournalGuard, test_journal};
use super::{
    BatchOrigin, EventFilter, EventRow, Journal, NewBatch, NewEvent, Outcome, SettleAction,
    StatusFilter,
};
use crate::envelope::{Envelope, Lane};
use chrono::Utc;

/// A fetched batch of `main`'s events `ids` (even ids ADD, odd UPDATE), each routed to sink `a`.
pub(super) fn batch(pid: &str, ids: std::ops::RangeInclusive<i64>) -> NewBatch {
    NewBatch {
        portal: "main".into(),
        process_id: pid.into(),
        lane: Lane::Normal,
        origin: BatchOrigin::Fetched,
        events: ids
            .map(|id| NewEvent {
                offline_id: id,
                event: if id % 2 == 0 {
                    "ONCRMDEALADD"
                } else {
                    "ONCRMDEALUPDATE"
                }
                .into(),
                message_id: format!("{id:032x}"),
                timestamp: "2026-11-22T10:00:00+03:00".into(),
                data: serde_json::json!({"FIELDS": {"ID": id.to_string()}}),
                additional: serde_json::Value::Null,
                sinks: vec!["a".into()],
                enrich: false,
            })
            .collect(),
        deleted_upstream: false,
        new_reservation: true,
    }
}

/// Events 1..=4: 1 and 2 delivered and cleared, 3 dead and errored, 4 still pending.
async fn journal() -> (TestJournalGuard, Journal) {
    let (guard, j) = test_journal();
    j.record_batch(batch("p1", 1..=4)).await.unwrap();
    let due = j.due_deliveries("a", 10).await.unwrap();
    let outcome = |offline_id: i64| match offline_id {
        3 => Some(Outcome::Dead {
            error: "http 422".into(),
        }),
        4 => None,
        _ => Some(Outcome::Delivered),
    };
    let outcomes = due
        .iter()
        .filter_map(|d| outcome(d.envelope.offline_id).map(|o| (d.event_id, o, None)))
        .collect();
    j.record_outcomes("a", outcomes).await.unwrap();
    for p in j.pending_settlements("main").await.unwrap() {
        let ids = p.events.iter().map(|e| e.0).collect();
        j.mark_settled(ids, p.action).await.unwrap();
        assert!(matches!(
            p.action,
            SettleAction::Clear | SettleAction::Error
        ));
    }
    (guard, j)
}

fn ids(rows: &[EventRow]) -> Vec<String> {
    rows.iter().map(|r| r.id.clone()).collect()
}

/// The keys of offline IDs `ns` of [`batch`] (all of one `TIMESTAMP_X`).
fn keys(ns: &[i64]) -> Vec<String> {
    ns.iter()
        .map(|n| Envelope::make_id("main", *n, "2026-11-22T10:00:00+03:00"))
        .collect()
}

#[tokio::test]
async fn filters_narrow_by_event_status_and_sink() {
    let (_d, j) = journal().await;
    let all = j.list_events(&EventFilter::default()).unwrap();
    assert_eq!(ids(&all), keys(&[1, 2, 3, 4]));
    let f = |f: EventFilter| ids(&j.list_events(&f).unwrap());
    let adds = EventFilter {
        event: Some("oncrmdeal*add".into()),
        ..EventFilter::default()
    };
    assert_eq!(f(adds), keys(&[2, 4]));
    let dead = EventFilter {
        sink: Some("a".into()),
        status: Some(StatusFilter::Dead),
        ..EventFilter::default()
    };
    assert_eq!(f(dead), keys(&[3]));
    let newest = EventFilter {
        limit: Some(2),
        ..EventFilter::default()
    };
    assert_eq!(f(newest), keys(&[3, 4]), "the newest, oldest first");
    let future = EventFilter {
        since: Some(Utc::now() + chrono::Duration::hours(1)),
        ..EventFilter::default()
    };
    assert!(f(future).is_empty());
    let stats = j.stats(&EventFilter::default()).unwrap();
    assert_eq!(
        (
            stats[0].events,
            stats[0].pending,
            stats[0].delivered,
            stats[0].dead
        ),
        (4, 1, 2, 1)
    );
    assert_eq!(stats[0].upstream_unsettled, 1, "event 4 is still reserved");
}

#[tokio::test]
async fn a_pending_event_that_failed_is_shown_and_counted_as_retrying() {
    let (_d, j) = journal().await;
    let four = j.list_events(&EventFilter::default()).unwrap()[3].row;
    let show = |j: &Journal| j.show_event(&four.to_string()).unwrap().remove(0);
    // Before its first attempt the envelope says what it will carry.
    assert_eq!(show(&j).envelope.attempt, 1);
    for _ in 0..5 {
        let retry = Outcome::Retry {
            error: "http 503".into(),
            next_attempt_at: Utc::now(),
        };
        j.record_outcomes("a", vec![(four, retry, None)])
            .await
            .unwrap();
    }
    let retrying = EventFilter {
        status: Some(StatusFilter::Retrying),
        ..EventFilter::default()
    };
    let rows = j.list_events(&retrying).unwrap();
    assert_eq!(ids(&rows), keys(&[4]));
    assert_eq!(rows[0].status, "retrying", "labelled as the filter selects");
    assert_eq!(rows[0].deliveries[0].status, "retrying");
    let delivered = j.list_events(&EventFilter::default()).unwrap();
    assert_eq!(delivered[0].status, "delivered");
    let stats = j.stats(&EventFilter::default()).unwrap();
    assert_eq!((stats[0].pending, stats[0].retrying), (1, 1));
    assert_eq!(stats[0].sinks[0].retrying, 1);
    // The envelope's attempt agrees with the ATTEMPTS the delivery shows: 5 made.
    let detail = show(&j);
    assert_eq!(detail.deliveries[0].attempts, 5);
    assert_eq!(detail.envelope.attempt, 5);
    assert_eq!(detail.attempts.len(), 5);
}

#[tokio::test]
async fn prune_and_purge_never_touch_pending_or_unsettled_events() {
    let (_d, j) = journal().await;
    let later = Utc::now() + chrono::Duration::seconds(1);
    let pruned = j.prune_blocking(later, false).unwrap();
    assert_eq!(
        (pruned.events, pruned.batches),
        (2, 0),
        "1 and 2; not dead 3, not pending 4"
    );
    // 3 was errored upstream: Bitrix24 holds it in its error lane until a poll re-reads it.
    let purged = j.purge_dead(&EventFilter::default()).unwrap();
    assert_eq!((purged.events, purged.kept_in_error_lane), (0, 1));
    let pruned = j.prune_blocking(later, true).unwrap();
    assert_eq!((pruned.events, pruned.kept_in_error_lane), (0, 1));
    // The error-lane poll re-read it (a row of its offline ID journaled after it).
    let mut lane = batch("e1", 3..=3);
    lane.lane = Lane::Error;
    j.record_batch(lane).await.unwrap();
    let purged = j.purge_dead(&EventFilter::default()).unwrap();
    assert_eq!((purged.events, purged.kept_in_error_lane), (1, 0));
    let left = j.list_events(&EventFilter::default()).unwrap();
    assert_eq!(ids(&left), keys(&[4, 3]), "4, and the error-lane copy of 3");
    assert_eq!(left[1].lane, "error");
    assert_eq!(j.prune_blocking(later, true).unwrap().events, 0);
}

#[tokio::test]
async fn an_errored_event_delivered_by_a_dead_retry_is_kept_until_the_error_lane_poll() {
    let (_d, j) = journal().await;
    // 3 is dead and errored; a dead retry delivers it: `delivered`, upstream still errored.
    j.retry_dead(&EventFilter::default(), &["a".to_string()])
        .unwrap();
    let due = j.due_deliveries("a", 10).await.unwrap();
    let three: Vec<_> = due
        .iter()
        .filter(|d| d.envelope.offline_id == 3)
        .map(|d| (d.event_id, Outcome::Delivered, None))
        .collect();
    assert_eq!(three.len(), 1);
    j.record_outcomes("a", three).await.unwrap();
    let later = Utc::now() + chrono::Duration::seconds(1);
    let pruned = j.prune_blocking(later, false).unwrap();
    assert_eq!(
        (
            pruned.events,
            pruned.kept_in_error_lane,
            pruned.kept_unsettled
        ),
        (2, 1, 0),
        "1 and 2 go; 3 stays for the error lane; pending 4 is not a candidate"
    );
    let json = serde_json::to_value(&pruned).unwrap();
    assert_eq!(json["kept_in_error_lane"], 1);
    // A merged later change re-read from the error lane also shows the poll happened.
    let mut lane = batch("e1", 3..=3);
    lane.lane = Lane::Error;
    lane.events[0].timestamp = "2026-11-22T10:05:00+03:00".into();
    j.record_batch(lane).await.unwrap();
    let pruned = j.prune_blocking(later, false).unwrap();
    assert_eq!((pruned.events, pruned.kept_in_error_lane), (1, 0));
}

#[tokio::test]
async fn show_takes_a_row_a_key_or_a_portal_and_offline_id() {
    let (_d, j) = journal().await;
    let mut lane = batch("e1", 3..=3);
    lane.lane = Lane::Error;
    lane.events[0].timestamp = "2026-11-22T10:05:00+03:00".into();
    j.record_batch(lane).await.unwrap();
    let rows = |id: &str| -> Vec<(i64, String)> {
        j.show_event(id)
            .unwrap()
            .into_iter()
            .map(|d| (d.row, d.envelope.id))
            .collect()
    };
    // The rows as the journal numbered them (identities need not be dense on every backend).
    let listed = j.list_events(&EventFilter::default()).unwrap();
    let row_of = |key: &str| listed.iter().find(|r| r.id == key).unwrap().row;
    let first = keys(&[3])[0].clone();
    let merged = Envelope::make_id("main", 3, "2026-11-22T10:05:00+03:00");
    let (three, five) = (row_of(&first), row_of(&merged));
    assert!(three < five);
    assert_eq!(rows(&first), [(three, first.clone())]);
    assert_eq!(rows(&merged), [(five, merged.clone())]);
    assert_eq!(
        rows("main:3"),
        [(three, first), (five, merged)],
        "both changes"
    );
    let four = row_of(&keys(&[4])[0]);
    assert_eq!(rows(&four.to_string()), [(four, keys(&[4])[0].clone())]);
    assert!(rows(&(five + 1000).to_string()).is_empty());
    assert!(rows("main:99").is_empty());
    assert!(rows("other:3").is_empty());
    assert!(rows("main:3:0").is_empty());
}

#[tokio::test]
async fn replay_and_dead_retry_make_deliveries_pending_without_touching_upstream() {
    let (_d, j) = journal().await;
    let known = vec!["a".to_string()];
    let dead = j.retry_dead(&EventFilter::default(), &known).unwrap();
    assert_eq!((dead.events, dead.deliveries), (1, 1));
    let replayed = j
        .replay(
            &EventFilter {
                event: Some("ONCRMDEALADD".into()),
                ..EventFilter::default()
            },
            None,
            &known,
        )
        .unwrap();
    assert_eq!(
        (replayed.events, replayed.deliveries),
        (2, 2),
        "events 2 and 4"
    );
    let skipped = j
        .replay(&EventFilter::default(), Some("gone"), &known)
        .unwrap();
    assert_eq!((skipped.events, skipped.skipped_unknown_sinks), (0, 4));
    let rows = j.list_events(&EventFilter::default()).unwrap();
    let upstream: Vec<&str> = rows.iter().map(|r| r.upstream.as_str()).collect();
    assert_eq!(upstream, ["cleared", "cleared", "errored", "reserved"]);
    let status: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
    assert_eq!(status, ["delivered", "pending", "pending", "pending"]);
    // Delivered again: the settled events only get their status back.
    let due = j.due_deliveries("a", 10).await.unwrap();
    assert_eq!(due.len(), 3);
    assert!(due.iter().all(|d| d.envelope.attempt == 1));
    let outcomes = due
        .iter()
        .map(|d| (d.event_id, Outcome::Delivered, None))
        .collect();
    let portals = j.record_outcomes("a", outcomes).await.unwrap();
    assert_eq!(
        portals,
        vec!["main".to_string()],
        "only event 4 needs a clear"
    );
    let pending = j.pending_settlements("main").await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].events.len(), 1);
}

#[tokio::test]
async fn tail_reads_after_a_row_and_stats_narrow_to_a_sink() {
    let (_d, j) = journal().await;
    let all = j.list_events(&EventFilter::default()).unwrap();
    let first_two = EventFilter {
        limit: Some(2),
        ..EventFilter::default()
    };
    let after = j.events_after(&first_two, all[0].row).unwrap();
    assert_eq!(ids(&after), keys(&[2, 3]), "the first ones after the row");
    assert!(
        j.events_after(&EventFilter::default(), all[3].row)
            .unwrap()
            .is_empty()
    );
    let one_char = EventFilter {
        event: Some("ONCRMDEAL???".into()),
        ..EventFilter::default()
    };
    assert_eq!(ids(&j.list_events(&one_char).unwrap()), keys(&[2, 4]));
    let to_a = j
        .stats(&EventFilter {
            sink: Some("a".into()),
            ..EventFilter::default()
        })
        .unwrap();
    assert_eq!(to_a.len(), 1);
    let a = &to_a[0].sinks[0];
    assert_eq!(
        (a.sink.as_str(), a.pending, a.delivered, a.dead),
        ("a", 1, 2, 1)
    );
    assert!(a.oldest_pending_fetched_at.is_some());
    assert_eq!(
        a.oldest_pending_fetched_at,
        to_a[0].oldest_pending_fetched_at
    );
    let to_b = j
        .stats(&EventFilter {
            sink: Some("b".into()),
            ..EventFilter::default()
        })
        .unwrap();
    assert!(to_b.is_empty(), "no event went to b: {to_b:?}");
}
