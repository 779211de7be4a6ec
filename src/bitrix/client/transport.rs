//! The one request path, [`PortalClient::call`]: the JSON body with `auth` and
//! `auth_connector`, the POST through the shared `reqwest` client, redirects within the
//! configured host, and the classification of every answer (counted in `ClientStats`).

use super::limits::MAX_OPERATING_WAIT;
use super::limits::limit_backoff;
use super::stats::Answer;
use super::tokens::RefreshTrigger;
use super::{PortalClient, lock};
use crate::bitrix::body::{BodyError, read_body};
use crate::bitrix::error::{
    self, BitrixError, ErrorClass, codes, describe_unparsable, invalid_response, sanitize_snippet,
};
use crate::bitrix::operating::Answered;
use crate::bitrix::types::{ApiResponse, parse_error, parse_time};
use serde_json::{Map, Value};
use std::time::{Duration, Instant};

/// Largest response body read from a portal; a bigger one is an `INVALID_RESPONSE`.
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Redirect hops followed per request (the portal moved to a new domain).
const MAX_REDIRECTS: usize = 3;
const USER_AGENT: &str = concat!("b24eventd/", env!("CARGO_PKG_VERSION"));

/// The HTTP client every portal client uses: redirects not followed (a 302 is handled by the
/// client), 30 s to connect, 60 s per request unless the call sets its own (REST calls use the
/// portal's `request_timeout`; OAuth calls keep the 60 s).
pub(crate) fn http_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .connect_timeout(Duration::from_secs(30))
        .user_agent(USER_AGENT)
        .build()
}

impl PortalClient {
    /// Calls a REST method: POST `client_endpoint + method` with `params` as a JSON object plus
    /// `auth` (and `auth_connector` when configured and the caller did not pass one; a caller's
    /// `"auth_connector": null` sends none).
    ///
    /// Waits for the client-side bucket before every request; waits out 503/429 limit answers
    /// for up to `max_limit_wait`; refreshes the access token when it expires within 60 s and
    /// once after an auth error (then repeats the call once); follows up to 3 domain redirects.
    pub(crate) async fn call(
        &self,
        method: &str,
        params: Value,
    ) -> Result<ApiResponse, BitrixError> {
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
                        err.class = error::classify(codes::INVALID_RESPONSE, Some(status));
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
        match ApiResponse::from_body(json) {
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

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::bitrix::client::GetRequest;
    use serde_json::json;

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
        let store = unwatched_store();
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
        let store = unwatched_store();
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
}
