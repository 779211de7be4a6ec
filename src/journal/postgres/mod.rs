//! The PostgreSQL backend: the journal in one schema of a PostgreSQL database, shared by every
//! instance configured with the same `[journal] url` and `schema`. Connections come from a
//! bounded pool (`deadpool-postgres`) that replaces a broken connection on the next call, so
//! the journal recovers by itself after a server restart (the lease task's statements have a
//! pool of one connection to themselves). The pools and the driver's
//! connection tasks run on a small runtime of the journal's own, so the same handle serves the
//! daemon (async) and the operator commands (blocking, without a runtime of their own). The SQL
//! lives in one file per concern, as in the SQLite backend; this file connects, migrates and
//! maps [`JournalBackend`] (which documents each operation) onto them.

mod batches;
mod conformance;
pub(crate) mod deliveries;
mod enrichment;
pub(crate) mod fence;
pub(super) mod import;
mod inspect;
mod instance_lock;
pub(crate) mod lease;
mod lease_changes;
mod planner_stats;
mod schema;
mod settlements;
mod status;
mod tokens;

pub(crate) use instance_lock::InstanceLock;
pub(crate) use schema::SCHEMA_VERSION;

use super::backend::JournalBackend;
use super::inspect::{EventDetail, EventFilter, EventRow, PortalStats, Pruned, Requeued};
use super::types::{
    Access, DueDelivery, Enriched, JournalCounts, NewBatch, OpenBatch, Outcome, PendingEnrichment,
    PendingSettlement, RecordedBatch, SettleAction, StatusData, StoredFinding, TokenStatus,
};
use crate::BoxFuture;
use crate::bitrix::Tokens;
use crate::config::PostgresJournalConfig;
use crate::pg::{Tls, connect_config, tls_connector};
use anyhow::Context;
use chrono::{DateTime, Utc};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A pooled connection, as the SQL functions take it.
pub(super) type Conn = deadpool_postgres::Client;

/// How long a call waits for a free connection of the pool.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// How long a new connection may take, from the TCP connect to the end of the start-up
/// handshake, unless the journal URL sets `connect_timeout` (seconds): a server that accepts
/// and never answers (a blackholed route) is given up after it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest deadline of a daemon's journal operation (see [`operation_deadline`]).
const MIN_OPERATION_DEADLINE: Duration = Duration::from_secs(10);
/// The kernel's limits on a journal connection whose peer stopped answering (a network cut
/// where no reset comes back): an idle connection is probed after `KEEPALIVE_IDLE`, then every
/// `KEEPALIVE_INTERVAL`, and closed after `KEEPALIVE_RETRIES` unanswered probes; data unacknowledged
/// for `TCP_USER_TIMEOUT` closes it too. Without them a dead connection lingers for hours (Linux's
/// defaults: keepalives after 2 h, retransmissions for about 15 min).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server lets a journal connection sit in an open transaction without a
/// statement before it ends the session (see `connect`).
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(5);

/// The PostgreSQL journal; cheap to clone.
#[derive(Clone)]
pub(super) struct PgJournal {
    inner: Arc<Inner>,
    /// Whether this handle's operations take the lease task's connection
    /// (`Inner::lease_pool`, see [`PgJournal::lease_table`]) instead of the pool's.
    lease_connection: bool,
}

struct Inner {
    pool: deadpool_postgres::Pool,
    /// One connection for the lease task's statements alone: a heartbeat never queues for a
    /// connection behind the pipeline's writes (a busy instance's pool has dozens of callers
    /// waiting; a renewal that waits past its lease's clock self-fences every portal held).
    lease_pool: deadpool_postgres::Pool,
    /// The runtime the pool's connections live on; shut down (without waiting) on drop.
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
    /// The URL without its password, and the schema: `postgres://user@host:5432/db#schema`.
    location: PathBuf,
    schema: String,
    /// Set once when the daemon joins a cluster: every write for a portal is then checked
    /// against the portal's lease, and the dispatchers see only the portals held.
    fence: std::sync::OnceLock<Arc<fence::Fence>>,
    /// Set when the daemon joins a cluster: how long one operation (a connection from the pool
    /// and its statements) may take before it is abandoned (see [`operation_deadline`]). The
    /// operator commands have none: a prune or an import may rightly take long.
    deadline: std::sync::OnceLock<Duration>,
    /// Whether the instance lock, when this handle took it, is held (its watch task sets it).
    lock_health: Arc<instance_lock::LockHealth>,
    /// How long a new connection may take (see [`CONNECT_TIMEOUT`]), for the errors.
    connect_timeout: Duration,
    /// The pool's connection settings and encryption, for the lease-change listener's own
    /// connection.
    listen: (tokio_postgres::Config, Tls),
    /// When the tables' planner statistics are next refreshed (see `planner_stats`).
    analyze: Arc<planner_stats::AnalyzeSchedule>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(runtime) = self
            .runtime
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            runtime.shutdown_background();
        }
    }
}

