//! The journal's schema and its migrations, keyed by `PRAGMA user_version`.

use crate::envelope::Envelope;
use rusqlite::{Connection, Transaction, params};

/// Each entry migrates from version `i` to `i + 1`. Append only: never edit a shipped migration.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the initial schema (documented in docs/JOURNAL.md)
    r#"
    CREATE TABLE portals (
        name            TEXT PRIMARY KEY,
        member_id       TEXT,
        client_endpoint TEXT,
        first_seen_at   TEXT NOT NULL
    );
    CREATE TABLE tokens (
        portal          TEXT PRIMARY KEY REFERENCES portals(name),
        access_token    TEXT NOT NULL,
        refresh_token   TEXT NOT NULL,
        expires_at      TEXT,
        scope           TEXT,
        member_id       TEXT,
        client_endpoint TEXT,
        user_id         INTEGER,
        updated_at      TEXT NOT NULL
    );
    CREATE TABLE batches (
        id          INTEGER PRIMARY KEY,
        portal      TEXT NOT NULL,
        process_id  TEXT NOT NULL,
        lane        TEXT NOT NULL CHECK (lane IN ('normal', 'error')),
        origin      TEXT NOT NULL CHECK (origin IN ('fetched', 'adopted')),
        fetched_at  TEXT NOT NULL,
        settled_at  TEXT,
        UNIQUE (portal, process_id)
    );
    CREATE INDEX batches_open ON batches (portal) WHERE settled_at IS NULL;
    CREATE TABLE events (
        id          INTEGER PRIMARY KEY,
        envelope_id TEXT NOT NULL,
        portal      TEXT NOT NULL,
        batch_id    INTEGER NOT NULL REFERENCES batches(id),
        offline_id  INTEGER NOT NULL,
        event       TEXT NOT NULL,
        message_id  TEXT NOT NULL,
        timestamp   TEXT NOT NULL,
        data        TEXT NOT NULL,
        additional  TEXT NOT NULL,
        entity      TEXT,
        lane        TEXT NOT NULL CHECK (lane IN ('normal', 'error')),
        fetched_at  TEXT NOT NULL,
        status      TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
        upstream    TEXT NOT NULL CHECK (upstream IN ('reserved', 'clear_pending', 'error_pending', 'cleared', 'errored')),
        settled_at  TEXT,
        UNIQUE (batch_id, offline_id)
    );
    CREATE INDEX events_unsettled ON events (portal, upstream)
        WHERE upstream IN ('reserved', 'clear_pending', 'error_pending');
    CREATE INDEX events_envelope_id ON events (envelope_id);
    CREATE INDEX events_event_fetched ON events (event, fetched_at);
    CREATE TABLE deliveries (
        event_id        INTEGER NOT NULL REFERENCES events(id) ON DELETE CASCADE,
        sink            TEXT NOT NULL,
        status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL,
        last_error      TEXT,
        delivered_at    TEXT,
        PRIMARY KEY (event_id, sink)
    ) WITHOUT ROWID;
    CREATE INDEX deliveries_due ON deliveries (sink, next_attempt_at) WHERE status = 'pending';
    CREATE TABLE delivery_attempts (
        id          INTEGER PRIMARY KEY,
        event_id    INTEGER NOT NULL REFERENCES events(id) ON DELETE CASCADE,
        sink        TEXT NOT NULL,
        attempt     INTEGER NOT NULL,
        at          TEXT NOT NULL,
        outcome     TEXT NOT NULL CHECK (outcome IN ('delivered', 'retry', 'dead')),
        error       TEXT
    );
    CREATE INDEX delivery_attempts_event ON delivery_attempts (event_id);
    CREATE VIEW event_overview AS
        SELECT e.id, e.envelope_id, e.portal, e.event, e.offline_id, e.lane, e.status, e.upstream,
               e.fetched_at, e.settled_at, b.process_id,
               (SELECT group_concat(d.sink || '=' || d.status, ' ') FROM deliveries d WHERE d.event_id = e.id) AS sinks
        FROM events e JOIN batches b ON b.id = e.batch_id;
    CREATE VIEW backlog AS
        SELECT portal,
               SUM(upstream IN ('reserved', 'clear_pending', 'error_pending')) AS unsettled,
               SUM(status = 'pending') AS pending,
               SUM(status = 'dead') AS dead,
               MIN(CASE WHEN status = 'pending' THEN fetched_at END) AS oldest_pending_fetched_at
        FROM events GROUP BY portal;
    "#,
    // 1 -> 2: what a sink printed (exec stdout/stderr), replay counts, and views for sqlite3 users
    r#"
    ALTER TABLE delivery_attempts ADD COLUMN output TEXT;
    ALTER TABLE deliveries ADD COLUMN replays INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX events_pending ON events (portal) WHERE status = 'pending';
    CREATE INDEX events_settled ON events (settled_at) WHERE settled_at IS NOT NULL;
    CREATE VIEW v_pending AS
        SELECT e.id, e.envelope_id, e.portal, e.event, d.sink, d.attempts, d.next_attempt_at,
               d.last_error, e.fetched_at
        FROM deliveries d JOIN events e ON e.id = d.event_id
        WHERE d.status = 'pending';
    CREATE VIEW v_dead AS
        SELECT e.id, e.envelope_id, e.portal, e.event, d.sink, d.attempts, d.last_error,
               e.fetched_at, e.upstream
        FROM deliveries d JOIN events e ON e.id = d.event_id
        WHERE d.status = 'dead';
    CREATE VIEW v_sink_stats AS
        SELECT e.portal, d.sink,
               SUM(d.status = 'pending') AS pending,
               SUM(d.status = 'pending' AND d.attempts > 0) AS retrying,
               SUM(d.status = 'delivered') AS delivered,
               SUM(d.status = 'dead') AS dead,
               MIN(CASE WHEN d.status = 'pending' THEN e.fetched_at END) AS oldest_pending_fetched_at
        FROM deliveries d JOIN events e ON e.id = d.event_id
        GROUP BY e.portal, d.sink;
    "#,
    // 2 -> 3: the status page and the dead-event alert read the newest dead attempts
    r#"
    CREATE INDEX delivery_attempts_dead ON delivery_attempts (id) WHERE outcome = 'dead';
    "#,
    // 3 -> 4: enrichment (the entity read for an event before its deliveries start)
    r#"
    ALTER TABLE events ADD COLUMN entity_error TEXT;
    ALTER TABLE events ADD COLUMN enrichment TEXT;
    CREATE INDEX events_enrichment ON events (portal, id) WHERE enrichment IS NOT NULL;
    "#,
    // 4 -> 5: the change an event row carries (`Envelope::change_key` of its TIMESTAMP_X), so a
    // later row of the same change gets the same key and an error-lane copy skips the sinks
    // that have it. SQLite parses the form the portal sends (`2024-07-18T12:32:31+02:00`, or
    // `Z`); `backfill_change_keys` computes every other row in Rust. Keys already given stay.
    r#"
    ALTER TABLE events ADD COLUMN change_key TEXT;
    UPDATE events SET change_key = CAST(strftime('%s', timestamp) AS INTEGER)
    WHERE timestamp GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9][+-][0-9][0-9]:[0-9][0-9]'
       OR timestamp GLOB '[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]:[0-9][0-9]Z';
    CREATE INDEX events_offline_id ON events (portal, offline_id);
    "#,
    // 5 -> 6: the findings of the last conformance probe of each portal (`doctor --conformance`)
    r#"
    CREATE TABLE conformance (
        portal      TEXT NOT NULL,
        check_name  TEXT NOT NULL,
        status      TEXT NOT NULL CHECK (status IN ('ok', 'fail', 'skipped')),
        observed    TEXT NOT NULL,
        value       INTEGER,
        run_id      TEXT NOT NULL,
        checked_at  TEXT NOT NULL,
        PRIMARY KEY (portal, check_name)
    ) WITHOUT ROWID;
    "#,
];

