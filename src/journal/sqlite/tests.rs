//! Tests only the SQLite journal has: its file (mode 0600, the write-ahead log in its size)
//! and its migration from older schema versions. Everything else is tested on either backend
//! in `journal/tests/`.

use super::schema::{self, SCHEMA_VERSION};
use crate::config::Synchronous;
use crate::envelope::Lane;
use crate::journal::{BatchOrigin, Journal, NewBatch, NewEvent};
use rusqlite::Connection;
use serde_json::json;

fn open() -> (tempfile::TempDir, Journal) {
    let dir = tempfile::tempdir().unwrap();
    let j = Journal::open_blocking(&dir.path().join("j.db"), Synchronous::Full).unwrap();
    (dir, j)
}

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

#[tokio::test]
async fn journal_file_is_private_and_migrated() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, j) = open();
    let mode = std::fs::metadata(dir.path().join("j.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let v: i64 = j
        .with_conn(|c| Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
    // reopening is a no-op migration
    drop(j);
    Journal::open_blocking(&dir.path().join("j.db"), Synchronous::Full).unwrap();
}

#[tokio::test]
async fn ping_answers_and_size_counts_the_file_and_its_wal() {
    let (_d, j) = open();
    j.ping().await.unwrap();
    let empty = j.size_bytes().await.unwrap();
    assert!(empty > 0, "the migrated journal has pages");
    j.record_batch(batch("p1", Lane::Normal, vec![event(1, &["a"])]))
        .await
        .unwrap();
    let mut wal = j.path().as_os_str().to_owned();
    wal.push("-wal");
    let expected = std::fs::metadata(j.path()).unwrap().len()
        + std::fs::metadata(std::path::Path::new(&wal))
            .map(|m| m.len())
            .unwrap_or(0);
    assert_eq!(j.size_bytes().await.unwrap(), expected);
    assert!(
        j.size_bytes().await.unwrap() > empty,
        "the batch grew the WAL"
    );
}

/// A journal written by the previous version (schema 4, keys `main:N`) migrates: every row
/// gets its change, keeps its key, and an unchanged error-lane copy of it keeps that key.
#[tokio::test]
async fn rows_keyed_before_changes_were_keyed_keep_their_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j.db");
    {
        let mut conn = Connection::open(&path).unwrap();
        schema::migrate_to(&mut conn, 0, 4).unwrap();
        conn.execute_batch(
                "INSERT INTO batches (id, portal, process_id, lane, origin, fetched_at, settled_at)
                 VALUES (1, 'main', 'p1', 'normal', 'fetched', '2026-11-22T07:00:00.000Z',
                         '2026-11-22T07:00:01.000Z');
                 INSERT INTO events (id, envelope_id, portal, batch_id, offline_id, event, message_id,
                                     timestamp, data, additional, lane, fetched_at, status, upstream,
                                     settled_at)
                 VALUES (1, 'main:1', 'main', 1, 1, 'ONCRMDEALUPDATE', '00000000000000000000000000000001',
                         '2026-11-22T10:00:00+03:00', '{}', '{}', 'normal', '2026-11-22T07:00:00.000Z',
                         'dead', 'errored', '2026-11-22T07:00:01.000Z'),
                        (2, 'main:2', 'main', 1, 2, 'ONCRMDEALUPDATE', '00000000000000000000000000000002',
                         '2026-11-22T10:00:01+03:00', '{}', '{}', 'normal', '2026-11-22T07:00:00.000Z',
                         'delivered', 'cleared', '2026-11-22T07:00:01.000Z');
                 INSERT INTO deliveries (event_id, sink, status, attempts, next_attempt_at)
                 VALUES (1, 'a', 'delivered', 1, '2026-11-22T07:00:00.000Z'),
                        (1, 'b', 'dead', 1, '2026-11-22T07:00:00.000Z'),
                        (2, 'a', 'delivered', 1, '2026-11-22T07:00:00.000Z');",
            )
            .unwrap();
    }
    let j = Journal::open_blocking(&path, Synchronous::Full).unwrap();
    let migrated: Vec<(String, Option<String>)> = j
        .with_conn(|conn| {
            Ok(conn
                .prepare("SELECT envelope_id, change_key FROM events ORDER BY id")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?)
        })
        .unwrap();
    assert_eq!(
        migrated,
        [
            ("main:1".to_string(), Some("1795330800".to_string())),
            ("main:2".to_string(), Some("1795330801".to_string()))
        ]
    );
    // Event 1 comes back from the error lane unchanged: the old key, only to b.
    let r = j
        .record_batch(batch("e1", Lane::Error, vec![event(1, &["a", "b"])]))
        .await
        .unwrap();
    assert_eq!((r.known_changes, r.known_change_deliveries), (1, 1));
    let due = j.due_deliveries("b", 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].envelope.id, "main:1");
    assert_eq!(due[0].envelope.lane, Lane::Error);
    assert!(j.due_deliveries("a", 10).await.unwrap().is_empty());
    // A later change of it is a new change: the new key format, every sink.
    let mut merged = event(1, &["a", "b"]);
    merged.timestamp = "2026-11-22T10:09:00+03:00".into();
    j.record_batch(batch("e2", Lane::Error, vec![merged]))
        .await
        .unwrap();
    let due = j.due_deliveries("a", 10).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].envelope.id, "main:1:1795331340");
}

