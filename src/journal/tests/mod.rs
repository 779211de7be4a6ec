//! Tests of the journal through its interface, on either backend: SQLite by default, a
//! PostgreSQL schema of their own when `B24TEST_POSTGRES` is set (`test_support`). Where a test
//! must see or set a row the interface does not show, it goes through the backend-neutral
//! hooks `sql_rows` / `sql_execute`, in SQL both backends take. Reservations, outcomes,
//! settlement, tokens, conformance findings, and the settle lattice as the journal applies it.

use crate::bitrix::Tokens;
use crate::envelope::Lane;
use crate::journal::test_support::test_journal;
use crate::journal::{
    BatchOrigin, Journal, NewBatch, NewEvent, Outcome, SettleAction, StoredFinding,
};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::collections::BTreeMap;

mod lattice;
mod same_results;

fn event(id: i64, sinks: &[&str]) -> NewEvent {
    NewEvent {
        offline_id: id,
        event: "ONCRMDEALUPDATE".into(),
        message_id: format!("{id:032x}"),
        timestamp: "2026-11-22T10:00:00+03:00".into(),
        data: json!({"FIELDS": {"ID": id.to_string()}}),
        additional: json!({"user_id": 1}),
        sinks: sinks.iter().map(|s| s.to_string()).collect(),
        enrich: false,
    }
}

fn batch(pid: &str, lane: Lane, events: Vec<NewEvent>) -> NewBatch {
    NewBatch {
        portal: "main".into(),
        process_id: pid.into(),
        lane,
        origin: BatchOrigin::Fetched,
        events,
        deleted_upstream: false,
        new_reservation: true,
    }
}

/// The text of column `name` of a row of `sql_rows`.
fn text(row: &Value, name: &str) -> String {
    row[name]
        .as_str()
        .unwrap_or_else(|| panic!("{name} is not text in {row}"))
        .to_string()
}

/// The integer in column `name` of a row of `sql_rows`.
fn int(row: &Value, name: &str) -> i64 {
    row[name]
        .as_i64()
        .unwrap_or_else(|| panic!("{name} is not an integer in {row}"))
}

#[tokio::test]
async fn a_batch_is_delivered_then_cleared() {
    let (_d, j) = test_journal();
    let before = Utc::now() - chrono::Duration::seconds(1);
    let r = j
        .record_batch(batch(
            "p1",
            Lane::Normal,
            vec![event(1, &["a", "b"]), event(2, &["a"])],
        ))
        .await
        .unwrap();
    assert_eq!(r.inserted, 2);
    assert_eq!(j.unsettled_count("main").await.unwrap(), 2);
    let due = j.due_deliveries("a", 10).await.unwrap();
    assert_eq!(due.len(), 2);
    assert_eq!(due[0].envelope.id, "main:1:1795330800");
    assert_eq!(due[0].envelope.attempt, 1);
    let fetched_at = due[0].fetched_at.expect("fetched_at is read");
    assert!(
        fetched_at >= before && fetched_at <= Utc::now(),
        "{fetched_at}"
    );
    let ids: Vec<i64> = due.iter().map(|d| d.event_id).collect();
    let portals = j
        .record_outcomes(
            "a",
            ids.iter()
                .map(|id| (*id, Outcome::Delivered, None))
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(portals, vec!["main".to_string()]); // event 2 only needed sink a
    let pending = j.pending_settlements("main").await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].events.len(), 1);
    assert_eq!(pending[0].action, SettleAction::Clear);
    let b = j.due_deliveries("b", 10).await.unwrap();
    j.record_outcomes("b", vec![(b[0].event_id, Outcome::Delivered, None)])
        .await
        .unwrap();
    let pending = j.pending_settlements("main").await.unwrap();
    assert_eq!(pending[0].events.len(), 2);
    j.mark_settled(
        pending[0].events.iter().map(|e| e.0).collect(),
        SettleAction::Clear,
    )
    .await
    .unwrap();
    assert!(j.open_batches("main").await.unwrap().is_empty());
    assert_eq!(j.unsettled_count("main").await.unwrap(), 0);
    let c = j.counts().await.unwrap();
    assert_eq!(
        (c.events, c.delivered, c.cleared, c.duplicate_deliveries),
        (2, 2, 2, 0)
    );
}

