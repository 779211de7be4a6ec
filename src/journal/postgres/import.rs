//! The PostgreSQL side of `journal migrate` (`journal/migrate.rs`): in one transaction, refuses
//! a schema that holds anything, creates the journal's tables, inserts the rows it is sent with
//! their ids (`OVERRIDING SYSTEM VALUE`), sets each identity past the highest id, and commits
//! only when the row counts equal the source's. Runs on a small runtime of its own, fed from
//! the blocking caller through a bounded channel.

use super::{CONNECT_TIMEOUT, describe, quote_ident, schema};
use crate::config::PostgresJournalConfig;
use crate::journal::migrate::{Rows, TableCounts};
use crate::pg::{Tls, connect_config, start, tls_connector};
use anyhow::Context;
use tokio_postgres::{Client, Transaction};

/// What the caller sends to the import task.
enum Message {
    Rows(Rows),
    /// Every row was sent; the source's counts, to check before committing.
    Done(TableCounts),
}

/// A running import; dropping it without [`Importer::finish`] rolls everything back.
pub(in crate::journal) struct Importer {
    runtime: tokio::runtime::Runtime,
    tx: tokio::sync::mpsc::Sender<Message>,
    result: std::sync::mpsc::Receiver<anyhow::Result<TableCounts>>,
    location: String,
}

impl Importer {
    /// Connects, opens the transaction, checks that the target schema is empty and creates the
    /// journal's tables in it. Blocking.
    pub(in crate::journal) fn start(config: &PostgresJournalConfig) -> anyhow::Result<Importer> {
        let location = config.location();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("journal-migrate")
            .enable_all()
            .build()
            .context("cannot start the import's runtime")?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
        let (result_tx, result) = std::sync::mpsc::sync_channel(1);
        let config = config.clone();
        runtime.spawn(async move {
            let outcome = import(&config, rx, ready_tx).await;
            let _ = result_tx.send(outcome);
        });
        let importer = Importer {
            runtime,
            tx,
            result,
            location,
        };
        match ready.recv() {
            Ok(()) => Ok(importer),
            // The task ended before it was ready: its error says why.
            Err(_) => Err(importer.outcome()),
        }
    }

    /// Sends rows to be inserted. Blocking (waits while the task is behind).
    pub(in crate::journal) fn send(&self, rows: Rows) -> anyhow::Result<()> {
        if self.tx.blocking_send(Message::Rows(rows)).is_err() {
            return Err(self.outcome());
        }
        Ok(())
    }

    /// Checks the counts against `expected` and commits; returns the rows copied per table.
    pub(in crate::journal) fn finish(self, expected: TableCounts) -> anyhow::Result<TableCounts> {
        let _ = self.tx.blocking_send(Message::Done(expected));
        let outcome = self
            .result
            .recv()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the import task ended without a result")));
        self.runtime.shutdown_background();
        outcome
    }

    /// The error the task ended with.
    fn outcome(&self) -> anyhow::Error {
        match self.result.recv() {
            Ok(Err(e)) => e,
            Ok(Ok(_)) | Err(_) => {
                anyhow::anyhow!("the import into {} ended early", self.location)
            }
        }
    }
}

async fn connect(config: &PostgresJournalConfig) -> anyhow::Result<Client> {
    let location = config.location();
    let (mut pg, tls) = connect_config(&config.url).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
    pg.connect_timeout(CONNECT_TIMEOUT);
    let client = match tls {
        Tls::Off => start(&pg, tokio_postgres::NoTls).await,
        Tls::Prefer | Tls::Require => {
            start(
                &pg,
                tls_connector().map_err(|e| anyhow::anyhow!("{location}: {e}"))?,
            )
            .await
        }
    };
    client.map_err(|e| {
        // The server's message, else the driver's with its cause (an I/O error, a timeout).
        let why = match e.as_db_error() {
            Some(_) => describe(&e),
            None => format!("{:#}", anyhow::Error::new(e)),
        };
        anyhow::anyhow!("cannot connect to {location}: {why}")
    })
}

