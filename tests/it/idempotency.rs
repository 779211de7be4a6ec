//! Idempotency keys that tell two changes apart, through the real pipeline against the portal
//! simulator: a later change merged into an error-lane row reaches a deduplicating consumer, an
//! unchanged error-lane copy does not go again to a sink that has it, a re-seeded offline ID is a
//! new event, a reservation adopted after a lost answer keeps the key of its `TIMESTAMP_X`, and
//! `dead retry` / `dead purge` leave nothing for the error-lane poll to deliver twice.

use crate::support::error_lane::*;
use crate::support::*;
use b24eventd::journal::EventFilter;
use b24eventd_simulator::{Faults, SimulatorConfig};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Deals 1 and 2 reach a deduplicating consumer (`erp`) and go dead at `refuser` (400), so both
/// are errored into Bitrix24's error lane. With the daemon stopped, deal 2 changes again (more
/// than a second later): the change merges into its error-lane row (same ID, new TIMESTAMP_X).
/// The next error-lane poll delivers that change to the consumer under a new key, which it
/// takes; deal 1's unchanged error-lane copy does not go to the consumer again, and both copies
/// are cleared upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_lane_merge_reaches_a_deduplicating_consumer_under_a_new_key() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let consumer = DedupEndpoint::start().await;
    let Merge {
        deal1,
        deal2,
        merged,
        journal,
    } = error_lane_merge(
        dir.path(),
        &sim,
        &tokens,
        &http_sink_named("erp", &consumer.url),
        |_| consumer.accepted().len() == 2,
    )
    .await;
    let merged_key = key_of(&merged);
    assert_ne!(merged_key, key_of(&deal2));

    let keys = consumer.keys_received();
    let accepted = consumer.accepted();
    assert_eq!(
        accepted.len(),
        3,
        "the consumer took the later change: {keys:?}"
    );
    assert_eq!(
        keys.len(),
        3,
        "deal 1's unchanged copy never went to the consumer again: {keys:?}"
    );
    assert_eq!(
        keys[..2].iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([key_of(&deal1), key_of(&deal2)])
    );
    assert_eq!(keys[2], merged_key);
    assert_eq!(accepted[2]["id"], merged_key.as_str());
    assert_eq!(accepted[2]["lane"], "error");
    assert_eq!(accepted[2]["timestamp"], merged.timestamp_x.as_str());
    assert_eq!(accepted[2]["offline_id"], deal2.id);

    let rows = journal_events(&journal);
    assert_eq!(rows.len(), 4, "{rows:?}");
    let copy1 = rows
        .iter()
        .find(|r| r.1 == deal1.id && r.3 == "error")
        .expect("deal 1's error-lane copy");
    assert_eq!(copy1.2, key_of(&deal1), "the same change keeps its key");
    assert_eq!(
        journal_deliveries(&journal, copy1.0)
            .keys()
            .collect::<Vec<_>>(),
        ["refuser"],
        "only the sink that gave up on it"
    );
    assert_eq!(copy1.5, "cleared");
    let copy2 = rows
        .iter()
        .find(|r| r.1 == deal2.id && r.3 == "error")
        .expect("deal 2's error-lane row");
    assert_eq!(copy2.2, merged_key);
    assert_eq!(
        journal_deliveries(&journal, copy2.0)
            .keys()
            .collect::<Vec<_>>(),
        ["erp", "refuser"],
        "a later change goes to every sink"
    );
    assert_eq!(copy2.5, "cleared");
}

/// Event A (offline ID 1) is delivered and cleared; the table is empty, MySQL re-seeds its
/// auto-increment at a restart, and a second later event B gets ID 1 again. The deduplicating
/// consumer and the journal get B as a new event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_seeded_offline_id_is_delivered_not_dropped() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let consumer = DedupEndpoint::start().await;
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "",
        &http_sink_named("erp", &consumer.url),
    );
    let running = Running::start(&config, &tokens).await;
    sim.emit_change("ONCRMDEALUPDATE", 10);
    let a = sim.rows()[0].clone();
    assert_eq!(a.id, 1);
    drained(&sim, &running.journal, "event A delivered and cleared").await;
    assert_eq!(sim.reseed_ids(), 1, "an empty table starts again at 1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    sim.emit_change("ONCRMDEALADD", 20);
    let b = sim.rows()[0].clone();
    assert_eq!(b.id, 1, "B reuses A's ID");
    drained(&sim, &running.journal, "event B delivered and cleared").await;
    let journal = running.journal.clone();
    running.stop().await;

    let accepted = consumer.accepted();
    let taken: Vec<(&str, &str, i64)> = accepted
        .iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap(),
                v["data"]["FIELDS"]["ID"].as_str().unwrap(),
                v["offline_id"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        taken,
        [
            (key_of(&a).as_str(), "10", 1),
            (key_of(&b).as_str(), "20", 1)
        ],
        "B reached the consumer"
    );
    assert_eq!(consumer.keys_received().len(), 2);
    let rows = journal_events(&journal);
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0].1, rows[1].1), (1, 1));
    assert_ne!(rows[0].2, rows[1].2);
    assert!(rows.iter().all(|r| r.4 == "delivered" && r.5 == "cleared"));
}

