//! The journal: tokens, fetched batches, events, deliveries and upstream settlement, the only
//! channel between the pollers, the dispatchers and the operator commands.
//!
//! **The boundary.** Everything above this module uses the [`Journal`] handle and the plain
//! data types re-exported here (`types`, `inspect`); nothing visible outside names a
//! storage type or holds SQL. The interface is one object-safe trait, [`JournalBackend`]
//! (async operations return a `BoxFuture`, as `Sink` and `TokenStore` do), and [`Journal`] is
//! a cheap-to-clone `Arc<dyn JournalBackend>` that derefs to it, so callers write
//! `journal.record_batch(b).await` whatever the backend. A trait rather than a handle that
//! `match`es on an enum of backends: the trait is the list of what a backend must do, it is
//! checked by the compiler for each backend, adding a backend is a module that implements it
//! plus a constructor here, and no caller or existing backend changes. The one backend today is
//! SQLite (`sqlite`: the connection, the blocking-pool runner, the SQL by concern, schema and
//! migrations, the open checks and the daemon lock). The settle lattice (`settle`) is pure
//! and backend-neutral; every backend applies it in the transaction that records outcomes.
//! `boundary` holds the test that enforces all this over the source tree.

mod backend;
#[cfg(test)]
mod boundary;
pub use sqlite::baseline;
mod inspect;
#[cfg(test)]
mod inspect_tests;
mod migrate;
mod postgres;
mod settle;
mod sqlite;
#[doc(hidden)]
pub mod test_support;
#[cfg(test)]
mod tests;
mod types;

pub use backend::JournalBackend;
pub use inspect::{
    AttemptDetail, BatchInfo, DeliveryBrief, DeliveryDetail, EventDetail, EventFilter, EventRow,
    PortalStats, Pruned, Requeued, SinkStats, StatusFilter, UpstreamInfo,
};
pub use migrate::{Migrated, TableCounts, sqlite_to_postgres};
pub(crate) use sqlite::SCHEMA_VERSION;
pub(crate) use sqlite::lock;
pub(crate) use sqlite::open::{OpenError, check, damage};
pub use types::{
    Access, BatchOrigin, DeadAttempt, DueDelivery, Enriched, JournalCounts, NewBatch, NewEvent,
    OpenBatch, Outcome, PendingEnrichment, PendingSettlement, PortalStatus, RecordedBatch,
    SettleAction, SinkStatus, StatusData, StoredFinding, TokenStatus,
};
pub(crate) use types::{HISTORY_MINUTES, timestamp};

use crate::bitrix::{TokenStore, Tokens};
use crate::config::{JournalConfig, Synchronous};
pub use postgres::LeaseTable;
use postgres::PgJournal;
#[doc(hidden)]
pub use postgres::deliveries::due_deliveries_sql;
pub use postgres::fence::{Fence, Fenced};
pub use postgres::lease::{HeldLease, InstanceIdentity, InstanceRow, LeaseRow};
use sqlite::SqliteJournal;
use std::path::Path;
use std::sync::Arc;

