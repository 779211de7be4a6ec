//! Errors of the Bitrix24 client and their classification: what the caller should do about them.
//!
//! Bitrix24 reports errors as `{"error": CODE, "error_description": TEXT}`; its HTTP statuses vary
//! between builds, so the `error` string decides the class and the status is used only
//! when there is none. The client adds a few codes of its own, listed in [`codes`].

use std::fmt;
use std::time::Duration;

/// Method names used in errors and logs for the two token requests (`oauth` sends them; the
/// hints of an `invalid_grant` depend on which one failed).
pub(super) const REFRESH_METHOD: &str = "oauth token refresh";
pub(super) const EXCHANGE_METHOD: &str = "oauth code exchange";

/// What a caller should do with a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Transient (limits, 5xx, transport, broken bodies): try again later.
    Retryable,
    /// The access token was refused: refresh it and repeat the call.
    Auth,
    /// The portal cannot work until an operator acts (license, auth type, rights, credentials).
    Fatal,
    /// The server refused this call; repeating it unchanged will not help.
    Rejected,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retryable => "retryable",
            ErrorClass::Auth => "auth",
            ErrorClass::Fatal => "fatal",
            ErrorClass::Rejected => "rejected",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Codes the client itself puts into [`BitrixError::code`] (Bitrix24 never sends these).
pub(crate) mod codes {
    /// The request did not complete (timeout, reset, refused, TLS, DNS).
    pub const TRANSPORT: &str = "TRANSPORT";
    /// The body was not the JSON Bitrix24 sends (HTML error page, truncated, wrong shape, too large).
    pub const INVALID_RESPONSE: &str = "INVALID_RESPONSE";
    /// No OAuth tokens are known for the portal.
    pub const NO_TOKENS: &str = "NO_TOKENS";
    /// New OAuth tokens could not be persisted by the token store.
    pub const JOURNAL_WRITE_FAILED: &str = "JOURNAL_WRITE_FAILED";
    /// The client settings are unusable (bad endpoint URL, HTTP client could not be built).
    pub const INVALID_SETTINGS: &str = "INVALID_SETTINGS";
    /// The portal redirected more often than allowed.
    pub const TOO_MANY_REDIRECTS: &str = "TOO_MANY_REDIRECTS";
    /// The portal redirected somewhere the client will not follow (not a REST endpoint, or a
    /// downgrade from https to http).
    pub const REDIRECT_REFUSED: &str = "REDIRECT_REFUSED";
    /// The caller's parameters could not be sent (not a JSON object, duplicate batch keys).
    pub const INVALID_PARAMS: &str = "INVALID_PARAMS";
    /// More than 50 batch sub-commands (the server's own code for the same thing).
    pub const BATCH_LENGTH_EXCEEDED: &str = "ERROR_BATCH_LENGTH_EXCEEDED";
}

const RETRYABLE: &[&str] = &[
    "QUERY_LIMIT_EXCEEDED",
    "OPERATION_TIME_LIMIT",
    "INTERNAL_SERVER_ERROR",
    "ERROR_UNEXPECTED_ANSWER",
    "OVERLOAD_LIMIT",
    // The portal could not reach its authorization server to check the token.
    "CONNECTION_ERROR",
    codes::TRANSPORT,
    codes::JOURNAL_WRITE_FAILED,
];

const AUTH: &[&str] = &["expired_token", "invalid_token", "NO_AUTH_FOUND"];

const FATAL: &[&str] = &[
    "WRONG_LICENSE",
    "WRONG_AUTH_TYPE",
    "ACCESS_DENIED",
    "insufficient_scope",
    "invalid_scope",
    "invalid_grant",
    "invalid_client",
    "INVALID_CREDENTIALS",
    "user_access_error",
    "PAYMENT_REQUIRED",
    "PORTAL_DELETED",
    "APPLICATION_NOT_FOUND",
    codes::NO_TOKENS,
    codes::INVALID_SETTINGS,
    codes::TOO_MANY_REDIRECTS,
    codes::REDIRECT_REFUSED,
];

fn listed(list: &[&str], code: &str) -> bool {
    list.iter().any(|c| c.eq_ignore_ascii_case(code))
}

