//! One daemon, many portals: each portal has its own poller, bucket and reservations, so a
//! portal with a huge, slow backlog does not hold back the others, and every portal drains.

use crate::support::*;
use b24eventd::bitrix::Tokens;
use b24eventd::config;
use b24eventd::journal::Journal;
use b24eventd_simulator::{Faults, Simulator, SimulatorConfig};
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A `[portals.NAME]` table for `sim`.
fn portal_table(name: &str, sim: &Simulator) -> String {
    let defaults = SimulatorConfig::default();
    format!(
        r#"
[portals.{name}]
client_endpoint = "{endpoint}"
oauth_token_url = "{oauth}"
client_id = "{client_id}"
client_secret = "{secret}"
events = ["ONCRMDEALADD", "ONCRMDEALUPDATE"]
poll_interval = "200ms"
"#,
        endpoint = sim.client_endpoint(),
        oauth = sim.oauth_token_url(),
        client_id = defaults.client_id,
        secret = defaults.client_secret,
    )
}

async fn start(
    dir: &Path,
    portals: &[(String, Simulator, Tokens)],
) -> (
    Journal,
    CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let mut text = format!(
        "shutdown_timeout = \"10s\"\n[journal]\n{}[admin]\nlisten = \"\"\n",
        b24eventd::journal::test_support::test_journal_toml(dir)
    );
    for (name, sim, _) in portals {
        text.push_str(&portal_table(name, sim));
    }
    writeln!(text, "\n{}", file_sink(dir)).unwrap();
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    let config = config::load(&path).expect("config loads");
    let journal = Journal::open_configured(&config.journal, b24eventd::journal::Access::Create)
        .await
        .unwrap();
    for (name, _, tokens) in portals {
        journal.save_tokens(name, tokens).await.unwrap();
    }
    let shutdown = CancellationToken::new();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(b24eventd::daemon::run_with(
        config,
        journal.clone(),
        shutdown.clone(),
        b24eventd::daemon::Controls::default(),
        move |_| {
            let _ = started_tx.send(());
        },
    ));
    tokio::time::timeout(Duration::from_secs(60), started_rx)
        .await
        .expect("pipeline starts within 60 s")
        .expect("pipeline started");
    (journal, shutdown, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_heavy_portal_does_not_hold_back_forty_light_ones() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let mut portals = Vec::new();
    // The heavy portal answers every request 300 ms late and has 20,000 events queued.
    let (heavy, tokens) = portal(SimulatorConfig::default()).await;
    heavy.set_faults(Faults {
        slow: 1.0,
        slow_delay: Duration::from_millis(300),
        ..Faults::default()
    });
    emit_deals(&heavy, 1, 20_000);
    portals.push(("heavy".to_string(), heavy, tokens));
    for n in 0..40 {
        let (sim, tokens) = portal(SimulatorConfig::default()).await;
        portals.push((format!("light{n:02}"), sim, tokens));
    }
    let (journal, shutdown, task) = start(dir.path(), &portals).await;
    let started = Instant::now();

    // The light portals get their events while the heavy one drains.
    for (_, sim, _) in &portals[1..] {
        emit_deals(sim, 1, 25);
    }
    wait_for(
        "every light portal drained",
        Duration::from_secs(60),
        || {
            portals[1..]
                .iter()
                .all(|(_, sim, _)| upstream_empty(sim) && sim.stats().cleared == 25)
        },
    )
    .await;
    let lights_done = started.elapsed();
    let heavy_left = portals[0].1.stats().queued + portals[0].1.stats().reserved;
    assert!(
        heavy_left > 0,
        "the heavy portal should still be draining when the light ones are done ({lights_done:?})"
    );
    wait_for("the heavy portal drained", Duration::from_secs(180), || {
        upstream_empty(&portals[0].1)
    })
    .await;
    let heavy_done = started.elapsed();
    eprintln!(
        "40 light portals x 25 events drained in {:.1} s; heavy portal (20,000 events, 300 ms per request) in {:.1} s",
        lights_done.as_secs_f64(),
        heavy_done.as_secs_f64()
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();

    let file = file_ids(&dir.path().join("events.jsonl"));
    assert_eq!(file.len(), 20_000 + 40 * 25);
    assert!(file.values().all(|n| *n == 1), "no duplicates");
    for (name, _, _) in &portals[1..] {
        assert_eq!(
            (1..=25)
                .filter(|id| {
                    let offline = format!("{name}:{id}:");
                    file.keys().any(|key| key.starts_with(&offline))
                })
                .count(),
            25,
            "portal {name}"
        );
    }
    let counts = journal.counts().await.unwrap();
    assert_eq!(counts.unsettled_upstream, 0);
}
