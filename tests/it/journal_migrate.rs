//! `journal migrate` with the real binary: a SQLite journal filled by the daemon is copied into
//! PostgreSQL (`B24TEST_POSTGRES`, else 127.0.0.1:5432 database `test` as `postgres`; ignored
//! unless asked for, and failing loudly when the database does not answer). The copy answers
//! as the file does; a running daemon and a second copy into the same schema are refused.

use crate::support::daemon::{spawn_daemon, stop_with_sigterm};
use crate::support::*;
use b24eventd::config::{JournalConfig, PostgresJournalConfig};
use b24eventd::journal::test_support::{
    DEFAULT_TEST_URL, DropSchema, postgres_url, test_journal_config, unique_schema,
};
use b24eventd::journal::{Access, EventFilter, Journal};
use b24eventd_simulator::SimulatorConfig;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The database the test copies into.
fn database_url() -> String {
    postgres_url().unwrap_or_else(|| DEFAULT_TEST_URL.to_string())
}

/// Fails the test, naming the service, when the database does not answer.
async fn require_database(url: &str) {
    if let Err(e) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
        service_down(
            &format!("PostgreSQL at {url}"),
            "pg_ctlcluster <version> main start",
            e,
        );
    }
}

fn b24eventd(config: &Path, args: &[&str]) -> Output {
    b24eventd_with(config, args, None, "")
}

/// The binary with `PGPASSWORD` set to `password` (or unset) and `stdin` on its standard input.
fn b24eventd_with(config: &Path, args: &[&str], password: Option<&str>, stdin: &str) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_b24eventd"));
    match password {
        Some(password) => command.env("PGPASSWORD", password),
        None => command.env_remove("PGPASSWORD"),
    };
    let mut child = command
        .env_remove("B24EVENTD_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .arg("-c")
        .arg(config)
        .args(args)
        .spawn()
        .expect("the binary runs");
    let mut input = child.stdin.take().expect("stdin is piped");
    input
        .write_all(stdin.as_bytes())
        .expect("stdin takes the input");
    drop(input);
    child.wait_with_output().expect("the binary ends")
}

/// Everything the operator commands show of a journal, as JSON.
fn shown(journal: &Journal) -> serde_json::Value {
    let all = EventFilter::default();
    let events = journal.list_events(&all).unwrap();
    let details: Vec<_> = events
        .iter()
        .map(|e| journal.show_event(&e.row.to_string()).unwrap())
        .collect();
    serde_json::json!({
        "events": events,
        "details": details,
        "stats": journal.stats(&all).unwrap(),
    })
}

const TOKENS: &str = "SELECT portal, access_token, refresh_token, scope, member_id,
    client_endpoint, user_id FROM tokens ORDER BY portal";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: B24TEST_POSTGRES, else 127.0.0.1:5432 database test"]
