//! The portal simulator: a local Bitrix24 look-alike (offline event queue, REST methods, batch,
//! OAuth with strict refresh rotation, rate and operating limits, injected faults) that behaves
//! as the `rest` module's code (avshatalov48/bitrix-core-business) does, plus switches that
//! make it deviate on purpose (`get_limit_clamp`, `clear_ignores_message_id`) for the
//! conformance probe's tests. Used by b24eventd's integration tests, by `demo` (in-process), by
//! `simulate --listen` (through [`serve`]) and by `b24eventd-bench`. It depends on no part of
//! b24eventd: what it checks the client against is written from the server's side.
//!
//! Layout: `queue` holds the pure queue semantics, `methods` the REST methods and `batch`,
//! `http` the axum transport and faults, `control` the `/_sim/*` endpoints, `portal` the
//! shared state, `auth` tokens, `limits` the operating budget, `query_limit` the request-rate
//! bucket, `php_request` how PHP reads a request's parameters, `php` the parameter set and
//! PHP's coercions, `rest` error bodies and the `time` block.

mod auth;
mod control;
mod http;
mod limits;
mod many;
mod methods;
mod php;
pub mod php_request;
mod portal;
mod query_limit;
mod queue;
mod rest;

use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use portal::State;

/// How the simulated portal behaves.
#[derive(Clone)]
pub struct SimulatorConfig {
    pub client_id: String,
    pub client_secret: String,
    pub access_token_ttl: Duration,
    /// `(burst, per_second)` of the leaky bucket that answers 503; `None` turns it off.
    pub rate_limit: Option<(u32, f64)>,
    /// Per-method operating limit that answers 429; `None` turns it off (time is still
    /// accounted and reported).
    pub operating_limit: Option<OperatingLimit>,
    /// Which server's limiter and `time` block to model.
    pub limiter: LimiterModel,
    /// Server time one method call takes. The simulator answers no sooner than its calls
    /// would have taken, so a client sees the time it is charged pass.
    pub operating_cost: Duration,
    /// Extra server time per event returned or affected.
    pub operating_cost_per_event: Duration,
    /// Plan feature `rest_offline_extended`: without it `get` with `clear=0` is 403.
    pub rest_offline_extended: bool,
    /// Plan feature `rest_auth_connector`: without it any call with `auth_connector` is 403.
    pub rest_auth_connector: bool,
    /// Whether the token's user is a portal administrator (event methods need one).
    pub user_is_admin: bool,
    pub member_id: String,
    /// Seeds the generator behind faults, tokens and process ids.
    pub seed: u64,
    /// A deviation for conformance tests: `event.offline.get` returns (and reserves) at most
    /// this many rows whatever `limit` asks for. The real server has no upper clamp.
    pub get_limit_clamp: Option<usize>,
    /// A deviation for conformance tests: `event.offline.clear` with `message_id` answers
    /// `true` and deletes nothing. The real server deletes those rows of the reservation.
    pub clear_ignores_message_id: bool,
    /// A deviation for conformance tests: `event.offline.list` ignores the conditions on
    /// `PROCESS_ID` of its filter. The real server applies them (`IRestService::sanitizeFilter`
    /// allows the field and the comparison operations).
    pub list_ignores_process_id_filter: bool,
    /// A hostile portal for hardening tests: every fresh reservation gets this `process_id`
    /// instead of a new `Random::getString(32)`, so a process id comes back after its batch
    /// was cleared. The real server draws a new random id for each reservation.
    pub reused_process_id: Option<String>,
}

impl Default for SimulatorConfig {
    fn default() -> SimulatorConfig {
        SimulatorConfig {
            client_id: "local.sim.0001".to_string(),
            client_secret: "sim-secret".to_string(),
            access_token_ttl: Duration::from_secs(3600),
            rate_limit: None,
            operating_limit: None,
            limiter: LimiterModel::Current,
            // The docs' sample answers show 8 ms for a get of one event and 2 ms for a clear
            // (`time.processing` in api-reference/events/event-offline-get.md and
            // event-offline-clear.md of bitrix24/b24restdocs): 5 ms a call plus 0.2 ms an event
            // puts a get of 50 at 15 ms.
            operating_cost: Duration::from_millis(5),
            operating_cost_per_event: Duration::from_micros(200),
            rest_offline_extended: true,
            rest_auth_connector: true,
            user_is_admin: true,
            member_id: "5f0c2d7e9b4a41c3a8e6d1f2b3c4d5e6".to_string(),
            seed: 0x5eed_b24e,
            get_limit_clamp: None,
            clear_ignores_message_id: false,
            list_ignores_process_id_filter: false,
            reused_process_id: None,
        }
    }
}

