//! `journal migrate`: copies the config's SQLite journal into PostgreSQL
//! (`journal::sqlite_to_postgres`) and prints what was copied and the `[journal]` lines that
//! switch the daemon to the copy.

use super::report::print_json;
use crate::config::Config;
use anyhow::{Context, bail};
use std::io::Read;

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
    let to = if to == "-" {
        read_url(std::io::stdin().lock())?
    } else {
        to
    };
    let to = with_password_from(to, std::env::var("PGPASSWORD").ok())?;
    crate::pg::connect_config(&to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
    // Whatever prints a message from here on never shows the password.
    crate::sinks::register_url_password(&to);
    let target = crate::config::PostgresJournalConfig {
        url: to,
        schema,
        max_connections: 2,
    };
    let done = crate::journal::sqlite_to_postgres(&config.journal.path, &target).map_err(|e| {
        if format!("{e:#}").contains("password missing") {
            e.context(
                "the database asks for a password and none was given: put it in the URL on \
                 standard input (--to -), or in PGPASSWORD",
            )
        } else {
            e
        }
    })?;
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

/// `--to -`: the URL from standard input (its first line, trimmed), so that a URL with a
/// password stays out of the process list, also through `b24eventd-as-service`, which passes
/// standard input on and no environment.
fn read_url(mut input: impl Read) -> anyhow::Result<String> {
    let mut text = String::new();
    input
        .read_to_string(&mut text)
        .context("cannot read the --to URL from standard input")?;
    let url = text.lines().next().unwrap_or_default().trim();
    if url.is_empty() {
        bail!(
            "--to -: standard input holds no URL; give postgres://user:password@host:5432/database on it"
        );
    }
    Ok(url.to_string())
}

/// `--to` with the password from `PGPASSWORD` (`from_env`) when the URL carries none, as libpq's
/// tools read it: the command line is visible to every local user in the process list, the
/// environment of a process only to its owner and root. A password in the URL wins; an empty
/// `PGPASSWORD` is no password.
fn with_password_from(to: String, from_env: Option<String>) -> anyhow::Result<String> {
    let Some(password) = from_env.filter(|p| !p.is_empty()) else {
        return Ok(to);
    };
    let Ok(mut parsed) = reqwest::Url::parse(&to) else {
        return Ok(to); // connect_config says what is wrong with it
    };
    if parsed.password().is_some() {
        return Ok(to);
    }
    if parsed.username().is_empty() || parsed.set_password(Some(&password)).is_err() {
        bail!(
            "--to: PGPASSWORD is set but the URL names no user to give it to; write \
             postgres://user@host:5432/database"
        );
    }
    Ok(parsed.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn password_of(url: &str) -> Option<Vec<u8>> {
        let (config, _) = crate::pg::connect_config(url).unwrap();
        config.get_password().map(<[u8]>::to_vec)
    }

    #[test]
    fn the_password_comes_from_pgpassword_when_the_url_has_none() {
        let env = |p: &str| Some(p.to_string());
        // Characters a URL's user info must escape arrive as they were written.
        let to =
            with_password_from("postgres://b24@db:5432/events".into(), env("s3:c@r/t %")).unwrap();
        assert_eq!(password_of(&to).as_deref(), Some(&b"s3:c@r/t %"[..]));
        assert_eq!(without_password(&to), "postgres://b24@db:5432/events");
        // The URL's own password wins; an empty or absent PGPASSWORD changes nothing.
        let given = "postgres://b24:inurl@db:5432/events";
        assert_eq!(
            with_password_from(given.into(), env("other")).unwrap(),
            given
        );
        let bare = "postgres://b24@db:5432/events";
        assert_eq!(with_password_from(bare.into(), env("")).unwrap(), bare);
        assert_eq!(with_password_from(bare.into(), None).unwrap(), bare);
        assert_eq!(password_of(bare), None);
        // No user to give it to: said, rather than connecting as nobody.
        let err = with_password_from("postgres://db:5432/events".into(), env("pw")).unwrap_err();
        assert!(err.to_string().contains("names no user"), "{err}");
        assert!(!err.to_string().contains("pw\""), "{err}");
    }

    #[test]
    fn to_dash_reads_the_url_from_standard_input() {
        let url = read_url(&b"  postgres://b24:pw@db:5432/events \nignored\n"[..]).unwrap();
        assert_eq!(url, "postgres://b24:pw@db:5432/events");
        for empty in [&b""[..], b"\n", b"   \n"] {
            let err = read_url(empty).unwrap_err().to_string();
            assert!(err.contains("holds no URL"), "{err}");
        }
    }
}