/// Held while a daemon or the conformance probe works a journal's portals: a second one is
/// refused. SQLite: `flock` on the file beside the journal; PostgreSQL: a session advisory
/// lock. Both are released when the holder ends, however it ends.
pub(crate) enum InstanceLock {
    File(#[allow(dead_code)] lock::DaemonLock),
    Postgres(#[allow(dead_code)] postgres::InstanceLock),
}

/// What a clustered daemon holds of the shared journal: the fence it keeps current and the
/// lease table it renews, takes and releases through.
#[derive(Clone)]
pub struct ClusterHandle {
    pub fence: Arc<Fence>,
    pub leases: LeaseTable,
}

/// A handle to the open journal; cheap to clone. Every operation is a [`JournalBackend`]
/// method, reached through `Deref`.
#[derive(Clone)]
pub struct Journal {
    backend: Arc<dyn JournalBackend>,
}

impl std::ops::Deref for Journal {
    type Target = dyn JournalBackend;

    fn deref(&self) -> &Self::Target {
        &*self.backend
    }
}

impl Journal {
    /// Opens (creating if needed, mode 0600) and migrates the SQLite journal at `path`:
    /// [`Access::Create`], as `run` does. Blocking; see [`Journal::open`].
    pub fn open_blocking(path: &Path, synchronous: Synchronous) -> anyhow::Result<Journal> {
        Journal::open_blocking_as(path, synchronous, Access::Create)
    }

    /// Opens the SQLite journal at `path` as `access` allows, after the checks of [`check`]; a
    /// refusal is an [`OpenError`]. Blocking; see [`Journal::open_as`].
    pub fn open_blocking_as(
        path: &Path,
        synchronous: Synchronous,
        access: Access,
    ) -> anyhow::Result<Journal> {
        let backend = SqliteJournal::open(path, synchronous, access)?;
        Ok(Journal {
            backend: Arc::new(backend),
        })
    }

    /// Opens the journal the config names, as `access` allows: the SQLite file at `path`, or
    /// the PostgreSQL schema at `url`. Blocking; see [`Journal::open_configured`].
    pub fn open_configured_blocking(
        config: &JournalConfig,
        access: Access,
    ) -> anyhow::Result<Journal> {
        let backend: Arc<dyn JournalBackend> = match &config.postgres {
            Some(pg) => Arc::new(PgJournal::connect(pg, access)?),
            None => Arc::new(SqliteJournal::open(
                &config.path,
                config.synchronous,
                access,
            )?),
        };
        Ok(Journal { backend })
    }

    /// [`Journal::open_configured_blocking`] off the async runtime.
    pub async fn open_configured(
        config: &JournalConfig,
        access: Access,
    ) -> anyhow::Result<Journal> {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Journal::open_configured_blocking(&config, access))
            .await?
    }

    /// The portal leases of a journal several instances share (PostgreSQL); `None` for a
    /// SQLite journal, which one daemon has to itself.
    pub fn lease_table(&self) -> Option<LeaseTable> {
        let backend: &dyn std::any::Any = &*self.backend;
        backend
            .downcast_ref::<PgJournal>()
            .map(PgJournal::lease_table)
    }

    /// Why this process does not hold the journal's instance lock now although it took it: a
    /// PostgreSQL journal's lock ends with its connection (a server restart), and is taken
    /// again as soon as the server answers; `None` while it is held, and on SQLite (a `flock`
    /// is not lost).
    pub fn instance_lock_problem(&self) -> Option<String> {
        let backend: &dyn std::any::Any = &*self.backend;
        backend
            .downcast_ref::<PgJournal>()
            .and_then(PgJournal::instance_lock_problem)
    }

    /// Joins the cluster of instances sharing this journal as `me`: installs the fence every
    /// write for a portal is checked against from now on (and the dispatchers see only the
    /// portals it holds), and returns it with the lease table. `None` on SQLite, which one
    /// daemon has to itself. The operator commands never join: their writes are not fenced.
    /// From now on every journal operation but the prune is abandoned, with an error naming
    /// the journal, when it has not ended within `lease_ttl` (10 s at least): a server or a
    /// network that stopped answering must not hang the daemon.
    pub fn join_cluster(
        &self,
        me: &InstanceIdentity,
        lease_ttl: std::time::Duration,
    ) -> Option<ClusterHandle> {
        let backend: &dyn std::any::Any = &*self.backend;
        backend.downcast_ref::<PgJournal>().map(|pg| ClusterHandle {
            fence: pg.join_cluster(&me.id, lease_ttl),
            leases: pg.lease_table(),
        })
    }

    /// [`Journal::open_configured`] for a command that only looks and must not create a
    /// journal: `None` when there is none yet.
    pub async fn open_existing(config: &JournalConfig) -> anyhow::Result<Option<Journal>> {
        if config.postgres.is_none() && !config.path.exists() {
            return Ok(None);
        }
        match Journal::open_configured(config, Access::Read).await {
            Ok(journal) => Ok(Some(journal)),
            Err(e) if e.chain().any(|c| c.is::<postgres::NoJournal>()) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens the journal for `run` or the conformance probe, which work the portals and so
    /// must be alone on the journal: checks the file first (SQLite: nothing is made beside a
    /// path that is not a journal of ours), takes the instance lock, then opens. The lock is
    /// held until the returned [`InstanceLock`] is dropped.
    pub(crate) async fn open_alone(
        config: &JournalConfig,
        access: Access,
    ) -> anyhow::Result<(Journal, InstanceLock)> {
        match &config.postgres {
            None => {
                check(&config.path, access)?;
                let lock = lock::DaemonLock::acquire(&config.path)?;
                let journal = Journal::open_configured(config, access).await?;
                Ok((journal, InstanceLock::File(lock)))
            }
            Some(pg) => {
                let pg = pg.clone();
                let backend =
                    tokio::task::spawn_blocking(move || PgJournal::connect(&pg, access)).await??;
                let lock = backend.lock_instance(false).await?;
                let journal = Journal {
                    backend: Arc::new(backend),
                };
                Ok((journal, InstanceLock::Postgres(lock)))
            }
        }
    }

    /// Opens the journal for `run`. SQLite: as [`Journal::open_alone`] (one daemon per
    /// journal). PostgreSQL: several daemons share the journal (their portals divided by the
    /// lease table), so each takes the instance lock *shared*: they do not exclude each
    /// other, but they exclude the conformance probe, which takes it exclusively.
    pub(crate) async fn open_for_daemon(
        config: &JournalConfig,
        access: Access,
    ) -> anyhow::Result<(Journal, InstanceLock)> {
        let Some(pg) = &config.postgres else {
            return Journal::open_alone(config, access).await;
        };
        let pg = pg.clone();
        let backend =
            tokio::task::spawn_blocking(move || PgJournal::connect(&pg, access)).await??;
        let lock = backend.lock_instance(true).await?;
        let journal = Journal {
            backend: Arc::new(backend),
        };
        Ok((journal, InstanceLock::Postgres(lock)))
    }

    /// Opens and migrates the journal off the async runtime ([`Access::Create`]).
    pub async fn open(path: &Path, synchronous: Synchronous) -> anyhow::Result<Journal> {
        Journal::open_as(path, synchronous, Access::Create).await
    }

    /// [`Journal::open_blocking_as`] off the async runtime.
    pub async fn open_as(
        path: &Path,
        synchronous: Synchronous,
        access: Access,
    ) -> anyhow::Result<Journal> {
        let path = path.to_path_buf();
        tokio::task::spawn_blocking(move || Journal::open_blocking_as(&path, synchronous, access))
            .await?
    }
}

impl TokenStore for Journal {
    fn save<'a>(
        &'a self,
        portal: &'a str,
        tokens: &'a Tokens,
    ) -> crate::BoxFuture<'a, anyhow::Result<()>> {
        self.save_tokens(portal, tokens)
    }

    fn load<'a>(&'a self, portal: &'a str) -> crate::BoxFuture<'a, anyhow::Result<Option<Tokens>>> {
        self.load_tokens(portal)
    }
}
