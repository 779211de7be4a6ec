//! The real pipeline, in-process, against the portal simulator, delivering through an `http`
//! sink to an endpoint in this test: `format = "bitrix-form"` bodies read back by the test's own
//! PHP `parse_str` and compared key by key with what a Bitrix24 outbound webhook posts; Standard
//! Webhooks signatures checked by the test's own verifier; `retry_on` / `dead_on` changing
//! outcomes; sink secrets checked by `validate`.
//!
//! The parser, the base64 codec and the signature scheme below are written from PHP's and the
//! Standard Webhooks spec's rules, not from the sink's code, so a mistake in the sink shows.

use crate::support::*;
use axum::http::{HeaderMap, StatusCode};
use b24eventd_simulator::SimulatorConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
/// Reserved characters and UTF-8 on purpose: they must survive the form encoding.
const APP_TOKEN: &str = "tok&en=1 [x] ü";
const MEMBER_ID: &str = "d897063e1ce7c5eb9f04b9751eef5915";

// -------------------------------------------------------------------------------------------
// A recording endpoint
// -------------------------------------------------------------------------------------------

struct Request {
    headers: HeaderMap,
    body: Vec<u8>,
    status: u16,
}

type Answer = dyn Fn(&HeaderMap, &[u8]) -> u16 + Send + Sync;

/// Records every request (headers, raw body, the status it got) and answers as `answer` says.
async fn endpoint(answer: Arc<Answer>) -> (String, Arc<Mutex<Vec<Request>>>) {
    let log: Arc<Mutex<Vec<Request>>> = Arc::default();
    let seen = log.clone();
    let app = axum::Router::new().route(
        "/events",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let seen = seen.clone();
            let answer = answer.clone();
            async move {
                let status = answer(&headers, &body);
                seen.lock().unwrap().push(Request {
                    headers,
                    body: body.to_vec(),
                    status,
                });
                StatusCode::from_u16(status).unwrap()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, log)
}

// -------------------------------------------------------------------------------------------
// PHP's parse_str, written from PHP's rules (main/php_variables.c)
// -------------------------------------------------------------------------------------------

/// A PHP value as parse_str leaves it: a string, or an ordered array.
#[derive(Debug, Clone, PartialEq)]
enum Php {
    Str(String),
    Arr(Vec<(String, Php)>),
}

fn arr(items: &[(&str, Php)]) -> Php {
    Php::Arr(
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    )
}

fn s(text: &str) -> Php {
    Php::Str(text.to_string())
}

/// `urldecode`: `+` is a space, `%XX` a byte; anything else stays.
fn urldecode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).expect("the sink sends UTF-8")
}

/// `parse_str($body, $result)`.
fn parse_str(body: &str) -> Php {
    let mut root = Php::Arr(Vec::new());
    for pair in body.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (name, path) = php_key(&urldecode(key));
        if name.is_empty() {
            continue;
        }
        let mut segments = vec![Some(name)];
        segments.extend(path);
        assign(&mut root, &segments, Php::Str(urldecode(value)));
    }
    root
}

/// Splits a decoded key as PHP does: the base name (leading spaces dropped, ` ` and `.` made
/// `_`), then `[index]` groups, each ending at the first `]`; `[]` appends (`None`); text after
/// a `]` that does not open another group ends the key; a `[` without `]` is part of the name.
fn php_key(key: &str) -> (String, Vec<Option<String>>) {
    let key = key.trim_start_matches(' ');
    let (base, mut rest) = match key.find('[') {
        Some(open) if key[open..].contains(']') => (&key[..open], &key[open..]),
        _ => (key, ""),
    };
    let name: String = base
        .chars()
        .map(|c| if c == ' ' || c == '.' { '_' } else { c })
        .collect();
    let mut path = Vec::new();
    while let Some(inner) = rest.strip_prefix('[') {
        let Some(close) = inner.find(']') else { break };
        let index = &inner[..close];
        path.push((!index.is_empty()).then(|| index.to_string()));
        rest = &inner[close + 1..];
    }
    (name, path)
}

