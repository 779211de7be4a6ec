//! The system clock jumps under the real binary: set back an hour mid-drain (with sink retries
//! pending, the `get` operating budget spent and the access token about to expire), then
//! forward by a day. Nothing is lost, nothing stays reserved upstream, and nothing waits out the
//! size of the step: not the retries in the journal, not the fetches held back for the
//! portal's operating window, not the cron-driven error-lane reads.
//!
//! libfaketime moves the wall clock of the daemon alone (the simulator, in this process, keeps
//! the real time, as a portal would); the monotonic clock is left alone. It is ignored
//! unless asked for (`--include-ignored`; `.ci/run` installs Debian's `faketime` and asks) and
//! then fails loudly when libfaketime is missing; `B24TEST_LIBFAKETIME` names another copy.

use crate::support::daemon::{spawn_daemon_with_env, stop_with_sigterm};
use crate::support::*;
use b24eventd_simulator::{OperatingLimit, SimulatorConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const LIBFAKETIME: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
];

fn libfaketime() -> PathBuf {
    if let Ok(path) = std::env::var("B24TEST_LIBFAKETIME") {
        let path = PathBuf::from(path);
        assert!(
            path.exists(),
            "B24TEST_LIBFAKETIME={} does not exist",
            path.display()
        );
        return path;
    }
    LIBFAKETIME
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!(
                "the clock-jump test was asked for, but libfaketime is not installed \
                 (apt-get install faketime; looked in {LIBFAKETIME:?}, or set B24TEST_LIBFAKETIME)"
            )
        })
}

/// Sets the daemon's clock offset (libfaketime syntax: `+0`, `-1h`, `+1d`). Written beside
/// and renamed over, so libfaketime never reads a half-written (empty) file.
fn set_offset(file: &Path, offset: &str) {
    let next = file.with_extension("next");
    std::fs::write(&next, format!("{offset}\n")).unwrap();
    std::fs::rename(&next, file).unwrap();
}

