//! The REST server of the simulated portal: method lookup, authentication, `auth_connector`,
//! the operating budget, `batch`, and the methods themselves (`event.offline.*`, `event.*`
//! including `event.test`, `events`, `feature.get`, `server.time`, `profile`, `user.admin`, `app.info`,
//! `crm.<type>.get`). Synchronous: runs under the state lock.

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::auth::AccessCheck;
use super::limits::RequestCalls;
use super::php::{self, Params};
use super::portal::{CRM_TYPES, State};
use super::queue::{ClearRequest, ClearSelector, ErrorRequest, Field, GetRequest, ListRequest};
use super::rest::{RestError, TimeBlock, iso, portal_now, unix_now};
use super::{LimiterModel, SimulatorConfig};

/// `CRestUtil::BATCH_MAX_LENGTH`.
const BATCH_MAX_LENGTH: usize = 50;

/// Methods outside the CRM entity getters.
const METHODS: &[&str] = &[
    "batch",
    "event.offline.get",
    "event.offline.clear",
    "event.offline.error",
    "event.offline.list",
    "event.bind",
    "event.unbind",
    "event.get",
    "event.test",
    "events",
    "feature.get",
    "server.time",
    "profile",
    "user.admin",
    "app.info",
];

fn crm_type(method: &str) -> Option<&'static str> {
    let kind = method.strip_prefix("crm.")?.strip_suffix(".get")?;
    CRM_TYPES
        .iter()
        .copied()
        .find(|t| t.eq_ignore_ascii_case(kind))
}

fn is_known(method: &str) -> bool {
    METHODS.contains(&method) || crm_type(method).is_some()
}

/// Methods that only work with application (OAuth) authorization.
fn needs_application_auth(method: &str) -> bool {
    method == "events" || method.starts_with("event.")
}

/// One HTTP request to `/rest`.
pub struct RestCall {
    /// Lower-cased, without `.json`.
    pub method: String,
    /// Came in on an incoming-webhook path `/rest/<user>/<code>/<method>`.
    pub webhook: bool,
    pub params: Params,
    /// From `Authorization: Bearer`.
    pub bearer: Option<String>,
    /// Unix time the request arrived.
    pub started: f64,
}

pub struct RestReply {
    pub status: u16,
    pub body: Vec<u8>,
    /// `event.offline.get` ran (alone or inside `batch`) and committed.
    pub ran_get: bool,
    /// Unix time before which the answer must not leave: when the calls it ran would have
    /// finished on a real server.
    pub answer_at: f64,
}

impl RestReply {
    pub fn error(error: &RestError) -> RestReply {
        RestReply {
            status: error.status,
            body: serde_json::to_vec(&error.to_json()).unwrap_or_default(),
            ran_get: false,
            answer_at: 0.0,
        }
    }
}

/// One HTTP request on the server's clock: each call takes its simulated time, one after the
/// other from the request's arrival, and the limiter sees every call the request made.
struct Timeline {
    started: f64,
    elapsed: f64,
    calls: RequestCalls,
}

impl Timeline {
    fn new(started: f64) -> Timeline {
        Timeline {
            started,
            elapsed: 0.0,
            calls: RequestCalls::default(),
        }
    }

    fn now(&self) -> f64 {
        self.started + self.elapsed
    }

    fn spend(&mut self, seconds: f64) {
        self.elapsed += seconds.max(0.0);
    }
}

/// A successful reply: `result`, then `next`/`total` lifted out of list results, then `time`.
#[derive(Serialize)]
struct Envelope<'a> {
    result: &'a Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total: Option<usize>,
    time: &'a TimeBlock,
}

/// What a method returned.
struct Output {
    result: Value,
    total: Option<usize>,
    next: Option<usize>,
    /// Events returned or rows affected, for the operating cost.
    affected: usize,
    ran_get: bool,
}