/// Classifies an error by its `error` code (case-insensitive), or by the HTTP status when the code
/// is empty. `status` is `None` for transport errors.
pub(super) fn classify(code: &str, status: Option<u16>) -> ErrorClass {
    let code = code.trim();
    if !code.is_empty() {
        if code.eq_ignore_ascii_case(codes::INVALID_RESPONSE) {
            // A body we could not read: transient unless the server clearly refused the request.
            return match status {
                Some(s) if (400..500).contains(&s) && s != 408 && s != 429 => ErrorClass::Rejected,
                _ => ErrorClass::Retryable,
            };
        }
        if listed(RETRYABLE, code) {
            return ErrorClass::Retryable;
        }
        if listed(AUTH, code) {
            return ErrorClass::Auth;
        }
        if listed(FATAL, code) {
            return ErrorClass::Fatal;
        }
        return ErrorClass::Rejected;
    }
    match status {
        None => ErrorClass::Retryable,
        Some(s) if s >= 500 || s == 408 || s == 429 => ErrorClass::Retryable,
        Some(401) => ErrorClass::Auth,
        Some(_) => ErrorClass::Rejected,
    }
}

/// A failed Bitrix24 call (REST method, batch or OAuth token request).
///
/// `description` never holds a token or secret: the client builds it from the server's
/// `error_description` or from a sanitized prefix of the body, with known secrets scrubbed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", self.message())]
pub struct BitrixError {
    pub class: ErrorClass,
    pub code: String,
    pub description: String,
    pub status: Option<u16>,
    pub portal: String,
    pub method: String,
    /// True when the server may have executed the call (a transport error after sending, a 5xx,
    /// a truncated or invalid body); false when it surely did not (limits, auth, refused connect).
    pub maybe_executed: bool,
    /// How long to wait before trying again, when known (limit waits the client gave up on).
    pub retry_after: Option<Duration>,
}

impl BitrixError {
    /// An error whose class follows from [`classify`]. `maybe_executed` starts false. The
    /// description is scrubbed of every registered secret ([`crate::redact`]): it may quote the
    /// server.
    pub(crate) fn new(
        portal: &str,
        method: &str,
        code: &str,
        description: impl Into<String>,
        status: Option<u16>,
    ) -> BitrixError {
        let description = description.into();
        BitrixError {
            class: classify(code, status),
            code: code.to_string(),
            description: crate::redact::scrub(&description).into_owned(),
            status,
            portal: portal.to_string(),
            method: method.to_string(),
            maybe_executed: false,
            retry_after: None,
        }
    }

    /// An error answer of the server (`{"error": …}`), e.g. a `result_error` entry of a batch.
    /// `maybe_executed` is set for 5xx answers other than the limit and portal-state ones.
    pub(super) fn from_api(
        portal: &str,
        method: &str,
        code: &str,
        description: &str,
        status: Option<u16>,
    ) -> BitrixError {
        let mut err = BitrixError::new(portal, method, code, description, status);
        err.maybe_executed = matches!(status, Some(s) if s >= 500)
            && !listed(
                &["QUERY_LIMIT_EXCEEDED", "OVERLOAD_LIMIT", "PORTAL_DELETED"],
                code,
            );
        err
    }

    /// A request that did not complete. Connect errors (refused, DNS, TLS handshake) surely did
    /// not reach the server; anything later may have been executed.
    pub(super) fn transport(portal: &str, method: &str, err: &reqwest::Error) -> BitrixError {
        let connect = err.is_connect();
        let what = if err.is_timeout() {
            "timed out"
        } else if connect {
            "could not connect"
        } else if err.is_body() || err.is_decode() {
            "reading the response failed"
        } else {
            "request failed"
        };
        // The URL is left out on purpose: token requests carry secrets in their query string.
        let mut chain = Vec::new();
        let mut source = std::error::Error::source(err);
        while let Some(e) = source {
            let text = e.to_string();
            if !text.is_empty() && !chain.contains(&text) {
                chain.push(text);
            }
            source = e.source();
        }
        let description = if chain.is_empty() {
            what.to_string()
        } else {
            format!("{what}: {}", chain.join(": "))
        };
        BitrixError::new(portal, method, codes::TRANSPORT, description, None)
            .with_maybe_executed(!connect)
    }

    pub(super) fn with_maybe_executed(mut self, maybe_executed: bool) -> BitrixError {
        self.maybe_executed = maybe_executed;
        self
    }

    pub(super) fn with_retry_after(mut self, retry_after: Option<Duration>) -> BitrixError {
        self.retry_after = retry_after;
        self
    }

    pub(super) fn is_retryable(&self) -> bool {
        self.class == ErrorClass::Retryable
    }

    /// True when the code equals `code` (case-insensitive, as Bitrix24 mixes cases).
    pub(crate) fn is_code(&self, code: &str) -> bool {
        self.code.eq_ignore_ascii_case(code)
    }