#[tokio::test]
async fn a_dead_delivery_errors_a_normal_event_and_clears_an_error_lane_event() {
    let (_d, j) = test_journal();
    j.record_batch(batch("p1", Lane::Normal, vec![event(1, &["a"])]))
        .await
        .unwrap();
    j.record_batch(batch("p2", Lane::Error, vec![event(9, &["a"])]))
        .await
        .unwrap();
    let due = j.due_deliveries("a", 10).await.unwrap();
    let outcomes = due
        .iter()
        .map(|d| {
            (
                d.event_id,
                Outcome::Dead {
                    error: "http 422".into(),
                },
                None,
            )
        })
        .collect();
    j.record_outcomes("a", outcomes).await.unwrap();
    let pending = j.pending_settlements("main").await.unwrap();
    let actions: Vec<(String, SettleAction)> = pending
        .iter()
        .map(|p| (p.process_id.clone(), p.action))
        .collect();
    assert_eq!(
        actions,
        vec![
            ("p1".into(), SettleAction::Error),
            ("p2".into(), SettleAction::Clear)
        ]
    );
    assert_eq!(j.counts().await.unwrap().dead, 2);
}

#[tokio::test]
async fn retries_are_not_due_before_their_time() {
    let (_d, j) = test_journal();
    j.record_batch(batch("p1", Lane::Normal, vec![event(1, &["a"])]))
        .await
        .unwrap();
    let due = j.due_deliveries("a", 10).await.unwrap();
    let later = Utc::now() + chrono::Duration::seconds(60);
    j.record_outcomes(
        "a",
        vec![(
            due[0].event_id,
            Outcome::Retry {
                error: "503".into(),
                next_attempt_at: later,
            },
            None,
        )],
    )
    .await
    .unwrap();
    assert!(j.due_deliveries("a", 10).await.unwrap().is_empty());
    assert!(j.next_due("a").await.unwrap().unwrap() > Utc::now());
    assert!(j.pending_settlements("main").await.unwrap().is_empty());
}

#[tokio::test]
async fn retry_times_beyond_the_latest_possible_are_brought_forward() {
    let (_d, j) = test_journal();
    j.record_batch(batch(
        "p1",
        Lane::Normal,
        vec![event(1, &["a", "b"]), event(2, &["a"]), event(3, &["a"])],
    ))
    .await
    .unwrap();
    let due = j.due_deliveries("a", 10).await.unwrap();
    let now = Utc::now();
    // As written before the clock went back an hour: an hour and 5 s, an hour and 1 s ahead;
    // and one written after it, 1 s ahead.
    let retry = |id, secs| {
        (
            id,
            Outcome::Retry {
                error: "503".into(),
                next_attempt_at: now + chrono::Duration::seconds(secs),
            },
            None,
        )
    };
    j.record_outcomes(
        "a",
        vec![
            retry(due[0].event_id, 3605),
            retry(due[1].event_id, 3601),
            retry(due[2].event_id, 1),
        ],
    )
    .await
    .unwrap();
    let b = j.due_deliveries("b", 10).await.unwrap();
    j.record_outcomes("b", vec![retry(b[0].event_id, 3605)])
        .await
        .unwrap();
    let latest = now + chrono::Duration::seconds(3);
    assert_eq!(j.bring_forward("a", latest).await.unwrap(), 2);
    let due: Vec<i64> = j
        .due_deliveries("a", 10)
        .await
        .unwrap()
        .iter()
        .map(|d| d.event_id)
        .collect();
    assert_eq!(due.len(), 2, "the two far-off retries are due now");
    assert!(j.next_due("a").await.unwrap().unwrap() <= latest);
    // Another sink's retries are its own dispatcher's business.
    assert!(j.due_deliveries("b", 10).await.unwrap().is_empty());
    assert_eq!(j.bring_forward("a", latest).await.unwrap(), 0);
}

#[tokio::test]
async fn recording_a_known_reservation_again_inserts_only_new_events() {
    let (_d, j) = test_journal();
    j.record_batch(batch("p1", Lane::Normal, vec![event(1, &["a"])]))
        .await
        .unwrap();
    let r = j
        .record_batch(batch(
            "p1",
            Lane::Normal,
            vec![event(1, &["a"]), event(2, &["a"])],
        ))
        .await
        .unwrap();
    assert_eq!((r.inserted, r.known_unsettled), (1, 1));
    assert_eq!(j.counts().await.unwrap().events, 2);
}

/// The deliveries of the event row `row`: `(sink, status)` by sink.
fn deliveries_of(j: &Journal, row: i64) -> Vec<(String, String)> {
    j.sql_rows(&format!(
        "SELECT sink, status FROM deliveries WHERE event_id = {row} ORDER BY sink"
    ))
    .unwrap()
    .iter()
    .map(|r| (text(r, "sink"), text(r, "status")))
    .collect()
}