impl Output {
    fn of(result: Value) -> Output {
        Output {
            result,
            total: None,
            next: None,
            affected: 0,
            ran_get: false,
        }
    }
}

/// Authenticated call context.
struct Ctx<'a> {
    config: &'a SimulatorConfig,
    connector: String,
}

impl Ctx<'_> {
    fn require_admin(&self, detail: &str) -> Result<(), RestError> {
        if self.config.user_is_admin {
            Ok(())
        } else {
            Err(RestError::access_denied(detail))
        }
    }
}

/// Serves one `/rest` request (the leaky bucket and faults are the transport's).
pub fn handle(state: &mut State, config: &SimulatorConfig, mut call: RestCall) -> RestReply {
    state.count_call(&call.method);
    if !is_known(&call.method) {
        return RestReply::error(&RestError::method_not_found());
    }
    if call.webhook {
        // No webhook credentials exist on the simulated portal; event methods refuse the
        // authorization type whatever the credentials.
        let error = if needs_application_auth(&call.method) {
            RestError::wrong_auth_type()
        } else {
            RestError::no_auth()
        };
        return RestReply::error(&error);
    }
    let token = [call.params.take("auth"), call.params.take("access_token")]
        .into_iter()
        .flatten()
        .find_map(|v| php::strval(&v).filter(|s| !s.is_empty()))
        .or(call.bearer.take());
    let Some(token) = token else {
        return RestReply::error(&RestError::no_auth());
    };
    match state.tokens.check(&token, unix_now()) {
        AccessCheck::Valid => {}
        AccessCheck::Unknown => return RestReply::error(&RestError::invalid_token()),
        AccessCheck::Expired => return RestReply::error(&RestError::expired_token()),
    }
    let connector = call
        .params
        .take("auth_connector")
        .and_then(|v| php::strval(&v))
        .unwrap_or_default();
    if php::boolval(&Value::String(connector.clone())) && !config.rest_auth_connector {
        return RestReply::error(&RestError::wrong_license("auth_connector"));
    }
    let ctx = Ctx { config, connector };

    let mut timeline = Timeline::new(call.started);
    let mut reply = if call.method == "batch" {
        batch_request(state, &ctx, &call.params, &mut timeline)
    } else {
        match charged_call(state, &ctx, &call.method, call.params, &mut timeline) {
            Ok((out, time)) => success(&out.result, out.next, out.total, &time, out.ran_get),
            Err(error) => RestReply::error(&error),
        }
    };
    // `LoadLimiter::finalize` runs after the answer: the next request sees this one's time.
    state.limiter.finalize(&timeline.calls, call.started);
    reply.answer_at = timeline.now();
    reply
}

fn success(
    result: &Value,
    next: Option<usize>,
    total: Option<usize>,
    time: &TimeBlock,
    ran_get: bool,
) -> RestReply {
    let envelope = Envelope {
        result,
        next,
        total,
        time,
    };
    RestReply {
        status: 200,
        body: serde_json::to_vec(&envelope).unwrap_or_default(),
        ran_get,
        answer_at: 0.0,
    }
}

/// The `time` block of a call of `method` that ran from `start` to `finish`, with what the
/// limiter reports of the method.
fn time_block(
    state: &mut State,
    timeline: &Timeline,
    method: &str,
    start: f64,
    finish: f64,
) -> TimeBlock {
    let time = match state.limiter.model() {
        LimiterModel::Current => TimeBlock::current(start, start, finish, finish),
        LimiterModel::Legacy => TimeBlock::legacy(start, finish, finish - start),
    };
    match state.limiter.operating(method, &timeline.calls, finish) {
        Some(op) => time.with_operating(op.operating, op.reset_at),
        None => time,
    }
}

/// Answers 429 `OPERATION_TIME_LIMIT` when the limiter refuses a call of `method` now.
fn admit(state: &mut State, timeline: &Timeline, method: &str) -> Result<(), RestError> {
    if let Err(reset_at) = state.limiter.check(method, &timeline.calls, timeline.now()) {
        state.counters.rejected_429 += 1;
        tracing::debug!(method, reset_at, "operating time limit: 429");
        return Err(RestError::operation_time_limit());
    }
    Ok(())
}