/// The import task: everything in one transaction, committed only after `Done` and the check.
async fn import(
    config: &PostgresJournalConfig,
    mut rx: tokio::sync::mpsc::Receiver<Message>,
    ready: std::sync::mpsc::SyncSender<()>,
) -> anyhow::Result<TableCounts> {
    let location = config.location();
    let mut client = connect(config).await?;
    let tx = client.transaction().await?;
    let quoted = quote_ident(&config.schema);
    tx.query_one(
        "SELECT pg_advisory_xact_lock($1, hashtext($2))",
        &[&schema::MIGRATION_LOCK, &config.schema],
    )
    .await?;
    refuse_unless_empty(&tx, &config.schema, &location).await?;
    schema::migrate_in(&tx, &config.schema)
        .await
        .with_context(|| format!("cannot create the journal in {location}"))?;
    tx.batch_execute(&format!("SET LOCAL search_path TO {quoted}"))
        .await?;
    let _ = ready.send(());
    let mut sent = TableCounts::default();
    let expected = loop {
        match rx.recv().await {
            Some(Message::Rows(rows)) => {
                sent.add(&rows);
                insert(&tx, rows)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot copy into {location}: {e:#}"))?;
            }
            Some(Message::Done(expected)) => break expected,
            // The caller gave up (the SQLite side failed): the transaction rolls back.
            None => anyhow::bail!("the copy into {location} was abandoned; nothing was committed"),
        }
    };
    for table in ["batches", "events", "delivery_attempts"] {
        tx.execute(
            &format!(
                "SELECT setval(pg_get_serial_sequence($1, 'id'), COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
            ),
            &[&format!("{quoted}.{table}")],
        )
        .await?;
    }
    let copied = counts(&tx).await?;
    let mut mismatches = expected.differences("in the SQLite journal", &copied, "copied");
    mismatches.extend(sent.differences("sent", &copied, "copied"));
    if !mismatches.is_empty() {
        anyhow::bail!(
            "the copy into {location} does not match the SQLite journal ({}); rolled back, nothing was committed",
            mismatches.join("; ")
        );
    }
    tx.commit()
        .await
        .map_err(|e| anyhow::anyhow!("cannot commit the copy into {location}: {}", describe(&e)))?;
    // The daemon's statements are planned from the tables' statistics: give it those of the
    // copy rather than of the empty tables (see `planner_stats`). The copy is committed
    // whatever happens here.
    if let Err(e) = super::planner_stats::analyze(&client, &config.schema).await {
        tracing::warn!(journal = %location, error = %format!("{e:#}"), "cannot analyze the copied journal's tables");
    }
    Ok(copied)
}

/// Refuses a schema that holds anything: tables of another application, or a journal with rows
/// (a journal of ours without a row, e.g. made by a first start, is taken as empty).
async fn refuse_unless_empty(
    tx: &Transaction<'_>,
    schema: &str,
    location: &str,
) -> anyhow::Result<()> {
    let relations: Vec<String> = tx
        .query(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
             ORDER BY c.relname",
            &[&schema],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if relations.is_empty() {
        return Ok(());
    }
    if !relations.iter().any(|r| r == "schema_history") {
        let mut names: Vec<&str> = relations.iter().take(8).map(String::as_str).collect();
        if relations.len() > 8 {
            names.push("...");
        }
        anyhow::bail!(
            "{location} is not empty and holds no journal of ours ({}): choose another --schema",
            names.join(", ")
        );
    }
    let quoted = quote_ident(schema);
    let version: i32 = tx
        .query_one(
            &format!("SELECT COALESCE(MAX(version), 0) FROM {quoted}.schema_history"),
            &[],
        )
        .await?
        .get(0);
    if version == 0 {
        return Ok(());
    }
    tx.batch_execute(&format!("SET LOCAL search_path TO {quoted}"))
        .await?;
    let found: Vec<String> = counts(tx)
        .await?
        .by_table()
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(table, n)| format!("{table}: {n}"))
        .collect();
    if !found.is_empty() {
        anyhow::bail!(
            "{location} already holds a journal ({}): migrate into an empty schema (--schema NAME), or drop this one first",
            found.join(", ")
        );
    }
    Ok(())
}

/// Rows per table of the journal on the transaction's search path.
async fn counts(tx: &Transaction<'_>) -> anyhow::Result<TableCounts> {
    let r = tx
        .query_one(
            "SELECT (SELECT COUNT(*) FROM portals), (SELECT COUNT(*) FROM tokens),
                    (SELECT COUNT(*) FROM batches), (SELECT COUNT(*) FROM events),
                    (SELECT COUNT(*) FROM deliveries), (SELECT COUNT(*) FROM delivery_attempts),
                    (SELECT COUNT(*) FROM conformance)",
            &[],
        )
        .await?;
    let n = |i: usize| r.get::<_, i64>(i).max(0) as u64;
    Ok(TableCounts {
        portals: n(0),
        tokens: n(1),
        batches: n(2),
        events: n(3),
        deliveries: n(4),
        delivery_attempts: n(5),
        conformance: n(6),
    })
}

/// A value as PostgreSQL can hold it: text without NUL characters, which `text` refuses and
/// SQLite keeps (an exec sink's output may carry them); each becomes U+FFFD, as a decoder
/// marks what it could not read. Other values go as they are.
trait PgValue {
    fn pg_value(self) -> Self;
}

impl PgValue for String {
    fn pg_value(self) -> String {
        if self.contains('\0') {
            self.replace('\0', "\u{FFFD}")
        } else {
            self
        }
    }
}

impl<T: PgValue> PgValue for Option<T> {
    fn pg_value(self) -> Option<T> {
        self.map(T::pg_value)
    }
}

macro_rules! as_is {
    ($($t:ty),*) => {
        $(impl PgValue for $t {
            fn pg_value(self) -> $t {
                self
            }
        })*
    };
}
as_is!(i64, chrono::DateTime<chrono::Utc>);

fn pg_value<T: PgValue>(value: T) -> T {
    value.pg_value()
}

/// Inserts one chunk with one statement: each column as an array, `unnest`ed into rows.
async fn insert(tx: &Transaction<'_>, rows: Rows) -> Result<u64, String> {
    macro_rules! column {
        ($rows:expr, $field:ident) => {
            $rows
                .iter()
                .map(|r| pg_value(r.$field.clone()))
                .collect::<Vec<_>>()
        };
    }
    let done = match rows {
        Rows::Portals(r) => {
            tx.execute(
                "INSERT INTO portals (name, member_id, client_endpoint, first_seen_at)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[])",
                &[
                    &column!(r, name),
                    &column!(r, member_id),
                    &column!(r, client_endpoint),
                    &column!(r, first_seen_at),
                ],
            )
            .await
        }
        Rows::Tokens(r) => {
            tx.execute(
                "INSERT INTO tokens (portal, access_token, refresh_token, expires_at, scope,
                                     member_id, client_endpoint, user_id, updated_at)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[],
                                      $5::text[], $6::text[], $7::text[], $8::bigint[],
                                      $9::timestamptz[])",
                &[
                    &column!(r, portal),
                    &column!(r, access_token),
                    &column!(r, refresh_token),
                    &column!(r, expires_at),
                    &column!(r, scope),
                    &column!(r, member_id),
                    &column!(r, client_endpoint),
                    &column!(r, user_id),
                    &column!(r, updated_at),
                ],
            )
            .await
        }
        Rows::Batches(r) => {
            tx.execute(
                "INSERT INTO batches (id, portal, process_id, lane, origin, fetched_at, settled_at)
                 OVERRIDING SYSTEM VALUE
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[],
                                      $5::text[], $6::timestamptz[], $7::timestamptz[])",
                &[
                    &column!(r, id),
                    &column!(r, portal),
                    &column!(r, process_id),
                    &column!(r, lane),
                    &column!(r, origin),
                    &column!(r, fetched_at),
                    &column!(r, settled_at),
                ],
            )
            .await
        }
        Rows::Events(r) => {
            tx.execute(
                "INSERT INTO events (id, envelope_id, portal, batch_id, offline_id, event,
                                     message_id, timestamp, change_key, data, additional, entity,
                                     entity_error, enrichment, lane, fetched_at, status, upstream,
                                     settled_at)
                 OVERRIDING SYSTEM VALUE
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[],
                                      $5::bigint[], $6::text[], $7::text[], $8::text[], $9::text[],
                                      $10::text[], $11::text[], $12::text[], $13::text[],
                                      $14::text[], $15::text[], $16::timestamptz[], $17::text[],
                                      $18::text[], $19::timestamptz[])",
                &[
                    &column!(r, id),
                    &column!(r, envelope_id),
                    &column!(r, portal),
                    &column!(r, batch_id),
                    &column!(r, offline_id),
                    &column!(r, event),
                    &column!(r, message_id),
                    &column!(r, timestamp),
                    &column!(r, change_key),
                    &column!(r, data),
                    &column!(r, additional),
                    &column!(r, entity),
                    &column!(r, entity_error),
                    &column!(r, enrichment),
                    &column!(r, lane),
                    &column!(r, fetched_at),
                    &column!(r, status),
                    &column!(r, upstream),
                    &column!(r, settled_at),
                ],
            )
            .await
        }
        Rows::Deliveries(r) => {
            tx.execute(
                "INSERT INTO deliveries (event_id, sink, status, attempts, next_attempt_at,
                                         last_error, delivered_at, replays)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[],
                                      $5::timestamptz[], $6::text[], $7::timestamptz[],
                                      $8::bigint[])",
                &[
                    &column!(r, event_id),
                    &column!(r, sink),
                    &column!(r, status),
                    &column!(r, attempts),
                    &column!(r, next_attempt_at),
                    &column!(r, last_error),
                    &column!(r, delivered_at),
                    &column!(r, replays),
                ],
            )
            .await
        }
        Rows::Attempts(r) => {
            tx.execute(
                "INSERT INTO delivery_attempts (id, event_id, sink, attempt, at, outcome, error,
                                                output)
                 OVERRIDING SYSTEM VALUE
                 SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[],
                                      $5::timestamptz[], $6::text[], $7::text[], $8::text[])",
                &[
                    &column!(r, id),
                    &column!(r, event_id),
                    &column!(r, sink),
                    &column!(r, attempt),
                    &column!(r, at),
                    &column!(r, outcome),
                    &column!(r, error),
                    &column!(r, output),
                ],
            )
            .await
        }
        Rows::Conformance(r) => {
            tx.execute(
                "INSERT INTO conformance (portal, check_name, status, observed, value, run_id,
                                          checked_at)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                                      $5::bigint[], $6::text[], $7::timestamptz[])",
                &[
                    &column!(r, portal),
                    &column!(r, check_name),
                    &column!(r, status),
                    &column!(r, observed),
                    &column!(r, value),
                    &column!(r, run_id),
                    &column!(r, checked_at),
                ],
            )
            .await
        }
    };
    done.map_err(|e| describe(&e))
}

