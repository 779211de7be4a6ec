//! The lease table of a shared PostgreSQL journal: instances and their heartbeats, and one lease
//! per portal with its owner, its epoch (the fencing token: one more at every acquisition) and
//! its expiry. Every time is the database's `now()`, never a machine's clock, so instances whose
//! clocks disagree still agree on who owns what.

use super::Conn;
use std::collections::BTreeMap;
use std::time::Duration;

/// One instance as the table holds it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct InstanceRow {
    pub id: String,
    pub host: String,
    pub pid: i32,
    pub version: String,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub heartbeat_at: chrono::DateTime<chrono::Utc>,
    /// Seconds until it counts as gone (negative: gone).
    pub expires_in: f64,
}

/// One portal's lease as the table holds it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LeaseRow {
    pub portal: String,
    pub owner: Option<String>,
    pub epoch: i64,
    /// Seconds of lease left (negative or none: free).
    pub expires_in: Option<f64>,
    /// How often the portal changed owner.
    pub handovers: i64,
}

impl LeaseRow {
    /// Whether the lease has run out (or was never taken).
    pub fn expired(&self) -> bool {
        self.owner.is_none() || self.expires_in.is_none_or(|left| left <= 0.0)
    }
}

/// A lease this instance holds: its epoch and how long it is good for, measured from when the
/// statement that took or renewed it was sent (so never longer than the database's view).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeldLease {
    pub epoch: i64,
    pub left: Duration,
    /// How long until the orphan sweep may run (a new owner's grace).
    pub sweep_in: Duration,
}

fn seconds(value: f64) -> Duration {
    Duration::from_secs_f64(value.max(0.0))
}

/// Heartbeats instance `me` (registering it if new) and renews every lease it holds, in one
/// transaction; rows for configured portals that have none are added (free). Returns the
/// leases renewed. One statement per kind, whatever the number of portals.
pub(super) async fn heartbeat(
    conn: &mut Conn,
    me: &InstanceIdentity,
    ttl: Duration,
    portals: &[String],
) -> anyhow::Result<BTreeMap<String, HeldLease>> {
    let ttl = ttl.as_secs_f64();
    let tx = conn.transaction().await?;
    let joined: bool = tx
        .query_one(
            "INSERT INTO instances (id, host, pid, version, expires_at)
             VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
             ON CONFLICT (id) DO UPDATE
             SET heartbeat_at = now(), expires_at = now() + make_interval(secs => $5)
             RETURNING xmax = 0",
            &[&me.id, &me.host, &(me.pid as i32), &me.version, &ttl],
        )
        .await?
        .get(0);
    if joined {
        // A new instance: the others plan again at once (delivered at the commit).
        tx.execute("NOTIFY b24eventd_leases", &[]).await?;
    }
    tx.execute(
        "INSERT INTO portal_leases (portal) SELECT unnest($1::text[]) ON CONFLICT (portal) DO NOTHING",
        &[&portals],
    )
    .await?;
    let rows = tx
        .query(
            // Locked in name order, as the fenced writes lock them `FOR SHARE`: the renewal
            // waits for this instance's writes in flight, never in a cycle with them.
            "UPDATE portal_leases
             SET expires_at = now() + make_interval(secs => $2)
             WHERE portal IN (SELECT portal FROM portal_leases
                              WHERE owner = $1 AND expires_at > now()
                              ORDER BY portal FOR NO KEY UPDATE)
               AND owner = $1 AND expires_at > now()
             RETURNING portal, epoch, $2::float8,
                       GREATEST(EXTRACT(EPOCH FROM sweep_after - now())::float8, 0)",
            &[&me.id, &ttl],
        )
        .await?;
    tx.commit().await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                HeldLease {
                    epoch: r.get(1),
                    left: seconds(r.get(2)),
                    sweep_in: seconds(r.get(3)),
                },
            )
        })
        .collect())
}

/// The live instances and the leases of `portals`, as the database sees them now.
pub(super) async fn view(
    conn: &Conn,
    portals: &[String],
) -> anyhow::Result<(Vec<InstanceRow>, Vec<LeaseRow>)> {
    let instances = instances(conn, true).await?;
    let rows = conn
        .query(
            "SELECT portal, owner, epoch, EXTRACT(EPOCH FROM expires_at - now())::float8, handovers
             FROM portal_leases WHERE portal = ANY($1) ORDER BY portal",
            &[&portals],
        )
        .await?;
    Ok((instances, rows.iter().map(lease_row).collect()))
}

/// Every instance (`live_only`: those whose heartbeat has not run out), by id.
pub(super) async fn instances(conn: &Conn, live_only: bool) -> anyhow::Result<Vec<InstanceRow>> {
    let rows = conn
        .query(
            "SELECT id, host, pid, version, started_at, heartbeat_at,
                    EXTRACT(EPOCH FROM expires_at - now())::float8
             FROM instances WHERE NOT $1 OR expires_at > now() ORDER BY id",
            &[&live_only],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| InstanceRow {
            id: r.get(0),
            host: r.get(1),
            pid: r.get(2),
            version: r.get(3),
            started_at: r.get(4),
            heartbeat_at: r.get(5),
            expires_in: r.get(6),
        })
        .collect())
}

