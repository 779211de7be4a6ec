//! The test that keeps the journal's boundary (ARCHITECTURE.md, `journal/`): `rusqlite` and SQL
//! appear in `src/` only inside the backends, `journal/sqlite/` and `journal/postgres/` (so
//! neither the callers nor the journal's interface name them), and nothing outside `journal/`
//! reaches into the store through the tests' hooks (`Journal::with_conn`, `sql_rows`,
//! `sql_execute`).

use std::path::{Path, PathBuf};

/// What counts as SQL or as naming SQLite's driver. Comment lines are not looked at: prose may
/// describe SQL (the simulator quotes the portal's own).
const FORBIDDEN: [&str; 7] = [
    "rusqlite",
    "SELECT ",
    "INSERT INTO",
    "UPDATE ",
    "DELETE FROM",
    "CREATE TABLE",
    "PRAGMA",
];

/// Where SQL may be, by path prefix under `src/`, and why.
const ALLOWED: [(&str, &str); 6] = [
    (
        "journal/sqlite/",
        "the SQLite backend (the bench's bare-SQLite baseline included)",
    ),
    ("journal/postgres/", "the PostgreSQL backend"),
    (
        "journal/tests/",
        "the backend-neutral tests peek at rows the interface does not show",
    ),
    ("journal/boundary.rs", "this test's own list"),
    (
        "sinks/postgres.rs",
        "the postgres sink writes the user's table: that is a sink's job",
    ),
    (
        "cli/demo.rs",
        "prints the sqlite3 commands a user may run on the demo's journal; runs none",
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Whether `word` occurs in `line` not as the tail of a longer name (`ONCRMDEALUPDATE `).
fn mentions(line: &str, word: &str) -> bool {
    line.match_indices(word).any(|(at, _)| {
        !line[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
    })
}

#[test]
fn sql_and_rusqlite_stay_in_the_sqlite_backend() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 50, "the source tree was found: {src:?}");
    let mut found = Vec::new();
    for file in &files {
        let rel = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(file).unwrap();
        let sql_allowed = ALLOWED.iter().any(|(p, _)| rel.starts_with(p));
        for (n, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            if !sql_allowed {
                for word in FORBIDDEN {
                    if mentions(line, word) {
                        found.push(format!("src/{rel}:{}: {word:?}: {}", n + 1, line.trim()));
                    }
                }
            }
            for hook in [".with_conn(", ".sql_rows(", ".sql_execute("] {
                if !rel.starts_with("journal/") && line.contains(hook) {
                    found.push(format!(
                        "src/{rel}:{}: Journal{} is for tests",
                        n + 1,
                        hook.trim_end_matches('(').replace('.', "::")
                    ));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "SQL and rusqlite belong in src/journal/sqlite/ (ARCHITECTURE.md, journal/); found:\n{}",
        found.join("\n")
    );
}
