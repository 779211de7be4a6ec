//! The SQL of the `conformance` table: the findings of the last conformance probe of each
//! portal, as the probe stores them and the daemon reads them at start.

use super::parse_time;
use crate::journal::timestamp;
use crate::journal::types::StoredFinding;
use rusqlite::{Connection, params};

pub(super) fn replace_conformance(
    conn: &mut Connection,
    portal: &str,
    findings: &[StoredFinding],
) -> anyhow::Result<()> {
    let tx = conn.transaction()?;
    tx.execute("DELETE FROM conformance WHERE portal = ?1", [portal])?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO conformance (portal, check_name, status, observed, value, run_id, checked_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (portal, check_name) DO UPDATE SET status = excluded.status,
                observed = excluded.observed, value = excluded.value,
                run_id = excluded.run_id, checked_at = excluded.checked_at",
        )?;
        for f in findings {
            insert.execute(params![
                portal,
                f.check,
                f.status,
                f.observed,
                f.value,
                f.run_id,
                timestamp(f.checked_at)
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

pub(super) fn conformance(conn: &Connection, portal: &str) -> anyhow::Result<Vec<StoredFinding>> {
    let mut select = conn.prepare_cached(
        "SELECT check_name, status, observed, value, run_id, checked_at
         FROM conformance WHERE portal = ?1 ORDER BY check_name",
    )?;
    let rows = select.query_map([portal], |r| {
        Ok(StoredFinding {
            check: r.get(0)?,
            status: r.get(1)?,
            observed: r.get(2)?,
            value: r.get(3)?,
            run_id: r.get(4)?,
            checked_at: parse_time(r.get(5)?).unwrap_or_default(),
        })
    })?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}
