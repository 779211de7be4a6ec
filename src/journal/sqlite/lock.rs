//! The daemon lock: an exclusive advisory lock on `<journal path>.lock` that `b24eventd run`
//! holds for its whole life and that the conformance probe takes before it touches the portal,
//! so that neither runs while the other works the same journal (and so the same portals).
//!
//! The lock is `flock(2)` through std's `File::try_lock`: the kernel drops it when the holder
//! exits, however it exits (SIGKILL included), so a stale file never blocks a start. The holder
//! writes its pid into the file, for the error message of whoever finds it held; the file is
//! left in place when the holder ends (removing it would let a third process lock a fresh inode
//! while a second still waits on the old one).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The lock file of a journal: the journal's path with `.lock` appended.
pub fn lock_path(journal: &Path) -> PathBuf {
    let mut path = journal.as_os_str().to_owned();
    path.push(".lock");
    PathBuf::from(path)
}

/// A held daemon lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DaemonLock {
    file: File,
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "journal {journal} is in use by another b24eventd process ({holder}; lock {lock}): stop it first"
    )]
    Held {
        journal: PathBuf,
        lock: PathBuf,
        /// The pid the holder wrote, when it could be read.
        pid: Option<u32>,
        holder: String,
    },
    #[error("cannot open the daemon lock {lock}: {source}")]
    Io {
        lock: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DaemonLock {
    /// Takes the lock of `journal` without waiting, creating the lock file (mode 0600) and its
    /// directory if needed, and writes this process's pid into it.
    pub fn acquire(journal: &Path) -> Result<DaemonLock, LockError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = lock_path(journal);
        let io = |source| LockError::Io {
            lock: path.clone(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io)?;
        }
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let pid = read_pid(&mut file);
                let holder = match pid {
                    Some(pid) => format!("pid {pid}"),
                    None => "pid unknown".to_string(),
                };
                return Err(LockError::Held {
                    journal: journal.to_path_buf(),
                    lock: path,
                    pid,
                    holder,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let pid = std::process::id();
        let written = file
            .set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{pid}"))
            .and_then(|()| file.sync_data());
        written.map_err(io)?;
        tracing::debug!(lock = %path.display(), pid, "daemon lock taken");
        Ok(DaemonLock { file })
    }
}

impl Drop for DaemonLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

/// The pid a holder wrote into the lock file.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_file_sits_beside_the_journal() {
        assert_eq!(
            lock_path(Path::new("/var/lib/b24eventd/journal.db")),
            Path::new("/var/lib/b24eventd/journal.db.lock")
        );
    }

    #[test]
    fn a_second_taker_is_refused_with_the_holders_pid_and_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("j.db");
        let held = DaemonLock::acquire(&journal).unwrap();
        let text = std::fs::read_to_string(lock_path(&journal)).unwrap();
        assert_eq!(text, format!("{}\n", std::process::id()));
        // flock locks belong to the open file description: a second open in the same process
        // conflicts as another process would.
        let err = DaemonLock::acquire(&journal).unwrap_err();
        match &err {
            LockError::Held { pid, lock, .. } => {
                assert_eq!(*pid, Some(std::process::id()));
                assert_eq!(lock, &lock_path(&journal));
            }
            other => panic!("expected Held, got {other:?}"),
        }
        let message = err.to_string();
        assert!(
            message.contains(&format!("pid {}", std::process::id()))
                && message.contains(&lock_path(&journal).display().to_string()),
            "{message}"
        );
        drop(held);
        let again = DaemonLock::acquire(&journal).expect("free once the holder dropped it");
        drop(again);
    }

    #[test]
    fn a_stale_file_from_an_ended_holder_does_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("sub/j.db");
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        std::fs::write(lock_path(&journal), "999999\n").unwrap();
        let _lock = DaemonLock::acquire(&journal).unwrap();
        let text = std::fs::read_to_string(lock_path(&journal)).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string(), "pid replaced");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(lock_path(&journal))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "an existing file is made private");
    }
}