#[cfg(test)]
mod tests {
    use crate::bitrix::Tokens;
    use crate::config::{JournalConfig, PostgresJournalConfig, Synchronous};
    use crate::envelope::Lane;
    use crate::journal::test_support::{DEFAULT_TEST_URL, postgres_url, unique_schema};
    use crate::journal::{
        Access, BatchOrigin, EventFilter, Journal, NewBatch, NewEvent, Outcome, StoredFinding,
        sqlite_to_postgres,
    };
    use chrono::{Duration, Utc};

    fn target() -> PostgresJournalConfig {
        // Asked for (`--include-ignored`) without the variable: the local server CI runs.
        let url = postgres_url().unwrap_or_else(|| DEFAULT_TEST_URL.to_string());
        PostgresJournalConfig {
            url,
            schema: unique_schema(),
            max_connections: 2,
        }
    }

    fn batch(pid: &str, lane: Lane, ids: std::ops::RangeInclusive<i64>) -> NewBatch {
        NewBatch {
            portal: "main".into(),
            process_id: pid.into(),
            lane,
            origin: BatchOrigin::Fetched,
            events: ids
                .map(|id| NewEvent {
                    offline_id: id,
                    event: if id % 2 == 0 { "ONCRMDEALADD" } else { "ONCRMDEALUPDATE" }.into(),
                    message_id: format!("{id:032x}"),
                    timestamp: "2026-11-22T10:00:00+03:00".into(),
                    // Key order and spacing as the portal sent them: kept as text.
                    data: serde_json::json!({"FIELDS": {"ID": id.to_string(), "Z": 1, "A": [1, 2]}}),
                    additional: serde_json::json!({"user_id": "1"}),
                    sinks: vec!["a".into(), "b".into()],
                    enrich: false,
                })
                .collect(),
            deleted_upstream: false,
            new_reservation: true,
        }
    }

