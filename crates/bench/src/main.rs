//! `b24eventd-bench`: a developer tool, built beside the `b24eventd` binary but not shipped in
//! it, that measures the real binary against simulated portals served from the bench process
//! and compares every number with a baseline measured in the same run, because the machine it
//! runs on is shared and noisy. `drain` (request economy under cloud limits vs the documented
//! safe loop), `overhead` (local cost per event vs bare SQLite inserts), `latency` (queue to
//! delivery, idle and under load, vs a bare `event.offline.get` round trip) and `memory` (RSS
//! idle, under a backlog and with many portals, vs idle with one) and `backlog` (a 100,000-event
//! backlog on a portal without limits: events per second and CPU per event vs bare SQLite
//! inserts, the journal's own speed, with the journal on SQLite and on PostgreSQL) and `cluster`
//! (three daemons sharing a PostgreSQL journal and 10,000 portals: time to own and balance them,
//! drain, memory, connections, lease renewals, and the dispatcher's owned-portal query). Results
//! are recorded in
//! `docs/BENCHMARKS.md`.

/// `println!` that returns the write error instead of panicking (so `| head` ends quietly),
/// scrubbed of every secret the process knows, as the daemon's own commands print.
macro_rules! outln {
    () => {{
        use std::io::Write as _;
        writeln!(std::io::stdout())
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let text = format!($($arg)*);
        writeln!(std::io::stdout(), "{}", b24eventd::redact::scrub(&text))
    }};
}

mod backlog;
mod cluster;
mod daemon;
mod drain;
mod dueq;
mod journal;
mod latency;
mod memory;
mod overhead;
mod pg;
mod procfs;
mod stats;

use clap::Parser;
use serde::Serialize;
use std::process::ExitCode;
use std::time::Instant;

/// Benchmarks of the real b24eventd binary against simulated portals (see docs/BENCHMARKS.md).
/// The daemon is the `b24eventd` binary beside this one: build both with
/// `cargo build --release --workspace`.
#[derive(Parser, Debug)]
#[command(name = "b24eventd-bench", version)]
struct BenchArgs {
    /// Which benchmark to run
    #[arg(value_enum)]
    which: Which,
    /// Events queued for drain and overhead (default 20000); the memory and backlog backlogs
    /// are 5 times this
    #[arg(long, value_name = "N")]
    events: Option<u64>,
    /// Portals (one simulator each) for the many-portal memory measurement (default 1000), or
    /// shared by the cluster's three instances (default 10000)
    #[arg(long, value_name = "N")]
    portals: Option<u32>,
    /// backlog, cluster: the PostgreSQL server for the journal (a fresh schema per run,
    /// dropped after); the server's CPU is read from /proc when it runs on this machine
    #[arg(long, value_name = "URL", default_value = pg::DEFAULT_URL)]
    postgres: String,
    /// backlog: drain with the SQLite journal only
    #[arg(long)]
    no_postgres: bool,
    /// Print one JSON document instead of tables
    #[arg(long)]
    json: bool,
    /// drain, backlog: also drain the same queue with another build of b24eventd (e.g. the
    /// previous release), against the same simulator
    #[arg(long, value_name = "BINARY")]
    compare_with: Option<std::path::PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Drain,
    Overhead,
    Latency,
    Memory,
    Backlog,
    Cluster,
    Journal,
    All,
}

const DEFAULT_EVENTS: u64 = 20_000;
const BACKLOG_FACTOR: u64 = 5;

/// One number measured for one subject (`b24eventd`, `baseline: …`).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub subject: String,
    pub metric: String,
    pub value: f64,
    pub unit: String,
}

/// A same-run comparison: `value` and what it means (which way is better).
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub name: String,
    pub value: f64,
    pub meaning: String,
}

/// The outcome of one benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub bench: &'static str,
    /// How it was set up (limits, config keys, sizes).
    pub setup: Vec<String>,
    pub rows: Vec<Row>,
    pub ratios: Vec<Ratio>,
    /// What the numbers mean and what went wrong, if anything.
    pub notes: Vec<String>,
    pub seconds: f64,
}

impl Report {
    pub fn new(bench: &'static str) -> Report {
        Report {
            bench,
            setup: Vec::new(),
            rows: Vec::new(),
            ratios: Vec::new(),
            notes: Vec::new(),
            seconds: 0.0,
        }
    }

    pub fn row(&mut self, subject: &str, metric: &str, value: f64, unit: &str) {
        self.rows.push(Row {
            subject: subject.to_string(),
            metric: metric.to_string(),
            value,
            unit: unit.to_string(),
        });
    }

    pub fn ratio(&mut self, name: &str, value: f64, meaning: &str) {
        self.ratios.push(Ratio {
            name: name.to_string(),
            value,
            meaning: meaning.to_string(),
        });
    }
}