/// A pool of at most `size` connections with `pg`'s settings (connected on first use).
fn build_pool(
    pg: &tokio_postgres::Config,
    tls: Tls,
    size: usize,
    connect_timeout: Duration,
    location: &Path,
) -> anyhow::Result<deadpool_postgres::Pool> {
    let manager_config = deadpool_postgres::ManagerConfig {
        recycling_method: deadpool_postgres::RecyclingMethod::Fast,
    };
    let manager = match tls {
        Tls::Off => deadpool_postgres::Manager::from_config(
            pg.clone(),
            tokio_postgres::NoTls,
            manager_config,
        ),
        Tls::Prefer | Tls::Require => deadpool_postgres::Manager::from_config(
            pg.clone(),
            tls_connector().map_err(|e| anyhow::anyhow!("journal {}: {e}", location.display()))?,
            manager_config,
        ),
    };
    deadpool_postgres::Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(connect_timeout))
        .recycle_timeout(Some(connect_timeout))
        .build()
        .context("cannot build the journal's connection pool")
}

impl PgJournal {
    /// Connects, and as `access` allows: [`Access::Create`] creates the schema if missing and
    /// migrates it; [`Access::Write`] migrates an existing journal; [`Access::Read`] needs the
    /// journal at this build's schema version. A missing journal is a [`NoJournal`]. Blocking
    /// (it waits on the journal's own runtime).
    pub(super) fn connect(
        config: &PostgresJournalConfig,
        access: Access,
    ) -> anyhow::Result<PgJournal> {
        let location = PathBuf::from(format!(
            "{}#{}",
            crate::options::redact_url(&config.url),
            config.schema
        ));
        let (mut pg, tls) =
            connect_config(&config.url).map_err(|e| anyhow::anyhow!("journal url: {e}"))?;
        // The driver bounds only the TCP connect with it; the pool's create timeout bounds the
        // handshake too.
        let connect_timeout = pg
            .get_connect_timeout()
            .copied()
            .filter(|t| !t.is_zero())
            .unwrap_or(CONNECT_TIMEOUT);
        pg.connect_timeout(connect_timeout)
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES)
            .tcp_user_timeout(TCP_USER_TIMEOUT);
        // Every pooled connection works in the journal's schema, and keeps the server's notices
        // below warnings (`CREATE SCHEMA IF NOT EXISTS` and the like) out of the log. A
        // transaction left open by a paused process (SIGSTOP, a VM frozen) would hold its row
        // locks, a fenced write's lease rows among them, for as long as the pause: the server
        // ends such a session instead. No journal transaction waits on its client between
        // statements for anywhere near that long.
        pg.options(format!(
            "-c search_path={} -c client_min_messages=warning -c idle_in_transaction_session_timeout={}",
            config.schema,
            IDLE_IN_TRANSACTION.as_millis()
        ));
        let listen = (pg.clone(), tls);
        let pool = build_pool(&pg, tls, config.max_connections, connect_timeout, &location)?;
        let lease_pool = build_pool(&pg, tls, 1, connect_timeout, &location)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("journal-pg")
            .enable_all()
            .build()
            .context("cannot start the journal's runtime")?;
        let journal = PgJournal {
            lease_connection: false,
            inner: Arc::new(Inner {
                pool,
                lease_pool,
                handle: runtime.handle().clone(),
                runtime: Mutex::new(Some(runtime)),
                location,
                schema: config.schema.clone(),
                fence: std::sync::OnceLock::new(),
                deadline: std::sync::OnceLock::new(),
                lock_health: Arc::default(),
                connect_timeout,
                listen,
                analyze: Arc::default(),
            }),
        };
        let schema = config.schema.clone();
        let location_text = journal.inner.location.display().to_string();
        journal
            .block(journal.run(move |mut conn| async move {
                match access {
                    Access::Create => schema::migrate(&mut conn, &schema).await,
                    // A command that changes the journal needs one: a typo in the schema must
                    // not make an empty journal.
                    Access::Write => {
                        if schema::version(&conn, &schema).await? == 0 {
                            return Err(NoJournal { location: location_text }.into());
                        }
                        schema::migrate(&mut conn, &schema).await
                    }
                    Access::Read => {
                        let version = schema::version(&conn, &schema).await?;
                        if version == 0 {
                            return Err(NoJournal { location: location_text }.into());
                        }
                        if version != SCHEMA_VERSION {
                            anyhow::bail!(
                                "journal schema version {version} is not this build's ({SCHEMA_VERSION}): {}",
                                if version > SCHEMA_VERSION {
                                    "upgrade b24eventd"
                                } else {
                                    "start the daemon once to migrate it"
                                }
                            );
                        }
                        Ok(())
                    }
                }
            }))
            .map_err(|e| {
                // A pool error names the journal already: said once.
                let named = format!("journal {}: ", journal.inner.location.display());
                if e.to_string().starts_with(&named) {
                    anyhow::anyhow!("cannot open {e:#}")
                } else {
                    e.context(format!("cannot open {}", named.trim_end_matches(": ")))
                }
            })?;
        Ok(journal)
    }

    /// Runs `f` with a pooled connection on the journal's runtime, within the operation
    /// deadline when one is set. An operation past its deadline is dropped with its connection,
    /// and every idle connection is closed with it: a server or network that stopped answering
    /// (a blackholed route) leaves every open connection hanging, and the next call should
    /// connect anew rather than queue behind one of them.
    fn run<R, F, Fut>(&self, f: F) -> BoxFuture<'static, anyhow::Result<R>>
    where
        F: FnOnce(Conn) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<R>> + Send + 'static,
        R: Send + 'static,
    {
        self.run_within(self.inner.deadline.get().copied(), f)
    }

    /// [`PgJournal::run`] within `deadline` (`None`: none).
    fn run_within<R, F, Fut>(
        &self,
        deadline: Option<Duration>,
        f: F,
    ) -> BoxFuture<'static, anyhow::Result<R>>
    where
        F: FnOnce(Conn) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<R>> + Send + 'static,
        R: Send + 'static,
    {
        let pool = if self.lease_connection {
            self.inner.lease_pool.clone()
        } else {
            self.inner.pool.clone()
        };
        let handle = self.inner.handle.clone();
        let location = self.inner.location.clone();
        let connect_timeout = self.inner.connect_timeout;
        Box::pin(async move {
            handle
                .spawn(async move {
                    let operation = {
                        let (pool, location) = (pool.clone(), location.clone());
                        async move {
                            let conn = pool.get().await.map_err(|e| {
                                anyhow::anyhow!(
                                    "journal {}: no connection: {}",
                                    location.display(),
                                    describe_pool_error(&e, connect_timeout)
                                )
                            })?;
                            f(conn).await
                        }
                    };
                    let Some(deadline) = deadline else {
                        return operation.await;
                    };
                    // The operation (and its connection, back to the pool) is dropped at the
                    // end of this statement, before the pool is emptied below.
                    let outcome = tokio::time::timeout(deadline, operation).await;
                    outcome.unwrap_or_else(|_| {
                        let closed = pool.retain(|_, _| false).removed.len();
                        tracing::warn!(
                            journal = %location.display(),
                            deadline = ?deadline,
                            closed,
                            "journal operation abandoned at its deadline: idle connections closed"
                        );
                        Err(anyhow::anyhow!(
                            "journal {}: no answer within {deadline:?} (the server, or the network to it, is down or overloaded)",
                            location.display()
                        ))
                    })
                })
                .await
                .context("journal task ended")?
        })
    }

    /// Starts an `ANALYZE` of the journal's tables, without waiting for it, when the `events`
    /// just written make one due (see `planner_stats`).
    fn analyze_when_due(&self, events: u64) {
        let Some(due) = self.inner.analyze.wrote(events) else {
            return;
        };
        let schema = self.inner.schema.clone();
        let analyzing =
            self.run(move |conn| async move { planner_stats::analyze(&conn, &schema).await });
        let (schedule, location) = (self.inner.analyze.clone(), self.inner.location.clone());
        self.inner.handle.spawn(async move {
            let started = std::time::Instant::now();
            let rows = match analyzing.await {
                Ok(rows) => {
                    tracing::debug!(
                        journal = %location.display(),
                        events = rows,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "journal tables analyzed"
                    );
                    Some(rows)
                }
                Err(e) => {
                    tracing::warn!(
                        journal = %location.display(),
                        error = %format!("{e:#}"),
                        "cannot analyze the journal's tables: the server plans its statements for their size at the last ANALYZE"
                    );
                    None
                }
            };
            schedule.finished(due, rows);
        });
    }

    /// Waits for `call` on the calling thread: the operator commands, which have no runtime.
    fn block<R: Send + 'static>(
        &self,
        call: BoxFuture<'static, anyhow::Result<R>>,
    ) -> anyhow::Result<R> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.inner.handle.spawn(async move {
            let _ = tx.send(call.await);
        });
        rx.recv().context("journal task ended")?
    }
}