/// Every lease, by portal (`cluster status`).
pub(super) async fn leases(conn: &Conn) -> anyhow::Result<Vec<LeaseRow>> {
    let rows = conn
        .query(
            "SELECT portal, owner, epoch, EXTRACT(EPOCH FROM expires_at - now())::float8, handovers
             FROM portal_leases ORDER BY portal",
            &[],
        )
        .await?;
    Ok(rows.iter().map(lease_row).collect())
}

fn lease_row(r: &tokio_postgres::Row) -> LeaseRow {
    LeaseRow {
        portal: r.get(0),
        owner: r.get(1),
        epoch: r.get(2),
        expires_in: r.get(3),
        handovers: r.get(4),
    }
}

/// Takes those of `portals` whose lease is free or has run out, each with a new epoch; the
/// orphan sweep is held back by `grace` where the lease ran out under an owner (whose last
/// calls may still be ending), not where it was free (never taken, released after its owner's
/// work stopped, or freed after its owner's process was found gone); returns the ones taken (another instance may have been
/// faster for the rest). A row a write of the former owner still holds `FOR SHARE` (see
/// `fence`) is skipped, not waited for: it is taken at a later tick, after that write ended,
/// so the write never loses to the acquisition and the lease task never stalls on it (a
/// paused writer's transaction ends at the connection's `idle_in_transaction_session_timeout`).
pub(super) async fn acquire(
    conn: &Conn,
    me: &str,
    portals: &[String],
    ttl: Duration,
    grace: Duration,
) -> anyhow::Result<BTreeMap<String, HeldLease>> {
    let rows = conn
        .query(
            "UPDATE portal_leases
             SET handovers = handovers + CASE WHEN owner IS DISTINCT FROM $2 AND epoch > 0 THEN 1 ELSE 0 END,
                 owner = $2, epoch = epoch + 1, acquired_at = now(),
                 expires_at = now() + make_interval(secs => $3),
                 sweep_after = now() + make_interval(secs => CASE WHEN owner IS NULL THEN 0::float8 ELSE $4::float8 END)
             WHERE portal IN (SELECT portal FROM portal_leases
                              WHERE portal = ANY($1)
                                AND (owner IS NULL OR expires_at IS NULL OR expires_at <= now())
                              ORDER BY portal FOR NO KEY UPDATE SKIP LOCKED)
               AND (owner IS NULL OR expires_at IS NULL OR expires_at <= now())
             RETURNING portal, epoch, $3::float8,
                       GREATEST(EXTRACT(EPOCH FROM sweep_after - now())::float8, 0)",
            &[&portals, &me, &ttl.as_secs_f64(), &grace.as_secs_f64()],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                HeldLease {
                    epoch: r.get(1),
                    left: seconds(r.get(2)),
                    sweep_in: seconds(r.get(3)),
                },
            )
        })
        .collect())
}

/// Gives up the leases of `portals` that `me` holds (its work on them has stopped), so another
/// instance can take them at once; tells the others to look now.
pub(super) async fn release(conn: &Conn, me: &str, portals: &[String]) -> anyhow::Result<u64> {
    let released = conn
        .execute(
            "UPDATE portal_leases SET owner = NULL, expires_at = now()
             WHERE owner = $1 AND portal = ANY($2)",
            &[&me, &portals],
        )
        .await?;
    if released > 0 {
        conn.execute("NOTIFY b24eventd_leases", &[]).await?;
    }
    Ok(released)
}

/// Ends the leases of instance `dead` and removes it: an instance on this host whose process
/// no longer exists (it crashed; systemd restarted it), whose portals need not wait out their
/// TTL. Returns the leases freed.
pub(super) async fn reap(conn: &Conn, dead: &str) -> anyhow::Result<u64> {
    let freed = conn
        .execute(
            "UPDATE portal_leases SET owner = NULL, expires_at = now()
             WHERE portal IN (SELECT portal FROM portal_leases WHERE owner = $1
                              ORDER BY portal FOR NO KEY UPDATE)",
            &[&dead],
        )
        .await?;
    conn.execute("DELETE FROM instances WHERE id = $1", &[&dead])
        .await?;
    Ok(freed)
}

/// Removes instance `me` after a graceful stop (its leases released first).
pub(super) async fn retire(conn: &Conn, me: &str) -> anyhow::Result<()> {
    conn.execute("DELETE FROM instances WHERE id = $1", &[&me])
        .await?;
    conn.execute("NOTIFY b24eventd_leases", &[]).await?;
    Ok(())
}

/// Who this process is to the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceIdentity {
    /// `host-pid-boot-random`: unique even when a pid is reused; `boot` is the start of the
    /// kernel's boot id, so an instance of an earlier boot is never taken for one of this boot.
    pub id: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
}

/// The first 8 characters of this machine's boot id (`0` when unknown).
fn boot_tag() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|b| b.trim().chars().take(8).collect())
        .unwrap_or_else(|_| "0".into())
}

