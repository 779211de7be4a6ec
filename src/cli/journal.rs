//! The journal commands: `journal stats|list|show|tail|backup|migrate`, `replay`, `dead
//! list|retry|purge` and `prune`. They run beside the daemon (WAL readers; writes are short
//! transactions; `migrate` alone needs it stopped, and prints through `journal_migrate`) and go
//! through `journal::` for every query.

use super::report::{Table, print_json};
use crate::config::Config;
use crate::journal::{
    Access, EventDetail, EventFilter, EventRow, Journal, PortalStats, Pruned, StatusFilter,
};
use anyhow::{Context, bail};
use chrono::{DateTime, Local, NaiveDate, NaiveDateTime, TimeZone, Utc};
use clap::{Args, Subcommand};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Rows `journal list` and `dead list` show without `--limit` (the newest ones).
const DEFAULT_LIST_LIMIT: u32 = 100;
/// Rows `journal tail` shows before following.
const DEFAULT_TAIL_LIMIT: u32 = 10;
/// How often `journal tail` looks for new events.
const TAIL_POLL: Duration = Duration::from_millis(500);

/// Which events a command is about, by where they come from and where they go (every flag
/// narrows). The other filters are their own groups, so each command offers only those that
/// mean something to it.
#[derive(Args, Debug, Clone, Default)]
pub struct Which {
    /// Only this portal
    #[arg(long, value_name = "NAME")]
    portal: Option<String>,
    /// Only this event name, or a glob such as 'ONCRMDEAL*'
    #[arg(long, value_name = "NAME")]
    event: Option<String>,
    /// Only events routed to this sink (with --status: the delivery to this sink)
    #[arg(long, value_name = "NAME")]
    sink: Option<String>,
}

/// `--status`.
#[derive(Args, Debug, Clone, Default)]
pub struct StatusArg {
    /// pending, retrying (pending after a failure), delivered or dead
    #[arg(long, value_parser = parse_status, value_name = "STATUS")]
    status: Option<StatusFilter>,
}

/// `--since` and `--until`: when the events were journaled.
#[derive(Args, Debug, Clone, Default)]
pub struct Window {
    /// Journaled at or after: 2026-11-22, '2026-11-22 10:00' (local time), RFC 3339, or an age such as 2h
    #[arg(long, value_parser = parse_when, value_name = "WHEN")]
    since: Option<DateTime<Utc>>,
    /// Journaled before (same forms as --since)
    #[arg(long, value_parser = parse_when, value_name = "WHEN")]
    until: Option<DateTime<Utc>>,
}

/// `--limit`.
#[derive(Args, Debug, Clone, Default)]
pub struct LimitArg {
    /// At most this many events (the newest)
    #[arg(long, value_name = "N")]
    limit: Option<u32>,
}

impl Which {
    /// The filter of these flags alone; the command sets the other fields it offers.
    fn filter(&self) -> EventFilter {
        EventFilter {
            portal: self.portal.clone(),
            event: self.event.clone(),
            sink: self.sink.clone(),
            ..EventFilter::default()
        }
    }

    fn is_empty(&self) -> bool {
        self.portal.is_none() && self.event.is_none() && self.sink.is_none()
    }
}

impl Window {
    fn is_empty(&self) -> bool {
        self.since.is_none() && self.until.is_none()
    }
}

fn parse_status(s: &str) -> Result<StatusFilter, String> {
    StatusFilter::parse(s)
        .ok_or_else(|| format!("unknown status {s:?}: use pending, retrying, delivered or dead"))
}

/// `--since`/`--until`: RFC 3339, a date or date-time in local time, or an age (`2h` ago).
pub fn parse_when(s: &str) -> Result<DateTime<Utc>, String> {
    parse_when_at(s, Utc::now())
}

