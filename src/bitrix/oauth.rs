//! OAuth 2.0 tokens of a Bitrix24 application: the token pair, where it is persisted, the two
//! requests to the authorization server (refresh and authorization-code exchange),
//! and the authorization page with the answer an operator pastes back from it.
//!
//! Every refresh returns a **new** refresh token and the old one may die at once, so a caller
//! must persist the new pair before relying on it (see [`TokenStore`]).

use super::body::{BodyError, read_body};
use super::error::{
    BitrixError, EXCHANGE_METHOD, REFRESH_METHOD, codes, describe_unparsable, invalid_response,
    sanitize_snippet,
};
use super::form::percent_encode;
use super::types::parse_error;
use chrono::{DateTime, Utc};
use serde_json::Value;
use std::fmt;

/// Largest token-server answer read (a real one is well under 1 KiB).
const MAX_TOKEN_BODY: usize = 1024 * 1024;

/// An access/refresh token pair with what the authorization server said about it.
#[derive(Clone, PartialEq)]
pub struct Tokens {
    pub access_token: String,
    pub refresh_token: String,
    /// When the access token expires (it lives one hour); `None` when unknown.
    pub expires_at: Option<DateTime<Utc>>,
    pub member_id: Option<String>,
    pub scope: Option<String>,
    pub client_endpoint: Option<String>,
    pub user_id: Option<i64>,
}

impl fmt::Debug for Tokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("access_token", &redacted(&self.access_token))
            .field("refresh_token", &redacted(&self.refresh_token))
            .field("expires_at", &self.expires_at)
            .field("member_id", &self.member_id)
            .field("scope", &self.scope)
            .field("client_endpoint", &self.client_endpoint)
            .field("user_id", &self.user_id)
            .finish()
    }
}

fn redacted(secret: &str) -> &'static str {
    if secret.is_empty() {
        "<empty>"
    } else {
        "<redacted>"
    }
}

impl Tokens {
    /// A token pair as an operator or an installation callback hands it over, with nothing else
    /// known yet. An empty access token counts as expired, so the first call refreshes.
    pub fn from_pair(access_token: impl Into<String>, refresh_token: impl Into<String>) -> Tokens {
        Tokens {
            access_token: access_token.into(),
            refresh_token: refresh_token.into(),
            expires_at: None,
            member_id: None,
            scope: None,
            client_endpoint: None,
            user_id: None,
        }
    }

    /// Registers both tokens with [`crate::redact`] as `portal`'s current pair: from now on no
    /// log line or output shows them (nor, for a few rotations, the pairs before them).
    pub(super) fn register_secrets(&self, portal: &str) {
        crate::redact::register_rotating(&format!("{portal}.access_token"), &self.access_token);
        crate::redact::register_rotating(&format!("{portal}.refresh_token"), &self.refresh_token);
    }

    /// True when the access token is missing, or known to expire before `now + margin`.
    pub(super) fn expires_within(&self, margin: chrono::Duration, now: DateTime<Utc>) -> bool {
        self.access_token.is_empty() || self.expires_at.is_some_and(|at| at - margin <= now)
    }
}

/// Durable storage of a portal's tokens (the journal implements it).
pub trait TokenStore: Send + Sync {
    /// Persists the pair; the tokens are durable when the future resolves with `Ok`.
    fn save<'a>(
        &'a self,
        portal: &'a str,
        tokens: &'a Tokens,
    ) -> crate::BoxFuture<'a, anyhow::Result<()>>;

    /// The pair stored now, which another process (`auth login`, `doctor`, a second daemon)
    /// may have written since this one read it. A store that cannot read back answers `None`.
    fn load<'a>(
        &'a self,
        _portal: &'a str,
    ) -> crate::BoxFuture<'a, anyhow::Result<Option<Tokens>>> {
        Box::pin(async { Ok(None) })
    }
}

/// Renews the token pair: `GET token_url?grant_type=refresh_token&client_id&client_secret&refresh_token`.
/// `invalid_grant` (refresh token expired or revoked) and `invalid_client` are Fatal.
pub(super) async fn refresh(
    http: &reqwest::Client,
    token_url: &str,
    client_id: &str,
    client_secret: &str,
    refresh_token: &str,
    portal: &str,
) -> Result<Tokens, BitrixError> {
    let params = [
        ("grant_type", "refresh_token"),
        ("client_id", client_id),
        ("client_secret", client_secret),
        ("refresh_token", refresh_token),
    ];
    token_request(
        http,
        token_url,
        &params,
        portal,
        REFRESH_METHOD,
        &[client_secret, refresh_token],
    )
    .await
}

