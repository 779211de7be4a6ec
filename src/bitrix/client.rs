//! The per-portal REST client: every HTTP request to a Bitrix24 portal goes through
//! [`PortalClient::call`], which owns authentication (single-flight refresh, rotation-safe
//! persistence), the client-side leaky bucket, the portal's limits (503 `QUERY_LIMIT_EXCEEDED`,
//! 429 `OPERATION_TIME_LIMIT`), domain-change redirects and response classification.

use super::entities::{self, Getter};
use super::error::{
    BitrixError, ErrorClass, codes, describe_unparsable, invalid_response, sanitize_snippet,
};
use super::form;
use super::oauth::{self, TokenStore, Tokens};
use super::operating::{self, Answered, MethodTime, OperatingTimes};
use super::ratelimit::LeakyBucket;
use super::types::{
    self, ApiResponse, AppInfo, BatchResponse, EventHandler, FeatureValue, ListPage, OfflineBatch,
    parse_app_info, parse_batch, parse_error, parse_event_get, parse_feature_get,
    parse_offline_get, parse_offline_list, parse_server_time, parse_time, parse_unbind_count,
    parse_user_admin,
};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Largest response body read from a portal; a bigger one is an `INVALID_RESPONSE`.
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Redirect hops followed per request (the portal moved to a new domain).
const MAX_REDIRECTS: usize = 3;
/// Sub-commands per `batch` request (`CRestUtil::BATCH_MAX_LENGTH`).
pub const MAX_BATCH: usize = 50;
/// An access token expiring within this margin is refreshed before the call.
const EXPIRY_MARGIN_SECS: i64 = 60;
/// After a rejection-triggered refresh, a second rejection within this time does not refresh
/// again (a fresh token refused means refreshing will not help; it would only hammer the
/// authorization server, which may block the application).
const MIN_REJECTION_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// First backoff after a 503 `QUERY_LIMIT_EXCEEDED`; doubles per repeat up to the cap.
const LIMIT_BACKOFF_START: Duration = Duration::from_secs(1);
const LIMIT_BACKOFF_CAP: Duration = Duration::from_secs(60);
/// The longest wait for an operating window: the 10-minute window plus a minute of margin.
pub const MAX_OPERATING_WAIT: Duration = Duration::from_secs(11 * 60);
const USER_AGENT: &str = concat!("b24eventd/", env!("CARGO_PKG_VERSION"));
const SETUP: &str = "client setup";

/// How to reach and authenticate against one portal.
#[derive(Clone)]
pub struct ClientSettings {
    /// The portal's name in the config (used in logs and errors).
    pub portal: String,
    /// `https://example.bitrix24.com/rest/` (a missing trailing `/` is added).
    pub client_endpoint: String,
    pub oauth_token_url: String,
    pub client_id: String,
    pub client_secret: String,
    /// Sent as `auth_connector` on every call when set.
    pub auth_connector: Option<String>,
    /// Client-side leaky bucket mirroring the portal's (50 and 2/s; Enterprise 250 and 5/s).
    pub burst: u32,
    pub per_second: f64,
    /// Timeout of one HTTP request, body included.
    pub request_timeout: Duration,
    /// How long `call` keeps waiting out 503/429 limit answers before returning the
    /// Retryable error (zero: return the first one).
    pub max_limit_wait: Duration,
}

impl fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSettings")
            .field("portal", &self.portal)
            .field("client_endpoint", &self.client_endpoint)
            .field("oauth_token_url", &self.oauth_token_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("auth_connector", &self.auth_connector)
            .field("burst", &self.burst)
            .field("per_second", &self.per_second)
            .field("request_timeout", &self.request_timeout)
            .field("max_limit_wait", &self.max_limit_wait)
            .finish()
    }
}

/// Counters of one client since it was built.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ClientStats {
    /// HTTP requests sent to the portal (redirect hops and retries included).
    pub requests: u64,
    pub ok: u64,
    pub rate_limited_503: u64,
    pub operating_429: u64,
    pub auth_errors: u64,
    /// Other error answers, including bodies that were not Bitrix24 JSON.
    pub other_errors: u64,
    /// Requests that did not complete (connect, timeout, reset, cut-off body).
    pub transport_errors: u64,
    /// Answers with a success status whose body could not be parsed (cut off, broken, or JSON
    /// nested deeper than [`crate::json_depth::MAX_DEPTH`] levels); counted in `other_errors`
    /// too.
    pub unparsable: u64,
    pub token_refreshes: u64,
    /// Seconds spent waiting for rate limits: the client-side bucket and 503/429 backoffs.
    pub rate_wait_seconds: f64,
    /// The same answers split by REST method (`batch` for a batch request), with the operating
    /// time the portal reported for each.
    pub methods: BTreeMap<String, MethodStats>,
}

/// Answers to one REST method since the client was built.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct MethodStats {
    pub ok: u64,
    pub rate_limited_503: u64,
    pub operating_429: u64,
    pub auth_errors: u64,
    pub other_errors: u64,
    pub transport_errors: u64,
    /// `time.operating` of the method's last successful answer: seconds of execution the portal
    /// has counted against the method's operating budget in its 10-minute window.
    pub operating_seconds: Option<f64>,
    /// `time.processing` of that answer: what the call itself cost.
    #[serde(skip)]
    pub processing_seconds: Option<f64>,
}

/// How one request ended, for [`ClientStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    RateLimited503,
    Operating429,
    Auth,
    Other,
    Transport,
}

/// Parameters of `event.offline.get`.
#[derive(Debug, Clone, PartialEq)]
pub struct GetRequest {
    pub limit: u32,
    /// `true` deletes what is returned (fetch-delete mode); `false` reserves it (`process_id`).
    pub clear: bool,
    /// Re-read the rows already reserved under this id.
    pub process_id: Option<String>,
    /// Read the error lane (`error=1`).
    pub error_lane: bool,
}

/// The HTTP client every portal client uses: redirects not followed (a 302 is handled by the
/// client), 30 s to connect, 60 s per request unless the call sets its own (REST calls use the
/// portal's `request_timeout`; OAuth calls keep the 60 s).
pub fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .connect_timeout(Duration::from_secs(30))
        .user_agent(USER_AGENT)
        .build()
}

/// One `event.offline.*` call, alone or as a sub-command of [`PortalClient::offline_batch`].
#[derive(Debug, Clone, PartialEq)]
pub enum OfflineCommand {
    Get(GetRequest),
    Clear {
        process_id: String,
        target: ClearTarget,
    },
    Error {
        process_id: String,
        message_ids: Vec<String>,
    },
}

impl OfflineCommand {
    pub fn method(&self) -> &'static str {
        match self {
            OfflineCommand::Get(_) => "event.offline.get",
            OfflineCommand::Clear { .. } => "event.offline.clear",
            OfflineCommand::Error { .. } => "event.offline.error",
        }
    }

    /// The start of the command's key in a `batch` request.
    fn key_prefix(&self) -> &'static str {
        match self {
            OfflineCommand::Get(_) => "get",
            OfflineCommand::Clear { .. } => "clear",
            OfflineCommand::Error { .. } => "error",
        }
    }

    /// A settle call naming no rows (nothing to send).
    fn is_empty(&self) -> bool {
        match self {
            OfflineCommand::Get(_) => false,
            OfflineCommand::Clear { target, .. } => match target {
                ClearTarget::All => false,
                ClearTarget::MessageIds(ids) => ids.is_empty(),
                ClearTarget::Ids(ids) => ids.is_empty(),
            },
            OfflineCommand::Error { message_ids, .. } => message_ids.is_empty(),
        }
    }
}

/// The answer to [`PortalClient::offline_batch`].
#[derive(Debug)]
pub struct OfflineBatchAnswer {
    /// One per command, in order.
    pub outcomes: Vec<OfflineOutcome>,
}

/// How one sub-command of [`PortalClient::offline_batch`] came out.
#[derive(Debug)]
pub enum OfflineOutcome {
    /// A `get` answered (its reservation and events).
    Got(OfflineBatch),
    /// A `clear` or `error` was done.
    Settled,
    /// The portal refused or failed this sub-command alone (the others ran).
    Failed(BitrixError),
}

/// What a getter in [`PortalClient::get_entities`] came to.
#[derive(Debug)]
pub enum EntityOutcome {
    Found(Value),
    /// The entity does not exist (deleted since the event): the text says which.
    NotFound(String),
    Failed(BitrixError),
}

/// Which rows of a reservation `event.offline.clear` deletes.
#[derive(Debug, Clone, PartialEq)]
pub enum ClearTarget {
    All,
    MessageIds(Vec<String>),
    Ids(Vec<i64>),
}

/// What `event.bind` did with an offline binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindOutcome {
    /// The binding was added.
    Bound,
    /// The portal already had it ("Handler already binded"): nothing changed.
    AlreadyBound,
}

/// A client for one portal. Cheap to clone; clones share tokens, bucket and counters.
#[derive(Clone)]
pub struct PortalClient {
    inner: Arc<Inner>,
}

struct Inner {
    settings: ClientSettings,
    http: reqwest::Client,
    /// The current `client_endpoint` (changes when the portal redirects to a new domain).
    endpoint: Mutex<String>,
    tokens: Mutex<TokenState>,
    /// Single-flight token refresh (and retried persistence), held across the HTTP request and
    /// the store's save.
    refresh_lock: tokio::sync::Mutex<()>,
    bucket: Mutex<LeakyBucket>,
    operating: Mutex<OperatingState>,
    stats: Mutex<ClientStats>,
    store: Arc<dyn TokenStore>,
}

#[derive(Default)]
struct TokenState {
    tokens: Option<Tokens>,
    /// The in-memory tokens came from a refresh whose save failed: persist before the next call.
    unsaved: bool,
    last_rejection_refresh: Option<Instant>,
}

#[derive(Default)]
struct OperatingState {
    /// What the portal said of each method's operating time, and what was spent since.
    times: OperatingTimes,
    /// The portal's clock as of the last answer (its `time.finish`) and when that answer came,
    /// on the monotonic clock: reset times are the portal's Unix seconds, and comparing them
    /// with this machine's wall clock would stall fetching for as long as that clock was set
    /// back (or skewed).
    portal_clock: Option<(f64, Instant)>,
}

/// Why a refresh is wanted; decides whether a caller that waited for the lock still needs one.
enum RefreshTrigger<'a> {
    /// The access token expires soon.
    Expiring,
    /// The portal refused this access token.
    Rejected(&'a str),
    /// Asked for explicitly.
    Forced,
}