/// Runs a method under the operating-time limiter (`CRestServer::processCall`): refused with
/// 429 when over the limit or banned, otherwise executed, taking `operating_cost` (+ per event)
/// of server time. A call that fails is not charged (`registerEnding` is never reached).
fn charged_call(
    state: &mut State,
    ctx: &Ctx,
    method: &str,
    mut params: Params,
    timeline: &mut Timeline,
) -> Result<(Output, TimeBlock), RestError> {
    admit(state, timeline, method)?;
    if method == "event.offline.get" && state.faults.fail_gets {
        state.counters.failed_gets += 1;
        return Err(RestError::internal());
    }
    let start = timeline.now();
    let offset = params.take("start").map_or(0, |v| php::intval(&v));
    timeline.calls.start(method, start);
    let result = invoke(state, ctx, method, &params, offset);
    let affected = result.as_ref().map_or(0, |o| o.affected) as f64;
    timeline.spend(
        ctx.config.operating_cost.as_secs_f64()
            + ctx.config.operating_cost_per_event.as_secs_f64() * affected,
    );
    let finish = timeline.now();
    if state.limiter.model() == LimiterModel::Legacy {
        state.limiter.ran(method, start, finish);
    }
    let out = result?;
    timeline.calls.finish(method, finish);
    let time = time_block(state, timeline, method, start, finish);
    Ok((out, time))
}

/// A `batch` request: the batch is itself a call of the method `batch` (limited, and charged
/// at half its time by the current limiter), running its commands one after the other, as
/// `CRestProvider::methodsBatch` does (`modules/rest/classes/general/rest_provider.php`: a
/// `foreach` over `cmd`, each through its own `CRestServerBatchItem`).
fn batch_request(
    state: &mut State,
    ctx: &Ctx,
    params: &Params,
    timeline: &mut Timeline,
) -> RestReply {
    if let Err(error) = admit(state, timeline, "batch") {
        return RestReply::error(&error);
    }
    let start = timeline.now();
    timeline.calls.start("batch", start);
    timeline.spend(ctx.config.operating_cost.as_secs_f64());
    let (result, ran_get) = batch(state, ctx, params, timeline);
    let finish = timeline.now();
    timeline.calls.finish("batch", finish);
    state.limiter.ran("batch", start, finish);
    let time = time_block(state, timeline, "batch", start, finish);
    success(&result, None, None, &time, ran_get)
}

/// `methodsBatch`: commands run in the order sent; each is charged to its own method; the
/// top-level `auth_connector` applies to all; commands past the 50th fail with
/// `ERROR_BATCH_LENGTH_EXCEEDED`; `halt` stops at the first error. Returns the result and
/// whether `event.offline.get` ran.
fn batch(state: &mut State, ctx: &Ctx, params: &Params, timeline: &mut Timeline) -> (Value, bool) {
    let halt = params.get("halt").is_some_and(php::boolval);
    let mut results = Map::new();
    let mut errors = Map::new();
    let mut totals = Map::new();
    let mut nexts = Map::new();
    let mut times = Map::new();
    let mut ran_get = false;
    let commands = params.entries_in_order("cmd");
    let method_of = |command: &Value| {
        command
            .as_str()
            .map(|c| c.split('?').next().unwrap_or("").trim().to_lowercase())
            .unwrap_or_default()
    };
    let gets = commands
        .iter()
        .filter(|(_, c)| method_of(c) == "event.offline.get")
        .count() as u64;
    let clears = commands
        .iter()
        .any(|(_, c)| method_of(c) == "event.offline.clear");
    state.counters.max_gets_per_batch = state.counters.max_gets_per_batch.max(gets);
    if gets > 0 && clears {
        state.counters.batches_with_clear_and_get += 1;
    }
    for (index, (key, command)) in commands.into_iter().enumerate() {
        let outcome = if index >= BATCH_MAX_LENGTH {
            Err(RestError::new(
                400,
                "ERROR_BATCH_LENGTH_EXCEEDED",
                "Max batch length exceeded",
            ))
        } else {
            let Value::String(command) = command else {
                continue;
            };
            batch_command(state, ctx, &command, timeline)
        };
        match outcome {
            Ok((out, time)) => {
                ran_get |= out.ran_get;
                results.insert(key.clone(), out.result);
                if let Some(total) = out.total {
                    totals.insert(key.clone(), json!(total));
                }
                if let Some(next) = out.next {
                    nexts.insert(key.clone(), json!(next));
                }
                times.insert(key, time.to_json());
            }
            Err(error) => {
                errors.insert(key, error.to_json());
                if halt {
                    break;
                }
            }
        }
    }
    let result = json!({
        "result": php_array(results),
        "result_error": php_array(errors),
        "result_total": php_array(totals),
        "result_next": php_array(nexts),
        "result_time": php_array(times),
    });
    (result, ran_get)
}