fn parse_when_at(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    let local = |naive: NaiveDateTime| {
        Local
            .from_local_datetime(&naive)
            .earliest()
            .map(|t| t.with_timezone(&Utc))
            .ok_or_else(|| format!("{s:?} does not exist in the local time zone"))
    };
    for format in [
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
    ] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(s, format) {
            return local(naive);
        }
    }
    if let Ok(date) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return local(date.and_hms_opt(0, 0, 0).expect("midnight exists"));
    }
    if let Ok(age) = humantime::parse_duration(s) {
        return chrono::Duration::from_std(age)
            .ok()
            .and_then(|age| now.checked_sub_signed(age))
            .ok_or_else(|| format!("{s:?} is too far back"));
    }
    Err(format!(
        "cannot read {s:?} as a time: use 2026-11-22, '2026-11-22 10:00' (local time), RFC 3339, or an age such as 2h"
    ))
}

#[derive(Subcommand, Debug)]
pub enum JournalCommand {
    /// Per portal and sink: pending, retrying, delivered, dead, oldest pending, unsettled upstream
    Stats {
        #[command(flatten)]
        which: Which,
        #[command(flatten)]
        status: StatusArg,
        #[command(flatten)]
        window: Window,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Events, newest last (the newest 100 unless --limit)
    List {
        #[command(flatten)]
        which: Which,
        #[command(flatten)]
        status: StatusArg,
        #[command(flatten)]
        window: Window,
        #[command(flatten)]
        limit: LimitArg,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// One event: its envelope, every delivery attempt with its error, the upstream settlement
    Show {
        /// A journal row (42), an envelope id (main:1234:1721298751), or a portal and offline
        /// ID (main:1234: every row journaled for that ID)
        id: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Follow new events as they are journaled (Ctrl-C stops)
    Tail {
        #[command(flatten)]
        which: Which,
        #[command(flatten)]
        status: StatusArg,
        /// Show the recent events journaled at or after this before following (same forms as
        /// `journal list --since`)
        #[arg(long, value_parser = parse_when, value_name = "WHEN")]
        since: Option<DateTime<Utc>>,
        /// Show this many recent events before following (default 10)
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
    /// Copy this SQLite journal into PostgreSQL (the daemon stopped): every table, ids kept, in
    /// one transaction; refuses a schema that holds anything. The file is left untouched
    Migrate {
        /// The PostgreSQL database to copy into: postgres://user@host:5432/database (add
        /// ?sslmode=require for TLS), or "-" to read the URL from standard input. A password
        /// not in the URL is taken from PGPASSWORD, as psql takes it: a password on the command
        /// line is visible to every local user in the process list
        #[arg(long, value_name = "URL")]
        to: String,
        /// The schema to create the journal in; it must be absent or empty
        #[arg(long, value_name = "NAME", default_value = crate::config::DEFAULT_JOURNAL_SCHEMA,
              value_parser = parse_schema)]
        schema: String,
        /// Print the result as one JSON document
        #[arg(long)]
        json: bool,
    },
    /// Write a consistent copy of the journal (tokens included) to a new file with mode 0600;
    /// safe while the daemon runs. Refuses a PATH that exists
    Backup {
        /// The file to create (not overwritten when it exists)
        #[arg(value_name = "PATH")]
        path: std::path::PathBuf,
        /// Print the result as one JSON document
        #[arg(long)]
        json: bool,
    },
}

/// Here `--sink S` is the target, not a filter: matching events go to S only, also those S
/// never had (e.g. a sink added later).
#[derive(Args, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    which: Which,
    #[command(flatten)]
    status: StatusArg,
    #[command(flatten)]
    window: Window,
    #[command(flatten)]
    limit: LimitArg,
    /// Replay every journaled event (instead of giving a filter)
    #[arg(long)]
    all: bool,
    /// List what would be replayed, change nothing
    #[arg(long)]
    dry_run: bool,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

/// The filters of the `dead` commands (every one is about dead deliveries: no `--status`).
#[derive(Args, Debug, Clone, Default)]
pub struct DeadFilter {
    #[command(flatten)]
    which: Which,
    #[command(flatten)]
    window: Window,
    #[command(flatten)]
    limit: LimitArg,
}

impl DeadFilter {
    fn filter(&self, default_limit: Option<u32>) -> EventFilter {
        EventFilter {
            status: Some(StatusFilter::Dead),
            since: self.window.since,
            until: self.window.until,
            limit: self.limit.limit.or(default_limit),
            ..self.which.filter()
        }
    }

    fn is_empty(&self) -> bool {
        self.which.is_empty() && self.window.is_empty() && self.limit.limit.is_none()
    }
}

#[derive(Subcommand, Debug)]
pub enum DeadCommand {
    /// Events with a dead delivery, with the last error (the newest 100 unless --limit)
    List {
        #[command(flatten)]
        filter: DeadFilter,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Make dead deliveries pending again (after fixing the sink)
    Retry {
        #[command(flatten)]
        filter: DeadFilter,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Delete dead events already settled upstream; needs a filter, or --all for every one
    Purge {
        #[command(flatten)]
        filter: DeadFilter,
        /// Purge every dead event (instead of giving a filter)
        #[arg(long)]
        all: bool,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Delete events settled longer ago than this (default: journal.retention)
    #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
    /// Dead events too (kept otherwise, for `dead list`)
    #[arg(long)]
    include_dead: bool,
    /// Print JSON
    #[arg(long)]
    json: bool,
}

/// Opens the journal of a command that only reads it: read-only, and it must exist already and
/// be the daemon's (a typo in the path should not create an empty one, nor migrate a file of
/// another program).
fn open_to_read(config: &Config) -> anyhow::Result<Journal> {
    Journal::open_configured_blocking(&config.journal, Access::Read)
}

/// Opens the journal of a command that changes it: read-write, but it must exist already and be
/// the daemon's.
fn open_to_write(config: &Config) -> anyhow::Result<Journal> {
    Journal::open_configured_blocking(&config.journal, Access::Write)
}

/// Checks `--sink`/`--portal` against the config, so a typo is an error and not an empty list.
fn check_names(config: &Config, filter: &Which, journal: &Journal) -> anyhow::Result<()> {
    if let Some(portal) = &filter.portal
        && !config.portals.contains_key(portal)
        && journal
            .stats(&EventFilter::default())?
            .iter()
            .all(|p| &p.portal != portal)
    {
        bail!(
            "unknown portal {portal}: the config has {}",
            names(config.portals.keys())
        );
    }
    if let Some(sink) = &filter.sink
        && !config.sinks.contains_key(sink)
        && journal
            .stats(&EventFilter::default())?
            .iter()
            .all(|p| p.sinks.iter().all(|s| &s.sink != sink))
    {
        bail!(
            "unknown sink {sink}: the config has {}",
            names(config.sinks.keys())
        );
    }
    Ok(())
}

fn names<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let list: Vec<&str> = names.map(String::as_str).collect();
    if list.is_empty() {
        "none".to_string()
    } else {
        list.join(", ")
    }
}

pub fn journal(config: &Config, command: JournalCommand) -> anyhow::Result<()> {
    if let JournalCommand::Migrate { to, schema, json } = command {
        return super::journal_migrate::migrate(config, to, schema, json);
    }
    let journal = open_to_read(config)?;
    match command {
        JournalCommand::Stats {
            which,
            status,
            window,
            json,
        } => {
            check_names(config, &which, &journal)?;
            let stats = journal.stats(&EventFilter {
                status: status.status,
                since: window.since,
                until: window.until,
                ..which.filter()
            })?;
            if json {
                return print_json(&serde_json::json!({ "portals": stats }));
            }
            print_stats(&stats)?;
            Ok(())
        }
        JournalCommand::List {
            which,
            status,
            window,
            limit,
            json,
        } => {
            check_names(config, &which, &journal)?;
            let rows = journal.list_events(&EventFilter {
                status: status.status,
                since: window.since,
                until: window.until,
                limit: limit.limit.or(Some(DEFAULT_LIST_LIMIT)),
                ..which.filter()
            })?;
            if json {
                return print_json(&serde_json::json!({ "events": rows }));
            }
            print_events(&rows)?;
            Ok(())
        }
        JournalCommand::Show { id, json } => {
            let details = journal.show_event(&id)?;
            if details.is_empty() {
                bail!("no event {id} in the journal {}", journal.location());
            }
            if json {
                return print_json(&serde_json::json!({ "events": details }));
            }
            for (i, detail) in details.iter().enumerate() {
                if i > 0 {
                    outln!()?;
                }
                print_detail(detail)?;
            }
            Ok(())
        }
        JournalCommand::Tail {
            which,
            status,
            since,
            limit,
            json,
        } => {
            check_names(config, &which, &journal)?;
            let filter = EventFilter {
                status: status.status,
                since,
                limit: limit.or(Some(DEFAULT_TAIL_LIMIT)),
                ..which.filter()
            };
            tail(&journal, filter, json)
        }
        JournalCommand::Migrate { .. } => unreachable!("handled before the journal is opened"),
        JournalCommand::Backup { path, json } => {
            let bytes = journal.backup_blocking(&path)?;
            if json {
                return print_json(&serde_json::json!({
                    "journal": journal.location(),
                    "backup": path,
                    "bytes": bytes,
                }));
            }
            outln!(
                "journal {} copied to {} ({bytes} bytes, mode 0600; it holds the OAuth tokens)",
                journal.location(),
                path.display()
            )?;
            Ok(())
        }
    }
}

fn parse_schema(s: &str) -> Result<String, String> {
    crate::config::check_schema_name(s).map(|()| s.to_string())
}

/// Prints the newest `filter.limit` matching events, then follows new ones.
fn tail(journal: &Journal, mut first: EventFilter, json: bool) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())
            .context("cannot install signal handlers")?;
    }
    let recent = journal.list_events(&first)?;
    first.limit = None;
    let mut last = recent.last().map(|r| r.row).unwrap_or_else(|| {
        // Nothing matched yet: follow from the newest row of the whole journal.
        journal
            .list_events(&EventFilter {
                limit: Some(1),
                ..EventFilter::default()
            })
            .ok()
            .and_then(|rows| rows.last().map(|r| r.row))
            .unwrap_or(0)
    });
    let print = |rows: &[EventRow], header: bool| -> anyhow::Result<()> {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for row in rows {
            if json {
                writeln!(out, "{}", serde_json::to_string(row)?)?;
            } else {
                let _ = header;
                writeln!(out, "{}", event_line(row))?;
            }
        }
        out.flush()?;
        Ok(())
    };
    print(&recent, true)?;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(TAIL_POLL);
        let rows = journal.events_after(&first, last)?;
        if let Some(row) = rows.last() {
            last = row.row;
        }
        print(&rows, false)?;
    }
    Ok(())
}