fn assign(node: &mut Php, path: &[Option<String>], value: Php) {
    if !matches!(node, Php::Arr(_)) {
        *node = Php::Arr(Vec::new());
    }
    let Php::Arr(items) = node else {
        unreachable!()
    };
    let key = match &path[0] {
        Some(k) => k.clone(),
        None => items
            .iter()
            .filter_map(|(k, _)| k.parse::<i64>().ok())
            .max()
            .map_or(0, |m| m + 1)
            .to_string(),
    };
    let slot = match items.iter().position(|(k, _)| *k == key) {
        Some(i) => &mut items[i].1,
        None => {
            items.push((key, Php::Arr(Vec::new())));
            &mut items.last_mut().unwrap().1
        }
    };
    if path.len() == 1 {
        *slot = value;
    } else {
        assign(slot, &path[1..], value);
    }
}

#[test]
fn the_test_parser_follows_php() {
    assert_eq!(
        parse_str("a[b][]=1&a[b][]=2&a[c]=x+y&d.e=%26&f[g]h=1&i[=2&&=3"),
        arr(&[
            (
                "a",
                arr(&[("b", arr(&[("0", s("1")), ("1", s("2"))])), ("c", s("x y"))])
            ),
            ("d_e", s("&")),
            ("f", arr(&[("g", s("1"))])),
            ("i[", s("2")),
        ])
    );
    assert_eq!(
        parse_str("data%5BFIELDS%5D%5BID%5D=45&data%5Bk%5B1%5D%5D=v"),
        arr(&[(
            "data",
            arr(&[("FIELDS", arr(&[("ID", s("45"))])), ("k[1", s("v"))])
        )])
    );
}

// -------------------------------------------------------------------------------------------
// Standard Webhooks verification, written from the spec
// -------------------------------------------------------------------------------------------

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn b64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.bytes() {
        let v = B64.iter().position(|b| *b == c)? as u32;
        bits = (bits << 6) | v;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
            bits &= (1 << count) - 1;
        }
    }
    Some(out)
}

/// base64(HMAC-SHA256(key, "{id}.{timestamp}.{body}")).
fn v1_signature(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> String {
    let mut content = format!("{id}.{timestamp}.").into_bytes();
    content.extend_from_slice(body);
    let tag = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key),
        &content,
    );
    b64_encode(tag.as_ref())
}

/// Verifies a request as a Standard Webhooks receiver: key from `whsec_` + base64, signed
/// content `{id}.{timestamp}.{body}`, any `v1,<base64>` entry of the space-separated
/// `webhook-signature` matching, and the timestamp within 5 minutes of now.
fn verify(secret: &str, headers: &HeaderMap, body: &[u8]) -> Result<(), String> {
    let key = secret
        .strip_prefix("whsec_")
        .and_then(b64_decode)
        .ok_or("bad secret")?;
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .ok_or(format!("no {name} header"))
    };
    let id = header("webhook-id")?;
    let timestamp = header("webhook-timestamp")?;
    let signatures = header("webhook-signature")?;
    let sent: i64 = timestamp.parse().map_err(|_| "timestamp not a number")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if (now - sent).abs() > 300 {
        return Err(format!("timestamp {sent} too far from now {now}"));
    }
    let expected = v1_signature(&key, id, timestamp, body);
    let matched = signatures
        .split(' ')
        .filter_map(|entry| entry.split_once(','))
        .any(|(version, signature)| version == "v1" && signature == expected);
    if matched {
        Ok(())
    } else {
        Err("no v1 signature matches".to_string())
    }
}

