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

/// The database of the tests that only PostgreSQL can run (ignored unless asked for) when
/// `B24TEST_POSTGRES` is not set: the local server `.ci/run` makes sure of.
pub const DEFAULT_TEST_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

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

/// The `[journal]` config of the test journal of `dir`: `dir/journal.db`, or a schema of its
/// own in the PostgreSQL database `B24TEST_POSTGRES` names (the same one on every call for the
/// same `dir`: its name is kept in `dir/journal.pg-schema`).
pub fn test_journal_config(dir: &std::path::Path) -> JournalConfig {
    JournalConfig {
        path: dir.join("journal.db"),
        postgres: postgres_url().map(|url| PostgresJournalConfig {
            url,
            schema: schema_of(dir),
            max_connections: 4,
        }),
        retention: Duration::from_secs(30 * 86400),
        prune_schedule: "0 30 3 * * *".into(),
        synchronous: Synchronous::Full,
        in_current_directory: false,
        lease_ttl: crate::config::DEFAULT_LEASE_TTL,
    }
}

/// The URL of `B24TEST_POSTGRES`, when set and not empty.
pub fn postgres_url() -> Option<String> {
    std::env::var(POSTGRES_VAR).ok().filter(|v| !v.is_empty())
}

/// The `[journal]` table of the test journal of `dir`, as config text (without the header).
pub fn test_journal_toml(dir: &std::path::Path) -> String {
    let config = test_journal_config(dir);
    match &config.postgres {
        Some(pg) => format!("url = \"{}\"\nschema = \"{}\"\n", pg.url, pg.schema),
        None => format!("path = \"{}\"\n", config.path.display()),
    }
}

/// The schema of `dir`'s test journal: made up on the first call, then read back.
fn schema_of(dir: &std::path::Path) -> String {
    let file = dir.join("journal.pg-schema");
    if let Ok(name) = std::fs::read_to_string(&file) {
        return name.trim().to_string();
    }
    let name = unique_schema();
    std::fs::write(&file, &name).unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
    name
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
    open_test_journal(dir, config)
}

/// A new journal in PostgreSQL whatever `B24TEST_POSTGRES` says, for the tests only PostgreSQL
/// can run (ignored unless asked for): its URL, else [`DEFAULT_TEST_URL`].
#[cfg(test)]
pub fn test_journal_on_postgres() -> (TestJournalGuard, Journal) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut config = test_journal_config(dir.path());
    config.postgres = Some(PostgresJournalConfig {
        url: postgres_url().unwrap_or_else(|| DEFAULT_TEST_URL.to_string()),
        schema: unique_schema(),
        max_connections: 4,
    });
    open_test_journal(dir, config)
}

#[cfg(test)]
fn open_test_journal(dir: tempfile::TempDir, config: JournalConfig) -> (TestJournalGuard, Journal) {
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