/// The statements run once per event keep their plan across bindings. Without the query
/// planner stability guarantee (`SQLITE_DBCONFIG_ENABLE_QPSG`, set at open), SQLite lets the
/// planner look at bound values (an `= ?` term's value near 0 or 1 changes its row estimate)
/// and expires such a statement when its bindings are cleared, which rusqlite's statement cache
/// does on every return: the settle lattice's select was re-parsed and re-planned for every
/// delivered event, 11% of the daemon's CPU in a drain.
#[tokio::test]
async fn per_event_statements_are_not_re_prepared_for_each_binding() {
    let (dir, j) = open();
    let events: Vec<NewEvent> = (1..=20).map(|id| event(id, &["file"])).collect();
    j.record_batches(vec![batch("p1", Lane::Normal, events)])
        .await
        .unwrap();
    let conn =
        super::open::open_read_write(&dir.path().join("j.db"), false, Synchronous::Full).unwrap();
    // As the journal runs it: from rusqlite's statement cache, which clears the bindings of a
    // statement it takes back (and SQLite expires a statement whose plan looked at a binding
    // when its bindings are cleared).
    let mut rows = 0;
    for id in 1..=20i64 {
        let mut select = conn
            .prepare_cached(super::deliveries::SETTLE_SELECT)
            .unwrap();
        rows += select
            .query_map([format!("[{id}]")], |r| r.get::<_, String>(4))
            .unwrap()
            .count();
        assert_eq!(
            select.get_status(rusqlite::StatementStatus::RePrepare),
            0,
            "the settle select was re-prepared for event {id}"
        );
    }
    assert_eq!(rows, 20, "one pending delivery per event");
}

/// A reservation is written by a few multi-row inserts (32, 16, 8, 4, 2, 1 rows): every row
/// lands, in the order the portal listed them, with its own values and deliveries; an offline
/// ID listed twice is written once.
#[tokio::test]
async fn a_reservation_of_63_events_lands_whole_and_in_order() {
    let (dir, j) = open();
    let sinks_of = |id: i64| -> &'static [&'static str] {
        match id % 3 {
            0 => &["a", "b"],
            1 => &["a"],
            _ => &[],
        }
    };
    let mut events: Vec<NewEvent> = (1..=63).map(|id| event(id, sinks_of(id))).collect();
    events.insert(10, event(5, &["a"]));
    let recorded = j
        .record_batches(vec![batch("p1", Lane::Normal, events)])
        .await
        .unwrap();
    assert_eq!((recorded[0].inserted, recorded[0].known_unsettled), (63, 1));
    let conn = Connection::open(dir.path().join("j.db")).unwrap();
    let rows: Vec<(i64, String, String, String)> = conn
        .prepare("SELECT offline_id, data, status, upstream FROM events ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 63);
    for (n, (offline_id, data, status, upstream)) in rows.iter().enumerate() {
        assert_eq!(*offline_id, n as i64 + 1, "rows in the portal's order");
        let data: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(data, json!({"FIELDS": {"ID": offline_id.to_string()}}));
        let routed = !sinks_of(*offline_id).is_empty();
        assert_eq!(
            (status.as_str(), upstream.as_str()),
            if routed {
                ("pending", "reserved")
            } else {
                ("delivered", "clear_pending")
            },
            "event {offline_id}"
        );
    }
    let deliveries: Vec<(i64, String)> = conn
        .prepare(
            "SELECT e.offline_id, d.sink FROM deliveries d JOIN events e ON e.id = d.event_id
             ORDER BY e.offline_id, d.sink",
        )
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let expected: Vec<(i64, String)> = (1..=63)
        .flat_map(|id| sinks_of(id).iter().map(move |s| (id, s.to_string())))
        .collect();
    assert_eq!(deliveries, expected);
}

/// Writes that queue while the connection is busy are committed together (group commit): each
/// still gets its own answer, and one that fails takes nothing of the others with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_writes_commit_together_and_fail_alone() {
    let (_dir, j) = open();
    // Hold the connection so that the writes below queue behind the first one.
    let holder = j.clone();
    let held = tokio::task::spawn_blocking(move || {
        holder.with_conn(|_| {
            std::thread::sleep(std::time::Duration::from_millis(300));
            Ok(())
        })
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let mut writers = Vec::new();
    for n in 0..40_i64 {
        let j = j.clone();
        let sinks: &[&str] = if n == 17 { &["s", "s"] } else { &["s"] };
        let events = (1..=5).map(|k| event(n * 10 + k, sinks)).collect();
        writers.push(tokio::spawn(async move {
            j.record_batches(vec![batch(&format!("p{n}"), Lane::Normal, events)])
                .await
        }));
    }
    held.await.unwrap().unwrap();
    for (n, writer) in writers.into_iter().enumerate() {
        let answer = writer.await.unwrap();
        if n == 17 {
            let err = answer.unwrap_err();
            assert!(
                err.to_string().contains("routed to sink s twice"),
                "{err:#}"
            );
        } else {
            assert_eq!(answer.unwrap()[0].inserted, 5, "writer {n}");
        }
    }
    let (events, batches, deliveries): (i64, i64, i64) = j
        .with_conn(|c| {
            Ok(c.query_row(
                "SELECT (SELECT COUNT(*) FROM events), (SELECT COUNT(*) FROM batches),
                        (SELECT COUNT(*) FROM deliveries)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?)
        })
        .unwrap();
    assert_eq!((events, batches, deliveries), (39 * 5, 39, 39 * 5));
    let failed: i64 = j
        .with_conn(|c| {
            Ok(c.query_row(
                "SELECT COUNT(*) FROM batches WHERE process_id = 'p17'",
                [],
                |r| r.get(0),
            )?)
        })
        .unwrap();
    assert_eq!(failed, 0, "the failed write left no batch row");
}
