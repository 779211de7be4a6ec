//! The `postgres` sink: inserts each envelope as a row (`INSERT … ON CONFLICT (id) DO NOTHING`),
//! a whole batch in one transaction, delivered only once `COMMIT` returned.
//!
//! The envelope `id` is the primary key, so a redelivery inserts nothing (and is recorded in the
//! journal's attempt output as a duplicate). A batch that fails with a data error (SQLSTATE 22,
//! 23) is tried again one row per transaction so one poison event does not hold back the rest.
//! One connection per sink, reopened on the next attempt after it broke. TLS (rustls, ring,
//! system trust store) when the URL says `sslmode=prefer|require|verify-ca|verify-full`.

use super::{Health, Sink, SinkResult};
use super::{SinkConfig, SinkKind};
use crate::BoxFuture;
use crate::envelope::Envelope;
use crate::options::{ConfigError, SinkOptions, redact_url};
use crate::pg::{Tls, connect_config, start, tls_connector};
use serde::Deserialize;
use std::collections::HashSet;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_postgres::types::ToSql;

/// Rows per batch for each unit of `concurrency` (the default 4 gives 500 rows per transaction).
const ROWS_PER_SLOT: usize = 125;
/// The most rows in one INSERT: 7 parameters each, under PostgreSQL's 65,535.
const MAX_ROWS: usize = 5000;
const DEFAULT_TABLE: &str = "b24_events";
/// The columns a delivery writes, in insert order.
const INSERT_COLUMNS: [&str; 7] = [
    "id",
    "portal",
    "event",
    "offline_id",
    "message_id",
    "timestamp",
    "payload",
];

/// `type = "postgres"`.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresSinkConfig {
    /// `postgres://user:password@host:5432/db?...`; print it with [`redact_url`].
    pub url: String,
    /// The table, optionally schema-qualified, as configured (unquoted).
    pub table: TableName,
    pub create_table: bool,
    pub tls: Tls,
}

impl super::SinkTypeConfig for PostgresSinkConfig {
    fn register_credentials(&self) {
        super::register_url_password(&self.url);
    }
}

impl std::fmt::Debug for PostgresSinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSinkConfig")
            .field("url", &redact_url(&self.url))
            .field("table", &self.table)
            .field("create_table", &self.create_table)
            .field("tls", &self.tls)
            .finish()
    }
}

/// A table name, optionally with its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: Option<String>,
    pub name: String,
}

impl TableName {
    /// The name as SQL, each part double-quoted.
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", quote_ident(schema), quote_ident(&self.name)),
            None => quote_ident(&self.name),
        }
    }

    /// The name as configured, for messages.
    pub fn shown(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}.{}", self.name),
            None => self.name.clone(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    url: String,
    table: Option<String>,
    create_table: Option<bool>,
}

/// Reads `[sinks.NAME]` of `type = "postgres"`.
pub(crate) fn parse_config(options: &SinkOptions) -> Result<SinkKind, ConfigError> {
    let raw: Raw = options.parse()?;
    let (_, tls) = connect_config(&raw.url).map_err(|m| options.err("url", m))?;
    let table = parse_table(raw.table.as_deref().unwrap_or(DEFAULT_TABLE))
        .map_err(|m| options.err("table", m))?;
    Ok(SinkKind::Postgres(PostgresSinkConfig {
        url: raw.url,
        table,
        create_table: raw.create_table.unwrap_or(true),
        tls,
    }))
}

