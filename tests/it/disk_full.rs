//! The journal's file system fills up mid-run: fetching stops (nothing is reserved that cannot be
//! journaled, nothing is cleared that was not journaled and delivered), the daemon keeps running,
//! and when space returns everything drains with nothing lost.
//!
//! It mounts a small tmpfs for the journal, which needs root: it is ignored unless asked
//! for (`--include-ignored`; `.ci/run` does) and then fails loudly when the mount is refused.

use crate::support::*;
use b24eventd_simulator::SimulatorConfig;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn mount_tmpfs(dir: &Path, size: &str) {
    let out = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output()
        .expect("mount runs");
    assert!(
        out.status.success(),
        "the disk-full test was asked for, but mounting a tmpfs failed (run as root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn remount(dir: &Path, size: &str) {
    let out = Command::new("mount")
        .args(["-o", &format!("remount,size={size}")])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Unmounts on drop, so a failing test leaves no mount behind.
struct Mounted<'a>(&'a Path);

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

#[ignore = "needs root to mount a tmpfs: run with --include-ignored (.ci/run does)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_journal_disk_stops_fetching_and_recovers_when_space_returns() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let journal_dir = dir.path().join("journal");
    std::fs::create_dir(&journal_dir).unwrap();
    mount_tmpfs(&journal_dir, "1m");
    let _mounted = Mounted(&journal_dir);

    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let config = write_sqlite_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("path = \"{}/journal.db\"", dir.path().display()),
        &format!("path = \"{}/journal.db\"", journal_dir.display()),
    );
    std::fs::write(&config, text).unwrap();
    let running = Running::start(&config, &tokens).await;

    const TOTAL: u64 = 4000;
    emit_deals(&sim, 1, TOTAL);
    // The journal fills up: progress stops with events still upstream.
    let mut last = (0, Instant::now());
    wait_for(
        "progress to stop on a full journal",
        Duration::from_secs(60),
        || {
            let cleared = sim.stats().cleared;
            if cleared != last.0 {
                last = (cleared, Instant::now());
            }
            last.1.elapsed() > Duration::from_secs(3)
        },
    )
    .await;
    let stats = sim.stats();
    assert!(
        stats.queued + stats.reserved > 0,
        "the disk should fill before {TOTAL} events are through (cleared {})",
        stats.cleared
    );
    assert!(!running.task.is_finished(), "the daemon keeps running");

    // Nothing was cleared that is not journaled and delivered: every entity no longer upstream
    // is in the file sink.
    let upstream: BTreeSet<String> = sim
        .rows()
        .iter()
        .filter_map(|r| r.event_data.pointer("/FIELDS/ID").and_then(|v| v.as_str()))
        .map(str::to_string)
        .collect();
    let delivered: BTreeSet<String> = file_entities(&dir.path().join("events.jsonl"))
        .into_iter()
        .map(|(_, id)| id)
        .collect();
    let cleared: Vec<u64> = (1..=TOTAL)
        .filter(|id| !upstream.contains(&id.to_string()))
        .collect();
    assert_eq!(cleared.len() as u64, stats.cleared);
    for id in &cleared {
        assert!(
            delivered.contains(&id.to_string()),
            "deal {id} was cleared upstream but never delivered"
        );
    }
    let stalled_at = stats.cleared;

    // Space returns.
    remount(&journal_dir, "64m");
    wait_for(
        "every event settled after space returned",
        Duration::from_secs(180),
        || upstream_empty(&sim) && sim.stats().cleared == TOTAL,
    )
    .await;
    running.stop().await;
    let file = file_ids(&dir.path().join("events.jsonl"));
    assert_eq!(file.len() as u64, TOTAL, "nothing lost");
    let duplicates: usize = file.values().map(|n| n - 1).sum();
    eprintln!(
        "disk full: stalled after {stalled_at} of {TOTAL} events cleared; after space returned all \
         {TOTAL} delivered ({duplicates} duplicate lines)"
    );
}
