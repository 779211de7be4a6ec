//! The instance lock of a PostgreSQL journal: a session advisory lock, shared by the daemons
//! of a cluster and exclusive for the conformance probe, on a connection of its own that a
//! watch task keeps: when that connection ends (a server restart, a broken network), the
//! server has released the lock with it, so the task says so (log, `/readyz`) and takes the
//! lock again as soon as the server answers. Without it a daemon would run on without the lock
//! after a restart, and the probe, which takes it exclusively, could start beside it.

use super::PgJournal;
use std::sync::Mutex;
use std::time::Duration;

/// The first key of the session advisory lock; the second is `hashtext(schema)`, so journals
/// in other schemas of the same database (advisory locks are per database) are not locked
/// with it.
const INSTANCE_LOCK: i32 = 0x6232_3464; // "b24d"
/// How often the watch task looks at the lock's connection (a look costs nothing: it asks
/// whether the driver's connection task has ended, no round trip).
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How often a lost lock is tried again, and how long one try may take (a connection to a
/// server that accepts and never answers must not stall the retries).
const RETAKE_EVERY: Duration = Duration::from_secs(1);
const RETAKE_WITHIN: Duration = Duration::from_secs(10);

/// Since when, and why, the instance lock is not held (`None` while it is).
#[derive(Default)]
pub(super) struct LockHealth {
    lost: Mutex<Option<Lost>>,
}

struct Lost {
    since: tokio::time::Instant,
    /// The mode the lock is held in, for the reason text.
    shared: bool,
    /// The last failed attempt to take it again, if any.
    last_error: Option<String>,
}

impl LockHealth {
    fn set_lost(&self, shared: bool) {
        *self.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(Lost {
            since: tokio::time::Instant::now(),
            shared,
            last_error: None,
        });
    }

    fn retake_failed(&self, error: String) {
        if let Some(lost) = self.lost.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            lost.last_error = Some(error);
        }
    }

    /// Clears the loss; how long it lasted.
    fn taken(&self) -> Option<Duration> {
        self.lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .map(|lost| lost.since.elapsed())
    }

    /// Why the lock is not held, or `None` when it is.
    pub(super) fn problem(&self) -> Option<String> {
        let lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        let lost = lost.as_ref()?;
        let keeps_out = if lost.shared {
            "`doctor --conformance` is not kept out meanwhile"
        } else {
            "the daemons are not kept out meanwhile"
        };
        Some(format!(
            "the instance lock was lost with its connection {} s ago and is not taken again yet ({keeps_out}){}",
            lost.since.elapsed().as_secs(),
            lost.last_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ))
    }
}

/// Held while a daemon (or the conformance probe) works on a PostgreSQL journal. PostgreSQL
/// releases the lock when its connection ends, however the holder ends (SIGKILL, a lost
/// network included); dropping this ends the watch task, and with it the connection.
pub(crate) struct InstanceLock {
    watch: tokio::task::JoinHandle<()>,
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

impl PgJournal {
    /// Takes the instance lock without waiting: `shared` (the daemons of a cluster, which
    /// only exclude the conformance probe) or exclusive (the probe); refused while another
    /// process holds it in a mode that conflicts. Once taken, it is watched and taken again
    /// after its connection ended.
    pub(in crate::journal) async fn lock_instance(
        &self,
        shared: bool,
    ) -> anyhow::Result<InstanceLock> {
        let location = self.inner.location.display().to_string();
        let schema = self.inner.schema.clone();
        let conn = {
            let (location, schema) = (location.clone(), schema.clone());
            self.run(move |conn| async move {
                take(
                    deadpool_postgres::Object::take(conn),
                    &location,
                    &schema,
                    shared,
                )
                .await
            })
            .await?
        };
        let health = self.inner.lock_health.clone();
        let _ = health.taken();
        let pool = self.inner.pool.clone();
        let connect_timeout = self.inner.connect_timeout;
        let watch = self.inner.handle.spawn(async move {
            keep(
                conn,
                pool,
                connect_timeout,
                &location,
                &schema,
                shared,
                &health,
            )
            .await;
        });
        Ok(InstanceLock { watch })
    }

