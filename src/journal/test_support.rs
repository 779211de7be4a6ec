//! Journals for tests: a SQLite file in a temporary directory, or, when `B24TEST_POSTGRES`
//! holds a `postgres://` URL, a schema of its own in that database (dropped afterwards), so
//! one test runs against either backend.

#[cfg(test)]
use super::Access;
use super::Journal;
use crate::config::{JournalConfig, PostgresJournalConfig, Synchronous};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The variable that puts the tests' journals in PostgreSQL.
pub const POSTGRES_VAR: &str = "B24TEST_POSTGRES";

/// Drops a test journal's PostgreSQL schema when the test ends (nothing for SQLite, whose file
/// goes with the test's directory).
pub struct DropSchema(Option<(Journal, String)>);

impl DropSchema {
    /// For `journal`, opened on `config`.
    pub fn new(config: &JournalConfig, journal: &Journal) -> DropSchema {
        DropSchema(
            config
                .postgres
                .as_ref()
                .map(|pg| (journal.clone(), pg.schema.clone())),
        )
    }
}

impl Drop for DropSchema {
    fn drop(&mut self) {
        if let Some((journal, schema)) = self.0.take() {
            let _ = journal.sql_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
        }
    }
}

/// The `[journal]` config of a new test journal in `dir`: `dir/journal.db`, or a new schema in
/// the PostgreSQL database `B24TEST_POSTGRES` names.
pub fn test_journal_config(dir: &std::path::Path) -> JournalConfig {
    JournalConfig {
        path: dir.join("journal.db"),
        postgres: postgres_url().map(|url| PostgresJournalConfig {
            url,
            schema: unique_schema(),
            max_connections: 4,
        }),
        retention: Duration::from_secs(30 * 86400),
        prune_schedule: "0 30 3 * * *".into(),
        synchronous: Synchronous::Full,
        in_current_directory: false,
    }
}

/// The URL of `B24TEST_POSTGRES`, when set and not empty.
pub fn postgres_url() -> Option<String> {
    std::env::var(POSTGRES_VAR).ok().filter(|v| !v.is_empty())
}

/// A schema name no other test of any process uses.
pub fn unique_schema() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!(
        "t_{}_{}_{}",
        std::process::id(),
        nanos,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A test journal's directory and schema, removed when dropped.
#[cfg(test)]
pub struct TestJournalGuard {
    _schema: DropSchema,
    pub dir: tempfile::TempDir,
}

/// A new, empty journal for one test, opened [`Access::Create`]; the guard removes it.
#[cfg(test)]
pub fn test_journal() -> (TestJournalGuard, Journal) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = test_journal_config(dir.path());
    let journal = Journal::open_configured_blocking(&config, Access::Create).unwrap_or_else(|e| {
        panic!(
            "cannot open the test journal {} ({POSTGRES_VAR} chooses PostgreSQL): {e:#}",
            config.location()
        )
    });
    let guard = TestJournalGuard {
        _schema: DropSchema::new(&config, &journal),
        dir,
    };
    (guard, journal)
}