pub fn replay(config: &Config, mut args: ReplayArgs) -> anyhow::Result<()> {
    let unfiltered = args.which.is_empty()
        && args.status.status.is_none()
        && args.window.is_empty()
        && args.limit.limit.is_none();
    if unfiltered && !args.all {
        bail!(
            "replay needs a filter (--portal, --event, --sink, --status, --since, --until, --limit) or --all for the whole journal"
        );
    }
    let journal = if args.dry_run {
        open_to_read(config)?
    } else {
        open_to_write(config)?
    };
    let to_sink = args.which.sink.take();
    check_names(config, &args.which, &journal)?;
    if let Some(sink) = &to_sink
        && !config.sinks.contains_key(sink)
    {
        bail!(
            "unknown sink {sink}: replay goes to configured sinks only ({})",
            names(config.sinks.keys())
        );
    }
    let filter = EventFilter {
        status: args.status.status,
        since: args.window.since,
        until: args.window.until,
        limit: args.limit.limit,
        ..args.which.filter()
    };
    if args.dry_run {
        let rows = journal.list_events(&filter)?;
        if args.json {
            return print_json(&serde_json::json!({ "dry_run": true, "events": rows }));
        }
        print_events(&rows)?;
        outln!(
            "would replay {} event{} (dry run: nothing changed)",
            rows.len(),
            super::plural(rows.len())
        )?;
        return Ok(());
    }
    let known: Vec<String> = config.sinks.keys().cloned().collect();
    let done = journal.replay(&filter, to_sink.as_deref(), &known)?;
    if args.json {
        return print_json(&done);
    }
    outln!(
        "replayed {} event{} ({} deliver{} made pending{}); a running daemon delivers them within seconds",
        done.events,
        super::plural(done.events as usize),
        done.deliveries,
        if done.deliveries == 1 { "y" } else { "ies" },
        skipped_note(done.skipped_unknown_sinks),
    )?;
    Ok(())
}