/// `(row, envelope_id, status, upstream)` of every event, by row.
fn event_rows(j: &Journal) -> Vec<(i64, String, String, String)> {
    j.sql_rows("SELECT id, envelope_id, status, upstream FROM events ORDER BY id")
        .unwrap()
        .iter()
        .map(|r| {
            (
                int(r, "id"),
                text(r, "envelope_id"),
                text(r, "status"),
                text(r, "upstream"),
            )
        })
        .collect()
}

/// Event 1 delivered to `a` and dead at `b`, so errored upstream.
async fn delivered_to_a_dead_at_b(j: &Journal) {
    j.record_batch(batch("p1", Lane::Normal, vec![event(1, &["a", "b"])]))
        .await
        .unwrap();
    let a = j.due_deliveries("a", 10).await.unwrap();
    j.record_outcomes("a", vec![(a[0].event_id, Outcome::Delivered, None)])
        .await
        .unwrap();
    let b = j.due_deliveries("b", 10).await.unwrap();
    let dead = Outcome::Dead {
        error: "http 400".into(),
    };
    j.record_outcomes("b", vec![(b[0].event_id, dead, None)])
        .await
        .unwrap();
    let pending = j.pending_settlements("main").await.unwrap();
    assert_eq!(pending[0].action, SettleAction::Error);
    j.mark_settled(vec![pending[0].events[0].0], SettleAction::Error)
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unchanged_error_lane_copy_keeps_its_key_and_skips_the_sinks_that_have_it() {
    let (_d, j) = test_journal();
    delivered_to_a_dead_at_b(&j).await;
    let r = j
        .record_batch(batch("e1", Lane::Error, vec![event(1, &["a", "b"])]))
        .await
        .unwrap();
    assert_eq!(
        (
            r.inserted,
            r.known_changes,
            r.known_change_deliveries,
            r.known_changes_done
        ),
        (1, 1, 1, 0)
    );
    let rows = event_rows(&j);
    assert_eq!(rows[1].1, rows[0].1, "the same change, the same key");
    assert_eq!(rows[1].1, "main:1:1795330800");
    assert_eq!(
        deliveries_of(&j, rows[1].0),
        [("b".to_string(), "pending".to_string())],
        "a has it; b gave up on it and gets it again"
    );
    assert!(j.due_deliveries("a", 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn an_error_lane_copy_every_sink_has_or_is_getting_again_is_cleared_at_once() {
    let (_d, j) = test_journal();
    delivered_to_a_dead_at_b(&j).await;
    // `dead retry --sink b`: b's delivery of the first row is pending again.
    j.sql_execute("UPDATE deliveries SET status = 'pending', attempts = 0 WHERE sink = 'b'")
        .unwrap();
    let r = j
        .record_batch(batch("e1", Lane::Error, vec![event(1, &["a", "b"])]))
        .await
        .unwrap();
    assert_eq!(
        (
            r.known_changes,
            r.known_change_deliveries,
            r.known_changes_done
        ),
        (1, 0, 1)
    );
    let rows = event_rows(&j);
    assert_eq!(
        (rows[1].2.as_str(), rows[1].3.as_str()),
        ("delivered", "clear_pending")
    );
    assert!(deliveries_of(&j, rows[1].0).is_empty());
    let pending = j.pending_settlements("main").await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].process_id.as_str(), pending[0].action),
        ("e1", SettleAction::Clear)
    );
    // Only b's retry of the first row is due, under the one key.
    let due = j.due_deliveries("b", 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].event_id, rows[0].0);
    assert!(j.due_deliveries("a", 10).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_later_change_merged_into_the_error_lane_row_is_new_to_every_sink() {
    let (_d, j) = test_journal();
    delivered_to_a_dead_at_b(&j).await;
    let mut merged = event(1, &["a", "b"]);
    merged.timestamp = "2026-11-22T10:00:02+03:00".into();
    let r = j
        .record_batch(batch("e1", Lane::Error, vec![merged]))
        .await
        .unwrap();
    assert_eq!((r.inserted, r.known_changes), (1, 0));
    let rows = event_rows(&j);
    assert_eq!(rows[1].1, "main:1:1795330802");
    assert_ne!(rows[1].1, rows[0].1);
    assert_eq!(
        deliveries_of(&j, rows[1].0),
        [
            ("a".to_string(), "pending".to_string()),
            ("b".to_string(), "pending".to_string())
        ]
    );
}

#[tokio::test]
async fn a_reused_offline_id_is_a_new_key_and_goes_to_every_sink() {
    let (_d, j) = test_journal();
    j.record_batch(batch("p1", Lane::Normal, vec![event(1, &["a"])]))
        .await
        .unwrap();
    let due = j.due_deliveries("a", 10).await.unwrap();
    j.record_outcomes("a", vec![(due[0].event_id, Outcome::Delivered, None)])
        .await
        .unwrap();
    // The table was emptied and MySQL re-seeded its counter: ID 1 again, another event.
    let mut reused = event(1, &["a"]);
    reused.timestamp = "2026-11-22T10:07:13+03:00".into();
    reused.data = json!({"FIELDS": {"ID": "77"}});
    j.record_batch(batch("p2", Lane::Normal, vec![reused]))
        .await
        .unwrap();
    let due = j.due_deliveries("a", 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].envelope.id, "main:1:1795331233");
    assert_eq!(due[0].envelope.data["FIELDS"]["ID"], "77");
}

#[tokio::test]
async fn an_event_without_sinks_is_cleared_at_once() {
    let (_d, j) = test_journal();
    j.record_batch(batch("p1", Lane::Normal, vec![event(1, &[])]))
        .await
        .unwrap();
    let pending = j.pending_settlements("main").await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].action, SettleAction::Clear);
}

