//! Fencing of a shared journal's writes: the portals this instance holds and the epoch it took
//! each with, and the check every write for a portal makes in its own transaction.
//!
//! The check reads the portals' lease rows `FOR SHARE`: an acquisition (an `UPDATE` of the row)
//! waits until the write has committed or rolled back, and a write that starts after the lease
//! moved sees the new owner or epoch and is refused. So no write made under an old epoch ever
//! commits after a new owner took the lease, however long the old owner was paused.

use deadpool_postgres::Transaction;
use std::collections::BTreeMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// A write refused because this instance no longer holds `portal`'s lease (or holds it under
/// another epoch than its work started with). Callers recognise it with
/// `error.chain().any(|c| c.is::<Fenced>())`: the new owner redoes the work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("portal {portal}: this instance no longer holds its lease: journal write refused")]
pub struct Fenced {
    pub portal: String,
}

/// This instance and the epoch of every portal lease it holds. Installed on the journal by
/// `Journal::join_cluster`; the lease task keeps it current.
#[derive(Debug)]
pub struct Fence {
    instance: String,
    epochs: RwLock<BTreeMap<String, i64>>,
    /// Cleared when the daemon has left the cluster (its leases released): the journal handle
    /// is then unfenced again, as the operator commands' are.
    active: AtomicBool,
}

impl Fence {
    pub(super) fn new(instance: &str) -> Fence {
        Fence {
            instance: instance.to_string(),
            epochs: RwLock::new(BTreeMap::new()),
            active: AtomicBool::new(true),
        }
    }

    /// Whether the fence applies (between joining and leaving the cluster).
    pub(super) fn active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// Joins again (a second daemon run on the same journal handle): no lease held yet.
    pub(super) fn activate(&self) {
        self.epochs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.active.store(true, Ordering::SeqCst);
    }

    /// The daemon left the cluster: its writes are no longer fenced nor its reads filtered.
    pub fn deactivate(&self) {
        self.active.store(false, Ordering::SeqCst);
    }

    /// The instance id the leases are held under.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Work on `portal` may write under `epoch` from now on.
    pub fn hold(&self, portal: &str, epoch: i64) {
        self.epochs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(portal.to_string(), epoch);
    }

    /// Work on `portal` may no longer write (released, or lost).
    pub fn forget(&self, portal: &str) {
        self.epochs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(portal);
    }

    /// The epoch `portal` is held under, if held.
    pub fn epoch(&self, portal: &str) -> Option<i64> {
        self.epochs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(portal)
            .copied()
    }

    /// The portals held, by name.
    pub fn held(&self) -> Vec<String> {
        self.epochs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }
}

/// In the caller's transaction: locks the lease rows of `portals` `FOR SHARE` (in name order,
/// as the lease table's writers lock them) and refuses with [`Fenced`] unless each is owned by
/// this instance, under the epoch the fence holds, and not yet expired. Without a fence (SQLite
/// has none; the operator commands install none) nothing is checked.
pub(super) async fn check(
    tx: &Transaction<'_>,
    fence: Option<&Fence>,
    portals: &[String],
) -> anyhow::Result<()> {
    let Some(fence) = fence else {
        return Ok(());
    };
    let mut portals = portals.to_vec();
    portals.sort_unstable();
    portals.dedup();
    if portals.is_empty() {
        return Ok(());
    }
    let stmt = tx
        .prepare_cached(
            "SELECT portal, owner, epoch, expires_at > now() FROM portal_leases
             WHERE portal = ANY($1) ORDER BY portal FOR SHARE",
        )
        .await?;
    let rows = tx.query(&stmt, &[&portals]).await?;
    let found: BTreeMap<String, (Option<String>, i64, Option<bool>)> = rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3))))
        .collect();
    for portal in portals {
        let current = match (found.get(&portal), fence.epoch(&portal)) {
            (Some((Some(owner), epoch, Some(true))), Some(held)) => {
                owner == fence.instance() && *epoch == held
            }
            _ => false,
        };
        if !current {
            return Err(Fenced { portal }.into());
        }
    }
    Ok(())
}

