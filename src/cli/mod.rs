//! The command line: argument parsing, logging set-up, and the one place that prints errors and
//! turns them into exit codes (0 ok, 1 runtime failure, 2 usage, 70 a supervised task of `run`
//! kept dying, 78 configuration error or a journal refused: not a file, another program's,
//! damaged, or too new).

/// `println!` that returns the write error instead of panicking, so `b24eventd journal list |
/// head` ends quietly when `head` closes the pipe (see [`main`]). What it prints is scrubbed of
/// every secret the process knows ([`crate::redact`]).
macro_rules! outln {
    () => {{
        use std::io::Write as _;
        writeln!(std::io::stdout())
    }};
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let text = format!($($arg)*);
        writeln!(std::io::stdout(), "{}", crate::redact::scrub(&text))
    }};
}

/// `print!`, returning the write error and scrubbed like [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let text = format!($($arg)*);
        write!(std::io::stdout(), "{}", crate::redact::scrub(&text))
    }};
}

mod auth;
mod cluster;
mod demo;
mod doctor;
mod journal;
mod journal_migrate;
mod probe;
mod report;
mod subscribe;

use crate::config::{self, ConfigError};
use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Exit code for a configuration error (sysexits EX_CONFIG); systemd units use it in
/// `RestartPreventExitStatus=`.
pub const EXIT_CONFIG: u8 = 78;

