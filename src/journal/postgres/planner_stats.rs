//! Keeps the server's planner statistics of the journal's tables in step with their growth:
//! when the events this instance wrote since the last `ANALYZE` reach the size the table had
//! then (each time it doubled, while it grows), it analyzes the tables again.
//!
//! Why the journal does what autovacuum is there for: PostgreSQL plans a prepared statement
//! for its parameters five times, then keeps one generic plan when that costs no more, and
//! replaces it only when the statistics of a table it reads change ("Prepared statements can
//! use generic plans ... the first five executions are done with custom plans",
//! <https://www.postgresql.org/docs/current/sql-prepare.html>; an `ANALYZE` invalidates the
//! plans built on the table). A journal created empty and filled by a backlog runs on plans
//! costed for empty tables: the due-deliveries statement read every row of `events` for each
//! due delivery, and a 100,000-event backlog drained at 590 events/s instead of 10,700
//! (docs/BENCHMARKS.md). Autovacuum analyzes a table once 50 rows and 10% of it changed
//! (`autovacuum_analyze_threshold`, `autovacuum_analyze_scale_factor`,
//! <https://www.postgresql.org/docs/current/routine-vacuuming.html#VACUUM-FOR-STATISTICS>), but
//! only at its next round (`autovacuum_naptime`, a minute by default) and never where it is
//! turned off. The journal does not wait: `FIRST_ANALYZE` events, then as many events as the
//! table held. Not autovacuum's tenth: what goes wrong is a plan made for a table a hundred
//! times smaller, not statistics a tenth behind, and each `ANALYZE` reads a sample of up to
//! 30,000 rows of each table (300 × `default_statistics_target`, <https://www.postgresql.org/docs/current/sql-analyze.html>):
//! by tenths, a 100,000-event backlog paid 24 of them, 44 µs of server time per event, a
//! quarter of the server's work (docs/BENCHMARKS.md). `SKIP_LOCKED` leaves a table that another
//! instance (or autovacuum) is analyzing at that moment to it.

use super::quote_ident;
use std::sync::Mutex;

/// The events written before the first `ANALYZE`: enough for the statistics to describe a
/// table that is no longer empty, few enough that a backlog is not drained on plans for an
/// empty one.
pub(super) const FIRST_ANALYZE: u64 = 1_000;

/// The tables the journal's hot statements read, all growing with the events.
const TABLES: [&str; 4] = ["events", "deliveries", "delivery_attempts", "batches"];

/// When the next `ANALYZE` is due; one per opened journal, shared by its handle's clones.
#[derive(Debug)]
pub(super) struct AnalyzeSchedule {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Events written since the last `ANALYZE` began.
    written: u64,
    /// The count of `written` at which the next one is due.
    due_at: u64,
    /// Whether one is running (there is never more than one).
    running: bool,
}

impl Default for AnalyzeSchedule {
    fn default() -> Self {
        AnalyzeSchedule {
            state: Mutex::new(State {
                written: 0,
                due_at: FIRST_ANALYZE,
                running: false,
            }),
        }
    }
}

/// An `ANALYZE` the caller must run now, then report with [`AnalyzeSchedule::finished`].
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Due {
    /// The events written when it was started: they are counted by the statistics it makes.
    written: u64,
}

impl AnalyzeSchedule {
    /// Counts `events` new rows of `events`; says when an `ANALYZE` is due and none is running.
    pub(super) fn wrote(&self, events: u64) -> Option<Due> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.written = state.written.saturating_add(events);
        if state.running || state.written < state.due_at {
            return None;
        }
        state.running = true;
        Some(Due {
            written: state.written,
        })
    }

    /// Records the end of `due`: `rows` is the size of `events` that its statistics give, or
    /// `None` when it failed (the next try then waits for as many events again).
    pub(super) fn finished(&self, due: Due, rows: Option<u64>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.running = false;
        state.written -= due.written.min(state.written);
        state.due_at = match rows {
            Some(rows) => rows.max(FIRST_ANALYZE),
            None => due.written.max(FIRST_ANALYZE),
        };
    }
}