/// A PHP array as `json_encode` writes it: `[]` when empty, a list when the keys are
/// exactly 0..n (commands sent as a list), an object otherwise.
fn php_array(map: Map<String, Value>) -> Value {
    let sequential = (0..map.len()).all(|i| map.contains_key(&i.to_string()));
    if !sequential {
        return Value::Object(map);
    }
    let mut indexed: Vec<(usize, Value)> = map
        .into_iter()
        .filter_map(|(k, v)| k.parse::<usize>().ok().map(|i| (i, v)))
        .collect();
    indexed.sort_by_key(|(i, _)| *i);
    Value::Array(indexed.into_iter().map(|(_, v)| v).collect())
}

/// One `method?query` of a batch.
fn batch_command(
    state: &mut State,
    ctx: &Ctx,
    command: &str,
    timeline: &mut Timeline,
) -> Result<(Output, TimeBlock), RestError> {
    let (path, query) = command.split_once('?').unwrap_or((command, ""));
    let method = path.trim().to_lowercase();
    state.count_call(&method);
    if method == "batch" {
        return Err(RestError::new(
            405,
            "ERROR_BATCH_METHOD_NOT_ALLOWED",
            "Method is not allowed for batch usage",
        ));
    }
    if !is_known(&method) {
        return Err(RestError::method_not_found());
    }
    if method == "event.offline.clear" && state.faults.fail_next_batch_clears > 0 {
        state.faults.fail_next_batch_clears -= 1;
        state.counters.failed_batch_clears += 1;
        return Err(RestError::new(
            500,
            "INTERNAL_SERVER_ERROR",
            "Internal server error",
        ));
    }
    let mut params = Params::from_form(query);
    // The outer request's auth data replaces whatever the command carries.
    for name in ["auth", "access_token", "auth_connector"] {
        params.take(name);
    }
    charged_call(state, ctx, &method, params, timeline)
}