/// Exchanges an authorization code (from the OAuth redirect) for a token pair:
/// `GET token_url?grant_type=authorization_code&client_id&client_secret&code`.
pub(super) async fn exchange_code(
    http: &reqwest::Client,
    token_url: &str,
    client_id: &str,
    client_secret: &str,
    code: &str,
    portal: &str,
) -> Result<Tokens, BitrixError> {
    let params = [
        ("grant_type", "authorization_code"),
        ("client_id", client_id),
        ("client_secret", client_secret),
        ("code", code),
    ];
    token_request(
        http,
        token_url,
        &params,
        portal,
        EXCHANGE_METHOD,
        &[client_secret, code],
    )
    .await
}

/// The page where a portal user grants the application access (b24restdocs, "Full OAuth
/// authorization"): `<portal>/oauth/authorize/?client_id=…&state=…` on the portal's own host,
/// taken from `client_endpoint`. After the grant the browser is sent to the application's
/// redirect address with `code`, `state`, `domain`, `member_id`, `scope` in the query.
pub(crate) fn authorize_url(
    client_endpoint: &str,
    client_id: &str,
    state: &str,
) -> Result<String, String> {
    let mut url = reqwest::Url::parse(client_endpoint.trim())
        .map_err(|e| format!("client_endpoint {client_endpoint} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "client_endpoint {client_endpoint} is not an http(s) URL with a host"
        ));
    }
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_fragment(None);
    url.set_path("/oauth/authorize/");
    url.query_pairs_mut()
        .clear()
        .append_pair("client_id", client_id)
        .append_pair("state", state);
    Ok(url.to_string())
}

/// What the operator pasted after authorizing: the redirected address, its query string, or
/// the bare code. Only `code` is always there.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct LoginAnswer {
    /// The authorization code (valid for 30 seconds, single use).
    pub(crate) code: String,
    /// The `state` echoed back, when the address was pasted.
    pub(crate) state: Option<String>,
    /// The portal's domain as the redirect named it.
    pub(crate) domain: Option<String>,
    /// The portal's `member_id` as the redirect named it.
    pub(crate) member_id: Option<String>,
}

impl fmt::Debug for LoginAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginAnswer")
            .field("code", &redacted(&self.code))
            .field("state", &self.state)
            .field("domain", &self.domain)
            .field("member_id", &self.member_id)
            .finish()
    }
}

/// Reads one pasted line: a whole redirected URL, a query string, or only the code. Errors say
/// what to paste instead and never quote the input (it may hold a live code).
pub(crate) fn parse_login_answer(input: &str) -> Result<LoginAnswer, String> {
    let input = input.trim();
    if input.is_empty() {
        return Err("nothing was pasted: paste the address the browser was redirected to, or the code in it".to_string());
    }
    let looks_like_query = input.contains('=') || input.contains('?') || input.contains("://");
    if !looks_like_query {
        if !input
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err("the pasted text is neither an address nor an authorization code (letters and digits)".to_string());
        }
        return Ok(LoginAnswer {
            code: input.to_string(),
            state: None,
            domain: None,
            member_id: None,
        });
    }
    let url = if input.contains("://") {
        reqwest::Url::parse(input)
    } else {
        reqwest::Url::parse(&format!(
            "http://localhost/?{}",
            input.trim_start_matches('?')
        ))
    }
    .map_err(|e| format!("the pasted address cannot be read: {e}"))?;
    let mut answer = LoginAnswer {
        code: String::new(),
        state: None,
        domain: None,
        member_id: None,
    };
    let mut error = None;
    let mut error_description = String::new();
    for (key, value) in url.query_pairs() {
        let value = value.trim().to_string();
        match key.as_ref() {
            "code" => answer.code = value,
            "state" => answer.state = Some(value),
            "domain" => answer.domain = Some(value),
            "member_id" => answer.member_id = Some(value),
            "error" => error = Some(value),
            "error_description" => error_description = value,
            _ => {}
        }
    }
    if let Some(error) = error {
        let detail = if error_description.is_empty() {
            String::new()
        } else {
            format!(" ({error_description})")
        };
        return Err(format!(
            "the portal refused the authorization: {error}{detail}"
        ));
    }
    if answer.code.is_empty() {
        return Err("the pasted address has no code parameter: paste the whole address the browser was redirected to after \"Allow\", or only the code".to_string());
    }
    Ok(answer)
}

