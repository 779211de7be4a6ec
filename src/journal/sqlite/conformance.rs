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

#[cfg(test)]
mod tests {
    use crate::config::Synchronous;
    use crate::journal::{Journal, StoredFinding};
    use chrono::{DateTime, Utc};

    fn finding(check: &str, status: &str, value: Option<i64>, run: &str) -> StoredFinding {
        StoredFinding {
            check: check.into(),
            status: status.into(),
            observed: format!("{check} {status}"),
            value,
            run_id: run.into(),
            checked_at: DateTime::parse_from_rfc3339("2026-11-23T10:00:00.250Z")
                .unwrap()
                .with_timezone(&Utc),
        }
    }

    #[tokio::test]
    async fn a_run_replaces_the_previous_run_of_its_portal_only() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.db"), Synchronous::Full)
            .await
            .unwrap();
        assert!(j.conformance("main").await.unwrap().is_empty());
        j.replace_conformance(
            "main",
            vec![
                finding("get_limit_above_50", "fail", Some(50), "r1"),
                finding("reservation_hides", "ok", None, "r1"),
            ],
        )
        .await
        .unwrap();
        j.replace_conformance("other", vec![finding("cleanup", "ok", None, "r9")])
            .await
            .unwrap();
        let main = j.conformance("main").await.unwrap();
        assert_eq!(main.len(), 2);
        assert_eq!(
            main[0],
            finding("get_limit_above_50", "fail", Some(50), "r1")
        );
        j.replace_conformance(
            "main",
            vec![finding("reservation_hides", "skipped", None, "r2")],
        )
        .await
        .unwrap();
        let main = j.conformance("main").await.unwrap();
        assert_eq!(main, [finding("reservation_hides", "skipped", None, "r2")]);
        assert_eq!(j.conformance("other").await.unwrap().len(), 1);
        let bad = j
            .replace_conformance("main", vec![finding("x", "maybe", None, "r3")])
            .await;
        assert!(bad.is_err(), "the status is checked");
        assert_eq!(j.conformance("main").await.unwrap().len(), 1, "rolled back");
    }
}