/// The schema version that added `events.change_key`.
const CHANGE_KEY_VERSION: usize = 5;

/// The schema version this build writes.
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the schema up to [`SCHEMA_VERSION`], one transaction per step. A journal written by a
/// newer build is refused rather than guessed at.
pub(super) fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > SCHEMA_VERSION {
        anyhow::bail!(
            "journal schema version {current} is newer than this build supports ({SCHEMA_VERSION}): upgrade b24eventd"
        );
    }
    migrate_to(conn, current, SCHEMA_VERSION)
}

/// Runs the migrations from version `from` up to `to`.
pub(super) fn migrate_to(conn: &mut Connection, from: i64, to: i64) -> anyhow::Result<()> {
    for (version, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(to as usize)
        .skip(from as usize)
    {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        if version + 1 == CHANGE_KEY_VERSION {
            backfill_change_keys(&tx)?;
        }
        tx.pragma_update(None, "user_version", version as i64 + 1)?;
        tx.commit()?;
        tracing::info!(from = version, to = version + 1, "journal schema migrated");
    }
    Ok(())
}

/// The rows the SQL of migration 4 -> 5 left without a `change_key` (a `TIMESTAMP_X` in
/// another form, or none): computed as new rows compute it.
fn backfill_change_keys(tx: &Transaction<'_>) -> anyhow::Result<()> {
    let rows: Vec<(i64, String)> = tx
        .prepare("SELECT id, timestamp FROM events WHERE change_key IS NULL")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut update = tx.prepare("UPDATE events SET change_key = ?2 WHERE id = ?1")?;
    for (id, timestamp) in &rows {
        update.execute(params![id, Envelope::change_key(timestamp)])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal at `version`, in memory.
    fn at_version(version: i64) -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 0, version).unwrap();
        conn
    }

    fn insert_event(conn: &Connection, offline_id: i64, timestamp: &str) {
        conn.execute(
            "INSERT OR IGNORE INTO batches (id, portal, process_id, lane, origin, fetched_at)
             VALUES (1, 'main', 'p1', 'normal', 'fetched', '2026-11-22T07:00:00.000Z')",
            [],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO events (envelope_id, portal, batch_id, offline_id, event, message_id,
                                 timestamp, data, additional, lane, fetched_at, status, upstream)
             VALUES (?1, 'main', 1, ?2, 'ONCRMDEALUPDATE', 'm', ?3, '{}', '{}', 'normal',
                     '2026-11-22T07:00:00.000Z', 'delivered', 'cleared')",
            params![format!("main:{offline_id}"), offline_id, timestamp],
        )
        .unwrap();
    }

    /// SQLite's `strftime('%s')` and [`Envelope::change_key`] agree on every `TIMESTAMP_X` the
    /// SQL backfill takes; what it leaves is computed in Rust, so every row ends with the key a
    /// new row of the same text would get.
    #[test]
    fn the_backfill_gives_every_row_the_change_key_rust_computes() {
        let mut conn = at_version(4);
        let stamps = [
            "2024-07-18T12:32:31+02:00",
            "2024-07-18T10:32:31+00:00",
            "2024-07-18T05:32:31-05:00",
            "2024-07-18T18:02:31+07:30",
            "2024-12-31T23:59:59+14:00",
            "2025-01-01T00:00:00-12:00",
            "2026-11-22T10:00:00+03:00",
            "2024-07-18T10:32:31Z",
            "1970-01-01T00:00:00Z",
            // Not the portal's form: left to the Rust pass.
            "2024-07-18T12:32:31+0200",
            "2024-07-18 12:32:31",
            "18.07.2024 12:32:31",
            "2024-13-18T12:32:31+02:00",
            "",
        ];
        for (i, stamp) in stamps.iter().enumerate() {
            insert_event(&conn, i as i64 + 1, stamp);
        }
        let by_sqlite: Vec<Option<String>> = stamps
            .iter()
            .map(|s| {
                conn.query_row(
                    "SELECT CAST(CAST(strftime('%s', ?1) AS INTEGER) AS TEXT)",
                    [s],
                    |r| r.get(0),
                )
                .unwrap()
            })
            .collect();
        for (stamp, sqlite) in stamps.iter().zip(&by_sqlite).take(9) {
            assert_eq!(
                sqlite.as_deref(),
                Some(Envelope::change_key(stamp).as_str()),
                "SQLite and Rust read {stamp:?} alike"
            );
        }
        assert_eq!(by_sqlite[0].as_deref(), Some("1721298751"));

        // The migration's SQL alone keys the portal's form (the first nine), and leaves the rest.
        {
            let tx = conn.transaction().unwrap();
            tx.execute_batch(MIGRATIONS[CHANGE_KEY_VERSION - 1])
                .unwrap();
            let by_sql: Vec<Option<String>> = tx
                .prepare("SELECT change_key FROM events ORDER BY id")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            for (i, (stamp, key)) in stamps.iter().zip(&by_sql).enumerate() {
                let expected = (i < 9).then(|| Envelope::change_key(stamp));
                assert_eq!(key, &expected, "{stamp:?} by the SQL step");
            }
            // Not committed: the whole migration runs below.
        }
        migrate_to(&mut conn, 4, SCHEMA_VERSION).unwrap();
        let rows: Vec<(String, String, Option<String>)> = conn
            .prepare("SELECT envelope_id, timestamp, change_key FROM events ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows.len(), stamps.len());
        for (i, (envelope_id, timestamp, change_key)) in rows.iter().enumerate() {
            assert_eq!(
                envelope_id,
                &format!("main:{}", i + 1),
                "keys already given stay"
            );
            assert_eq!(
                change_key.as_deref(),
                Some(Envelope::change_key(timestamp).as_str()),
                "row {envelope_id} ({timestamp:?})"
            );
        }
        assert_eq!(rows[9].2.as_deref(), Some("1721298751"), "+0200 by Rust");
        assert!(rows[11].2.as_deref().is_some_and(|k| k.starts_with('h')));
        let indexed: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'events_offline_id'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(indexed, 1);
    }
}