/// `table` or `schema.table`: each part a plain identifier (letters, digits, `_`, `$`; not
/// starting with a digit or `$`; at most 63 bytes). Quoted in SQL, so case is kept.
fn parse_table(text: &str) -> Result<TableName, String> {
    let parts: Vec<&str> = text.split('.').collect();
    let check = |part: &str| -> Result<(), String> {
        let valid_start = part
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let valid_rest = part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
        if !valid_start || !valid_rest || part.len() > 63 {
            return Err(format!(
                "{text:?} is not a table name: write a name of letters, digits and _ (at most 63), \
                 optionally schema-qualified, e.g. \"b24_events\" or \"bitrix.events\""
            ));
        }
        Ok(())
    };
    match parts.as_slice() {
        [name] => {
            check(name)?;
            Ok(TableName {
                schema: None,
                name: name.to_string(),
            })
        }
        [schema, name] => {
            check(schema)?;
            check(name)?;
            Ok(TableName {
                schema: Some(schema.to_string()),
                name: name.to_string(),
            })
        }
        _ => Err(format!(
            "{text:?} is not a table name: at most one \".\" (schema.table)"
        )),
    }
}

fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// The table this sink creates when `create_table` is on (documented in docs/sinks/postgres.md).
fn create_table_sql(table: &TableName) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (
            id text PRIMARY KEY,
            portal text NOT NULL,
            event text NOT NULL,
            offline_id bigint NOT NULL,
            message_id text NOT NULL,
            \"timestamp\" timestamptz,
            payload jsonb NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now()
        )",
        table.quoted()
    )
}

/// `INSERT … VALUES (…), (…) ON CONFLICT (id) DO NOTHING RETURNING id` for `rows` rows.
fn insert_sql(table: &TableName, rows: usize) -> String {
    let columns = INSERT_COLUMNS.map(quote_ident).join(", ");
    let width = INSERT_COLUMNS.len();
    let values: Vec<String> = (0..rows)
        .map(|row| {
            let params: Vec<String> = (1..=width)
                .map(|col| format!("${}", row * width + col))
                .collect();
            format!("({})", params.join(", "))
        })
        .collect();
    format!(
        "INSERT INTO {} ({columns}) VALUES {} ON CONFLICT (id) DO NOTHING RETURNING id",
        table.quoted(),
        values.join(", ")
    )
}

/// The portal's timestamp as `timestamptz`, or NULL when it is not RFC 3339 (the envelope in
/// `payload` keeps the original text either way).
fn parse_timestamp(text: &str) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    chrono::DateTime::parse_from_rfc3339(text).ok()
}

/// One envelope as the parameters of one row.
struct Row<'a> {
    envelope: &'a Envelope,
    timestamp: Option<chrono::DateTime<chrono::FixedOffset>>,
    /// The whole envelope, for the `payload` column.
    payload: serde_json::Value,
}

impl<'a> Row<'a> {
    fn new(envelope: &'a Envelope) -> Result<Row<'a>, String> {
        let payload = serde_json::to_value(envelope)
            .map_err(|e| format!("cannot encode the envelope as JSON: {e}"))?;
        Ok(Row {
            envelope,
            timestamp: parse_timestamp(&envelope.timestamp),
            payload,
        })
    }

    /// The parameters in [`INSERT_COLUMNS`] order.
    fn params(&self) -> [&(dyn ToSql + Sync); 7] {
        [
            &self.envelope.id,
            &self.envelope.portal,
            &self.envelope.event,
            &self.envelope.offline_id,
            &self.envelope.message_id,
            &self.timestamp,
            &self.payload,
        ]
    }
}

/// How a database error is treated.
#[derive(Debug, PartialEq, Eq)]
enum Class {
    /// The connection is gone or unusable: reconnect, retry.
    Connection,
    /// Worth another attempt on the same connection (serialization, resources, schema or
    /// permissions the operator can fix).
    Retry,
    /// This data can never be inserted (class 22, or 23 other than the id conflict).
    Data,
}

fn classify(e: &tokio_postgres::Error) -> Class {
    let Some(code) = e.code() else {
        return Class::Connection;
    };
    classify_sqlstate(code.code())
}

fn classify_sqlstate(code: &str) -> Class {
    match code.get(..2) {
        Some("08" | "57") => Class::Connection,
        Some("22" | "23") => Class::Data,
        _ => Class::Retry,
    }
}

/// A database error as text: SQLSTATE, message, detail and hint (never the URL).
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(&format!("; {detail}"));
            }
            if let Some(hint) = db.hint() {
                text.push_str(&format!("; hint: {hint}"));
            }
            text
        }
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    }
}