/// Whether a redirect's `domain` names the portal of `client_endpoint` (host, or host:port).
pub(crate) fn domain_matches(client_endpoint: &str, domain: &str) -> bool {
    let Ok(url) = reqwest::Url::parse(client_endpoint.trim()) else {
        return false;
    };
    let Some(host) = url.host_str() else {
        return false;
    };
    let domain = domain.trim().trim_end_matches('/');
    let domain = domain
        .strip_prefix("https://")
        .or_else(|| domain.strip_prefix("http://"))
        .unwrap_or(domain);
    if domain.eq_ignore_ascii_case(host) {
        return true;
    }
    match url.port_or_known_default() {
        Some(port) => domain.eq_ignore_ascii_case(&format!("{host}:{port}")),
        None => false,
    }
}

async fn token_request(
    http: &reqwest::Client,
    token_url: &str,
    params: &[(&str, &str)],
    portal: &str,
    method: &str,
    secrets: &[&str],
) -> Result<Tokens, BitrixError> {
    let mut url = token_url.to_string();
    url.push(if url.contains('?') { '&' } else { '?' });
    let query: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect();
    url.push_str(&query.join("&"));

    let started = std::time::Instant::now();
    let response = http
        .get(&url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| BitrixError::transport(portal, method, &e))?;
    let status = response.status().as_u16();
    if response.status().is_redirection() {
        return Err(redirect_refused(&response, token_url, portal, method));
    }
    let body = read_body(response, MAX_TOKEN_BODY)
        .await
        .map_err(|e| match e {
            BodyError::Transport(e) => BitrixError::transport(portal, method, &e),
            BodyError::TooLarge => BitrixError::new(
                portal,
                method,
                codes::INVALID_RESPONSE,
                format!("http {status}: the answer exceeds {MAX_TOKEN_BODY} bytes"),
                Some(status),
            )
            .with_maybe_executed(true),
        })?;
    tracing::debug!(
        portal,
        method,
        status,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "token request answered"
    );
    parse_token_answer(&body, status, portal, method, secrets, Utc::now())
}

/// A redirect from the token server is never followed: the request carries the client secret
/// and a refresh token in its query, and the HTTP client follows no redirect. The error names
/// where it pointed (without its query) so an operator can check it and set `oauth_token_url`.
fn redirect_refused(
    response: &reqwest::Response,
    token_url: &str,
    portal: &str,
    method: &str,
) -> BitrixError {
    let status = response.status().as_u16();
    let target = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|location| reqwest::Url::parse(token_url).ok()?.join(location).ok())
        .map(|mut url| {
            url.set_query(None);
            url.set_fragment(None);
            let _ = url.set_username("");
            let _ = url.set_password(None);
            sanitize_snippet(url.as_str(), &[], 300)
        });
    let what = match &target {
        Some(target) => format!(
            "http {status}: the token server redirected to {target}; not followed (the request \
             carries the client secret): if that is the token server now, set oauth_token_url to it"
        ),
        None => format!("http {status}: the token server redirected; not followed"),
    };
    BitrixError::new(portal, method, codes::REDIRECT_REFUSED, what, Some(status))
}