impl fmt::Debug for SimulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatorConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("access_token_ttl", &self.access_token_ttl)
            .field("rate_limit", &self.rate_limit)
            .field("operating_limit", &self.operating_limit)
            .field("limiter", &self.limiter)
            .field("operating_cost", &self.operating_cost)
            .field("operating_cost_per_event", &self.operating_cost_per_event)
            .field("rest_offline_extended", &self.rest_offline_extended)
            .field("rest_auth_connector", &self.rest_auth_connector)
            .field("user_is_admin", &self.user_is_admin)
            .field("member_id", &self.member_id)
            .field("seed", &self.seed)
            .field("get_limit_clamp", &self.get_limit_clamp)
            .field("clear_ignores_message_id", &self.clear_ignores_message_id)
            .field(
                "list_ignores_process_id_filter",
                &self.list_ignores_process_id_filter,
            )
            .field("reused_process_id", &self.reused_process_id)
            .finish()
    }
}

/// The operating limit of each method: `budget` of server time per `window` (counted in ten
/// buckets); passing it bans the method for `ban` (the current limiter only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OperatingLimit {
    pub budget: Duration,
    pub window: Duration,
    pub ban: Duration,
}

impl Default for OperatingLimit {
    /// The cloud's: 420 s per 10 minutes, a 300 s ban (`LoadLimiter::$limitTime`,
    /// `BAN_DURATION`).
    fn default() -> OperatingLimit {
        OperatingLimit {
            budget: Duration::from_secs(420),
            window: Duration::from_secs(600),
            ban: Duration::from_secs(300),
        }
    }
}

impl OperatingLimit {
    /// A limit of `budget` per `window`, with the ban scaled as on the cloud (half the window):
    /// tests shrink the ten-minute window to seconds.
    pub fn scaled(budget: Duration, window: Duration) -> OperatingLimit {
        OperatingLimit {
            budget,
            window,
            ban: window / 2,
        }
    }
}

/// Which REST server's operating-time limiter the simulator models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LimiterModel {
    /// The current server (`LoadLimiter` v2): integer `time.start` and `time.processing`, the
    /// time of a method's calls in one request summed and stored only above 0.1 s, `batch`
    /// charged at half its time and limited like any method, a 300 s ban past the limit.
    #[default]
    Current,
    /// The model the docs' examples show: float `processing` (the call's own time), every call
    /// charged at once, `batch` neither charged nor limited, a method over budget refused until
    /// its oldest minute leaves the window.
    Legacy,
}