/// What one insert transaction came to.
enum Outcome {
    /// Committed; the ids that were inserted (the others were already there).
    Committed(HashSet<String>),
    Failed(Class, String),
}

/// Inserts envelopes into a table.
pub(crate) struct PostgresSink {
    name: String,
    config: PostgresSinkConfig,
    timeout: Duration,
    max_batch: usize,
    /// The open connection; `None` before the first attempt and after it broke.
    client: Mutex<Option<tokio_postgres::Client>>,
}

impl PostgresSink {
    pub fn new(config: &SinkConfig, pg: &PostgresSinkConfig) -> anyhow::Result<PostgresSink> {
        // Refuse a URL the driver cannot use now rather than on every delivery.
        connect_config(&pg.url).map_err(|e| anyhow::anyhow!("sink {}: {e}", config.name))?;
        Ok(PostgresSink {
            name: config.name.clone(),
            config: pg.clone(),
            timeout: config.timeout,
            max_batch: (config.concurrency.max(1) * ROWS_PER_SLOT).min(MAX_ROWS),
            client: Mutex::new(None),
        })
    }

    fn shown_url(&self) -> String {
        redact_url(&self.config.url)
    }

    /// A new connection; the driver's connection task runs until the connection ends.
    async fn connect(&self) -> Result<tokio_postgres::Client, String> {
        let (mut config, tls) = connect_config(&self.config.url)?;
        config.connect_timeout(self.timeout);
        let connected = match tls {
            Tls::Off => start(&config, tokio_postgres::NoTls).await,
            Tls::Prefer | Tls::Require => start(&config, tls_connector()?).await,
        };
        connected.map_err(|e| format!("cannot connect to {}: {}", self.shown_url(), describe(&e)))
    }