fn skipped_note(skipped: u64) -> String {
    if skipped == 0 {
        String::new()
    } else {
        format!("; {skipped} to sinks no longer configured skipped")
    }
}

pub fn dead(config: &Config, command: DeadCommand) -> anyhow::Result<()> {
    if let DeadCommand::Purge {
        filter, all: false, ..
    } = &command
        && filter.is_empty()
    {
        bail!(
            "dead purge deletes dead events for good: give a filter (--portal, --event, --sink, --since, --until, --limit) or --all for every dead event"
        );
    }
    let journal = match command {
        DeadCommand::List { .. } => open_to_read(config)?,
        DeadCommand::Retry { .. } | DeadCommand::Purge { .. } => open_to_write(config)?,
    };
    match command {
        DeadCommand::List { filter, json } => {
            check_names(config, &filter.which, &journal)?;
            let rows = journal.list_events(&filter.filter(Some(DEFAULT_LIST_LIMIT)))?;
            if json {
                return print_json(&serde_json::json!({ "events": rows }));
            }
            let mut table = Table::new(&[
                "ROW",
                "ID",
                "EVENT",
                "SINK",
                "ATTEMPTS",
                "UPSTREAM",
                "LAST ERROR",
            ]);
            for row in &rows {
                for d in row.deliveries.iter().filter(|d| d.status == "dead") {
                    if filter.which.sink.as_ref().is_some_and(|s| *s != d.sink) {
                        continue;
                    }
                    table.row(vec![
                        row.row.to_string(),
                        row.id.clone(),
                        row.event.clone(),
                        d.sink.clone(),
                        d.attempts.to_string(),
                        row.upstream.clone(),
                        d.last_error.clone().unwrap_or_default(),
                    ]);
                }
            }
            out!("{}", table.render())?;
            Ok(())
        }
        DeadCommand::Retry { filter, json } => {
            check_names(config, &filter.which, &journal)?;
            let known: Vec<String> = config.sinks.keys().cloned().collect();
            let done = journal.retry_dead(&filter.filter(None), &known)?;
            if json {
                return print_json(&done);
            }
            outln!(
                "{} dead deliver{} of {} event{} made pending again{}; a running daemon delivers them within seconds",
                done.deliveries,
                if done.deliveries == 1 { "y" } else { "ies" },
                done.events,
                super::plural(done.events as usize),
                skipped_note(done.skipped_unknown_sinks),
            )?;
            Ok(())
        }
        DeadCommand::Purge { filter, json, .. } => {
            check_names(config, &filter.which, &journal)?;
            let done = journal.purge_dead(&filter.filter(None))?;
            if json {
                return print_json(&done);
            }
            outln!(
                "purged {} dead event{}{}",
                done.events,
                super::plural(done.events as usize),
                if done.kept_unsettled > 0 {
                    format!(
                        "; kept {} still waiting for their upstream event.offline.error",
                        done.kept_unsettled
                    )
                } else {
                    String::new()
                }
            )?;
            print_kept_in_error_lane(&done)?;
            Ok(())
        }
    }
}

