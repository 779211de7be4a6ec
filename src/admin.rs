//! The admin endpoint on `[admin] listen`: the status page at `/`, `/metrics` (OpenMetrics text,
//! see `docs/METRICS.md`), `/healthz` (the process answers) and `/readyz` (the journal answers and
//! every portal is reachable within its backoff), served with axum until the daemon stops.

use crate::journal::Journal;
use crate::metrics::{self, Metrics};
use crate::pipeline::liveness::{Liveness, PollState};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long `/readyz` waits for the journal to answer a trivial query.
const JOURNAL_PING_TIMEOUT: Duration = Duration::from_secs(5);
/// How long stopping waits for open requests before dropping them.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Consecutive failed rounds after which a portal is not ready: the first failure is followed by
/// a retry after the poller's shortest backoff (0.5 s); failing that too makes it not ready.
const UNREADY_AFTER_FAILURES: u32 = 2;

/// What the endpoint reads.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Metrics,
    /// How each portal's rounds go (`/readyz`).
    pub liveness: std::sync::Arc<Liveness>,
    pub journal: Journal,
    /// The configured portals, shown on the status page even before their first event.
    pub portals: Vec<String>,
}

/// The running endpoint. Dropping it stops the server; [`AdminServer::stop`] also waits for it.
pub struct AdminServer {
    addr: SocketAddr,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl AdminServer {
    /// Binds `listen` and serves in a task. A bind failure names `admin.listen`.
    pub async fn start(listen: SocketAddr, state: AdminState) -> anyhow::Result<AdminServer> {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("admin.listen {listen}: cannot listen: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| anyhow::anyhow!("admin.listen {listen}: no local address: {e}"))?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router(state))
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(listen = %addr, error = %e, "admin endpoint failed");
            }
        });
        tracing::info!(listen = %addr, "admin endpoint serving the status page, /metrics, /healthz and /readyz");
        Ok(AdminServer {
            addr,
            stop,
            task: Some(task),
        })
    }

    /// The address actually bound (the port chosen for `:0`).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets open requests finish for a few seconds, and returns.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(STOP_TIMEOUT, &mut task).await.is_err()
        {
            task.abort();
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn serve_metrics(State(state): State<AdminState>) -> Response {
    if let Err(e) = state
        .metrics
        .refresh_from_journal(&state.journal, &state.portals)
        .await
    {
        // The rest is still worth scraping; the journal gauges keep their last values.
        tracing::warn!(error = format!("{e:#}"), "metrics: cannot read the journal");
    }
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}

/// `/`: the status page (see `status_page.rs`), rendered from the journal on every request.
async fn status_page(State(state): State<AdminState>) -> Response {
    match state
        .journal
        .status_data(state.portals.clone(), chrono::Utc::now())
        .await
    {
        // Scrubbed whole: errors on the page came from portals and sinks (HTML-escaped forms
        // of a secret are among those scrubbed).
        Ok(data) => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            crate::redact::scrub(&crate::status_page::render(&data)).into_owned(),
        )
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the journal: {e:#}\n"),
        )
            .into_response(),
    }
}

async fn healthz() -> Response {
    axum::Json(serde_json::json!({ "alive": true })).into_response()
}

/// The `/readyz` body.
#[derive(Debug, Serialize, PartialEq)]
struct Readiness {
    ready: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    not_ready: Vec<NotReady>,
}

#[derive(Debug, Serialize, PartialEq)]
struct NotReady {
    /// `journal` or `portal NAME`.
    component: String,
    reason: String,
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let mut not_ready = Vec::new();
    match tokio::time::timeout(JOURNAL_PING_TIMEOUT, state.journal.ping()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => not_ready.push(NotReady {
            component: "journal".to_string(),
            reason: format!("{e:#}"),
        }),
        Err(_) => not_ready.push(NotReady {
            component: "journal".to_string(),
            reason: format!(
                "the journal did not answer within {}s",
                JOURNAL_PING_TIMEOUT.as_secs()
            ),
        }),
    }
    for (portal, poll) in state.liveness.poll_states() {
        if let Some(reason) = portal_not_ready(&poll) {
            not_ready.push(NotReady {
                component: format!("portal {portal}"),
                reason,
            });
        }
    }
    // Unauthenticated: the reasons quote errors from portals, scrubbed of every known secret.
    for entry in &mut not_ready {
        entry.reason = crate::redact::scrub(&entry.reason).into_owned();
    }
    let status = if not_ready.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = Readiness {
        ready: not_ready.is_empty(),
        not_ready,
    };
    (status, axum::Json(body)).into_response()
}