/// Waits until the daemon has logged `needle` exactly once; on a timeout the panic shows how
/// often it was logged and the end of the log, so a failure on a busy CI machine says why.
async fn logged_once(log: &Path, needle: &str, timeout: Duration) {
    let start = Instant::now();
    loop {
        let count = log_count(log, needle);
        if count == 1 {
            return;
        }
        if count > 1 || start.elapsed() > timeout {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            panic!(
                "after {:?} the daemon had logged {needle:?} {count} times (once expected); the log ends:\n{tail}",
                start.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn log_count(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

async fn metrics(admin: &str) -> String {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .unwrap()
}

fn metric_value(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[ignore = "needs libfaketime: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clock_set_back_an_hour_then_forward_a_day_delays_and_loses_nothing() {
    let preload = libfaketime();
    init();
    let dir = tempfile::tempdir().unwrap();
    // A small operating budget for the drain to spend several times over: 3 s of server time
    // per 10 s window, a 50-event get costing 5 ms + 4 ms per event.
    let (sim, tokens) = portal(SimulatorConfig {
        operating_limit: Some(OperatingLimit::scaled(
            Duration::from_secs(3),
            Duration::from_secs(10),
        )),
        operating_cost_per_event: Duration::from_millis(4),
        ..SimulatorConfig::default()
    })
    .await;
    let sink_up = Arc::new(AtomicBool::new(false));
    let up = sink_up.clone();
    let endpoint = Endpoint::start(Arc::new(
        move |_| {
            if up.load(Ordering::SeqCst) { 200 } else { 503 }
        },
    ))
    .await;
    let admin = format!("127.0.0.1:{}", free_port());
    let config = write_config(
        dir.path(),
        &sim,
        None,
        "rate_limit = { operating_budget = \"3s\" }",
        &format!("{}\n{}", file_sink(dir.path()), http_sink(&endpoint.url)),
    );
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("listen = \"\"", &format!("listen = \"{admin}\""));
    std::fs::write(&config, text).unwrap();
    open_journal(dir.path())
        .await
        .save_tokens("main", &tokens)
        .await
        .unwrap();

    let offset = dir.path().join("faketime");
    set_offset(&offset, "+0");
    let log = dir.path().join("daemon.log");
    let mut child = spawn_daemon_with_env(
        &config,
        &log,
        &[
            ("LD_PRELOAD", preload.to_str().unwrap()),
            ("FAKETIME_TIMESTAMP_FILE", offset.to_str().unwrap()),
            // Re-read the offset every second; leave CLOCK_MONOTONIC alone, as a real step does.
            ("FAKETIME_CACHE_DURATION", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    wait_for("the daemon to start", Duration::from_secs(30), || {
        log_count(&log, "b24eventd running") == 1
    })
    .await;

    // Phase 1: a 1,500-event drain with the HTTP sink down, so that retries are pending and the
    // operating budget is being spent when the clock goes back an hour.
    emit_deals(&sim, 1, 1500);
    wait_for(
        "retries pending and the get budget in use",
        Duration::from_secs(60),
        || {
            sim.stats()
                .calls_by_method
                .get("event.offline.get")
                .copied()
                .unwrap_or(0)
                >= 4
                && log_count(&log, "sink failing") > 0
        },
    )
    .await;
    let lane_reads = sim.stats().error_lane_gets;
    set_offset(&offset, "-1h");
    let stepped = Instant::now();
    // The clock watcher's own line: the dispatcher's warning about retries beyond max_backoff
    // also says "the system clock was set back" and may land in the same 100 ms poll.
    logged_once(
        &log,
        "system clock was set back: planning",
        Duration::from_secs(20),
    )
    .await;
    // The token expires at the portal while the daemon's clock, an hour behind, says it has
    // an hour left: the portal's refusal must get it refreshed.
    let refreshes_before = sim.stats().token_refreshes;
    sim.expire_access_tokens();
    tokio::time::sleep(Duration::from_secs(2)).await;
    sink_up.store(true, Ordering::SeqCst);
    let everywhere = |n: usize| {
        endpoint.accepted_entities().len() == n
            && file_entities(&dir.path().join("events.jsonl")).len() == n
            && upstream_empty(&sim)
    };
    wait_for(
        "all 1,500 events delivered to both sinks and settled upstream",
        Duration::from_secs(90),
        || everywhere(1500),
    )
    .await;
    let drained = stepped.elapsed();
    assert!(
        sim.stats().token_refreshes > refreshes_before,
        "the token the portal refused was refreshed"
    );
    // The error lane is read on its cron schedule (every 2 s) once the get budget allows.
    wait_for(
        "error-lane reads on schedule after the step back",
        Duration::from_secs(30),
        || sim.stats().error_lane_gets >= lane_reads + 2,
    )
    .await;
    assert!(
        log_count(&log, "retry times lie beyond the sink's max_backoff") >= 1,
        "the retries written before the step were brought forward"
    );

    // Phase 2: forward by a day (25 hours from the step back), with the sink down again.
    sink_up.store(false, Ordering::SeqCst);
    let failures = log_count(&log, "sink failing");
    emit_deals(&sim, 1501, 300);
    wait_for("retries pending again", Duration::from_secs(30), || {
        log_count(&log, "sink failing") > failures
    })
    .await;
    let refreshes_before = sim.stats().token_refreshes;
    set_offset(&offset, "+1d");
    logged_once(&log, "system clock jumped forward", Duration::from_secs(20)).await;
    sink_up.store(true, Ordering::SeqCst);
    wait_for(
        "all 1,800 events delivered to both sinks and settled upstream",
        Duration::from_secs(60),
        || everywhere(1800),
    )
    .await;
    // A day ahead, the saved token looks expired: it is refreshed before use.
    wait_for(
        "a token refresh after the jump",
        Duration::from_secs(30),
        || sim.stats().token_refreshes > refreshes_before,
    )
    .await;

    let text = metrics(&admin).await;
    assert_eq!(
        metric_value(&text, "b24eventd_clock_steps_total{direction=\"backward\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "b24eventd_clock_steps_total{direction=\"forward\"}"),
        1.0,
        "{text}"
    );
    stop_with_sigterm(&mut child, &log);

    let stats = sim.stats();
    let journal = open_journal(dir.path()).await;
    let counts = journal.counts_blocking().unwrap();
    let lines: usize = file_ids(&dir.path().join("events.jsonl")).values().sum();
    eprintln!(
        "clock steps: 1,500 events delivered {:.1} s after the clock went back an hour; \
         1,800 in all, {} JSONL lines, {} HTTP deliveries; {} token refreshes, {} x 429, \
         {} error-lane reads, {} unsettled",
        drained.as_secs_f64(),
        lines,
        endpoint.accepted_count(),
        stats.token_refreshes,
        stats.rejected_429,
        stats.error_lane_gets,
        counts.unsettled_upstream,
    );
    assert_eq!(counts.unsettled_upstream, 0);
    assert!(
        stats.rejected_429 <= 2,
        "{} answers were 429: the operating windows were misjudged after a step",
        stats.rejected_429
    );
    let errors: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .filter(|l| l.contains(" ERROR "))
        .map(str::to_string)
        .collect();
    assert!(errors.is_empty(), "errors in the log: {errors:#?}");
}
