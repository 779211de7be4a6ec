//! A random history (reservations re-read and redrawn, error-lane copies, offline IDs reused,
//! fetch-delete batches, outcomes, settles, dead retries, enrichment, a removed sink) played on a
//! SQLite journal and on a PostgreSQL one gives the same results and leaves the same rows. Row
//! ids are compared too; a batch's id is not (PostgreSQL spends an identity value on an insert
//! that finds the row).

use super::*;
use crate::config::Synchronous;
use crate::journal::test_support::test_journal_on_postgres;
use proptest::prelude::*;

const SINKS: [&str; 2] = ["a", "b"];
const PORTALS: [&str; 2] = ["main", "other"];
const TIMESTAMPS: [&str; 3] = [
    "2026-11-22T10:00:00+03:00",
    "2026-11-22T07:00:00Z",
    "2026-11-22T10:00:05+03:00",
];

/// One reservation: portal, process id, error lane, new reservation, deleted upstream, and
/// its events as (offline ID, timestamp, sinks as bits, waits for enrichment).
type Reservation = (usize, u8, bool, bool, bool, Vec<(i64, usize, u8, bool)>);

#[derive(Debug, Clone)]
enum Step {
    Record(Vec<Reservation>),
    /// Sink, 0 delivered / 1 retry (due again at once) / 2 dead, how many due ones.
    Attempt(usize, u8, usize),
    Settle,
    DeadRetry,
    /// Up to this many events of each portal get their entity.
    Enrich(usize),
    /// Sink `b` is removed from the configuration.
    DropSinkB,
}

fn reservation() -> impl Strategy<Value = Reservation> {
    (
        0usize..2,
        0u8..3,
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.1),
        proptest::collection::vec(
            (1i64..6, 0usize..3, 0u8..4, prop::bool::weighted(0.2)),
            0..5,
        ),
    )
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => proptest::collection::vec(reservation(), 1..3).prop_map(Step::Record),
        3 => (0usize..2, 0u8..3, 1usize..6).prop_map(|(s, k, n)| Step::Attempt(s, k, n)),
        2 => Just(Step::Settle),
        1 => Just(Step::DeadRetry),
        1 => (1usize..4).prop_map(Step::Enrich),
        1 => Just(Step::DropSinkB),
    ]
}

fn new_batch(r: &Reservation) -> NewBatch {
    let (portal, pid, error_lane, new_reservation, deleted_upstream, events) = r;
    NewBatch {
        portal: PORTALS[*portal].into(),
        process_id: format!("p{pid}"),
        lane: if *error_lane {
            Lane::Error
        } else {
            Lane::Normal
        },
        origin: BatchOrigin::Fetched,
        events: events
            .iter()
            .map(|(id, ts, bits, enrich)| NewEvent {
                offline_id: *id,
                event: "ONCRMDEALUPDATE".into(),
                message_id: format!("{id:032x}"),
                timestamp: TIMESTAMPS[*ts].into(),
                data: json!({"ID": id}),
                additional: Value::Null,
                sinks: SINKS
                    .iter()
                    .enumerate()
                    .filter(|(s, _)| bits & (1 << s) != 0)
                    .map(|(_, name)| name.to_string())
                    .collect(),
                enrich: *enrich,
            })
            .collect(),
        deleted_upstream: *deleted_upstream,
        new_reservation: *new_reservation,
    }
}

/// A process id without the batch id a redrawn one's old batch is renamed with.
fn process(pid: &str) -> String {
    pid.split('#').next().unwrap_or(pid).to_string()
}

