//! The simulator's HTTP transport (axum): `/rest/...` with the leaky bucket and injected
//! faults, `/old/rest/...` redirects, the OAuth server at `/oauth/token/`, the authorization
//! page at `/oauth/authorize/` (which grants at once and redirects to `/_sim/authorized`), and
//! the routes of the `/_sim` control API.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, LOCATION};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::Response;
use axum::routing::{any, get, post};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::php::Params;
use super::rest::{RestError, unix_now};
use super::{Inner, control, methods};

const JSON: &str = "application/json; charset=utf-8";

pub(crate) fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/rest", any(rest))
        .route("/rest/", any(rest))
        .route("/rest/{*path}", any(rest))
        .route("/old/rest/{*path}", any(moved))
        .route("/oauth/token", any(oauth))
        .route("/oauth/token/", any(oauth))
        .route("/oauth/authorize", get(authorize))
        .route("/oauth/authorize/", get(authorize))
        .route("/_sim/authorized", get(authorized))
        .route("/_sim/emit", post(control::emit))
        .route("/_sim/bind", post(control::bind))
        .route("/_sim/stats", get(control::stats))
        .route("/_sim/rows", get(control::rows))
        .route("/_sim/reseed", post(control::reseed))
        .route("/_sim/tokens", post(control::tokens))
        .route("/_sim/faults", post(control::faults))
        .route("/_sim/expire_tokens", post(control::expire_tokens))
        .fallback(not_found)
        .with_state(inner)
}

pub(crate) fn json_response(status: u16, body: Vec<u8>) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(CONTENT_TYPE, JSON)
        .body(Body::from(body))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

pub(crate) fn json_value(status: u16, value: &Value) -> Response {
    json_response(status, serde_json::to_vec(value).unwrap_or_default())
}

async fn not_found() -> Response {
    json_value(
        404,
        &json!({"error": "NOT_FOUND", "error_description": "Not found"}),
    )
}

/// Query-string parameters with the body merged over them: JSON when the content type says
/// so, a PHP form otherwise (`CRestUtil::getRequestData`; see [`super::php_request`]).
fn request_params(uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Params {
    let query = Params::from_form(uri.query().unwrap_or(""));
    if body.is_empty() {
        return query;
    }
    let is_json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("application/json"));
    let body_params = if is_json {
        Params::from_json(body)
    } else {
        Params::from_form(&String::from_utf8_lossy(body))
    };
    body_params.merge_over(query)
}

/// `host:port` the client used, for URLs in answers.
fn host_of(inner: &Inner, headers: &HeaderMap) -> String {
    headers
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| inner.base_url.trim_start_matches("http://").to_string())
}

/// `method[.json]` or, for an incoming webhook, `<user id>/<code>/method[.json]`.
fn parse_rest_path(path: &str) -> (String, bool) {
    let rest = path.trim_start_matches('/');
    let segments: Vec<&str> = rest.split('/').collect();
    let (method, webhook) = match segments.as_slice() {
        [user, _code, method] if !user.is_empty() && user.bytes().all(|b| b.is_ascii_digit()) => {
            (*method, true)
        }
        _ => (rest, false),
    };
    let method = method.to_lowercase();
    let method = method.strip_suffix(".json").unwrap_or(&method).to_string();
    (method, webhook)
}

/// What happens to a reply on its way out.
#[derive(Debug, Default)]
struct Delivery {
    slow: Option<Duration>,
    drop: bool,
    truncate: bool,
    invalid_utf8: bool,
    unparsable: bool,
}

fn roll(rng: &mut fastrand::Rng, probability: f64) -> bool {
    probability > 0.0 && rng.f64() < probability
}

/// Counts a `/rest` request as being served until it is dropped (answered, or the client went
/// away).
struct Serving<'a>(&'a Inner);

impl<'a> Serving<'a> {
    fn start(inner: &'a Inner) -> Serving<'a> {
        let mut state = inner.lock();
        state.serving += 1;
        state.counters.most_requests_at_once =
            state.counters.most_requests_at_once.max(state.serving);
        Serving(inner)
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.lock().serving -= 1;
    }
}

async fn rest(
    State(inner): State<Arc<Inner>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = unix_now();
    let path = uri.path().strip_prefix("/rest").unwrap_or("");
    let (method, webhook) = parse_rest_path(path);
    let params = request_params(&uri, &headers, &body);
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty());