/// The portal reserves five events and the answer is lost; the orphan sweep adopts the
/// reservation (re-reading it by `process_id`, which returns the same TIMESTAMP_X). The adopted
/// events carry `main:<ID>:<TIMESTAMP_X as Unix seconds>`, read from the portal's rows before
/// the daemon saw them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_reservation_carries_the_key_of_its_timestamp() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let consumer = DedupEndpoint::start().await;
    // The error lane only at start, so the lost answer is the normal lane's get.
    let config = write_config(
        dir.path(),
        &sim,
        None,
        LANE_AT_START_ONLY,
        &http_sink_named("erp", &consumer.url),
    );
    let running = Running::start(&config, &tokens).await;
    wait_for(
        "the start-up reads of both lanes",
        Duration::from_secs(10),
        || {
            let stats = sim.stats();
            stats.error_lane_gets >= 1
                && stats.calls_by_method.get("event.offline.get").copied() >= Some(2)
        },
    )
    .await;
    sim.set_faults(Faults {
        drop_next_gets: 1,
        ..Faults::default()
    });
    emit_deals(&sim, 1, 5);
    let expected: BTreeSet<String> = sim.rows().iter().map(key_of).collect();
    assert_eq!(expected.len(), 5);
    drained(&sim, &running.journal, "the adopted reservation settled").await;
    let journal = running.journal.clone();
    running.stop().await;

    assert_eq!(sim.stats().dropped_after_commit, 1);
    let adopted: BTreeSet<String> = sql_rows(
        &journal,
        "SELECT e.envelope_id FROM events e JOIN batches b ON b.id = e.batch_id
         WHERE b.origin = 'adopted'",
    )
    .iter()
    .map(|r| sql_text(r, "envelope_id").unwrap())
    .collect();
    assert_eq!(adopted, expected, "the adopted events carry these keys");
    assert_eq!(journal.counts_blocking().unwrap().events, 5);
    let received: BTreeSet<String> = consumer.keys_received().into_iter().collect();
    assert_eq!(received, expected);
    assert_eq!(consumer.keys_received().len(), 5, "each once");
}

/// Seven events reach the `archive` file sink and go dead at `erp` (400), so they are errored
/// into the error lane. After erp recovers, `dead retry --sink erp` (the library call the CLI
/// makes) delivers them to erp; the next error-lane poll finds every copy already delivered (or
/// pending) at every sink, clears it at once and delivers nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_retry_then_the_error_lane_poll_delivers_nothing_twice() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let down = Arc::new(AtomicBool::new(true));
    let flag = down.clone();
    let erp = Endpoint::start(Arc::new(move |_| {
        if flag.load(Ordering::SeqCst) {
            400
        } else {
            200
        }
    }))
    .await;
    let sinks = format!(
        "{}\n{}",
        file_sink(dir.path()),
        http_sink_named("erp", &erp.url)
    );
    let archive = dir.path().join("events.jsonl");
    let config = write_config(dir.path(), &sim, None, LANE_AT_START_ONLY, &sinks);
    let running = Running::start(&config, &tokens).await;
    emit_deals(&sim, 1, 7);
    wait_for(
        "seven events errored into the error lane",
        Duration::from_secs(30),
        || {
            all_in_error_lane(&sim, 7)
                && running
                    .journal
                    .counts_blocking()
                    .is_ok_and(|c| c.errored == 7)
        },
    )
    .await;
    assert_eq!(file_ids(&archive).len(), 7);
    down.store(false, Ordering::SeqCst);
    let config_value = b24eventd::config::load(&config).unwrap();
    let known: Vec<String> = config_value.sinks.keys().cloned().collect();
    let retried = running
        .journal
        .retry_dead(
            &EventFilter {
                sink: Some("erp".into()),
                ..EventFilter::default()
            },
            &known,
        )
        .unwrap();
    assert_eq!((retried.events, retried.deliveries), (7, 7));
    wait_for("erp has the seven", Duration::from_secs(30), || {
        erp.accepted_count() == 7
    })
    .await;
    running.stop().await;

    let config = write_config(dir.path(), &sim, None, LANE_EVERY_SECOND, &sinks);
    let running = Running::start(&config, &tokens).await;
    drained(&sim, &running.journal, "the error lane cleared").await;
    // Two more error-lane polls: nothing left to find, nothing delivered.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let journal = running.journal.clone();
    running.stop().await;

    let file = file_ids(&archive);
    assert_eq!(file.len(), 7);
    assert!(
        file.values().all(|n| *n == 1),
        "the archive got nothing twice: {file:?}"
    );
    assert_eq!(erp.accepted_count(), 7, "erp got each event once");
    assert_eq!(erp.accepted_ids().len(), 7);
    let rows = journal_events(&journal);
    let copies: Vec<&EventLine> = rows.iter().filter(|r| r.3 == "error").collect();
    assert_eq!(copies.len(), 7, "every error-lane copy was journaled");
    for copy in copies {
        let first = rows
            .iter()
            .find(|r| r.1 == copy.1 && r.3 == "normal")
            .unwrap();
        assert_eq!(copy.2, first.2, "the same change, the same key");
        assert!(journal_deliveries(&journal, copy.0).is_empty(), "{copy:?}");
        assert_eq!((copy.4.as_str(), copy.5.as_str()), ("delivered", "cleared"));
    }
    assert!(sim.stats().cleared >= 7, "the copies were cleared upstream");
}

