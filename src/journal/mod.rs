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
mod settle;
mod sqlite;
mod types;

pub use backend::JournalBackend;
pub use inspect::{
    AttemptDetail, BatchInfo, DeliveryBrief, DeliveryDetail, EventDetail, EventFilter, EventRow,
    PortalStats, Pruned, Requeued, SinkStats, StatusFilter, UpstreamInfo,
};
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
use crate::config::Synchronous;
use sqlite::SqliteJournal;
use std::path::Path;
use std::sync::Arc;

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