    let _serving = Serving::start(&inner);
    let (reply, delivery) = {
        let mut state = inner.lock();
        state.counters.requests += 1;
        if let Some(limit) = state.query_limit.as_mut()
            && !limit.admit(Instant::now())
        {
            state.counters.rejected_503 += 1;
            tracing::debug!(method = %method, "rate limit: 503");
            return error_response(&RestError::query_limit());
        }
        let faults = state.faults.clone();
        if roll(&mut state.rng, faults.fail_500) {
            state.counters.faults_500 += 1;
            tracing::debug!(method = %method, "injected fault: 500");
            return error_response(&RestError::internal());
        }
        if faults.redirect_loop {
            state.counters.redirect_loops += 1;
            tracing::debug!(method = %method, "injected fault: redirect loop");
            let tail = uri.path().strip_prefix("/rest/").unwrap_or("");
            let location = format!("http://{}/old/rest/{tail}", host_of(&inner, &headers));
            return Response::builder()
                .status(StatusCode::FOUND)
                .header(LOCATION, location)
                .body(Body::empty())
                .unwrap_or_else(|_| Response::new(Body::empty()));
        }
        if let Some(base) = &faults.redirect_to {
            tracing::debug!(method = %method, "injected fault: redirect to another host");
            return found(&format!("{}{}", base.trim_end_matches('/'), uri.path()));
        }
        if roll(&mut state.rng, faults.html) {
            state.counters.html_pages += 1;
            tracing::debug!(method = %method, "injected fault: HTML page");
            return html_response();
        }
        if faults.operating_limit_next > 0 {
            state.faults.operating_limit_next -= 1;
            state.counters.rejected_429 += 1;
            tracing::debug!(method = %method, "injected fault: 429 OPERATION_TIME_LIMIT");
            let mut body = RestError::operation_time_limit().to_json();
            if let Some(time) = &faults.time_block {
                body["time"] = time.clone();
            }
            let mut response = json_value(429, &body);
            // A real portal sends no Retry-After and bans for 300 s; this one lets a test go on
            // after a second, unless the `time` block says otherwise.
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
            return response;
        }
        let call = methods::RestCall {
            method: method.clone(),
            webhook,
            params,
            bearer,
            started,
        };
        let mut reply = methods::handle(&mut state, &inner.config, call);
        if let Some(time) = &faults.time_block {
            reply.body = with_time_block(&reply.body, time);
        }
        let mut delivery = Delivery::default();
        if reply.ran_get {
            if state.faults.drop_next_gets > 0 {
                state.faults.drop_next_gets -= 1;
                delivery.drop = true;
            } else {
                delivery.drop = roll(&mut state.rng, faults.drop_get_after_commit);
            }
        }
        if !delivery.drop && reply.status == 200 {
            delivery.truncate = roll(&mut state.rng, faults.truncate);
        }
        if reply.ran_get && !delivery.drop && state.faults.invalid_utf8_next_gets > 0 {
            state.faults.invalid_utf8_next_gets -= 1;
            state.counters.invalid_utf8 += 1;
            delivery.invalid_utf8 = true;
        }
        if reply.ran_get && !delivery.drop && state.faults.unparsable_next_gets > 0 {
            state.faults.unparsable_next_gets -= 1;
            state.counters.unparsable += 1;
            delivery.unparsable = true;
        }
        if roll(&mut state.rng, faults.slow) {
            delivery.slow = Some(faults.slow_delay);
        }
        if delivery.drop {
            state.counters.dropped_after_commit += 1;
        }
        if delivery.truncate {
            state.counters.truncated += 1;
        }
        (reply, delivery)
    };
    tracing::debug!(method = %method, status = reply.status, ?delivery, "rest call");

