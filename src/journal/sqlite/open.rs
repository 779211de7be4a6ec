//! How a journal file is opened: the access each caller asks for, what is checked before SQLite
//! may touch the file, the marker that makes a database the daemon's, and the refusals.
//!
//! **Nothing is touched before the checks.** A path that is not a regular file (a device such
//! as `/dev/null`, a directory, a FIFO) is refused from its metadata alone: no `chmod`, no
//! `-journal`/`-wal` file beside it. A non-empty file is then read through SQLite **read-only**
//! and classified: the daemon's journal carries `PRAGMA application_id` = [`APPLICATION_ID`]
//! (journals written before the marker existed are recognised by a schema version of ours and
//! the daemon's tables, and stamped at their next read-write open); an empty database may
//! become a journal; anything else (another program's tables, another `application_id`) is
//! refused and never gets a table of ours, a journal-mode switch or a checkpoint.
//!
//! **Read-only opens and WAL.** The journal is in WAL mode, and a reader of a WAL database
//! needs the wal-index (`-shm`) to see what a running daemon has committed but not yet
//! checkpointed. A connection opened with `SQLITE_OPEN_READ_ONLY` holds the database file
//! descriptor read-only, so no migration, journal-mode switch or checkpoint (also not the
//! checkpoint SQLite runs when the last connection closes) can write the database; SQLite still
//! opens the `-shm` (and `-wal`) beside it read-write when it can, and creates them when they
//! are missing, which is how `journal stats` reads consistently beside the daemon. When they
//! cannot be written (another user, a read-only directory), SQLite (3.22 and later) reads with
//! a private copy of the wal-index, as long as the `-shm` exists or the `-wal` is empty.
//! Those two files hold no data that is not in the WAL, and SQLite applies a `-wal` only when
//! its header and checksums match, so opening never changes what the database holds.
//! `immutable=1` is not used: it would ignore the WAL and show stale data.

use super::schema::SCHEMA_VERSION;
use crate::config::Synchronous;
use crate::journal::Access;
use rusqlite::{Connection, OpenFlags};
use std::io::Read;
use std::path::{Path, PathBuf};

/// `PRAGMA application_id` of a b24eventd journal (`b24e` in ASCII): the marker that a SQLite
/// file is the daemon's (<https://www.sqlite.org/fileformat2.html#application_id>).
pub(super) const APPLICATION_ID: i32 = 0x6232_3465;

/// The tables every journal of ours has had since schema version 1.
const OUR_TABLES: [&str; 5] = ["portals", "tokens", "batches", "events", "deliveries"];

/// Why a journal was not opened. Every variant but [`OpenError::Missing`] and
/// [`OpenError::Unreadable`] (permissions, I/O) is an operator problem a restart cannot fix: the
/// CLI exits 78 on them, which the systemd unit does not restart on.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "journal {path} {state}: check journal.path, and run `b24eventd auth login` and `b24eventd run` to make one"
    )]
    Missing {
        path: PathBuf,
        /// "does not exist" or "is empty".
        state: &'static str,
    },
    #[error(
        "journal {path} is not a regular file (it is {kind}): nothing was changed; set journal.path to a file (the daemon creates it)"
    )]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "journal {path} is not a b24eventd journal ({reason}): nothing was changed; set journal.path to the daemon's journal or to a new file"
    )]
    Foreign { path: PathBuf, reason: String },
    #[error(
        "journal {path} is damaged or not a database ({detail}): if it is the daemon's journal, stop the daemon and restore it from a backup, or move it aside (with its -wal and -shm files) and start again: the daemon re-adopts what is still reserved upstream, and the tokens must be stored again with `b24eventd auth login` (docs/OPERATIONS.md, \"A damaged journal\"); otherwise fix journal.path"
    )]
    Damaged { path: PathBuf, detail: String },
    #[error("cannot read journal {path}: {detail}")]
    Unreadable { path: PathBuf, detail: String },
    #[error(
        "journal {path} has schema version {version}, newer than this build supports ({SCHEMA_VERSION}): upgrade b24eventd"
    )]
    TooNew { path: PathBuf, version: i64 },
    #[error(
        "journal {path} has schema version {version}, older than this build's ({SCHEMA_VERSION}), and this command only reads: start `b24eventd run` once to migrate it"
    )]
    TooOld { path: PathBuf, version: i64 },
}

