//! `b24eventd demo`: the real pipeline against the in-process portal simulator, seeded with
//! events in waves, with a progress bar and a summary. Needs no portal and no config.

use crate::config;
use crate::journal::Journal;
use anyhow::Context;
use b24eventd_simulator::{Faults, OperatingLimit, Simulator, SimulatorConfig};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Directory for the journal, the JSONL sink and the generated config (recreated)
    #[arg(long, default_value = "b24eventd-demo", value_name = "DIR")]
    dir: PathBuf,
    /// How many entity changes to raise in the portal
    #[arg(long, default_value_t = 3000)]
    events: u64,
    /// Over how long to raise them
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// In how many waves
    #[arg(long, default_value_t = 6)]
    waves: u64,
    /// Inject faults: 3% of get responses lost after the portal committed, 2% 500s, 2% truncated
    /// responses, and an HTTP sink that fails 10% of requests
    #[arg(long)]
    chaos: bool,
}

const DEMO_EVENTS: [&str; 3] = ["ONCRMDEALADD", "ONCRMDEALUPDATE", "ONCRMCONTACTUPDATE"];

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    prepare_dir(&args.dir)?;

    let sim = Simulator::start(SimulatorConfig {
        rate_limit: Some((50, 2.0)),
        // The cloud's limits: the leaky bucket, and 420 s of operating time per method per
        // 10 minutes with a 300 s ban.
        operating_limit: Some(OperatingLimit::default()),
        ..SimulatorConfig::default()
    })
    .await
    .context("cannot start the portal simulator")?;
    for event in DEMO_EVENTS {
        sim.bind_offline(event, "");
    }
    if args.chaos {
        sim.set_faults(Faults {
            fail_500: 0.02,
            drop_get_after_commit: 0.03,
            truncate: 0.02,
            ..Faults::default()
        });
    }
    let receiver = Receiver::start(if args.chaos { 0.10 } else { 0.0 }).await?;

    let config_path = args.dir.join("config.toml");
    std::fs::write(&config_path, demo_config(&sim, &receiver.url, &args.dir))
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    let config = config::load(&config_path)?;
    let journal = Journal::open_configured(&config.journal, crate::journal::Access::Create).await?;
    let (access, refresh) = sim.issue_tokens();
    journal
        .save_tokens("demo", &crate::bitrix::Tokens::from_pair(access, refresh))
        .await?;

    outln!(
        "b24eventd demo: portal simulator at {} (limits: 50 burst, 2 req/s, 420 s operating per method per 10 min)",
        sim.base_url()
    )?;
    outln!(
        "raising {} changes of {} entities in {} waves over {:?}; delivering to a JSONL file and an HTTP endpoint{}",
        args.events,
        entity_count(args.events.div_ceil(args.waves.max(1))) * args.waves.max(1),
        args.waves,
        args.duration,
        if args.chaos {
            " (chaos: faults injected)"
        } else {
            ""
        }
    )?;

    let shutdown = CancellationToken::new();
    let pipeline = tokio::spawn(crate::daemon::run(
        config,
        journal.clone(),
        shutdown.clone(),
    ));
    let seeding = tokio::spawn(seed(
        sim.clone(),
        args.events,
        args.duration,
        args.waves.max(1),
    ));

    let bar = ProgressBar::new(args.events);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let s = sim.stats();
        let c = journal.counts().await?;
        bar.set_position(
            s.emitted
                .saturating_sub(s.queued + s.reserved + s.error_lane),
        );
        bar.set_message(format!(
            "journaled {} delivered {} cleared {} | upstream queued {} reserved {} | {} requests",
            c.events, c.delivered, c.cleared, s.queued, s.reserved, s.requests
        ));
        let upstream_empty = s.queued + s.reserved + s.error_lane == 0;
        if seeding.is_finished() && upstream_empty && c.unsettled_upstream == 0 && c.pending == 0 {
            break;
        }
        if pipeline.is_finished() {
            break;
        }
    }
    bar.finish();
    shutdown.cancel();
    pipeline.await.context("pipeline task failed")??;
    seeding.await.context("seeding task failed")?;

    let s = sim.stats();
    let c = journal.counts().await?;
    let elapsed = started.elapsed();
    outln!()?;
    outln!("summary after {:.1} s", elapsed.as_secs_f64())?;
    outln!("  entity changes raised      {}", s.emitted)?;
    outln!(
        "  events fetched (journaled) {}  ({} changes merged upstream into a queued record of the same entity)",
        c.events,
        s.emitted.saturating_sub(c.events)
    )?;
    outln!("  delivered to every sink    {}", c.delivered)?;
    outln!("  dead                       {}", c.dead)?;
    outln!("  cleared upstream           {}", c.cleared)?;
    outln!("  errored upstream           {}", c.errored)?;
    outln!(
        "  left upstream              {} queued, {} reserved, {} in the error lane",
        s.queued,
        s.reserved,
        s.error_lane
    )?;
    outln!("  duplicate deliveries       {}", c.duplicate_deliveries)?;
    outln!(
        "  reservations adopted       {}  (get responses lost after the portal committed)",
        c.adopted_batches
    )?;
    outln!(
        "  requests used              {}  ({:.1} events per request; {} answered 503, {} answered 429)",
        s.requests,
        c.events as f64 / s.requests.max(1) as f64,
        s.rejected_503,
        s.rejected_429
    )?;
    outln!(
        "  HTTP sink received         {} requests  (deal events only; {} attempts failed and were retried)",
        receiver.received.load(Ordering::Relaxed),
        c.retried_attempts
    )?;
    if args.chaos {
        outln!(
            "  faults injected            {} answers 500, {} get responses lost after commit, {} truncated",
            s.faults_500,
            s.dropped_after_commit,
            s.truncated
        )?;
    }
    let dir = args.dir.display();
    outln!()?;
    outln!("look inside:")?;
    outln!("  head -n 2 {dir}/events.jsonl")?;
    outln!("  b24eventd -c {dir}/config.toml journal stats")?;
    outln!("  b24eventd -c {dir}/config.toml journal list --limit 5")?;
    outln!("  b24eventd -c {dir}/config.toml journal show demo:1")?;
    outln!("  sqlite3 {dir}/journal.db 'SELECT * FROM v_sink_stats'")?;
    outln!(
        "  sqlite3 {dir}/journal.db 'SELECT sink, outcome, COUNT(*) FROM delivery_attempts GROUP BY 1, 2'"
    )?;
    sim.shutdown();
    receiver.stop.cancel();
    if s.queued + s.reserved + s.error_lane != 0 || c.pending != 0 {
        anyhow::bail!("demo ended with events left over: the pipeline stopped early");
    }
    Ok(())
}

