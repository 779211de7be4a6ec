//! The last conformance probe's findings per portal (`conformance`).

use super::fence::{Fence, check};
use super::{Conn, millis};
use crate::journal::types::StoredFinding;

pub(super) async fn replace_conformance(
    conn: &mut Conn,
    fence: Option<&Fence>,
    portal: &str,
    findings: &[StoredFinding],
) -> anyhow::Result<()> {
    let tx = conn.transaction().await?;
    check(&tx, fence, &[portal.to_string()]).await?;
    tx.execute("DELETE FROM conformance WHERE portal = $1", &[&portal])
        .await?;
    let insert = tx
        .prepare_cached(
            "INSERT INTO conformance (portal, check_name, status, observed, value, run_id, checked_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (portal, check_name) DO UPDATE SET status = excluded.status,
                observed = excluded.observed, value = excluded.value,
                run_id = excluded.run_id, checked_at = excluded.checked_at",
        )
        .await?;
    for f in findings {
        tx.execute(
            &insert,
            &[
                &portal,
                &f.check,
                &f.status,
                &f.observed,
                &f.value,
                &f.run_id,
                &millis(f.checked_at),
            ],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn conformance(conn: &Conn, portal: &str) -> anyhow::Result<Vec<StoredFinding>> {
    let stmt = conn
        .prepare_cached(
            "SELECT check_name, status, observed, value, run_id, checked_at
             FROM conformance WHERE portal = $1 ORDER BY check_name",
        )
        .await?;
    Ok(conn
        .query(&stmt, &[&portal])
        .await?
        .iter()
        .map(|r| StoredFinding {
            check: r.get(0),
            status: r.get(1),
            observed: r.get(2),
            value: r.get(3),
            run_id: r.get(4),
            checked_at: r.get(5),
        })
        .collect())
}
