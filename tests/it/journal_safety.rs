//! Commands that never damage a journal, and operator commands that never destroy working
//! state (the daemon lock is `tests/it/conformance.rs::the_daemon_lock_keeps_the_probe_and_a_second_run_away`):
//! on the real binary, against files that are not the daemon's journal
//! (a directory, a FIFO, another program's SQLite database beside its `-wal`, a damaged file)
//! and against the simulator (a token pair that fails, a bind that fails).

use crate::support::cli::*;
use crate::support::*;
use b24eventd::bitrix::Tokens;
use b24eventd_simulator::{Simulator, SimulatorConfig};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A config whose journal is `journal` (the simulator is never reached by these commands).
fn config_at(dir: &Path, sim: &Simulator, journal: &Path) -> PathBuf {
    let config = write_sqlite_config(dir, sim, None, "", &file_sink(dir));
    let text = std::fs::read_to_string(&config).unwrap().replace(
        &format!("{}/journal.db", dir.display()),
        &journal.display().to_string(),
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// `b24eventd -c CONFIG ARGS...`, killed after 20 s (a command blocked on a FIFO never ends).
async fn command(config: &Path, args: &[&str]) -> Output {
    let mut all = vec!["-c", path(config)];
    all.extend_from_slice(args);
    let run = b24eventd(&all, None);
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .unwrap_or_else(|_| panic!("{args:?} did not end within 20 s"))
}

/// Every file in `dir`, with its bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The commands that open the journal without talking to the portal first.
const LOCAL: &[&[&str]] = &[
    &["journal", "stats"],
    &["journal", "list"],
    &["journal", "show", "1"],
    &["dead", "list"],
    &["dead", "retry"],
    &["dead", "purge", "--all"],
    &["replay", "--all"],
    &["journal", "backup", "copy.db"],
    // Refused on the file before the database (nothing listens on port 9) is tried.
    &[
        "journal",
        "migrate",
        "--to",
        "postgres://postgres@127.0.0.1:9/test",
    ],
    &["prune"],
    &["auth", "status"],
    &["doctor"],
    &["subscribe"],
    &["unsubscribe"],
    &["run"],
];

fn assert_refused(out: &Output, args: &[&str], journal: &Path, needle: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(78), "{args:?}: {err}");
    assert!(
        err.contains(&journal.display().to_string()) && err.contains(needle),
        "{args:?} names the journal and why: {err}"
    );
}

/// A SQLite database of another program with history in its `-wal` (not checkpointed), as a
/// browser or another service leaves it: every command refuses it and changes no byte of it,
/// nor of its `-wal`. Before, `journal stats` added the daemon's tables and checkpointed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_programs_database_beside_its_wal_is_refused_and_left_as_it_was() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, _) = portal(SimulatorConfig::default()).await;
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let foreign = data.join("history.sqlite");
    {
        let writer = rusqlite::Connection::open(&foreign).unwrap();
        writer
            .execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
                 CREATE TABLE visits (id INTEGER PRIMARY KEY, url TEXT NOT NULL);",
            )
            .unwrap();
        writer
            .execute_batch(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
                 INSERT INTO visits (url) SELECT 'https://example.com/' || i FROM n;",
            )
            .unwrap();
        // Copy the files while the writer still holds its WAL: the history is in the -wal.
        for suffix in ["", "-wal"] {
            let from = format!("{}{suffix}", foreign.display());
            let to = format!("{}{suffix}", data.join("copy.sqlite").display());
            std::fs::copy(&from, &to).unwrap();
        }
    }
    std::fs::remove_file(&foreign).unwrap();
    let _ = std::fs::remove_file(format!("{}-wal", foreign.display()));
    let _ = std::fs::remove_file(format!("{}-shm", foreign.display()));
    let journal = data.join("copy.sqlite");
    let wal = std::fs::metadata(format!("{}-wal", journal.display()))
        .unwrap()
        .len();
    assert!(wal > 100_000, "the history is in the -wal ({wal} bytes)");
    let config = config_at(dir.path(), &sim, &journal);
    let before: Vec<(String, Vec<u8>)> = files(&data)
        .into_iter()
        .filter(|(name, _)| !name.ends_with("-shm"))
        .collect();
    for args in LOCAL {
        let out = command(&config, args).await;
        assert_refused(&out, args, &journal, "not a b24eventd journal");
        assert!(stderr(&out).contains("visits"), "{}", stderr(&out));
        let after: Vec<(String, Vec<u8>)> = files(&data)
            .into_iter()
            .filter(|(name, _)| !name.ends_with("-shm"))
            .collect();
        assert!(after == before, "{args:?} changed the database or its -wal");
    }
    let check =
        rusqlite::Connection::open_with_flags(&journal, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let (visits, tables): (i64, i64) = check
        .query_row(
            "SELECT (SELECT COUNT(*) FROM visits), (SELECT COUNT(*) FROM sqlite_master WHERE type = 'table')",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (visits, tables),
        (20_000, 1),
        "its history, and no table of ours"
    );
}

