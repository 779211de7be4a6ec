//! `bench drain`: a queue of N events under cloud limits (bucket 50 burst, 2 per second; the
//! current operating-time limiter: 420 s per method per 10 min, `batch` counted at half weight,
//! a 300 s ban past it), drained by the documented safe loop (the baseline, run here with a
//! `PortalClient` allowed the full bucket) and by the daemon (file sink, default config: half
//! the bucket). Compares requests, wall seconds and events per request.

use super::Report;
use super::daemon::{self, Daemon, PortalSection, WorkDir};
use anyhow::{Context, bail};
use b24eventd::bitrix::client::{ClearTarget, GetRequest};
use b24eventd::bitrix::{ClientSettings, PortalClient, TokenStore, Tokens};
use b24eventd_simulator::{OperatingLimit, SimStats, Simulator, SimulatorConfig};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A drain longer than this is a failure (the baseline needs about 800 requests at 2/s).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(45 * 60);

/// What one drain cost.
struct Drained {
    seconds: f64,
    stats: SimStats,
    lines: usize,
}

fn limited() -> SimulatorConfig {
    SimulatorConfig {
        rate_limit: Some((50, 2.0)),
        operating_limit: Some(OperatingLimit::default()),
        ..SimulatorConfig::default()
    }
}

pub async fn run(events: u64, compare_with: Option<&Path>) -> anyhow::Result<Report> {
    let mut report = Report::new("drain");
    let sim = SimulatorConfig::default();
    report.setup = vec![
        format!("{events} events queued before the start (distinct deal ids, ADD/UPDATE alternating)"),
        format!(
            "simulator: bucket 50 burst / 2 per s (503); the current operating-time limiter: 420 s per \
600 s per method, batch charged at half its time, a 300 s ban past it (429); each call takes {:?} \
+ {:?} per event returned (simulator defaults), and answers wait for that time",
            sim.operating_cost, sim.operating_cost_per_event
        ),
        "baseline: the documented safe loop in the bench process: get(clear=0, limit=50) -> append to a \
file + fsync -> clear(process_id), until get is empty; PortalClient with the full bucket (50, 2/s)"
            .to_string(),
        "b24eventd: the real binary, default portal settings (rate_limit share 0.5: 25 burst, 1/s), \
one file sink, journal synchronous=full"
            .to_string(),
    ];
    let dir = WorkDir::create("drain")?;
    let this = daemon::binary()?;
    let daemon = drain_with_daemon(events, &dir, &this).await?;
    let other = match compare_with {
        Some(exe) => {
            report.setup.push(format!(
                "other build: {}, same queue, simulator and config",
                exe.display()
            ));
            // Its own scratch directory: a journal of its own.
            let other_dir = WorkDir::create("drain-other")?;
            Some(drain_with_daemon(events, &other_dir, exe).await?)
        }
        None => None,
    };
    let baseline = drain_with_safe_loop(events, &dir).await?;
    let mut subjects = vec![("baseline: safe loop", &baseline), ("b24eventd", &daemon)];
    if let Some(other) = &other {
        subjects.push(("b24eventd (other build)", other));
    }
    for (subject, d) in subjects {
        if d.lines < events as usize {
            bail!("{subject} wrote {} of {events} events to its file", d.lines);
        }
        report.row(subject, "requests", d.stats.requests as f64, "");
        report.row(subject, "wall time", d.seconds, "s");
        report.row(
            subject,
            "events per request",
            events as f64 / d.stats.requests.max(1) as f64,
            "",
        );
        report.row(subject, "answers 503", d.stats.rejected_503 as f64, "");
        report.row(subject, "answers 429", d.stats.rejected_429 as f64, "");
        report.row(subject, "lines written", d.lines as f64, "");
    }
    report.ratio(
        "faster (baseline s / b24eventd s)",
        baseline.seconds / daemon.seconds,
        "target >= 20",
    );
    report.ratio(
        "fewer requests (baseline / b24eventd)",
        baseline.stats.requests as f64 / daemon.stats.requests.max(1) as f64,
        "higher is better",
    );
    if let Some(other) = &other {
        report.ratio(
            "other build faster (baseline s / other build s)",
            baseline.seconds / other.seconds,
            "for comparison",
        );
        report.notes.push(format!(
            "the other build's most gets in one batch request: {}",
            other.stats.max_gets_per_batch
        ));
    }
    report.notes.push(format!(
        "b24eventd's requests include its start-up calls; its most gets in one batch request: {}",
        daemon.stats.max_gets_per_batch
    ));
    Ok(report)
}

