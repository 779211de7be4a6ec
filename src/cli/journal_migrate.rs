//! `journal migrate`: copies the config's SQLite journal into PostgreSQL
//! (`journal::sqlite_to_postgres`) and prints what was copied and the `[journal]` lines that
//! switch the daemon to the copy.

use super::report::print_json;
use crate::config::Config;
use anyhow::bail;

/// `journal migrate`: copies the config's SQLite journal into PostgreSQL and says how to switch.
pub(super) fn migrate(
    config: &Config,
    to: String,
    schema: String,
    json: bool,
) -> anyhow::Result<()> {
    if let Some(pg) = &config.journal.postgres {
        bail!(
            "the config's journal is in PostgreSQL already ({}); journal migrate copies a SQLite \
             journal: run it with the config that names the file ([journal] path)",
            pg.location()
        );
    }
    crate::pg::connect_config(&to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
    // Whatever prints a message from here on never shows the password.
    crate::sinks::register_url_password(&to);
    let target = crate::config::PostgresJournalConfig {
        url: to,
        schema,
        max_connections: 2,
    };
    let done = crate::journal::sqlite_to_postgres(&config.journal.path, &target)?;
    let url = without_password(&target.url);
    let default_schema = target.schema == crate::config::DEFAULT_JOURNAL_SCHEMA;
    if json {
        return print_json(&serde_json::json!({
            "source": done.source,
            "target": done.target,
            "copied": done.copied,
            "journal": {
                "url": url,
                "schema": target.schema,
            },
        }));
    }
    outln!(
        "copied journal {} into {}:",
        done.source.display(),
        done.target
    )?;
    for (table, rows) in done.copied.by_table() {
        outln!("  {table:<18} {rows:>10}")?;
    }
    outln!(
        "\nThe SQLite journal is left untouched; keep it until the daemon runs well on PostgreSQL.\n\
         To switch, replace `path` (and `synchronous`, if set) in the config's [journal] with:\n"
    )?;
    outln!("[journal]")?;
    outln!("url = {}", toml_string(&url))?;
    if !default_schema {
        outln!("schema = {}", toml_string(&target.schema))?;
    }
    if url != target.url {
        outln!(
            "\nwith the password put back into url, or given in the service's environment \
             instead (B24EVENTD_JOURNAL__URL=postgres://user:password@...)."
        )?;
    }
    outln!("\nThen start the daemon.")?;
    Ok(())
}

/// `url` without its password (the user stays: it says which role to give the password of).
fn without_password(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            let _ = parsed.set_password(None);
            parsed.to_string()
        }
        Err(_) => crate::options::redact_url(url),
    }
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}