/// No journal in the configured schema yet (a command that only looks finds nothing).
#[derive(Debug, thiserror::Error)]
#[error(
    "there is no journal in {location} yet: start `b24eventd run`, or run `b24eventd auth login`, to create it"
)]
pub(crate) struct NoJournal {
    location: String,
}

/// The lease table of a shared journal, for the instance's lease task and `cluster status`.
#[derive(Clone)]
pub struct LeaseTable {
    journal: PgJournal,
}

impl LeaseTable {
    /// Notified when an instance joins, releases portals or retires (a `LISTEN` on a
    /// connection of its own; see `lease_changes`). Each call starts a listener.
    pub fn changes(&self) -> Arc<tokio::sync::Notify> {
        let inner = &self.journal.inner;
        lease_changes::watch(
            &inner.handle,
            inner.listen.0.clone(),
            inner.listen.1,
            inner.location.display().to_string(),
        )
    }

    /// Heartbeats `me` and renews the leases it holds; adds free rows for `portals` that have
    /// none. See [`lease::heartbeat`].
    pub async fn heartbeat(
        &self,
        me: &lease::InstanceIdentity,
        ttl: Duration,
        portals: &[String],
    ) -> anyhow::Result<BTreeMap<String, lease::HeldLease>> {
        let (me, portals) = (me.clone(), portals.to_vec());
        self.journal
            .run(move |mut conn| async move {
                lease::heartbeat(&mut conn, &me, ttl, &portals).await
            })
            .await
    }

