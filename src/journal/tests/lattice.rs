//! The settle lattice as the journal applies it, under random routings and outcome orders: an
//! event is cleared iff every routed sink delivered it (or it is dead in the error lane), errored
//! iff a sink gave up on it in the normal lane, never both, and never while a delivery is open.

use super::*;
use proptest::prelude::*;

const SINKS: [&str; 3] = ["a", "b", "c"];

/// One attempt: (event index, sink index, 0 delivered / 1 retry / 2 dead).
type Step = (usize, usize, u8);

fn scenario() -> impl Strategy<Value = (Vec<u8>, bool, Vec<Step>)> {
    (
        // Per event, which sinks it routes to (a bit set, possibly none).
        proptest::collection::vec(0u8..8, 1..8),
        any::<bool>(),
        proptest::collection::vec((0usize..8, 0usize..3, 0u8..3), 0..40),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn cleared_iff_all_delivered_errored_iff_dead_never_both(
        (routes, error_lane, steps) in scenario()
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (_d, j) = test_journal();
        let lane = if error_lane { Lane::Error } else { Lane::Normal };
        let events: Vec<NewEvent> = routes
            .iter()
            .enumerate()
            .map(|(i, bits)| NewEvent {
                offline_id: i as i64 + 1,
                event: "ONCRMDEALUPDATE".into(),
                message_id: format!("{:032x}", i + 1),
                timestamp: "2026-11-22T10:00:00+03:00".into(),
                data: Value::Null,
                additional: Value::Null,
                sinks: SINKS
                    .iter()
                    .enumerate()
                    .filter(|(s, _)| bits & (1 << s) != 0)
                    .map(|(_, name)| name.to_string())
                    .collect(),
                enrich: false,
            })
            .collect();
        let batch = NewBatch {
            portal: "main".into(),
            process_id: "p1".into(),
            lane,
            origin: BatchOrigin::Fetched,
            events,
            deleted_upstream: false,
            new_reservation: true,
        };
        runtime.block_on(j.record_batch(batch)).unwrap();
        let row_of: BTreeMap<i64, i64> = j
            .sql_rows("SELECT offline_id, id FROM events")
            .unwrap()
            .iter()
            .map(|r| (int(r, "offline_id"), int(r, "id")))
            .collect();

        // The model: per (event, sink) the final state once delivered or dead.
        let mut model: BTreeMap<(usize, usize), Option<bool>> = BTreeMap::new();
        for (i, bits) in routes.iter().enumerate() {
            for s in 0..SINKS.len() {
                if bits & (1 << s) != 0 {
                    model.insert((i, s), None); // open
                }
            }
        }
        for (event, sink, kind) in steps {
            let event = event % routes.len();
            let Some(state) = model.get_mut(&(event, sink)) else { continue };
            if state.is_some() {
                continue; // final deliveries take no more attempts
            }
            let outcome = match kind {
                0 => { *state = Some(true); Outcome::Delivered }
                1 => Outcome::Retry { error: "busy".into(), next_attempt_at: Utc::now() },
                _ => { *state = Some(false); Outcome::Dead { error: "refused".into() } }
            };
            let row = row_of[&(event as i64 + 1)];
            runtime
                .block_on(j.record_outcomes(SINKS[sink], vec![(row, outcome, None)]))
                .unwrap();
        }

        let pending = runtime.block_on(j.pending_settlements("main")).unwrap();
        let mut actions: BTreeMap<i64, Vec<SettleAction>> = BTreeMap::new();
        for group in &pending {
            for (row, _, _) in &group.events {
                actions.entry(*row).or_default().push(group.action);
            }
        }
        for (i, _) in routes.iter().enumerate() {
            let row = row_of[&(i as i64 + 1)];
            let states: Vec<Option<bool>> = model
                .iter()
                .filter(|((e, _), _)| *e == i)
                .map(|(_, s)| *s)
                .collect();
            let got = actions.get(&row).cloned().unwrap_or_default();
            prop_assert!(got.len() <= 1, "event {i} in two settle groups: {got:?}");
            let expected = if states.iter().any(Option::is_none) {
                None
            } else if states.contains(&Some(false)) && lane == Lane::Normal {
                Some(SettleAction::Error)
            } else {
                Some(SettleAction::Clear)
            };
            prop_assert_eq!(got.first().copied(), expected, "event {} with deliveries {:?}", i, states);
        }
    }
}