/// Where and how the run happened.
#[derive(Debug, Serialize)]
struct Machine {
    date: String,
    uname: String,
    cpu: String,
    cores: usize,
    build: &'static str,
    command: String,
}

impl Machine {
    fn describe() -> Machine {
        let uname = std::process::Command::new("uname")
            .arg("-a")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".to_string());
        Machine {
            date: chrono::Utc::now()
                .format("%Y-%m-%d %H:%M:%S UTC")
                .to_string(),
            uname,
            cpu: procfs::cpu_model(),
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            command: std::env::args().collect::<Vec<_>>().join(" "),
        }
    }
}

fn main() -> ExitCode {
    let args = match BenchArgs::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    // One TLS crypto provider for the process (reqwest is built without one).
    let _ = rustls::crypto::ring::default_provider().install_default();
    b24eventd::cli::init_logging("warn");
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of the output went away (`| head`): nothing failed.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            use std::io::Write as _;
            let text = format!("{error:#}");
            let _ = writeln!(
                std::io::stderr(),
                "b24eventd-bench: {}",
                b24eventd::redact::scrub(&text)
            );
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Runs the chosen benchmarks and prints their reports.
async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let machine = Machine::describe();
    let events = args.events.unwrap_or(DEFAULT_EVENTS).max(1);
    let chosen = |w: Which| args.which == w || args.which == Which::All;
    if !args.json {
        print_machine(&machine)?;
    }
    let mut reports = Vec::new();
    let steps: [(Which, &str); 7] = [
        (Which::Drain, "drain"),
        (Which::Overhead, "overhead"),
        (Which::Latency, "latency"),
        (Which::Memory, "memory"),
        (Which::Backlog, "backlog"),
        (Which::Cluster, "cluster"),
        (Which::Journal, "journal"),
    ];
    let postgres = (!args.no_postgres).then_some(args.postgres.as_str());
    for (which, name) in steps {
        if !chosen(which) {
            continue;
        }
        eprintln!("bench {name}: running");
        let started = Instant::now();
        let mut report = match which {
            Which::Drain => drain::run(events, args.compare_with.as_deref()).await?,
            Which::Overhead => overhead::run(events).await?,
            Which::Latency => latency::run().await?,
            Which::Memory => {
                memory::run(events * BACKLOG_FACTOR, args.portals.unwrap_or(1000)).await?
            }
            Which::Backlog => {
                backlog::run(
                    events * BACKLOG_FACTOR,
                    args.compare_with.as_deref(),
                    postgres,
                )
                .await?
            }
            Which::Cluster => cluster::run(args.portals.unwrap_or(10_000), &args.postgres).await?,
            Which::Journal => journal::run(events * BACKLOG_FACTOR).await?,
            Which::All => unreachable!("`all` is expanded above"),
        };
        report.seconds = started.elapsed().as_secs_f64();
        eprintln!("bench {name}: done in {:.0} s", report.seconds);
        if !args.json {
            print_report(&report)?;
        }
        reports.push(report);
    }
    if args.json {
        let doc = serde_json::json!({ "machine": machine, "reports": reports });
        outln!("{}", serde_json::to_string_pretty(&doc)?)?;
    }
    Ok(())
}

fn print_machine(m: &Machine) -> std::io::Result<()> {
    outln!("date    {}", m.date)?;
    outln!("machine {}", m.uname)?;
    outln!("cpu     {} ({} cores)", m.cpu, m.cores)?;
    outln!("build   {}", m.build)?;
    outln!("command {}", m.command)
}

fn print_report(r: &Report) -> std::io::Result<()> {
    outln!()?;
    outln!("== {} ({:.0} s) ==", r.bench, r.seconds)?;
    for line in &r.setup {
        outln!("  {line}")?;
    }
    let subject_width = r.rows.iter().map(|x| x.subject.len()).max().unwrap_or(0);
    let metric_width = r.rows.iter().map(|x| x.metric.len()).max().unwrap_or(0);
    outln!()?;
    for row in &r.rows {
        outln!(
            "  {:<sw$}  {:<mw$}  {:>12} {}",
            row.subject,
            row.metric,
            format_value(row.value),
            row.unit,
            sw = subject_width,
            mw = metric_width
        )?;
    }
    if !r.ratios.is_empty() {
        outln!()?;
    }
    for ratio in &r.ratios {
        outln!(
            "  ratio {:<40} {:>8.2}  ({})",
            ratio.name,
            ratio.value,
            ratio.meaning
        )?;
    }
    for note in &r.notes {
        outln!("  note: {note}")?;
    }
    Ok(())
}

/// Integers without decimals, small numbers with enough to read.
fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_printed_with_sensible_precision() {
        assert_eq!(format_value(20000.0), "20000");
        assert_eq!(format_value(1234.567), "1234.6");
        assert_eq!(format_value(2.34567), "2.346");
    }
}
