//! The admin endpoint on `[admin] listen`: the status page at `/`, `/metrics` (OpenMetrics text,
//! see `docs/METRICS.md`), `/healthz` (the process answers) and `/readyz` (the journal answers and
//! every portal is reachable within its backoff), served with axum on hyper until the daemon
//! stops, with bounded connections: at most [`MAX_CONNECTIONS`] at once, each sending its
//! request headers within [`HEADER_READ_TIMEOUT`] (idle keep-alive included), each request
//! answered within [`REQUEST_TIMEOUT`].

use crate::journal::Journal;
use crate::metrics::{self, Metrics};
use crate::pipeline::liveness::{Liveness, PollState};
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long `/readyz` waits for the journal to answer a trivial query.
const JOURNAL_PING_TIMEOUT: Duration = Duration::from_secs(5);
/// How long stopping waits for open requests before dropping them.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once. At the cap a new connection replaces the oldest idle one, or is
/// closed as soon as it is accepted when none is idle, so idle or slow clients never hold more
/// than this many file descriptors of the daemon (its sinks and the journal need them).
/// Prometheus, a health check and an operator's browser need a handful.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send a request's headers, counted from the connection's
/// start or from the end of its previous answer: it also bounds an idle keep-alive connection.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request may take to be answered; after it the answer is 503.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one connection may live: then it is closed once its request in flight is answered.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
/// The pause after a failed `accept` (out of file descriptors, say) before the next one.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
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
    /// The supervised tasks (`/readyz`: one that died is not ready until it runs again).
    pub tasks: crate::supervisor::Supervisor,
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
        let metrics = state.metrics.clone();
        let task = tokio::spawn(serve(listener, router(state), metrics, stop.clone()));
        tracing::info!(
            listen = %addr,
            max_connections = MAX_CONNECTIONS,
            header_read_timeout = ?HEADER_READ_TIMEOUT,
            request_timeout = ?REQUEST_TIMEOUT,
            "admin endpoint serving the status page, /metrics, /healthz and /readyz"
        );
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

    /// Waits until the server's task ends on its own (it never should before
    /// [`AdminServer::stop`]), and says how.
    pub async fn finished(&mut self) -> anyhow::Error {
        let addr = self.addr;
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let ended = task.await;
        self.task = None;
        match ended {
            Ok(()) => anyhow::anyhow!("admin endpoint {addr} stopped serving"),
            Err(e) if e.is_panic() => anyhow::anyhow!(
                "admin endpoint {addr} panicked: {}",
                crate::supervisor::panic_message(e.into_panic().as_ref())
            ),
            Err(e) => anyhow::anyhow!("admin endpoint {addr} failed: {e}"),
        }
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

/// Accepts connections until `stop`, at most [`MAX_CONNECTIONS`] open at once; then lets the open
/// ones finish their requests (the caller bounds that wait). At the cap, a new connection takes
/// the slot of the oldest one waiting for a request (idle: no request in flight), which is
/// closed at once; when every connection has a request in flight, the new one is closed at once.
/// So idle sockets never starve `/healthz`, and never hold more than the cap of descriptors.
async fn serve(listener: TcpListener, router: Router, metrics: Metrics, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let open = Arc::new(OpenConnections::default());
    let connections = TaskTracker::new();
    let mut refused: u64 = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: the listener stays, the next accept may work.
                tracing::warn!(error = %e, "admin endpoint: cannot accept a connection");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) if open.evict_oldest_idle() => {
                // The evicted connection's task drops it and its slot at once.
                tokio::time::timeout(ACCEPT_RETRY, slots.clone().acquire_owned())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            Err(_) => None,
        };
        let Some(slot) = slot else {
            refused += 1;
            metrics.admin_connection_refused();
            // Once per 100 refusals: a flood must not flood the log too.
            if refused % 100 == 1 {
                tracing::warn!(%peer, max_connections = MAX_CONNECTIONS, refused, "admin endpoint: every connection has a request in flight; closing new ones at once");
            }
            drop(stream);
            continue;
        };
        let connection = open.register();
        let inner = TowerToHyperService::new(router.clone());
        let counted = connection.clone();
        let service = hyper::service::service_fn(move |request| {
            let busy = Busy::enter(&counted);
            let answer = hyper::service::Service::call(&inner, request);
            async move {
                let answer = answer.await;
                drop(busy);
                answer
            }
        });
        let (open, stop) = (open.clone(), stop.clone());
        connections.spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .keep_alive(true);
            let served = builder.serve_connection(TokioIo::new(stream), service);
            let mut served = std::pin::pin!(served);
            tokio::select! {
                // A client that went away or timed out is nothing to report.
                _ = served.as_mut() => {}
                _ = connection.evict.cancelled() => {}
                _ = stop.cancelled() => {
                    served.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(STOP_TIMEOUT, served).await;
                }
                _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {
                    served.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(STOP_TIMEOUT, served).await;
                }
            }
            open.remove(&connection);
        });
    }
    connections.close();
    connections.wait().await;
}

/// One open connection, as the accept loop sees it.
#[derive(Default)]
struct Connection {
    /// Requests being answered on it (0: it waits for one).
    busy: AtomicUsize,
    /// Closes it at once: a new connection needs its slot.
    evict: CancellationToken,
}

/// The open connections, oldest first.
#[derive(Default)]
struct OpenConnections(Mutex<VecDeque<Arc<Connection>>>);

impl OpenConnections {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Connection>>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn register(&self) -> Arc<Connection> {
        let connection = Arc::new(Connection::default());
        self.lock().push_back(connection.clone());
        connection
    }

    fn remove(&self, connection: &Arc<Connection>) {
        self.lock().retain(|c| !Arc::ptr_eq(c, connection));
    }

    /// Closes the oldest connection with no request in flight; false when there is none.
    fn evict_oldest_idle(&self) -> bool {
        let mut open = self.lock();
        let Some(at) = open.iter().position(|c| c.busy.load(Ordering::SeqCst) == 0) else {
            return false;
        };
        if let Some(connection) = open.remove(at) {
            connection.evict.cancel();
        }
        true
    }
}

/// A request in flight on a connection (it is not idle until the answer is done).
struct Busy(Arc<Connection>);

impl Busy {
    fn enter(connection: &Arc<Connection>) -> Busy {
        connection.busy.fetch_add(1, Ordering::SeqCst);
        Busy(connection.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(middleware::from_fn(request_timeout))
        .with_state(state)
}

/// Answers 503 when a request is not answered within [`REQUEST_TIMEOUT`].
async fn request_timeout(request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(path, timeout = ?REQUEST_TIMEOUT, "admin endpoint: a request was not answered in time");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{path} was not answered within {}s\n",
                    REQUEST_TIMEOUT.as_secs()
                ),
            )
                .into_response()
        }
    }
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
    /// `journal`, `portal NAME` or `task NAME`.
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
    if let Some(reason) = state.journal.instance_lock_problem() {
        not_ready.push(NotReady {
            component: "journal".to_string(),
            reason,
        });
    }
    for dead in state.tasks.dead() {
        not_ready.push(NotReady {
            component: format!("task {}", dead.task),
            reason: format!(
                "died ({} times lately), restarting: {}",
                dead.deaths, dead.cause
            ),
        });
    }
    if let Some(reason) = state.metrics.lease_not_ready() {
        not_ready.push(NotReady {
            component: "cluster".to_string(),
            reason,
        });
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
