//! Crash safety of the real binary: SIGKILL at random moments while events flow and the portal
//! loses 5% of `get` responses after committing them; afterwards every event was delivered and
//! nothing is left reserved upstream.

mod common;

use b24eventd::journal::Journal;
use b24eventd::simulator::{Faults, SimulatorConfig};
use common::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn spawn_daemon(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_b24eventd"))
        .args(["--config", config.to_str().unwrap(), "run"])
        .env("B24EVENTD_LOG", "warn,b24eventd=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the daemon binary starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_and_leaves_nothing_reserved() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig {
        seed: 7,
        ..SimulatorConfig::default()
    })
    .await;
    sim.set_faults(Faults {
        drop_get_after_commit: 0.05,
        ..Faults::default()
    });
    // A second, slower sink keeps deliveries in flight when the kills land.
    let endpoint = Endpoint::start_with_delay(Arc::new(|_| 200), Duration::from_millis(15)).await;
    let sinks = format!("{}\n{}", file_sink(dir.path()), http_sink(&endpoint.url));
    let config = write_config(dir.path(), &sim, None, "batch_size = 20", &sinks);
    {
        let journal = Journal::open(
            &dir.path().join("journal.db"),
            b24eventd::config::Synchronous::Full,
        )
        .await
        .unwrap();
        journal.save_tokens("main", &tokens).await.unwrap();
    }
    let log = dir.path().join("daemon.log");

    const TOTAL: u64 = 1500;
    let emitter = {
        let sim = sim.clone();
        tokio::spawn(async move {
            for wave in 0..15 {
                emit_deals(&sim, 1 + wave * 100, 100);
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
        })
    };

    let mut rng = fastrand::Rng::with_seed(42);
    let mut kills = 0;
    let started = Instant::now();
    while kills < 12 {
        let mut child = spawn_daemon(&config, &log);
        tokio::time::sleep(Duration::from_millis(rng.u64(250..1500))).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "daemon died on its own; see {}",
            log.display()
        );
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    emitter.await.unwrap();

    // A last run drains whatever is left, then stops gracefully on SIGTERM. The SIGTERM waits
    // until this run is up (its signal handlers installed): the queue may already be drained.
    let running_lines = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("b24eventd running")
            .count()
    };
    let runs_before = running_lines();
    let mut child = spawn_daemon(&config, &log);
    wait_for("the last run is up", Duration::from_secs(30), || {
        running_lines() > runs_before
    })
    .await;
    wait_for(
        "the queue drained after the crashes",
        Duration::from_secs(120),
        || upstream_empty(&sim),
    )
    .await;
    let journal = Journal::open(
        &dir.path().join("journal.db"),
        b24eventd::config::Synchronous::Full,
    )
    .await
    .unwrap();
    wait_for(
        "the journal has nothing unsettled",
        Duration::from_secs(30),
        || journal.counts_blocking().unwrap().unsettled_upstream == 0,
    )
    .await;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert_eq!(
        exit.code(),
        Some(0),
        "SIGTERM exits 0; log: {}",
        std::fs::read_to_string(&log).unwrap()
    );

    let delivered = file_entities(&dir.path().join("events.jsonl"));
    let expected = expected_entities(1, TOTAL);
    let missing: Vec<_> = expected.difference(&delivered).collect();
    assert!(missing.is_empty(), "lost events (file sink): {missing:?}");
    let reached = endpoint.accepted_entities();
    let missing: Vec<_> = expected.difference(&reached).collect();
    assert!(missing.is_empty(), "lost events (http sink): {missing:?}");
    assert!(
        sim.rows().is_empty(),
        "nothing left reserved or queued upstream: {:?}",
        sim.rows().len()
    );
    let counts = journal.counts_blocking().unwrap();
    let lines: usize = file_ids(&dir.path().join("events.jsonl")).values().sum();
    let stats = sim.stats();
    eprintln!(
        "crash test: {kills} SIGKILLs in {:.1} s, {} lost get responses, {} reservations adopted, \
         {} events journaled, {} JSONL lines for {} distinct events ({} duplicates), \
         {} HTTP deliveries ({} duplicates)",
        started.elapsed().as_secs_f64(),
        stats.dropped_after_commit,
        counts.adopted_batches,
        counts.events,
        lines,
        delivered.len(),
        lines - delivered.len(),
        endpoint.accepted_count(),
        endpoint.accepted_count() - reached.len()
    );
    assert!(kills >= 10);
    assert!(stats.dropped_after_commit > 0, "the fault was exercised");
}