/// What a journal holds, in terms both backends write alike.
fn rows(j: &Journal) -> (Vec<Value>, Vec<Value>, Vec<String>) {
    let events = j
        .sql_rows(
            "SELECT id, envelope_id, portal, offline_id, lane, status, upstream, change_key,
                    CASE WHEN settled_at IS NULL THEN 1 ELSE 0 END AS open,
                    CASE WHEN enrichment IS NULL THEN 1 ELSE 0 END AS enriched
             FROM events ORDER BY id",
        )
        .unwrap();
    let deliveries = j
        .sql_rows(
            "SELECT event_id, sink, status, attempts, last_error FROM deliveries
             ORDER BY event_id, sink",
        )
        .unwrap();
    let batches = j
        .sql_rows(
            "SELECT portal, process_id, lane, origin,
                    CASE WHEN settled_at IS NULL THEN 1 ELSE 0 END AS open
             FROM batches ORDER BY id",
        )
        .unwrap()
        .iter()
        .map(|b| {
            format!(
                "{} {} {} {} {}",
                text(b, "portal"),
                process(&text(b, "process_id")),
                text(b, "lane"),
                text(b, "origin"),
                int(b, "open")
            )
        })
        .collect();
    (events, deliveries, batches)
}

/// The pending settlements of every portal, with process ids as [`process`] gives them.
async fn settlements(j: &Journal) -> Vec<(String, String, SettleAction, Vec<(i64, i64, String)>)> {
    let mut all = Vec::new();
    for portal in PORTALS {
        for p in j.pending_settlements(portal).await.unwrap() {
            all.push((
                portal.to_string(),
                process(&p.process_id),
                p.action,
                p.events,
            ));
        }
    }
    all
}