/// Turns the token server's answer into tokens or a classified error. Nothing of a body that
/// looks like JSON is quoted in errors, since a truncated one may hold fresh tokens.
fn parse_token_answer(
    body: &[u8],
    status: u16,
    portal: &str,
    method: &str,
    secrets: &[&str],
    now: DateTime<Utc>,
) -> Result<Tokens, BitrixError> {
    let invalid = |what: String| invalid_response(portal, method, status, what);
    let json: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(_) => return Err(invalid(describe_unparsable(body, secrets, false))),
    };
    if let Some((code, description)) = parse_error(&json) {
        let description = sanitize_snippet(&description, secrets, 300);
        return Err(BitrixError::from_api(
            portal,
            method,
            &code,
            &description,
            Some(status),
        ));
    }
    if !(200..300).contains(&status) {
        return Err(invalid(
            "no tokens and no error code in the answer".to_string(),
        ));
    }
    let string = |key: &str| -> Option<String> {
        match json.get(key)? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let integer = |key: &str| -> Option<i64> {
        match json.get(key)? {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    };
    let access_token = string("access_token")
        .ok_or_else(|| invalid("the answer has no access_token".to_string()))?;
    let refresh_token = string("refresh_token")
        .ok_or_else(|| invalid("the answer has no refresh_token".to_string()))?;
    // expires_in is relative and so immune to clock skew; expires is the server's clock.
    let expires_at = match integer("expires_in") {
        Some(secs) if secs > 0 => Some(now + chrono::Duration::seconds(secs)),
        _ => integer("expires").and_then(|at| DateTime::<Utc>::from_timestamp(at, 0)),
    };
    let tokens = Tokens {
        access_token,
        refresh_token,
        expires_at,
        member_id: string("member_id"),
        scope: string("scope"),
        client_endpoint: string("client_endpoint"),
        user_id: integer("user_id"),
    };
    tokens.register_secrets(portal);
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitrix::error::ErrorClass;

    const REFRESH_EXAMPLE: &str = r#"{
        "access_token": "ydtj8pho532wydb5ixk78ol7uqlb7sch",
        "client_endpoint": "https://portal.bitrix24.com/rest/",
        "domain": "oauth.bitrix.info",
        "expires": 1780319382,
        "expires_in": 3600,
        "member_id": "a223c6b3710f85df22e9377d6c4f7553",
        "refresh_token": "3s6lr4kr3cv2od4v853gvrchb875bwxb",
        "scope": "crm,entity,im,task",
        "server_endpoint": "https://oauth.bitrix.info/rest/",
        "status": "F",
        "user_id": 67
    }"#;

    fn parse(body: &str, status: u16) -> Result<Tokens, BitrixError> {
        let now = DateTime::<Utc>::from_timestamp(1_780_315_782, 0).unwrap();
        parse_token_answer(
            body.as_bytes(),
            status,
            "main",
            REFRESH_METHOD,
            &["sekret", "oldrefresh"],
            now,
        )
    }

    #[test]
    fn parses_the_documented_refresh_answer() {
        let t = parse(REFRESH_EXAMPLE, 200).unwrap();
        assert_eq!(t.access_token, "ydtj8pho532wydb5ixk78ol7uqlb7sch");
        assert_eq!(t.refresh_token, "3s6lr4kr3cv2od4v853gvrchb875bwxb");
        assert_eq!(t.expires_at.unwrap().timestamp(), 1_780_315_782 + 3600);
        assert_eq!(
            t.member_id.as_deref(),
            Some("a223c6b3710f85df22e9377d6c4f7553")
        );
        assert_eq!(t.scope.as_deref(), Some("crm,entity,im,task"));
        assert_eq!(
            t.client_endpoint.as_deref(),
            Some("https://portal.bitrix24.com/rest/")
        );
        assert_eq!(t.user_id, Some(67));
    }

    #[test]
    fn falls_back_to_absolute_expiry() {
        let t = parse(
            r#"{"access_token": "a", "refresh_token": "r", "expires": 1780319382, "user_id": "5"}"#,
            200,
        )
        .unwrap();
        assert_eq!(t.expires_at.unwrap().timestamp(), 1780319382);
        assert_eq!(t.user_id, Some(5));
    }

    #[test]
    fn oauth_errors_are_classified() {
        let e = parse(
            r#"{"error": "invalid_grant", "error_description": "Invalid grant"}"#,
            400,
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::Fatal);
        assert_eq!(e.code, "invalid_grant");
        assert!(e.to_string().contains("auth login --portal main"), "{e}");
        let e = parse(
            r#"{"error": "invalid_client", "error_description": "Invalid client"}"#,
            401,
        )
        .unwrap_err();
        assert_eq!(e.class, ErrorClass::Fatal);
        let e = parse("<html><body>Bad gateway</body></html>", 502).unwrap_err();
        assert_eq!(
            (e.class, e.code.as_str(), e.maybe_executed),
            (ErrorClass::Retryable, "INVALID_RESPONSE", true)
        );
        let e = parse("Not found", 404).unwrap_err();
        assert_eq!(e.class, ErrorClass::Rejected);
    }

    #[test]
    fn errors_never_quote_tokens_or_secrets() {
        let e = parse(r#"{"access_token": "fresh-access-1234", "refresh_tok"#, 200).unwrap_err();
        assert_eq!(e.class, ErrorClass::Retryable);
        assert!(e.maybe_executed);
        assert!(!e.to_string().contains("fresh-access-1234"), "{e}");
        let e = parse(
            "proxy echo: client_secret=sekret&refresh_token=oldrefresh",
            502,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            !msg.contains("sekret") && !msg.contains("oldrefresh"),
            "{msg}"
        );
        let e = parse(
            r#"{"error": "invalid_request", "error_description": "bad oldrefresh"}"#,
            400,
        )
        .unwrap_err();
        assert!(!e.to_string().contains("oldrefresh"));
        let e = parse(r#"{"refresh_token": "r"}"#, 200).unwrap_err();
        assert!(e.description.contains("access_token"));
    }

    #[test]
    fn debug_redacts_both_tokens() {
        let t = parse(REFRESH_EXAMPLE, 200).unwrap();
        let dbg = format!("{t:?}");
        assert!(!dbg.contains("ydtj8pho532wydb5ixk78ol7uqlb7sch"), "{dbg}");
        assert!(!dbg.contains("3s6lr4kr3cv2od4v853gvrchb875bwxb"), "{dbg}");
        assert!(
            dbg.contains("<redacted>") && dbg.contains("a223c6b3710f85df22e9377d6c4f7553"),
            "{dbg}"
        );
    }

    #[test]
    fn authorize_url_is_on_the_portal_host() {
        assert_eq!(
            authorize_url(
                "https://example.bitrix24.com/rest/",
                "local.65f1c2.12345678",
                "s1"
            )
            .unwrap(),
            "https://example.bitrix24.com/oauth/authorize/?client_id=local.65f1c2.12345678&state=s1"
        );
        assert_eq!(
            authorize_url("http://127.0.0.1:8024/rest/", "a b", "x&y").unwrap(),
            "http://127.0.0.1:8024/oauth/authorize/?client_id=a+b&state=x%26y"
        );
        assert!(authorize_url("example.bitrix24.com/rest/", "c", "s").is_err());
    }

    #[test]
    fn login_answers_of_every_shape() {
        let docs = "https://www.applicationhost.com/application/?code=avmocpghblyi01m3h42bljvqtyd19sw1\
                    &state=JJHgsdgfkdaslg7lbadsfg&domain=portal.bitrix24.com\
                    &member_id=a223c6b3710f85df22e9377d6c4f7553&scope=crm%2Centity%2Cim%2Ctask\
                    &server_domain=oauth.bitrix.info";
        let a = parse_login_answer(docs).unwrap();
        assert_eq!(a.code, "avmocpghblyi01m3h42bljvqtyd19sw1");
        assert_eq!(a.state.as_deref(), Some("JJHgsdgfkdaslg7lbadsfg"));
        assert_eq!(a.domain.as_deref(), Some("portal.bitrix24.com"));
        assert_eq!(
            a.member_id.as_deref(),
            Some("a223c6b3710f85df22e9377d6c4f7553")
        );
        let q = parse_login_answer("?code=abc123&state=s").unwrap();
        assert_eq!((q.code.as_str(), q.state.as_deref()), ("abc123", Some("s")));
        let bare = parse_login_answer("  avmocpghblyi01m3h42bljvqtyd19sw1\n").unwrap();
        assert_eq!(bare.code, "avmocpghblyi01m3h42bljvqtyd19sw1");
        assert_eq!(bare.state, None);

        let err = parse_login_answer("https://app.example/?state=s&domain=x").unwrap_err();
        assert!(err.contains("no code"), "{err}");
        let err = parse_login_answer(
            "https://app.example/?error=access_denied&error_description=User+denied",
        )
        .unwrap_err();
        assert!(
            err.contains("access_denied") && err.contains("User denied"),
            "{err}"
        );
        assert!(parse_login_answer("   ").is_err());
        let err = parse_login_answer("secret code with spaces").unwrap_err();
        assert!(!err.contains("secret"), "the input is never quoted: {err}");
        let dbg = format!("{a:?}");
        assert!(!dbg.contains("avmocpghblyi01m3h42bljvqtyd19sw1"), "{dbg}");
    }

    #[test]
    fn redirect_domains_are_matched_to_the_endpoint() {
        assert!(domain_matches(
            "https://example.bitrix24.com/rest/",
            "example.bitrix24.com"
        ));
        assert!(domain_matches(
            "https://example.bitrix24.com/rest/",
            "EXAMPLE.bitrix24.com"
        ));
        assert!(domain_matches(
            "https://example.bitrix24.com/rest/",
            "example.bitrix24.com:443"
        ));
        assert!(domain_matches(
            "http://127.0.0.1:8024/rest/",
            "127.0.0.1:8024"
        ));
        assert!(!domain_matches(
            "https://example.bitrix24.com/rest/",
            "other.bitrix24.com"
        ));
        assert!(!domain_matches(
            "http://127.0.0.1:8024/rest/",
            "127.0.0.1:9000"
        ));
    }

    #[test]
    fn expiry_margin() {
        let now = Utc::now();
        let mut t = parse(REFRESH_EXAMPLE, 200).unwrap();
        t.expires_at = Some(now + chrono::Duration::seconds(30));
        assert!(t.expires_within(chrono::Duration::seconds(60), now));
        t.expires_at = Some(now + chrono::Duration::seconds(3000));
        assert!(!t.expires_within(chrono::Duration::seconds(60), now));
        t.expires_at = None;
        assert!(!t.expires_within(chrono::Duration::seconds(60), now));
        t.access_token.clear();
        assert!(t.expires_within(chrono::Duration::seconds(60), now));
    }
}