/// Analyzes the tables of the journal in `schema`; returns the row count of `events` that the
/// statistics now give.
pub(super) async fn analyze(client: &tokio_postgres::Client, schema: &str) -> anyhow::Result<u64> {
    let schema = quote_ident(schema);
    let tables: Vec<String> = TABLES.iter().map(|t| format!("{schema}.{t}")).collect();
    client
        .batch_execute(&format!("ANALYZE (SKIP_LOCKED) {}", tables.join(", ")))
        .await?;
    // `reltuples` is -1 for a table never analyzed (one skipped because it was locked).
    let rows: f32 = client
        .query_one(
            "SELECT reltuples FROM pg_class WHERE oid = $1::text::regclass",
            &[&format!("{schema}.events")],
        )
        .await?
        .get(0);
    Ok(rows.max(0.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_analyze_comes_after_first_analyze_events() {
        let schedule = AnalyzeSchedule::default();
        assert_eq!(schedule.wrote(FIRST_ANALYZE - 1), None);
        assert_eq!(
            schedule.wrote(1),
            Some(Due {
                written: FIRST_ANALYZE
            })
        );
    }

    #[test]
    fn one_runs_at_a_time_and_the_events_written_meanwhile_count_towards_the_next() {
        let schedule = AnalyzeSchedule::default();
        let due = schedule.wrote(1_200).expect("due");
        assert_eq!(schedule.wrote(5_000), None, "one is running");
        schedule.finished(due, Some(3_000));
        // The next is due after 3,000 events; the 5,000 written since it began pass that.
        assert_eq!(schedule.wrote(0), Some(Due { written: 5_000 }));
    }

    #[test]
    fn the_next_is_due_once_the_table_doubled() {
        let schedule = AnalyzeSchedule::default();
        let due = schedule.wrote(FIRST_ANALYZE).expect("due");
        schedule.finished(due, Some(100_000));
        assert_eq!(schedule.wrote(99_999), None);
        assert_eq!(schedule.wrote(1), Some(Due { written: 100_000 }));
    }

    /// A backlog drained into an empty journal: 1,000 events, then each doubling.
    #[test]
    fn a_growing_table_is_analyzed_at_each_doubling() {
        let schedule = AnalyzeSchedule::default();
        let mut table = 0;
        let mut analyzed_at = Vec::new();
        for _ in 0..2_000 {
            table += 50; // a batch
            if let Some(due) = schedule.wrote(50) {
                analyzed_at.push(table);
                schedule.finished(due, Some(table));
            }
        }
        assert_eq!(
            analyzed_at,
            [1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000]
        );
    }

    #[test]
    fn a_small_table_waits_for_first_analyze_events_again() {
        let schedule = AnalyzeSchedule::default();
        let due = schedule.wrote(FIRST_ANALYZE).expect("due");
        // Fewer rows than events written (pruned meanwhile), or none known (`reltuples` -1
        // for a table skipped as locked, read as 0).
        schedule.finished(due, Some(300));
        assert_eq!(schedule.wrote(FIRST_ANALYZE - 1), None);
        assert!(schedule.wrote(1).is_some());
    }

    #[test]
    fn a_failed_one_is_tried_again_after_as_many_events() {
        let schedule = AnalyzeSchedule::default();
        let due = schedule.wrote(4_000).expect("due");
        schedule.finished(due, None);
        assert_eq!(schedule.wrote(3_999), None);
        assert_eq!(schedule.wrote(1), Some(Due { written: 4_000 }));
    }

    /// The journal writes events; its tables are analyzed once `FIRST_ANALYZE` were written.
    #[test]
    #[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test)"]
    fn the_journal_analyzes_its_tables_once_first_analyze_events_were_written() {
        use crate::journal::inspect_tests::batch;
        use crate::journal::test_support::{DEFAULT_TEST_URL, postgres_url, unique_schema};
        use crate::journal::{Access, JournalBackend};
        use std::time::{Duration, Instant};

        let config = crate::config::PostgresJournalConfig {
            url: postgres_url().unwrap_or_else(|| DEFAULT_TEST_URL.to_string()),
            schema: unique_schema(),
            max_connections: 2,
        };
        let journal = super::super::PgJournal::connect(&config, Access::Create).unwrap();
        // Manual ANALYZEs only: autovacuum's, where it is on, are counted apart.
        let analyzes = || {
            journal
                .sql_rows(
                    "SELECT analyze_count FROM pg_stat_user_tables
                     WHERE schemaname = current_schema() AND relname = 'events'",
                )
                .unwrap()[0]["analyze_count"]
                .as_i64()
                .unwrap()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let first = FIRST_ANALYZE as i64;
        runtime
            .block_on(journal.record_batches(vec![batch("p1", 1..=first - 1)]))
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(analyzes(), 0, "analyzed before {FIRST_ANALYZE} events");
        runtime
            .block_on(journal.record_batches(vec![batch("p2", first..=first)]))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while analyzes() == 0 {
            assert!(Instant::now() < deadline, "not analyzed within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        let rows = journal
            .sql_rows("SELECT reltuples FROM pg_class WHERE oid = 'events'::regclass")
            .unwrap();
        assert_eq!(rows[0]["reltuples"].as_f64(), Some(FIRST_ANALYZE as f64));
        journal
            .sql_execute(&format!("DROP SCHEMA {} CASCADE", config.schema))
            .unwrap();
    }
}