#[test]
fn the_test_verifier_follows_the_spec() {
    // The spec's published example, computed with the test's own codec.
    let key = b64_decode(SECRET.strip_prefix("whsec_").unwrap()).unwrap();
    assert_eq!(key.len(), 24);
    assert_eq!(
        v1_signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            br#"{"test": 2432232314}"#
        ),
        "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    );
    let mut headers = HeaderMap::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert_eq!(b64_encode(&b64_decode("AAECAw==").unwrap()), "AAECAw==");
    assert_eq!(b64_encode(b"ab"), "YWI=");
    headers.insert(
        "webhook-id",
        "msg_p5jXN8AQM9LWM0D4loKWxJek".parse().unwrap(),
    );
    headers.insert("webhook-timestamp", now.to_string().parse().unwrap());
    // A signature for another timestamp does not verify.
    headers.insert(
        "webhook-signature",
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
            .parse()
            .unwrap(),
    );
    assert!(verify(SECRET, &headers, br#"{"test": 2432232314}"#).is_err());
}

// -------------------------------------------------------------------------------------------
// What Bitrix24 would have posted
// -------------------------------------------------------------------------------------------

/// `host:port` of `http://host:port/...`.
fn authority(url: &str) -> &str {
    let rest = url.split_once("://").unwrap().1;
    rest.split('/').next().unwrap()
}

/// The array a PHP handler sees for a deal event raised by the simulator, as the docs show an
/// outbound webhook's request (api-reference/events/index.md).
fn bitrix24_post(sim_endpoint: &str, oauth_url: &str, event: &str, id: &str, ts: i64) -> Php {
    let server = format!(
        "{}://{}/rest/",
        oauth_url.split_once("://").unwrap().0,
        authority(oauth_url)
    );
    arr(&[
        ("event", s(event)),
        ("event_handler_id", s("975")),
        ("data", arr(&[("FIELDS", arr(&[("ID", s(id))]))])),
        ("ts", s(&ts.to_string())),
        (
            "auth",
            arr(&[
                ("domain", s(authority(sim_endpoint))),
                ("client_endpoint", s(sim_endpoint)),
                ("server_endpoint", s(&server)),
                ("member_id", s(MEMBER_ID)),
                ("application_token", s(APP_TOKEN)),
            ]),
        ),
    ])
}

fn bitrix_sink(url: &str, extra: &str) -> String {
    format!(
        r#"[sinks.erp]
type = "http"
url = "{url}"
format = "bitrix-form"
bitrix_member_id = "{MEMBER_ID}"
application_token = "{APP_TOKEN}"
event_handler_id = 975
signing_secret = "{SECRET}"
timeout = "2s"
concurrency = 8
{extra}
[sinks.erp.retry]
max_attempts = 50
initial_backoff = "100ms"
max_backoff = "1s"
"#
    )
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers[name].to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitrix_form_bodies_are_what_bitrix24_posts_and_are_signed() {
    init();
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    let (url, log) = endpoint(Arc::new(|_: &HeaderMap, _: &[u8]| 200)).await;
    let config = write_config(dir.path(), &sim, None, "", &bitrix_sink(&url, ""));
    let running = Running::start(&config, &tokens).await;
    emit_deals(&sim, 1, 200);

    wait_for(
        "200 events delivered and cleared upstream",
        Duration::from_secs(60),
        || upstream_empty(&sim) && log.lock().unwrap().len() >= 200,
    )
    .await;
    let journal = running.journal.clone();
    running.stop().await;

    // The event time of every journaled event, by envelope id.
    let timestamps: BTreeMap<String, String> =
        sql_rows(&journal, "SELECT envelope_id, timestamp FROM events")
            .iter()
            .map(|r| {
                (
                    sql_text(r, "envelope_id").unwrap(),
                    sql_text(r, "timestamp").unwrap(),
                )
            })
            .collect();
    assert_eq!(timestamps.len(), 200);

    let requests = log.lock().unwrap();
    assert_eq!(
        requests.len(),
        200,
        "exactly once: no duplicates, no retries"
    );
    assert!(requests.iter().all(|r| r.status == 200));
    let mut ids = BTreeSet::new();
    let mut entities = BTreeSet::new();
    for request in requests.iter() {
        let id = header(&request.headers, "idempotency-key").to_string();
        assert_eq!(header(&request.headers, "webhook-id"), id);
        assert_eq!(
            header(&request.headers, "content-type"),
            "application/x-www-form-urlencoded"
        );
        verify(SECRET, &request.headers, &request.body).unwrap_or_else(|e| panic!("{id}: {e}"));

        let body = std::str::from_utf8(&request.body).unwrap();
        let parsed = parse_str(body);
        let Php::Arr(top) = &parsed else { panic!() };
        let event = match &top[0] {
            (k, Php::Str(v)) if k == "event" => v.clone(),
            other => panic!("first key is not event: {other:?}"),
        };
        let entity = deal_of(&request.body).to_string();
        let ts = chrono::DateTime::parse_from_rfc3339(&timestamps[&id])
            .unwrap()
            .timestamp();
        let expected = bitrix24_post(
            &sim.client_endpoint(),
            &sim.oauth_token_url(),
            &event,
            &entity,
            ts,
        );
        assert_eq!(parsed, expected, "{id}: {body}");
        assert!(ids.insert(id), "duplicate delivery");
        entities.insert((event, entity));
    }
    assert_eq!(entities, expected_entities(1, 200));
    assert!(upstream_empty(&sim));

    // The verifier is not a rubber stamp: another secret or a changed body fails.
    let first = &requests[0];
    let other_secret = format!("whsec_{}", b64_encode(&[42u8; 32]));
    assert!(verify(&other_secret, &first.headers, &first.body).is_err());
    let mut tampered = first.body.clone();
    let at = tampered.iter().position(|b| *b == b'=').unwrap() + 1;
    tampered[at] = if tampered[at] == b'X' { b'Y' } else { b'X' };
    assert!(verify(SECRET, &first.headers, &tampered).is_err());
    assert!(verify(SECRET, &first.headers, &first.body).is_ok());
    eprintln!("200 bitrix-form events in {:?}", started.elapsed());
}

/// The deal id in a bitrix-form body, read with the test's parser.
fn deal_of(body: &[u8]) -> u64 {
    let Php::Arr(top) = parse_str(std::str::from_utf8(body).unwrap()) else {
        panic!()
    };
    let (_, data) = top.iter().find(|(k, _)| k == "data").unwrap();
    let Php::Arr(data) = data else { panic!() };
    let Php::Arr(fields) = &data[0].1 else {
        panic!()
    };
    let Php::Str(id) = &fields[0].1 else { panic!() };
    id.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_on_and_dead_on_change_outcomes() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (sim, tokens) = portal(SimulatorConfig::default()).await;
    // Deals 1..=5: 409 on the first attempt, then 200. Deals 6..=10: 503 every time.
    let attempts: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let counter = attempts.clone();
    let (url, log) = endpoint(Arc::new(move |_: &HeaderMap, body: &[u8]| {
        let deal = deal_of(body);
        let mut seen = counter.lock().unwrap();
        let n = seen.entry(deal).or_insert(0);
        *n += 1;
        match (deal, *n) {
            (1..=5, 1) => 409,
            (1..=5, _) => 200,
            _ => 503,
        }
    }))
    .await;
    let sinks = bitrix_sink(&url, "retry_on = [409]\ndead_on = [503]");
    let config = write_config(dir.path(), &sim, None, "", &sinks);
    let running = Running::start(&config, &tokens).await;
    emit_deals(&sim, 1, 10);

    // The dead ones go to the error lane, come back once and are dead again, then cleared.
    wait_for(
        "every event settled, the dead ones through the error lane",
        Duration::from_secs(30),
        || upstream_empty(&sim) && sim.stats().errored >= 5,
    )
    .await;
    let journal = running.journal.clone();
    running.stop().await;
    assert_eq!(journal.counts().await.unwrap().errored, 5);

    let outcomes: Vec<(String, String, String, Option<String>)> = sql_rows(
        &journal,
        "SELECT e.envelope_id, e.lane, a.outcome, a.error
         FROM delivery_attempts a JOIN events e ON e.id = a.event_id ORDER BY a.id",
    )
    .iter()
    .map(|r| {
        (
            sql_text(r, "envelope_id").unwrap(),
            sql_text(r, "lane").unwrap(),
            sql_text(r, "outcome").unwrap(),
            sql_text(r, "error"),
        )
    })
    .collect();
    let requests = log.lock().unwrap();
    let per_deal = attempts.lock().unwrap().clone();
    for deal in 1..=5 {
        assert_eq!(
            per_deal[&deal], 2,
            "deal {deal}: 409 retried once, then delivered"
        );
    }
    for deal in 6..=10 {
        assert_eq!(
            per_deal[&deal], 2,
            "deal {deal}: dead at once in the normal lane, once more in the error lane"
        );
    }
    assert_eq!(requests.len(), 20);
    let answered = |status: u16| requests.iter().filter(|r| r.status == status).count();
    assert_eq!((answered(409), answered(200), answered(503)), (5, 5, 10));

    let retried: Vec<_> = outcomes.iter().filter(|o| o.2 == "retry").collect();
    assert_eq!(retried.len(), 5, "{outcomes:#?}");
    for (_, lane, _, error) in &retried {
        assert_eq!(lane, "normal");
        assert_eq!(error.as_deref(), Some("http 409 (in retry_on)"));
    }
    let dead: Vec<_> = outcomes.iter().filter(|o| o.2 == "dead").collect();
    assert_eq!(dead.len(), 10, "{outcomes:#?}");
    for (_, _, _, error) in &dead {
        assert_eq!(error.as_deref(), Some("http 503 (in dead_on)"));
    }
    let delivered = outcomes.iter().filter(|o| o.2 == "delivered").count();
    assert_eq!(delivered, 5);
}

// -------------------------------------------------------------------------------------------
// validate: sink secrets are configuration
// -------------------------------------------------------------------------------------------

fn validate(config: &std::path::Path, credentials: Option<&std::path::Path>) -> (i32, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_b24eventd"));
    command
        .args(["-c", config.to_str().unwrap(), "validate"])
        .env_remove("CREDENTIALS_DIRECTORY");
    if let Some(dir) = credentials {
        command.env("CREDENTIALS_DIRECTORY", dir);
    }
    let out = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap(), text)
}

#[test]
fn validate_reads_the_sink_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let portal = r#"
[portals.main]
client_endpoint = "https://example.bitrix24.com/rest/"
client_id = "local.1.2"
client_secret = "s3cr3t"
events = ["ONCRMDEALADD"]
"#;
    let key_file = dir.path().join("erp.key");
    let sink = format!(
        "[sinks.erp]\ntype = \"http\"\nurl = \"http://127.0.0.1:9/events\"\nformat = \"bitrix-form\"\nbitrix_member_id = \"{MEMBER_ID}\"\nsigning_secret_file = \"{}\"\n",
        key_file.display()
    );
    let config = dir.path().join("config.toml");
    std::fs::write(&config, format!("{portal}\n{sink}")).unwrap();
    std::fs::write(&key_file, "whsec_c2hvcnQ=\n").unwrap();

    // The token comes from the credentials directory; the key file is malformed.
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(
        creds.path().join("erp.application_token"),
        "cred-token-42\n",
    )
    .unwrap();
    let (code, text) = validate(&config, Some(creds.path()));
    assert_eq!(code, 78, "{text}");
    assert!(text.contains("sinks.erp.signing_secret_file"), "{text}");
    assert!(text.contains("decodes to 5 bytes"), "{text}");
    assert!(
        !text.contains("c2hvcnQ") && !text.contains("cred-token-42"),
        "{text}"
    );

    std::fs::write(&key_file, format!("{SECRET}\n")).unwrap();
    let (code, text) = validate(&config, Some(creds.path()));
    assert_eq!(code, 0, "{text}");

    // Without the credential: which sink, which key, where it looked.
    let (code, text) = validate(&config, None);
    assert_eq!(code, 78, "{text}");
    assert!(text.contains("sinks.erp.application_token"), "{text}");
    assert!(text.contains("no application token configured"), "{text}");
}