    /// `METHOD failed: CODE (description)`: the message without the portal and the hint, for
    /// reports that group by portal and show the hint on its own.
    pub(crate) fn failure(&self) -> String {
        let mut out = format!("{} failed: {}", self.method, self.code);
        let description = tidy(&self.description);
        if !description.is_empty() {
            out.push_str(" (");
            out.push_str(&description);
            out.push(')');
        }
        out
    }

    /// The operator-facing message: `portal P: METHOD failed: CODE (description); hint`.
    pub(crate) fn message(&self) -> String {
        let mut out = format!("portal {}: {}", self.portal, self.failure());
        if let Some(hint) = self.hint() {
            out.push_str("; ");
            out.push_str(&hint);
        }
        out
    }

    /// What an operator can do about this error, when the code says (also part of [`message`]).
    ///
    /// [`message`]: BitrixError::message
    pub(crate) fn hint(&self) -> Option<String> {
        let code = self.code.as_str();
        let mut hints = Vec::new();
        if code.eq_ignore_ascii_case("WRONG_AUTH_TYPE") {
            hints.push(
                "event.* methods need an OAuth application (a local or market app with \
                 client_id and client_secret), not an incoming webhook"
                    .to_string(),
            );
        }
        if code.eq_ignore_ascii_case("WRONG_LICENSE") {
            if self
                .description
                .to_ascii_lowercase()
                .contains("auth_connector")
            {
                hints.push(
                    "auth_connector needs the plan feature rest_auth_connector (Professional \
                     plan and above): upgrade the plan or remove auth_connector from the portal's \
                     config"
                        .to_string(),
                );
            }
            if self.method.eq_ignore_ascii_case("event.offline.get") {
                hints.push(
                    "reserve mode (clear=0) needs the plan feature rest_offline_extended; on plans \
                     without it set mode = \"fetch-delete\" for this portal (clear=1, which loses \
                     a batch whose response is lost in transit)"
                        .to_string(),
                );
            }
        }
        if code.eq_ignore_ascii_case("invalid_grant") && self.method == EXCHANGE_METHOD {
            hints.push(
                "the authorization code was refused: a code works once and only for 30 seconds \
                 after the redirect; run `b24eventd auth login` again and paste the address at once"
                    .to_string(),
            );
        } else if code.eq_ignore_ascii_case("invalid_grant") {
            hints.push(format!(
                "the refresh token is no longer valid (expired after 180 days or revoked): \
                 authorize again with `b24eventd auth login --portal {}`",
                self.portal
            ));
        }
        if code.eq_ignore_ascii_case("invalid_client") {
            hints.push("check client_id and client_secret of the portal's config".to_string());
        }
        if code.eq_ignore_ascii_case("ACCESS_DENIED") && self.method.starts_with("event.") {
            hints.push(
                "event methods need a token of a portal administrator and a commercial plan"
                    .to_string(),
            );
        }
        if code.eq_ignore_ascii_case("ERROR_EVENT_NOT_FOUND") {
            hints.push(
                "the portal offers this event only to applications with its module's scope (e.g. \
                 crm for ONCRM* events): add the scope to the local application's permissions, \
                 then authorize again with `b24eventd auth login`"
                    .to_string(),
            );
        }
        if hints.is_empty() {
            None
        } else {
            Some(hints.join("; "))
        }
    }
}

/// Lower-cases the first letter of a server description (unless it starts an acronym) and drops
/// trailing periods, so the text fits into our message style.
fn tidy(description: &str) -> String {
    let d = description.trim().trim_end_matches('.').trim_end();
    let mut chars = d.chars();
    match (chars.next(), chars.next()) {
        (Some(first), second)
            if first.is_uppercase() && !second.is_some_and(char::is_uppercase) =>
        {
            let mut out: String = first.to_lowercase().collect();
            out.push_str(&d[first.len_utf8()..]);
            out
        }
        _ => d.to_string(),
    }
}

/// An answer that is not the JSON Bitrix24 promised (truncated, HTML, empty): `INVALID_RESPONSE`,
/// retryable unless the status was a 4xx, and possibly executed for the same reason.
pub(super) fn invalid_response(
    portal: &str,
    method: &str,
    status: u16,
    what: String,
) -> BitrixError {
    BitrixError::new(
        portal,
        method,
        codes::INVALID_RESPONSE,
        format!("http {status}: {what}"),
        Some(status),
    )
    .with_maybe_executed(!(400..500).contains(&status))
}