pub fn prune(config: &Config, args: PruneArgs) -> anyhow::Result<()> {
    let journal = open_to_write(config)?;
    let age = args.older_than.unwrap_or(config.journal.retention);
    let cutoff =
        Utc::now() - chrono::Duration::from_std(age).context("--older-than is too large")?;
    let done = journal.prune_blocking(cutoff, args.include_dead)?;
    if args.json {
        return print_json(&done);
    }
    outln!(
        "pruned {} event{} and {} batch{} settled before {} ({}){}",
        done.events,
        super::plural(done.events as usize),
        done.batches,
        if done.batches == 1 { "" } else { "es" },
        cutoff.with_timezone(&Local).format("%Y-%m-%d %H:%M:%S"),
        crate::age::ago(age),
        if args.include_dead {
            ", dead ones included"
        } else {
            ""
        }
    )?;
    print_kept_in_error_lane(&done)?;
    Ok(())
}

/// The line `dead purge` and `prune` add when they kept events Bitrix24 still holds in its error
/// lane (the next error-lane poll needs their deliveries to tell which sinks have them).
fn print_kept_in_error_lane(done: &Pruned) -> anyhow::Result<()> {
    if done.kept_in_error_lane > 0 {
        outln!(
            "kept {}: Bitrix24 still holds them in its error lane; they can be purged after the next error-lane poll",
            done.kept_in_error_lane
        )?;
    }
    Ok(())
}