/// Locks a std mutex, ignoring poisoning (every critical section leaves consistent state).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PortalClient {
    /// Builds the client. Fails (Fatal `INVALID_SETTINGS`) on an unusable endpoint or token URL,
    /// a zero timeout, or when the HTTP client cannot be built.
    pub fn new(
        settings: ClientSettings,
        tokens: Option<Tokens>,
        store: Arc<dyn TokenStore>,
    ) -> Result<PortalClient, BitrixError> {
        let http = http_client().map_err(|e| {
            BitrixError::new(
                &settings.portal,
                SETUP,
                codes::INVALID_SETTINGS,
                format!("the HTTP client could not be built: {e}"),
                None,
            )
        })?;
        PortalClient::with_http(settings, tokens, store, http)
    }

    /// [`PortalClient::new`] on an HTTP client shared with other portals (one connection pool
    /// and TLS configuration for a daemon serving many portals). Each request still has the
    /// portal's own `request_timeout`.
    pub fn with_http(
        settings: ClientSettings,
        tokens: Option<Tokens>,
        store: Arc<dyn TokenStore>,
        http: reqwest::Client,
    ) -> Result<PortalClient, BitrixError> {
        let portal = settings.portal.clone();
        let invalid =
            |what: String| BitrixError::new(&portal, SETUP, codes::INVALID_SETTINGS, what, None);
        let endpoint = normalize_endpoint(&settings.client_endpoint)
            .map_err(|e| invalid(format!("client_endpoint {}: {e}", settings.client_endpoint)))?;
        match reqwest::Url::parse(&settings.oauth_token_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => {
                return Err(invalid(format!(
                    "oauth_token_url {} is not an http(s) URL",
                    settings.oauth_token_url
                )));
            }
        }
        if settings.request_timeout.is_zero() {
            return Err(invalid("request_timeout must be above zero".to_string()));
        }
        if !(settings.per_second > 0.0 && settings.per_second.is_finite()) || settings.burst == 0 {
            return Err(invalid(format!(
                "rate limit burst {} per_second {} must both be above zero",
                settings.burst, settings.per_second
            )));
        }
        let bucket = LeakyBucket::new(settings.burst, settings.per_second, Instant::now());
        crate::redact::register(&settings.client_secret);
        if let Some(tokens) = &tokens {
            tokens.register_secrets(&portal);
        }
        Ok(PortalClient {
            inner: Arc::new(Inner {
                http,
                endpoint: Mutex::new(endpoint),
                tokens: Mutex::new(TokenState {
                    tokens,
                    ..TokenState::default()
                }),
                refresh_lock: tokio::sync::Mutex::new(()),
                bucket: Mutex::new(bucket),
                operating: Mutex::new(OperatingState::default()),
                stats: Mutex::new(ClientStats::default()),
                store,
                settings,
            }),
        })
    }

    pub fn portal(&self) -> &str {
        &self.inner.settings.portal
    }

    pub fn has_tokens(&self) -> bool {
        lock(&self.inner.tokens).tokens.is_some()
    }

    pub fn stats(&self) -> ClientStats {
        lock(&self.inner.stats).clone()
    }

    /// The endpoint calls currently go to (differs from the config after a domain redirect).
    pub fn client_endpoint(&self) -> String {
        lock(&self.inner.endpoint).clone()
    }

    /// Calls a REST method: POST `client_endpoint + method` with `params` as a JSON object plus
    /// `auth` (and `auth_connector` when configured and the caller did not pass one; a caller's
    /// `"auth_connector": null` sends none).
    ///
    /// Waits for the client-side bucket before every request; waits out 503/429 limit answers
    /// for up to `max_limit_wait`; refreshes the access token when it expires within 60 s and
    /// once after an auth error (then repeats the call once); follows up to 3 domain redirects.
    pub async fn call(&self, method: &str, params: Value) -> Result<ApiResponse, BitrixError> {
        let params = self.prepare_params(method, params)?;
        let settings = &self.inner.settings;
        let started = Instant::now();
        let mut limit_attempts = 0u32;
        let mut auth_retried = false;
        loop {
            let access = self.usable_access_token(method).await?;
            let mut body = params.clone();
            body.insert("auth".to_string(), Value::String(access.clone()));
            let bytes = serde_json::to_vec(&Value::Object(body)).map_err(|e| {
                BitrixError::new(
                    self.portal(),
                    method,
                    codes::INVALID_PARAMS,
                    format!("parameters could not be serialized: {e}"),
                    None,
                )
            })?;
            let err = match self.post(method, bytes, &access).await {
                Ok(resp) => return Ok(resp),
                Err(err) => err,
            };
            let remaining = settings.max_limit_wait.saturating_sub(started.elapsed());
            if err.is_code("QUERY_LIMIT_EXCEEDED") {
                lock(&self.inner.bucket).mark_full(Instant::now());
                let wait = limit_backoff(limit_attempts).max(err.retry_after.unwrap_or_default());
                limit_attempts += 1;
                if remaining.is_zero() {
                    return Err(err.with_retry_after(Some(wait)));
                }
                self.wait_for_limit(method, &err.code, wait.min(remaining))
                    .await;
                continue;
            }
            if err.is_code("OPERATION_TIME_LIMIT") {
                self.operating_refused(method, err.retry_after);
                let wait = self.operating_wait(method, err.retry_after);
                limit_attempts += 1;
                if wait > remaining {
                    return Err(err.with_retry_after(Some(wait)));
                }
                self.wait_for_limit(method, &err.code, wait).await;
                continue;
            }
            if err.class == ErrorClass::Auth && !auth_retried {
                auth_retried = true;
                tracing::info!(
                    portal = self.portal(),
                    method,
                    code = %err.code,
                    "the portal refused the access token; refreshing it and repeating the call"
                );
                if self
                    .refresh_single_flight(RefreshTrigger::Rejected(&access))
                    .await?
                {
                    continue;
                }
            }
            return Err(err);
        }
    }

    /// `event.offline.get`: `clear` and `error` go as 0/1.
    pub async fn offline_get(&self, req: &GetRequest) -> Result<OfflineBatch, BitrixError> {
        let (method, params) = self.offline_params(&OfflineCommand::Get(req.clone()))?;
        let resp = self.call(method, params).await?;
        parse_offline_get(&resp.result).map_err(|e| self.shape_error(method, e))
    }

    /// `event.offline.clear` of a reservation: all of it, or the given `message_id`s or `id`s
    /// (never both). An empty id list clears nothing and sends no request.
    pub async fn offline_clear(
        &self,
        process_id: &str,
        target: &ClearTarget,
    ) -> Result<(), BitrixError> {
        let command = OfflineCommand::Clear {
            process_id: process_id.to_string(),
            target: target.clone(),
        };
        let (method, params) = self.offline_params(&command)?;
        if command.is_empty() {
            return Ok(());
        }
        self.call(method, params).await.map(|_| ())
    }

    /// `event.offline.error`: moves these rows of the reservation to the error lane. An empty
    /// list sends no request (the server would do nothing).
    pub async fn offline_error(
        &self,
        process_id: &str,
        message_ids: &[String],
    ) -> Result<(), BitrixError> {
        let command = OfflineCommand::Error {
            process_id: process_id.to_string(),
            message_ids: message_ids.to_vec(),
        };
        let (method, params) = self.offline_params(&command)?;
        if command.is_empty() {
            return Ok(());
        }
        self.call(method, params).await.map(|_| ())
    }

    /// Several `event.offline.*` calls in one `batch` request (one tick of the portal's
    /// bucket; each sub-command is charged to its own method's operating budget). Sub-commands
    /// run in order under the request's `auth_connector`; one failing does not stop the others.
    /// Returns one outcome per command, in order. Empty settle commands are refused: leave them
    /// out.
    pub async fn offline_batch(
        &self,
        commands: &[OfflineCommand],
    ) -> Result<OfflineBatchAnswer, BitrixError> {
        let mut sub = Vec::with_capacity(commands.len());
        for (i, command) in commands.iter().enumerate() {
            let (method, params) = self.offline_params(command)?;
            if command.is_empty() {
                return Err(BitrixError::new(
                    self.portal(),
                    method,
                    codes::INVALID_PARAMS,
                    "a settle sub-command with no events".to_string(),
                    None,
                ));
            }
            // String keys: PHP would turn sequential numeric keys into a JSON list. The number
            // comes first, zero-padded, so that the keys sort in command order: the body's `cmd`
            // object is serialized with sorted keys, and the portal runs them in that order.
            sub.push((
                format!("{i:02}{}", command.key_prefix()),
                method.to_string(),
                params,
            ));
        }
        let resp = self.batch(&sub, false).await?;
        let outcomes = sub
            .iter()
            .zip(commands)
            .map(|((key, method, _), command)| {
                if let Some((code, description)) = resp.errors.get(key) {
                    return OfflineOutcome::Failed(BitrixError::from_api(
                        self.portal(),
                        method,
                        code,
                        description,
                        None,
                    ));
                }
                let Some(result) = resp.results.get(key) else {
                    return OfflineOutcome::Failed(
                        self.shape_error(method, format!("no result for sub-command {key}")),
                    );
                };
                match command {
                    OfflineCommand::Get(_) => match parse_offline_get(result) {
                        Ok(batch) => OfflineOutcome::Got(batch),
                        Err(e) => OfflineOutcome::Failed(self.shape_error(method, e)),
                    },
                    OfflineCommand::Clear { .. } | OfflineCommand::Error { .. } => {
                        OfflineOutcome::Settled
                    }
                }
            })
            .collect();
        Ok(OfflineBatchAnswer { outcomes })
    }

    /// Reads up to 50 entities in one `batch` request (one sub-command per entity; callers
    /// deduplicate). Returns one outcome per key, in order.
    pub async fn get_entities(
        &self,
        keys: &[(Getter, u64)],
    ) -> Result<Vec<EntityOutcome>, BitrixError> {
        let commands: Vec<(String, String, Value)> = keys
            .iter()
            .enumerate()
            .map(|(i, (getter, id))| {
                (
                    format!("entity{i}"),
                    getter.method().to_string(),
                    json!({ getter.id_param(): id }),
                )
            })
            .collect();
        let resp = self.batch(&commands, false).await?;
        Ok(commands
            .iter()
            .zip(keys)
            .map(|((key, method, _), (getter, id))| {
                if let Some((code, description)) = resp.errors.get(key) {
                    if entities::is_not_found(code, description) {
                        return EntityOutcome::NotFound(format!(
                            "{method} {id}: not found ({})",
                            if description.is_empty() {
                                code
                            } else {
                                description
                            }
                        ));
                    }
                    return EntityOutcome::Failed(BitrixError::from_api(
                        self.portal(),
                        method,
                        code,
                        description,
                        None,
                    ));
                }
                match resp.results.get(key) {
                    Some(result) => EntityOutcome::Found(getter.entity_of(result.clone())),
                    None => EntityOutcome::Failed(
                        self.shape_error(method, format!("no result for sub-command {key}")),
                    ),
                }
            })
            .collect())
    }

    /// The REST method and parameters of an `event.offline.*` call.
    fn offline_params(
        &self,
        command: &OfflineCommand,
    ) -> Result<(&'static str, Value), BitrixError> {
        let method = command.method();
        Ok(match command {
            OfflineCommand::Get(req) => {
                let mut params = json!({
                    "limit": req.limit,
                    "clear": u8::from(req.clear),
                    "error": u8::from(req.error_lane),
                });
                if let Some(pid) = &req.process_id {
                    self.require_process_id(method, pid)?;
                    params["process_id"] = Value::String(pid.clone());
                }
                (method, params)
            }
            OfflineCommand::Clear { process_id, target } => {
                self.require_process_id(method, process_id)?;
                let mut params = json!({ "process_id": process_id });
                match target {
                    ClearTarget::All => {}
                    ClearTarget::MessageIds(ids) => params["message_id"] = json!(ids),
                    ClearTarget::Ids(ids) => params["id"] = json!(ids),
                }
                (method, params)
            }
            OfflineCommand::Error {
                process_id,
                message_ids,
            } => {
                self.require_process_id(method, process_id)?;
                (
                    method,
                    json!({ "process_id": process_id, "message_id": message_ids }),
                )
            }
        })
    }

    /// One page of `event.offline.list` (ordered by `ID` ascending), from `start`.
    pub async fn offline_list(&self, filter: Value, start: u64) -> Result<ListPage, BitrixError> {
        const METHOD: &str = "event.offline.list";
        let filter = if filter.is_null() { json!({}) } else { filter };
        let params = json!({ "filter": filter, "order": {"ID": "ASC"}, "start": start });
        let resp = self.call(METHOD, params).await?;
        parse_offline_list(&resp).map_err(|e| self.shape_error(METHOD, e))
    }

    /// Pages of `event.offline.list` in `order` (one field, e.g. `{"PROCESS_ID": "ASC"}`): one
    /// `(filter, start)` per page, sent together in one `batch` request (a single page alone).
    /// Returns one page or error per query, in order.
    pub async fn offline_list_pages(
        &self,
        order: &Value,
        queries: &[(Value, u64)],
    ) -> Result<Vec<Result<ListPage, BitrixError>>, BitrixError> {
        const METHOD: &str = "event.offline.list";
        let params = |filter: &Value, start: u64| json!({ "filter": filter, "order": order, "start": start });
        if let [(filter, start)] = queries {
            let resp = self.call(METHOD, params(filter, *start)).await?;
            return Ok(vec![
                parse_offline_list(&resp).map_err(|e| self.shape_error(METHOD, e)),
            ]);
        }
        let commands: Vec<(String, String, Value)> = queries
            .iter()
            .enumerate()
            .map(|(i, (filter, start))| {
                (
                    format!("{i:02}list"),
                    METHOD.to_string(),
                    params(filter, *start),
                )
            })
            .collect();
        let resp = self.batch(&commands, false).await?;
        Ok(commands
            .iter()
            .map(|(key, _, _)| {
                if let Some((code, description)) = resp.errors.get(key) {
                    return Err(BitrixError::from_api(
                        self.portal(),
                        METHOD,
                        code,
                        description,
                        None,
                    ));
                }
                let Some(result) = resp.results.get(key) else {
                    return Err(
                        self.shape_error(METHOD, format!("no result for sub-command {key}"))
                    );
                };
                let page = ApiResponse {
                    result: result.clone(),
                    total: resp.totals.get(key).copied(),
                    next: resp.nexts.get(key).copied(),
                    time: resp.times.get(key).cloned().unwrap_or_default(),
                    waited: 0.0,
                };
                parse_offline_list(&page).map_err(|e| self.shape_error(METHOD, e))
            })
            .collect())
    }

    /// One `batch` request of up to 50 `(key, method, params)` sub-commands, each sent as
    /// `method?<PHP bracket query>`. Sub-command failures are in [`BatchResponse::errors`].
    pub async fn batch(
        &self,
        commands: &[(String, String, Value)],
        halt: bool,
    ) -> Result<BatchResponse, BitrixError> {
        const METHOD: &str = "batch";
        if commands.len() > MAX_BATCH {
            return Err(BitrixError::new(
                self.portal(),
                METHOD,
                codes::BATCH_LENGTH_EXCEEDED,
                format!(
                    "{} sub-commands, at most {MAX_BATCH} allowed",
                    commands.len()
                ),
                None,
            ));
        }
        if commands.is_empty() {
            return Ok(BatchResponse::default());
        }
        let mut cmd = Map::new();
        for (key, method, params) in commands {
            if key.is_empty() || cmd.contains_key(key) {
                return Err(BitrixError::new(
                    self.portal(),
                    METHOD,
                    codes::INVALID_PARAMS,
                    format!("sub-command key {key:?} is empty or used twice"),
                    None,
                ));
            }
            let query = form::encode(params);
            let line = if query.is_empty() {
                method.clone()
            } else {
                format!("{method}?{query}")
            };
            cmd.insert(key.clone(), Value::String(line));
        }
        let resp = self
            .call(METHOD, json!({ "cmd": cmd, "halt": u8::from(halt) }))
            .await?;
        let parsed = parse_batch(&resp.result).map_err(|e| self.shape_error(METHOD, e))?;
        // Each sub-command is charged to its own method's operating budget; the portal runs
        // them in the order of their keys (the `cmd` object is written with sorted keys).
        let mut ran: Vec<&(String, String, Value)> = commands.iter().collect();
        ran.sort_by(|a, b| a.0.cmp(&b.0));
        let stamped: Vec<(&str, Option<&types::TimeInfo>)> = ran
            .iter()
            .map(|(key, method, _)| (method.as_str(), parsed.times.get(key)))
            .collect();
        self.record_answer(
            Answered {
                method: METHOD,
                time: &resp.time,
                waited: resp.waited,
            },
            &stamped,
        );
        for (key, method, _) in &ran {
            if let Some((code, _)) = parsed.errors.get(key)
                && code.eq_ignore_ascii_case("OPERATION_TIME_LIMIT")
            {
                self.operating_refused(method, None);
            }
        }
        Ok(parsed)
    }

    /// What the portal last reported of `method`'s operating time (seconds used in the current
    /// 10-minute window, when its oldest minute drops out), what this client's calls may have
    /// added since, what one call may take, and a ban the portal imposed.
    pub fn operating(&self, method: &str) -> MethodTime {
        lock(&self.inner.operating).times.get(method)
    }

    /// The portal's Unix time now, in seconds: its clock as of the last answer plus the
    /// monotonic time since, so that neither a step of this machine's clock nor a skew between
    /// the two clocks moves the operating windows the portal reports. This machine's clock
    /// until the portal has answered.
    pub fn portal_now(&self) -> f64 {
        match lock(&self.inner.operating).portal_clock {
            Some((finish, at)) => finish + at.elapsed().as_secs_f64(),
            None => chrono::Utc::now().timestamp_millis() as f64 / 1000.0,
        }
    }

    /// `event.get`: every handler of the application, online and offline, of every connector.
    /// Sent without `auth_connector` (the server lists all connectors' bindings anyway), so it
    /// also works on plans without `rest_auth_connector`.
    pub async fn event_get(&self) -> Result<Vec<EventHandler>, BitrixError> {
        const METHOD: &str = "event.get";
        let resp = self.call(METHOD, json!({ "auth_connector": null })).await?;
        parse_event_get(&resp.result).map_err(|e| self.shape_error(METHOD, e))
    }

    /// `event.bind` with `event_type=offline` (no handler URL; the configured `auth_connector`
    /// goes along and becomes the binding's `connector_id`). Binding twice is not an error.
    pub async fn event_bind_offline(&self, event: &str) -> Result<BindOutcome, BitrixError> {
        const METHOD: &str = "event.bind";
        let params = json!({ "event": event, "event_type": "offline" });
        match self.call(METHOD, params).await {
            Ok(resp) if resp.result == Value::Bool(false) => {
                Err(self.shape_error(METHOD, format!("event.bind of {event} answered false")))
            }
            Ok(_) => Ok(BindOutcome::Bound),
            // `RestException('Unable to set event handler: Handler already binded', ERROR_CORE)`.
            Err(e)
                if e.is_code("ERROR_CORE")
                    && e.description.to_lowercase().contains("already bind") =>
            {
                Ok(BindOutcome::AlreadyBound)
            }
            Err(e) => Err(e),
        }
    }

    /// `event.unbind` with `event_type=offline`: removes this application's offline binding of
    /// `event` made with the configured `auth_connector` (the server matches the connector of
    /// the request). Returns how many bindings were removed.
    pub async fn event_unbind_offline(&self, event: &str) -> Result<u64, BitrixError> {
        const METHOD: &str = "event.unbind";
        let params = json!({ "event": event, "event_type": "offline" });
        let resp = self.call(METHOD, params).await?;
        parse_unbind_count(&resp.result).map_err(|e| self.shape_error(METHOD, e))
    }

    /// `feature.get` of a plan feature code (`rest_offline_extended`, `rest_auth_connector`).
    pub async fn feature_get(&self, code: &str) -> Result<FeatureValue, BitrixError> {
        const METHOD: &str = "feature.get";
        let resp = self
            .call(METHOD, json!({ "CODE": code, "auth_connector": null }))
            .await?;
        parse_feature_get(&resp.result).map_err(|e| self.shape_error(METHOD, e))
    }

    /// `server.time`: the portal's clock.
    pub async fn server_time(&self) -> Result<chrono::DateTime<chrono::FixedOffset>, BitrixError> {
        const METHOD: &str = "server.time";
        let resp = self.call(METHOD, json!({ "auth_connector": null })).await?;
        parse_server_time(&resp.result).map_err(|e| self.shape_error(METHOD, e))
    }

    /// `user.admin`: whether the token's user is a portal administrator (event methods need one).
    pub async fn user_admin(&self) -> Result<bool, BitrixError> {
        const METHOD: &str = "user.admin";
        let resp = self.call(METHOD, json!({ "auth_connector": null })).await?;
        parse_user_admin(&resp.result).map_err(|e| self.shape_error(METHOD, e))
    }

    /// `app.info`: the application's installation and payment state and the portal's plan.
    pub async fn app_info(&self) -> Result<AppInfo, BitrixError> {
        const METHOD: &str = "app.info";
        let resp = self.call(METHOD, json!({ "auth_connector": null })).await?;
        parse_app_info(&resp.result).map_err(|e| self.shape_error(METHOD, e))
    }

    /// Exchanges an authorization code (from the OAuth redirect, valid for 30 seconds) for a
    /// token pair. The pair is returned, not stored or used: the caller persists it first.
    pub async fn exchange_code(&self, code: &str) -> Result<Tokens, BitrixError> {
        let s = &self.inner.settings;
        oauth::exchange_code(
            &self.inner.http,
            &s.oauth_token_url,
            &s.client_id,
            &s.client_secret,
            code,
            &s.portal,
        )
        .await
    }

    /// An empty `process_id` is dangerous: the server only checks that one was sent, so `""`
    /// addresses every unreserved row (a clear would delete the whole queue). Never send one.
    fn require_process_id(&self, method: &str, process_id: &str) -> Result<(), BitrixError> {
        if process_id.trim().is_empty() {
            return Err(BitrixError::new(
                self.portal(),
                method,
                codes::INVALID_PARAMS,
                "refusing to send an empty process_id (it would address every unreserved event)"
                    .to_string(),
                None,
            ));
        }
        Ok(())
    }

    /// Refreshes the token pair now (and persists it before using it).
    pub async fn refresh_tokens(&self) -> Result<(), BitrixError> {
        self.refresh_single_flight(RefreshTrigger::Forced)
            .await
            .map(|_| ())
    }

    fn prepare_params(
        &self,
        method: &str,
        params: Value,
    ) -> Result<Map<String, Value>, BitrixError> {
        let mut map = match params {
            Value::Null => Map::new(),
            Value::Object(map) => map,
            other => {
                return Err(BitrixError::new(
                    self.portal(),
                    method,
                    codes::INVALID_PARAMS,
                    format!("parameters must be a JSON object, not {other}"),
                    None,
                ));
            }
        };
        map.remove("auth");
        match map.get("auth_connector") {
            Some(Value::Null) => {
                map.remove("auth_connector");
            }
            Some(_) => {}
            None => {
                if let Some(connector) = &self.inner.settings.auth_connector {
                    map.insert(
                        "auth_connector".to_string(),
                        Value::String(connector.clone()),
                    );
                }
            }
        }
        Ok(map)
    }

    /// A successful answer whose `result` has the wrong shape: the call did run.
    fn shape_error(&self, method: &str, what: String) -> BitrixError {
        BitrixError::new(
            self.portal(),
            method,
            codes::INVALID_RESPONSE,
            format!("unexpected result: {what}"),
            Some(200),
        )
        .with_maybe_executed(true)
    }

    fn stat(&self, f: impl FnOnce(&mut ClientStats)) {
        f(&mut lock(&self.inner.stats));
    }

    /// Counts how a request to `method` ended, in the totals and per method.
    fn count_answer(&self, method: &str, answer: Answer) {
        self.stat(|s| {
            let m = s.methods.entry(method.to_string()).or_default();
            let (total, per_method) = match answer {
                Answer::Ok => (&mut s.ok, &mut m.ok),
                Answer::RateLimited503 => (&mut s.rate_limited_503, &mut m.rate_limited_503),
                Answer::Operating429 => (&mut s.operating_429, &mut m.operating_429),
                Answer::Auth => (&mut s.auth_errors, &mut m.auth_errors),
                Answer::Other => (&mut s.other_errors, &mut m.other_errors),
                Answer::Transport => (&mut s.transport_errors, &mut m.transport_errors),
            };
            *total += 1;
            *per_method += 1;
        });
    }

    // ----- tokens -----

    fn no_tokens(&self, method: &str) -> BitrixError {
        let portal = self.portal();
        BitrixError::new(
            portal,
            method,
            codes::NO_TOKENS,
            format!(
                "no OAuth tokens are stored for this portal: run `b24eventd auth import --portal \
                 {portal} --refresh-token T` (or `b24eventd auth login --portal {portal}`)"
            ),
            None,
        )
    }

    /// The access token to send: persists unsaved tokens first, refreshes one that expires soon.
    async fn usable_access_token(&self, method: &str) -> Result<String, BitrixError> {
        let (tokens, unsaved) = {
            let state = lock(&self.inner.tokens);
            (state.tokens.clone(), state.unsaved)
        };
        let Some(tokens) = tokens else {
            return Err(self.no_tokens(method));
        };
        if unsaved {
            self.persist_unsaved().await?;
        }
        let margin = chrono::Duration::seconds(EXPIRY_MARGIN_SECS);
        if tokens.expires_within(margin, chrono::Utc::now())
            && let Err(err) = self.refresh_single_flight(RefreshTrigger::Expiring).await
        {
            let still_valid = !tokens.access_token.is_empty()
                && tokens.expires_at.is_some_and(|at| at > chrono::Utc::now());
            if err.is_retryable() && !err.is_code(codes::JOURNAL_WRITE_FAILED) && still_valid {
                tracing::warn!(
                    portal = self.portal(),
                    method,
                    error = %err,
                    "refreshing the expiring access token failed; using it while it lasts"
                );
            } else {
                return Err(err);
            }
        }
        let state = lock(&self.inner.tokens);
        match &state.tokens {
            Some(t) => Ok(t.access_token.clone()),
            None => Err(self.no_tokens(method)),
        }
    }

    /// Refreshes unless a caller that held the lock before already did what `trigger` needs.
    /// Returns whether new tokens are in place (false: a rejection refresh was suppressed).
    async fn refresh_single_flight(
        &self,
        trigger: RefreshTrigger<'_>,
    ) -> Result<bool, BitrixError> {
        let _guard = self.inner.refresh_lock.lock().await;
        let current = {
            let state = lock(&self.inner.tokens);
            match &trigger {
                RefreshTrigger::Expiring => match &state.tokens {
                    Some(t)
                        if !t.expires_within(
                            chrono::Duration::seconds(EXPIRY_MARGIN_SECS),
                            chrono::Utc::now(),
                        ) =>
                    {
                        return Ok(true);
                    }
                    _ => {}
                },
                RefreshTrigger::Rejected(stale) => {
                    if let Some(t) = &state.tokens
                        && t.access_token != *stale
                    {
                        return Ok(true);
                    }
                    if state
                        .last_rejection_refresh
                        .is_some_and(|at| at.elapsed() < MIN_REJECTION_REFRESH_INTERVAL)
                    {
                        tracing::warn!(
                            portal = self.portal(),
                            "the portal refused an access token refreshed moments ago; not refreshing again"
                        );
                        return Ok(false);
                    }
                }
                RefreshTrigger::Forced => {}
            }
            state.tokens.clone()
        };
        let Some(current) = current else {
            return Err(self.no_tokens(oauth::REFRESH_METHOD));
        };
        if current.refresh_token.is_empty() {
            return Err(self.no_tokens(oauth::REFRESH_METHOD));
        }
        let settings = &self.inner.settings;
        let refreshed = oauth::refresh(
            &self.inner.http,
            &settings.oauth_token_url,
            &settings.client_id,
            &settings.client_secret,
            &current.refresh_token,
            &settings.portal,
        )
        .await;
        let mut fresh = match refreshed {
            Ok(fresh) => fresh,
            Err(e) if e.is_code("invalid_grant") => {
                return self.adopt_stored_pair(&current).await.map_err(|()| e);
            }
            Err(e) => return Err(e),
        };
        self.stat(|s| s.token_refreshes += 1);
        // Keep what the answer left out (an older server may not repeat member_id or scope).
        fresh.member_id = fresh.member_id.or(current.member_id);
        fresh.scope = fresh.scope.or(current.scope);
        fresh.user_id = fresh.user_id.or(current.user_id);
        fresh.client_endpoint = fresh.client_endpoint.or(current.client_endpoint);
        if let Some(named) = &fresh.client_endpoint {
            let using = self.client_endpoint();
            if normalize_endpoint(named).ok().as_deref() != Some(using.as_str()) {
                tracing::info!(
                    portal = self.portal(),
                    token_endpoint = %named,
                    client_endpoint = %using,
                    "the token answer names another client_endpoint; calls keep going to the configured one"
                );
            }
        }
        let saved = self.inner.store.save(self.portal(), &fresh).await;
        {
            // Swap even when the save failed: the old refresh token is already dead upstream.
            let mut state = lock(&self.inner.tokens);
            state.tokens = Some(fresh.clone());
            state.unsaved = saved.is_err();
            if matches!(trigger, RefreshTrigger::Rejected(_)) {
                state.last_rejection_refresh = Some(Instant::now());
            }
        }
        match saved {
            Ok(()) => {
                tracing::info!(
                    portal = self.portal(),
                    expires_at = ?fresh.expires_at,
                    "access token refreshed and the new pair persisted"
                );
                Ok(true)
            }
            Err(e) => {
                tracing::error!(
                    portal = self.portal(),
                    error = %format!("{e:#}"),
                    "the refreshed token pair could not be persisted; the old refresh token is no \
                     longer valid, so a restart before the journal accepts the new pair needs \
                     `b24eventd auth import`"
                );
                Err(self.journal_failed(&e))
            }
        }
    }

    /// After `invalid_grant`: the refresh token may have been rotated by another process (a
    /// `doctor` or `auth login` beside the daemon) that stored the new pair. If the store holds
    /// another pair than the one refused, use it (`Ok(true)`); otherwise `Err(())`, and the
    /// refusal stands.
    async fn adopt_stored_pair(&self, refused: &Tokens) -> Result<bool, ()> {
        let stored = match self.inner.store.load(self.portal()).await {
            Ok(Some(stored)) => stored,
            Ok(None) => return Err(()),
            Err(e) => {
                tracing::warn!(
                    portal = self.portal(),
                    error = %format!("{e:#}"),
                    "the refresh token was refused and the stored pair could not be read"
                );
                return Err(());
            }
        };
        if stored.refresh_token.is_empty() || stored.refresh_token == refused.refresh_token {
            return Err(());
        }
        tracing::warn!(
            portal = self.portal(),
            "the refresh token was refused, but another process stored a newer pair: using that"
        );
        stored.register_secrets(self.portal());
        let mut state = lock(&self.inner.tokens);
        state.tokens = Some(stored);
        state.unsaved = false;
        Ok(true)
    }

    /// Retries persisting tokens whose save failed after a refresh.
    async fn persist_unsaved(&self) -> Result<(), BitrixError> {
        let _guard = self.inner.refresh_lock.lock().await;
        let tokens = {
            let state = lock(&self.inner.tokens);
            if !state.unsaved {
                return Ok(());
            }
            state.tokens.clone()
        };
        let Some(tokens) = tokens else {
            return Ok(());
        };
        match self.inner.store.save(self.portal(), &tokens).await {
            Ok(()) => {
                let mut state = lock(&self.inner.tokens);
                if state.tokens.as_ref() == Some(&tokens) {
                    state.unsaved = false;
                }
                drop(state);
                tracing::info!(
                    portal = self.portal(),
                    "the refreshed token pair is persisted now"
                );
                Ok(())
            }
            Err(e) => {
                tracing::error!(
                    portal = self.portal(),
                    error = %format!("{e:#}"),
                    "the refreshed token pair still could not be persisted"
                );
                Err(self.journal_failed(&e))
            }
        }
    }

    fn journal_failed(&self, e: &anyhow::Error) -> BitrixError {
        let secrets = self.secrets();
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        BitrixError::new(
            self.portal(),
            oauth::REFRESH_METHOD,
            codes::JOURNAL_WRITE_FAILED,
            format!(
                "the new refresh token could not be persisted: {}",
                sanitize_snippet(&format!("{e:#}"), &secrets, 300)
            ),
            None,
        )
    }

    /// Strings that must never appear in an error or log line.
    fn secrets(&self) -> Vec<String> {
        let mut out = vec![self.inner.settings.client_secret.clone()];
        if let Some(t) = &lock(&self.inner.tokens).tokens {
            out.push(t.access_token.clone());
            out.push(t.refresh_token.clone());
        }
        out
    }

    // ----- limits -----

    async fn acquire_slot(&self, method: &str) {
        let mut waited = Duration::ZERO;
        loop {
            let slot = lock(&self.inner.bucket).try_acquire(Instant::now());
            match slot {
                Ok(()) => break,
                Err(wait) => {
                    tokio::time::sleep(wait).await;
                    waited += wait;
                }
            }
        }
        if !waited.is_zero() {
            self.stat(|s| s.rate_wait_seconds += waited.as_secs_f64());
            tracing::debug!(
                portal = self.portal(),
                method,
                wait_seconds = waited.as_secs_f64(),
                "waited for the client-side rate limit"
            );
        }
    }

    async fn wait_for_limit(&self, method: &str, code: &str, wait: Duration) {
        tracing::info!(
            portal = self.portal(),
            method,
            code,
            wait_seconds = wait.as_secs_f64(),
            "the portal's limit was hit; waiting before retrying"
        );
        self.stat(|s| s.rate_wait_seconds += wait.as_secs_f64());
        tokio::time::sleep(wait).await;
    }

    /// How long to wait after a 429 on `method`: the answer's own hint, else until the ban the
    /// portal imposed ends (a method that passes its limit is refused for
    /// [`operating::BAN`]), at most [`MAX_OPERATING_WAIT`].
    pub fn operating_wait(&self, method: &str, hint: Option<Duration>) -> Duration {
        if let Some(hint) = hint.filter(|h| !h.is_zero()) {
            return hint.min(MAX_OPERATING_WAIT);
        }
        let now = self.portal_now();
        let until = lock(&self.inner.operating)
            .times
            .get(method)
            .banned(now)
            .unwrap_or(now + operating::BAN.as_secs_f64());
        Duration::try_from_secs_f64(until - now + 0.5)
            .unwrap_or(MAX_OPERATING_WAIT)
            .min(MAX_OPERATING_WAIT)
    }

    /// The portal refused `method` with 429 `OPERATION_TIME_LIMIT`: it is banned (for the
    /// answer's hint, else [`operating::BAN`]) and its stored time is gone. The request economy
    /// exists to keep every method under its limit, so this is logged as the defect it is.
    fn operating_refused(&self, method: &str, hint: Option<Duration>) {
        let now = self.portal_now();
        let ban = hint.filter(|h| !h.is_zero()).unwrap_or(operating::BAN);
        let before = {
            let mut op = lock(&self.inner.operating);
            let before = op.times.get(method);
            op.times.refused(method, now, ban);
            before
        };
        if before.banned(now).is_none() {
            tracing::error!(
                portal = self.portal(),
                method,
                ban_seconds = ban.as_secs_f64(),
                operating_reported = ?before.reported,
                operating_unreported = before.unreported,
                call_seconds = ?before.call,
                "the portal banned a method for passing its operating-time limit (429 OPERATION_TIME_LIMIT); the request economy plans to use 90% of rate_limit.operating_budget: if the portal's plan allows less, lower that setting; otherwise this is a defect, please report it with this log line"
            );
        }
    }

    /// Records a successful answer's `time` stamps (a single call, or a `batch` with its
    /// sub-commands in the order they ran) and publishes each method's figure to the stats.
    fn record_answer(&self, answer: Answered<'_>, commands: &operating::Commands<'_>) {
        let reported: Vec<(String, Option<f64>)> = {
            let mut op = lock(&self.inner.operating);
            op.times.record(answer, commands);
            std::iter::once(answer.method)
                .chain(commands.iter().map(|(m, _)| *m))
                .map(|m| (m.to_string(), op.times.get(m).reported))
                .collect()
        };
        tracing::trace!(
            portal = self.portal(),
            method = answer.method,
            ?reported,
            "operating time"
        );
        self.stat(|s| {
            for (method, seconds) in reported {
                if let Some(seconds) = seconds {
                    s.methods.entry(method).or_default().operating_seconds = Some(seconds);
                }
            }
        });
    }

    // ----- HTTP -----

    /// One logical request: bucket slot, POST, redirects, classification of the answer.
    async fn post(
        &self,
        method: &str,
        body: Vec<u8>,
        access: &str,
    ) -> Result<ApiResponse, BitrixError> {
        let portal = self.portal();
        for _hop in 0..=MAX_REDIRECTS {
            let url = format!("{}{method}", self.client_endpoint());
            self.acquire_slot(method).await;
            self.stat(|s| s.requests += 1);
            let started = Instant::now();
            let sent = self
                .inner
                .http
                .post(&url)
                .timeout(self.inner.settings.request_timeout)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(reqwest::header::ACCEPT, "application/json")
                .body(body.clone())
                .send()
                .await;
            let response = match sent {
                Ok(r) => r,
                Err(e) => {
                    self.count_answer(method, Answer::Transport);
                    let err = BitrixError::transport(portal, method, &e);
                    tracing::debug!(portal, method, error = %err, "request failed");
                    return Err(err);
                }
            };
            let status = response.status().as_u16();
            if matches!(status, 301 | 302 | 303 | 307 | 308) {
                let location = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                match location {
                    Some(location) => {
                        self.follow_redirect(method, &url, &location, status)?;
                        continue;
                    }
                    None => {
                        self.count_answer(method, Answer::Other);
                        return Err(BitrixError::new(
                            portal,
                            method,
                            codes::INVALID_RESPONSE,
                            format!("http {status}: a redirect without a Location header"),
                            Some(status),
                        ));
                    }
                }
            }
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let bytes = match read_body(response, MAX_BODY).await {
                Ok(b) => b,
                Err(BodyError::TooLarge) => {
                    self.count_answer(method, Answer::Other);
                    return Err(BitrixError::new(
                        portal,
                        method,
                        codes::INVALID_RESPONSE,
                        format!("http {status}: the body exceeds {MAX_BODY} bytes"),
                        Some(status),
                    )
                    .with_maybe_executed(true));
                }
                Err(BodyError::Transport(e)) => {
                    self.count_answer(method, Answer::Transport);
                    let mut err = BitrixError::transport(portal, method, &e);
                    if !e.is_timeout() {
                        err.code = codes::INVALID_RESPONSE.to_string();
                        err.class = super::error::classify(codes::INVALID_RESPONSE, Some(status));
                        err.description =
                            format!("http {status}: the body was cut off ({})", err.description);
                        err.status = Some(status);
                    }
                    return Err(err.with_maybe_executed(true));
                }
            };
            let result = self.interpret(
                method,
                status,
                &bytes,
                retry_after,
                access,
                started.elapsed(),
            );
            match &result {
                Ok(_) => tracing::debug!(
                    portal,
                    method,
                    status,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "call succeeded"
                ),
                Err(err) => tracing::debug!(
                    portal,
                    method,
                    status,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    error = %err,
                    "call failed"
                ),
            }
            return result;
        }
        self.count_answer(method, Answer::Other);
        Err(BitrixError::new(
            portal,
            method,
            codes::TOO_MANY_REDIRECTS,
            format!("more than {MAX_REDIRECTS} redirects; check client_endpoint"),
            None,
        ))
    }

    /// The portal moved its REST endpoint on the same host: derive the new `client_endpoint`
    /// from `Location` and switch to it. A redirect to another host is refused, not followed:
    /// every later call would carry the access token there. Bitrix24 answers a renamed portal's
    /// old address with a 301/302 to the new one (b24restdocs
    /// `settings/how-to-call-rest-api/change-domen.md`), so the refusal logs the endpoint the
    /// redirect points at for the operator to check and set as `client_endpoint`.
    fn follow_redirect(
        &self,
        method: &str,
        url: &str,
        location: &str,
        status: u16,
    ) -> Result<(), BitrixError> {
        let refuse = |what: String| {
            self.count_answer(method, Answer::Other);
            BitrixError::new(
                self.portal(),
                method,
                codes::REDIRECT_REFUSED,
                format!("http {status}: {what}"),
                Some(status),
            )
        };
        let base = reqwest::Url::parse(url).map_err(|e| refuse(format!("bad request URL: {e}")))?;
        let mut target = base.join(location).map_err(|_| {
            refuse(format!(
                "unusable Location {}",
                sanitize_snippet(location, &[], 200)
            ))
        })?;
        if !matches!(target.scheme(), "http" | "https") {
            return Err(refuse(format!(
                "redirect to a {} URL refused",
                target.scheme()
            )));
        }
        if base.scheme() == "https" && target.scheme() == "http" {
            return Err(refuse(format!(
                "redirect from https to plain http ({}) refused",
                target.host_str().unwrap_or("")
            )));
        }
        target.set_query(None);
        target.set_fragment(None);
        let _ = target.set_username("");
        let _ = target.set_password(None);
        // Only a move of the REST endpoint itself is followed (…/rest/METHOD[.json], or …/rest/);
        // anything else (a login or landing page) must not become the endpoint of later calls.
        let path = target.path().to_string();
        let dir = [format!("/{method}"), format!("/{method}.json")]
            .iter()
            .find_map(|suffix| path.strip_suffix(suffix.as_str()))
            .map(|d| format!("{d}/"))
            .or_else(|| path.ends_with("/rest/").then(|| path.clone()));
        let Some(dir) = dir else {
            return Err(refuse(format!(
                "redirect to {}{} is not a REST endpoint; check client_endpoint",
                target.host_str().unwrap_or(""),
                sanitize_snippet(&path, &[], 200)
            )));
        };
        target.set_path(&dir);
        let new_endpoint = sanitize_snippet(target.as_str(), &[], 300);
        if !self.on_configured_host(&target) {
            let host = match target.port() {
                Some(port) => format!("{}:{port}", target.host_str().unwrap_or("")),
                None => target.host_str().unwrap_or("").to_string(),
            };
            tracing::error!(
                portal = self.portal(),
                method,
                status,
                client_endpoint = %self.inner.settings.client_endpoint,
                new_client_endpoint = %new_endpoint,
                "the portal redirected to another host; refused (no request and no token goes \
                 there). If the portal's address was changed, check the new address, set \
                 client_endpoint to it in the config and restart"
            );
            return Err(refuse(format!(
                "redirect to another host ({host}) refused; if the portal's address was changed, \
                 set client_endpoint = \"{new_endpoint}\" in the config and restart"
            )));
        }
        let old_endpoint = {
            let mut endpoint = lock(&self.inner.endpoint);
            std::mem::replace(&mut *endpoint, target.to_string())
        };
        tracing::warn!(
            portal = self.portal(),
            method,
            status,
            old_endpoint = %old_endpoint,
            new_endpoint = %new_endpoint,
            "the portal redirected to a new address on its host; using it from now on (update client_endpoint in the config)"
        );
        Ok(())
    }

    /// Whether `target` is on the configured `client_endpoint`'s host: the same host name and
    /// port, or the same host name moved from http to https on the default ports.
    fn on_configured_host(&self, target: &reqwest::Url) -> bool {
        let Ok(configured) = reqwest::Url::parse(self.inner.settings.client_endpoint.trim()) else {
            return false;
        };
        let same_name = match (configured.host_str(), target.host_str()) {
            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
            _ => false,
        };
        let same_port = configured.port_or_known_default() == target.port_or_known_default()
            || (configured.scheme() == "http"
                && configured.port().is_none()
                && target.scheme() == "https"
                && target.port().is_none());
        same_name && same_port
    }

    /// Classifies a complete HTTP answer and updates the counters.
    fn interpret(
        &self,
        method: &str,
        status: u16,
        bytes: &[u8],
        retry_after: Option<Duration>,
        access: &str,
        waited: Duration,
    ) -> Result<ApiResponse, BitrixError> {
        let portal = self.portal();
        let secrets = [self.inner.settings.client_secret.as_str(), access];
        let invalid = |what: String| invalid_response(portal, method, status, what);
        let parsed = match std::str::from_utf8(bytes) {
            Ok(text) => crate::json_depth::from_str(text),
            Err(e) => {
                // PHP's json_encode never writes invalid UTF-8, but a proxy or a broken module
                // might: refusing the answer would refuse it forever (the same rows come back),
                // so the bad bytes become U+FFFD and the events go through, with a warning.
                tracing::warn!(
                    portal,
                    method,
                    at_byte = e.valid_up_to(),
                    "the portal's answer is not valid UTF-8; invalid bytes were replaced by U+FFFD"
                );
                crate::json_depth::from_str(&String::from_utf8_lossy(bytes))
            }
        };
        let json: Value = match parsed {
            Ok(v) => v,
            Err(e) => {
                self.count_answer(method, Answer::Other);
                let what = format!("{} ({e})", describe_unparsable(bytes, &secrets, true));
                if (200..300).contains(&status) {
                    // The portal ran the call and its answer is lost to us: what a get reserved
                    // stays reserved upstream (the orphan sweep adopts it once the portal
                    // answers readably), so the portal goes on; the operator must hear of it.
                    self.stat(|s| s.unparsable += 1);
                    tracing::error!(
                        portal,
                        method,
                        status,
                        bytes = bytes.len(),
                        error = %what,
                        "the portal's answer cannot be parsed; events it reserved stay reserved upstream for the orphan sweep"
                    );
                }
                return Err(invalid(what));
            }
        };
        if let Some((code, description)) = parse_error(&json) {
            let description = sanitize_snippet(&description, &secrets, 500);
            let mut err = BitrixError::from_api(portal, method, &code, &description, Some(status));
            let mut hint = retry_after;
            if err.is_code("OPERATION_TIME_LIMIT") {
                // The current server sends no `time` with an error; should one come, its reset
                // time is the ban's end.
                let time = json.get("time").map(parse_time).unwrap_or_default();
                // A reset time further away than the limiter's window is no real one: the
                // `Retry-After` hint, else the ban's length, stands.
                if let Some(at) = time.operating_reset_at {
                    let now = time.finish.unwrap_or_else(|| self.portal_now());
                    if let Ok(wait) = Duration::try_from_secs_f64(at as f64 - now + 0.5)
                        && wait <= MAX_OPERATING_WAIT
                    {
                        hint = Some(wait);
                    }
                }
            }
            err.retry_after = hint;
            let answer = if err.is_code("QUERY_LIMIT_EXCEEDED") {
                Answer::RateLimited503
            } else if err.is_code("OPERATION_TIME_LIMIT") {
                Answer::Operating429
            } else if err.class == ErrorClass::Auth {
                Answer::Auth
            } else {
                Answer::Other
            };
            self.count_answer(method, answer);
            return Err(err);
        }
        if !(200..300).contains(&status) {
            self.count_answer(method, Answer::Other);
            return Err(invalid(format!(
                "no error code in the answer: {}",
                sanitize_snippet(&json.to_string(), &secrets, 120)
            )));
        }
        match ApiResponse::from_body(&json) {
            Ok(mut resp) => {
                self.count_answer(method, Answer::Ok);
                resp.waited = waited.as_secs_f64();
                if let Some(finish) = resp.time.finish.filter(|f| f.is_finite()) {
                    lock(&self.inner.operating).portal_clock = Some((finish, Instant::now()));
                }
                // A batch is recorded with its sub-commands, once they are parsed.
                if method != "batch" {
                    self.record_answer(
                        Answered {
                            method,
                            time: &resp.time,
                            waited: resp.waited,
                        },
                        &[],
                    );
                }
                Ok(resp)
            }
            Err(what) => {
                self.count_answer(method, Answer::Other);
                Err(invalid(what))
            }
        }
    }
}