/// Faults injected into `/rest` calls and, for the `oauth_*` ones, into the token endpoint
/// (never into `/_sim`).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Probability of answering 500 `INTERNAL_SERVER_ERROR` without executing.
    pub fail_500: f64,
    /// Probability, for requests that ran `event.offline.get` (also inside `batch`), of
    /// executing and then aborting the connection so the client gets no usable response.
    pub drop_get_after_commit: f64,
    /// Probability of executing and answering 200 with the JSON body cut in half.
    pub truncate: f64,
    /// Probability of sleeping `slow_delay` before answering.
    pub slow: f64,
    pub slow_delay: Duration,
    /// The next N requests that run `event.offline.get` are dropped after commit.
    pub drop_next_gets: u32,
    /// The next N `event.offline.clear` sub-commands of `batch` requests fail alone (500
    /// `INTERNAL_SERVER_ERROR` in `result_error`, nothing cleared) while the others run.
    pub fail_next_batch_clears: u32,
    /// Probability of answering 502 with an HTML page (as a proxy in front of the portal
    /// would), without executing.
    pub html: f64,
    /// The next N answers that ran `event.offline.get` (executed) carry an invalid UTF-8 byte in
    /// the first `"ID":"` value of the body.
    pub invalid_utf8_next_gets: u32,
    /// Answer every `/rest/` request with a 302 to `/old/rest/`, which redirects back: a
    /// redirect loop (a misconfigured proxy in front of the portal), without executing.
    pub redirect_loop: bool,
    /// The next N `/rest/` requests are refused with 429 `OPERATION_TIME_LIMIT` without
    /// executing, with `Retry-After: 1` (their `time` block is `time_block` when set).
    pub operating_limit_next: u32,
    /// A hostile portal's `time` block: while set, it replaces the `time` of every answer
    /// (and each `result_time` of a `batch`), whatever it holds (`operating_reset_at`
    /// 9223372036854775807, `finish` -1e300, `"NaN"`, an empty object, `null`).
    pub time_block: Option<Value>,
    /// Every `event.offline.get`, alone or in a `batch`, fails with 500
    /// `INTERNAL_SERVER_ERROR` without running; every other call runs.
    pub fail_gets: bool,
    /// The next N answers that ran `event.offline.get` (executed: the rows are reserved) are
    /// cut off after their first `"EVENT_DATA":`, so they cannot be parsed.
    pub unparsable_next_gets: u32,
    /// Answer every `/rest/` request with a 302 to the same path on this base URL
    /// (`http://host:port`), without executing: what a renamed portal answers at its old
    /// address, or a hostile one.
    pub redirect_to: Option<String>,
    /// Answer every token request with a 302 to the same path and query on this base URL.
    pub oauth_redirect_to: Option<String>,
    /// The token endpoint refuses every request with 400 `invalid_request` whose description
    /// echoes the request (its query string as received and its decoded `client_secret`), as a
    /// debugging proxy in front of it might.
    pub oauth_echo: bool,
}

/// Counters and a snapshot of the queue table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SimStats {
    /// Events raised (`emit`, `emit_change`, `/_sim/emit`), bound or not.
    pub emitted: u64,
    /// Rows with `ERROR=0` and no reservation.
    pub queued: u64,
    /// Rows with a `PROCESS_ID`.
    pub reserved: u64,
    /// Rows with `ERROR=1`.
    pub error_lane: u64,
    /// HTTP requests to `/rest` (a batch counts once).
    pub requests: u64,
    /// The most `/rest` requests served at once (from arrival until answered, the server time
    /// of their calls included).
    pub most_requests_at_once: u64,
    /// Calls per method, batch sub-commands included.
    pub calls_by_method: BTreeMap<String, u64>,
    /// `batch` requests that carried both an `event.offline.clear` and an `event.offline.get`.
    pub batches_with_clear_and_get: u64,
    /// The most `event.offline.get` sub-commands one `batch` request carried.
    pub max_gets_per_batch: u64,
    /// Sub-commands failed by `fail_next_batch_clears`.
    pub failed_batch_clears: u64,
    /// Answers replaced by an HTML page (`html`).
    pub html_pages: u64,
    /// Answers corrupted with an invalid UTF-8 byte (`invalid_utf8_next_gets`).
    pub invalid_utf8: u64,
    /// `/rest/` requests answered with a 302 by `redirect_loop`.
    pub redirect_loops: u64,
    /// `event.offline.get` calls failed by `fail_gets`.
    pub failed_gets: u64,
    /// Answers cut off by `unparsable_next_gets`.
    pub unparsable: u64,
    pub rejected_503: u64,
    pub rejected_429: u64,
    pub faults_500: u64,
    pub dropped_after_commit: u64,
    pub truncated: u64,
    pub token_refreshes: u64,
    pub rejected_refresh: u64,
    /// Rows deleted by `event.offline.clear` and by `get` with `clear` not 0.
    pub cleared: u64,
    /// Rows moved to the error lane by `event.offline.error`.
    pub errored: u64,
    /// `event.offline.get` calls that read the error lane (`error=1`).
    pub error_lane_gets: u64,
    /// The largest `limit` an `event.offline.get` asked for (before `get_limit_clamp`).
    pub largest_get_limit: u64,
    /// `event.offline.clear` calls with `message_id` that `clear_ignores_message_id` ignored.
    pub ignored_message_id_clears: u64,
    /// `event.test` calls answered.
    pub event_tests: u64,
}