#[derive(Parser, Debug)]
#[command(
    name = "b24eventd",
    version,
    about = "Pulls Bitrix24 offline events, journals them in SQLite, delivers them to sinks, and settles them upstream",
    long_about = "b24eventd reserves events from a Bitrix24 portal's offline queue (event.offline.get with clear=0), \
records each batch in a local SQLite journal before anything else, delivers every event to the sinks the \
configuration routes it to, and only then settles it upstream: event.offline.clear when delivered, \
event.offline.error when a sink gave up. No event is lost on a crash, a lost response, a sink outage, a rate \
limit or an expired token.\n\nStart with `b24eventd demo` (no portal or config needed).",
    after_help = "Config path: -c/--config, else $B24EVENTD_CONFIG, else ./b24eventd.toml, else /etc/b24eventd/config.toml.\n\
Logging: B24EVENTD_LOG (or RUST_LOG) takes a tracing filter, e.g. B24EVENTD_LOG=debug.\n\
Exit codes: 0 ok, 1 runtime failure, 2 usage, 70 a task of `run` kept dying, 78 configuration error \
(also a journal path that is not a file, another program's database, a damaged journal)."
)]
struct Cli {
    /// Configuration file (TOML)
    #[arg(short, long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon: poll every portal, deliver to every sink, settle upstream
    Run,
    /// Run the whole pipeline against the built-in portal simulator (no portal, no config needed)
    Demo(demo::DemoArgs),
    /// Serve the portal simulator (REST + OAuth) so you can try a config without a portal
    Simulate {
        /// Address to listen on
        #[arg(long, default_value = "127.0.0.1:8024", value_name = "ADDR")]
        listen: std::net::SocketAddr,
        /// How long an access token lives (Bitrix24: 1h); shorter to watch refreshes happen
        #[arg(long, default_value = "1h", value_name = "DURATION", value_parser = humantime::parse_duration)]
        token_ttl: std::time::Duration,
    },
    /// Check the configuration and exit 0, or print what is wrong and exit 78
    Validate {
        /// Then also talk to every portal and sink, as `doctor` does (exit 1 when a check fails)
        #[arg(long)]
        online: bool,
        /// With --online: print the report as one JSON document
        #[arg(long, requires = "online")]
        json: bool,
    },
    /// Check every portal (token, rights, plan features, bindings, clock, backlog) and every
    /// sink; exit 1 when a check fails. With --conformance: check one portal's Bitrix24 server
    /// against every assumption the daemon rests on (needs the daemon stopped)
    Doctor {
        /// Print the report as one JSON document
        #[arg(long)]
        json: bool,
        /// Instead of the checks above, probe --portal's Bitrix24 server for every assumption
        /// the daemon rests on (needs the daemon stopped; see --help)
        ///
        /// Under a connector of its own (b24eventd-probe-<hex>) the probe binds ONAPPTEST
        /// offline, makes test rows with event.test (no CRM data), and checks reservation,
        /// re-read by process_id, the >PROCESS_ID listing, the error lane (move and merge),
        /// clear by message_id and by id, a get limit above 50 and the time block; then it
        /// clears every row it made, unbinds, and checks that nothing is left. It never touches
        /// the daemon's connector. It takes under a minute, refuses while `run` holds the
        /// journal, and stores its findings in the journal, where `run` reads them at start: it
        /// caps batch_size at what one get returned, clears by id, or refuses the portal (exit
        /// 78) where it cannot work around a finding. Exit 1 when a check fails. Run it before
        /// the first start on a new portal, after a Bitrix24 update, and when something looks
        /// wrong; send the --json output to the b24eventd maintainers.
        #[arg(long, requires = "portal")]
        conformance: bool,
        /// The portal the conformance probe checks ([portals.NAME])
        #[arg(long, value_name = "NAME", requires = "conformance")]
        portal: Option<String>,
    },
    /// Manage the OAuth tokens stored in the journal
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Inspect the journal (safe while the daemon runs)
    #[command(subcommand)]
    Journal(journal::JournalCommand),
    /// The instances sharing a PostgreSQL journal and the portal leases they hold
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Deliver journaled events again, by the journal filters; --sink S sends to S only (also
    /// events S never had). Same envelope id, so sinks can deduplicate. A running daemon picks
    /// them up within seconds; otherwise the next `run` does.
    Replay(journal::ReplayArgs),
    /// Dead events: list them, retry them after fixing a sink, or purge them
    #[command(subcommand)]
    Dead(journal::DeadCommand),
    /// Delete events settled upstream longer ago than journal.retention (or --older-than)
    Prune(journal::PruneArgs),
    /// Bind the offline events listed in `events` on the portal (event.bind, event_type=offline)
    Subscribe {
        /// Only this portal (default: every configured portal)
        #[arg(long)]
        portal: Option<String>,
        /// Also unbind offline events that are bound but not in `events`, once every event in
        /// `events` is bound (when a bind fails, the extras are kept)
        #[arg(long)]
        prune: bool,
        /// Print what changed as one JSON document
        #[arg(long)]
        json: bool,
    },
    /// Remove every offline binding of this application on the portal made with its
    /// `auth_connector` (also events no longer in `events`); other connectors' stay
    Unsubscribe {
        /// Only this portal (default: every configured portal)
        #[arg(long)]
        portal: Option<String>,
        /// Remove only the bindings of the events listed in `events`; keep the other ones
        #[arg(long)]
        only_configured: bool,
        /// Print what changed as one JSON document
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCommand {
    /// Every instance (id, host, pid, version, last heartbeat, live or not) and every portal's
    /// lease (owner, epoch, time left, handovers); on SQLite, says the journal is not shared
    Status {
        /// Print the report as one JSON document
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AuthCommand {
    /// Store a portal's OAuth tokens in the journal (e.g. from the app's installation callback).
    /// Without --access-token the refresh token is used at once, which checks it and stores
    /// the rotated pair.
    Import {
        /// Portal name, as in [portals.NAME]
        #[arg(long)]
        portal: String,
        /// The refresh token, or "-" to read it from standard input (keeps it out of `ps`)
        #[arg(long, value_name = "TOKEN")]
        refresh_token: String,
        /// A current access token, if you have one
        #[arg(long, value_name = "TOKEN")]
        access_token: Option<String>,
    },
    /// Authorize the application in a browser: prints the portal's authorization address,
    /// reads the address it redirected to (or the code) from stdin, stores the tokens
    Login {
        /// Portal name, as in [portals.NAME]
        #[arg(long)]
        portal: String,
    },
    /// Show per portal whether tokens are stored, when the access token expires, the last
    /// refresh, member_id and scope (never the tokens)
    Status {
        /// Print as one JSON document
        #[arg(long)]
        json: bool,
    },
}

/// The whole command line as clap sees it, with the version naming the journal schema this
/// build reads and writes (`b24eventd 0.1.0 (journal schema 6)`): the package build generates the
/// man pages and shell completions from it (`cargo xtask deb`).
pub fn command() -> clap::Command {
    static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "{} (journal schema {})",
            env!("CARGO_PKG_VERSION"),
            crate::journal::SCHEMA_VERSION
        )
    });
    Cli::command().version(VERSION.as_str())
}

/// An error with the exit code it maps to.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        let refused = error
            .downcast_ref::<crate::journal::OpenError>()
            .is_some_and(crate::journal::OpenError::is_refusal);
        let code = if error.downcast_ref::<ConfigError>().is_some() || refused {
            EXIT_CONFIG
        } else if error.downcast_ref::<crate::supervisor::GaveUp>().is_some() {
            crate::supervisor::EXIT_SOFTWARE
        } else {
            1
        };
        Failure { code, error }
    }
}