fn invoke(
    state: &mut State,
    ctx: &Ctx,
    method: &str,
    params: &Params,
    start: i64,
) -> Result<Output, RestError> {
    match method {
        "event.offline.get" => offline_get(state, ctx, params),
        "event.offline.clear" => {
            ctx.require_admin("")?;
            let req = ClearRequest::parse(params)?;
            if ctx.config.clear_ignores_message_id
                && matches!(req.selector, ClearSelector::MessageIds(_))
            {
                state.counters.ignored_message_id_clears += 1;
                return Ok(Output::of(json!(true)));
            }
            let deleted = state.queue.clear(&req, &ctx.connector);
            state.counters.cleared += deleted as u64;
            Ok(Output {
                affected: deleted,
                ..Output::of(json!(true))
            })
        }
        "event.offline.error" => {
            ctx.require_admin("")?;
            let req = ErrorRequest::parse(params)?;
            let moved = state.queue.error(&req, &ctx.connector)?;
            state.counters.errored += moved as u64;
            Ok(Output {
                affected: moved,
                ..Output::of(json!(true))
            })
        }
        "event.offline.list" => {
            ctx.require_admin("")?;
            let mut req = ListRequest::parse(params, start)?;
            if ctx.config.list_ignores_process_id_filter {
                req.filter = req.filter.without(Field::ProcessId);
            }
            let out = state.queue.list(&req, &ctx.connector);
            let items: Vec<Value> = out.rows.iter().map(|r| r.to_listed()).collect();
            Ok(Output {
                result: Value::Array(items),
                total: Some(out.total),
                next: out.next,
                affected: out.rows.len(),
                ran_get: false,
            })
        }
        "event.bind" => event_bind(state, ctx, params),
        "event.unbind" => event_unbind(state, ctx, params),
        "event.get" => Ok(Output::of(event_get(state, ctx))),
        "event.test" => Ok(Output::of(event_test(state, ctx, params))),
        "events" => {
            let scope = params.get("scope").and_then(php::strval);
            let names = match scope.as_deref() {
                Some(scope) if !scope.is_empty() => state.event_names(Some(scope)),
                _ => state.event_names(None),
            };
            Ok(Output::of(json!(names)))
        }
        "feature.get" => {
            let code = params.get("code").and_then(php::strval).unwrap_or_default();
            if !php::boolval(&Value::String(code.clone())) {
                return Err(RestError::new(400, "CODE_EMPTY", "CODE can't be empty"));
            }
            let enabled = match code.as_str() {
                "rest_offline_extended" => ctx.config.rest_offline_extended,
                "rest_auth_connector" => ctx.config.rest_auth_connector,
                _ => false,
            };
            Ok(Output::of(
                json!({"value": if enabled { "Y" } else { "N" }}),
            ))
        }
        "server.time" => Ok(Output::of(json!(iso(&portal_now())))),
        "profile" => Ok(Output::of(json!({
            "ID": "1",
            "ADMIN": ctx.config.user_is_admin,
            "NAME": "Simulated",
            "LAST_NAME": "Administrator",
            "PERSONAL_GENDER": "",
            "TIME_ZONE": "",
            "TIME_ZONE_OFFSET": 10800,
        }))),
        "user.admin" => Ok(Output::of(json!(ctx.config.user_is_admin))),
        // `CRestProvider::appInfo` on a cloud portal: no member_id here (that comes with the
        // tokens); LICENSE_TYPE and LICENSE_FAMILY come from the bitrix24 module.
        "app.info" => {
            let (license_type, family) = if ctx.config.rest_offline_extended {
                ("pro100", "pro")
            } else {
                ("basic", "basic")
            };
            Ok(Output::of(json!({
                "ID": 1,
                "CODE": ctx.config.client_id,
                "VERSION": 1,
                "STATUS": "L",
                "INSTALLED": true,
                "PAYMENT_EXPIRED": "N",
                "DAYS": null,
                "LANGUAGE_ID": "en",
                "LICENSE": format!("en_{license_type}"),
                "LICENSE_TYPE": license_type,
                "LICENSE_FAMILY": family,
            })))
        }
        other => match crm_type(other) {
            Some(kind) => crm_get(state, kind, params),
            None => Err(RestError::method_not_found()),
        },
    }
}

