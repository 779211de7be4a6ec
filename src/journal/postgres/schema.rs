//! The PostgreSQL journal's schema and its migrations, recorded in `schema_history`.
//!
//! The tables are those of the SQLite journal (docs/JOURNAL.md) with PostgreSQL types: ids
//! are `bigint` identities, times are `timestamptz`, and an event's `data` and `additional`
//! are kept as the text the portal sent (not `jsonb`, which would reorder keys and drop
//! duplicates: an envelope must carry what Bitrix24 sent). Everything lives in the configured
//! schema (`[journal] schema`, default `b24eventd`), which the first start creates.

use tokio_postgres::{Client, Transaction};

/// Each entry migrates from version `i` to `i + 1`. Append only: never edit a shipped migration.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the journal as the SQLite journal's schema 6 holds it, and the instances and
    // portal leases of several daemons sharing it (docs/CLUSTER.md)
    r#"
    CREATE TABLE portals (
        name            text PRIMARY KEY,
        member_id       text,
        client_endpoint text,
        first_seen_at   timestamptz NOT NULL
    );
    CREATE TABLE tokens (
        portal          text PRIMARY KEY REFERENCES portals(name),
        access_token    text NOT NULL,
        refresh_token   text NOT NULL,
        expires_at      timestamptz,
        scope           text,
        member_id       text,
        client_endpoint text,
        user_id         bigint,
        updated_at      timestamptz NOT NULL
    );
    CREATE TABLE batches (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        portal      text NOT NULL,
        process_id  text NOT NULL,
        lane        text NOT NULL CHECK (lane IN ('normal', 'error')),
        origin      text NOT NULL CHECK (origin IN ('fetched', 'adopted')),
        fetched_at  timestamptz NOT NULL,
        settled_at  timestamptz,
        UNIQUE (portal, process_id)
    );
    CREATE INDEX batches_open ON batches (portal) WHERE settled_at IS NULL;
    CREATE TABLE events (
        id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        envelope_id  text NOT NULL,
        portal       text NOT NULL,
        batch_id     bigint NOT NULL REFERENCES batches(id),
        offline_id   bigint NOT NULL,
        event        text NOT NULL,
        message_id   text NOT NULL,
        timestamp    text NOT NULL,
        change_key   text,
        data         text NOT NULL,
        additional   text NOT NULL,
        entity       text,
        entity_error text,
        enrichment   text,
        lane         text NOT NULL CHECK (lane IN ('normal', 'error')),
        fetched_at   timestamptz NOT NULL,
        status       text NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
        upstream     text NOT NULL CHECK (upstream IN ('reserved', 'clear_pending', 'error_pending', 'cleared', 'errored')),
        settled_at   timestamptz,
        UNIQUE (batch_id, offline_id)
    );
    CREATE INDEX events_unsettled ON events (portal, upstream)
        WHERE upstream IN ('reserved', 'clear_pending', 'error_pending');
    CREATE INDEX events_envelope_id ON events (envelope_id);
    CREATE INDEX events_event_fetched ON events (event, fetched_at);
    CREATE INDEX events_pending ON events (portal) WHERE status = 'pending';
    CREATE INDEX events_settled ON events (settled_at) WHERE settled_at IS NOT NULL;
    CREATE INDEX events_enrichment ON events (portal, id) WHERE enrichment IS NOT NULL;
    CREATE INDEX events_offline_id ON events (portal, offline_id);
    CREATE TABLE deliveries (
        event_id        bigint NOT NULL REFERENCES events(id) ON DELETE CASCADE,
        sink            text NOT NULL,
        status          text NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
        attempts        bigint NOT NULL DEFAULT 0,
        next_attempt_at timestamptz NOT NULL,
        last_error      text,
        delivered_at    timestamptz,
        replays         bigint NOT NULL DEFAULT 0,
        PRIMARY KEY (event_id, sink)
    );
    CREATE INDEX deliveries_due ON deliveries (sink, next_attempt_at, event_id) WHERE status = 'pending';
    CREATE TABLE delivery_attempts (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_id    bigint NOT NULL REFERENCES events(id) ON DELETE CASCADE,
        sink        text NOT NULL,
        attempt     bigint NOT NULL,
        at          timestamptz NOT NULL,
        outcome     text NOT NULL CHECK (outcome IN ('delivered', 'retry', 'dead')),
        error       text,
        output      text
    );
    CREATE INDEX delivery_attempts_event ON delivery_attempts (event_id);
    CREATE INDEX delivery_attempts_dead ON delivery_attempts (id) WHERE outcome = 'dead';
    CREATE TABLE conformance (
        portal      text NOT NULL,
        check_name  text NOT NULL,
        status      text NOT NULL CHECK (status IN ('ok', 'fail', 'skipped')),
        observed    text NOT NULL,
        value       bigint,
        run_id      text NOT NULL,
        checked_at  timestamptz NOT NULL,
        PRIMARY KEY (portal, check_name)
    );
    CREATE TABLE instances (
        id           text PRIMARY KEY,
        host         text NOT NULL,
        pid          integer NOT NULL,
        version      text NOT NULL,
        started_at   timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now(),
        expires_at   timestamptz NOT NULL
    );
    CREATE TABLE portal_leases (
        portal      text PRIMARY KEY,
        owner       text,
        epoch       bigint NOT NULL DEFAULT 0,
        acquired_at timestamptz,
        expires_at  timestamptz,
        sweep_after timestamptz,
        handovers   bigint NOT NULL DEFAULT 0
    );
    CREATE INDEX portal_leases_owner ON portal_leases (owner);
    CREATE VIEW event_overview AS
        SELECT e.id, e.envelope_id, e.portal, e.event, e.offline_id, e.lane, e.status, e.upstream,
               e.fetched_at, e.settled_at, b.process_id,
               (SELECT string_agg(d.sink || '=' || d.status, ' ' ORDER BY d.sink)
                FROM deliveries d WHERE d.event_id = e.id) AS sinks
        FROM events e JOIN batches b ON b.id = e.batch_id;
    CREATE VIEW backlog AS
        SELECT portal,
               COUNT(*) FILTER (WHERE upstream IN ('reserved', 'clear_pending', 'error_pending')) AS unsettled,
               COUNT(*) FILTER (WHERE status = 'pending') AS pending,
               COUNT(*) FILTER (WHERE status = 'dead') AS dead,
               MIN(fetched_at) FILTER (WHERE status = 'pending') AS oldest_pending_fetched_at
        FROM events GROUP BY portal;
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
               COUNT(*) FILTER (WHERE d.status = 'pending') AS pending,
               COUNT(*) FILTER (WHERE d.status = 'pending' AND d.attempts > 0) AS retrying,
               COUNT(*) FILTER (WHERE d.status = 'delivered') AS delivered,
               COUNT(*) FILTER (WHERE d.status = 'dead') AS dead,
               MIN(e.fetched_at) FILTER (WHERE d.status = 'pending') AS oldest_pending_fetched_at
        FROM deliveries d JOIN events e ON e.id = d.event_id
        GROUP BY e.portal, d.sink;
    "#,
];