/// A directory or a FIFO as `journal.path`: refused from its type, before anything is made
/// beside it (no lock, no `-journal`, no `-wal`) or changed (no chmod). Before, a FIFO made
/// every command hang and a directory failed with exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_is_not_a_regular_file_is_refused_before_anything_is_touched() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, _) = portal(SimulatorConfig::default()).await;
    let place = dir.path().join("place");
    std::fs::create_dir(&place).unwrap();
    let directory = place.join("journal.d");
    std::fs::create_dir(&directory).unwrap();
    let fifo = place.join("journal.fifo");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fifo, std::fs::Permissions::from_mode(0o644)).unwrap();
    let listing = || {
        let mut names: Vec<String> = std::fs::read_dir(&place)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let before = listing();
    for (journal, kind) in [(&directory, "a directory"), (&fifo, "a FIFO")] {
        let config = config_at(dir.path(), &sim, journal);
        for args in LOCAL {
            let out = command(&config, args).await;
            assert_refused(
                &out,
                args,
                journal,
                &format!("not a regular file (it is {kind})"),
            );
            assert_eq!(listing(), before, "{args:?} made a file beside {kind}");
        }
    }
    let mode = std::fs::metadata(&fifo).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "no chmod");
    assert_eq!(std::fs::read_dir(&directory).unwrap().count(), 0);
}

/// A damaged journal (here: its header overwritten) stops `run` and every command with exit 78
/// (systemd does not restart on it), naming the file and what to do. Before: exit 1, "file is
/// not a database", no path, and a restart every 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_journal_exits_78_naming_the_file_and_what_to_do() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let config = write_sqlite_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let journal = dir.path().join("journal.db");
    b24eventd::journal::Journal::open(&journal, b24eventd::config::Synchronous::Full)
        .await
        .unwrap()
        .save_tokens("main", &tokens)
        .await
        .unwrap();
    // Checkpointed (the test's connection closed), then the first page overwritten.
    let mut bytes = std::fs::read(&journal).unwrap();
    assert!(bytes.starts_with(b"SQLite format 3\0"));
    bytes[..512].copy_from_slice(&[0x5a; 512]);
    std::fs::write(&journal, &bytes).unwrap();
    for args in LOCAL {
        let out = command(&config, args).await;
        assert_refused(&out, args, &journal, "damaged");
        let err = stderr(&out);
        assert!(
            err.contains("restore it from a backup") && err.contains("move it aside"),
            "{args:?} says what to do: {err}"
        );
        assert_eq!(
            std::fs::read(&journal).unwrap(),
            bytes,
            "{args:?} wrote to it"
        );
    }
}

/// Commands that only look, or that need stored tokens, never create a journal: before,
/// `subscribe` and `unsubscribe` made an empty one at a mistyped path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_that_need_a_journal_never_create_one() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, _) = portal(SimulatorConfig::default()).await;
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let journal_config = b24eventd::journal::test_support::test_journal_config(dir.path());
    let missing = match &journal_config.postgres {
        Some(_) => format!("there is no journal in {} yet", journal_config.location()),
        None => format!("journal {} does not exist", journal_config.path.display()),
    };
    // `journal migrate` copies a SQLite journal: with one in PostgreSQL it refuses at once.
    let copies_sqlite = |a: &&&[&str]| a.get(1) == Some(&"migrate");
    for args in LOCAL
        .iter()
        .filter(|a| a[0] != "run" && !(journal_config.postgres.is_some() && copies_sqlite(a)))
    {
        let out = command(&config, args).await;
        assert!(
            b24eventd::journal::Journal::open_existing(&journal_config)
                .await
                .unwrap()
                .is_none(),
            "{args:?} created the journal"
        );
        if !matches!(args[0], "auth" | "doctor") {
            assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr(&out));
            assert!(
                stderr(&out).contains(&missing),
                "{args:?}: {}",
                stderr(&out)
            );
        }
    }
}