#[tokio::test]
async fn tokens_round_trip() {
    let (_d, j) = test_journal();
    assert!(j.load_tokens("main").await.unwrap().is_none());
    let t = Tokens {
        access_token: "a1".into(),
        refresh_token: "r1".into(),
        expires_at: Some(Utc::now()),
        member_id: Some("m".into()),
        scope: None,
        client_endpoint: None,
        user_id: Some(1),
    };
    j.save_tokens("main", &t).await.unwrap();
    let got = j.load_tokens("main").await.unwrap().unwrap();
    assert_eq!(
        (got.access_token.as_str(), got.refresh_token.as_str()),
        ("a1", "r1")
    );
    assert_eq!(got.member_id.as_deref(), Some("m"));

    assert!(j.token_status("other").await.unwrap().is_none());
    let status = j.token_status("main").await.unwrap().unwrap();
    assert_eq!(
        status.expires_at.map(|t| t.timestamp_millis()),
        t.expires_at.map(|t| t.timestamp_millis())
    );
    assert!(status.updated_at.is_some_and(|at| at <= Utc::now()));
    assert_eq!(status.member_id.as_deref(), Some("m"));
    assert_eq!((status.scope, status.user_id), (None, Some(1)));
    assert!(status.has_refresh_token);
    j.save_tokens("main", &Tokens::from_pair("a2", ""))
        .await
        .unwrap();
    let status = j.token_status("main").await.unwrap().unwrap();
    assert!(!status.has_refresh_token);
    assert_eq!(status.expires_at, None);
    assert_eq!(status.member_id.as_deref(), Some("m"), "kept from before");
}

#[tokio::test]
async fn deliveries_to_a_removed_sink_are_dropped_and_the_event_settles() {
    let (_d, j) = test_journal();
    j.record_batch(batch(
        "p1",
        Lane::Normal,
        vec![event(1, &["a", "gone"]), event(2, &["a"])],
    ))
    .await
    .unwrap();
    let due = j.due_deliveries("a", 10).await.unwrap();
    j.record_outcomes(
        "a",
        due.iter()
            .map(|d| (d.event_id, Outcome::Delivered, None))
            .collect(),
    )
    .await
    .unwrap();
    // Event 1 still waits for "gone".
    assert_eq!(
        j.pending_settlements("main").await.unwrap()[0].events.len(),
        1
    );
    let dropped = j
        .drop_deliveries_to_unknown_sinks(vec!["a".into()])
        .await
        .unwrap();
    assert_eq!(dropped, vec![("gone".to_string(), 1)]);
    let pending = j.pending_settlements("main").await.unwrap();
    assert_eq!(pending[0].events.len(), 2, "both events are ready to clear");
    assert_eq!(pending[0].action, SettleAction::Clear);
    assert!(
        j.drop_deliveries_to_unknown_sinks(vec!["a".into()])
            .await
            .unwrap()
            .is_empty()
    );
}

fn finding(check: &str, status: &str, value: Option<i64>, run: &str) -> StoredFinding {
    StoredFinding {
        check: check.into(),
        status: status.into(),
        observed: format!("{check} {status}"),
        value,
        run_id: run.into(),
        checked_at: DateTime::parse_from_rfc3339("2026-11-23T10:00:00.250Z")
            .unwrap()
            .with_timezone(&Utc),
    }
}