/// A command's error, with damage to the journal found after it was opened (a damaged page is
/// only seen when it is read) turned into the refusal that names the journal and what to do.
fn journal_failure(journal: &std::path::Path, error: anyhow::Error) -> Failure {
    if error.downcast_ref::<crate::journal::OpenError>().is_none()
        && let Some(damage) = crate::journal::damage(journal, &error)
    {
        return Failure::from(anyhow::Error::from(damage));
    }
    Failure::from(error)
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Failure {
        Failure::from(anyhow::Error::from(error))
    }
}

impl From<ConfigError> for Failure {
    fn from(error: ConfigError) -> Failure {
        Failure {
            code: EXIT_CONFIG,
            error: error.into(),
        }
    }
}

/// The entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match command()
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches))
    {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of our output went away (`| head`): nothing left to say, nothing failed.
        Err(Failure { error, .. }) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(Failure { code, error }) => {
            // Not `eprintln!`, which panics (exit 101) when stderr is a closed pipe.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "b24eventd: {}",
                crate::redact::scrub(&format_error(&error))
            );
            ExitCode::from(code)
        }
    }
}

/// [`config::JournalConfig::fallback_warning`] for this process's directory.
fn journal_fallback_warning(config: &config::Config) -> Option<String> {
    let cwd = std::env::current_dir().unwrap_or_default();
    config.journal.fallback_warning(&cwd)
}