/// [`check`] for the portals of the events `event_ids`.
pub(super) async fn check_events(
    tx: &Transaction<'_>,
    fence: Option<&Fence>,
    event_ids: &[i64],
) -> anyhow::Result<()> {
    if fence.is_none() || event_ids.is_empty() {
        return Ok(());
    }
    let stmt = tx
        .prepare_cached("SELECT DISTINCT portal FROM events WHERE id = ANY($1)")
        .await?;
    let portals: Vec<String> = tx
        .query(&stmt, &[&event_ids])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    check(tx, fence, &portals).await
}

/// The portals a dispatcher of this instance may see: `None` (all) without a fence.
pub(super) fn visible(fence: Option<&Fence>) -> Option<Vec<String>> {
    fence.map(Fence::held)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitrix::Tokens;
    use crate::config::PostgresJournalConfig;
    use crate::envelope::Lane;
    use crate::journal::postgres::PgJournal;
    use crate::journal::test_support::{DEFAULT_TEST_URL, postgres_url, unique_schema};
    use crate::journal::{Access, BatchOrigin, Journal, NewBatch, NewEvent, Outcome};
    use std::sync::Arc;
    use std::time::Duration;

    const TTL: Duration = Duration::from_secs(30);
    const GRACE: Duration = Duration::from_secs(5);

    async fn journal() -> (PgJournal, String) {
        tokio::task::spawn_blocking(|| {
            let config = PostgresJournalConfig {
                url: postgres_url().unwrap_or_else(|| DEFAULT_TEST_URL.to_string()),
                schema: unique_schema(),
                max_connections: 4,
            };
            (
                PgJournal::connect(&config, Access::Create).unwrap(),
                config.schema,
            )
        })
        .await
        .unwrap()
    }

    async fn drop_schema(journal: PgJournal, schema: String) {
        use crate::journal::JournalBackend;
        tokio::task::spawn_blocking(move || {
            journal
                .sql_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .unwrap();
        })
        .await
        .unwrap();
    }

    fn batch(process_id: &str) -> NewBatch {
        NewBatch {
            portal: "main".into(),
            process_id: process_id.into(),
            lane: Lane::Normal,
            origin: BatchOrigin::Fetched,
            events: vec![NewEvent {
                offline_id: 1,
                event: "ONCRMDEALUPDATE".into(),
                message_id: format!("{:032x}", 1),
                timestamp: "2026-11-22T10:00:00+03:00".into(),
                data: serde_json::json!({"FIELDS": {"ID": "1"}}),
                additional: serde_json::json!({}),
                sinks: vec!["erp".into()],
                enrich: false,
            }],
            deleted_upstream: false,
            new_reservation: true,
        }
    }

    fn is_fenced(e: &anyhow::Error) -> bool {
        e.chain()
            .any(|c| c.downcast_ref::<Fenced>().map(|f| f.portal.as_str()) == Some("main"))
    }

    /// Makes the lease of `main` run out now, as if its owner stopped renewing.
    async fn expire(journal: &Journal) {
        let j = journal.clone();
        tokio::task::spawn_blocking(move || {
            j.sql_execute(
                "UPDATE portal_leases SET expires_at = now() - interval '1 second' WHERE portal = 'main'",
            )
            .unwrap()
        })
        .await
        .unwrap();
    }

    async fn count(journal: &Journal, sql: &str) -> usize {
        let (j, sql) = (journal.clone(), sql.to_string());
        tokio::task::spawn_blocking(move || j.sql_rows(&sql).unwrap().len())
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test)"]
    async fn a_write_under_a_stale_epoch_is_refused_and_leaves_nothing() {
        let (pg, schema) = journal().await;
        let table = pg.lease_table();
        let fence = pg.join_cluster("one", TTL);
        let journal = Journal {
            backend: Arc::new(pg.clone()),
        };
        let main = vec!["main".to_string()];
        let one = crate::journal::InstanceIdentity {
            id: "one".into(),
            host: "test".into(),
            pid: 1,
            version: "0".into(),
        };
        table.heartbeat(&one, TTL, &main).await.unwrap();
        let taken = table.acquire("one", &main, TTL, GRACE).await.unwrap();
        fence.hold("main", taken["main"].epoch);
        let recorded = journal.record_batch(batch("p1")).await.unwrap();
        assert_eq!(recorded.inserted, 1);
        let due = journal.due_deliveries("erp", 10).await.unwrap();
        assert_eq!(due.len(), 1, "the owner's dispatchers see its deliveries");

        expire(&journal).await;
        let moved = table.acquire("two", &main, TTL, GRACE).await.unwrap();
        assert_eq!(moved["main"].epoch, taken["main"].epoch + 1);

        let refused = journal.record_batch(batch("p2")).await.unwrap_err();
        assert!(is_fenced(&refused), "{refused:#}");
        assert_eq!(
            count(&journal, "SELECT id FROM batches WHERE process_id = 'p2'").await,
            0
        );
        let refused = journal
            .record_outcomes("erp", vec![(due[0].event_id, Outcome::Delivered, None)])
            .await
            .unwrap_err();
        assert!(is_fenced(&refused), "{refused:#}");
        assert_eq!(
            count(
                &journal,
                "SELECT event_id FROM deliveries WHERE status = 'pending'"
            )
            .await,
            1,
            "the outcome left nothing"
        );
        assert_eq!(count(&journal, "SELECT id FROM delivery_attempts").await, 0);
        let tokens = Tokens {
            access_token: "a".into(),
            refresh_token: "r".into(),
            expires_at: Some(chrono::Utc::now()),
            member_id: None,
            scope: None,
            client_endpoint: None,
            user_id: None,
        };
        let refused = journal.save_tokens("main", &tokens).await.unwrap_err();
        assert!(is_fenced(&refused), "{refused:#}");
        assert!(journal.load_tokens("main").await.unwrap().is_none());
        let refused = journal
            .mark_settled_groups(vec![(
                vec![due[0].event_id],
                crate::journal::SettleAction::Clear,
            )])
            .await
            .unwrap_err();
        assert!(is_fenced(&refused), "{refused:#}");

        // Without the portal in the fence, its deliveries are no longer this instance's.
        fence.forget("main");
        assert!(journal.due_deliveries("erp", 10).await.unwrap().is_empty());
        assert!(journal.next_due("erp").await.unwrap().is_none());
        drop(journal);
        drop_schema(pg, schema).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test)"]
    async fn a_paused_writer_delays_an_acquisition_instead_of_losing_to_it() {
        let (pg, schema) = journal().await;
        let table = pg.lease_table();
        let fence = pg.join_cluster("one", TTL);
        let main = vec!["main".to_string()];
        let one = crate::journal::InstanceIdentity {
            id: "one".into(),
            host: "test".into(),
            pid: 1,
            version: "0".into(),
        };
        table.heartbeat(&one, TTL, &main).await.unwrap();
        let taken = table
            .acquire("one", &main, Duration::from_secs(1), GRACE)
            .await
            .unwrap();
        fence.hold("main", taken["main"].epoch);

        // A write that has passed its check and then pauses, its transaction open (less than
        // the server's idle_in_transaction_session_timeout).
        let (locked_tx, locked_rx) = tokio::sync::oneshot::channel();
        let (resume_tx, resume_rx) = tokio::sync::oneshot::channel::<()>();
        let writer = {
            let fence = fence.clone();
            tokio::spawn(pg.run(move |mut conn| async move {
                let tx = conn.transaction().await?;
                check(&tx, Some(&fence), &["main".to_string()]).await?;
                let _ = locked_tx.send(());
                resume_rx.await?;
                tx.execute(
                    "INSERT INTO portals (name, first_seen_at) VALUES ('written-while-paused', now())",
                    &[],
                )
                .await?;
                tx.commit().await?;
                Ok(())
            }))
        };
        locked_rx.await.unwrap();
        let journal = Journal {
            backend: Arc::new(pg.clone()),
        };
        // The lease runs out while the write is open (an UPDATE of the row would wait for it).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            table
                .acquire("two", &main, TTL, GRACE)
                .await
                .unwrap()
                .is_empty(),
            "the lease is not taken while the old owner's write is open"
        );
        resume_tx.send(()).unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(
            count(
                &journal,
                "SELECT name FROM portals WHERE name = 'written-while-paused'"
            )
            .await,
            1
        );
        let moved = table.acquire("two", &main, TTL, GRACE).await.unwrap();
        assert_eq!(moved["main"].epoch, taken["main"].epoch + 1);
        let refused = journal.record_batch(batch("late")).await.unwrap_err();
        assert!(is_fenced(&refused), "{refused:#}");
        drop(journal);
        drop_schema(pg, schema).await;
    }
}