fn print_stats(stats: &[PortalStats]) -> anyhow::Result<()> {
    if stats.is_empty() {
        outln!("no events in the journal")?;
        return Ok(());
    }
    let now = Utc::now();
    let mut table = Table::new(&[
        "PORTAL",
        "SINK",
        "PENDING",
        "RETRYING",
        "DELIVERED",
        "DEAD",
        "OLDEST PENDING",
        "UNSETTLED UPSTREAM",
    ]);
    for p in stats {
        table.row(vec![
            p.portal.clone(),
            "(all)".to_string(),
            p.pending.to_string(),
            p.retrying.to_string(),
            p.delivered.to_string(),
            p.dead.to_string(),
            age(p.oldest_pending_fetched_at.as_deref(), now),
            p.upstream_unsettled.to_string(),
        ]);
        for s in &p.sinks {
            table.row(vec![
                String::new(),
                s.sink.clone(),
                s.pending.to_string(),
                s.retrying.to_string(),
                s.delivered.to_string(),
                s.dead.to_string(),
                age(s.oldest_pending_fetched_at.as_deref(), now),
                String::new(),
            ]);
        }
    }
    out!("{}", table.render())?;
    Ok(())
}

/// How long ago a journal timestamp was, for people (`12 min ago`); `-` for none.
fn age(at: Option<&str>, now: DateTime<Utc>) -> String {
    match at.and_then(|t| DateTime::parse_from_rfc3339(t).ok()) {
        Some(at) => crate::age::ago_at(at.with_timezone(&Utc), now),
        None => "-".to_string(),
    }
}