#[tokio::test]
async fn a_conformance_run_replaces_the_previous_run_of_its_portal_only() {
    let (_d, j) = test_journal();
    assert!(j.conformance("main").await.unwrap().is_empty());
    j.replace_conformance(
        "main",
        vec![
            finding("get_limit_above_50", "fail", Some(50), "r1"),
            finding("reservation_hides", "ok", None, "r1"),
        ],
    )
    .await
    .unwrap();
    j.replace_conformance("other", vec![finding("cleanup", "ok", None, "r9")])
        .await
        .unwrap();
    let main = j.conformance("main").await.unwrap();
    assert_eq!(main.len(), 2);
    assert_eq!(
        main[0],
        finding("get_limit_above_50", "fail", Some(50), "r1")
    );
    j.replace_conformance(
        "main",
        vec![finding("reservation_hides", "skipped", None, "r2")],
    )
    .await
    .unwrap();
    let main = j.conformance("main").await.unwrap();
    assert_eq!(main, [finding("reservation_hides", "skipped", None, "r2")]);
    assert_eq!(j.conformance("other").await.unwrap().len(), 1);
    let bad = j
        .replace_conformance("main", vec![finding("x", "maybe", None, "r3")])
        .await;
    assert!(bad.is_err(), "the status is checked");
    assert_eq!(j.conformance("main").await.unwrap().len(), 1, "rolled back");
}

#[tokio::test]
async fn reservations_of_one_call_see_each_other_and_land_together_or_not_at_all() {
    let (_d, j) = test_journal();
    // The normal-lane row and an unchanged error-lane copy of it in one call: the copy keeps
    // the key and, both sinks having it pending, is cleared at once. An offline ID twice in
    // one reservation is journaled once.
    let recorded = j
        .record_batches(vec![
            batch("p1", Lane::Normal, vec![event(1, &["a", "b"])]),
            batch("e1", Lane::Error, vec![event(1, &["a", "b"])]),
            batch("p2", Lane::Normal, vec![event(2, &["a"]), event(2, &["a"])]),
        ])
        .await
        .unwrap();
    let summary: Vec<(usize, usize, usize, usize)> = recorded
        .iter()
        .map(|r| {
            (
                r.inserted,
                r.known_unsettled,
                r.known_changes,
                r.known_changes_done,
            )
        })
        .collect();
    assert_eq!(summary, [(1, 0, 0, 0), (1, 0, 1, 1), (1, 1, 0, 0)]);
    let rows = event_rows(&j);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].1, rows[1].1, "one key per change");
    assert_eq!(
        (rows[1].2.as_str(), rows[1].3.as_str()),
        ("delivered", "clear_pending")
    );
    assert!(deliveries_of(&j, rows[1].0).is_empty());
    assert!(
        rows[0].0 < rows[1].0 && rows[1].0 < rows[2].0,
        "rows in call order"
    );

    // A call that fails half-way (a sink routed twice) leaves nothing behind.
    let failed = j
        .record_batches(vec![
            batch("p3", Lane::Normal, vec![event(3, &["a"])]),
            batch("p4", Lane::Normal, vec![event(4, &["a", "a"])]),
        ])
        .await;
    assert!(failed.is_err());
    assert_eq!(event_rows(&j).len(), 3, "rolled back");
    let known = j.known_process_ids("main").await.unwrap();
    assert!(
        !known.contains_key("p3") && !known.contains_key("p4"),
        "{known:?}"
    );
}

