//! What the broker and database sink tests share: `validate --online` on the real binary and a
//! sink's finding in its JSON report, a sink built from a config as the daemon builds it, a
//! test envelope, the redeliveries the journal recorded as duplicates, and the SIGKILL loop that
//! runs until one kill landed between the server's ack and the journal's commit.

use super::{cli, daemon, emit_deals, write_config};
use b24eventd::envelope::{Envelope, Lane};
use b24eventd::journal::Journal;
use b24eventd_simulator::Simulator;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

/// `b24eventd -c CONFIG validate --online [extra]` on a config for `sim` with `sinks`.
pub async fn validate_online(dir: &Path, sim: &Simulator, sinks: &str, extra: &[&str]) -> Output {
    let config = write_config(dir, sim, None, "", sinks);
    let mut args = vec!["-c", config.to_str().unwrap(), "validate", "--online"];
    args.extend_from_slice(extra);
    cli::b24eventd(&args, None).await
}

/// The first finding of sink `name` (of type `kind`) in a `validate --online --json` report.
pub fn sink_check(out: &Output, name: &str, kind: &str) -> serde_json::Value {
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is one JSON document ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let sink = report["sinks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sink"] == name)
        .unwrap_or_else(|| panic!("the {kind} sink in {report:#}"))
        .clone();
    assert_eq!(sink["type"], kind);
    sink["checks"][0].clone()
}

/// Sink `name` of a config for `sim` with `sinks`, built as the daemon builds it.
pub fn build_sink(
    dir: &Path,
    sim: &Simulator,
    sinks: &str,
    name: &str,
) -> Arc<dyn b24eventd::sinks::Sink> {
    let config = write_config(dir, sim, None, "", sinks);
    let config = b24eventd::config::load(&config).expect("config loads");
    b24eventd::sinks::build(&config.sinks[name]).expect("sink builds")
}

/// An envelope of deal `n` for `event` on portal `main`, offline ID `n`.
pub fn envelope(n: i64, event: &str) -> Envelope {
    Envelope {
        id: Envelope::make_id("main", n, "2026-11-22T10:00:00+03:00"),
        portal: "main".into(),
        event: event.into(),
        offline_id: n,
        message_id: format!("{n:032x}"),
        timestamp: "2026-11-22T10:00:00+03:00".into(),
        data: serde_json::json!({"FIELDS": {"ID": n.to_string()}}),
        additional: serde_json::Value::Null,
        lane: Lane::Normal,
        attempt: 1,
        entity: serde_json::Value::Null,
        entity_error: None,
    }
}

/// A sink on a closed port (its URL carrying `password`) fails clearly and never shows the
/// password: `validate --online` exits 1 saying `cannot connect`, and a delivery is retried
/// saying so.
pub async fn a_closed_port_fails_clearly(
    dir: &Path,
    sim: &Simulator,
    sinks: &str,
    name: &str,
    password: &str,
) {
    let out = validate_online(dir, sim, sinks, &[]).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("cannot connect"), "{text}");
    assert!(!text.contains(password), "{text}");

    let sink = build_sink(dir, sim, sinks, name);
    let results = sink.deliver(&[envelope(1, "ONCRMDEALADD")]).await;
    match &results[0] {
        b24eventd::sinks::SinkResult::Retry { error, .. } => {
            assert!(error.contains("cannot connect"), "{error}");
            assert!(!error.contains(password), "{error}");
        }
        other => panic!("expected retry, got {other:?}"),
    }
}

/// The attempts at `sink` the journal recorded as delivered duplicates (the server said it had
/// the message already).
pub fn journal_duplicates(journal: &Journal, sink: &str) -> usize {
    super::sql_count(
        journal,
        &format!(
            "SELECT COUNT(*) AS n FROM delivery_attempts WHERE sink = '{sink}' AND output LIKE 'duplicate%'"
        ),
    ) as usize
}

/// SIGKILLs the real binary on `config` at random moments (300 to 1,200 ms after each start,
/// seeded by `seed`) while `total` events arrive 100 per start, until at least 8 kills are
/// done, every event is emitted and the journal shows a redelivery to `sink` the server took as
/// a duplicate (a kill between its ack and the journal's commit); at most 40 kills. (A start
/// with nothing left to deliver cannot land such a kill: the smaller the share per start, the
/// more starts have deliveries in flight, and the faster the journal, the more that matters.) The journal
/// is the one beside `config`, as [`write_config`] puts it. Emits what is left after the last
/// kill; returns the number of kills.
pub async fn sigkill_until_a_duplicate(
    config: &Path,
    log: &Path,
    sim: &Simulator,
    sink: &str,
    total: u64,
    seed: u64,
) -> u32 {
    let dir = config.parent().expect("the config's directory");
    let mut emitted = 0;
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut kills = 0;
    while kills < 40 {
        if emitted < total {
            let count = PER_START.min(total - emitted);
            emit_deals(sim, emitted + 1, count);
            emitted += count;
        }
        let mut child = daemon::spawn_daemon(config, log);
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1200))).await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "daemon died on its own; see {}",
            std::fs::read_to_string(log).unwrap()
        );
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        let journal = super::open_journal(dir).await;
        if kills >= 8 && emitted >= total && journal_duplicates(&journal, sink) > 0 {
            break;
        }
    }
    if emitted < total {
        emit_deals(sim, emitted + 1, total - emitted);
    }
    kills
}

/// How many events [`sigkill_until_a_duplicate`] emits before each start.
const PER_START: u64 = 100;
