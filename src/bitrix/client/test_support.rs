//! The unit tests' scripted portal: an axum server answering by a closure, the log of what it
//! saw, a token store, and the settings and tokens the tests start from.

use super::{ClientSettings, PortalClient, lock};
use crate::bitrix::form;
use crate::bitrix::oauth::{TokenStore, Tokens};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request the test server saw.
#[derive(Debug, Clone)]
pub(super) struct Seen {
    pub(super) method: String,
    pub(super) path: String,
    pub(super) query: Value,
    pub(super) headers: HeaderMap,
    pub(super) body: Value,
}

pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) headers: Vec<(&'static str, String)>,
    pub(super) body: String,
}

pub(super) fn ok(result: Value) -> Reply {
    json_reply(200, json!({ "result": result, "time": { "operating": 0 } }))
}

pub(super) fn json_reply(status: u16, body: Value) -> Reply {
    Reply {
        status,
        headers: vec![],
        body: body.to_string(),
    }
}

pub(super) fn api_error(status: u16, code: &str, description: &str) -> Reply {
    json_reply(
        status,
        json!({ "error": code, "error_description": description }),
    )
}

pub(super) fn token_reply(access: &str, refresh: &str) -> Reply {
    json_reply(
        200,
        json!({
            "access_token": access, "refresh_token": refresh, "expires_in": 3600,
            "member_id": "m1", "scope": "crm", "user_id": 1,
            "client_endpoint": "https://portal.bitrix24.com/rest/"
        }),
    )
}

pub(super) type Script = dyn Fn(&Seen, usize) -> Reply + Send + Sync;

#[derive(Clone)]
pub(super) struct Server {
    pub(super) log: Arc<Mutex<Vec<String>>>,
    pub(super) seen: Arc<Mutex<Vec<Seen>>>,
    pub(super) script: Arc<Script>,
    pub(super) count: Arc<AtomicUsize>,
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

pub(super) async fn serve(
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

pub(super) struct TestStore {
    pub(super) log: Arc<Mutex<Vec<String>>>,
    pub(super) fail: AtomicBool,
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

pub(super) fn settings(base: &str) -> ClientSettings {
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
        journal: None,
    }
}

pub(super) fn tokens(access: &str, refresh: &str, expires_in: i64) -> Tokens {
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

pub(super) fn client_with(
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

/// A store no scripted server watches (its log is its own).
pub(super) fn unwatched_store() -> Arc<TestStore> {
    Arc::new(TestStore {
        log: Arc::new(Mutex::new(Vec::new())),
        fail: AtomicBool::new(false),
    })
}

pub(super) fn log(srv: &Server) -> Vec<String> {
    lock(&srv.log).clone()
}