fn prepare_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for name in [
        "journal.db",
        "journal.db-wal",
        "journal.db-shm",
        "events.jsonl",
        "config.toml",
    ] {
        let path = dir.join(name);
        if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

fn entity_count(events: u64) -> u64 {
    (events * 2 / 3).max(1)
}

/// Raises `events` changes in `waves` waves spread over `duration`. In each wave two thirds of
/// the changes touch distinct entities and the rest change one of them again at once, so the
/// portal merges them into the queued record (as it does for an entity edited twice).
async fn seed(sim: Simulator, events: u64, duration: Duration, waves: u64) {
    let per_wave = events.div_ceil(waves);
    let pause = duration / waves as u32;
    let mut raised = 0;
    let mut next_entity = 1;
    for _ in 0..waves {
        let wave_start = Instant::now();
        let in_wave = per_wave.min(events - raised);
        let distinct = entity_count(in_wave);
        for i in 0..in_wave {
            let entity = next_entity + i % distinct;
            sim.emit_change(DEMO_EVENTS[(entity % 3) as usize], entity);
            if i % 100 == 99 {
                tokio::task::yield_now().await;
            }
        }
        next_entity += distinct;
        raised += in_wave;
        if raised >= events {
            break;
        }
        tokio::time::sleep(pause.saturating_sub(wave_start.elapsed())).await;
    }
}

fn demo_config(sim: &Simulator, receiver: &str, dir: &Path) -> String {
    let defaults = SimulatorConfig::default();
    let dir = dir.display();
    format!(
        r#"# Generated by `b24eventd demo` for the in-process portal simulator.
[journal]
path = "{dir}/journal.db"

[admin]
listen = ""

[portals.demo]
client_endpoint = "{endpoint}"
oauth_token_url = "{oauth}"
client_id = "{client_id}"
client_secret = "{client_secret}"
events = ["ONCRMDEALADD", "ONCRMDEALUPDATE", "ONCRMCONTACTUPDATE"]
batch_size = 50
poll_interval = "1s"
rate_limit = {{ burst = 50, per_second = 2.0 }}
orphan_sweep_schedule = "*/10 * * * * *"
error_lane_schedule = "*/15 * * * * *"

[sinks.archive]
type = "file"
path = "{dir}/events.jsonl"

[sinks.erp]
type = "http"
url = "{receiver}"
events = ["ONCRMDEAL*"]
timeout = "5s"
concurrency = 8
[sinks.erp.retry]
max_attempts = 10
initial_backoff = "200ms"
max_backoff = "5s"
"#,
        endpoint = sim.client_endpoint(),
        oauth = sim.oauth_token_url(),
        client_id = defaults.client_id,
        client_secret = defaults.client_secret,
    )
}

/// A local HTTP endpoint standing in for an ERP: answers 200, or 503 for a share of requests.
struct Receiver {
    url: String,
    received: Arc<AtomicU64>,
    stop: CancellationToken,
}

impl Receiver {
    async fn start(fail_share: f64) -> anyhow::Result<Receiver> {
        use axum::http::StatusCode;
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        let app = axum::Router::new().route(
            "/events",
            axum::routing::post(move |body: axum::body::Bytes| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::Relaxed);
                    if serde_json::from_slice::<serde_json::Value>(&body).is_err() {
                        return StatusCode::BAD_REQUEST;
                    }
                    if fastrand::f64() < fail_share {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/events", listener.local_addr()?);
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
        });
        Ok(Receiver {
            url,
            received,
            stop,
        })
    }
}