    /// Why the instance lock is not held now (lost with its connection, not taken again
    /// yet), or `None`.
    pub(in crate::journal) fn instance_lock_problem(&self) -> Option<String> {
        self.inner.lock_health.problem()
    }
}

/// Holds the lock on `conn` for ever: when the connection ends, marks the lock lost and takes
/// it again on a new connection, trying every [`RETAKE_EVERY`].
async fn keep(
    mut conn: deadpool_postgres::ClientWrapper,
    pool: deadpool_postgres::Pool,
    connect_timeout: Duration,
    location: &str,
    schema: &str,
    shared: bool,
    health: &LockHealth,
) {
    let mode = if shared { "shared" } else { "exclusive" };
    loop {
        while !conn.is_closed() {
            tokio::time::sleep(WATCH_EVERY).await;
        }
        health.set_lost(shared);
        tracing::warn!(
            journal = %location,
            mode,
            "journal instance lock lost: its connection ended (server restart or network); taking it again"
        );
        let mut attempts = 0u32;
        conn = loop {
            attempts += 1;
            let attempt = async {
                let conn = pool.get().await.map_err(|e| {
                    anyhow::anyhow!(
                        "journal {location}: no connection: {}",
                        super::describe_pool_error(&e, connect_timeout)
                    )
                })?;
                take(
                    deadpool_postgres::Object::take(conn),
                    location,
                    schema,
                    shared,
                )
                .await
            };
            let error = match tokio::time::timeout(RETAKE_WITHIN, attempt).await {
                Ok(Ok(conn)) => break conn,
                Ok(Err(e)) => format!("{e:#}"),
                Err(_) => format!(
                    "journal {location}: no answer within {RETAKE_WITHIN:?} while taking the instance lock"
                ),
            };
            // Every few seconds at most: the server may be down for long.
            if attempts % 10 == 1 {
                tracing::warn!(journal = %location, mode, attempts, error = %error, "journal instance lock not taken again yet; trying every second");
            }
            health.retake_failed(error);
            tokio::time::sleep(RETAKE_EVERY).await;
        };
        let lost_for = health.taken().unwrap_or_default();
        tracing::info!(
            journal = %location,
            mode,
            attempts,
            lost_for = ?lost_for,
            "journal instance lock taken again"
        );
    }
}

/// Takes the lock on `conn` (out of the pool) without waiting; refused, naming the holder
/// when the server tells, while another process holds it in a mode that conflicts.
async fn take(
    conn: deadpool_postgres::ClientWrapper,
    location: &str,
    schema: &str,
    shared: bool,
) -> anyhow::Result<deadpool_postgres::ClientWrapper> {
    let take = if shared {
        "SELECT pg_try_advisory_lock_shared($1, hashtext($2))"
    } else {
        "SELECT pg_try_advisory_lock($1, hashtext($2))"
    };
    let taken: bool = conn
        .query_one(take, &[&INSTANCE_LOCK, &schema])
        .await?
        .get(0);
    if !taken {
        let holder: Option<String> = conn
            .query_opt(
                "SELECT a.application_name || ', connected from ' || COALESCE(host(a.client_addr), 'the local socket')
                 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND l.classid = $1::int4::oid AND l.objid = hashtext($2::text)::oid
                 LIMIT 1",
                &[&INSTANCE_LOCK, &schema],
            )
            .await
            .ok()
            .flatten()
            .map(|row| row.get(0));
        anyhow::bail!(
            "journal {location} is in use by another b24eventd process ({}): stop it first",
            holder.as_deref().unwrap_or("holder unknown")
        );
    }
    // Named for whoever finds the lock held: this process and its host.
    conn.query_one(
        "SELECT set_config('application_name', $1, false)",
        &[&instance_name()],
    )
    .await?;
    Ok(conn)
}

/// How this process names itself to PostgreSQL on the lock's connection:
/// `b24eventd pid 1234 on host`.
fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown host".into());
    format!("b24eventd pid {} on {host}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PostgresJournalConfig;
    use crate::journal::JournalBackend;
    use crate::journal::test_support::{DEFAULT_TEST_URL, postgres_url, unique_schema};
    use crate::journal::types::Access;

    /// The backends holding the instance lock of `schema` (granted), by mode.
    fn holders(journal: &PgJournal, schema: &str) -> Vec<(i64, String)> {
        journal
            .sql_rows(&format!(
                "SELECT pid, mode FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND classid = {INSTANCE_LOCK}::int4::oid AND objid = hashtext('{schema}')::oid"
            ))
            .unwrap()
            .iter()
            .map(|row| {
                (
                    row["pid"].as_i64().unwrap(),
                    row["mode"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test)"]
    async fn a_lock_whose_connection_ended_is_taken_again() {
        let config = PostgresJournalConfig {
            url: postgres_url().unwrap_or_else(|| DEFAULT_TEST_URL.to_string()),
            schema: unique_schema(),
            max_connections: 2,
        };
        let connect = |access| {
            let config = config.clone();
            tokio::task::spawn_blocking(move || PgJournal::connect(&config, access))
        };
        let daemon = connect(Access::Create).await.unwrap().unwrap();
        let probe = connect(Access::Write).await.unwrap().unwrap();
        let _held = daemon.lock_instance(true).await.unwrap();
        let look = {
            let (probe, schema) = (probe.clone(), config.schema.clone());
            move || {
                let (probe, schema) = (probe.clone(), schema.clone());
                tokio::task::spawn_blocking(move || holders(&probe, &schema))
            }
        };
        let before = look().await.unwrap();
        assert_eq!(before.len(), 1, "{before:?}");
        assert_eq!(before[0].1, "ShareLock");
        assert!(daemon.instance_lock_problem().is_none());
        // The server ends the lock's session, as a restart does: the lock goes with it.
        let pid = before[0].0;
        let terminated = {
            let probe = probe.clone();
            tokio::task::spawn_blocking(move || {
                probe.sql_rows(&format!("SELECT pg_terminate_backend({pid}) AS done"))
            })
        };
        assert_eq!(terminated.await.unwrap().unwrap()[0]["done"], true);
        let ended = std::time::Instant::now();
        let again = loop {
            let now = look().await.unwrap();
            if now.len() == 1 && now[0].0 != pid {
                break now;
            }
            assert!(
                ended.elapsed() < WATCH_EVERY * 3,
                "the lock is not taken again within {:?}: {now:?}",
                WATCH_EVERY * 3
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(again[0].1, "ShareLock");
        assert!(daemon.instance_lock_problem().is_none());
        // Held again: the probe's exclusive lock is refused as before the loss.
        let refused = probe.lock_instance(false).await.err().unwrap().to_string();
        assert!(
            refused.contains("in use by another b24eventd process"),
            "{refused}"
        );
        tokio::task::spawn_blocking(move || {
            probe
                .sql_execute(&format!("DROP SCHEMA {} CASCADE", config.schema))
                .unwrap()
        })
        .await
        .unwrap();
    }

    #[test]
    fn a_lost_lock_is_a_problem_until_it_is_taken_again() {
        let health = LockHealth::default();
        assert_eq!(health.problem(), None);
        health.set_lost(true);
        let problem = health.problem().unwrap();
        assert!(
            problem.contains("instance lock was lost") && problem.contains("doctor --conformance"),
            "{problem}"
        );
        health.retake_failed("journal x: no connection: refused".into());
        assert!(
            health
                .problem()
                .unwrap()
                .ends_with(": journal x: no connection: refused")
        );
        assert!(health.taken().is_some());
        assert_eq!(health.problem(), None);
        assert_eq!(health.taken(), None);
    }
}