    /// The open connection, or a new one (creating the table when configured).
    async fn ready<'a>(
        &self,
        slot: &'a mut Option<tokio_postgres::Client>,
    ) -> Result<&'a mut tokio_postgres::Client, String> {
        if slot.as_ref().is_some_and(|c| c.is_closed()) {
            *slot = None;
        }
        if slot.is_none() {
            let client = self.connect().await?;
            if self.config.create_table {
                client
                    .batch_execute(&create_table_sql(&self.config.table))
                    .await
                    .map_err(|e| {
                        format!(
                            "cannot create the table {}: {}",
                            self.config.table.shown(),
                            describe(&e)
                        )
                    })?;
            }
            *slot = Some(client);
        }
        Ok(slot.as_mut().expect("connected above"))
    }

    /// One transaction inserting `rows`; delivered only when COMMIT returned.
    async fn insert(client: &mut tokio_postgres::Client, sql: &str, rows: &[&Row<'_>]) -> Outcome {
        let run = async {
            let tx = client.transaction().await?;
            let params: Vec<&(dyn ToSql + Sync)> =
                rows.iter().flat_map(|row| row.params()).collect();
            let inserted = tx.query(sql, &params).await?;
            tx.commit().await?;
            Ok::<_, tokio_postgres::Error>(
                inserted
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<HashSet<_>>(),
            )
        };
        match run.await {
            Ok(inserted) => Outcome::Committed(inserted),
            Err(e) => Outcome::Failed(classify(&e), describe(&e)),
        }
    }

    /// Delivers a batch: one transaction; on a data error, one transaction per row.
    async fn deliver_rows(&self, batch: &[Envelope]) -> Vec<(SinkResult, Option<String>)> {
        let mut results: Vec<Option<(SinkResult, Option<String>)>> = vec![None; batch.len()];
        let mut pending: Vec<(usize, Row)> = Vec::with_capacity(batch.len());
        for (i, envelope) in batch.iter().enumerate() {
            match Row::new(envelope) {
                Ok(row) => pending.push((i, row)),
                Err(error) => results[i] = Some((SinkResult::Dead { error }, None)),
            }
        }
        let mut slot = self.client.lock().await;
        let client = match self.ready(&mut slot).await {
            Ok(client) => client,
            Err(error) => {
                if slot.as_ref().is_some_and(|c| c.is_closed()) {
                    *slot = None;
                }
                tracing::warn!(sink = %self.name, events = batch.len(), error = %error, "postgres sink cannot insert");
                return fill(results, || SinkResult::Retry {
                    error: error.clone(),
                    after: None,
                });
            }
        };

        let rows: Vec<&Row> = pending.iter().map(|(_, row)| row).collect();
        let outcome =
            Self::insert(client, &insert_sql(&self.config.table, rows.len()), &rows).await;
        match outcome {
            Outcome::Committed(inserted) => {
                for (i, _) in &pending {
                    results[*i] = Some(delivered(&batch[*i].id, &inserted));
                }
            }
            Outcome::Failed(Class::Data, error) if pending.len() > 1 => {
                tracing::info!(sink = %self.name, events = pending.len(), error = %error, "a batch failed with a data error: inserting its rows one by one");
                let single = insert_sql(&self.config.table, 1);
                for (i, row) in &pending {
                    let outcome = Self::insert(client, &single, &[row]).await;
                    results[*i] = Some(self.row_result(&batch[*i].id, outcome));
                }
            }
            outcome => {
                let id = pending
                    .first()
                    .map(|(i, _)| batch[*i].id.as_str())
                    .unwrap_or_default();
                let result = self.row_result(id, outcome);
                for (i, _) in &pending {
                    results[*i] = Some(result.clone());
                }
            }
        }
        if slot.as_ref().is_some_and(|c| c.is_closed()) {
            *slot = None;
        }
        fill(results, || SinkResult::Retry {
            error: "not attempted".into(),
            after: None,
        })
    }

    fn row_result(&self, id: &str, outcome: Outcome) -> (SinkResult, Option<String>) {
        match outcome {
            Outcome::Committed(inserted) => delivered(id, &inserted),
            Outcome::Failed(Class::Data, error) => {
                tracing::debug!(sink = %self.name, event_id = %id, error = %error, "postgres refused the row");
                (
                    SinkResult::Dead {
                        error: format!("{} refused the row: {error}", self.config.table.shown()),
                    },
                    None,
                )
            }
            Outcome::Failed(_, error) => (
                SinkResult::Retry {
                    error: format!("insert into {} failed: {error}", self.config.table.shown()),
                    after: None,
                },
                None,
            ),
        }
    }

    /// What a delivery needs: a connection, the table with the expected columns (or
    /// `create_table` with the right to create it), a unique id, and the INSERT privilege.
    async fn probe(&self) -> Health {
        let client = match self.connect().await {
            Ok(client) => client,
            Err(e) => {
                return Health::fail(
                    e,
                    "check the sink's url (host, port, database, user, password, sslmode) and that PostgreSQL accepts connections from this host",
                );
            }
        };
        match self.check_table(&client).await {
            Ok(health) => health,
            Err(e) => Health::fail(
                format!(
                    "cannot inspect the table {}: {}",
                    self.config.table.shown(),
                    describe(&e)
                ),
                "check the user's privileges on the schema and table",
            ),
        }
    }

    async fn check_table(
        &self,
        client: &tokio_postgres::Client,
    ) -> Result<Health, tokio_postgres::Error> {
        let table = &self.config.table;
        let schema: String = match &table.schema {
            Some(schema) => schema.clone(),
            None => client
                .query_one("SELECT current_schema()", &[])
                .await?
                .get(0),
        };
        let columns: HashSet<String> = client
            .query(
                "SELECT column_name::text FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
                &[&schema, &table.name],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if columns.is_empty() {
            if !self.config.create_table {
                return Ok(Health::fail(
                    format!("the table {} does not exist", table.shown()),
                    "create it (the schema is in docs/sinks/postgres.md) or set create_table = true",
                ));
            }
            let can_create: bool = client
                .query_one(
                    "SELECT has_schema_privilege($1::text, 'CREATE')",
                    &[&schema],
                )
                .await?
                .get(0);
            return Ok(if can_create {
                Health::ok(format!(
                    "{}: the table {} does not exist yet and is created by the first delivery",
                    self.shown_url(),
                    table.shown()
                ))
            } else {
                Health::fail(
                    format!(
                        "the table {} does not exist and the user may not create tables in schema {schema}",
                        table.shown()
                    ),
                    format!(
                        "create the table, or GRANT CREATE ON SCHEMA {schema} to the sink's user"
                    ),
                )
            });
        }
        let missing: Vec<&str> = INSERT_COLUMNS
            .iter()
            .copied()
            .filter(|c| !columns.contains(*c))
            .collect();
        if !missing.is_empty() {
            return Ok(Health::fail(
                format!(
                    "the table {} lacks the columns {}",
                    table.shown(),
                    missing.join(", ")
                ),
                "add them (see docs/sinks/postgres.md) or point the sink at another table",
            ));
        }
        let quoted = table.quoted();
        let unique_id: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a
                   ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                 WHERE i.indrelid = $1::text::regclass AND i.indisunique AND i.indnkeyatts = 1
                   AND a.attname = 'id')",
                &[&quoted],
            )
            .await?
            .get(0);
        if !unique_id {
            return Ok(Health::fail(
                format!(
                    "the column id of {} is not unique (no primary key or unique index on it)",
                    table.shown()
                ),
                format!("ALTER TABLE {quoted} ADD PRIMARY KEY (id): ON CONFLICT (id) needs it"),
            ));
        }
        let can_insert: bool = client
            .query_one("SELECT has_table_privilege($1::text, 'INSERT')", &[&quoted])
            .await?
            .get(0);
        if !can_insert {
            return Ok(Health::fail(
                format!("the user may not INSERT into {}", table.shown()),
                format!("GRANT INSERT ON {quoted} TO the sink's user"),
            ));
        }
        // An exact count up to EXACT_ROWS (reading at most that many rows), else the planner's
        // estimate. pg_class.reltuples alone is -1 (PostgreSQL 14 and later) or 0 until the
        // table is first vacuumed or analyzed, so a table with rows read as "about 0"
        // (https://www.postgresql.org/docs/current/catalog-pg-class.html).
        let counted: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM (SELECT 1 FROM {quoted} LIMIT {}) t",
                    EXACT_ROWS + 1
                ),
                &[],
            )
            .await?
            .get(0);
        let estimate: f32 = client
            .query_one(
                "SELECT reltuples FROM pg_class WHERE oid = $1::text::regclass",
                &[&quoted],
            )
            .await?
            .get(0);
        Ok(Health::ok(format!(
            "{}: table {} has the expected columns, a unique id and INSERT privilege ({})",
            self.shown_url(),
            table.shown(),
            rows_text(counted, f64::from(estimate))
        )))
    }
}