    // A real server answers once its calls have run: the client sees the time it is charged.
    let busy = reply.answer_at - unix_now();
    if busy > 0.0 {
        tokio::time::sleep(Duration::from_secs_f64(busy.min(120.0))).await;
    }
    if let Some(delay) = delivery.slow {
        tokio::time::sleep(delay).await;
    }
    if delivery.drop {
        return dropped_response(reply.status, reply.body);
    }
    if delivery.truncate {
        let mut body = reply.body;
        body.truncate(body.len() / 2);
        return json_response(reply.status, body);
    }
    if delivery.unparsable {
        let mut body = reply.body;
        let marker = br#""EVENT_DATA":"#;
        let at = body
            .windows(marker.len())
            .position(|w| w == marker)
            .map_or(body.len() / 2, |at| at + marker.len());
        body.truncate(at);
        return json_response(reply.status, body);
    }
    if delivery.invalid_utf8 {
        let mut body = reply.body;
        let marker = br#""ID":""#;
        if let Some(at) = body.windows(marker.len()).position(|w| w == marker) {
            body.insert(at + marker.len(), 0xFF);
        }
        return json_response(reply.status, body);
    }
    json_response(reply.status, reply.body)
}

/// `body` with its `time` block, and each `result_time` of a `batch`, replaced by `time`.
fn with_time_block(body: &[u8], time: &Value) -> Vec<u8> {
    let Ok(mut json) = serde_json::from_slice::<Value>(body) else {
        return body.to_vec();
    };
    if let Some(obj) = json.as_object_mut() {
        obj.insert("time".to_string(), time.clone());
    }
    if let Some(times) = json
        .get_mut("result")
        .and_then(|r| r.get_mut("result_time"))
        .and_then(Value::as_object_mut)
    {
        for entry in times.values_mut() {
            *entry = time.clone();
        }
    }
    serde_json::to_vec(&json).unwrap_or_else(|_| body.to_vec())
}

/// What a reverse proxy answers when the portal behind it is down.
fn html_response() -> Response {
    let mut response = Response::new(axum::body::Body::from(
        "<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>",
    ));
    *response.status_mut() = axum::http::StatusCode::BAD_GATEWAY;
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/html"),
    );
    response
}

fn error_response(error: &RestError) -> Response {
    json_value(error.status, &error.to_json())
}

/// Headers and half the body, then the connection is aborted: the client sees a transport
/// error and no JSON, although the call was executed.
fn dropped_response(status: u16, body: Vec<u8>) -> Response {
    let half = body[..body.len() / 2].to_vec();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(half),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "simulated connection drop after commit",
        )),
    ];
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::OK))
        .header(CONTENT_TYPE, JSON)
        .body(Body::from_stream(futures_util::stream::iter(chunks)))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// A 302 to `location`.