impl OpenError {
    /// Whether the CLI exits 78 on it (everything but a missing or unreadable journal).
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            OpenError::Missing { .. } | OpenError::Unreadable { .. }
        )
    }
}

/// Whether a SQLite error means the file is damaged or not a database at all.
pub(super) fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// The damage a failed journal operation reports, as an [`OpenError::Damaged`] naming `path`
/// (for errors that surface after the open: a damaged page is found when it is read).
pub fn damage(path: &Path, error: &anyhow::Error) -> Option<OpenError> {
    error.chain().find_map(|cause| {
        let e = cause.downcast_ref::<rusqlite::Error>()?;
        is_damage(e).then(|| OpenError::Damaged {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })
    })
}

/// What the checks found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Found {
    /// No file yet.
    Nothing,
    /// An empty file, or a database with nothing in it: may become a journal.
    Empty,
    /// The daemon's journal at `version`; `stamped` once it carries [`APPLICATION_ID`].
    Ours { version: i64, stamped: bool },
}

/// The checks made before a journal is opened with `access`, touching nothing: the file type,
/// the SQLite header, then (for a non-empty file) a read-only look at its marker and schema.
pub fn check(path: &Path, access: Access) -> Result<(), OpenError> {
    inspect(path, access).map(|_| ())
}

pub(super) fn inspect(path: &Path, access: Access) -> Result<Found, OpenError> {
    let found = inspect_file(path)?;
    match (found, access) {
        (Found::Nothing, Access::Create) | (Found::Empty, Access::Create) => Ok(found),
        (Found::Nothing, _) => Err(OpenError::Missing {
            path: path.to_path_buf(),
            state: "does not exist",
        }),
        (Found::Empty, _) => Err(OpenError::Missing {
            path: path.to_path_buf(),
            state: "is empty",
        }),
        (Found::Ours { version, .. }, _) if version > SCHEMA_VERSION => Err(OpenError::TooNew {
            path: path.to_path_buf(),
            version,
        }),
        (Found::Ours { version, .. }, Access::Read) if version < SCHEMA_VERSION => {
            Err(OpenError::TooOld {
                path: path.to_path_buf(),
                version,
            })
        }
        (Found::Ours { .. }, _) => Ok(found),
    }
}