/// The journal fallback warning on stderr, for `auth login` and `auth import`.
fn warn_journal_fallback(config: &config::Config) -> std::io::Result<()> {
    use std::io::Write as _;
    match journal_fallback_warning(config) {
        Some(warning) => writeln!(std::io::stderr(), "b24eventd: warning: {warning}"),
        None => Ok(()),
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn format_error(error: &anyhow::Error) -> String {
    let mut out = error.to_string();
    for cause in error.chain().skip(1) {
        out.push_str(": ");
        out.push_str(&cause.to_string());
    }
    out
}

fn dispatch(cli: Cli) -> Result<(), Failure> {
    // One TLS crypto provider for the whole process (reqwest is built without one).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config_path = cli
        .config
        .clone()
        .unwrap_or_else(config::default_config_path);
    match cli.command {
        Command::Validate { online, json } => {
            let config = config::load(&config_path)?;
            for portal in config.portals.values() {
                config::resolve_secret(portal)?;
            }
            for sink in config.sinks.values() {
                config::resolve_sink_secrets(sink)?;
            }
            if !json {
                outln!(
                    "{}: ok ({} portal{}, {} sink{})",
                    config_path.display(),
                    config.portals.len(),
                    plural(config.portals.len()),
                    config.sinks.len(),
                    plural(config.sinks.len())
                )?;
            }
            if online {
                init_logging("warn");
                runtime()?.block_on(doctor::run(&config, json, "validate --online"))?;
            }
            Ok(())
        }
        Command::Doctor {
            json,
            conformance,
            portal,
        } => {
            let config = config::load(&config_path)?;
            if let (true, Some(portal)) = (conformance, portal) {
                config::resolve_secret(report::portal(&config, &portal)?)?;
                init_logging("warn");
                runtime()?
                    .block_on(probe::run(&config, &portal, json))
                    .map_err(|e| journal_failure(&config.journal.path, e))?;
                return Ok(());
            }
            for portal in config.portals.values() {
                config::resolve_secret(portal)?;
            }
            for sink in config.sinks.values() {
                config::resolve_sink_secrets(sink)?;
            }
            init_logging("warn");
            runtime()?
                .block_on(doctor::run(&config, json, "doctor"))
                .map_err(|e| journal_failure(&config.journal.path, e))?;
            Ok(())
        }
        Command::Run => {
            let config = config::load(&config_path)?;
            for portal in config.portals.values() {
                config::resolve_secret(portal)?;
            }
            for sink in config.sinks.values() {
                config::resolve_sink_secrets(sink)?;
            }
            init_logging_as("info", config.log_format);
            if let Some(warning) = journal_fallback_warning(&config) {
                tracing::warn!(journal = %config.journal.path.display(), "{warning}");
            }
            let journal = config.journal.path.clone();
            runtime()?
                .block_on(crate::daemon::serve(config))
                .map_err(|e| journal_failure(&journal, e))?;
            Ok(())
        }
        Command::Demo(args) => {
            // The progress bar and the summary tell the story; B24EVENTD_LOG=warn shows the log.
            init_logging("error");
            runtime()?.block_on(demo::run(args))?;
            Ok(())
        }
        Command::Simulate { listen, token_ttl } => {
            init_logging("info");
            runtime()?.block_on(simulate(listen, token_ttl))?;
            Ok(())
        }
        Command::Journal(command) => {
            let config = config::load(&config_path)?;
            init_logging("warn");
            journal::journal(&config, command)
                .map_err(|e| journal_failure(&config.journal.path, e))?;
            Ok(())
        }
        Command::Replay(args) => {
            let config = config::load(&config_path)?;
            init_logging("warn");
            journal::replay(&config, args).map_err(|e| journal_failure(&config.journal.path, e))?;
            Ok(())
        }
        Command::Dead(command) => {
            let config = config::load(&config_path)?;
            init_logging("warn");
            journal::dead(&config, command)
                .map_err(|e| journal_failure(&config.journal.path, e))?;
            Ok(())
        }
        Command::Prune(args) => {
            let config = config::load(&config_path)?;
            init_logging("warn");
            journal::prune(&config, args).map_err(|e| journal_failure(&config.journal.path, e))?;
            Ok(())
        }
        Command::Auth(AuthCommand::Import {
            portal,
            refresh_token,
            access_token,
        }) => {
            let config = config::load(&config_path)?;
            init_logging("warn");
            warn_journal_fallback(&config)?;
            let journal = config.journal.path.clone();
            runtime()?
                .block_on(auth::import(config, portal, refresh_token, access_token))
                .map_err(|e| journal_failure(&journal, e))?;
            Ok(())
        }
        Command::Auth(AuthCommand::Login { portal }) => {
            let config = config::load(&config_path)?;
            init_logging("warn");
            warn_journal_fallback(&config)?;
            let journal = config.journal.path.clone();
            runtime()?
                .block_on(auth::login(config, portal))
                .map_err(|e| journal_failure(&journal, e))?;
            Ok(())
        }
        Command::Cluster(ClusterCommand::Status { json }) => {
            let config = config::load(&config_path)?;
            init_logging("warn");
            let journal = config.journal.path.clone();
            runtime()?
                .block_on(cluster::status(config, json))
                .map_err(|e| journal_failure(&journal, e))?;
            Ok(())
        }
        Command::Auth(AuthCommand::Status { json }) => {
            let config = config::load(&config_path)?;
            init_logging("warn");
            let journal = config.journal.path.clone();
            runtime()?
                .block_on(auth::status(config, json))
                .map_err(|e| journal_failure(&journal, e))?;
            Ok(())
        }
        Command::Subscribe {
            portal,
            prune,
            json,
        } => {
            let config = config::load(&config_path)?;
            init_logging("warn");
            let journal = config.journal.path.clone();
            runtime()?
                .block_on(subscribe::subscribe(config, portal, prune, json))
                .map_err(|e| journal_failure(&journal, e))?;
            Ok(())
        }
        Command::Unsubscribe {
            portal,
            only_configured,
            json,
        } => {
            let config = config::load(&config_path)?;
            init_logging("warn");
            let journal = config.journal.path.clone();
            runtime()?
                .block_on(subscribe::unsubscribe(
                    config,
                    portal,
                    only_configured,
                    json,
                ))
                .map_err(|e| journal_failure(&journal, e))?;
            Ok(())
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Logs go to stderr as text; `B24EVENTD_LOG` (or `RUST_LOG`) overrides the default filter.
/// Public for `b24eventd-bench`, which logs as the daemon's commands do.
pub fn init_logging(default: &str) {
    init_logging_as(default, config::LogFormat::Text);
}

/// [`init_logging`] in the configured format: text (coloured on a terminal) or one JSON object
/// per line with the event fields (`portal`, `event_id`, `sink`, ...) as keys. Logging never
/// panics: a line stderr cannot take (a closed pipe, a full disk behind a redirect) is dropped,
/// where tracing-subscriber's default would report it with `eprintln!`, which panics on a
/// broken pipe.
fn init_logging_as(default: &str, format: config::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let from_env = ["B24EVENTD_LOG", "RUST_LOG"]
        .into_iter()
        .find_map(|name| Some((name, std::env::var(name).ok()?)));
    let (filter, refused) = log_filter(from_env, default);
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::redact::Scrubbed(std::io::stderr))
        .log_internal_errors(false);
    let _ = match format {
        config::LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init(),
    };
    if let Some(refused) = refused {
        tracing::warn!(target: LOG_FILTER_TARGET, variable = refused.variable, value = %refused.value, problem = %refused.problem, "log filter refused; logging with the default filter");
    }
}

/// The target of the warning about a refused log filter; the default filter lets it through.
const LOG_FILTER_TARGET: &str = "b24eventd::log_filter";

/// A log filter from the environment that was not used, and why.
#[derive(Debug, PartialEq, Eq)]
struct RefusedLogFilter {
    variable: &'static str,
    value: String,
    problem: String,
}

/// The tracing filter to log with: the environment's (`B24EVENTD_LOG`, else `RUST_LOG`) when it
/// is a filter, else the command's default. A value that is not one (a syntax error, or a bare
/// word that is neither a level nor one of our targets, such as `verbose` or `debgu`, which
/// tracing would read as "everything from a target named debgu" and so log nothing) is refused
/// and reported, never taken silently.
fn log_filter(
    from_env: Option<(&'static str, String)>,
    default: &str,
) -> (String, Option<RefusedLogFilter>) {
    let fallback = format!("{default},tokio_cron_scheduler=warn,{LOG_FILTER_TARGET}=warn");
    let Some((variable, value)) = from_env else {
        return (fallback, None);
    };
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let problem = value.split(',').map(str::trim).find_map(|directive| {
        let bare = !directive.contains(['=', '[', '{']);
        let ours = directive == "b24eventd" || directive.starts_with("b24eventd::");
        let level = LEVELS.contains(&directive.to_ascii_lowercase().as_str())
            || directive.parse::<u8>().is_ok_and(|n| n <= 5);
        (bare && !directive.is_empty() && !ours && !level).then(|| {
            format!(
                "{directive:?} is neither a level ({}) nor target=level",
                LEVELS.join(", ")
            )
        })
    });
    let problem = problem.or_else(|| {
        tracing_subscriber::EnvFilter::try_new(&value)
            .err()
            .map(|e| e.to_string())
    });
    match problem {
        None => (quiet_scheduler(value), None),
        Some(problem) => (
            fallback,
            Some(RefusedLogFilter {
                variable,
                value,
                problem,
            }),
        ),
    }
}

/// `filter` with the job scheduler's target held at `warn` when the filter lets INFO or more
/// through by default (`info`, `debug`, `trace`) and does not name the scheduler itself:
/// tokio-cron-scheduler logs every tick of its jobs at INFO, which buries what we log there.
fn quiet_scheduler(filter: String) -> String {
    const SCHEDULER: &str = "tokio_cron_scheduler";
    let verbose = filter.split(',').map(str::trim).any(|directive| {
        matches!(
            directive.to_ascii_lowercase().as_str(),
            "info" | "debug" | "trace" | "3" | "4" | "5"
        )
    });
    if verbose && !filter.contains(SCHEDULER) {
        format!("{filter},{SCHEDULER}=warn")
    } else {
        filter
    }
}

async fn simulate(
    listen: std::net::SocketAddr,
    token_ttl: std::time::Duration,
) -> anyhow::Result<()> {
    if token_ttl.is_zero() {
        anyhow::bail!("--token-ttl must be longer than 0s");
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let port = listener.local_addr()?.port();
    let sim = b24eventd_simulator::Simulator::start_on(
        b24eventd_simulator::SimulatorConfig {
            access_token_ttl: token_ttl,
            ..b24eventd_simulator::SimulatorConfig::default()
        },
        listener,
    )
    .await?;
    // As the application's installer would: bind the events the printed config asks for.
    for event in ["ONCRMDEALADD", "ONCRMDEALUPDATE"] {
        sim.bind_offline(event, "");
    }
    let (_, refresh) = sim.issue_tokens();
    let defaults = b24eventd_simulator::SimulatorConfig::default();
    let base = sim.base_url();
    // The daemon's admin endpoint beside the simulator (the next port), not on the default
    // 9464 a real daemon on this machine may hold.
    let admin = std::net::SocketAddr::new(
        std::net::Ipv4Addr::LOCALHOST.into(),
        port.checked_add(1).unwrap_or(9464),
    );
    outln!(
        "portal simulator listening on {base} (offline bindings: ONCRMDEALADD, ONCRMDEALUPDATE)"
    )?;
    outln!()?;
    outln!("1. save this as sim.toml:")?;
    outln!()?;
    outln!("[journal]")?;
    outln!("path = \"sim-journal.db\"")?;
    outln!("[admin]")?;
    outln!("listen = \"{admin}\"")?;
    outln!("[portals.sim]")?;
    outln!("client_endpoint = \"{}\"", sim.client_endpoint())?;
    outln!("oauth_token_url = \"{}\"", sim.oauth_token_url())?;
    outln!("client_id = \"{}\"", defaults.client_id)?;
    outln!("client_secret = \"{}\"", defaults.client_secret)?;
    outln!("events = [\"ONCRMDEALADD\", \"ONCRMDEALUPDATE\"]")?;
    outln!("[sinks.archive]")?;
    outln!("type = \"file\"")?;
    outln!("path = \"sim-events.jsonl\"")?;
    outln!()?;
    // The token goes in on stdin (printf is a shell builtin: it is in no process's argv, so
    // not in `ps`); the import refreshes it at once, which checks it and stores the new pair.
    outln!(
        "2. printf '%s\\n' '{refresh}' | b24eventd -c sim.toml auth import --portal sim --refresh-token -"
    )?;
    outln!(
        "   or: b24eventd -c sim.toml auth login --portal sim (the simulator grants at once; paste the address it redirects to)"
    )?;
    outln!("3. b24eventd -c sim.toml run")?;
    outln!("   status page: http://{admin}/ (also /metrics, /healthz, /readyz)")?;
    outln!(
        "4. raise events: curl -s -XPOST {base}/_sim/emit -d '{{\"event\":\"ONCRMDEALUPDATE\",\"count\":100}}'"
    )?;
    outln!(
        "   other events need a binding first: POST {base}/_sim/bind {{\"event\":\"...\"}} (or event.bind)"
    )?;
    outln!("   look: GET {base}/_sim/stats, GET {base}/_sim/rows")?;
    let shutdown = CancellationToken::new();
    crate::shutdown::cancel_on_signals(shutdown.clone())
        .context("cannot install signal handlers")?;
    shutdown.cancelled().await;
    sim.shutdown();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own checks of the definitions, then every argument of every subcommand has help
    /// text (`--help` explains each flag; an empty `--json` line explains nothing).
    #[test]
    fn every_flag_of_every_subcommand_has_help() {
        use clap::CommandFactory;
        let root = Cli::command();
        root.clone().debug_assert();
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>, seen: &mut usize) {
            for arg in cmd.get_arguments() {
                if matches!(arg.get_id().as_str(), "help" | "version") {
                    continue;
                }
                *seen += 1;
                let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
                if help.trim().is_empty() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing, seen);
            }
        }
        let (mut missing, mut seen) = (Vec::new(), 0);
        walk(&root, "b24eventd", &mut missing, &mut seen);
        assert!(seen > 50, "walked {seen} arguments");
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }

    /// Each journal command offers only the filters it uses.
    #[test]
    fn filters_are_offered_only_where_they_mean_something() {
        use clap::CommandFactory;
        let root = Cli::command();
        let flags = |path: &[&str]| -> Vec<String> {
            let mut cmd = &root;
            for name in path {
                cmd = cmd.find_subcommand(name).expect(name);
            }
            cmd.get_arguments()
                .filter_map(|a| a.get_long().map(str::to_string))
                .collect()
        };
        for (path, absent) in [
            (&["dead", "list"][..], "status"),
            (&["dead", "retry"], "status"),
            (&["dead", "purge"], "status"),
            (&["journal", "stats"], "limit"),
            (&["journal", "tail"], "until"),
        ] {
            assert!(
                !flags(path).iter().any(|f| f == absent),
                "{path:?} offers --{absent}"
            );
        }
        for (path, present) in [
            (&["journal", "list"][..], "until"),
            (&["journal", "list"], "limit"),
            (&["journal", "tail"], "since"),
            (&["dead", "purge"], "all"),
            (&["replay"], "status"),
            (&["unsubscribe"], "only-configured"),
        ] {
            assert!(
                flags(path).iter().any(|f| f == present),
                "{path:?} lacks --{present}"
            );
        }
    }

    #[test]
    fn a_log_filter_that_is_not_one_is_refused_and_reported() {
        let env = |v: &str| Some(("B24EVENTD_LOG", v.to_string()));
        for good in [
            "WARN",
            "warn,b24eventd=debug",
            "b24eventd",
            "b24eventd::pipeline=trace",
            "debug,tokio_cron_scheduler=info",
        ] {
            assert_eq!(log_filter(env(good), "info"), (good.to_string(), None));
        }
        // A filter that lets INFO through keeps the job scheduler's per-tick INFO lines out,
        // unless it names the scheduler.
        for (verbose, taken) in [
            ("debug", "debug,tokio_cron_scheduler=warn"),
            ("info,hyper=off", "info,hyper=off,tokio_cron_scheduler=warn"),
            ("3", "3,tokio_cron_scheduler=warn"),
        ] {
            assert_eq!(log_filter(env(verbose), "info"), (taken.to_string(), None));
        }
        for (garbage, problem) in [
            ("verbose", "\"verbose\" is neither a level"),
            ("debgu", "\"debgu\" is neither a level"),
            ("info,lots", "\"lots\" is neither a level"),
            ("b24eventd=loud", "level filter"),
        ] {
            let (filter, refused) = log_filter(env(garbage), "info");
            assert_eq!(
                filter,
                "info,tokio_cron_scheduler=warn,b24eventd::log_filter=warn"
            );
            let refused = refused.expect("refused");
            assert_eq!(refused.variable, "B24EVENTD_LOG");
            assert_eq!(refused.value, garbage);
            assert!(
                refused.problem.contains(problem),
                "{garbage}: {}",
                refused.problem
            );
        }
        assert_eq!(log_filter(None, "warn").1, None);
    }

    #[test]
    fn a_task_that_kept_dying_exits_70_and_a_config_error_78() {
        let gave_up = crate::supervisor::GaveUp {
            task: "poller/main".into(),
            deaths: 5,
            window: "10m".into(),
            cause: "panicked: overflow".into(),
        };
        let failure = Failure::from(anyhow::Error::from(gave_up));
        assert_eq!(failure.code, 70);
        assert!(format_error(&failure.error).contains("task poller/main died 5 times"));
        let config = ConfigError::new("b24eventd.toml", "shutdown_timeout", "must be at most 1h");
        assert_eq!(Failure::from(anyhow::Error::from(config)).code, 78);
        assert_eq!(Failure::from(anyhow::anyhow!("disk full")).code, 1);
    }
}
