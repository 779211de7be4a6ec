//! `bench latency`: time from an event entering the simulator's queue (`emit_change` called by
//! the bench) to its envelope reaching an HTTP endpoint in the bench process (the daemon's
//! `http` sink), idle and under load. Baseline: the round trip of a bare `event.offline.get` to
//! the same simulator from the bench, the floor of any pull-based delivery.

use super::Report;
use super::daemon::{self, Daemon, PortalSection, WorkDir};
use super::drain::baseline_client;
use super::stats::Summary;
use anyhow::{Context, bail};
use b24eventd::bitrix::client::GetRequest;
use b24eventd_simulator::{Simulator, SimulatorConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const IDLE_EVENTS: u64 = 30;
const IDLE_GAP: Duration = Duration::from_millis(700);
/// The quiet before one more event, to show what the idle back-off does to the first event.
const QUIET: Duration = Duration::from_secs(10);
const LOAD_RATE: u64 = 200;
const LOAD_SECONDS: u64 = 20;
const ROUND_TRIPS: usize = 50;

/// Entity id → when it happened (emitted, or received by the endpoint).
type Times = Arc<Mutex<HashMap<u64, Instant>>>;

/// An HTTP endpoint that records when each envelope (by its deal id) arrived.
struct Receiver {
    url: String,
    received: Times,
    stop: CancellationToken,
}

impl Receiver {
    async fn start() -> anyhow::Result<Receiver> {
        use axum::http::StatusCode;
        let received: Times = Arc::default();
        let log = received.clone();
        let app = axum::Router::new().route(
            "/events",
            axum::routing::post(move |body: axum::body::Bytes| {
                let at = Instant::now();
                let log = log.clone();
                async move {
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
                        return StatusCode::BAD_REQUEST;
                    };
                    let Some(id) = v["data"]["FIELDS"]["ID"]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                    else {
                        return StatusCode::UNPROCESSABLE_ENTITY;
                    };
                    log.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(id)
                        .or_insert(at);
                    StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/events", listener.local_addr()?);
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
        });
        Ok(Receiver {
            url,
            received,
            stop,
        })
    }

    fn count(&self) -> usize {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// Milliseconds from emit to receipt of every entity in `ids`.
fn latencies(
    emitted: &Times,
    received: &Times,
    ids: impl Iterator<Item = u64>,
) -> anyhow::Result<Vec<f64>> {
    let emitted = emitted.lock().unwrap_or_else(|p| p.into_inner());
    let received = received.lock().unwrap_or_else(|p| p.into_inner());
    ids.map(|id| {
        let sent = emitted.get(&id).context("an event without an emit time")?;
        let got = received
            .get(&id)
            .with_context(|| format!("deal {id} never arrived"))?;
        Ok(got.saturating_duration_since(*sent).as_secs_f64() * 1000.0)
    })
    .collect()
}

fn emit(sim: &Simulator, emitted: &Times, id: u64) {
    emitted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, Instant::now());
    daemon::emit_deals(sim, id, 1);
}

/// A daemon with an http sink to a fresh receiver, on a fresh simulator.
struct Setup {
    sim: Simulator,
    receiver: Receiver,
    daemon: Daemon,
    _dir: WorkDir,
}

async fn start(name: &'static str, portal_extra: &str) -> anyhow::Result<Setup> {
    let dir = WorkDir::create(name)?;
    let (sim, tokens) = daemon::portal(SimulatorConfig::default()).await?;
    let receiver = Receiver::start().await?;
    let config = daemon::write_config(
        &dir.path,
        &[PortalSection {
            name: "main".to_string(),
            sim: &sim,
            extra: portal_extra.to_string(),
        }],
        &daemon::http_sink(&receiver.url),
    )?;
    daemon::seed_tokens(&dir.path, &[("main".to_string(), tokens)]).await?;
    let mut daemon = Daemon::spawn(&config, &dir.file("daemon.log"))?;
    daemon.wait_running(Duration::from_secs(60)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(Setup {
        sim,
        receiver,
        daemon,
        _dir: dir,
    })
}

impl Setup {
    async fn wait_received(&mut self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let receiver = &self.receiver;
        daemon::wait_until(
            &mut self.daemon,
            "every envelope at the endpoint",
            timeout,
            Duration::from_millis(5),
            || receiver.count() >= count,
        )
        .await
        .map(|_| ())
    }

    async fn finish(self) -> anyhow::Result<()> {
        self.daemon.stop().await?;
        self.receiver.stop.cancel();
        self.sim.shutdown();
        Ok(())
    }
}

/// Idle: one event every 700 ms, then one more after 10 s of quiet.
async fn idle(name: &'static str, extra: &str) -> anyhow::Result<(Summary, f64)> {
    let mut s = start(name, extra).await?;
    let emitted: Times = Arc::default();
    for id in 1..=IDLE_EVENTS {
        emit(&s.sim, &emitted, id);
        tokio::time::sleep(IDLE_GAP).await;
    }
    s.wait_received(IDLE_EVENTS as usize, Duration::from_secs(60))
        .await?;
    let summary = Summary::of(&latencies(&emitted, &s.receiver.received, 1..=IDLE_EVENTS)?)
        .context("no idle samples")?;
    tokio::time::sleep(QUIET).await;
    let last = IDLE_EVENTS + 1;
    emit(&s.sim, &emitted, last);
    s.wait_received(last as usize, Duration::from_secs(120))
        .await?;
    let after_quiet = latencies(&emitted, &s.receiver.received, std::iter::once(last))?[0];
    s.finish().await?;
    Ok((summary, after_quiet))
}

/// Under load: 200 events per second for 20 s.
async fn load(extra: &str) -> anyhow::Result<Summary> {
    let mut s = start("latency-load", extra).await?;
    let emitted: Times = Arc::default();
    let total = LOAD_RATE * LOAD_SECONDS;
    let mut tick = tokio::time::interval(Duration::from_secs(1) / LOAD_RATE as u32);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for id in 1..=total {
        tick.tick().await;
        emit(&s.sim, &emitted, id);
    }
    s.wait_received(total as usize, Duration::from_secs(300))
        .await?;
    let summary = Summary::of(&latencies(&emitted, &s.receiver.received, 1..=total)?)
        .context("no load samples")?;
    s.finish().await?;
    Ok(summary)
}

/// The round trip of a bare `event.offline.get` (empty queue) from the bench.
async fn round_trip() -> anyhow::Result<Summary> {
    let (sim, tokens) = daemon::portal(SimulatorConfig::default()).await?;
    // A bucket that never makes these calls wait: only the round trip is timed.
    let client = baseline_client(&sim, tokens, (1000, 1000.0))?;
    let get = GetRequest {
        limit: 50,
        clear: false,
        process_id: None,
        error_lane: false,
    };
    client.offline_get(&get).await?; // connection set up
    let mut samples = Vec::new();
    for _ in 0..ROUND_TRIPS {
        let started = Instant::now();
        let batch = client.offline_get(&get).await?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        if !batch.events.is_empty() {
            bail!("the round-trip portal should be empty");
        }
    }
    sim.shutdown();
    Summary::of(&samples).context("no round-trip samples")
}

pub async fn run() -> anyhow::Result<Report> {
    let mut report = Report::new("latency");
    report.setup = vec![
        "simulator without limits; the daemon's http sink (timeout 5s, default concurrency) posts to \
an endpoint in the bench process; latency = receipt time - time emit_change was called"
            .to_string(),
        format!(
            "idle: {IDLE_EVENTS} events {IDLE_GAP:?} apart, then one more after {QUIET:?} of quiet; \
poll_interval = 200ms with idle_poll_max at its default (30s), then with idle_poll_max = 200ms"
        ),
        format!("load: {LOAD_RATE} events per second for {LOAD_SECONDS} s, poll_interval = 200ms"),
        format!(
            "baseline: {ROUND_TRIPS} bare event.offline.get calls (empty queue) from the bench to a \
simulator, through the same PortalClient the daemon uses (its bucket large enough never to wait)"
        ),
    ];
    let rt = round_trip().await?;
    let (idle_default, quiet_default) = idle("latency-idle", "poll_interval = \"200ms\"").await?;
    let (idle_fast, quiet_fast) = idle(
        "latency-idle-fast",
        "poll_interval = \"200ms\"\nidle_poll_max = \"200ms\"",
    )
    .await?;
    let loaded = load("poll_interval = \"200ms\"").await?;
    let cases = [
        ("baseline: get round trip", rt),
        ("idle, idle_poll_max 30s", idle_default),
        ("idle, idle_poll_max 200ms", idle_fast),
        ("load 200/s", loaded),
    ];
    for (subject, s) in &cases {
        report.row(subject, "samples", s.count as f64, "");
        report.row(subject, "p50", s.p50, "ms");
        report.row(subject, "p99", s.p99, "ms");
        report.row(subject, "max", s.max, "ms");
    }
    report.row(
        "idle, idle_poll_max 30s",
        "after 10 s quiet",
        quiet_default,
        "ms",
    );
    report.row(
        "idle, idle_poll_max 200ms",
        "after 10 s quiet",
        quiet_fast,
        "ms",
    );
    for (subject, s) in &cases[1..] {
        report.ratio(
            &format!("p50 {subject} / round trip p50"),
            s.p50 / rt.p50,
            "lower is better",
        );
    }
    report.notes.push(
        "an idle portal doubles its wait after each empty poll (200ms, 200ms, 400ms, 800ms, ... up to \
idle_poll_max) and the first event resets it: with the 30 s default an event arriving after a quiet \
spell waits up to idle_poll_max before it is fetched; idle_poll_max = poll_interval keeps every \
event within one poll_interval at the cost of a request every poll_interval"
            .to_string(),
    );
    report.notes.push(
        "the daemon's client-side bucket also bounds how often it polls: with the default \
rate_limit (50 burst, 2/s, share 0.5) it sends at most 1 request per second once its 25-request \
burst is spent, so a 200ms poll_interval polls about once a second and an idle event waits up to \
~1 s"
            .to_string(),
    );
    Ok(report)
}
