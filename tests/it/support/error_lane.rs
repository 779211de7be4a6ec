//! Error-lane choreography for the idempotency-key tests: when the error lane is read, the key a
//! queue row must carry, the journal's rows and deliveries, and the merge of a later change into
//! an error-lane row between two runs of the pipeline.

use super::{Endpoint, Running, portal_rows_key, upstream_empty, wait_for, write_config};
use b24eventd::bitrix::Tokens;
use b24eventd::journal::Journal;
use b24eventd_simulator::{SimRow, Simulator};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The error lane is read once at start and then practically never (1 January, midnight): the
/// test decides when a poll re-reads it, by starting the daemon again.
pub const LANE_AT_START_ONLY: &str = "error_lane_schedule = \"0 0 0 1 1 *\"";
/// The error lane every second.
pub const LANE_EVERY_SECOND: &str = "error_lane_schedule = \"*/1 * * * * *\"";

/// An `http` sink named `name`; retried quickly, so a 400 is dead at once and a 503 comes back.
pub fn http_sink_named(name: &str, url: &str) -> String {
    format!(
        "[sinks.{name}]\ntype = \"http\"\nurl = \"{url}\"\ntimeout = \"2s\"\n[sinks.{name}.retry]\nmax_attempts = 50\ninitial_backoff = \"100ms\"\nmax_backoff = \"1s\"\n"
    )
}

/// The key of a queue row as the portal renders it: `main:<ID>:<TIMESTAMP_X as Unix seconds>`.
pub fn key_of(row: &SimRow) -> String {
    portal_rows_key("main", row.id, &row.timestamp_x)
}

/// True when the portal's queue holds `n` rows, every one in the error lane and unreserved.
pub fn all_in_error_lane(sim: &Simulator, n: usize) -> bool {
    let rows = sim.rows();
    rows.len() == n && rows.iter().all(|r| r.error && r.process_id.is_empty())
}

/// One journaled event row: `(row, offline ID, envelope id, lane, status, upstream)`.
pub type EventLine = (i64, i64, String, String, String, String);

/// Every event row of the journal, by row.
pub fn journal_events(journal: &Journal) -> Vec<EventLine> {
    super::sql_rows(
        journal,
        "SELECT id, offline_id, envelope_id, lane, status, upstream FROM events ORDER BY id",
    )
    .iter()
    .map(|r| {
        let text = |c| super::sql_text(r, c).unwrap_or_default();
        (
            super::sql_int(r, "id"),
            super::sql_int(r, "offline_id"),
            text("envelope_id"),
            text("lane"),
            text("status"),
            text("upstream"),
        )
    })
    .collect()
}

/// The deliveries of an event row: sink → status.
pub fn journal_deliveries(journal: &Journal, row: i64) -> BTreeMap<String, String> {
    super::sql_rows(
        journal,
        &format!("SELECT sink, status FROM deliveries WHERE event_id = {row}"),
    )
    .iter()
    .map(|r| {
        (
            super::sql_text(r, "sink").unwrap_or_default(),
            super::sql_text(r, "status").unwrap_or_default(),
        )
    })
    .collect()
}

/// How many deliveries to `sink` the journal has as delivered.
pub fn delivered_to(journal: &Journal, sink: &str) -> i64 {
    super::sql_count(
        journal,
        &format!(
            "SELECT COUNT(*) AS n FROM deliveries WHERE sink = '{sink}' AND status = 'delivered'"
        ),
    )
}

/// Waits until the portal holds nothing and the journal has nothing unsettled.
pub async fn drained(sim: &Simulator, journal: &Journal, what: &str) {
    wait_for(what, Duration::from_secs(60), || {
        upstream_empty(sim)
            && journal
                .counts_blocking()
                .is_ok_and(|c| c.unsettled_upstream == 0)
    })
    .await;
}

/// What [`error_lane_merge`] saw.
pub struct Merge {
    /// Deal 1's row once errored (never changed again).
    pub deal1: SimRow,
    /// Deal 2's row once errored, before the merge.
    pub deal2: SimRow,
    /// Deal 2's row after the later change merged into it.
    pub merged: SimRow,
    pub journal: Journal,
}

/// Two runs of the pipeline on `sinks` plus a sink `refuser` that answers 400 (so every event is
/// dead there, and errored upstream). Run 1 (error lane at start only): deals 1 and 2 are
/// delivered to the other sinks (`delivered` says when) and errored into the error lane. Between
/// the runs, more than a second later, deal 2 changes again: the change merges into its
/// error-lane row (same ID, later TIMESTAMP_X, still ERROR=1). Run 2 (error lane every second)
/// re-reads both rows and drains.
pub async fn error_lane_merge(
    dir: &Path,
    sim: &Simulator,
    tokens: &Tokens,
    sinks: &str,
    delivered: impl Fn(&Journal) -> bool,
) -> Merge {
    let refuser = Endpoint::start(Arc::new(|_| 400)).await;
    let sinks = format!("{sinks}\n{}", http_sink_named("refuser", &refuser.url));
    let config = write_config(dir, sim, None, LANE_AT_START_ONLY, &sinks);
    let running = Running::start(&config, tokens).await;
    sim.emit_change("ONCRMDEALUPDATE", 1);
    sim.emit_change("ONCRMDEALUPDATE", 2);
    wait_for(
        "both deals delivered and errored into the error lane",
        Duration::from_secs(30),
        || all_in_error_lane(sim, 2) && delivered(&running.journal),
    )
    .await;
    running.stop().await;
    let errored = sim.rows();
    let (deal1, deal2) = (errored[0].clone(), errored[1].clone());
    assert_eq!(deal1.event_data["FIELDS"]["ID"], "1");
    assert_eq!(deal2.event_data["FIELDS"]["ID"], "2");

    // TIMESTAMP_X has whole seconds: the change comes in a later second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    sim.emit_change("ONCRMDEALUPDATE", 2);
    let merged = sim.rows()[1].clone();
    assert_eq!(
        (merged.id, merged.error),
        (deal2.id, true),
        "merged in place"
    );
    assert!(merged.process_id.is_empty());
    assert_ne!(merged.timestamp_x, deal2.timestamp_x, "a later TIMESTAMP_X");

    let config = write_config(dir, sim, None, LANE_EVERY_SECOND, &sinks);
    let running = Running::start(&config, tokens).await;
    drained(sim, &running.journal, "the error lane cleared").await;
    let journal = running.journal.clone();
    running.stop().await;
    assert_eq!(
        sim.stats().errored,
        2,
        "only the normal-lane copies were errored"
    );
    Merge {
        deal1,
        deal2,
        merged,
        journal,
    }
}