    /// The live instances and the leases of `portals`.
    pub async fn view(
        &self,
        portals: &[String],
    ) -> anyhow::Result<(Vec<lease::InstanceRow>, Vec<lease::LeaseRow>)> {
        let portals = portals.to_vec();
        self.journal
            .run(move |conn| async move { lease::view(&conn, &portals).await })
            .await
    }

    /// Takes the free or expired leases among `portals`.
    pub async fn acquire(
        &self,
        me: &str,
        portals: &[String],
        ttl: Duration,
        grace: Duration,
    ) -> anyhow::Result<BTreeMap<String, lease::HeldLease>> {
        let (me, portals) = (me.to_string(), portals.to_vec());
        self.journal
            .run(move |conn| async move { lease::acquire(&conn, &me, &portals, ttl, grace).await })
            .await
    }

    /// Gives up `me`'s leases of `portals`.
    pub async fn release(&self, me: &str, portals: &[String]) -> anyhow::Result<u64> {
        let (me, portals) = (me.to_string(), portals.to_vec());
        self.journal
            .run(move |conn| async move { lease::release(&conn, &me, &portals).await })
            .await
    }

    /// Frees the leases of instance `dead` (its process is gone) and removes it.
    pub async fn reap(&self, dead: &str) -> anyhow::Result<u64> {
        let dead = dead.to_string();
        self.journal
            .run(move |conn| async move { lease::reap(&conn, &dead).await })
            .await
    }

    /// Removes `me` after a graceful stop.
    pub async fn retire(&self, me: &str) -> anyhow::Result<()> {
        let me = me.to_string();
        self.journal
            .run(move |conn| async move { lease::retire(&conn, &me).await })
            .await
    }

    /// Every instance (live or not) and every lease, for `cluster status`.
    pub async fn status(&self) -> anyhow::Result<(Vec<lease::InstanceRow>, Vec<lease::LeaseRow>)> {
        self.journal
            .run(|conn| async move {
                Ok((
                    lease::instances(&conn, false).await?,
                    lease::leases(&conn).await?,
                ))
            })
            .await
    }
}

impl PgJournal {
    /// Installs the fence of instance `me` (once; a second call activates the first fence
    /// again, holding nothing) and the deadline of every operation from now on
    /// ([`operation_deadline`] of `lease_ttl`).
    pub(super) fn join_cluster(&self, me: &str, lease_ttl: Duration) -> Arc<fence::Fence> {
        let _ = self.inner.deadline.set(operation_deadline(lease_ttl));
        let fence = self
            .inner
            .fence
            .get_or_init(|| Arc::new(fence::Fence::new(me)))
            .clone();
        fence.activate();
        fence
    }

    /// The fence, while this process runs clustered.
    fn fence(&self) -> Option<Arc<fence::Fence>> {
        self.inner.fence.get().filter(|f| f.active()).cloned()
    }