#[tokio::test]
async fn fetch_delete_batches_settle_at_once_and_a_redrawn_process_id_is_a_new_reservation() {
    let (_d, j) = test_journal();
    let mut deleted = batch("fd1", Lane::Normal, vec![event(1, &["a"]), event(2, &[])]);
    deleted.deleted_upstream = true;
    let r = j.record_batch(deleted).await.unwrap();
    assert_eq!(r.inserted, 2);
    let rows = event_rows(&j);
    assert_eq!(
        rows.iter()
            .map(|r| (r.2.as_str(), r.3.as_str()))
            .collect::<Vec<_>>(),
        [("pending", "cleared"), ("delivered", "cleared")]
    );
    assert!(j.open_batches("main").await.unwrap().is_empty());
    assert_eq!(j.unsettled_count("main").await.unwrap(), 0);
    assert_eq!(j.undelivered_count("main").await.unwrap(), 1);
    assert!(j.pending_settlements("main").await.unwrap().is_empty());
    let settled = j
        .sql_rows("SELECT COUNT(*) AS n FROM events WHERE settled_at IS NULL")
        .unwrap();
    assert_eq!(int(&settled[0], "n"), 0);
    // Delivering it settles nothing upstream: it was never reserved.
    let due = j.due_deliveries("a", 10).await.unwrap();
    let portals = j
        .record_outcomes("a", vec![(due[0].event_id, Outcome::Delivered, None)])
        .await
        .unwrap();
    assert!(portals.is_empty());
    assert_eq!(j.undelivered_count("main").await.unwrap(), 0);

    // The portal draws a settled batch's process_id again for a new reservation.
    j.record_batch(batch("fd1", Lane::Normal, vec![event(5, &["a"])]))
        .await
        .unwrap();
    let known = j.known_process_ids("main").await.unwrap();
    assert_eq!(known.get("fd1"), Some(&false));
    let old = format!("fd1#{}", r.batch_id);
    assert_eq!(known.get(&old), Some(&true), "{known:?}");
    let open = j.open_batches("main").await.unwrap();
    assert_eq!(open.len(), 1);
    assert_eq!(
        (open[0].process_id.as_str(), open[0].lane),
        ("fd1", Lane::Normal)
    );
    assert_ne!(open[0].batch_id, r.batch_id);
    // Read again (not new): the rows are known.
    let mut again = batch("fd1", Lane::Normal, vec![event(5, &["a"])]);
    again.new_reservation = false;
    let r = j.record_batch(again).await.unwrap();
    assert_eq!((r.inserted, r.known_unsettled), (0, 1));
}

#[tokio::test]
async fn a_settled_event_read_again_under_its_reservation_is_reported_for_a_repeated_settle() {
    let (_d, j) = test_journal();
    let r = j
        .record_batch(batch(
            "p1",
            Lane::Normal,
            vec![event(1, &[]), event(2, &["a"])],
        ))
        .await
        .unwrap();
    let pending = j.pending_settlements("main").await.unwrap();
    j.mark_settled(vec![pending[0].events[0].0], SettleAction::Clear)
        .await
        .unwrap();
    assert_eq!(
        j.open_batches("main").await.unwrap().len(),
        1,
        "event 2 is open"
    );
    let mut again = batch("p1", Lane::Normal, vec![event(1, &[]), event(2, &["a"])]);
    again.new_reservation = false;
    let again = j.record_batch(again).await.unwrap();
    assert_eq!(again.batch_id, r.batch_id);
    assert_eq!(again.known_settled, [(1, format!("{:032x}", 1))]);
    assert_eq!(again.known_unsettled, 1);
}

#[tokio::test]
async fn enrichment_holds_the_deliveries_until_the_entity_is_stored() {
    let (_d, j) = test_journal();
    let mut wanted = event(1, &["a"]);
    wanted.enrich = true;
    let mut unrouted = event(2, &[]);
    unrouted.enrich = true;
    let mut gone = event(3, &["a"]);
    gone.enrich = true;
    j.record_batch(batch("p1", Lane::Normal, vec![wanted, unrouted, gone]))
        .await
        .unwrap();
    assert!(j.due_deliveries("a", 10).await.unwrap().is_empty());
    assert_eq!(j.next_due("a").await.unwrap(), None);
    let pending = j.pending_enrichment("main", 10).await.unwrap();
    assert_eq!(pending.len(), 2, "an event no sink wants is not enriched");
    assert_eq!(pending[0].event, "ONCRMDEALUPDATE");
    assert_eq!(pending[0].data["FIELDS"]["ID"], "1");
    assert_eq!(j.pending_enrichment("main", 1).await.unwrap().len(), 1);
    j.record_enrichment(vec![
        crate::journal::Enriched {
            event_id: pending[0].event_id,
            entity: json!({"ID": "1", "TITLE": "deal"}),
            error: None,
        },
        crate::journal::Enriched {
            event_id: pending[1].event_id,
            entity: Value::Null,
            error: Some("not found".into()),
        },
    ])
    .await
    .unwrap();
    assert!(j.pending_enrichment("main", 10).await.unwrap().is_empty());
    let due = j.due_deliveries("a", 10).await.unwrap();
    assert_eq!(due.len(), 2);
    assert_eq!(due[0].envelope.entity["TITLE"], "deal");
    assert_eq!(due[0].envelope.entity_error, None);
    assert_eq!(due[1].envelope.entity, Value::Null);
    assert_eq!(due[1].envelope.entity_error.as_deref(), Some("not found"));
}