/// One row of the queue table.
#[derive(Debug, Clone, Serialize)]
pub struct SimRow {
    pub id: i64,
    pub timestamp_x: String,
    pub event_name: String,
    pub event_data: Value,
    pub event_additional: Value,
    pub message_id: String,
    pub process_id: String,
    pub error: bool,
    pub connector_id: String,
}

/// What the server tasks and the handle share.
pub(crate) struct Inner {
    config: SimulatorConfig,
    base_url: String,
    /// The path prefix this portal is served under (`/p/NAME` when many share a listener,
    /// see [`Simulator::start_many`]; empty otherwise).
    prefix: String,
    state: Mutex<State>,
    shutdown: CancellationToken,
}

impl Inner {
    fn new(config: SimulatorConfig, addr: SocketAddr, shutdown: CancellationToken) -> Inner {
        Inner::with_prefix(config, addr, String::new(), shutdown)
    }

    fn with_prefix(
        config: SimulatorConfig,
        addr: SocketAddr,
        prefix: String,
        shutdown: CancellationToken,
    ) -> Inner {
        let state = Mutex::new(State::new(&config));
        Inner {
            base_url: format!("{}{prefix}", base_url_of(addr)),
            prefix,
            config,
            state,
            shutdown,
        }
    }

    /// The state lock; never held across an await.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn emit(&self, event: &str, data: Value, connectors: &[String], user_id: i64) {
        self.lock()
            .raise(event, data, connectors, user_id, rest::portal_now());
    }

    fn emit_change(&self, event: &str, entity_id: u64) {
        let mut state = self.lock();
        let connectors = state.offline_connectors(event);
        state.raise(
            event,
            json!({"FIELDS": {"ID": entity_id.to_string()}}),
            &connectors,
            1,
            rest::portal_now(),
        );
    }

    fn issue_tokens(&self) -> (String, String) {
        let issued = self.lock().issue_tokens(rest::unix_now());
        (issued.access_token, issued.refresh_token)
    }
}