fn local_time(at: &str) -> String {
    DateTime::parse_from_rfc3339(at)
        .map(|t| {
            t.with_timezone(&Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|_| at.to_string())
}

fn sinks_summary(row: &EventRow) -> String {
    row.deliveries
        .iter()
        .map(|d| format!("{}={}", d.sink, d.status))
        .collect::<Vec<_>>()
        .join(" ")
}

fn event_line(row: &EventRow) -> String {
    format!(
        "{} {} {} {} {} upstream={} {}",
        local_time(&row.fetched_at),
        row.row,
        row.id,
        row.event,
        row.status,
        row.upstream,
        sinks_summary(row)
    )
}

fn print_events(rows: &[EventRow]) -> anyhow::Result<()> {
    let mut table = Table::new(&[
        "ROW", "ID", "EVENT", "LANE", "STATUS", "UPSTREAM", "FETCHED", "SINKS",
    ]);
    for row in rows {
        table.row(vec![
            row.row.to_string(),
            row.id.clone(),
            row.event.clone(),
            row.lane.clone(),
            row.status.clone(),
            row.upstream.clone(),
            local_time(&row.fetched_at),
            sinks_summary(row),
        ]);
    }
    out!("{}", table.render())?;
    Ok(())
}

fn print_detail(d: &EventDetail) -> anyhow::Result<()> {
    outln!("event {} (journal row {})", d.envelope.id, d.row)?;
    outln!("  status      {}", d.status)?;
    outln!("  fetched     {}", local_time(&d.fetched_at))?;
    outln!(
        "  upstream    {}{}",
        d.upstream.state,
        d.upstream
            .settled_at
            .as_deref()
            .map(|t| format!(" at {}", local_time(t)))
            .unwrap_or_default()
    )?;
    outln!(
        "  batch       {} ({}, fetched {})",
        d.batch.process_id,
        d.batch.origin,
        local_time(&d.batch.fetched_at)
    )?;
    outln!("  envelope    {}", serde_json::to_string(&d.envelope)?)?;
    outln!("deliveries:")?;
    let mut table = Table::new(&[
        "SINK",
        "STATUS",
        "ATTEMPTS",
        "NEXT ATTEMPT",
        "REPLAYS",
        "LAST ERROR",
    ]);
    for del in &d.deliveries {
        table.row(vec![
            del.sink.clone(),
            del.status.clone(),
            del.attempts.to_string(),
            del.next_attempt_at
                .as_deref()
                .map(local_time)
                .unwrap_or_default(),
            del.replays.to_string(),
            del.last_error.clone().unwrap_or_default(),
        ]);
    }
    out!("{}", table.render())?;
    outln!("attempts:")?;
    let mut table = Table::new(&["AT", "SINK", "ATTEMPT", "OUTCOME", "ERROR"]);
    for a in &d.attempts {
        table.row(vec![
            local_time(&a.at),
            a.sink.clone(),
            a.attempt.to_string(),
            a.outcome.clone(),
            a.error.clone().unwrap_or_default(),
        ]);
    }
    out!("{}", table.render())?;
    for a in d.attempts.iter().filter(|a| a.output.is_some()) {
        outln!(
            "output of {} attempt {} at {}:\n{}",
            a.sink,
            a.attempt,
            local_time(&a.at),
            super::report::printable(a.output.as_deref().unwrap_or_default(), true)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn when_accepts_rfc3339_dates_and_ages() {
        let now = DateTime::parse_from_rfc3339("2026-11-23T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_when_at("2026-11-22T10:00:00+03:00", now).unwrap(),
            DateTime::parse_from_rfc3339("2026-11-22T07:00:00Z").unwrap()
        );
        assert_eq!(
            parse_when_at("2h", now).unwrap(),
            DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z").unwrap()
        );
        let local_midnight = Local
            .from_local_datetime(
                &NaiveDate::from_ymd_opt(2026, 11, 22)
                    .unwrap()
                    .and_hms_opt(0, 0, 0)
                    .unwrap(),
            )
            .earliest()
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(parse_when_at("2026-11-22", now).unwrap(), local_midnight);
        assert_eq!(
            parse_when_at("2026-11-22 00:00", now).unwrap(),
            local_midnight
        );
        let err = parse_when_at("yesterday", now).unwrap_err();
        assert!(err.contains("cannot read \"yesterday\""), "{err}");
    }

    #[test]
    fn status_names() {
        assert_eq!(parse_status("retrying").unwrap(), StatusFilter::Retrying);
        assert!(
            parse_status("failed")
                .unwrap_err()
                .contains("pending, retrying, delivered or dead")
        );
    }
}