#[tokio::test]
async fn the_reports_count_the_last_hour_the_backlogs_and_the_new_dead() {
    let (_d, j) = test_journal();
    let events: Vec<NewEvent> = (1..=6).map(|i| event(i, &["a"])).collect();
    j.record_batch(batch("p1", Lane::Normal, events))
        .await
        .unwrap();
    // The first two rows were journaled two hours ago: outside the hour.
    let old = (Utc::now() - chrono::Duration::hours(2))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    j.sql_execute(&format!(
        "UPDATE events SET fetched_at = '{old}' WHERE offline_id IN (1, 2)"
    ))
    .unwrap();
    let (max_row, none) = j.events_since_row(None).await.unwrap();
    assert!(none.is_empty());
    let first_row = max_row - 5;
    let (_, since) = j.events_since_row(Some(first_row)).await.unwrap();
    assert_eq!(since, BTreeMap::from([("main".to_string(), 5)]));
    let (attempt_row, n, _) = j.dead_attempts_since(None).await.unwrap();
    assert_eq!((attempt_row, n), (0, 0));

    let due = j.due_deliveries("a", 10).await.unwrap();
    let dead = Outcome::Dead {
        error: "http 400".into(),
    };
    let retry = Outcome::Retry {
        error: "503".into(),
        next_attempt_at: Utc::now() + chrono::Duration::seconds(60),
    };
    j.record_outcomes(
        "a",
        vec![
            (due[0].event_id, Outcome::Delivered, Some("200".into())),
            (due[1].event_id, dead, None),
            (due[2].event_id, retry, None),
        ],
    )
    .await
    .unwrap();
    let (_, n, ids) = j.dead_attempts_since(Some(attempt_row)).await.unwrap();
    assert_eq!((n, ids), (1, vec!["main:2:1795330800".to_string()]));
    let oldest = j.oldest_pending_fetched_at().await.unwrap().unwrap();
    assert!(
        oldest > Utc::now() - chrono::Duration::minutes(5),
        "{oldest}"
    );

    let now = Utc::now();
    let status = j
        .status_data(vec!["idle".into(), "main".into()], now)
        .await
        .unwrap();
    let portals: Vec<(&str, u64, u64, u64, u64)> = status
        .portals
        .iter()
        .map(|p| {
            (
                p.portal.as_str(),
                p.fetched_per_minute.iter().sum(),
                p.delivered_per_minute.iter().sum(),
                p.unsettled,
                p.pending,
            )
        })
        .collect();
    assert_eq!(portals, [("idle", 0, 0, 0, 0), ("main", 4, 1, 6, 4)]);
    let main = &status.portals[1];
    assert_eq!(
        main.fetched_per_minute[crate::journal::HISTORY_MINUTES - 1],
        4
    );
    let sinks: Vec<(&str, u64, u64, u64, u64)> = status
        .sinks
        .iter()
        .map(|s| (s.sink.as_str(), s.delivered, s.retried, s.dead, s.pending))
        .collect();
    assert_eq!(sinks, [("a", 1, 1, 1, 4)]);
    assert_eq!(status.last_dead.len(), 1);
    assert_eq!(status.last_dead[0].id, "main:2:1795330800");
    assert_eq!(status.last_dead[0].error.as_deref(), Some("http 400"));
    assert!(
        DateTime::parse_from_rfc3339(&status.last_dead[0].at).is_ok(),
        "{}",
        status.last_dead[0].at
    );

    let c = j.counts().await.unwrap();
    assert_eq!(
        (
            c.events,
            c.delivered,
            c.dead,
            c.pending,
            c.unsettled_upstream,
            c.batches,
            c.delivery_attempts,
            c.retried_attempts
        ),
        (6, 1, 1, 4, 6, 1, 3, 1)
    );
    assert_eq!(j.counts_blocking().unwrap().events, 6);
}

#[tokio::test]
async fn a_delivery_recorded_twice_counts_as_a_duplicate() {
    let (_d, j) = test_journal();
    j.record_batch(batch("p1", Lane::Normal, vec![event(1, &["a"])]))
        .await
        .unwrap();
    let due = j.due_deliveries("a", 10).await.unwrap();
    j.record_outcomes("a", vec![(due[0].event_id, Outcome::Delivered, None)])
        .await
        .unwrap();
    // A replay makes it pending again; delivered again, it is a duplicate.
    j.sql_execute("UPDATE deliveries SET status = 'pending'")
        .unwrap();
    let portals = j
        .record_outcomes(
            "a",
            vec![
                (due[0].event_id, Outcome::Delivered, None),
                (due[0].event_id, Outcome::Delivered, None),
            ],
        )
        .await
        .unwrap();
    assert!(portals.is_empty(), "settle work was already there");
    let c = j.counts().await.unwrap();
    assert_eq!((c.delivery_attempts, c.duplicate_deliveries), (2, 1));
}