fn found(location: &str) -> Response {
    Response::builder()
        .status(StatusCode::FOUND)
        .header(LOCATION, location)
        .body(Body::empty())
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// The portal moved: 302 to the same method under `/rest/` (query kept).
async fn moved(State(inner): State<Arc<Inner>>, uri: Uri, headers: HeaderMap) -> Response {
    let tail = uri.path().strip_prefix("/old/rest/").unwrap_or("");
    let mut location = format!("http://{}/rest/{tail}", host_of(&inner, &headers));
    if let Some(query) = uri.query() {
        location.push('?');
        location.push_str(query);
    }
    Response::builder()
        .status(StatusCode::FOUND)
        .header(LOCATION, location)
        .header(CONTENT_TYPE, JSON)
        .body(Body::empty())
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// The portal's authorization page, as an administrator who is logged in and clicks "Allow"
/// meets it: a known `client_id` gets a fresh code and a redirect to the application's address
/// (here `/_sim/authorized`) with `code`, `state`, `domain`, `member_id`, `scope` and
/// `server_domain`, as Bitrix24's OAuth documentation shows; an unknown one gets an error page.
async fn authorize(State(inner): State<Arc<Inner>>, uri: Uri, headers: HeaderMap) -> Response {
    let params = Params::from_form(uri.query().unwrap_or(""));
    let text = |name: &str| {
        params
            .get(name)
            .and_then(super::php::strval)
            .unwrap_or_default()
    };
    if text("client_id") != inner.config.client_id {
        return Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .header(CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Body::from(
                "The application was not found on this portal.\n",
            ))
            .unwrap_or_else(|_| Response::new(Body::empty()));
    }
    let code = inner.lock().new_authorization_code();
    let host = host_of(&inner, &headers);
    let mut location =
        url::Url::parse(&format!("http://{host}/_sim/authorized")).unwrap_or_else(|_| {
            url::Url::parse("http://127.0.0.1/_sim/authorized").expect("static URL")
        });
    location
        .query_pairs_mut()
        .append_pair("code", &code)
        .append_pair("state", &text("state"))
        .append_pair("domain", &host)
        .append_pair("member_id", &inner.config.member_id)
        .append_pair("scope", SCOPE)
        .append_pair("server_domain", "oauth.bitrix.info");
    Response::builder()
        .status(StatusCode::FOUND)
        .header(LOCATION, location.as_str())
        .body(Body::empty())
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// Stands in for the application's redirect address: the browser lands here after "Allow".
async fn authorized() -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(
            "Authorized. Copy this page's address into `b24eventd auth login`.\n",
        ))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// The scope the simulated application holds.
const SCOPE: &str = "crm,task,user,placement,pull";

/// The OAuth server: `grant_type=refresh_token` (strict rotation) and
/// `grant_type=authorization_code`, from a query string or a form/JSON body.
async fn oauth(
    State(inner): State<Arc<Inner>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params = request_params(&uri, &headers, &body);
    let text = |name: &str| {
        params
            .get(name)
            .and_then(super::php::strval)
            .unwrap_or_default()
    };
    let grant_type = text("grant_type");
    let host = host_of(&inner, &headers);
    let oauth_error = |status: u16, code: &str, description: &str| {
        json_value(
            status,
            &json!({"error": code, "error_description": description}),
        )
    };

    let mut state = inner.lock();
    if let Some(base) = &state.faults.oauth_redirect_to {
        let mut location = format!("{}{}", base.trim_end_matches('/'), uri.path());
        if let Some(query) = uri.query() {
            location.push('?');
            location.push_str(query);
        }
        tracing::debug!("injected fault: token request redirected");
        return found(&location);
    }
    if state.faults.oauth_echo {
        tracing::debug!("injected fault: token request echoed");
        return oauth_error(
            400,
            "invalid_request",
            &format!(
                "cannot handle {} (client_secret {})",
                uri.query().unwrap_or(""),
                text("client_secret")
            ),
        );
    }
    let refreshing = grant_type == "refresh_token";
    if !matches!(grant_type.as_str(), "refresh_token" | "authorization_code") {
        return oauth_error(400, "invalid_request", "Unsupported or missing grant_type");
    }
    if text("client_id") != inner.config.client_id
        || text("client_secret") != inner.config.client_secret
    {
        if refreshing {
            state.counters.rejected_refresh += 1;
        }
        tracing::debug!(grant_type = %grant_type, "oauth: invalid client");
        return oauth_error(401, "invalid_client", "Invalid client credentials");
    }
    let now = unix_now();
    let issued = {
        let super::portal::State { tokens, rng, .. } = &mut *state;
        if refreshing {
            tokens.refresh(&text("refresh_token"), rng, now)
        } else {
            tokens.redeem(&text("code"), rng, now)
        }
    };
    let Some(issued) = issued else {
        if refreshing {
            state.counters.rejected_refresh += 1;
        }
        tracing::debug!(grant_type = %grant_type, "oauth: invalid grant");
        return oauth_error(400, "invalid_grant", "Invalid or expired grant");
    };
    if refreshing {
        state.counters.token_refreshes += 1;
    }
    drop(state);
    tracing::debug!(grant_type = %grant_type, "oauth: tokens issued");
    json_value(
        200,
        &json!({
            "access_token": issued.access_token,
            "client_endpoint": format!("http://{host}{}/rest/", inner.prefix),
            "domain": host,
            "expires": issued.expires,
            "expires_in": issued.expires_in,
            "member_id": inner.config.member_id,
            "refresh_token": issued.refresh_token,
            "scope": SCOPE,
            "server_endpoint": format!("http://{host}{}/rest/", inner.prefix),
            "status": "L",
            "user_id": 1,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rest_paths() {
        assert_eq!(
            parse_rest_path("/event.offline.get"),
            ("event.offline.get".into(), false)
        );
        assert_eq!(
            parse_rest_path("/Event.Offline.Get.json"),
            ("event.offline.get".into(), false)
        );
        assert_eq!(
            parse_rest_path("/1/abc123/event.offline.get.json"),
            ("event.offline.get".into(), true)
        );
        assert_eq!(
            parse_rest_path("/x/abc/event.get"),
            ("x/abc/event.get".into(), false)
        );
        assert_eq!(parse_rest_path("/"), (String::new(), false));
    }
}