fn inspect_file(path: &Path) -> Result<Found, OpenError> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Nothing),
        Err(e) => {
            return Err(OpenError::Unreadable {
                path: path.to_path_buf(),
                detail: e.to_string(),
            });
        }
    };
    if !meta.is_file() {
        return Err(OpenError::NotRegular {
            path: path.to_path_buf(),
            kind: file_kind(&meta.file_type()),
        });
    }
    let header = read_header(path).map_err(|e| OpenError::Unreadable {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    if header.is_empty() {
        // A journal created but never written (or a crash right after creating it). A WAL
        // database always has its first page in the file, so a -wal beside an empty file is
        // a stray one, and SQLite discards it.
        return Ok(Found::Empty);
    }
    if header.len() < 100 || !header.starts_with(b"SQLite format 3\0") {
        return Err(OpenError::Damaged {
            path: path.to_path_buf(),
            detail: "file is not a database: it does not start with the SQLite header".into(),
        });
    }
    // The header of the database file itself; a committed change of the marker may still sit
    // in the WAL, so a zero here is looked at again through SQLite below.
    let marker = i32::from_be_bytes([header[68], header[69], header[70], header[71]]);
    if marker != 0 && marker != APPLICATION_ID {
        return Err(OpenError::Foreign {
            path: path.to_path_buf(),
            reason: format!("its application_id is {marker:#x}, another program's"),
        });
    }
    classify(path)
}

fn file_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

/// The first 100 bytes (the SQLite header), fewer when the file is shorter.
fn read_header(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut header = Vec::with_capacity(100);
    std::fs::File::open(path)?
        .take(100)
        .read_to_end(&mut header)?;
    Ok(header)
}

/// Looks at a SQLite file through a read-only connection: its marker, schema version and tables.
fn classify(path: &Path) -> Result<Found, OpenError> {
    let damaged = |e: rusqlite::Error| {
        if is_damage(&e) {
            OpenError::Damaged {
                path: path.to_path_buf(),
                detail: e.to_string(),
            }
        } else {
            OpenError::Unreadable {
                path: path.to_path_buf(),
                detail: format!("read-only: {e}"),
            }
        }
    };
    let conn = open_read_only(path).map_err(damaged)?;
    let marker: i32 = conn
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(damaged)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(damaged)?;
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .and_then(|mut s| {
            s.query_map([], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()
        })
        .map_err(damaged)?;
    let objects: i64 = conn
        .query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| r.get(0))
        .map_err(damaged)?;
    drop(conn);
    let foreign = |reason: String| {
        Err(OpenError::Foreign {
            path: path.to_path_buf(),
            reason,
        })
    };
    match marker {
        APPLICATION_ID => Ok(Found::Ours {
            version,
            stamped: true,
        }),
        0 if objects == 0 && version == 0 => Ok(Found::Empty),
        0 if version >= 1 && OUR_TABLES.iter().all(|t| tables.iter().any(|n| n == t)) => {
            Ok(Found::Ours {
                version,
                stamped: false,
            })
        }
        0 if tables.is_empty() => foreign(format!(
            "it holds no tables of ours but is not empty (schema version {version})"
        )),
        0 => foreign(format!(
            "it has no b24eventd marker and holds other tables: {}",
            summary(&tables)
        )),
        other => foreign(format!(
            "its application_id is {other:#x}, another program's"
        )),
    }
}

fn summary(tables: &[String]) -> String {
    let mut names: Vec<&str> = tables.iter().take(5).map(String::as_str).collect();
    if tables.len() > 5 {
        names.push("...");
    }
    names.join(", ")
}

/// A read-only connection (`SQLITE_OPEN_READ_ONLY`; see the module's notes on WAL).
pub(super) fn open_read_only(path: &Path) -> rusqlite::Result<Connection> {
    configure_library();
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    stable_plans(&conn)?;
    Ok(conn)
}

/// SQLite's process-wide settings, made once before the process's first connection (SQLite
/// takes them only before it initializes; a later call changes nothing;
/// <https://www.sqlite.org/c3ref/c_config_covering_index_scan.html>):
/// - memory statistics off (`SQLITE_CONFIG_MEMSTATUS`): with them on, every allocation SQLite
///   makes takes a process-wide mutex to count it, 5 to 7% of the journal's CPU in a drain,
///   and nothing here reads the counts;
/// - statement journals kept in memory up to [`STATEMENT_JOURNAL_SPILL`]
///   (`SQLITE_CONFIG_STMTJRNL_SPILL`): a statement that writes several rows (the multi-row
///   inserts, the updates over a JSON array of ids) keeps the pages it changes so that it can
///   be undone alone, and with foreign keys on every such statement does. Past the default
///   64 KiB (a 32-row insert passes it) SQLite opened a temporary file per transaction and
///   wrote them there: a `pwrite` per page, 5% of the journal's CPU in `bench journal`.
fn configure_library() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: SQLITE_CONFIG_MEMSTATUS takes one int.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS,
                0 as std::ffi::c_int,
            )
        };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(
                rc,
                "sqlite was initialized before the journal: memory statistics stay on"
            );
        }
        // SAFETY: SQLITE_CONFIG_STMTJRNL_SPILL takes one int.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_config(
                rusqlite::ffi::SQLITE_CONFIG_STMTJRNL_SPILL,
                STATEMENT_JOURNAL_SPILL as std::ffi::c_int,
            )
        };
        if rc != rusqlite::ffi::SQLITE_OK {
            tracing::debug!(
                rc,
                "sqlite was initialized before the journal: statement journals spill at 64 KiB"
            );
        }
    });
}

/// Turns on the query planner stability guarantee (`SQLITE_DBCONFIG_ENABLE_QPSG`,
/// <https://www.sqlite.org/c3ref/c_dbconfig_defensive.html>): a statement's plan never depends
/// on the values bound to it. Without it SQLite 3.54 lets the planner read a bound value (an
/// `id = ?` term is estimated differently when the value is 0 or 1, `LIMIT ?` is coded as a
/// constant) and marks the statement to be re-prepared when its bindings change or are
/// cleared, and rusqlite's statement cache clears them on every statement it takes back: each
/// per-event statement was parsed and planned again for every event (11% of the daemon's CPU
/// in a drain). The journal's statements write their partial indexes' conditions as literals,
/// so no plan needs a bound value.
fn stable_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

