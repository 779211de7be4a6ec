//! The bench's side of a PostgreSQL journal: a fresh schema per run (dropped after), the
//! `[journal]` section and the `JournalConfig` that name it, the daemon's connections found in
//! `pg_stat_activity` (by the `application_name` the bench puts in each daemon's URL, and the
//! name the daemon gives its instance-lock connection), and the CPU of the server processes
//! behind them, read from `/proc` (the server must run on this machine for that).

use super::procfs;
use anyhow::Context;
use b24eventd::config::{JournalConfig, PostgresJournalConfig, Synchronous};
use b24eventd::journal::{Access, Journal};
use std::collections::HashMap;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `--postgres` when not given.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A schema of its own for one run, dropped by [`Schema::drop_now`].
pub struct Schema {
    pub url: String,
    pub name: String,
    client: tokio_postgres::Client,
}

/// A plain connection to `url` (no TLS: the bench's server is local).
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to the PostgreSQL server of --postgres")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `url` with `application_name=NAME` added, so the server names the connections it opens.
pub fn with_application_name(url: &str, name: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}application_name={name}")
}

impl Schema {
    /// A name no other run uses (`b24bench_<pid>_<random>`); the daemon creates the schema.
    pub async fn fresh(url: &str, bench: &str) -> anyhow::Result<Schema> {
        let name = format!(
            "b24bench_{bench}_{}_{:08x}",
            std::process::id(),
            fastrand::u32(..)
        );
        Ok(Schema {
            url: url.to_string(),
            name,
            client: connect(url).await?,
        })
    }

    pub fn client(&self) -> &tokio_postgres::Client {
        &self.client
    }

    /// The `[journal]` section of a daemon config on this schema, its connections named
    /// `application_name`.
    pub fn journal_section(&self, application_name: &str, extra: &str) -> String {
        format!(
            "[journal]\nurl = \"{}\"\nschema = \"{}\"\n{extra}\n",
            with_application_name(&self.url, application_name),
            self.name
        )
    }

    /// The journal config of this schema, for the bench's own writes (token seeding).
    pub fn journal_config(&self) -> JournalConfig {
        JournalConfig {
            path: std::path::PathBuf::new(),
            postgres: Some(PostgresJournalConfig {
                url: with_application_name(&self.url, "b24bench-seed"),
                schema: self.name.clone(),
                max_connections: 16,
            }),
            retention: Duration::from_secs(30 * 24 * 3600),
            prune_schedule: "0 30 3 * * *".to_string(),
            synchronous: Synchronous::Full,
            in_current_directory: false,
            lease_ttl: b24eventd::config::DEFAULT_LEASE_TTL,
        }
    }

    /// Opens (creating and migrating) the journal in this schema.
    pub async fn open_journal(&self) -> anyhow::Result<Journal> {
        Journal::open_configured(&self.journal_config(), Access::Create).await
    }

    /// Drops the schema and everything in it.
    pub async fn drop_now(&self) -> anyhow::Result<()> {
        self.client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name))
            .await
            .with_context(|| format!("cannot drop schema {}", self.name))
    }
}

/// The `pg_stat_activity` condition for the connections of a daemon whose URL carried
/// `application_name = app` and whose pid is `pid` (its instance-lock connection renames
/// itself `b24eventd pid PID on HOST`).
fn daemon_connections(app: &str, pid: u32) -> String {
    format!("(application_name = '{app}' OR application_name LIKE 'b24eventd pid {pid} on %')")
}

/// The server backends of each daemon (by `application_name`), now.
pub async fn backends(
    client: &tokio_postgres::Client,
    daemons: &[(String, u32)],
) -> anyhow::Result<Vec<Vec<u32>>> {
    let mut all = Vec::with_capacity(daemons.len());
    for (app, pid) in daemons {
        let rows = client
            .query(
                &format!(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND {}",
                    daemon_connections(app, *pid)
                ),
                &[],
            )
            .await?;
        all.push(rows.iter().map(|r| r.get::<_, i32>(0) as u32).collect());
    }
    Ok(all)
}

/// CPU seconds of every process of the server (the postmaster and its children: backends of
/// every client, the WAL writer, the checkpointer, …), or `None` when its processes are not
/// visible here. Found from this connection's own backend, whose parent is the postmaster.
pub async fn server_cpu_seconds(client: &tokio_postgres::Client) -> Option<f64> {
    let me: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .ok()?
        .get(0);
    let postmaster = parent_pid(me as u32)?;
    let mut total = procfs::cpu_seconds(postmaster).ok()?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if parent_pid(pid) == Some(postmaster) {
            total += procfs::cpu_seconds(pid).unwrap_or(0.0);
        }
    }
    Some(total)
}

/// Field 4 of `/proc/PID/stat`.
fn parent_pid(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &text[text.rfind(')')? + 1..];
    after_name.split_whitespace().nth(1)?.parse().ok()
}

/// Samples, until stopped, the CPU time of the server backends serving some daemons (each
/// backend's last reading: they are the daemons' own connections, opened after their spawn, so
/// all their time counts), and the most connections seen per daemon.
pub struct BackendSampler {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<Sampled>>,
}

/// What a [`BackendSampler`] saw.
#[derive(Debug, Default, Clone)]
pub struct Sampled {
    /// Per daemon: CPU seconds its backends used while sampled.
    pub cpu_seconds: Vec<f64>,
    /// Per daemon: the most connections it had at once.
    pub most_connections: Vec<usize>,
}

impl BackendSampler {
    /// Starts sampling every `every`.
    pub async fn start(
        url: &str,
        daemons: Vec<(String, u32)>,
        every: Duration,
    ) -> anyhow::Result<BackendSampler> {
        let client = connect(url).await?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            // per daemon: backend pid → its last CPU reading
            let mut seen: Vec<HashMap<u32, f64>> = vec![HashMap::new(); daemons.len()];
            let mut most = vec![0usize; daemons.len()];
            loop {
                let pids = backends(&client, &daemons).await?;
                for (d, pids) in pids.iter().enumerate() {
                    most[d] = most[d].max(pids.len());
                    for pid in pids {
                        let Ok(cpu) = procfs::cpu_seconds(*pid) else {
                            continue;
                        };
                        seen[d].insert(*pid, cpu);
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = token.cancelled() => break,
                }
            }
            Ok(Sampled {
                cpu_seconds: seen.iter().map(|m| m.values().sum()).collect(),
                most_connections: most,
            })
        });
        Ok(BackendSampler { stop, task })
    }

    /// Takes a last sample and returns what was seen.
    pub async fn finish(self) -> anyhow::Result<Sampled> {
        self.stop.cancel();
        self.task.await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_application_name_is_added_to_the_url() {
        assert_eq!(
            with_application_name("postgres://u@h:5432/db", "b24bench-a"),
            "postgres://u@h:5432/db?application_name=b24bench-a"
        );
        assert_eq!(
            with_application_name("postgres://u@h/db?sslmode=disable", "x"),
            "postgres://u@h/db?sslmode=disable&application_name=x"
        );
    }

    #[test]
    fn a_daemons_connections_are_its_application_name_and_its_lock() {
        let cond = daemon_connections("b24bench-1", 42);
        assert!(cond.contains("application_name = 'b24bench-1'"));
        assert!(cond.contains("'b24eventd pid 42 on %'"));
    }

    #[test]
    fn the_parent_of_this_process_is_found() {
        assert_eq!(
            parent_pid(std::process::id()),
            rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32)
        );
    }
}