/// `auth import` of a refresh token that was used already (the simulator's OAuth rotates
/// strictly: `invalid_grant`) or of a pair the portal refuses: exit 1, and the working pair
/// stays stored. Before, the bad pair replaced it and the daemon stopped at its next refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_import_of_a_pair_that_fails_leaves_the_working_pair() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, working) = portal(SimulatorConfig::default()).await;
    store_tokens(dir.path(), &working).await;
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let stored = stored_tokens(dir.path()).await.unwrap();

    // A pair whose refresh token a first import used (and rotated).
    let (_, used) = sim.issue_tokens();
    let out = command(
        &config,
        &[
            "auth",
            "import",
            "--portal",
            "main",
            "--refresh-token",
            used.as_str(),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rotated = stored_tokens(dir.path()).await.unwrap();
    assert_ne!(rotated.refresh_token, stored.refresh_token);
    assert_ne!(rotated.refresh_token, used);

    for args in [
        vec![
            "auth",
            "import",
            "--portal",
            "main",
            "--refresh-token",
            used.as_str(),
        ],
        vec![
            "auth",
            "import",
            "--portal",
            "main",
            "--refresh-token",
            "not-a-token",
            "--access-token",
            "not-a-token-either",
        ],
    ] {
        let out = command(&config, &args).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("the stored tokens were left unchanged"),
            "{args:?}: {err}"
        );
        assert!(!err.contains(&used), "the token is never printed: {err}");
        assert_eq!(
            stored_tokens(dir.path()).await.unwrap(),
            rotated,
            "{args:?} replaced the working pair"
        );
    }
    // And the pair left in place still works.
    let refreshes = sim.stats().token_refreshes;
    sim.expire_access_tokens();
    let out = command(&config, &["doctor", "--json"]).await;
    assert!(
        stdout(&out).contains("\"token\""),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(
        sim.stats().token_refreshes,
        refreshes + 1,
        "{}",
        stdout(&out)
    );
    assert_ne!(stored_tokens(dir.path()).await.unwrap(), rotated);
}

/// `auth login` with a code the token server accepts but whose tokens the portal does not know
/// (a code of another portal pasted bare; here: a second simulator as the token server):
/// exit 1, the working pair stays. Before, the useless pair replaced it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_login_keeps_the_working_pair_when_the_new_one_fails() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, working) = portal(SimulatorConfig::default()).await;
    let elsewhere = Simulator::start(SimulatorConfig::default()).await.unwrap();
    store_tokens(dir.path(), &working).await;
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&sim.oauth_token_url(), &elsewhere.oauth_token_url());
    std::fs::write(&config, text).unwrap();
    let stored = stored_tokens(dir.path()).await.unwrap();
    let code = elsewhere.authorization_code();
    let out = b24eventd(
        &["-c", path(&config), "auth", "login", "--portal", "main"],
        Some(&format!("{code}\n")),
    )
    .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("the stored tokens were left unchanged"),
        "{err}"
    );
    assert_eq!(stored_tokens(dir.path()).await.unwrap(), stored);
}

/// `subscribe --prune` replaces the extra bindings with the configured ones only once every
/// configured one is bound: a bind the portal refuses keeps the extras (exit 1). Before, the
/// extras were unbound anyway and the portal queued neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_prune_keeps_the_extras_when_a_bind_fails() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(SimulatorConfig::default()).await.unwrap();
    sim.bind_offline("ONTASKADD", "");
    let (access, refresh) = sim.issue_tokens();
    store_tokens(dir.path(), &Tokens::from_pair(access, refresh)).await;
    let config = write_config(dir.path(), &sim, None, "", &file_sink(dir.path()));
    // The operator renamed the event, with a typo the portal does not know.
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "events = [\"ONCRMDEALADD\", \"ONCRMDEALUPDATE\"]",
        "events = [\"ONCRMDEALADD\", \"ONTASKADDD\"]",
    );
    std::fs::write(&config, text).unwrap();
    let out = command(&config, &["subscribe", "--prune", "--json"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let action = |event: &str| {
        rows["bindings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["event"] == event)
            .unwrap_or_else(|| panic!("{event} in {rows:#}"))["action"]
            .clone()
    };
    assert_eq!(action("ONCRMDEALADD"), "bound");
    assert_eq!(action("ONTASKADDD"), "failed");
    assert_eq!(action("ONTASKADD"), "extra", "kept: {rows:#}");
    sim.emit_change("ONTASKADD", 8);
    assert_eq!(
        sim.rows()
            .iter()
            .filter(|r| r.event_name == "ONTASKADD")
            .count(),
        1,
        "the kept binding still queues"
    );
}