/// Why a portal is not ready, or `None` when it is. A portal is ready while its last round
/// succeeded, its first round has not ended yet, or only its last round failed with a transient
/// error (the retry after the shortest backoff is still to come). It is not ready after
/// [`UNREADY_AFTER_FAILURES`] failed rounds in a row without any answer, after an error an
/// operator must fix, or when its poller stopped.
fn portal_not_ready(poll: &PollState) -> Option<String> {
    let error = poll.last_error.as_deref().unwrap_or("unknown error");
    if let Some(reason) = &poll.stopped {
        return Some(format!("poller stopped: {reason}"));
    }
    if poll.failures == 0 {
        return None;
    }
    let since = match poll.last_success {
        Some(at) => format!(
            "since {}",
            at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
        None => "since start".to_string(),
    };
    if poll.fatal {
        return Some(format!(
            "failing {since} with an error an operator must fix: {error}"
        ));
    }
    (poll.failures >= UNREADY_AFTER_FAILURES).then(|| {
        format!(
            "unreachable {since}: {} rounds failed in a row: {error}",
            poll.failures
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failing(failures: u32, fatal: bool) -> PollState {
        PollState {
            failures,
            fatal,
            last_error: Some("portal main: event.offline.get failed: connection refused".into()),
            ..PollState::default()
        }
    }

    #[test]
    fn a_portal_is_ready_until_its_retry_fails_too() {
        assert_eq!(portal_not_ready(&PollState::default()), None, "first round");
        assert_eq!(
            portal_not_ready(&failing(1, false)),
            None,
            "one transient failure"
        );
        let reason = portal_not_ready(&failing(2, false)).expect("two failures");
        assert_eq!(
            reason,
            "unreachable since start: 2 rounds failed in a row: portal main: event.offline.get failed: connection refused"
        );
        let mut recovered = failing(0, false);
        recovered.last_error = None;
        recovered.last_success = Some(chrono::Utc::now());
        assert_eq!(portal_not_ready(&recovered), None);
    }

    #[test]
    fn fatal_errors_and_stopped_pollers_are_not_ready_at_once() {
        let mut fatal = failing(1, true);
        fatal.last_success = Some(
            chrono::DateTime::parse_from_rfc3339("2026-11-22T10:00:00Z")
                .unwrap()
                .with_timezone(&chrono::Utc),
        );
        assert_eq!(
            portal_not_ready(&fatal).unwrap(),
            "failing since 2026-11-22T10:00:00Z with an error an operator must fix: portal main: event.offline.get failed: connection refused"
        );
        let stopped = PollState {
            stopped: Some("WRONG_LICENSE".into()),
            ..PollState::default()
        };
        assert_eq!(
            portal_not_ready(&stopped).unwrap(),
            "poller stopped: WRONG_LICENSE"
        );
    }

    #[test]
    fn readiness_serializes_as_documented() {
        let ready = Readiness {
            ready: true,
            not_ready: Vec::new(),
        };
        assert_eq!(serde_json::to_string(&ready).unwrap(), r#"{"ready":true}"#);
        let not = Readiness {
            ready: false,
            not_ready: vec![NotReady {
                component: "portal main".into(),
                reason: "x".into(),
            }],
        };
        assert_eq!(
            serde_json::to_string(&not).unwrap(),
            r#"{"ready":false,"not_ready":[{"component":"portal main","reason":"x"}]}"#
        );
    }
}
