//! The journal's schema and its migrations, keyed by `PRAGMA user_version`.

use rusqlite::Connection;

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
    // 4 -> 5: the findings of the last conformance probe of each portal (`doctor --conformance`)
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

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the schema up to [`SCHEMA_VERSION`], one transaction per step. A journal written by a
/// newer build is refused rather than guessed at.
pub fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if current > SCHEMA_VERSION {
        anyhow::bail!(
            "journal schema version {current} is newer than this build supports ({SCHEMA_VERSION}): upgrade b24eventd"
        );
    }
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version as i64 + 1)?;
        tx.commit()?;
        tracing::info!(from = version, to = version + 1, "journal schema migrated");
    }
    Ok(())
}
