//! Alerts on the real pipeline: a backlog above the limit fires one alert envelope to the
//! configured sink and, once the backlog is gone, one recovery message.

use crate::support::*;
use b24eventd_simulator::SimulatorConfig;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_alert_fires_once_and_recovers_once() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    // The ERP is down at first: events stay unsettled upstream.
    let down = Arc::new(AtomicBool::new(true));
    let gate = down.clone();
    let endpoint = Endpoint::start(Arc::new(move |_| {
        if gate.load(Ordering::SeqCst) {
            503
        } else {
            200
        }
    }))
    .await;
    let ops = dir.path().join("ops.jsonl");
    let sinks = format!(
        "{}\n[sinks.ops]\ntype = \"file\"\npath = \"{}\"\nevents = [\"B24EVENTD_ALERT\"]\n\
         [alerts]\nsink = \"ops\"\nunsettled_above = 5\nunsettled_for = \"1s\"\ncheck_interval = \"200ms\"\n",
        http_sink(&endpoint.url),
        ops.display()
    );
    let config = write_config(dir.path(), &sim, None, "", &sinks);
    let running = Running::start(&config, &tokens).await;
    emit_deals(&sim, 1, 20);

    let alerts = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&ops)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    wait_for("the backlog alert", Duration::from_secs(30), || {
        !alerts().is_empty()
    })
    .await;
    // Still down for a while: no second alert.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(alerts().len(), 1, "fired once: {:?}", alerts());

    down.store(false, Ordering::SeqCst);
    wait_for("the recovery message", Duration::from_secs(30), || {
        alerts().len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let journal = running.journal.clone();
    running.stop().await;

    let alerts = alerts();
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    let (fired, resolved) = (&alerts[0], &alerts[1]);
    assert_eq!(fired["event"], "B24EVENTD_ALERT");
    assert_eq!(fired["portal"], "main");
    assert_eq!(fired["data"]["alert"], "unsettled_backlog");
    assert_eq!(fired["data"]["state"], "firing");
    assert_eq!(fired["data"]["value"], 20);
    assert_eq!(fired["data"]["threshold"], 5);
    assert_eq!(resolved["data"]["alert"], "unsettled_backlog");
    assert_eq!(resolved["data"]["state"], "resolved");
    assert_ne!(fired["id"], resolved["id"]);
    // Bitrix24 events never reached the alerts-only sink, and all of them reached the ERP.
    assert!(alerts.iter().all(|a| a["event"] == "B24EVENTD_ALERT"));
    assert_eq!(endpoint.accepted_ids().len(), 20);
    assert_eq!(journal.counts().await.unwrap().unsettled_upstream, 0);
}
