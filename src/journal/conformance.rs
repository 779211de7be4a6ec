//! The `conformance` table: the findings of the last conformance probe of each portal, as the
//! probe stores them and the daemon reads them at start. Plain strings here; their meaning
//! (which checks exist, what a status means to the daemon) is `crate::conformance`'s.

use super::{Journal, parse_time, timestamp};
use chrono::{DateTime, Utc};
use rusqlite::params;

/// One stored finding of a probe run.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFinding {
    /// The check's stable name (`get_limit_above_50`, ...).
    pub check: String,
    /// `ok`, `fail` or `skipped`.
    pub status: String,
    /// What the probe saw, for people.
    pub observed: String,
    /// A number the daemon acts on, where the check has one (e.g. how many rows a get returned).
    pub value: Option<i64>,
    /// The probe run that found it (its connector suffix).
    pub run_id: String,
    pub checked_at: DateTime<Utc>,
}

impl Journal {
    /// Replaces the stored findings of `portal` with those of one probe run, in one transaction:
    /// a check the run did not reach is forgotten (unknown again), not kept from an older run.
    pub async fn replace_conformance(
        &self,
        portal: &str,
        findings: Vec<StoredFinding>,
    ) -> anyhow::Result<()> {
        let portal = portal.to_string();
        self.run(move |conn| {
            let tx = conn.transaction()?;
            tx.execute("DELETE FROM conformance WHERE portal = ?1", [&portal])?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO conformance (portal, check_name, status, observed, value, run_id, checked_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (portal, check_name) DO UPDATE SET status = excluded.status,
                        observed = excluded.observed, value = excluded.value,
                        run_id = excluded.run_id, checked_at = excluded.checked_at",
                )?;
                for f in &findings {
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
        })
        .await
    }

    /// The stored findings of `portal`, by check name; empty when it was never probed.
    pub async fn conformance(&self, portal: &str) -> anyhow::Result<Vec<StoredFinding>> {
        let portal = portal.to_string();
        self.run(move |conn| {
            let mut select = conn.prepare_cached(
                "SELECT check_name, status, observed, value, run_id, checked_at
                 FROM conformance WHERE portal = ?1 ORDER BY check_name",
            )?;
            let rows = select.query_map([&portal], |r| {
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
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;

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
