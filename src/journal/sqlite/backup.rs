//! `journal backup`: a consistent copy of the live journal in a new private file.
//!
//! `VACUUM INTO` (<https://www.sqlite.org/lang_vacuum.html#vacuuminto>) writes a transactionally
//! consistent snapshot of the database, WAL content included, through a read transaction: the
//! daemon keeps writing meanwhile. SQLite accepts as its target a file that does not exist or is
//! empty; we create that empty file ourselves first (`create_new`, mode 0600), so an existing
//! file is never overwritten and the copy, which holds the OAuth tokens, is private from its
//! first byte (SQLite would create it with the process's umask, usually 0644). The copy keeps
//! the header fields `application_id` and `user_version`, so it opens as a journal.

use anyhow::Context;
use rusqlite::Connection;
use std::path::Path;

/// Writes the snapshot of `conn`'s main database to `to`, a new file; returns its size in bytes.
pub(super) fn backup(conn: &Connection, to: &Path) -> anyhow::Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => anyhow::anyhow!(
                "cannot create backup {}: the file exists; a backup never overwrites, give a new path",
                to.display()
            ),
            _ => anyhow::Error::new(e).context(format!("cannot create backup {}", to.display())),
        })?;
    // The umask may have taken bits away, never added any; set the mode anyway in case the
    // file system ignores the one given at creation.
    std::fs::set_permissions(to, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("cannot set mode 0600 on backup {}", to.display()))?;
    let target = to
        .to_str()
        .with_context(|| format!("backup path {} is not UTF-8", to.display()))?;
    if let Err(e) = conn.execute("VACUUM INTO ?1", [target]) {
        // Leave no empty or partial file that would look like a backup.
        let _ = std::fs::remove_file(to);
        return Err(anyhow::Error::from(e).context(format!("cannot write backup {}", to.display())));
    }
    // VACUUM INTO does not sync the file it wrote: make the copy durable before saying so.
    file.sync_all()
        .with_context(|| format!("cannot sync backup {}", to.display()))?;
    Ok(std::fs::metadata(to)?.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_copy_is_private_consistent_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("live.db")).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA application_id=7; PRAGMA user_version=3;
             CREATE TABLE t(x); INSERT INTO t VALUES (1),(2),(3);",
        )
        .unwrap();
        let to = dir.path().join("copy.db");
        let size = backup(&conn, &to).unwrap();
        assert_eq!(size, std::fs::metadata(&to).unwrap().len());
        assert_eq!(
            std::fs::metadata(&to).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let copy = Connection::open(&to).unwrap();
        let n: i64 = copy
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 3);
        let id: i64 = copy
            .query_row("PRAGMA application_id", [], |r| r.get(0))
            .unwrap();
        assert_eq!(id, 7);
        let version: i64 = copy
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, 3);
        drop(copy);
        let before = std::fs::read(&to).unwrap();
        let err = backup(&conn, &to).unwrap_err();
        assert!(
            format!("{err:#}").contains("the file exists; a backup never overwrites"),
            "{err:#}"
        );
        assert_eq!(
            std::fs::read(&to).unwrap(),
            before,
            "an existing file is untouched"
        );
    }
}
