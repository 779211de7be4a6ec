//! The `file` sink: appends one envelope per line (JSONL) and syncs once per batch.
//!
//! The file is reopened for every batch (so a rotated or deleted file is recreated, mode 0640),
//! written with one `write_all` and made durable with `sync_data` before the batch counts as
//! delivered. A failed write is truncated back so a retry does not leave half a line behind.
//! A partial last line left by a killed process is cut off before the first append. Building
//! the sink and its health check write nothing: `doctor` may run beside a daemon that is
//! appending to the same file, possibly as another user.

use super::{Health, Sink, SinkConfig, SinkKind, SinkResult};
use crate::BoxFuture;
use crate::envelope::Envelope;
use crate::options::{ConfigError, SinkOptions};
use anyhow::{Context, bail};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `type = "file"`: append JSON lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSinkConfig {
    pub path: PathBuf,
}

impl super::SinkTypeConfig for FileSinkConfig {}

/// The keys of a `file` sink as written.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    path: Option<PathBuf>,
}

/// Reads and checks the keys of a `file` sink (registered in [`super::SINK_TYPES`]).
pub(crate) fn parse_config(options: &SinkOptions) -> Result<SinkKind, ConfigError> {
    let raw: Raw = options.parse()?;
    match raw.path {
        None => Err(options.err("path", "missing required key")),
        Some(path) if path.as_os_str().is_empty() => Err(options.err("path", "must not be empty")),
        Some(path) => Ok(SinkKind::File(FileSinkConfig { path })),
    }
}

/// The most envelopes one `deliver` call takes.
const MAX_BATCH: usize = 500;
/// Mode of a newly created file: owner read/write, group read.
const FILE_MODE: u32 = 0o640;

/// Appends envelopes to a JSONL file.
pub(crate) struct FileSink {
    name: String,
    path: PathBuf,
    timeout: Duration,
    /// Serialises writers so batches stay contiguous and a failed one can be truncated away.
    /// Holds whether the end of the file was checked for a torn line yet.
    lock: Arc<Mutex<bool>>,
}

impl FileSink {
    /// Checks that the file's directory exists and, when the file exists, that it can be
    /// opened for appending. Writes nothing: the first delivery creates the file (mode 0640).
    pub fn new(config: &SinkConfig, file: &FileSinkConfig) -> anyhow::Result<FileSink> {
        let path = file.path.clone();
        let parent = parent_dir(&path);
        if !parent.is_dir() {
            bail!(
                "sink {}: the directory {} of the file {} does not exist",
                config.name,
                parent.display(),
                path.display()
            );
        }
        if path.exists() {
            OpenOptions::new()
                .append(true)
                .open(&path)
                .with_context(|| {
                    format!(
                        "sink {}: cannot open {} for appending",
                        config.name,
                        path.display()
                    )
                })?;
        }
        Ok(FileSink {
            name: config.name.clone(),
            path,
            timeout: config.timeout,
            lock: Arc::new(Mutex::new(false)),
        })
    }
}