async fn drain_with_daemon(events: u64, dir: &WorkDir, exe: &Path) -> anyhow::Result<Drained> {
    let (sim, tokens) = daemon::portal(limited()).await?;
    daemon::emit_deals(&sim, 1, events);
    let out = dir.file("daemon.jsonl");
    let config = daemon::write_config(
        &dir.path,
        &[PortalSection {
            name: "main".to_string(),
            sim: &sim,
            extra: String::new(),
        }],
        &daemon::file_sink(&out),
    )?;
    daemon::seed_tokens(&dir.path, &[("main".to_string(), tokens)]).await?;
    let mut child = Daemon::spawn_binary(exe, &config, &dir.file("daemon.log"))?;
    let started = Instant::now();
    daemon::wait_until(
        &mut child,
        "the daemon to drain the queue",
        DRAIN_TIMEOUT,
        Duration::from_millis(100),
        || daemon::upstream_empty(&sim),
    )
    .await?;
    let seconds = started.elapsed().as_secs_f64();
    let stats = sim.stats();
    child.stop().await?;
    sim.shutdown();
    Ok(Drained {
        seconds,
        stats,
        lines: count_lines(&out)?,
    })
}

/// Tokens are only kept in memory by the baseline loop.
struct MemoryStore;

impl TokenStore for MemoryStore {
    fn save<'a>(
        &'a self,
        _portal: &'a str,
        _tokens: &'a Tokens,
    ) -> b24eventd::BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// A client for `sim` with a client-side bucket of `burst` requests refilled at `per_second`,
/// that waits out limits.
pub fn baseline_client(
    sim: &Simulator,
    tokens: Tokens,
    (burst, per_second): (u32, f64),
) -> anyhow::Result<PortalClient> {
    let defaults = SimulatorConfig::default();
    let settings = ClientSettings {
        portal: "baseline".to_string(),
        client_endpoint: sim.client_endpoint(),
        oauth_token_url: sim.oauth_token_url(),
        client_id: defaults.client_id,
        client_secret: defaults.client_secret,
        auth_connector: None,
        burst,
        per_second,
        request_timeout: Duration::from_secs(60),
        max_limit_wait: Duration::from_secs(15 * 60),
        journal: None,
    };
    Ok(PortalClient::new(
        settings,
        Some(tokens),
        Arc::new(MemoryStore),
    )?)
}

async fn drain_with_safe_loop(events: u64, dir: &WorkDir) -> anyhow::Result<Drained> {
    let (sim, tokens) = daemon::portal(limited()).await?;
    daemon::emit_deals(&sim, 1, events);
    // The full bucket of the portal.
    let client = baseline_client(&sim, tokens, (50, 2.0))?;
    let out = dir.file("baseline.jsonl");
    let started = Instant::now();
    safe_loop(&client, &out).await?;
    let seconds = started.elapsed().as_secs_f64();
    if !daemon::upstream_empty(&sim) {
        bail!("the safe loop ended with events left upstream");
    }
    let stats = sim.stats();
    sim.shutdown();
    Ok(Drained {
        seconds,
        stats,
        lines: count_lines(&out)?,
    })
}

/// The loop the Bitrix24 documentation describes: reserve a batch, store it, clear it.
async fn safe_loop(client: &PortalClient, out: &Path) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .with_context(|| format!("cannot open {}", out.display()))?;
    let get = GetRequest {
        limit: 50,
        clear: false,
        process_id: None,
        error_lane: false,
    };
    loop {
        let batch = client.offline_get(&get).await?;
        if batch.events.is_empty() {
            return Ok(());
        }
        let mut lines = Vec::new();
        for e in &batch.events {
            let line = serde_json::json!({
                "id": e.id, "event": e.event_name, "data": e.data,
                "additional": e.additional, "message_id": e.message_id, "timestamp": e.timestamp,
            });
            serde_json::to_writer(&mut lines, &line)?;
            lines.push(b'\n');
        }
        file.write_all(&lines)?;
        file.sync_data()?;
        let process_id = batch
            .process_id
            .context("get with clear=0 answered without a process_id")?;
        client.offline_clear(&process_id, &ClearTarget::All).await?;
    }
}

pub fn count_lines(path: &Path) -> anyhow::Result<usize> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(bytes.iter().filter(|b| **b == b'\n').count())
}