    /// The lease table, whose statements run on the lease task's own connection.
    pub(super) fn lease_table(&self) -> LeaseTable {
        LeaseTable {
            journal: PgJournal {
                inner: self.inner.clone(),
                lease_connection: true,
            },
        }
    }
}

/// How long one journal operation of a daemon may take: the lease TTL, 10 s at least. A write
/// for a portal that has not ended within a lease's lifetime is of no use any more (the lease
/// has moved, or its clock has stopped the portal's work), and a connection that gave no answer
/// for that long is taken as lost; a few seconds is too short for a loaded server.
pub(crate) fn operation_deadline(lease_ttl: Duration) -> Duration {
    lease_ttl.max(MIN_OPERATION_DEADLINE)
}

/// The pool's error without the connection string.
/// `connect_timeout` is how long a new connection may take.
fn describe_pool_error(e: &deadpool_postgres::PoolError, connect_timeout: Duration) -> String {
    use deadpool_postgres::{PoolError, TimeoutType};
    match e {
        PoolError::Backend(e) => describe(e),
        PoolError::Timeout(TimeoutType::Create | TimeoutType::Recycle) => format!(
            "the server did not answer within {connect_timeout:?} (connect_timeout): it is down or overloaded, or the network to it drops packets"
        ),
        PoolError::Timeout(TimeoutType::Wait) => {
            format!("every connection of the pool stayed busy for {POOL_WAIT:?}")
        }
        other => other.to_string(),
    }
}