async fn a_daemons_sqlite_journal_moves_to_postgres_whole_and_once() {
    init();
    let url = database_url();
    require_database(&url).await;
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // The source is a SQLite journal whatever B24TEST_POSTGRES says.
    let config = write_sqlite_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let loaded = b24eventd::config::load(&config).unwrap();
    {
        let journal = Journal::open(&loaded.journal.path, loaded.journal.synchronous)
            .await
            .unwrap();
        journal.save_tokens("main", &tokens).await.unwrap();
    }
    let log = dir.path().join("daemon.log");
    let mut daemon = spawn_daemon(&config, &log);
    emit_deals(&sim, 1, 20);
    let sqlite = Journal::open_as(
        &loaded.journal.path,
        loaded.journal.synchronous,
        Access::Read,
    )
    .await
    .unwrap();
    wait_for(
        "20 events delivered and cleared",
        Duration::from_secs(30),
        || {
            let stats = sqlite.stats(&EventFilter::default()).unwrap();
            upstream_empty(&sim)
                && stats
                    .first()
                    .is_some_and(|p| p.delivered == 20 && p.upstream_unsettled == 0)
        },
    )
    .await;

    let schema = unique_schema();
    let target = PostgresJournalConfig {
        url: url.clone(),
        schema: schema.clone(),
        max_connections: 2,
    };
    let migrate = ["journal", "migrate", "--to", &url, "--schema", &schema];
    // Not while the daemon works the file.
    let refused = b24eventd(&config, &migrate);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("in use by another b24eventd process"), "{err}");
    stop_with_sigterm(&mut daemon, &log);

    let file_before = std::fs::read(&loaded.journal.path).unwrap();
    // The password from PGPASSWORD, as psql takes it, so it is not in the process list. The
    // test server trusts local connections, so it accepts any: what is checked here is that
    // the password is taken and never shown.
    const PASSWORD: &str = "pgpassword-not-shown-3fa1";
    let done = b24eventd_with(&config, &migrate, Some(PASSWORD), "");
    let out = String::from_utf8_lossy(&done.stdout);
    let err = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(0), "{out}{err}");
    assert!(
        !out.contains(PASSWORD) && !err.contains(PASSWORD),
        "{out}{err}"
    );
    assert!(out.contains("with the password put back into url"), "{out}");
    let pg_config = JournalConfig {
        postgres: Some(target.clone()),
        ..test_journal_config(dir.path())
    };
    let pg = Journal::open_configured(&pg_config, Access::Read)
        .await
        .expect("the copy opens as a journal");
    let _drop = DropSchema::new(&pg_config, &pg);
    assert!(out.contains("events                     20"), "{out}");
    assert!(out.contains("left untouched"), "{out}");
    let mut shown_url = reqwest::Url::parse(&url).unwrap();
    let _ = shown_url.set_password(None);
    assert!(
        out.contains(&format!(
            "[journal]\nurl = \"{shown_url}\"\nschema = \"{schema}\"\n"
        )),
        "the lines to put in the config, without the password: {out}"
    );
    assert_eq!(std::fs::read(&loaded.journal.path).unwrap(), file_before);

    let (in_pg, in_file) = (shown(&pg), shown(&sqlite));
    assert_eq!(in_pg["events"].as_array().map(Vec::len), Some(20));
    assert_eq!(in_pg, in_file, "events, deliveries and attempts alike");
    let stored = pg.sql_rows(TOKENS).unwrap();
    assert_eq!(stored, sqlite.sql_rows(TOKENS).unwrap());
    assert!(
        stored[0]["refresh_token"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{stored:?}"
    );

    // A second copy into the same schema is refused, and changes nothing; here the URL comes
    // on standard input (`--to -`), as it passes through `b24eventd-as-service`.
    let from_stdin = ["journal", "migrate", "--to", "-", "--schema", &schema];
    let again = b24eventd_with(&config, &from_stdin, None, &format!("{url}\n"));
    assert_eq!(again.status.code(), Some(1));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already holds a journal"), "{err}");
    assert!(err.contains("events: 20"), "{err}");
    assert_eq!(shown(&pg), in_file);

    // The daemon carries on from the copy: the same tokens, new rows after the copied ones.
    assert_eq!(
        pg.load_tokens("main").await.unwrap(),
        sqlite.load_tokens("main").await.unwrap()
    );
    let text = std::fs::read_to_string(&config).unwrap();
    let file_line = format!("path = \"{}/journal.db\"", dir.path().display());
    assert!(text.contains(&file_line), "{text}");
    let pg_config_path = dir.path().join("config-pg.toml");
    std::fs::write(
        &pg_config_path,
        text.replace(
            &file_line,
            &format!("url = \"{url}\"\nschema = \"{schema}\""),
        ),
    )
    .unwrap();
    let mut daemon = spawn_daemon(&pg_config_path, &log);
    emit_deals(&sim, 21, 10);
    wait_for(
        "30 events delivered from PostgreSQL",
        Duration::from_secs(30),
        || {
            if let Ok(Some(status)) = daemon.try_wait() {
                panic!(
                    "the daemon on the copied journal ended ({status}): {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            let stats = pg.stats(&EventFilter::default()).unwrap();
            upstream_empty(&sim)
                && stats
                    .first()
                    .is_some_and(|p| p.delivered == 30 && p.upstream_unsettled == 0)
        },
    )
    .await;
    stop_with_sigterm(&mut daemon, &log);
    let rows: Vec<i64> = pg
        .list_events(&EventFilter::default())
        .unwrap()
        .iter()
        .map(|r| r.row)
        .collect();
    let copied_max = in_file["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["row"].as_i64().unwrap())
        .max()
        .unwrap();
    assert_eq!(rows.len(), 30);
    assert!(rows[20..].iter().all(|&r| r > copied_max), "{rows:?}");
    assert_eq!(file_ids(&dir.path().join("events.jsonl")).len(), 30);
}
