//! The bare-SQLite baseline of `b24eventd-bench overhead`: fetched batches inserted with plain
//! rusqlite into a database made by the journal's own migrations, and nothing else the journal
//! does (no deliveries, outcomes, change keys or settle lattice), so the baseline's SQL lives
//! beside the journal's and follows its schema.

use rusqlite::{Connection, params};
use std::path::Path;

/// One event row of a baseline batch.
pub struct BaselineEvent {
    pub envelope_id: String,
    pub offline_id: i64,
    pub event: String,
    pub message_id: String,
    /// `TIMESTAMP_X` as the portal sent it.
    pub timestamp: String,
    /// `EVENT_DATA` and `ADDITIONAL` as JSON text.
    pub data: String,
    pub additional: String,
}

/// A database with the journal's schema, written with bare inserts.
pub struct BareInserts {
    conn: Connection,
}

impl BareInserts {
    /// Creates the database at `path` (WAL, `synchronous = FULL`, as the daemon opens its
    /// journal) and its schema with the journal's migrations.
    pub fn create(path: &Path) -> anyhow::Result<BareInserts> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "wal")?;
        conn.pragma_update(None, "synchronous", "full")?;
        super::schema::migrate(&mut conn)?;
        Ok(BareInserts { conn })
    }

    /// Inserts one fetched batch of `portal` (its `batches` row and its pending events) in one
    /// transaction.
    pub fn insert_batch(
        &mut self,
        portal: &str,
        process_id: &str,
        fetched_at: &str,
        events: &[BaselineEvent],
    ) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        tx.prepare_cached(
            "INSERT INTO batches (portal, process_id, lane, origin, fetched_at)
             VALUES (?1, ?2, 'normal', 'fetched', ?3)",
        )?
        .execute(params![portal, process_id, fetched_at])?;
        let batch_id = tx.last_insert_rowid();
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO events (envelope_id, portal, batch_id, offline_id, event, message_id,
                                     timestamp, data, additional, lane, fetched_at, status, upstream)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'normal', ?10, 'pending', 'reserved')",
            )?;
            for e in events {
                insert.execute(params![
                    e.envelope_id,
                    portal,
                    batch_id,
                    e.offline_id,
                    e.event,
                    e.message_id,
                    e.timestamp,
                    e.data,
                    e.additional,
                    fetched_at,
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_batches_land_in_the_journal_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bare.db");
        let mut bare = BareInserts::create(&path).unwrap();
        let event = |id: i64| BaselineEvent {
            envelope_id: format!("main:{id}"),
            offline_id: id,
            event: "ONCRMDEALADD".to_string(),
            message_id: format!("{id:032x}"),
            timestamp: "2026-01-01T00:00:00+03:00".to_string(),
            data: "{}".to_string(),
            additional: "{}".to_string(),
        };
        bare.insert_batch("main", "p1", "2026-01-01T00:00:01Z", &[event(1), event(2)])
            .unwrap();
        bare.insert_batch("main", "p2", "2026-01-01T00:00:02Z", &[event(3)])
            .unwrap();
        let conn = Connection::open(&path).unwrap();
        let (events, batches): (i64, i64) = conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM events WHERE status = 'pending'),
                        (SELECT COUNT(DISTINCT batch_id) FROM events)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((events, batches), (3, 2));
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, super::super::schema::SCHEMA_VERSION);
    }
}