    /// A SQLite journal with tokens, findings, and events 1..=5 delivered to `a`; to `b`: 1 and
    /// 2 delivered, 3 dead, 4 retrying, 5 pending; settled upstream as far as that allows.
    fn sqlite_journal(path: &std::path::Path) -> Journal {
        let journal = Journal::open_blocking(path, Synchronous::Full).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let tokens = Tokens {
                access_token: "access-secret".into(),
                refresh_token: "refresh-secret".into(),
                expires_at: Some(Utc::now() + Duration::hours(1)),
                member_id: Some("m1".into()),
                scope: Some("crm".into()),
                client_endpoint: Some("https://main.example/rest/".into()),
                user_id: Some(7),
            };
            journal.save_tokens("main", &tokens).await.unwrap();
            journal
                .replace_conformance(
                    "main",
                    vec![StoredFinding {
                        check: "get_limit_above_50".into(),
                        status: "ok".into(),
                        observed: "100 rows".into(),
                        value: Some(100),
                        run_id: "r1".into(),
                        checked_at: Utc::now(),
                    }],
                )
                .await
                .unwrap();
            journal
                .record_batch(batch("p1", Lane::Normal, 1..=5))
                .await
                .unwrap();
            let due = journal.due_deliveries("a", 10).await.unwrap();
            let all = due
                .iter()
                .map(|d| (d.event_id, Outcome::Delivered, None))
                .collect();
            journal.record_outcomes("a", all).await.unwrap();
            let due = journal.due_deliveries("b", 10).await.unwrap();
            let outcomes = due
                .iter()
                .filter_map(|d| {
                    let outcome = match d.envelope.offline_id {
                        3 => Outcome::Dead {
                            error: "http 422".into(),
                        },
                        4 => Outcome::Retry {
                            error: "http 503".into(),
                            next_attempt_at: Utc::now() + Duration::minutes(5),
                        },
                        5 => return None,
                        _ => Outcome::Delivered,
                    };
                    Some((d.event_id, outcome, Some("out\0put".to_string())))
                })
                .collect();
            journal.record_outcomes("b", outcomes).await.unwrap();
            for p in journal.pending_settlements("main").await.unwrap() {
                let ids = p.events.iter().map(|e| e.0).collect();
                journal.mark_settled(ids, p.action).await.unwrap();
            }
        });
        journal
    }

    fn open_target(target: &PostgresJournalConfig, dir: &std::path::Path) -> Journal {
        let config = JournalConfig {
            postgres: Some(target.clone()),
            ..crate::journal::test_support::test_journal_config(dir)
        };
        Journal::open_configured_blocking(&config, Access::Write).unwrap()
    }

    /// What the operator commands show of a journal, as JSON, to compare two backends.
    fn shown(journal: &Journal) -> serde_json::Value {
        let events = journal.list_events(&EventFilter::default()).unwrap();
        let details: Vec<_> = events
            .iter()
            .map(|e| journal.show_event(&e.row.to_string()).unwrap())
            .collect();
        serde_json::json!({
            "events": events,
            "details": details,
            "stats": journal.stats(&EventFilter::default()).unwrap(),
        })
    }

    const TOKENS: &str = "SELECT portal, access_token, refresh_token, scope, member_id,
        client_endpoint, user_id FROM tokens ORDER BY portal";
    const FINDINGS: &str =
        "SELECT portal, check_name, status, observed, value, run_id FROM conformance";

    #[test]
    #[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test)"]
    fn a_sqlite_journal_is_copied_whole_and_answers_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        let sqlite = sqlite_journal(&path);
        let before = std::fs::read(&path).unwrap();
        let target = target();
        let migrated = sqlite_to_postgres(&path, &target).unwrap();
        let pg = open_target(&target, dir.path());
        let _drop = crate::journal::test_support::DropSchema::new(
            &JournalConfig {
                postgres: Some(target.clone()),
                ..crate::journal::test_support::test_journal_config(dir.path())
            },
            &pg,
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "the SQLite file is untouched"
        );
        let c = migrated.copied;
        assert_eq!(
            (
                c.portals,
                c.tokens,
                c.batches,
                c.events,
                c.deliveries,
                c.delivery_attempts,
                c.conformance
            ),
            (1, 1, 1, 5, 10, 9, 1)
        );
        // The copy's statistics are there for the daemon's plans (manual ANALYZEs only).
        let analyzed = pg
            .sql_rows(
                "SELECT relname FROM pg_stat_user_tables
                 WHERE schemaname = current_schema() AND analyze_count > 0 ORDER BY relname",
            )
            .unwrap();
        assert_eq!(
            analyzed,
            ["batches", "deliveries", "delivery_attempts", "events"]
                .map(|t| serde_json::json!({ "relname": t }))
        );
        // The same rows, ids, times and texts; a NUL, which PostgreSQL text cannot hold,
        // becomes U+FFFD.
        let nul_marked = |v: serde_json::Value| -> serde_json::Value {
            serde_json::from_str(&v.to_string().replace("\\u0000", "\u{FFFD}")).unwrap()
        };
        let in_pg = shown(&pg);
        assert!(in_pg.to_string().contains("out\u{FFFD}put"));
        assert_eq!(in_pg, nul_marked(shown(&sqlite)));
        assert_eq!(
            pg.sql_rows(TOKENS).unwrap(),
            sqlite.sql_rows(TOKENS).unwrap()
        );
        assert_eq!(
            pg.sql_rows(FINDINGS).unwrap(),
            sqlite.sql_rows(FINDINGS).unwrap()
        );
        // The identities continue past the copied ids.
        pg.sql_execute(
            "INSERT INTO batches (portal, process_id, lane, origin, fetched_at)
             VALUES ('main', 'next', 'normal', 'fetched', now())",
        )
        .unwrap();
        let ids = pg.sql_rows("SELECT id FROM batches ORDER BY id").unwrap();
        assert_eq!(
            ids,
            [serde_json::json!({"id": 1}), serde_json::json!({"id": 2})]
        );
        pg.sql_execute("DELETE FROM batches WHERE process_id = 'next'")
            .unwrap();

        // The operator commands change both alike.
        let known = ["a".to_string(), "b".to_string()];
        assert_eq!(
            pg.retry_dead(&EventFilter::default(), &known).unwrap(),
            sqlite.retry_dead(&EventFilter::default(), &known).unwrap()
        );
        let adds = EventFilter {
            event: Some("oncrmdeal*add".into()),
            ..EventFilter::default()
        };
        assert_eq!(
            pg.replay(&adds, Some("a"), &known).unwrap(),
            sqlite.replay(&adds, Some("a"), &known).unwrap()
        );
        let later = Utc::now() + Duration::seconds(1);
        let pruned = pg.prune_blocking(later, true).unwrap();
        assert_eq!(pruned, sqlite.prune_blocking(later, true).unwrap());
        assert_eq!(
            pg.purge_dead(&EventFilter::default()).unwrap(),
            sqlite.purge_dead(&EventFilter::default()).unwrap()
        );
        let (pg_shown, sqlite_shown) = (shown(&pg), shown(&sqlite));
        // The requeue times differ by the moment each ran; everything else is equal.
        let strip = |mut v: serde_json::Value| {
            for detail in v["details"].as_array_mut().unwrap() {
                for d in detail[0]["deliveries"].as_array_mut().unwrap() {
                    d["next_attempt_at"] = serde_json::Value::Null;
                }
            }
            v
        };
        assert_eq!(strip(pg_shown), strip(nul_marked(sqlite_shown)));
    }

    #[test]
    #[ignore = "needs PostgreSQL (B24TEST_POSTGRES, else 127.0.0.1:5432/test)"]
    fn a_schema_that_holds_anything_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.db");
        let sqlite = sqlite_journal(&path);
        let target = target();
        sqlite_to_postgres(&path, &target).unwrap();
        let pg = open_target(&target, dir.path());
        let config = JournalConfig {
            postgres: Some(target.clone()),
            ..crate::journal::test_support::test_journal_config(dir.path())
        };
        let _drop = crate::journal::test_support::DropSchema::new(&config, &pg);
        let again = sqlite_to_postgres(&path, &target).unwrap_err().to_string();
        assert!(
            again
                .contains("already holds a journal (portals: 1, tokens: 1, batches: 1, events: 5,"),
            "{again}"
        );
        assert_eq!(pg.list_events(&EventFilter::default()).unwrap().len(), 5);

        // Another application's schema.
        let foreign = PostgresJournalConfig {
            schema: unique_schema(),
            ..target.clone()
        };
        pg.sql_execute(&format!("CREATE SCHEMA {}", foreign.schema))
            .unwrap();
        pg.sql_execute(&format!("CREATE TABLE {}.orders (id int)", foreign.schema))
            .unwrap();
        let refused = sqlite_to_postgres(&path, &foreign).unwrap_err().to_string();
        pg.sql_execute(&format!("DROP SCHEMA {} CASCADE", foreign.schema))
            .unwrap();
        assert!(
            refused.contains("holds no journal of ours (orders)"),
            "{refused}"
        );

        // A running daemon holds the SQLite journal.
        let _daemon = crate::journal::lock::DaemonLock::acquire(&path).unwrap();
        let fresh = PostgresJournalConfig {
            schema: unique_schema(),
            ..target.clone()
        };
        let held = sqlite_to_postgres(&path, &fresh).unwrap_err().to_string();
        assert!(
            held.contains("in use by another b24eventd process"),
            "{held}"
        );
        drop(sqlite);
    }
}
