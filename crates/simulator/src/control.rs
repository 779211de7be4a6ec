//! The `/_sim/*` control API for people running `simulate`: raise events, bind, read stats and
//! rows, re-seed the queue's IDs, issue or expire tokens, set faults. JSON in, JSON out.

use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

use super::http::json_value;
use super::rest::portal_now;
use super::{Faults, Inner};

fn bad_request(description: &str) -> Response {
    json_value(
        400,
        &json!({"error": "INVALID_REQUEST", "error_description": description}),
    )
}

/// The deepest JSON a request body may hold: b24eventd's own bound on `EVENT_DATA`
/// (`json_depth::MAX_DEPTH` there), so data just within it can be raised.
const MAX_DEPTH: usize = 1000;

/// Parses a request body; `EVENT_DATA` to raise may be nested up to [`MAX_DEPTH`] levels.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let text = std::str::from_utf8(body).map_err(|error| format!("invalid json body: {error}"))?;
    if deeper_than(text, MAX_DEPTH) {
        return Err(format!(
            "invalid json body: JSON nested deeper than {MAX_DEPTH} levels"
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    // Bounded by the check above, which serde_json's own limit (128) would be far below.
    deserializer.disable_recursion_limit();
    Value::deserialize(&mut deserializer)
        .and_then(|value| deserializer.end().map(|()| value))
        .and_then(serde_json::from_value)
        .map_err(|error| format!("invalid json body: {error}"))
}

/// Whether arrays and objects in `text` nest deeper than `limit` (brackets in strings aside).
fn deeper_than(text: &str, limit: usize) -> bool {
    let mut depth = 0usize;
    let mut bytes = text.bytes();
    while let Some(byte) = bytes.next() {
        match byte {
            b'"' => {
                // Skip the string, escapes included.
                while let Some(byte) = bytes.next() {
                    match byte {
                        b'\\' => {
                            bytes.next();
                        }
                        b'"' => break,
                        _ => {}
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// The most levels `nest` adds: twice the daemon's bound, so data too deep for it can be raised.
const MAX_NEST: usize = 2 * MAX_DEPTH;

#[derive(Debug, Deserialize)]
struct EmitRequest {
    event: String,
    /// `EVENT_DATA`; without it entity changes `{"FIELDS":{"ID":"<id>"}}` are raised.
    data: Option<Value>,
    entity_id: Option<u64>,
    /// Absent: every connector bound to the event.
    connector: Option<String>,
    count: Option<u64>,
    user_id: Option<i64>,
    /// Wraps `EVENT_DATA` in this many levels of `{"NESTED": …}` (deeply nested data, as a
    /// portal module may send); at most [`MAX_NEST`].
    nest: Option<usize>,
}

/// `POST /_sim/emit`: `count` (default 1) distinct entity changes from `entity_id` on (or
/// from the next unused id), or `count` raises of `data`.
pub async fn emit(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    let req: EmitRequest = match parse(&body) {
        Ok(req) => req,
        Err(message) => return bad_request(&message),
    };
    if req.event.trim().is_empty() {
        return bad_request("event is required");
    }
    let count = req.count.unwrap_or(1);
    let user_id = req.user_id.unwrap_or(1);
    let mut state = inner.lock();
    let connectors = match &req.connector {
        Some(connector) => vec![connector.clone()],
        None => state.offline_connectors(&req.event),
    };
    let first_id = req.entity_id.unwrap_or(state.next_entity_id);
    for i in 0..count {
        let mut data = match &req.data {
            Some(data) => data.clone(),
            None => json!({"FIELDS": {"ID": (first_id + i).to_string()}}),
        };
        for _ in 0..req.nest.unwrap_or(0).min(MAX_NEST) {
            data = json!({ "NESTED": data });
        }
        state.raise(&req.event, data, &connectors, user_id, portal_now());
    }
    if req.data.is_none() {
        state.next_entity_id = state.next_entity_id.max(first_id + count);
    }
    let stats = state.stats();
    tracing::info!(event = %req.event, count, connectors = ?connectors, "simulated events raised");
    json_value(200, &json!({"emitted": count, "queued": stats.queued}))
}

#[derive(Debug, Deserialize)]
struct BindRequest {
    event: String,
    #[serde(default)]
    connector: String,
}

/// `POST /_sim/bind`: an offline binding, as `event.bind event_type=offline`.
pub async fn bind(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    let req: BindRequest = match parse(&body) {
        Ok(req) => req,
        Err(message) => return bad_request(&message),
    };
    let added = inner.lock().bind_offline(&req.event, &req.connector);
    json_value(200, &json!({"result": true, "added": added}))
}

/// `GET /_sim/stats`.
pub async fn stats(State(inner): State<Arc<Inner>>) -> Response {
    let stats = inner.lock().stats();
    json_value(200, &serde_json::to_value(stats).unwrap_or(Value::Null))
}

/// `GET /_sim/rows`: the queue table.
pub async fn rows(State(inner): State<Arc<Inner>>) -> Response {
    let rows = inner.lock().sim_rows();
    json_value(200, &serde_json::to_value(rows).unwrap_or(Value::Null))
}

/// `POST /_sim/reseed`: the queue's auto-increment restarts at `MAX(ID) + 1` of the rows present
/// (1 when empty), as after a MySQL (< 8.0) restart; answers the next ID.
pub async fn reseed(State(inner): State<Arc<Inner>>) -> Response {
    let next_id = inner.lock().queue.reseed_ids();
    tracing::info!(next_id, "simulated queue ids re-seeded");
    json_value(200, &json!({"result": true, "next_id": next_id}))
}

/// `POST /_sim/tokens`: a fresh token pair.
pub async fn tokens(State(inner): State<Arc<Inner>>) -> Response {
    let (access_token, refresh_token) = inner.issue_tokens();
    json_value(
        200,
        &json!({"access_token": access_token, "refresh_token": refresh_token}),
    )
}

/// `POST /_sim/expire_tokens`: every access token issued so far expires.
pub async fn expire_tokens(State(inner): State<Arc<Inner>>) -> Response {
    inner.lock().tokens.expire_all();
    json_value(200, &json!({"result": true}))
}

/// `slow_delay` as milliseconds or a humantime string ("250ms", "2s").
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Delay {
    Millis(u64),
    Text(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FaultsRequest {
    fail_500: f64,
    drop_get_after_commit: f64,
    truncate: f64,
    slow: f64,
    slow_delay: Option<Delay>,
    drop_next_gets: u32,
    fail_next_batch_clears: u32,
    html: f64,
    invalid_utf8_next_gets: u32,
    redirect_loop: bool,
    operating_limit_next: u32,
    time_block: Option<Value>,
    fail_gets: bool,
    unparsable_next_gets: u32,
    redirect_to: Option<String>,
    oauth_redirect_to: Option<String>,
    oauth_echo: bool,
}

/// `POST /_sim/faults`: replaces the fault settings (fields default to off).
pub async fn faults(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    let req: FaultsRequest = match parse(&body) {
        Ok(req) => req,
        Err(message) => return bad_request(&message),
    };
    let slow_delay = match req.slow_delay {
        None => Duration::ZERO,
        Some(Delay::Millis(ms)) => Duration::from_millis(ms),
        Some(Delay::Text(text)) => match humantime::parse_duration(&text) {
            Ok(delay) => delay,
            Err(error) => {
                return bad_request(&format!("invalid slow_delay: {error}"));
            }
        },
    };
    let faults = Faults {
        fail_500: req.fail_500,
        drop_get_after_commit: req.drop_get_after_commit,
        truncate: req.truncate,
        slow: req.slow,
        slow_delay,
        drop_next_gets: req.drop_next_gets,
        fail_next_batch_clears: req.fail_next_batch_clears,
        html: req.html,
        invalid_utf8_next_gets: req.invalid_utf8_next_gets,
        redirect_loop: req.redirect_loop,
        operating_limit_next: req.operating_limit_next,
        time_block: req.time_block,
        fail_gets: req.fail_gets,
        unparsable_next_gets: req.unparsable_next_gets,
        redirect_to: req.redirect_to,
        oauth_redirect_to: req.oauth_redirect_to,
        oauth_echo: req.oauth_echo,
    };
    tracing::info!(?faults, "simulated faults set");
    inner.lock().faults = faults;
    json_value(200, &json!({"result": true}))
}