/// Rows the health check counts exactly; above, it reports the planner's estimate.
const EXACT_ROWS: i64 = 10_000;

/// The table's size as the health check says it: `counted` rows read with a limit of
/// [`EXACT_ROWS`] + 1 is exact up to that bound; above it, `estimate` (`pg_class.reltuples`) is
/// shown as one ("about N rows") when it is above the bound, else only the bound is known.
fn rows_text(counted: i64, estimate: f64) -> String {
    if counted <= EXACT_ROWS {
        return format!("{counted} row{}", if counted == 1 { "" } else { "s" });
    }
    if estimate > EXACT_ROWS as f64 {
        format!("about {} rows", estimate.round() as i64)
    } else {
        format!("more than {EXACT_ROWS} rows")
    }
}

/// Delivered; the output notes a row that was already there (a redelivery).
fn delivered(id: &str, inserted: &HashSet<String>) -> (SinkResult, Option<String>) {
    let output = (!inserted.contains(id))
        .then(|| "duplicate: a row with this id was already in the table".to_string());
    (SinkResult::Delivered, output)
}

fn fill(
    results: Vec<Option<(SinkResult, Option<String>)>>,
    missing: impl Fn() -> SinkResult,
) -> Vec<(SinkResult, Option<String>)> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| (missing(), None)))
        .collect()
}

