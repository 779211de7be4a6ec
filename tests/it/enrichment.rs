//! Enrichment against the simulator: `[portals.main.enrich]` attaches the entity each event is
//! about (read with one `batch` per 50 entities), a deleted entity gives `entity = null` with
//! `entity_error`, and failing reads are retried without losing or holding back an event.

use crate::support::*;
use b24eventd_simulator::{Faults, SimulatorConfig};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

fn envelopes(path: &std::path::Path) -> BTreeMap<String, Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["id"].as_str().unwrap().to_string(), v))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entities_are_attached_and_a_deleted_one_is_reported() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    // 300 events about 150 deals: an ADD and an UPDATE each (different MESSAGE_IDs).
    for id in 1..=150 {
        sim.emit_change("ONCRMDEALADD", id);
        sim.emit_change("ONCRMDEALUPDATE", id);
    }
    // Deals 1..=5 are deleted after their changes were queued: their getter answers "Not found".
    for id in 1..=5 {
        sim.emit_change("ONCRMDEALDELETE", id);
    }
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "[portals.main.enrich]\n\"ONCRMDEAL*\" = \"crm.deal.get\"",
        &file_sink(dir.path()),
    );
    let running = Running::start(&config, &tokens).await;
    wait_for("300 events settled", Duration::from_secs(60), || {
        upstream_empty(&sim) && sim.stats().cleared == 300
    })
    .await;
    running.stop().await;

    let delivered = envelopes(&dir.path().join("events.jsonl"));
    assert_eq!(delivered.len(), 300);
    for envelope in delivered.values() {
        let id: u64 = envelope["data"]["FIELDS"]["ID"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        if id <= 5 {
            assert_eq!(envelope["entity"], Value::Null, "{envelope}");
            let error = envelope["entity_error"].as_str().unwrap();
            assert!(
                error.contains("crm.deal.get") && error.contains("not found"),
                "{error}"
            );
        } else {
            assert_eq!(envelope["entity"]["ID"], id.to_string(), "{envelope}");
            assert_eq!(envelope["entity"]["TITLE"], format!("Deal #{id}"));
            assert!(envelope.get("entity_error").is_none(), "{envelope}");
        }
    }
    let stats = sim.stats();
    let reads = stats.calls_by_method["crm.deal.get"];
    // Events about one entity share its read (a pair split across two rounds reads twice).
    assert!(
        (150..=165).contains(&reads),
        "{reads} reads for 150 distinct deals in 300 events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_reads_are_retried_and_no_event_is_lost() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    sim.set_faults(Faults {
        fail_500: 0.3,
        ..Faults::default()
    });
    emit_deals(&sim, 1, 400);
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "[portals.main.enrich]\n\"ONCRMDEAL*\" = \"crm.deal.get\"",
        &file_sink(dir.path()),
    );
    let running = Running::start(&config, &tokens).await;
    wait_for("400 events settled", Duration::from_secs(90), || {
        upstream_empty(&sim) && sim.stats().cleared == 400
    })
    .await;
    running.stop().await;

    assert!(sim.stats().faults_500 > 0, "the fault was exercised");
    let delivered = envelopes(&dir.path().join("events.jsonl"));
    assert_eq!(delivered.len(), 400);
    for envelope in delivered.values() {
        assert_eq!(
            envelope["entity"]["ID"], envelope["data"]["FIELDS"]["ID"],
            "every event carries its entity: {envelope}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_without_a_rule_are_not_held_back() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    emit_deals(&sim, 1, 40);
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "[portals.main.enrich]\n\"ONCRMLEAD*\" = \"crm.lead.get\"",
        &file_sink(dir.path()),
    );
    let running = Running::start(&config, &tokens).await;
    wait_for("40 events settled", Duration::from_secs(30), || {
        upstream_empty(&sim) && sim.stats().cleared == 40
    })
    .await;
    running.stop().await;
    let delivered = envelopes(&dir.path().join("events.jsonl"));
    assert_eq!(delivered.len(), 40);
    assert!(delivered.values().all(|e| e["entity"].is_null()));
    assert_eq!(
        sim.stats().calls_by_method.get("crm.lead.get").copied(),
        None
    );
}