/// The schema version this build writes.
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The advisory lock that serialises migrations between instances starting together
/// (`pg_advisory_xact_lock`): this class, with the schema's `hashtext` as the second key, so
/// journals in other schemas migrate on their own.
pub(super) const MIGRATION_LOCK: i32 = 0x6232_346d; // "b24m"

/// The version of the journal in `schema`: 0 when the schema or its history table is missing.
pub(super) async fn version(client: &Client, schema: &str) -> anyhow::Result<i64> {
    let row = client
        .query_one(
            "SELECT to_regclass(quote_ident($1) || '.schema_history') IS NOT NULL",
            &[&schema],
        )
        .await?;
    if !row.get::<_, bool>(0) {
        return Ok(0);
    }
    let row = client
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_history", &[])
        .await?;
    Ok(row.get::<_, i32>(0) as i64)
}

/// Creates `schema` if missing and brings it up to [`SCHEMA_VERSION`], one transaction per
/// step, under an advisory lock so that instances starting together migrate once. A journal
/// written by a newer build is refused rather than guessed at.
pub(super) async fn migrate(client: &mut Client, schema: &str) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    migrate_in(&tx, schema).await?;
    tx.commit().await?;
    Ok(())
}

/// [`migrate`] inside the caller's transaction (`journal migrate` creates the schema and fills
/// it in one): nothing is kept unless the caller commits.
pub(super) async fn migrate_in(tx: &Transaction<'_>, schema: &str) -> anyhow::Result<()> {
    let quoted = super::quote_ident(schema);
    tx.query_one(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&MIGRATION_LOCK, &schema],
    )
    .await?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {quoted};
         CREATE TABLE IF NOT EXISTS {quoted}.schema_history (
             version    integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"
    ))
    .await?;
    let current: i32 = tx
        .query_one(
            &format!("SELECT COALESCE(MAX(version), 0) FROM {quoted}.schema_history"),
            &[],
        )
        .await?
        .get(0);
    let current = current as i64;
    if current > SCHEMA_VERSION {
        anyhow::bail!(
            "journal schema version {current} is newer than this build supports ({SCHEMA_VERSION}): upgrade b24eventd"
        );
    }
    // One transaction for every step: the advisory lock is held to the end, and a failed step
    // leaves the journal at the version it had (the caller's transaction rolls back).
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(&format!("SET LOCAL search_path TO {quoted};\n{sql}"))
            .await?;
        tx.execute(
            &format!("INSERT INTO {quoted}.schema_history (version) VALUES ($1)"),
            &[&(version as i32 + 1)],
        )
        .await?;
        tracing::info!(from = version, to = version + 1, "journal schema migrated");
    }
    Ok(())
}