impl Sink for PostgresSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn deliver<'a>(&'a self, batch: &'a [Envelope]) -> BoxFuture<'a, Vec<SinkResult>> {
        super::without_output(self.deliver_with_output(batch))
    }

    fn deliver_with_output<'a>(
        &'a self,
        batch: &'a [Envelope],
    ) -> BoxFuture<'a, Vec<(SinkResult, Option<String>)>> {
        Box::pin(async move {
            if batch.is_empty() {
                return Vec::new();
            }
            match tokio::time::timeout(self.timeout, self.deliver_rows(batch)).await {
                Ok(results) => results,
                Err(_) => {
                    // The connection's state is unknown (COMMIT may be in flight): start afresh.
                    if let Ok(mut slot) = self.client.try_lock() {
                        *slot = None;
                    }
                    let error = format!(
                        "insert into {} took longer than {}",
                        self.config.table.shown(),
                        humantime::format_duration(self.timeout)
                    );
                    tracing::warn!(sink = %self.name, events = batch.len(), error = %error, "postgres sink timed out");
                    vec![(SinkResult::Retry { error, after: None }, None); batch.len()]
                }
            }
        })
    }

    fn health(&self) -> BoxFuture<'_, Health> {
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, self.probe()).await {
                Ok(health) => health,
                Err(_) => Health::fail(
                    format!(
                        "{} did not answer within {}",
                        self.shown_url(),
                        humantime::format_duration(self.timeout)
                    ),
                    "check that PostgreSQL runs and is reachable from this host",
                ),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_count_is_exact_up_to_the_bound_and_about_only_for_an_estimate() {
        // Before ANALYZE reltuples is -1 (or 0): the count says what is there.
        assert_eq!(rows_text(140, -1.0), "140 rows");
        assert_eq!(rows_text(1, 0.0), "1 row");
        assert_eq!(rows_text(0, -1.0), "0 rows");
        assert_eq!(rows_text(EXACT_ROWS, 3.0), "10000 rows");
        assert_eq!(rows_text(EXACT_ROWS + 1, 2_500_000.4), "about 2500000 rows");
        assert_eq!(rows_text(EXACT_ROWS + 1, -1.0), "more than 10000 rows");
    }

    /// Loads a config with one portal and `[sinks.db]` holding `keys`.
    fn load(keys: &str) -> Result<SinkKind, ConfigError> {
        crate::sinks::parse_test_config("db", "postgres", keys)
    }

    fn pg(keys: &str) -> PostgresSinkConfig {
        let config = load(keys).unwrap();
        match &config {
            SinkKind::Postgres(pg) => pg.clone(),
            other => panic!("postgres sink expected, got {other:?}"),
        }
    }

    fn assert_config_err(keys: &str, key: &str, needle: &str) -> ConfigError {
        let err = load(keys).expect_err(keys);
        assert_eq!(err.key, key, "{err}");
        assert!(err.message.contains(needle), "{err}");
        err
    }

    #[test]
    fn config_reads_every_key_with_defaults() {
        let config = pg("url = \"postgres://app:s3cret@db.internal:5432/events\"");
        assert_eq!(config.table.shown(), "b24_events");
        assert_eq!(config.table.quoted(), "\"b24_events\"");
        assert!(config.create_table);
        assert_eq!(config.tls, Tls::Off);
        assert!(!format!("{config:?}").contains("s3cret"));

        let config = pg(
            "url = \"postgresql://app@db/events?sslmode=verify-full&connect_timeout=5\"\ntable = \"bitrix.Events\"\ncreate_table = false",
        );
        assert_eq!(config.table.quoted(), "\"bitrix\".\"Events\"");
        assert!(!config.create_table);
        assert_eq!(config.tls, Tls::Require);
        assert_eq!(
            pg("url = \"postgres://h/db?sslmode=prefer\"").tls,
            Tls::Prefer
        );
        assert_eq!(
            pg("url = \"postgres://h/db?sslmode=disable\"").tls,
            Tls::Off
        );
    }

    #[test]
    fn config_errors_name_their_key() {
        assert_config_err("table = \"t\"", "sinks.db.url", "missing required key");
        let err = assert_config_err(
            "url = \"mysql://u:hunter2@h/db\"",
            "sinks.db.url",
            "unsupported scheme",
        );
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = assert_config_err(
            "url = \"postgres://u:hunter2@h/db?sslmode=strict\"",
            "sinks.db.url",
            "unknown sslmode",
        );
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert_config_err(
            "url = \"postgres://u@h/db?bogus_option=1\"",
            "sinks.db.url",
            "invalid connection URL",
        );
        assert_config_err("url = \"postgres://u@h\"", "sinks.db.url", "no database");
        for bad in [
            "",
            "1abc",
            "a b",
            "a;drop",
            "a.b.c",
            "\"x\"",
            &"x".repeat(64),
        ] {
            assert_config_err(
                &format!("url = \"postgres://h/db\"\ntable = {bad:?}"),
                "sinks.db.table",
                "table name",
            );
        }
        assert_config_err(
            "url = \"postgres://h/db\"\ncreate_table = \"yes\"",
            "sinks.db.create_table",
            "invalid",
        );
        assert_config_err(
            "url = \"postgres://h/db\"\nschema = \"x\"",
            "sinks.db.schema",
            "not a key of a \"postgres\" sink",
        );
    }

    #[test]
    fn insert_statement_numbers_its_parameters() {
        let table = parse_table("s.t").unwrap();
        assert_eq!(
            insert_sql(&table, 2),
            "INSERT INTO \"s\".\"t\" (\"id\", \"portal\", \"event\", \"offline_id\", \"message_id\", \"timestamp\", \"payload\") \
             VALUES ($1, $2, $3, $4, $5, $6, $7), ($8, $9, $10, $11, $12, $13, $14) \
             ON CONFLICT (id) DO NOTHING RETURNING id"
        );
        assert!(create_table_sql(&table).starts_with("CREATE TABLE IF NOT EXISTS \"s\".\"t\" ("));
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn sqlstates_classify() {
        for code in ["08006", "08001", "57P01"] {
            assert_eq!(classify_sqlstate(code), Class::Connection, "{code}");
        }
        for code in ["22P05", "22021", "23502", "23514"] {
            assert_eq!(classify_sqlstate(code), Class::Data, "{code}");
        }
        for code in [
            "40001", "40P01", "53100", "53300", "42P01", "42501", "42703", "XX000",
        ] {
            assert_eq!(classify_sqlstate(code), Class::Retry, "{code}");
        }
    }

    #[test]
    fn timestamps_parse_or_stay_null() {
        assert!(parse_timestamp("2026-11-22T10:00:00+03:00").is_some());
        assert!(parse_timestamp("22.11.2026 10:00:00").is_none());
        assert!(parse_timestamp("").is_none());
    }

    #[test]
    fn a_duplicate_row_is_noted_in_the_output() {
        let inserted: HashSet<String> = ["main:1".to_string()].into();
        assert_eq!(
            delivered("main:1", &inserted),
            (SinkResult::Delivered, None)
        );
        let (result, output) = delivered("main:2", &inserted);
        assert_eq!(result, SinkResult::Delivered);
        assert!(output.unwrap().starts_with("duplicate"));
    }
}