/// `dead purge` right after seven dead events were errored upstream keeps them and says why (the
/// next error-lane poll needs them: without them the copies would go to the archive again); once
/// the poll has re-read them (erp still refusing: dead again, cleared upstream) they are purged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_purge_keeps_errored_events_until_the_error_lane_poll_re_read_them() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let erp = Endpoint::start(Arc::new(|_| 400)).await;
    let sinks = format!(
        "{}\n{}",
        file_sink(dir.path()),
        http_sink_named("erp", &erp.url)
    );
    let archive = dir.path().join("events.jsonl");
    let config = write_config(dir.path(), &sim, None, LANE_AT_START_ONLY, &sinks);
    let running = Running::start(&config, &tokens).await;
    emit_deals(&sim, 1, 7);
    wait_for(
        "seven events errored into the error lane",
        Duration::from_secs(30),
        || {
            all_in_error_lane(&sim, 7)
                && running
                    .journal
                    .counts_blocking()
                    .is_ok_and(|c| c.errored == 7)
        },
    )
    .await;
    running.stop().await;

    let purge = |json: bool| {
        let mut args = vec![
            "--config",
            config.to_str().unwrap(),
            "dead",
            "purge",
            "--all",
        ];
        if json {
            args.push("--json");
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_b24eventd"))
            .args(&args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let kept: serde_json::Value = serde_json::from_str(&purge(true)).unwrap();
    assert_eq!(kept["events"], 0);
    assert_eq!(kept["kept_in_error_lane"], 7);
    let text = purge(false);
    assert!(
        text.contains(
            "kept 7: Bitrix24 still holds them in its error lane; they can be purged after the next error-lane poll"
        ),
        "{text}"
    );
    assert_eq!(journal_events(&open_journal(dir.path()).await).len(), 7);

    let config = write_config(dir.path(), &sim, None, LANE_EVERY_SECOND, &sinks);
    let running = Running::start(&config, &tokens).await;
    drained(&sim, &running.journal, "the error lane cleared").await;
    let journal = running.journal.clone();
    running.stop().await;
    let rows = journal_events(&journal);
    assert_eq!(rows.len(), 14);
    for copy in rows.iter().filter(|r| r.3 == "error") {
        assert_eq!(
            journal_deliveries(&journal, copy.0)
                .keys()
                .collect::<Vec<_>>(),
            ["erp"],
            "the archive has it already"
        );
    }
    let file = file_ids(&archive);
    assert_eq!(file.len(), 7);
    assert!(file.values().all(|n| *n == 1), "{file:?}");

    let purged: serde_json::Value = serde_json::from_str(&purge(true)).unwrap();
    assert_eq!(
        (
            purged["events"].as_u64(),
            purged["kept_in_error_lane"].as_u64()
        ),
        (Some(14), Some(0)),
        "{purged}"
    );
    assert!(journal_events(&open_journal(dir.path()).await).is_empty());
}

/// The same error-lane flow on a portal that hands out one process id for every reservation:
/// the error-lane re-read comes back under the process id of the batch that errored the rows.
/// It is a new reservation, not that settled batch: the later change still reaches the
/// consumer and nothing stays reserved upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_id_handed_out_again_for_the_error_lane_is_a_new_reservation() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig {
        reused_process_id: Some("r".repeat(32)),
        ..SimulatorConfig::default()
    })
    .await;
    let consumer = DedupEndpoint::start().await;
    let Merge { merged, .. } = error_lane_merge(
        dir.path(),
        &sim,
        &tokens,
        &http_sink_named("erp", &consumer.url),
        |_| consumer.accepted().len() == 2,
    )
    .await;
    let keys = consumer.keys_received();
    assert_eq!(
        keys.len(),
        3,
        "the later change reached the consumer: {keys:?}"
    );
    assert_eq!(keys[2], key_of(&merged));
    assert_eq!(sim.stats().reserved, 0, "nothing left reserved upstream");
}