impl InstanceIdentity {
    /// Whether `other` ran on this machine since its last boot (same host name and boot id),
    /// so that its pid can be looked up here.
    pub fn same_boot(&self, other: &InstanceRow) -> bool {
        let tag = |id: &str, host: &str, pid: i64| {
            id.strip_prefix(&format!("{host}-{pid}-"))
                .and_then(|rest| rest.split('-').next())
                .map(str::to_string)
        };
        other.host == self.host
            && tag(&other.id, &other.host, i64::from(other.pid)).is_some()
            && tag(&other.id, &other.host, i64::from(other.pid))
                == tag(&self.id, &self.host, i64::from(self.pid))
    }

    /// This process.
    pub fn this_process() -> InstanceIdentity {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "unknown-host".into());
        let pid = std::process::id();
        InstanceIdentity {
            id: format!("{host}-{pid}-{}-{:04x}", boot_tag(), fastrand::u16(..)),
            host,
            pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PostgresJournalConfig;
    use crate::journal::postgres::PgJournal;
    use crate::journal::test_support::{DEFAULT_TEST_URL, postgres_url, unique_schema};
    use crate::journal::{Access, JournalBackend};

    fn journal() -> (PgJournal, String) {
        let config = PostgresJournalConfig {
            url: postgres_url().unwrap_or_else(|| DEFAULT_TEST_URL.to_string()),
            schema: unique_schema(),
            max_connections: 2,
        };
        (
            PgJournal::connect(&config, Access::Create).unwrap(),
            config.schema,
        )
    }

    fn identity(id: &str) -> InstanceIdentity {
        InstanceIdentity {
            id: id.into(),
            host: "test".into(),
            pid: 1,
            version: "0".into(),
        }
    }

    fn portals(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test)"]
    async fn leases_are_taken_once_renewed_fenced_by_epoch_and_handed_over() {
        let (journal, schema) = tokio::task::spawn_blocking(journal).await.unwrap();
        let table = journal.lease_table();
        let all = portals(&["a", "b", "c"]);
        let ttl = Duration::from_secs(30);
        let grace = Duration::from_secs(5);
        let (one, two) = (identity("one"), identity("two"));
        assert!(table.heartbeat(&one, ttl, &all).await.unwrap().is_empty());
        table.heartbeat(&two, ttl, &all).await.unwrap();
        let (live, leases) = table.view(&all).await.unwrap();
        assert_eq!(live.len(), 2);
        assert!(leases.iter().all(|l| l.owner.is_none() && l.expired()));

        let taken = table
            .acquire("one", &portals(&["a", "b"]), ttl, grace)
            .await
            .unwrap();
        assert_eq!(taken.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert!(
            taken
                .values()
                .all(|l| l.epoch == 1 && l.sweep_in == Duration::ZERO),
            "a free lease needs no grace: {taken:?}"
        );
        // A live lease is not taken again, by anyone.
        let raced = table
            .acquire("two", &portals(&["a", "c"]), ttl, grace)
            .await
            .unwrap();
        assert_eq!(raced.keys().collect::<Vec<_>>(), ["c"]);
        let renewed = table.heartbeat(&one, ttl, &all).await.unwrap();
        assert_eq!(renewed.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(renewed["a"].epoch, 1, "a renewal keeps the epoch");

        // A lease that ran out is taken with the next epoch, and its old owner's renewal no
        // longer returns it.
        let expired = journal
            .sql_execute("UPDATE portal_leases SET expires_at = now() - interval '1 second' WHERE portal = 'b'")
            .unwrap();
        assert_eq!(expired, 1);
        let moved = table
            .acquire("two", &portals(&["b"]), ttl, grace)
            .await
            .unwrap();
        assert_eq!(moved["b"].epoch, 2);
        assert_eq!(
            moved["b"].sweep_in, grace,
            "taken over from a lapsed owner: the grace"
        );
        let renewed = table.heartbeat(&one, ttl, &all).await.unwrap();
        assert_eq!(renewed.keys().collect::<Vec<_>>(), ["a"]);

        // A release frees at once; a retired instance is no longer live.
        assert_eq!(
            table.release("one", &portals(&["a", "b"])).await.unwrap(),
            1
        );
        let (_, leases) = table.view(&all).await.unwrap();
        let a = leases.iter().find(|l| l.portal == "a").unwrap();
        assert!(a.expired() && a.owner.is_none());
        table.retire("one").await.unwrap();
        let (live, leases) = table.view(&all).await.unwrap();
        assert_eq!(
            live.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["two"]
        );
        let b = leases.iter().find(|l| l.portal == "b").unwrap();
        assert_eq!(
            (b.owner.as_deref(), b.epoch, b.handovers),
            (Some("two"), 2, 1)
        );
        let (instances, all_leases) = table.status().await.unwrap();
        assert_eq!(instances.len(), 1);
        assert_eq!(all_leases.len(), 3);
        tokio::task::spawn_blocking(move || {
            journal
                .sql_execute(&format!("DROP SCHEMA {schema} CASCADE"))
                .unwrap();
        })
        .await
        .unwrap();
    }
}