/// A driver error with the server's message when there is one.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// `t` to the millisecond, as every time is stored: the SQLite journal keeps times as text with
/// milliseconds, and orders and compares them so (two retries due in the same millisecond are
/// due together, by row); PostgreSQL's microseconds would order them otherwise.
pub(super) fn millis(t: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::Timelike;
    t.with_nanosecond(t.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(t)
}

/// The time now, to the millisecond ([`millis`]).
pub(super) fn now() -> DateTime<Utc> {
    millis(Utc::now())
}

/// `ident` as a double-quoted SQL identifier.
pub(super) fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

impl JournalBackend for PgJournal {
    fn path(&self) -> &Path {
        &self.inner.location
    }

    fn location(&self) -> String {
        self.inner.location.display().to_string()
    }

    /// The tables and indexes of the journal's schema.
    fn size_bytes(&self) -> BoxFuture<'_, std::io::Result<u64>> {
        let schema = self.inner.schema.clone();
        let size = self.run(move |conn| async move {
            let row = conn
                .query_one(
                    "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0)::bigint
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = $1 AND c.relkind IN ('r', 'm')",
                    &[&schema],
                )
                .await?;
            Ok(row.get::<_, i64>(0).max(0) as u64)
        });
        Box::pin(async move { size.await.map_err(std::io::Error::other) })
    }

    fn ping(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        self.run(|conn| async move {
            conn.query_one("SELECT 1", &[]).await?;
            Ok(())
        })
    }

    fn load_tokens<'a>(&'a self, portal: &'a str) -> BoxFuture<'a, anyhow::Result<Option<Tokens>>> {
        let portal = portal.to_string();
        self.run(move |conn| async move { tokens::load_tokens(&conn, &portal).await })
    }

    fn save_tokens<'a>(
        &'a self,
        portal: &'a str,
        tokens: &'a Tokens,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        let portal = portal.to_string();
        let tokens = tokens.clone();
        let fence = self.fence();
        self.run(move |mut conn| async move {
            tokens::save_tokens(&mut conn, fence.as_deref(), &portal, &tokens).await
        })
    }

    fn token_status<'a>(
        &'a self,
        portal: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Option<TokenStatus>>> {
        let portal = portal.to_string();
        self.run(move |conn| async move { tokens::token_status(&conn, &portal).await })
    }

    fn record_batches(
        &self,
        batches: Vec<NewBatch>,
    ) -> BoxFuture<'_, anyhow::Result<Vec<RecordedBatch>>> {
        let fence = self.fence();
        let recording = self.run(move |mut conn| async move {
            batches::record_batches(&mut conn, fence.as_deref(), &batches).await
        });
        Box::pin(async move {
            let recorded = recording.await?;
            self.analyze_when_due(recorded.iter().map(|b| b.inserted as u64).sum());
            Ok(recorded)
        })
    }

    fn open_batches<'a>(
        &'a self,
        portal: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Vec<OpenBatch>>> {
        let portal = portal.to_string();
        self.run(move |conn| async move { batches::open_batches(&conn, &portal).await })
    }

    fn known_process_ids<'a>(
        &'a self,
        portal: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<HashMap<String, bool>>> {
        let portal = portal.to_string();
        self.run(move |conn| async move { batches::known_process_ids(&conn, &portal).await })
    }

    fn unsettled_count<'a>(&'a self, portal: &'a str) -> BoxFuture<'a, anyhow::Result<u64>> {
        let portal = portal.to_string();
        self.run(move |conn| async move { batches::unsettled_count(&conn, &portal).await })
    }

    fn undelivered_count<'a>(&'a self, portal: &'a str) -> BoxFuture<'a, anyhow::Result<u64>> {
        let portal = portal.to_string();
        self.run(move |conn| async move { batches::undelivered_count(&conn, &portal).await })
    }

    fn due_deliveries<'a>(
        &'a self,
        sink: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, anyhow::Result<Vec<DueDelivery>>> {
        let sink = sink.to_string();
        let portals = fence::visible(self.fence().as_deref());
        self.run(move |conn| async move {
            deliveries::due_deliveries(&conn, &sink, portals.as_deref(), Utc::now(), limit).await
        })
    }

    fn bring_forward<'a>(
        &'a self,
        sink: &'a str,
        latest: DateTime<Utc>,
    ) -> BoxFuture<'a, anyhow::Result<usize>> {
        let sink = sink.to_string();
        let portals = fence::visible(self.fence().as_deref());
        self.run(move |conn| async move {
            deliveries::bring_forward(&conn, &sink, portals.as_deref(), latest).await
        })
    }

    fn next_due<'a>(
        &'a self,
        sink: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Option<DateTime<Utc>>>> {
        let sink = sink.to_string();
        let portals = fence::visible(self.fence().as_deref());
        self.run(
            move |conn| async move { deliveries::next_due(&conn, &sink, portals.as_deref()).await },
        )
    }

    fn record_outcomes<'a>(
        &'a self,
        sink: &'a str,
        outcomes: Vec<(i64, Outcome, Option<String>)>,
    ) -> BoxFuture<'a, anyhow::Result<Vec<String>>> {
        let sink = sink.to_string();
        let fence = self.fence();
        self.run(move |mut conn| async move {
            deliveries::record_outcomes(&mut conn, fence.as_deref(), &sink, &outcomes).await
        })
    }

    fn drop_deliveries_to_unknown_sinks(
        &self,
        known: Vec<String>,
    ) -> BoxFuture<'_, anyhow::Result<Vec<(String, u64)>>> {
        let portals = fence::visible(self.fence().as_deref());
        self.run(move |mut conn| async move {
            deliveries::drop_unknown_sinks(&mut conn, portals.as_deref(), &known).await
        })
    }

    fn pending_settlements<'a>(
        &'a self,
        portal: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Vec<PendingSettlement>>> {
        let portal = portal.to_string();
        self.run(move |conn| async move { settlements::pending_settlements(&conn, &portal).await })
    }

    fn mark_settled_groups(
        &self,
        groups: Vec<(Vec<i64>, SettleAction)>,
    ) -> BoxFuture<'_, anyhow::Result<()>> {
        let fence = self.fence();
        self.run(move |mut conn| async move {
            settlements::mark_settled(&mut conn, fence.as_deref(), &groups).await
        })
    }

    fn pending_enrichment<'a>(
        &'a self,
        portal: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, anyhow::Result<Vec<PendingEnrichment>>> {
        let portal = portal.to_string();
        self.run(
            move |conn| async move { enrichment::pending_enrichment(&conn, &portal, limit).await },
        )
    }

    fn record_enrichment(&self, results: Vec<Enriched>) -> BoxFuture<'_, anyhow::Result<()>> {
        let fence = self.fence();
        self.run(move |mut conn| async move {
            enrichment::record_enrichment(&mut conn, fence.as_deref(), &results).await
        })
    }

    fn replace_conformance<'a>(
        &'a self,
        portal: &'a str,
        findings: Vec<StoredFinding>,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        let portal = portal.to_string();
        let fence = self.fence();
        self.run(move |mut conn| async move {
            conformance::replace_conformance(&mut conn, fence.as_deref(), &portal, &findings).await
        })
    }

    fn conformance<'a>(
        &'a self,
        portal: &'a str,
    ) -> BoxFuture<'a, anyhow::Result<Vec<StoredFinding>>> {
        let portal = portal.to_string();
        self.run(move |conn| async move { conformance::conformance(&conn, &portal).await })
    }

    fn events_since_row(
        &self,
        after: Option<i64>,
    ) -> BoxFuture<'_, anyhow::Result<(i64, BTreeMap<String, u64>)>> {
        self.run(move |conn| async move { status::events_since_row(&conn, after).await })
    }

    fn dead_attempts_since(
        &self,
        after: Option<i64>,
    ) -> BoxFuture<'_, anyhow::Result<(i64, u64, Vec<String>)>> {
        self.run(move |conn| async move { status::dead_attempts_since(&conn, after).await })
    }

    fn oldest_pending_fetched_at(&self) -> BoxFuture<'_, anyhow::Result<Option<DateTime<Utc>>>> {
        self.run(|conn| async move { status::oldest_pending_fetched_at(&conn).await })
    }

    fn counts(&self) -> BoxFuture<'_, anyhow::Result<JournalCounts>> {
        self.run(|conn| async move { status::counts(&conn).await })
    }

    fn counts_blocking(&self) -> anyhow::Result<JournalCounts> {
        self.block(self.run(|conn| async move { status::counts(&conn).await }))
    }

    fn status_data(
        &self,
        portals: Vec<String>,
        now: DateTime<Utc>,
    ) -> BoxFuture<'_, anyhow::Result<StatusData>> {
        self.run(move |conn| async move { status::status_data(&conn, &portals, now).await })
    }

    fn list_events(&self, filter: &EventFilter) -> anyhow::Result<Vec<EventRow>> {
        let filter = filter.clone();
        self.block(
            self.run(move |conn| async move { inspect::list_events(&conn, &filter, None).await }),
        )
    }

    fn events_after(&self, filter: &EventFilter, after: i64) -> anyhow::Result<Vec<EventRow>> {
        let filter = filter.clone();
        self.block(self.run(move |conn| async move {
            inspect::list_events(&conn, &filter, Some(after)).await
        }))
    }

    fn stats(&self, filter: &EventFilter) -> anyhow::Result<Vec<PortalStats>> {
        let filter = filter.clone();
        self.block(self.run(move |conn| async move { inspect::stats(&conn, &filter).await }))
    }

    fn show_event(&self, id: &str) -> anyhow::Result<Vec<EventDetail>> {
        let id = id.to_string();
        self.block(self.run(move |conn| async move { inspect::show_event(&conn, &id).await }))
    }

    fn replay(
        &self,
        filter: &EventFilter,
        only_sink: Option<&str>,
        known_sinks: &[String],
    ) -> anyhow::Result<Requeued> {
        let filter = filter.clone();
        let only_sink = only_sink.map(str::to_string);
        let known_sinks = known_sinks.to_vec();
        self.block(self.run(move |mut conn| async move {
            inspect::replay(&mut conn, &filter, only_sink.as_deref(), &known_sinks).await
        }))
    }

    fn retry_dead(&self, filter: &EventFilter, known_sinks: &[String]) -> anyhow::Result<Requeued> {
        let filter = filter.clone();
        let known_sinks = known_sinks.to_vec();
        self.block(self.run(move |mut conn| async move {
            inspect::retry_dead(&mut conn, &filter, &known_sinks).await
        }))
    }

    fn purge_dead(&self, filter: &EventFilter) -> anyhow::Result<Pruned> {
        let filter = filter.clone();
        self.block(
            self.run(move |mut conn| async move { inspect::purge_dead(&mut conn, &filter).await }),
        )
    }

    fn prune_blocking(&self, cutoff: DateTime<Utc>, include_dead: bool) -> anyhow::Result<Pruned> {
        self.block(self.run(move |mut conn| async move {
            inspect::prune(&mut conn, cutoff, include_dead).await
        }))
    }

    /// A PostgreSQL journal is copied with the database's own tools, which also keep what
    /// arrives while they run.
    fn backup_blocking(&self, _to: &Path) -> anyhow::Result<u64> {
        anyhow::bail!(
            "journal backup copies a SQLite journal; journal {} is in PostgreSQL: back it up with `pg_dump --schema={}` (or the database's own backups)",
            self.inner.location.display(),
            self.inner.schema
        )
    }

    /// Through `json_agg`, so every column type reads as JSON (`timestamptz` as ISO 8601).
    fn sql_rows(&self, sql: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let sql = format!("SELECT COALESCE(json_agg(q), '[]')::text FROM ({sql}) q");
        let text: String = self.block(
            self.run(move |conn| async move { Ok(conn.query_one(&sql, &[]).await?.get(0)) }),
        )?;
        Ok(serde_json::from_str(&text)?)
    }

    fn sql_execute(&self, sql: &str) -> anyhow::Result<u64> {
        let sql = sql.to_string();
        self.block(self.run(move |conn| async move { Ok(conn.execute(&sql, &[]).await?) }))
    }

    fn prune(
        &self,
        cutoff: DateTime<Utc>,
        include_dead: bool,
    ) -> BoxFuture<'_, anyhow::Result<Pruned>> {
        // Without the operation deadline: pruning a large journal may rightly take long (a
        // lost connection still ends at the kernel's limits, see `TCP_USER_TIMEOUT`).
        self.run_within(None, move |mut conn| async move {
            inspect::prune(&mut conn, cutoff, include_dead).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Journal;
    use crate::journal::test_support::{DEFAULT_TEST_URL, postgres_url, unique_schema};

    fn config() -> PostgresJournalConfig {
        // Asked for (`--include-ignored`) without the variable: the local server CI runs.
        let url = postgres_url().unwrap_or_else(|| DEFAULT_TEST_URL.to_string());
        PostgresJournalConfig {
            url,
            schema: unique_schema(),
            max_connections: 2,
        }
    }

    fn drop_schema(journal: &PgJournal, schema: &str) {
        journal
            .sql_execute(&format!("DROP SCHEMA {schema} CASCADE"))
            .unwrap();
    }

    #[test]
    #[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test)"]
    fn a_new_schema_is_created_migrated_once_and_read_back() {
        let config = config();
        let missing = PgJournal::connect(&config, Access::Read).err().unwrap();
        assert!(
            missing.chain().any(|c| c.is::<NoJournal>()),
            "a command that only looks finds no journal: {missing:#}"
        );
        let journal = PgJournal::connect(&config, Access::Create).unwrap();
        let again = PgJournal::connect(&config, Access::Write).unwrap();
        let history = journal
            .sql_rows("SELECT version FROM schema_history ORDER BY version")
            .unwrap();
        assert_eq!(history.len() as i64, SCHEMA_VERSION, "{history:?}");
        PgJournal::connect(&config, Access::Read).unwrap();
        let path = journal.path().display().to_string();
        assert!(path.ends_with(&format!("#{}", config.schema)), "{path}");
        let size = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(journal.size_bytes());
        assert!(size.unwrap() > 0);
        drop(again);
        drop_schema(&journal, &config.schema);
    }

    #[test]
    #[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test)"]
    fn a_newer_schema_is_refused() {
        let config = config();
        let journal = PgJournal::connect(&config, Access::Create).unwrap();
        journal
            .sql_execute(&format!(
                "INSERT INTO schema_history (version) VALUES ({})",
                SCHEMA_VERSION + 1
            ))
            .unwrap();
        for access in [Access::Create, Access::Read] {
            let e = PgJournal::connect(&config, access).err().unwrap();
            assert!(format!("{e:#}").contains("upgrade b24eventd"), "{e:#}");
        }
        drop_schema(&journal, &config.schema);
    }

    #[tokio::test]
    #[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test)"]
    async fn one_instance_holds_the_lock_until_it_ends() {
        let config = config();
        let journal = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || PgJournal::connect(&config, Access::Create))
                .await
                .unwrap()
                .unwrap()
        };
        let held = journal.lock_instance(false).await.unwrap();
        let other = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || PgJournal::connect(&config, Access::Write))
                .await
                .unwrap()
                .unwrap()
        };
        let refused = other.lock_instance(false).await.err().unwrap().to_string();
        assert!(
            refused.contains("in use by another b24eventd process")
                && refused.contains(&format!("b24eventd pid {} on ", std::process::id())),
            "{refused}"
        );
        // A journal in another schema of the same database has a lock of its own.
        let elsewhere_config = PostgresJournalConfig {
            schema: unique_schema(),
            ..config.clone()
        };
        let elsewhere = {
            let config = elsewhere_config.clone();
            tokio::task::spawn_blocking(move || PgJournal::connect(&config, Access::Create))
                .await
                .unwrap()
                .unwrap()
        };
        drop(elsewhere.lock_instance(false).await.unwrap());
        tokio::task::spawn_blocking(move || drop_schema(&elsewhere, &elsewhere_config.schema))
            .await
            .unwrap();
        drop(held);
        // The lock's connection closes on its runtime: taken again within a few seconds.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match other.lock_instance(false).await {
                Ok(_) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("the lock was not released: {e:#}"),
            }
        }
        let journal = Journal {
            backend: Arc::new(journal),
        };
        journal.ping().await.unwrap();
        let backend: &dyn std::any::Any = &*journal.backend;
        let pg = backend.downcast_ref::<PgJournal>().unwrap().clone();
        tokio::task::spawn_blocking(move || drop_schema(&pg, &config.schema))
            .await
            .unwrap();
    }
}