/// `http://HOST:PORT` for a listener address (an unspecified address is reached on loopback).
fn base_url_of(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        match addr {
            SocketAddr::V4(_) => std::net::IpAddr::from([127, 0, 0, 1]),
            SocketAddr::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        }
    } else {
        addr.ip()
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// A running simulated portal; clones share it.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

impl Simulator {
    /// Serves on `127.0.0.1` with a free port.
    pub async fn start(config: SimulatorConfig) -> anyhow::Result<Simulator> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Simulator::start_on(config, listener).await
    }

    /// Serves on `listener` in a background task until [`Simulator::shutdown`].
    pub async fn start_on(
        config: SimulatorConfig,
        listener: tokio::net::TcpListener,
    ) -> anyhow::Result<Simulator> {
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner::new(config, addr, CancellationToken::new()));
        let app = http::router(inner.clone());
        let token = inner.shutdown.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::warn!(%addr, %error, "portal simulator stopped with an error");
            }
        });
        tracing::debug!(%addr, "portal simulator started");
        Ok(Simulator { inner })
    }

    /// Serves one simulated portal per name, all on `listener`, each under a path prefix of
    /// its own (`/p/NAME`: its [`Simulator::base_url`] is `http://127.0.0.1:PORT/p/NAME`), so
    /// that thousands of portals need neither a port nor a listening descriptor each. Each has
    /// its own state, as if started alone with `config`; [`Simulator::shutdown`] on any of
    /// them stops the listener, and so all of them.
    pub async fn start_many(
        config: SimulatorConfig,
        names: &[String],
        listener: tokio::net::TcpListener,
    ) -> anyhow::Result<Vec<Simulator>> {
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let inners: Vec<Arc<Inner>> = names
            .iter()
            .map(|name| {
                many::check_name(name)?;
                Ok(Arc::new(Inner::with_prefix(
                    config.clone(),
                    addr,
                    format!("{}{name}", many::PREFIX),
                    shutdown.clone(),
                )))
            })
            .collect::<anyhow::Result<_>>()?;
        let app = many::router(names.iter().cloned().zip(inners.iter().cloned()));
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::warn!(%addr, %error, "portal simulators stopped with an error");
            }
        });
        tracing::debug!(%addr, portals = names.len(), "portal simulators started");
        Ok(inners
            .into_iter()
            .map(|inner| Simulator { inner })
            .collect())
    }

    /// `http://127.0.0.1:PORT` (with `/p/NAME` under [`Simulator::start_many`]).
    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    /// Where REST calls go: base + `/rest/`.
    pub fn client_endpoint(&self) -> String {
        format!("{}/rest/", self.inner.base_url)
    }

    /// The OAuth server: base + `/oauth/token/`.
    pub fn oauth_token_url(&self) -> String {
        format!("{}/oauth/token/", self.inner.base_url)
    }

    /// A former address of the portal: every call there answers 302 to the same method
    /// under `/rest/`.
    pub fn moved_endpoint(&self) -> String {
        format!("{}/old/rest/", self.inner.base_url)
    }

    /// A fresh `(access_token, refresh_token)` pair, as if the app was just installed.
    pub fn issue_tokens(&self) -> (String, String) {
        self.inner.issue_tokens()
    }

    /// A one-time code for `grant_type=authorization_code`.
    pub fn authorization_code(&self) -> String {
        self.inner.lock().new_authorization_code()
    }

    /// Like `event.bind` with `event_type=offline` (`connector` "" for none); binding twice
    /// is a no-op.
    pub fn bind_offline(&self, event: &str, connector: &str) {
        self.inner.lock().bind_offline(event, connector);
    }

    /// Raises an event: queued only if an offline binding of this event and connector exists,
    /// merged by MESSAGE_ID into an unreserved row of the same content.
    pub fn emit(&self, event: &str, data: Value, connector: &str, user_id: i64) {
        self.inner
            .emit(event, data, &[connector.to_string()], user_id);
    }

    /// Raises `{"FIELDS":{"ID":"<id>"}}` for every connector bound to `event`, by user 1.
    pub fn emit_change(&self, event: &str, entity_id: u64) {
        self.inner.emit_change(event, entity_id);
    }

    pub fn set_faults(&self, faults: Faults) {
        self.inner.lock().faults = faults;
    }

    /// Every access token issued so far answers 401 `expired_token` from now on.
    pub fn expire_access_tokens(&self) {
        self.inner.lock().tokens.expire_all();
    }

    /// The portal's daily purge of reservations (`cleanProcessAgent`): deletes reserved rows
    /// whose `TIMESTAMP_X` is more than `older_than` ago (34 days on a real portal). Returns the
    /// rows deleted.
    pub fn purge_reservations(&self, older_than: Duration) -> usize {
        let now = rest::portal_now();
        let cutoff = chrono::TimeDelta::from_std(older_than)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .unwrap_or(now);
        self.inner.lock().queue.purge_reservations(cutoff)
    }

    pub fn stats(&self) -> SimStats {
        self.inner.lock().stats()
    }

    /// Every access and refresh token the portal has issued (installation, refreshes, codes).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.inner.lock().tokens.issued().to_vec()
    }

    /// A snapshot of the queue table, by ID.
    pub fn rows(&self) -> Vec<SimRow> {
        self.inner.lock().sim_rows()
    }

    /// Re-seeds the queue's auto-increment from the rows present (`MAX(ID) + 1`, 1 when the
    /// table is empty), as MySQL before 8.0 does at a restart: IDs of deleted rows come back.
    /// Returns the ID the next new row gets.
    pub fn reseed_ids(&self) -> i64 {
        self.inner.lock().queue.reseed_ids()
    }

    /// Stops serving (in-flight requests finish).
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }
}

/// Serves the simulator on `listener` until `shutdown` is cancelled (for `simulate --listen`).
pub async fn serve(
    config: SimulatorConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    let inner = Arc::new(Inner::new(config, addr, shutdown.clone()));
    tracing::info!(%addr, base_url = %inner.base_url, "portal simulator listening");
    axum::serve(listener, http::router(inner))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    tracing::info!(%addr, "portal simulator stopped");
    Ok(())
}

#[cfg(test)]
mod tests;