/// Says what a body that failed to parse as JSON looked like, without secrets. With
/// `quote_json` false nothing of a JSON-looking body is quoted (a truncated token answer may
/// hold fresh tokens).
pub(super) fn describe_unparsable(body: &[u8], secrets: &[&str], quote_json: bool) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]);
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        "empty body".to_string()
    } else if trimmed.starts_with('{') || trimmed.starts_with('[') {
        if quote_json {
            format!(
                "truncated or invalid JSON ({} bytes): {}",
                body.len(),
                sanitize_snippet(trimmed, secrets, 120)
            )
        } else {
            format!("truncated or invalid JSON ({} bytes)", body.len())
        }
    } else {
        format!("not JSON: {}", sanitize_snippet(trimmed, secrets, 160))
    }
}

/// Turns any text from the wire into a short, single-line, printable snippet: HTML tags and
/// control characters dropped, whitespace collapsed, `secrets` and every registered secret
/// replaced by `[redacted]` in every encoding the daemon produces (a server echoing a request
/// echoes the percent-encoded query), cut at `max_chars`.
pub(super) fn sanitize_snippet(text: &str, secrets: &[&str], max_chars: usize) -> String {
    let scrubbed = crate::redact::scrub_with(text, secrets);
    let mut out = String::new();
    let mut in_tag = false;
    let mut last_space = true;
    let mut count = 0;
    for c in scrubbed.chars() {
        if c == '<' {
            in_tag = true;
            continue;
        }
        if in_tag {
            if c == '>' {
                in_tag = false;
                if !last_space {
                    out.push(' ');
                    last_space = true;
                    count += 1;
                }
            }
            continue;
        }
        let c = if c.is_whitespace() || c.is_control() {
            ' '
        } else {
            c
        };
        if c == ' ' {
            if last_space {
                continue;
            }
            last_space = true;
        } else {
            last_space = false;
        }
        if count >= max_chars {
            out.push('…');
            break;
        }
        out.push(c);
        count += 1;
    }
    out.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_table() {
        use ErrorClass::*;
        let table: &[(&str, Option<u16>, ErrorClass)] = &[
            ("QUERY_LIMIT_EXCEEDED", Some(503), Retryable),
            ("OPERATION_TIME_LIMIT", Some(429), Retryable),
            ("INTERNAL_SERVER_ERROR", Some(500), Retryable),
            ("ERROR_UNEXPECTED_ANSWER", Some(500), Retryable),
            ("OVERLOAD_LIMIT", Some(503), Retryable),
            ("TRANSPORT", None, Retryable),
            ("INVALID_RESPONSE", Some(200), Retryable),
            ("INVALID_RESPONSE", Some(502), Retryable),
            ("INVALID_RESPONSE", None, Retryable),
            ("INVALID_RESPONSE", Some(404), Rejected),
            ("INVALID_RESPONSE", Some(429), Retryable),
            ("JOURNAL_WRITE_FAILED", None, Retryable),
            ("", Some(500), Retryable),
            ("", Some(503), Retryable),
            ("", None, Retryable),
            ("", Some(401), Auth),
            ("", Some(404), Rejected),
            ("expired_token", Some(401), Auth),
            ("invalid_token", Some(401), Auth),
            ("NO_AUTH_FOUND", Some(401), Auth),
            ("expired_token", Some(403), Auth),
            ("WRONG_LICENSE", Some(403), Fatal),
            ("WRONG_AUTH_TYPE", Some(403), Fatal),
            ("ACCESS_DENIED", Some(403), Fatal),
            ("insufficient_scope", Some(401), Fatal),
            ("invalid_scope", Some(400), Fatal),
            ("invalid_grant", Some(400), Fatal),
            ("invalid_client", Some(401), Fatal),
            ("INVALID_CREDENTIALS", Some(403), Fatal),
            ("user_access_error", Some(403), Fatal),
            ("PAYMENT_REQUIRED", Some(402), Fatal),
            ("PORTAL_DELETED", Some(500), Fatal),
            ("APPLICATION_NOT_FOUND", Some(401), Fatal),
            ("NO_TOKENS", None, Fatal),
            ("ERROR_ARGUMENT", Some(400), Rejected),
            ("ERROR_CORE", Some(500), Rejected),
            ("ERROR_METHOD_NOT_FOUND", Some(404), Rejected),
            ("ERROR_BATCH_LENGTH_EXCEEDED", Some(400), Rejected),
            ("SOMETHING_NEW", Some(200), Rejected),
        ];
        for (code, status, class) in table {
            assert_eq!(classify(code, *status), *class, "{code} {status:?}");
        }
    }

    #[test]
    fn classify_ignores_case_of_codes() {
        assert_eq!(classify("EXPIRED_TOKEN", Some(401)), ErrorClass::Auth);
        assert_eq!(
            classify("query_limit_exceeded", None),
            ErrorClass::Retryable
        );
    }

    #[test]
    fn display_names_portal_method_code_and_description() {
        let e = BitrixError::from_api(
            "main",
            "event.offline.get",
            "QUERY_LIMIT_EXCEEDED",
            "Too many requests",
            Some(503),
        );
        assert_eq!(
            e.to_string(),
            "portal main: event.offline.get failed: QUERY_LIMIT_EXCEEDED (too many requests)"
        );
        assert!(!e.maybe_executed);
        let e = BitrixError::from_api(
            "main",
            "crm.deal.get",
            "ERROR_CORE",
            "SQL query error!",
            Some(500),
        );
        assert!(e.maybe_executed);
        assert_eq!(
            e.to_string(),
            "portal main: crm.deal.get failed: ERROR_CORE (SQL query error!)"
        );
    }

    #[test]
    fn wrong_auth_type_explains_webhooks() {
        let e = BitrixError::from_api(
            "main",
            "event.offline.list",
            "WRONG_AUTH_TYPE",
            "Current authorization type is denied for this method",
            Some(403),
        );
        let msg = e.to_string();
        assert!(msg.contains("OAuth application"), "{msg}");
        assert!(msg.contains("incoming webhook"), "{msg}");
        assert_eq!(e.class, ErrorClass::Fatal);
    }

    #[test]
    fn wrong_license_on_get_names_both_modes() {
        let e = BitrixError::from_api("main", "event.offline.get", "WRONG_LICENSE", "", Some(403));
        let msg = e.to_string();
        assert!(msg.contains("rest_offline_extended"), "{msg}");
        assert!(msg.contains("clear=0"), "{msg}");
        assert!(msg.contains("mode = \"fetch-delete\""), "{msg}");
        let e = BitrixError::from_api(
            "main",
            "event.offline.list",
            "WRONG_LICENSE",
            "This feature is not enabled for the current license: auth_connector",
            Some(403),
        );
        let msg = e.to_string();
        assert!(msg.contains("rest_auth_connector"), "{msg}");
        assert!(!msg.contains("fetch-delete"), "{msg}");
    }

    #[test]
    fn invalid_grant_hints_depend_on_the_request() {
        let refresh = BitrixError::from_api(
            "main",
            REFRESH_METHOD,
            "invalid_grant",
            "Invalid grant",
            Some(400),
        );
        assert!(refresh.to_string().contains("180 days"), "{refresh}");
        let exchange = BitrixError::from_api(
            "main",
            EXCHANGE_METHOD,
            "invalid_grant",
            "Invalid grant",
            Some(400),
        );
        let msg = exchange.to_string();
        assert!(
            msg.contains("30 seconds") && !msg.contains("180 days"),
            "{msg}"
        );
        assert_eq!(
            exchange.failure(),
            "oauth code exchange failed: invalid_grant (invalid grant)"
        );
        assert!(exchange.hint().is_some_and(|h| h.contains("auth login")));
    }

    #[test]
    fn tidy_keeps_acronyms_and_drops_periods() {
        assert_eq!(tidy("Too many requests."), "too many requests");
        assert_eq!(tidy("SQL query error!"), "SQL query error!");
        assert_eq!(tidy(""), "");
    }

    #[test]
    fn snippets_are_short_clean_and_secret_free() {
        let html = "<html><head><title>502 Bad Gateway</title></head>\n<body>token abcdef123 here</body></html>";
        let s = sanitize_snippet(html, &["abcdef123"], 200);
        assert_eq!(s, "502 Bad Gateway token [redacted] here");
        let long = "x".repeat(500);
        assert_eq!(sanitize_snippet(&long, &[], 10).chars().count(), 11);
    }

    #[test]
    fn snippets_scrub_every_encoding_of_a_secret() {
        // A token endpoint echoing the query it was sent: the secret percent-encoded.
        let echo = "cannot handle grant_type=refresh_token&client_secret=s3c%20r3t%2B%2F%26x                    &refresh_token=r1 (client_secret s3c r3t+/&x; form s3c+r3t%2B%2F%26x;                     lower s3c%20r3t%2b%2f%26x)";
        let s = sanitize_snippet(echo, &["s3c r3t+/&x"], 500);
        assert!(!s.contains("s3c"), "{s}");
        assert_eq!(s.matches("[redacted]").count(), 4, "{s}");
    }
}