/// Checks an endpoint URL and gives it exactly one trailing `/`.
fn normalize_endpoint(endpoint: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(endpoint.trim()).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("scheme {} is not http or https", url.scheme()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("no host".to_string());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("a query or fragment is not allowed".to_string());
    }
    let mut s = url.to_string();
    if !s.ends_with('/') {
        s.push('/');
    }
    Ok(s)
}

/// Exponential backoff with jitter (±25 %) for repeated 503s: ~1 s, 2 s, 4 s, … up to 60 s.
fn limit_backoff(attempt: u32) -> Duration {
    let base = LIMIT_BACKOFF_START
        .saturating_mul(1u32 << attempt.min(10))
        .min(LIMIT_BACKOFF_CAP);
    base.mul_f64(0.75 + fastrand::f64() * 0.5)
}

/// Why a body could not be read.
pub(crate) enum BodyError {
    Transport(reqwest::Error),
    TooLarge,
}

/// Reads a response body, refusing more than `cap` bytes.
pub(crate) async fn read_body(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, BodyError> {
    if response
        .content_length()
        .is_some_and(|len| len > cap as u64)
    {
        return Err(BodyError::TooLarge);
    }
    let mut buf = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(BodyError::Transport)? {
        if buf.len() + chunk.len() > cap {
            return Err(BodyError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Bytes;
    use axum::extract::State;
    use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
    use axum::response::{IntoResponse, Response};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// One request the test server saw.
    #[derive(Debug, Clone)]
    struct Seen {
        method: String,
        path: String,
        query: Value,
        headers: HeaderMap,
        body: Value,
    }

    struct Reply {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    }

    fn ok(result: Value) -> Reply {
        json_reply(200, json!({ "result": result, "time": { "operating": 0 } }))
    }

    fn json_reply(status: u16, body: Value) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: body.to_string(),
        }
    }

    fn api_error(status: u16, code: &str, description: &str) -> Reply {
        json_reply(
            status,
            json!({ "error": code, "error_description": description }),
        )
    }

    fn token_reply(access: &str, refresh: &str) -> Reply {
        json_reply(
            200,
            json!({
                "access_token": access, "refresh_token": refresh, "expires_in": 3600,
                "member_id": "m1", "scope": "crm", "user_id": 1,
                "client_endpoint": "https://portal.bitrix24.com/rest/"
            }),
        )
    }

    type Script = dyn Fn(&Seen, usize) -> Reply + Send + Sync;

    #[derive(Clone)]
    struct Server {
        log: Arc<Mutex<Vec<String>>>,
        seen: Arc<Mutex<Vec<Seen>>>,
        script: Arc<Script>,
        count: Arc<AtomicUsize>,
    }

    async fn handle(
        State(srv): State<Server>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let seen = Seen {
            method: method.to_string(),
            path: uri.path().to_string(),
            query: form::decode(uri.query().unwrap_or("")),
            headers,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        };
        let entry = if seen.path.starts_with("/oauth/") {
            format!(
                "refresh {}",
                seen.query["refresh_token"].as_str().unwrap_or("")
            )
        } else {
            format!(
                "call {} auth={}",
                seen.path,
                seen.body["auth"].as_str().unwrap_or("")
            )
        };
        lock(&srv.log).push(entry);
        lock(&srv.seen).push(seen.clone());
        let n = srv.count.fetch_add(1, Ordering::SeqCst);
        let reply = (srv.script)(&seen, n);
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        for (k, v) in reply.headers {
            headers.insert(
                HeaderName::from_static(k),
                HeaderValue::from_str(&v).unwrap(),
            );
        }
        (
            StatusCode::from_u16(reply.status).unwrap(),
            headers,
            reply.body,
        )
            .into_response()
    }

    async fn serve(
        script: impl Fn(&Seen, usize) -> Reply + Send + Sync + 'static,
    ) -> (String, Server) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let srv = Server {
            log: Arc::new(Mutex::new(Vec::new())),
            seen: Arc::new(Mutex::new(Vec::new())),
            script: Arc::new(script),
            count: Arc::new(AtomicUsize::new(0)),
        };
        let app = axum::Router::new().fallback(handle).with_state(srv.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (base, srv)
    }

    struct TestStore {
        log: Arc<Mutex<Vec<String>>>,
        fail: AtomicBool,
    }

    impl TokenStore for TestStore {
        fn save<'a>(
            &'a self,
            portal: &'a str,
            tokens: &'a Tokens,
        ) -> crate::BoxFuture<'a, anyhow::Result<()>> {
            Box::pin(async move {
                assert_eq!(portal, "main");
                lock(&self.log).push(format!("save {}", tokens.access_token));
                if self.fail.load(Ordering::SeqCst) {
                    anyhow::bail!("journal write failed: disk I/O error");
                }
                Ok(())
            })
        }
    }

    fn settings(base: &str) -> ClientSettings {
        ClientSettings {
            portal: "main".into(),
            client_endpoint: format!("{base}/rest/"),
            oauth_token_url: format!("{base}/oauth/token/"),
            client_id: "local.app.1".into(),
            client_secret: "s3cr3t-client-secret".into(),
            auth_connector: None,
            burst: 50,
            per_second: 50.0,
            request_timeout: Duration::from_secs(5),
            max_limit_wait: Duration::from_secs(30),
        }
    }

    fn tokens(access: &str, refresh: &str, expires_in: i64) -> Tokens {
        Tokens {
            access_token: access.into(),
            refresh_token: refresh.into(),
            expires_at: Some(chrono::Utc::now() + chrono::Duration::seconds(expires_in)),
            member_id: Some("m1".into()),
            scope: Some("crm".into()),
            client_endpoint: None,
            user_id: Some(1),
        }
    }

    fn client_with(
        settings: ClientSettings,
        tokens: Option<Tokens>,
        srv: &Server,
    ) -> (PortalClient, Arc<TestStore>) {
        let store = Arc::new(TestStore {
            log: srv.log.clone(),
            fail: AtomicBool::new(false),
        });
        let client = PortalClient::new(settings, tokens, store.clone()).unwrap();
        (client, store)
    }

    fn log(srv: &Server) -> Vec<String> {
        lock(&srv.log).clone()
    }

    #[tokio::test]
    async fn retries_after_503_then_succeeds() {
        let (base, srv) = serve(|_, n| {
            if n == 0 {
                api_error(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
            } else {
                ok(json!(true))
            }
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let started = Instant::now();
        let resp = client
            .call("event.offline.clear", json!({"process_id": "p"}))
            .await
            .unwrap();
        assert_eq!(resp.result, json!(true));
        assert!(
            started.elapsed() >= Duration::from_millis(700),
            "{:?}",
            started.elapsed()
        );
        let stats = client.stats();
        assert_eq!(
            (stats.requests, stats.ok, stats.rate_limited_503),
            (2, 1, 1)
        );
        assert!(stats.rate_wait_seconds >= 0.7);
    }

    #[tokio::test]
    async fn counts_answers_and_operating_time_per_method() {
        let (base, srv) = serve(|_, n| match n {
            0 => json_reply(200, json!({"result": [], "time": {"operating": 1.25}})),
            1 => api_error(503, "QUERY_LIMIT_EXCEEDED", "Too many requests"),
            2 => json_reply(200, json!({"result": true, "time": {"operating": 0.5}})),
            _ => api_error(400, "ERROR_ARGUMENT", "bad argument"),
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        client.call("event.offline.get", json!({})).await.unwrap();
        client
            .call("event.offline.clear", json!({"process_id": "p"}))
            .await
            .unwrap();
        client
            .call("event.offline.error", json!({"process_id": "p"}))
            .await
            .unwrap_err();
        let stats = client.stats();
        assert_eq!(
            (
                stats.requests,
                stats.ok,
                stats.rate_limited_503,
                stats.other_errors
            ),
            (4, 2, 1, 1)
        );
        let get = &stats.methods["event.offline.get"];
        assert_eq!((get.ok, get.operating_seconds), (1, Some(1.25)));
        let clear = &stats.methods["event.offline.clear"];
        assert_eq!(
            (clear.ok, clear.rate_limited_503, clear.operating_seconds),
            (1, 1, Some(0.5))
        );
        let error = &stats.methods["event.offline.error"];
        assert_eq!(
            (error.ok, error.other_errors, error.operating_seconds),
            (0, 1, None)
        );
        assert_eq!(stats.methods.len(), 3);
    }

    #[tokio::test]
    async fn gives_up_on_limits_after_max_limit_wait() {
        let (base, srv) =
            serve(|_, _| api_error(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")).await;
        let mut s = settings(&base);
        s.max_limit_wait = Duration::ZERO;
        let (client, _) = client_with(s, Some(tokens("a1", "r1", 3600)), &srv);
        let err = client
            .call("event.offline.get", json!({}))
            .await
            .unwrap_err();
        assert_eq!(err.class, ErrorClass::Retryable);
        assert_eq!(err.code, "QUERY_LIMIT_EXCEEDED");
        assert!(!err.maybe_executed);
        assert!(err.retry_after.is_some());
        assert_eq!(err.status, Some(503));
        assert_eq!(
            err.to_string(),
            "portal main: event.offline.get failed: QUERY_LIMIT_EXCEEDED (too many requests)"
        );
        assert_eq!(client.stats().requests, 1);
    }

    /// A first answer with `time`, then a 429: how long the client waited before repeating.
    /// A first call answered with `first_time`, then a 429 carrying `ban_time` (the current
    /// server sends none), then success: how long the second call took.
    async fn wait_after_429(first_time: Value, ban_time: Value) -> (PortalClient, Duration) {
        let (base, srv) = serve(move |_, n| match n {
            0 => json_reply(200, json!({"result": true, "time": first_time.clone()})),
            1 => json_reply(
                429,
                json!({
                    "error": "OPERATION_TIME_LIMIT",
                    "error_description": "Method is blocked due to operation time limit.",
                    "time": ban_time.clone(),
                }),
            ),
            _ => ok(json!(true)),
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        client.call("crm.deal.get", json!({"id": 1})).await.unwrap();
        let started = Instant::now();
        client.call("crm.deal.get", json!({"id": 2})).await.unwrap();
        (client, started.elapsed())
    }

    #[tokio::test]
    async fn a_429_that_says_when_the_ban_ends_is_waited_out() {
        let now = chrono::Utc::now().timestamp();
        let (client, waited) = wait_after_429(
            json!({"operating": 3.5, "operating_reset_at": now + 500}),
            json!({"operating_reset_at": now + 2}),
        )
        .await;
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        assert_eq!(client.stats().operating_429, 1);
        // Answered again: the ban is over, and the portal forgot the method's time.
        assert_eq!(client.operating("crm.deal.get").banned_until, None);
    }

    #[tokio::test]
    async fn operating_windows_are_read_on_the_portals_clock_not_this_machines() {
        // The portal's clock is an hour behind ours (or ours was set ahead an hour): its ban
        // ends 2 s after its own `finish`. By our clock the end is an hour past: waiting the
        // whole ban would be wrong, and so would waiting an hour had the clocks differed the
        // other way.
        let portal_finish = chrono::Utc::now().timestamp() as f64 - 3600.0;
        let (client, waited) = wait_after_429(
            json!({"finish": portal_finish, "operating": 3.5}),
            json!({"operating_reset_at": portal_finish as i64 + 2}),
        )
        .await;
        assert!(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
            "{waited:?}"
        );
        let portal_now = client.portal_now();
        assert!(
            (portal_now - portal_finish).abs() < 10.0,
            "{portal_now} against {portal_finish}"
        );
    }

    #[tokio::test]
    async fn a_429_bans_the_method_for_five_minutes_and_is_returned_past_max_wait() {
        let (base, srv) =
            serve(|_, _| api_error(429, "OPERATION_TIME_LIMIT", "Method is blocked")).await;
        let mut s = settings(&base);
        s.max_limit_wait = Duration::from_secs(5);
        let (client, _) = client_with(s, Some(tokens("a1", "r1", 3600)), &srv);
        let err = client.call("crm.deal.get", json!({})).await.unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Retryable, "OPERATION_TIME_LIMIT")
        );
        // LoadLimiter::BAN_DURATION: the current server bans the method for 300 s.
        let wait = err.retry_after.unwrap();
        assert!(
            wait > Duration::from_secs(299) && wait <= Duration::from_secs(301),
            "{wait:?}"
        );
        let now = client.portal_now();
        let banned = client.operating("crm.deal.get").banned(now).unwrap();
        assert!((banned - now - 300.0).abs() < 2.0);
        assert_eq!(client.stats().requests, 1);
    }

    #[tokio::test]
    async fn expired_token_is_refreshed_saved_then_the_call_repeated() {
        let (base, srv) = serve(|seen, _| {
            if seen.path == "/oauth/token/" {
                assert_eq!(seen.method, "GET");
                assert_eq!(seen.query["grant_type"], "refresh_token");
                assert_eq!(seen.query["client_id"], "local.app.1");
                assert_eq!(seen.query["client_secret"], "s3cr3t-client-secret");
                return token_reply("a2", "r2");
            }
            match seen.body["auth"].as_str() {
                Some("a2") => ok(json!({"process_id": null, "events": []})),
                _ => api_error(
                    401,
                    "expired_token",
                    "The access token provided has expired.",
                ),
            }
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let batch = client
            .offline_get(&GetRequest {
                limit: 50,
                clear: false,
                process_id: None,
                error_lane: false,
            })
            .await
            .unwrap();
        assert!(batch.events.is_empty());
        assert_eq!(
            log(&srv),
            vec![
                "call /rest/event.offline.get auth=a1",
                "refresh r1",
                "save a2",
                "call /rest/event.offline.get auth=a2",
            ]
        );
        let stats = client.stats();
        assert_eq!(
            (stats.token_refreshes, stats.auth_errors, stats.ok),
            (1, 1, 1)
        );
    }

    #[tokio::test]
    async fn failed_token_save_is_retryable_and_keeps_the_new_tokens() {
        let (base, srv) = serve(|seen, _| {
            if seen.path == "/oauth/token/" {
                return token_reply("a2", "r2");
            }
            match seen.body["auth"].as_str() {
                Some("a2") => ok(json!(true)),
                _ => api_error(
                    401,
                    "expired_token",
                    "The access token provided has expired.",
                ),
            }
        })
        .await;
        let (client, store) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        store.fail.store(true, Ordering::SeqCst);
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Retryable, "JOURNAL_WRITE_FAILED")
        );
        assert!(err.to_string().contains("could not be persisted"), "{err}");
        // Still failing: nothing is sent with the unpersisted tokens.
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(err.code, "JOURNAL_WRITE_FAILED");
        store.fail.store(false, Ordering::SeqCst);
        client.call("app.info", json!({})).await.unwrap();
        assert_eq!(
            log(&srv),
            vec![
                "call /rest/app.info auth=a1",
                "refresh r1",
                "save a2",
                "save a2",
                "save a2",
                "call /rest/app.info auth=a2",
            ]
        );
        assert_eq!(client.stats().token_refreshes, 1);
    }

    #[tokio::test]
    async fn a_second_auth_failure_is_returned() {
        let (base, srv) = serve(|seen, _| {
            if seen.path == "/oauth/token/" {
                return token_reply("a2", "r2");
            }
            api_error(401, "invalid_token", "")
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Auth, "invalid_token")
        );
        assert!(!err.maybe_executed);
        assert_eq!(log(&srv).len(), 4, "{:?}", log(&srv));
        // A refused fresh token is not refreshed again at once.
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(err.class, ErrorClass::Auth);
        assert_eq!(client.stats().token_refreshes, 1);
    }

    #[tokio::test]
    async fn invalid_grant_on_refresh_is_fatal() {
        let (base, srv) = serve(|seen, _| {
            if seen.path == "/oauth/token/" {
                return api_error(400, "invalid_grant", "Invalid grant");
            }
            api_error(
                401,
                "expired_token",
                "The access token provided has expired.",
            )
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Fatal, "invalid_grant")
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("portal main: oauth token refresh failed: invalid_grant"),
            "{msg}"
        );
        assert!(!msg.contains("s3cr3t") && !msg.contains("r1"), "{msg}");
    }

    /// A store another process writes to: `load` answers what it wrote.
    struct SharedStore {
        stored: Mutex<Option<Tokens>>,
    }

    impl TokenStore for SharedStore {
        fn save<'a>(
            &'a self,
            _portal: &'a str,
            tokens: &'a Tokens,
        ) -> crate::BoxFuture<'a, anyhow::Result<()>> {
            Box::pin(async move {
                *lock(&self.stored) = Some(tokens.clone());
                Ok(())
            })
        }

        fn load<'a>(
            &'a self,
            _portal: &'a str,
        ) -> crate::BoxFuture<'a, anyhow::Result<Option<Tokens>>> {
            Box::pin(async move { Ok(lock(&self.stored).clone()) })
        }
    }

    #[tokio::test]
    async fn a_pair_rotated_by_another_process_is_adopted_after_invalid_grant() {
        let (base, srv) = serve(|seen, _| {
            if seen.path == "/oauth/token/" {
                return match seen.query["refresh_token"].as_str() {
                    Some("r2") => token_reply("a3", "r3"),
                    _ => api_error(400, "invalid_grant", "Invalid grant"),
                };
            }
            match seen.body["auth"].as_str() {
                Some("a2" | "a3") => ok(json!(true)),
                _ => api_error(
                    401,
                    "expired_token",
                    "The access token provided has expired.",
                ),
            }
        })
        .await;
        // This process holds a1/r1, expiring; another process already rotated r1 into a2/r2.
        let store = Arc::new(SharedStore {
            stored: Mutex::new(Some(tokens("a2", "r2", 3600))),
        });
        let client =
            PortalClient::new(settings(&base), Some(tokens("a1", "r1", 10)), store.clone())
                .unwrap();
        client.call("app.info", json!({})).await.unwrap();
        assert_eq!(
            log(&srv),
            vec![
                "refresh r1".to_string(),
                "call /rest/app.info auth=a2".to_string()
            ]
        );

        // With nothing newer stored, invalid_grant stands.
        *lock(&store.stored) = Some(tokens("a1", "r1", 10));
        let client =
            PortalClient::new(settings(&base), Some(tokens("a1", "r1", 10)), store.clone())
                .unwrap();
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert!(err.is_code("invalid_grant"), "{err}");
    }

    #[tokio::test]
    async fn expiring_token_is_refreshed_once_for_concurrent_calls() {
        let refreshes = Arc::new(AtomicUsize::new(0));
        let counter = refreshes.clone();
        let (base, srv) = serve(move |seen, _| {
            if seen.path == "/oauth/token/" {
                counter.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
                return token_reply("a2", "r2");
            }
            assert_eq!(seen.body["auth"], "a2");
            ok(json!(true))
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 10)), &srv);
        let calls: Vec<_> = (0..5)
            .map(|_| {
                let c = client.clone();
                tokio::spawn(async move { c.call("app.info", json!({})).await })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert_eq!(refreshes.load(Ordering::SeqCst), 1);
        assert_eq!(client.stats().token_refreshes, 1);
    }

    #[tokio::test]
    async fn imported_refresh_token_alone_is_enough() {
        let (base, srv) = serve(|seen, _| {
            if seen.path == "/oauth/token/" {
                return token_reply("a2", "r2");
            }
            ok(json!(true))
        })
        .await;
        let mut t = tokens("", "r1", 0);
        t.expires_at = None;
        let (client, _) = client_with(settings(&base), Some(t), &srv);
        client.call("app.info", json!({})).await.unwrap();
        assert_eq!(
            log(&srv),
            vec!["refresh r1", "save a2", "call /rest/app.info auth=a2"]
        );
    }

    #[tokio::test]
    async fn redirect_reposts_to_the_new_endpoint() {
        let (base, srv) = serve(|seen, _| {
            if seen.path.starts_with("/rest/") {
                return Reply {
                    status: 302,
                    headers: vec![("location", format!("/moved/rest/{}", &seen.path[6..]))],
                    body: String::new(),
                };
            }
            assert_eq!(seen.method, "POST");
            assert_eq!(seen.body["auth"], "a1");
            assert_eq!(seen.body["id"], 7);
            ok(json!({"ID": "7"}))
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let resp = client.call("crm.deal.get", json!({"id": 7})).await.unwrap();
        assert_eq!(resp.result["ID"], "7");
        assert_eq!(client.client_endpoint(), format!("{base}/moved/rest/"));
        client.call("crm.deal.get", json!({"id": 7})).await.unwrap();
        assert_eq!(
            log(&srv),
            vec![
                "call /rest/crm.deal.get auth=a1",
                "call /moved/rest/crm.deal.get auth=a1",
                "call /moved/rest/crm.deal.get auth=a1",
            ]
        );
    }

    #[tokio::test]
    async fn redirect_loops_stop() {
        let (base, srv) = serve(|seen, _| Reply {
            status: 301,
            headers: vec![("location", seen.path.clone())],
            body: String::new(),
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(err.code, "TOO_MANY_REDIRECTS");
        assert_eq!(log(&srv).len(), 4);
    }

    #[tokio::test]
    async fn redirects_away_from_the_rest_endpoint_are_refused() {
        let (base, srv) = serve(|_, _| Reply {
            status: 302,
            headers: vec![("location", "/auth/?backurl=%2Frest%2Fapp.info".into())],
            body: String::new(),
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Fatal, "REDIRECT_REFUSED")
        );
        assert!(!err.maybe_executed);
        assert_eq!(client.client_endpoint(), format!("{base}/rest/"));
        assert_eq!(log(&srv).len(), 1);
    }

    #[tokio::test]
    async fn a_redirect_to_another_host_is_refused_and_nothing_goes_there() {
        let (elsewhere, other) = serve(|_, _| ok(json!(true))).await;
        let target = elsewhere.clone();
        let (base, srv) = serve(move |seen, _| Reply {
            status: 301,
            headers: vec![("location", format!("{target}{}", seen.path))],
            body: String::new(),
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Fatal, "REDIRECT_REFUSED")
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("set client_endpoint = \"{elsewhere}/rest/\"")),
            "{msg}"
        );
        assert_eq!(client.client_endpoint(), format!("{base}/rest/"));
        assert_eq!(log(&srv).len(), 1);
        assert!(log(&other).is_empty(), "{:?}", log(&other));
    }

    #[tokio::test]
    async fn a_redirect_from_http_to_https_on_the_same_host_is_followed() {
        let (base, srv) = serve(|_, _| ok(json!(true))).await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let same = |to: &str| client.on_configured_host(&reqwest::Url::parse(to).unwrap());
        assert!(same(&format!("{base}/moved/rest/")));
        let port = base.rsplit(':').next().unwrap().to_string();
        assert!(!same(&format!("http://localhost:{port}/rest/")));
        assert!(!same("http://127.0.0.1:1/rest/"));
        let mut plain = settings("http://portal.example");
        plain.client_endpoint = "http://Portal.example/rest/".into();
        let (client, _) = client_with(plain, None, &srv);
        let same = |to: &str| client.on_configured_host(&reqwest::Url::parse(to).unwrap());
        assert!(same("https://portal.example/rest/"));
        assert!(same("http://portal.EXAMPLE:80/rest/"));
        assert!(!same("https://portal.example:8443/rest/"));
        assert!(!same("https://renamed.example/rest/"));
    }

    #[tokio::test]
    async fn a_redirect_from_the_token_server_is_not_followed() {
        let (elsewhere, other) = serve(|_, _| token_reply("a2", "r2")).await;
        let target = elsewhere.clone();
        let (base, srv) = serve(move |seen, _| Reply {
            status: 302,
            headers: vec![("location", format!("{target}{}?client_secret=x", seen.path))],
            body: String::new(),
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 0)), &srv);
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Fatal, "REDIRECT_REFUSED")
        );
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("redirected to {elsewhere}/oauth/token/;")),
            "{msg}"
        );
        assert_eq!(log(&srv), vec!["refresh r1"]);
        assert!(log(&other).is_empty(), "{:?}", log(&other));
    }

    #[tokio::test]
    async fn truncated_body_is_retryable_invalid_response() {
        let (base, srv) = serve(|_, _| Reply {
            status: 200,
            headers: vec![],
            body: r#"{"result":{"process_id":"abc","events":[{"ID":"1","EVENT_NA"#.into(),
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let err = client
            .offline_get(&GetRequest {
                limit: 10,
                clear: false,
                process_id: None,
                error_lane: false,
            })
            .await
            .unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Retryable, "INVALID_RESPONSE")
        );
        assert!(err.maybe_executed);
        assert_eq!(err.status, Some(200));
        assert!(
            err.description.contains("truncated or invalid JSON"),
            "{}",
            err.description
        );
        assert_eq!(client.stats().other_errors, 1);
    }

    #[tokio::test]
    async fn body_cut_off_in_transit_is_retryable_invalid_response() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let _ = socket.read(&mut buf).await;
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n";
            socket.write_all(head.as_bytes()).await.unwrap();
            socket
                .write_all(br#"{"result":{"process_id":"abc""#)
                .await
                .unwrap();
            socket.shutdown().await.unwrap();
        });
        let store = Arc::new(TestStore {
            log: Arc::new(Mutex::new(Vec::new())),
            fail: AtomicBool::new(false),
        });
        let client =
            PortalClient::new(settings(&base), Some(tokens("a1", "r1", 3600)), store).unwrap();
        let err = client
            .call("event.offline.get", json!({}))
            .await
            .unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str(), err.maybe_executed),
            (ErrorClass::Retryable, "INVALID_RESPONSE", true)
        );
        assert!(err.description.contains("cut off"), "{}", err.description);
        assert_eq!(client.stats().transport_errors, 1);
    }

    #[tokio::test]
    async fn html_error_pages_are_classified_and_scrubbed() {
        let (base, srv) = serve(|seen, _| {
            let status = if seen.path.ends_with("missing") { 404 } else { 502 };
            let echoed = seen.body["auth"].as_str().unwrap_or("").to_string();
            Reply {
                status,
                headers: vec![("content-type", "text/html".into())],
                body: format!("<html><title>{status} Bad Gateway</title><body>request auth={echoed}</body></html>"),
            }
        })
        .await;
        let (client, _) = client_with(
            settings(&base),
            Some(tokens("access-token-123", "r1", 3600)),
            &srv,
        );
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str(), err.maybe_executed),
            (ErrorClass::Retryable, "INVALID_RESPONSE", true)
        );
        let msg = err.to_string();
        assert!(msg.contains("502 Bad Gateway"), "{msg}");
        assert!(
            !msg.contains("access-token-123") && !format!("{err:?}").contains("access-token-123"),
            "{msg}"
        );
        let err = client.call("missing", json!({})).await.unwrap_err();
        assert_eq!(
            (err.class, err.maybe_executed),
            (ErrorClass::Rejected, false)
        );
    }

    #[tokio::test]
    async fn refused_connection_is_transport_and_not_executed() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let store = Arc::new(TestStore {
            log: Arc::new(Mutex::new(Vec::new())),
            fail: AtomicBool::new(false),
        });
        let client =
            PortalClient::new(settings(&base), Some(tokens("a1", "r1", 3600)), store).unwrap();
        let err = client.call("app.info", json!({})).await.unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str(), err.maybe_executed),
            (ErrorClass::Retryable, "TRANSPORT", false)
        );
        assert!(!err.to_string().contains("127.0.0.1"), "{err}");
        assert_eq!(client.stats().transport_errors, 1);
    }

    #[tokio::test]
    async fn an_empty_process_id_is_never_sent() {
        let (base, srv) = serve(|_, _| ok(json!(true))).await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let all = ClearTarget::All;
        let err = client.offline_clear("", &all).await.unwrap_err();
        assert_eq!(err.code, codes::INVALID_PARAMS);
        let err = client
            .offline_error(" ", &["m".repeat(32)])
            .await
            .unwrap_err();
        assert_eq!(err.code, codes::INVALID_PARAMS);
        let get = GetRequest {
            limit: 10,
            clear: false,
            process_id: Some(String::new()),
            error_lane: false,
        };
        assert_eq!(
            client.offline_get(&get).await.unwrap_err().code,
            codes::INVALID_PARAMS
        );
        assert!(
            log(&srv).is_empty(),
            "no request reached the portal: {:?}",
            log(&srv)
        );
    }

    #[tokio::test]
    async fn no_tokens_is_fatal_and_says_how_to_import() {
        let (base, srv) = serve(|_, _| ok(json!(true))).await;
        let (client, _) = client_with(settings(&base), None, &srv);
        assert!(!client.has_tokens());
        let err = client
            .call("event.offline.get", json!({}))
            .await
            .unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Fatal, "NO_TOKENS")
        );
        assert!(
            err.to_string()
                .contains("b24eventd auth import --portal main --refresh-token T"),
            "{err}"
        );
        assert!(log(&srv).is_empty());
    }

    #[tokio::test]
    async fn fatal_answers_are_not_retried() {
        let (base, srv) = serve(|_, _| {
            api_error(
                403,
                "WRONG_AUTH_TYPE",
                "Current authorization type is denied for this method",
            )
        })
        .await;
        let (client, _) = client_with(settings(&base), Some(tokens("a1", "r1", 3600)), &srv);
        let err = client.offline_list(Value::Null, 0).await.unwrap_err();
        assert_eq!(err.class, ErrorClass::Fatal);
        assert!(err.to_string().contains("not an incoming webhook"), "{err}");
        assert_eq!(log(&srv).len(), 1);
    }

    #[tokio::test]
    async fn offline_methods_send_the_documented_parameters() {
        let (base, srv) = serve(|seen, _| match seen.path.as_str() {
            "/rest/event.offline.get" => json_reply(
                200,
                json!({"result": {"process_id": "pid1", "events": [{
                    "ID": "1", "TIMESTAMP_X": "2024-07-18T12:32:31+02:00", "EVENT_NAME": "ONCRMLEADADD",
                    "EVENT_DATA": false, "EVENT_ADDITIONAL": false, "MESSAGE_ID": "1"}]}, "time": {}}),
            ),
            "/rest/event.offline.list" => json_reply(200, json!({"result": [], "total": 0, "time": {}})),
            _ => ok(json!(true)),
        })
        .await;
        let mut s = settings(&base);
        s.auth_connector = Some("erp-sync".into());
        let (client, _) = client_with(s, Some(tokens("a1", "r1", 3600)), &srv);
        let batch = client
            .offline_get(&GetRequest {
                limit: 25,
                clear: false,
                process_id: None,
                error_lane: true,
            })
            .await
            .unwrap();
        assert_eq!(batch.process_id.as_deref(), Some("pid1"));
        assert_eq!(batch.events[0].data, Value::Null);
        client
            .offline_get(&GetRequest {
                limit: 5,
                clear: true,
                process_id: Some("pid1".into()),
                error_lane: false,
            })
            .await
            .unwrap();
        client
            .offline_clear("pid1", &ClearTarget::MessageIds(vec!["m".repeat(32)]))
            .await
            .unwrap();
        client
            .offline_clear("pid1", &ClearTarget::Ids(vec![1, 2]))
            .await
            .unwrap();
        client
            .offline_clear("pid1", &ClearTarget::All)
            .await
            .unwrap();
        client
            .offline_clear("pid1", &ClearTarget::Ids(vec![]))
            .await
            .unwrap();
        client
            .offline_error("pid1", &["x".repeat(32)])
            .await
            .unwrap();
        client.offline_error("pid1", &[]).await.unwrap();
        client.offline_list(json!({"ERROR": 1}), 50).await.unwrap();
        client
            .call("crm.deal.update", json!({"id": 1, "auth_connector": null}))
            .await
            .unwrap();

        let seen = lock(&srv.seen).clone();
        let bodies: Vec<Value> = seen.iter().map(|s| s.body.clone()).collect();
        assert_eq!(bodies.len(), 8);
        assert_eq!(
            bodies[0],
            json!({"limit": 25, "clear": 0, "error": 1, "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(
            bodies[1],
            json!({"limit": 5, "clear": 1, "error": 0, "process_id": "pid1", "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(
            bodies[2],
            json!({"process_id": "pid1", "message_id": ["m".repeat(32)], "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(
            bodies[3],
            json!({"process_id": "pid1", "id": [1, 2], "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(
            bodies[4],
            json!({"process_id": "pid1", "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(seen[5].path, "/rest/event.offline.error");
        assert_eq!(
            bodies[5],
            json!({"process_id": "pid1", "message_id": ["x".repeat(32)], "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(
            bodies[6],
            json!({"filter": {"ERROR": 1}, "order": {"ID": "ASC"}, "start": 50, "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(bodies[7], json!({"id": 1, "auth": "a1"}));
        let headers = &seen[0].headers;
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["accept"], "application/json");
        assert!(
            headers["user-agent"]
                .to_str()
                .unwrap()
                .starts_with("b24eventd/")
        );
        assert!(seen.iter().all(|s| s.method == "POST"));
    }

    #[tokio::test]
    async fn operator_methods_send_the_connector_only_where_it_matters() {
        let (base, srv) = serve(|seen, _| match seen.path.as_str() {
            "/rest/event.get" => ok(json!([
                {"event": "ONCRMDEALADD", "connector_id": "erp-sync", "offline": 1},
                {"event": "ONCRMLEADADD", "handler": "https://h.example/", "auth_type": "0", "offline": 0}
            ])),
            "/rest/event.bind" if seen.body["event"] == "ONCRMDEALADD" => api_error(
                400,
                "ERROR_CORE",
                "Unable to set event handler: Handler already binded",
            ),
            "/rest/event.bind" if seen.body["event"] == "ONNOSUCH" => {
                api_error(400, "ERROR_EVENT_NOT_FOUND", "Event not found")
            }
            "/rest/event.unbind" => ok(json!({"count": 1})),
            "/rest/feature.get" => ok(json!({"value": "N"})),
            "/rest/server.time" => ok(json!("2026-11-23T13:00:00+03:00")),
            "/rest/user.admin" => ok(json!(true)),
            "/rest/app.info" => ok(json!({"CODE": "local.app.1", "STATUS": "L", "INSTALLED": true,
                "PAYMENT_EXPIRED": "N", "DAYS": null, "LICENSE": "en_pro100"})),
            _ => ok(json!(true)),
        })
        .await;
        let mut s = settings(&base);
        s.auth_connector = Some("erp-sync".into());
        let (client, _) = client_with(s, Some(tokens("a1", "r1", 3600)), &srv);
        let handlers = client.event_get().await.unwrap();
        assert_eq!(handlers.len(), 2);
        assert!(handlers[0].offline && handlers[0].connector_id == "erp-sync");
        assert_eq!(
            client.event_bind_offline("ONCRMDEALADD").await.unwrap(),
            BindOutcome::AlreadyBound
        );
        assert_eq!(
            client.event_bind_offline("ONCRMDEALUPDATE").await.unwrap(),
            BindOutcome::Bound
        );
        let err = client.event_bind_offline("ONNOSUCH").await.unwrap_err();
        assert!(err.to_string().contains("scope"), "{err}");
        assert_eq!(
            client.event_unbind_offline("ONCRMDEALADD").await.unwrap(),
            1
        );
        assert_eq!(
            client.feature_get("rest_offline_extended").await.unwrap(),
            FeatureValue::Disabled
        );
        assert_eq!(
            client.server_time().await.unwrap().timestamp(),
            1_795_428_000
        );
        assert!(client.user_admin().await.unwrap());
        let app = client.app_info().await.unwrap();
        assert_eq!((app.status.as_str(), app.installed), ("L", true));

        let bodies: Vec<(String, Value)> = lock(&srv.seen)
            .iter()
            .map(|s| (s.path.clone(), s.body.clone()))
            .collect();
        let body = |path: &str, n: usize| {
            bodies
                .iter()
                .filter(|(p, _)| p == path)
                .nth(n)
                .map(|(_, b)| b.clone())
                .unwrap()
        };
        assert_eq!(body("/rest/event.get", 0), json!({"auth": "a1"}));
        assert_eq!(
            body("/rest/event.bind", 1),
            json!({"event": "ONCRMDEALUPDATE", "event_type": "offline", "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(
            body("/rest/event.unbind", 0),
            json!({"event": "ONCRMDEALADD", "event_type": "offline", "auth": "a1", "auth_connector": "erp-sync"})
        );
        assert_eq!(
            body("/rest/feature.get", 0),
            json!({"CODE": "rest_offline_extended", "auth": "a1"})
        );
        for path in ["/rest/server.time", "/rest/user.admin", "/rest/app.info"] {
            assert_eq!(body(path, 0), json!({"auth": "a1"}), "{path}");
        }
    }

    #[tokio::test]
    async fn exchange_code_returns_the_pair_without_storing_it() {
        let (base, srv) = serve(|seen, _| {
            assert_eq!(seen.query["grant_type"], "authorization_code");
            assert_eq!(seen.query["code"], "c0de");
            token_reply("a9", "r9")
        })
        .await;
        let (client, _) = client_with(settings(&base), None, &srv);
        let tokens = client.exchange_code("c0de").await.unwrap();
        assert_eq!(
            (tokens.access_token.as_str(), tokens.refresh_token.as_str()),
            ("a9", "r9")
        );
        assert!(!client.has_tokens(), "the caller stores the pair first");
        assert!(
            log(&srv).iter().all(|l| !l.starts_with("save")),
            "{:?}",
            log(&srv)
        );
    }

    #[tokio::test]
    async fn batch_sends_query_string_subcommands() {
        let (base, srv) = serve(|_, _| {
            json_reply(
                200,
                json!({"result": {
                    "result": {"get": {"process_id": "p2", "events": []}, "clear": true},
                    "result_error": [], "result_total": [], "result_next": [], "result_time": []
                }, "time": {}}),
            )
        })
        .await;
        let mut s = settings(&base);
        s.auth_connector = Some("erp-sync".into());
        let (client, _) = client_with(s, Some(tokens("a1", "r1", 3600)), &srv);
        let commands = vec![
            (
                "clear".to_string(),
                "event.offline.clear".to_string(),
                json!({"process_id": "p1", "message_id": ["a", "b"]}),
            ),
            (
                "get".to_string(),
                "event.offline.get".to_string(),
                json!({"clear": 0, "limit": 50}),
            ),
            ("info".to_string(), "app.info".to_string(), json!({})),
        ];
        let resp = client.batch(&commands, false).await.unwrap();
        assert_eq!(resp.results["clear"], json!(true));
        assert_eq!(
            parse_offline_get(&resp.results["get"])
                .unwrap()
                .process_id
                .as_deref(),
            Some("p2")
        );
        let body = lock(&srv.seen)[0].body.clone();
        assert_eq!(
            body,
            json!({
                "cmd": {
                    "clear": "event.offline.clear?message_id[0]=a&message_id[1]=b&process_id=p1",
                    "get": "event.offline.get?clear=0&limit=50",
                    "info": "app.info"
                },
                "halt": 0, "auth": "a1", "auth_connector": "erp-sync"
            })
        );
        let too_many: Vec<_> = (0..51)
            .map(|i| (format!("k{i}"), "app.info".to_string(), json!({})))
            .collect();
        let err = client.batch(&too_many, true).await.unwrap_err();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Rejected, "ERROR_BATCH_LENGTH_EXCEEDED")
        );
        let dup = vec![
            ("a".to_string(), "app.info".to_string(), json!({})),
            ("a".to_string(), "app.info".to_string(), json!({})),
        ];
        assert!(client.batch(&dup, false).await.is_err());
        assert_eq!(log(&srv).len(), 1);
    }

    #[test]
    fn settings_are_checked_and_secret_free_in_debug() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store: Arc<dyn TokenStore> = Arc::new(TestStore {
            log: Arc::new(Mutex::new(Vec::new())),
            fail: AtomicBool::new(false),
        });
        let mut s = settings("https://example.bitrix24.com");
        s.client_endpoint = "https://example.bitrix24.com/rest".into();
        let client = PortalClient::new(s.clone(), None, store.clone()).unwrap();
        assert_eq!(
            client.client_endpoint(),
            "https://example.bitrix24.com/rest/"
        );
        assert!(!format!("{s:?}").contains("s3cr3t"));
        s.client_endpoint = "example.bitrix24.com/rest/".into();
        let err = PortalClient::new(s, None, store).err().unwrap();
        assert_eq!(
            (err.class, err.code.as_str()),
            (ErrorClass::Fatal, "INVALID_SETTINGS")
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let first = limit_backoff(0);
        assert!(first >= Duration::from_millis(750) && first <= Duration::from_millis(1250));
        let fourth = limit_backoff(3);
        assert!(fourth >= Duration::from_secs(6) && fourth <= Duration::from_secs(10));
        assert!(limit_backoff(30) <= Duration::from_secs(75));
    }
}