fn offline_get(state: &mut State, ctx: &Ctx, params: &Params) -> Result<Output, RestError> {
    ctx.require_admin("")?;
    let mut req = GetRequest::parse(params, ctx.config.rest_offline_extended)?;
    state.counters.largest_get_limit = state.counters.largest_get_limit.max(req.limit as u64);
    if let Some(clamp) = ctx.config.get_limit_clamp {
        req.limit = req.limit.min(clamp);
    }
    if req.error_lane {
        state.counters.error_lane_gets += 1;
    }
    let State { queue, rng, .. } = state;
    // `Random::getString(32)`.
    let out = queue.get(&req, &ctx.connector, || {
        match &ctx.config.reused_process_id {
            Some(reused) => reused.clone(),
            None => super::auth::random_token(rng, 32),
        }
    });
    state.counters.cleared += out.deleted as u64;
    tracing::debug!(
        connector = %ctx.connector,
        events = out.events.len(),
        deleted = out.deleted,
        reserved = out.process_id.is_some(),
        "event.offline.get"
    );
    let events: Vec<Value> = out.events.iter().map(|r| r.to_event()).collect();
    Ok(Output {
        result: json!({"process_id": out.process_id, "events": events}),
        total: None,
        next: None,
        affected: out.events.len(),
        ran_get: true,
    })
}

struct BindParams {
    event: String,
    offline: bool,
    handler: String,
}

/// EVENT, EVENT_TYPE and HANDLER validated in the server's order.
fn bind_params(ctx: &Ctx, params: &Params, binding: bool) -> Result<BindParams, RestError> {
    let text = |name: &str| params.get(name).and_then(php::strval).unwrap_or_default();
    let event = text("event").to_uppercase();
    let event_type = text("event_type").to_lowercase();
    let mut handler = text("handler");
    if event.is_empty() {
        return Err(RestError::argument_null("EVENT"));
    }
    let offline = match event_type.as_str() {
        "" | "online" => false,
        "offline" => true,
        _ => {
            return Err(RestError::argument(
                "Value must be one of {online|offline}",
                "EVENT_TYPE",
            ));
        }
    };
    if offline {
        let detail = if binding {
            "Offline events binding requires administrator access rights"
        } else {
            "Offline events unbinding requires administrator access rights"
        };
        ctx.require_admin(detail)?;
        handler.clear();
    } else if handler.is_empty() {
        return Err(RestError::argument_null("HANDLER"));
    }
    Ok(BindParams {
        event,
        offline,
        handler,
    })
}

fn event_bind(state: &mut State, ctx: &Ctx, params: &Params) -> Result<Output, RestError> {
    let mut user_id = params.get("auth_type").map_or(0, php::intval);
    if user_id > 0 {
        if !ctx.config.user_is_admin && user_id != 1 {
            return Err(RestError::access_denied(
                "Event binding with AUTH_TYPE requires administrator access rights",
            ));
        }
    } else if !ctx.config.user_is_admin {
        user_id = 1;
    }
    let p = bind_params(ctx, params, true)?;
    if p.offline {
        user_id = 0;
    }
    if !state.known_event(&p.event) {
        return Err(RestError::new(
            400,
            "ERROR_EVENT_NOT_FOUND",
            "Event not found",
        ));
    }
    if p.offline && p.event == "ONOFFLINEEVENT" {
        return Err(RestError::bad_argument(
            "Offline event cannot be registered for this event.",
        ));
    }
    if state.has_binding(&p.event, &p.handler, &ctx.connector, user_id) {
        return Err(RestError::new(
            400,
            "ERROR_CORE",
            "Unable to set event handler: Handler already binded",
        ));
    }
    state.add_binding(&p.event, &p.handler, &ctx.connector, user_id, p.offline);
    tracing::debug!(event = %p.event, connector = %ctx.connector, offline = p.offline, "event.bind");
    Ok(Output::of(json!(true)))
}