/// The size in bytes up to which a statement journal stays in memory (see
/// [`configure_library`]): above what the journal's own statements need (a delivered batch of
/// 500 events changes about 150 pages), so only a statement over thousands of rows (`prune`)
/// spills to a temporary file.
const STATEMENT_JOURNAL_SPILL: usize = 4 << 20;

/// How many prepared statements a connection keeps. The journal's statements (about 50, the
/// multi-row inserts' shapes included) must all fit: rusqlite's default of 16 made the
/// statements run once per delivered batch evict each other, so each was parsed and planned
/// again every time (3% of the journal's CPU in `bench journal`).
const STATEMENT_CACHE_CAPACITY: usize = 128;

/// A read-write connection with the daemon's settings; `create` lets SQLite create the file.
pub(super) fn open_read_write(
    path: &Path,
    create: bool,
    synchronous: Synchronous,
) -> rusqlite::Result<Connection> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    configure_library();
    let conn = Connection::open_with_flags(path, flags)?;
    stable_plans(&conn)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    conn.busy_timeout(std::time::Duration::from_secs(60))?;
    let sync = match synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap_or_default()
    }

    #[test]
    fn a_missing_file_may_only_be_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.db");
        assert_eq!(inspect(&path, Access::Create).unwrap(), Found::Nothing);
        for access in [Access::Write, Access::Read] {
            let err = inspect(&path, access).unwrap_err();
            assert!(!err.is_refusal(), "{err}");
            assert!(err.to_string().contains("does not exist"), "{err}");
        }
        assert!(!path.exists(), "looking created nothing");
    }

    #[test]
    fn special_files_are_refused_by_their_type() {
        let dir = tempfile::tempdir().unwrap();
        for (path, kind) in [
            (PathBuf::from("/dev/null"), "a character device"),
            (dir.path().to_path_buf(), "a directory"),
        ] {
            for access in [Access::Create, Access::Write, Access::Read] {
                let err = inspect(&path, access).unwrap_err();
                assert!(err.is_refusal());
                let text = err.to_string();
                assert!(
                    text.contains(&path.display().to_string()) && text.contains(kind),
                    "{text}"
                );
            }
        }
    }

    #[test]
    fn a_non_database_is_damaged_and_a_foreign_database_is_foreign() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "hello, not a database\n").unwrap();
        let err = inspect(&text, Access::Create).unwrap_err();
        assert!(matches!(err, OpenError::Damaged { .. }), "{err}");

        let other = dir.path().join("other.db");
        {
            let conn = Connection::open(&other).unwrap();
            conn.execute_batch("CREATE TABLE history (id INTEGER PRIMARY KEY, url TEXT);")
                .unwrap();
        }
        let before = sha(&other);
        let err = inspect(&other, Access::Create).unwrap_err();
        assert!(
            matches!(&err, OpenError::Foreign { reason, .. } if reason.contains("history")),
            "{err}"
        );
        assert_eq!(sha(&other), before);

        let marked = dir.path().join("marked.db");
        {
            let conn = Connection::open(&marked).unwrap();
            conn.pragma_update(None, "application_id", 0x1234).unwrap();
        }
        let err = inspect(&marked, Access::Read).unwrap_err();
        assert!(err.to_string().contains("0x1234"), "{err}");
    }

    #[test]
    fn a_journal_of_ours_is_recognised_marked_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = dir.path().join("legacy.db");
        {
            let mut conn = Connection::open(&legacy).unwrap();
            super::super::schema::migrate_to(&mut conn, 0, SCHEMA_VERSION).unwrap();
        }
        assert_eq!(
            inspect(&legacy, Access::Read).unwrap(),
            Found::Ours {
                version: SCHEMA_VERSION,
                stamped: false
            }
        );
        let older = dir.path().join("older.db");
        {
            let mut conn = Connection::open(&older).unwrap();
            super::super::schema::migrate_to(&mut conn, 0, 2).unwrap();
        }
        assert!(matches!(
            inspect(&older, Access::Read),
            Err(OpenError::TooOld { version: 2, .. })
        ));
        assert!(
            inspect(&older, Access::Write).is_ok(),
            "a writer migrates it"
        );
        {
            let conn = Connection::open(&older).unwrap();
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        assert!(matches!(
            inspect(&older, Access::Create),
            Err(OpenError::TooNew { .. })
        ));
    }
}