/// Two dispatchers finishing the last deliveries of the same events at the same moment: every
/// event is settled once both have committed, whichever commits first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sinks_finishing_the_same_events_at_once_settle_them() {
    let (_d, j) = test_journal();
    for round in 0..5 {
        let pid = format!("p{round}");
        let events: Vec<NewEvent> = (1..=40)
            .map(|i| event(round * 100 + i, &["a", "b"]))
            .collect();
        j.record_batch(batch(&pid, Lane::Normal, events))
            .await
            .unwrap();
        let a = j.due_deliveries("a", 100).await.unwrap();
        let b = j.due_deliveries("b", 100).await.unwrap();
        let delivered =
            |due: &[crate::journal::DueDelivery]| -> Vec<(i64, Outcome, Option<String>)> {
                due.iter()
                    .map(|d| (d.event_id, Outcome::Delivered, None))
                    .collect()
            };
        let (ra, rb) = tokio::join!(
            j.record_outcomes("a", delivered(&a)),
            j.record_outcomes("b", delivered(&b))
        );
        let portals = [ra.unwrap(), rb.unwrap()].concat();
        assert!(portals.contains(&"main".to_string()));
        let settle: usize = j
            .pending_settlements("main")
            .await
            .unwrap()
            .iter()
            .filter(|p| p.process_id == pid)
            .map(|p| p.events.len())
            .sum();
        assert_eq!(settle, 40, "round {round}");
    }
}

#[tokio::test]
async fn errors_with_nul_characters_are_recorded() {
    let (_d, j) = test_journal();
    let mut enriched = event(1, &["a"]);
    enriched.enrich = true;
    j.record_batch(batch("p1", Lane::Normal, vec![enriched, event(2, &["a"])]))
        .await
        .unwrap();
    let pending = j.pending_enrichment("main", 10).await.unwrap();
    j.record_enrichment(vec![crate::journal::Enriched {
        event_id: pending[0].event_id,
        entity: Value::Null,
        error: Some("gone\0".into()),
    }])
    .await
    .unwrap();
    let due = j.due_deliveries("a", 10).await.unwrap();
    assert!(
        due[0]
            .envelope
            .entity_error
            .as_deref()
            .unwrap()
            .starts_with("gone")
    );
    let outcomes = vec![
        (
            due[0].event_id,
            Outcome::Dead {
                error: "body \0 with a nul".into(),
            },
            Some("out\0put".into()),
        ),
        (
            due[1].event_id,
            Outcome::Retry {
                error: "\0".into(),
                next_attempt_at: Utc::now(),
            },
            None,
        ),
    ];
    j.record_outcomes("a", outcomes).await.unwrap();
    let (_, n, _) = j.dead_attempts_since(Some(0)).await.unwrap();
    assert_eq!(n, 1);
    let errors = j
        .sql_rows("SELECT error FROM delivery_attempts ORDER BY id")
        .unwrap();
    assert!(text(&errors[0], "error").starts_with("body "), "{errors:?}");
}

/// A portal string with a NUL in it (PostgreSQL's `text` cannot hold one) is journaled all the
/// same: SQLite keeps it, PostgreSQL stores U+FFFD, and neither stops the portal's journaling.
#[tokio::test]
async fn an_event_with_a_nul_in_its_strings_is_journaled() {
    let (_d, j) = test_journal();
    let mut hostile = event(1, &["a"]);
    hostile.event = "ONCRM\0DEALUPDATE".into();
    hostile.message_id = "m\0".into();
    hostile.data = json!({"FIELDS": {"ID": "1\u{0}"}});
    let recorded = j
        .record_batch(batch("p1", Lane::Normal, vec![hostile]))
        .await
        .expect("journaled");
    assert_eq!(recorded.inserted, 1);
    let due = j.due_deliveries("a", 10).await.unwrap();
    assert_eq!(due.len(), 1);
    let name = &due[0].envelope.event;
    assert!(
        name == "ONCRM\0DEALUPDATE" || name == "ONCRM\u{fffd}DEALUPDATE",
        "{name:?}"
    );
    assert_eq!(
        due[0].envelope.data["FIELDS"]["ID"], "1\u{0}",
        "JSON keeps it escaped"
    );
}