/// `Event::eventUnbind` (modules/rest/lib/api/event.php): deletes the application's bindings of
/// `event` and `handler`; with `event_type=offline` those whose `CONNECTOR_ID` is the request's
/// `auth_connector` ('' without one), whatever their user, else filtered by `auth_type` (the
/// caller's own user unless an administrator). Answers `{"count": N}`.
fn event_unbind(state: &mut State, ctx: &Ctx, params: &Params) -> Result<Output, RestError> {
    let p = bind_params(ctx, params, false)?;
    let auth_type = params.get("auth_type").map(php::intval);
    if !p.offline
        && let Some(user) = auth_type
        && !ctx.config.user_is_admin
        && user != 1
    {
        return Err(RestError::access_denied(
            "Event unbinding with AUTH_TYPE requires administrator access rights",
        ));
    }
    let user_filter = match auth_type {
        _ if p.offline => None,
        Some(user) => Some(user),
        None if !ctx.config.user_is_admin => Some(1),
        None => None,
    };
    let before = state.bindings.len();
    state.bindings.retain(|b| {
        let matches = b.event == p.event
            && b.handler == p.handler
            && (!p.offline || b.connector == ctx.connector)
            && user_filter.is_none_or(|u| b.user_id == u);
        !matches
    });
    Ok(Output::of(json!({"count": before - state.bindings.len()})))
}

/// `Event::eventTest` (modules/rest/lib/api/event.php): fires `OnRestAppTest` with the
/// application and the call's parameters and answers `1`. `CRestProvider::OnAppEvent` hands the
/// event only to the calling application's handlers, adding `LANGUAGE_ID` and dropping
/// `APP_ID`, so an offline row's `EVENT_DATA` is `{"QUERY": {...}, "LANGUAGE_ID": "en"}`.
/// `ProviderOffline::finalize` writes no row for the handler whose `CONNECTOR_ID` equals the
/// request's `auth_connector` ('' without one): the caller's own connector gets nothing. OAuth
/// only: `handle` refuses `event.*` on a webhook with `WRONG_AUTH_TYPE`.
fn event_test(state: &mut State, ctx: &Ctx, params: &Params) -> Value {
    state.counters.event_tests += 1;
    let data = json!({"QUERY": params.to_value(), "LANGUAGE_ID": "en"});
    let connectors: Vec<String> = state
        .offline_connectors("ONAPPTEST")
        .into_iter()
        .filter(|c| *c != ctx.connector)
        .collect();
    state.raise("ONAPPTEST", data, &connectors, 1, portal_now());
    json!(1)
}

/// `Event::eventGet` (modules/rest/lib/api/event.php): the calling application's bindings in
/// the order they were made, only the caller's own for a user who is not an administrator; an
/// online one as `{event, handler, auth_type, offline: 0}`, an offline one as `{event,
/// connector_id, offline: 1}` (`connector_id` '' for none).
fn event_get(state: &State, ctx: &Ctx) -> Value {
    let items: Vec<Value> = state
        .bindings
        .iter()
        .filter(|b| ctx.config.user_is_admin || b.user_id == 1)
        .map(|b| {
            if b.handler.is_empty() {
                json!({"event": b.event, "connector_id": b.connector, "offline": 1})
            } else {
                json!({"event": b.event, "handler": b.handler, "auth_type": b.user_id.to_string(), "offline": 0})
            }
        })
        .collect();
    Value::Array(items)
}

/// `crm.<type>.get`: the entity as the events raised so far describe it.
fn crm_get(state: &State, kind: &str, params: &Params) -> Result<Output, RestError> {
    let id = params.get("id").map_or(0, php::intval);
    if id <= 0 {
        return Err(RestError::new(
            400,
            "",
            "The parameter id is invalid or not defined.",
        ));
    }
    let id = id as u64;
    let entity = state
        .entities
        .get(&(kind.to_string(), id))
        .ok_or_else(|| RestError::new(400, "", "Not found"))?;
    let mut title = kind.to_lowercase();
    title[..1].make_ascii_uppercase();
    Ok(Output::of(json!({
        "ID": id.to_string(),
        "TITLE": format!("{title} #{id}"),
        "DATE_CREATE": iso(&entity.created),
        "DATE_MODIFY": iso(&entity.modified),
        "CREATED_BY_ID": "1",
        "MODIFY_BY_ID": entity.modified_by.to_string(),
        "ASSIGNED_BY_ID": "1",
    })))
}