async fn play(steps: &[Step], sqlite: &Journal, pg: &Journal) -> Result<(), TestCaseError> {
    for (n, step) in steps.iter().enumerate() {
        match step {
            Step::Record(reservations) => {
                let batches: Vec<NewBatch> = reservations.iter().map(new_batch).collect();
                let summary = |r: Vec<crate::journal::RecordedBatch>| {
                    r.into_iter()
                        .map(|r| {
                            (
                                r.inserted,
                                r.known_unsettled,
                                r.known_settled,
                                r.known_changes,
                                r.known_change_deliveries,
                                r.known_changes_done,
                            )
                        })
                        .collect::<Vec<_>>()
                };
                let a = sqlite.record_batches(batches.clone()).await.map(summary);
                let b = pg.record_batches(batches).await.map(summary);
                match (a, b) {
                    (Ok(a), Ok(b)) => prop_assert_eq!(a, b, "step {}", n),
                    (Err(_), Err(_)) => {}
                    (a, b) => prop_assert!(false, "step {n}: sqlite {a:?}, postgres {b:?}"),
                }
            }
            Step::Attempt(sink, kind, how_many) => {
                let sink = SINKS[*sink];
                let due_a = sqlite.due_deliveries(sink, *how_many).await.unwrap();
                let due_b = pg.due_deliveries(sink, *how_many).await.unwrap();
                let ids = |due: &[crate::journal::DueDelivery]| {
                    due.iter()
                        .map(|d| {
                            (
                                d.event_id,
                                d.attempts,
                                d.envelope.id.clone(),
                                d.envelope.entity.clone(),
                                d.envelope.entity_error.clone(),
                            )
                        })
                        .collect::<Vec<_>>()
                };
                prop_assert_eq!(ids(&due_a), ids(&due_b), "step {}", n);
                let outcomes: Vec<(i64, Outcome, Option<String>)> = due_a
                    .iter()
                    .map(|d| {
                        let outcome = match kind {
                            0 => Outcome::Delivered,
                            1 => Outcome::Retry {
                                error: "busy".into(),
                                next_attempt_at: Utc::now() - chrono::Duration::seconds(1),
                            },
                            _ => Outcome::Dead {
                                error: "refused".into(),
                            },
                        };
                        (d.event_id, outcome, None)
                    })
                    .collect();
                let a = sqlite
                    .record_outcomes(sink, outcomes.clone())
                    .await
                    .unwrap();
                let b = pg.record_outcomes(sink, outcomes).await.unwrap();
                prop_assert_eq!(a, b, "step {}", n);
            }
            Step::Settle => {
                let a = settlements(sqlite).await;
                prop_assert_eq!(&a, &settlements(pg).await, "step {}", n);
                let groups: Vec<(Vec<i64>, SettleAction)> = a
                    .iter()
                    .map(|(_, _, action, events)| (events.iter().map(|e| e.0).collect(), *action))
                    .collect();
                sqlite.mark_settled_groups(groups.clone()).await.unwrap();
                pg.mark_settled_groups(groups).await.unwrap();
            }
            Step::Enrich(limit) => {
                for portal in PORTALS {
                    let a = sqlite.pending_enrichment(portal, *limit).await.unwrap();
                    let b = pg.pending_enrichment(portal, *limit).await.unwrap();
                    let ids = |p: &[crate::journal::PendingEnrichment]| {
                        p.iter()
                            .map(|e| (e.event_id, e.event.clone(), e.data.clone()))
                            .collect::<Vec<_>>()
                    };
                    prop_assert_eq!(ids(&a), ids(&b), "step {}", n);
                    let found: Vec<crate::journal::Enriched> = a
                        .iter()
                        .map(|e| crate::journal::Enriched {
                            event_id: e.event_id,
                            entity: json!({"read": e.event_id}),
                            error: (e.event_id % 2 == 0).then(|| "gone".to_string()),
                        })
                        .collect();
                    sqlite.record_enrichment(found.clone()).await.unwrap();
                    pg.record_enrichment(found).await.unwrap();
                }
            }
            Step::DropSinkB => {
                let a = sqlite
                    .drop_deliveries_to_unknown_sinks(vec!["a".into()])
                    .await
                    .unwrap();
                let b = pg
                    .drop_deliveries_to_unknown_sinks(vec!["a".into()])
                    .await
                    .unwrap();
                prop_assert_eq!(a, b, "step {}", n);
            }
            Step::DeadRetry => {
                for j in [sqlite, pg] {
                    j.sql_execute("UPDATE deliveries SET status = 'pending', attempts = 0 WHERE status = 'dead'")
                        .unwrap();
                    j.sql_execute("UPDATE events SET status = 'pending' WHERE status = 'dead'")
                        .unwrap();
                }
            }
        }
        prop_assert_eq!(rows(sqlite), rows(pg), "rows after step {} ({:?})", n, step);
    }
    prop_assert_eq!(settlements(sqlite).await, settlements(pg).await);
    for portal in PORTALS {
        let open = |b: Vec<crate::journal::OpenBatch>| {
            b.into_iter()
                .map(|b| (process(&b.process_id), b.lane))
                .collect::<Vec<_>>()
        };
        prop_assert_eq!(
            open(sqlite.open_batches(portal).await.unwrap()),
            open(pg.open_batches(portal).await.unwrap())
        );
        let known = |k: std::collections::HashMap<String, bool>| {
            let mut k: Vec<(String, bool)> = k.into_iter().map(|(p, s)| (process(&p), s)).collect();
            k.sort();
            k
        };
        prop_assert_eq!(
            known(sqlite.known_process_ids(portal).await.unwrap()),
            known(pg.known_process_ids(portal).await.unwrap())
        );
        prop_assert_eq!(
            sqlite.unsettled_count(portal).await.unwrap(),
            pg.unsettled_count(portal).await.unwrap()
        );
        prop_assert_eq!(
            sqlite.undelivered_count(portal).await.unwrap(),
            pg.undelivered_count(portal).await.unwrap()
        );
    }
    let counts = |c: crate::journal::JournalCounts| serde_json::to_value(c).unwrap();
    prop_assert_eq!(
        counts(sqlite.counts().await.unwrap()),
        counts(pg.counts().await.unwrap())
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    #[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test)"]
    fn a_history_gives_the_same_results_on_sqlite_and_postgresql(
        steps in proptest::collection::vec(step(), 1..25)
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sqlite = Journal::open_blocking(&dir.path().join("j.db"), Synchronous::Normal).unwrap();
        let (_pg_guard, pg) = test_journal_on_postgres();
        runtime.block_on(play(&steps, &sqlite, &pg))?;
    }
}