/// The directory a file lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// What a delivery needs of the file system, checked without writing to the file: the
/// directory exists and accepts new files (a rotated file is recreated there; checked with a
/// probe file created and removed at once), and the file, when it exists, opens for appending.
fn check_writable(path: &Path) -> Health {
    let dir = parent_dir(path);
    if !dir.is_dir() {
        return Health::fail(
            format!("the directory {} does not exist", dir.display()),
            format!(
                "create {} (writable by the daemon's user) or change the sink's path",
                dir.display()
            ),
        );
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let probe = dir.join(format!(
        ".{file_name}.b24eventd-check-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
        }
        Err(e) => {
            return Health::fail(
                format!("cannot create files in {}: {e}", dir.display()),
                format!(
                    "give the daemon's user write access to {} (a rotated or removed file is \
                     recreated there); run doctor as that user",
                    dir.display()
                ),
            );
        }
    }
    match OpenOptions::new().append(true).open(path) {
        Ok(file) => {
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            Health::ok(format!(
                "{} opens for appending ({len} bytes) and {} accepts new files; nothing was written",
                path.display(),
                dir.display()
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Health::ok(format!(
            "{} accepts new files; {} will be created (mode 0640) by the first delivery",
            dir.display(),
            path.display()
        )),
        Err(e) => Health::fail(
            format!("cannot open {} for appending: {e}", path.display()),
            format!(
                "give the daemon's user write access to {}, or change the sink's path",
                path.display()
            ),
        ),
    }
}

/// Opens `path` for appending; returns whether this call created it.
fn open_append(path: &Path) -> std::io::Result<(File, bool)> {
    match OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(file) => Ok((file, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Ok((OpenOptions::new().append(true).open(path)?, false))
        }
        Err(e) => Err(e),
    }
}

/// A process killed in the middle of a write can leave a partial last line. Its delivery was
/// never recorded, so it is sent again; cut the fragment off so every line stays a whole JSON
/// envelope. Returns how many bytes were removed.
fn repair_torn_tail(path: &Path) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let mut end = len;
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let buf = &mut chunk[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(buf)?;
        if let Some(pos) = buf.iter().rposition(|b| *b == b'\n') {
            end = start + pos as u64 + 1;
            break;
        }
        end = start;
    }
    if end == len {
        return Ok(0);
    }
    file.set_len(end)?;
    file.sync_data()?;
    tracing::warn!(path = %path.display(), removed_bytes = len - end, "removed a partial last line left by an interrupted write");
    Ok(len - end)
}

/// Appends `buf` and syncs; on failure cuts the file back to where it was.
fn append_synced(path: &Path, buf: &[u8]) -> std::io::Result<()> {
    let (mut file, created) = open_append(path)?;
    let before = file.metadata()?.len();
    let written = file.write_all(buf).and_then(|()| file.sync_data());
    if let Err(e) = written {
        // Best effort: a half-written line would corrupt the file for its readers.
        let _ = file.set_len(before);
        return Err(e);
    }
    if created {
        // A new file's directory entry must be durable too.
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
    }
    Ok(())
}

impl Sink for FileSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    fn deliver<'a>(&'a self, batch: &'a [Envelope]) -> BoxFuture<'a, Vec<SinkResult>> {
        Box::pin(async move {
            if batch.is_empty() {
                return Vec::new();
            }
            let mut buf = Vec::with_capacity(batch.len() * 512);
            for envelope in batch {
                buf.extend_from_slice(envelope.to_json_line().as_bytes());
                buf.push(b'\n');
            }
            let path = self.path.clone();
            let lock = Arc::clone(&self.lock);
            let task = tokio::task::spawn_blocking(move || {
                let mut tail_checked = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if !*tail_checked {
                    repair_torn_tail(&path)?;
                    *tail_checked = true;
                }
                append_synced(&path, &buf)
            });

            let error = match tokio::time::timeout(self.timeout, task).await {
                Ok(Ok(Ok(()))) => return vec![SinkResult::Delivered; batch.len()],
                Ok(Ok(Err(e))) => format!("cannot append to {}: {e}", self.path.display()),
                Ok(Err(join)) => format!("write task failed: {join}"),
                Err(_) => format!(
                    "append to {} took longer than {}",
                    self.path.display(),
                    humantime::format_duration(self.timeout)
                ),
            };
            tracing::warn!(sink = %self.name, path = %self.path.display(), events = batch.len(), error = %error, "file sink write failed");
            vec![SinkResult::Retry { error, after: None }; batch.len()]
        })
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            let path = self.path.clone();
            let check = tokio::task::spawn_blocking(move || check_writable(&path));
            match tokio::time::timeout(self.timeout, check).await {
                Ok(Ok(health)) => health,
                Ok(Err(join)) => Health::fail(
                    format!("the check of {} failed: {join}", self.path.display()),
                    "run doctor again",
                ),
                Err(_) => Health::fail(
                    format!(
                        "checking {} took longer than {}",
                        self.path.display(),
                        humantime::format_duration(self.timeout)
                    ),
                    "check the file system (a hung network mount?)",
                ),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::{RetryPolicy, SinkKind};
    use std::os::unix::fs::PermissionsExt;

    fn envelope(n: i64) -> Envelope {
        let mut e = Envelope::sample(n);
        e.data = serde_json::json!({"FIELDS": {"ID": n.to_string()}, "text": "line\nbreak"});
        e.additional = serde_json::Value::Null;
        e
    }

    fn sink_config(path: &Path) -> (SinkConfig, FileSinkConfig) {
        let file = FileSinkConfig {
            path: path.to_path_buf(),
        };
        let config = SinkConfig {
            name: "archive".into(),
            route: Default::default(),
            timeout: Duration::from_secs(10),
            concurrency: 1,
            retry: RetryPolicy {
                max_attempts: 3,
                initial_backoff: Duration::from_secs(1),
                max_backoff: Duration::from_secs(5),
            },
            kind: SinkKind::File(file.clone()),
        };
        (config, file)
    }

    #[tokio::test]
    async fn writes_one_parseable_line_per_envelope() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let (config, file) = sink_config(&path);
        let sink = FileSink::new(&config, &file).unwrap();
        assert_eq!(sink.name(), "archive");
        assert_eq!(sink.max_batch(), 500);
        assert!(!path.exists(), "building the sink writes nothing");

        let first: Vec<Envelope> = (1..=3).map(envelope).collect();
        let second: Vec<Envelope> = (4..=10).map(envelope).collect();
        assert_eq!(sink.deliver(&first).await, vec![SinkResult::Delivered; 3]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o640, 0, "mode {mode:o} must not exceed 0640");
        assert_eq!(sink.deliver(&second).await, vec![SinkResult::Delivered; 7]);
        assert!(sink.deliver(&[]).await.is_empty());

        let text = std::fs::read_to_string(&path).unwrap();
        let back: Vec<Envelope> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let expected: Vec<Envelope> = first.into_iter().chain(second).collect();
        assert_eq!(back, expected);
        assert!(text.ends_with('\n'));
    }

    #[tokio::test]
    async fn recreates_a_removed_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let (config, file) = sink_config(&path);
        let sink = FileSink::new(&config, &file).unwrap();
        assert_eq!(
            sink.deliver(&[envelope(0)]).await,
            vec![SinkResult::Delivered]
        );
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            sink.deliver(&[envelope(1)]).await,
            vec![SinkResult::Delivered]
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    #[test]
    fn missing_directory_is_a_build_error() {
        let (config, file) = sink_config(Path::new("/nonexistent-b24eventd-dir/events.jsonl"));
        let err = FileSink::new(&config, &file)
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains("/nonexistent-b24eventd-dir"), "{err}");
        assert!(err.contains("does not exist"), "{err}");
        assert!(err.contains("archive"), "{err}");
    }

    #[tokio::test]
    async fn io_errors_retry_every_envelope() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let path = sub.join("events.jsonl");
        let (config, file) = sink_config(&path);
        let sink = FileSink::new(&config, &file).unwrap();
        // The directory disappears after build: every envelope of the batch is retried.
        std::fs::remove_dir_all(&sub).unwrap();
        let results = sink.deliver(&[envelope(1), envelope(2)]).await;
        assert_eq!(results.len(), 2);
        for r in results {
            match r {
                SinkResult::Retry { error, after: None } => {
                    assert!(error.contains("events.jsonl"), "{error}")
                }
                other => panic!("expected retry, got {other:?}"),
            }
        }
    }

    #[test]
    fn write_errors_surface() {
        // /dev/full accepts opens and fails every write with ENOSPC.
        let full = Path::new("/dev/full");
        if !full.exists() {
            return;
        }
        let err = append_synced(full, b"{\"id\":1}\n").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(28));
    }

    #[tokio::test]
    async fn a_torn_line_is_cut_off_by_the_first_delivery_not_by_the_build() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.jsonl");
        std::fs::write(&path, b"{\"id\":\"a\"}\n{\"id\":\"b").unwrap();
        let (config, file) = sink_config(&path);
        let sink = FileSink::new(&config, &file).unwrap();
        assert_eq!(sink.health().await.level, crate::sinks::HealthLevel::Ok);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"{\"id\":\"a\"}\n{\"id\":\"b",
            "build and healthcheck leave the file alone"
        );
        assert_eq!(
            sink.deliver(&[envelope(1)]).await,
            vec![SinkResult::Delivered]
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0], "{\"id\":\"a\"}");
        let second: Envelope = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second.offline_id, 1);
    }

    #[tokio::test]
    async fn healthcheck_reports_without_writing() {
        use crate::sinks::HealthLevel;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let (config, file) = sink_config(&path);
        let sink = FileSink::new(&config, &file).unwrap();
        let health = sink.health().await;
        assert_eq!(health.level, HealthLevel::Ok, "{health:?}");
        assert!(health.detail.contains("will be created"), "{health:?}");
        assert!(!path.exists(), "the check creates no event file");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the probe file is removed"
        );
        std::fs::write(&path, b"{}\n").unwrap();
        let health = sink.health().await;
        assert_eq!(health.level, HealthLevel::Ok);
        assert!(health.detail.contains("3 bytes"), "{health:?}");
        assert_eq!(std::fs::read(&path).unwrap(), b"{}\n");

        // A directory that is gone, and a path that cannot be appended to.
        let (config, file) = sink_config(&dir.path().join("sub/events.jsonl"));
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let sink = FileSink::new(&config, &file).unwrap();
        std::fs::remove_dir(dir.path().join("sub")).unwrap();
        let health = sink.health().await;
        assert_eq!(health.level, HealthLevel::Fail);
        assert!(health.detail.contains("does not exist"), "{health:?}");
        assert!(health.fix.is_some_and(|f| f.contains("create")));

        let (config, file) = sink_config(dir.path());
        assert!(
            FileSink::new(&config, &file).is_err(),
            "a directory as the file is a build error"
        );
    }

    #[test]
    fn a_torn_last_line_is_cut_off_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.jsonl");
        std::fs::write(&path, b"{\"id\":\"a\"}\n{\"id\":\"b\"}\n{\"id\":\"c").unwrap();
        assert_eq!(repair_torn_tail(&path).unwrap(), 8);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"{\"id\":\"a\"}\n{\"id\":\"b\"}\n"
        );
        assert_eq!(
            repair_torn_tail(&path).unwrap(),
            0,
            "a whole file is left alone"
        );
        std::fs::write(&path, b"no newline at all").unwrap();
        assert_eq!(repair_torn_tail(&path).unwrap(), 17);
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        assert_eq!(repair_torn_tail(&dir.path().join("missing")).unwrap(), 0);
    }
}
