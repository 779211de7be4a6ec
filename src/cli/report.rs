//! What the operator commands share: choosing the portals a command works on, plain-text tables,
//! timestamps as they are shown, and the one JSON document `--json` prints on stdout.

use crate::config::{Config, PortalConfig};
use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};

/// The portal named by `--portal`, or an error listing the configured ones.
pub(super) fn portal<'a>(config: &'a Config, name: &str) -> anyhow::Result<&'a PortalConfig> {
    config.portals.get(name).ok_or_else(|| {
        let known: Vec<&str> = config.portals.keys().map(String::as_str).collect();
        anyhow::anyhow!(
            "unknown portal {name}: the config has {}",
            if known.is_empty() {
                "no portals".to_string()
            } else {
                known.join(", ")
            }
        )
    })
}

/// The portal named by `--portal`, or every configured portal when none was named.
pub(super) fn portals<'a>(
    config: &'a Config,
    name: Option<&str>,
) -> anyhow::Result<Vec<&'a PortalConfig>> {
    match name {
        Some(name) => Ok(vec![portal(config, name)?]),
        None => Ok(config.portals.values().collect()),
    }
}

/// A time as the operator commands print it: RFC 3339 UTC to the second.
pub(super) fn time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Prints `value` as one pretty JSON document on stdout.
pub(super) fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("cannot encode the JSON output")?;
    outln!("{text}")?;
    Ok(())
}

/// `text` safe to print on a terminal: control characters (escape sequences, carriage returns,
/// NUL, DEL, the C1 range) become `\x1b`-style escapes; with `keep_lines`, newlines and tabs
/// stay.
pub(super) fn printable(text: &str, keep_lines: bool) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\n' | '\t' if keep_lines => out.push(c),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

/// A plain-text table: a header row and left-aligned columns two spaces apart; the last column
/// is not padded.
pub(super) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(super) fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; control characters in a cell (an event name or an error text from a
    /// portal or a sink) are shown escaped, never sent to the terminal.
    pub(super) fn row(&mut self, cells: Vec<String>) {
        self.rows
            .push(cells.into_iter().map(|c| printable(&c, false)).collect());
    }

    pub(super) fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths = vec![0usize; columns];
        for row in std::iter::once(&self.header).chain(&self.rows) {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                if i + 1 == columns {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    let pad = widths[i] - cell.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_and_leave_the_last_unpadded() {
        let mut t = Table::new(&["PORTAL", "EVENT", "ACTION"]);
        t.row(vec!["main".into(), "ONCRMDEALADD".into(), "bound".into()]);
        t.row(vec![
            "second".into(),
            "ONTASKADD".into(),
            "already bound".into(),
        ]);
        assert_eq!(
            t.render(),
            "PORTAL  EVENT         ACTION\n\
             main    ONCRMDEALADD  bound\n\
             second  ONTASKADD     already bound\n"
        );
        assert_eq!(Table::new(&["A"]).render(), "A\n");
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(printable("ON\u{1b}[2JX", false), "ON\\x1b[2JX");
        assert_eq!(
            printable("a\nb\tc\u{0}\u{7f}\u{9b}", false),
            "a\\nb\\tc\\x00\\x7f\\x9b"
        );
        assert_eq!(printable("a\nb\tc\r", true), "a\nb\tc\\x0d");
        assert_eq!(printable("ОНКРМ ✓", false), "ОНКРМ ✓");
        let mut t = Table::new(&["EVENT"]);
        t.row(vec!["ON\u{1b}]0;owned\u{7}".into()]);
        assert!(!t.render().chars().any(|c| c.is_control() && c != '\n'));
    }

    #[test]
    fn times_are_utc_to_the_second() {
        let t = DateTime::parse_from_rfc3339("2026-11-23T13:00:00.250+03:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(time(t), "2026-11-23T10:00:00Z");
    }
}
