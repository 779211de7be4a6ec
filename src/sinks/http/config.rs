//! `type = "http"`: the http sink's typed config and the parser of its keys (URL, headers,
//! signing secret, status overrides, and the `format = "bitrix-form"` keys).

use crate::options::{
    ConfigError, PortalRef, RedactedValues, Secret, SecretSource, SinkOptions, check_secret_text,
    env_var_name, host_of, parse_http_url, redact_url, valid_domain,
};
use crate::sinks::SinkKind;
use crate::sinks::bitrix_form::BitrixFormConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// `type = "http"`: POST each envelope.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpSinkConfig {
    /// May carry userinfo; print it with [`redact_url`].
    pub url: String,
    pub format: HttpFormat,
    /// Extra request headers; values may be credentials (`Authorization`), so `Debug` hides them.
    pub headers: BTreeMap<String, String>,
    /// `signing_secret` / `signing_secret_file`: Standard Webhooks signing when set (an inline
    /// secret is already checked to be well-formed; a file is read by [`super::resolve_http_secrets`]).
    pub signing_secret: Option<SecretSource>,
    /// `retry_on` / `dead_on`.
    pub statuses: StatusOverrides,
}

impl crate::sinks::SinkTypeConfig for HttpSinkConfig {
    fn register_credentials(&self) {
        crate::sinks::register_url_credentials(&self.url);
        for (name, value) in &self.headers {
            if crate::redact::is_credential_header(name) {
                crate::redact::register(value);
                // `Bearer TOKEN`, `Basic CREDENTIALS`: the credential on its own too.
                if let Some((_, credential)) = value.trim().split_once(' ') {
                    crate::redact::register(credential.trim());
                }
            }
        }
    }
}

impl fmt::Debug for HttpSinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSinkConfig")
            .field("url", &redact_url(&self.url))
            .field("format", &self.format)
            .field("headers", &RedactedValues(&self.headers))
            .field("signing_secret", &self.signing_secret)
            .field("statuses", &self.statuses)
            .finish()
    }
}

/// `retry_on` / `dead_on` of an http sink: status codes whose default class (2xx delivered;
/// 408, 429, 5xx retried; anything else dead) is overridden. Never both for one code; no 2xx in
/// `dead_on`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusOverrides {
    pub retry_on: Vec<u16>,
    pub dead_on: Vec<u16>,
}

/// The body an http sink posts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpFormat {
    /// The envelope as one JSON object.
    Json,
    /// The form-encoded body a Bitrix24 outbound webhook would have posted.
    BitrixForm(BitrixFormConfig),
}

impl HttpFormat {
    /// The `format` as written in the config.
    pub fn as_str(&self) -> &'static str {
        match self {
            HttpFormat::Json => "json",
            HttpFormat::BitrixForm(_) => "bitrix-form",
        }
    }
}

/// The keys of an `http` sink as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    url: Option<String>,
    format: Option<String>,
    headers: Option<BTreeMap<String, String>>,
    signing_secret: Option<Secret>,
    signing_secret_file: Option<PathBuf>,
    retry_on: Option<Vec<i64>>,
    dead_on: Option<Vec<i64>>,
    bitrix_domain: Option<String>,
    bitrix_member_id: Option<String>,
    application_token: Option<Secret>,
    application_token_file: Option<PathBuf>,
    event_handler_id: Option<u64>,
}

/// Reads and checks the keys of an `http` sink (registered in [`crate::sinks::SINK_TYPES`]).
pub(crate) fn parse_config(options: &SinkOptions) -> Result<SinkKind, ConfigError> {
    let mut raw: Raw = options.parse()?;
    let url = options.required_text("url", raw.url.take())?;
    parse_http_url(&url).map_err(|problem| options.err("url", problem))?;
    let signing_secret = signing_secret(
        options,
        raw.signing_secret.take(),
        raw.signing_secret_file.take(),
    )?;
    let headers = http_headers(
        options,
        raw.headers.take().unwrap_or_default(),
        signing_secret.is_some(),
    )?;
    if let Some(header) = headers
        .keys()
        .find(|h| h.eq_ignore_ascii_case("authorization"))
        && reqwest::Url::parse(&url)
            .is_ok_and(|u| !u.username().is_empty() || u.password().is_some())
    {
        return Err(options.err(
            &format!("headers.{header}"),
            format!(
                "sink {}: url carries credentials (user:password@, sent as Authorization: Basic) and headers sets Authorization too; keep one",
                options.sink_name()
            ),
        ));
    }
    let statuses = status_overrides(options, raw.retry_on.take(), raw.dead_on.take())?;
    let format = match raw.format.as_deref() {
        None | Some("json") => {
            let bitrix_only = [
                ("bitrix_domain", raw.bitrix_domain.is_some()),
                ("bitrix_member_id", raw.bitrix_member_id.is_some()),
                ("application_token", raw.application_token.is_some()),
                (
                    "application_token_file",
                    raw.application_token_file.is_some(),
                ),
                ("event_handler_id", raw.event_handler_id.is_some()),
            ];
            if let Some((key, _)) = bitrix_only.iter().find(|(_, set)| *set) {
                return Err(options.err(
                    key,
                    "only used with format = \"bitrix-form\" (it goes into the form body); remove it or set format = \"bitrix-form\"",
                ));
            }
            HttpFormat::Json
        }
        Some("bitrix-form") => HttpFormat::BitrixForm(bitrix_form(options, &mut raw)?),
        Some(other) => {
            return Err(options.err(
                "format",
                format!("unsupported format {other:?}; supported: \"json\", \"bitrix-form\""),
            ));
        }
    };
    Ok(SinkKind::Http(HttpSinkConfig {
        url,
        format,
        headers,
        signing_secret,
        statuses,
    }))
}

/// `headers`: valid names and values, none of those the sink sets itself.
fn http_headers(
    options: &SinkOptions,
    headers: BTreeMap<String, String>,
    signing: bool,
) -> Result<BTreeMap<String, String>, ConfigError> {
    use crate::sinks::standard_webhooks::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP};
    for (header, value) in &headers {
        let key = format!("headers.{header}");
        let parsed = reqwest::header::HeaderName::from_bytes(header.as_bytes())
            .map_err(|_| options.err(&key, "invalid header name"))?;
        if matches!(
            parsed.as_str(),
            "idempotency-key" | "content-length" | "host"
        ) {
            return Err(options.err(
                &key,
                "this header is set by the sink and cannot be configured",
            ));
        }
        if signing && [HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE].contains(&parsed.as_str()) {
            return Err(options.err(
                &key,
                "this header is set by the sink when signing_secret is set (Standard Webhooks) and cannot be configured",
            ));
        }
        reqwest::header::HeaderValue::from_str(value).map_err(|_| {
            options.err(
                &key,
                "invalid header value (control characters or non-ASCII text)",
            )
        })?;
    }
    Ok(headers)
}

/// `signing_secret` / `signing_secret_file`; an inline secret must be well-formed.
fn signing_secret(
    options: &SinkOptions,
    inline: Option<Secret>,
    file: Option<PathBuf>,
) -> Result<Option<SecretSource>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(options.err(
            "signing_secret",
            format!(
                "both signing_secret and signing_secret_file are set; keep one (the environment variable {} also sets signing_secret)",
                env_var_name(&["sinks", options.sink_name(), "signing_secret"])
            ),
        )),
        (Some(secret), None) => {
            crate::sinks::standard_webhooks::parse_secret(secret.expose())
                .map_err(|problem| options.err("signing_secret", problem))?;
            Ok(Some(SecretSource::Inline(secret)))
        }
        (None, Some(path)) if path.as_os_str().is_empty() => {
            Err(options.err("signing_secret_file", "must not be empty"))
        }
        (None, Some(path)) => Ok(Some(SecretSource::File(path))),
        (None, None) => Ok(None),
    }
}

/// `retry_on` / `dead_on`: status codes 100..=599, never in both lists, no 2xx in dead_on.
fn status_overrides(
    options: &SinkOptions,
    retry_on: Option<Vec<i64>>,
    dead_on: Option<Vec<i64>>,
) -> Result<StatusOverrides, ConfigError> {
    let retry_on = status_list(options, "retry_on", retry_on)?;
    let dead_on = status_list(options, "dead_on", dead_on)?;
    for (i, code) in dead_on.iter().enumerate() {
        let key = format!("dead_on[{i}]");
        if (200..300).contains(code) {
            return Err(options.err(
                &key,
                format!(
                    "{code} is a success status: a 2xx answer always means delivered; remove it"
                ),
            ));
        }
        if retry_on.contains(code) {
            return Err(options.err(
                &key,
                format!("{code} is also listed in retry_on; a status is either retried or dead, keep it in one list"),
            ));
        }
    }
    Ok(StatusOverrides { retry_on, dead_on })
}

fn status_list(
    options: &SinkOptions,
    key: &str,
    list: Option<Vec<i64>>,
) -> Result<Vec<u16>, ConfigError> {
    let mut codes: Vec<u16> = Vec::new();
    for (i, code) in list.unwrap_or_default().into_iter().enumerate() {
        let code = u16::try_from(code)
            .ok()
            .filter(|c| (100..=599).contains(c))
            .ok_or_else(|| {
                options.err(
                    &format!("{key}[{i}]"),
                    format!("must be an HTTP status code between 100 and 599, got {code}"),
                )
            })?;
        if !codes.contains(&code) {
            codes.push(code);
        }
    }
    Ok(codes)
}

/// The `format = "bitrix-form"` keys: one routed portal's `auth[]` and the handler id.
fn bitrix_form(options: &SinkOptions, raw: &mut Raw) -> Result<BitrixFormConfig, ConfigError> {
    let portals = options.portals();
    let portal: &PortalRef = match options.routed_portals() {
        [only] => portals
            .iter()
            .find(|p| &p.name == only)
            .ok_or_else(|| options.err("portals", format!("unknown portal {only:?}")))?,
        [] if portals.len() == 1 => &portals[0],
        _ => {
            let known: Vec<&str> = portals.iter().map(|p| p.name.as_str()).collect();
            return Err(options.err(
                "portals",
                format!(
                    "a bitrix-form sink posts one portal's auth[] (domain, member_id, application_token), so it must route exactly one portal: set portals = [\"{}\"] and add one sink per portal (configured portals: {})",
                    known.first().copied().unwrap_or("main"),
                    known.join(", ")
                ),
            ));
        }
    };

    let (domain, client_endpoint) = match raw.bitrix_domain.take() {
        Some(domain) => {
            let domain = domain.trim().to_string();
            if !valid_domain(&domain) {
                return Err(options.err(
                    "bitrix_domain",
                    format!("invalid domain {domain:?}; give the portal's host name without scheme or path, e.g. \"example.bitrix24.com\""),
                ));
            }
            let endpoint = format!("https://{domain}/rest/");
            (domain, endpoint)
        }
        None => (
            host_of(&portal.client_endpoint).unwrap_or_default(),
            portal.client_endpoint.clone(),
        ),
    };
    let server_endpoint = reqwest::Url::parse(&portal.oauth_token_url)
        .map(|url| format!("{}/rest/", url.origin().ascii_serialization()))
        .unwrap_or_default();

    let member_id = match raw.bitrix_member_id.take() {
        None => {
            return Err(options.err(
                "bitrix_member_id",
                format!(
                    "missing required key for format = \"bitrix-form\": the member_id of portal {:?} for auth[member_id] (`b24eventd auth status` shows it)",
                    portal.name
                ),
            ));
        }
        Some(id) if id.trim().is_empty() => {
            return Err(options.err("bitrix_member_id", "must not be empty"));
        }
        Some(id) => id.trim().to_string(),
    };

    let application_token = match (
        raw.application_token.take(),
        raw.application_token_file.take(),
    ) {
        (Some(_), Some(_)) => {
            return Err(options.err(
                "application_token",
                format!(
                    "both application_token and application_token_file are set; keep one (the environment variable {} also sets application_token)",
                    env_var_name(&["sinks", options.sink_name(), "application_token"])
                ),
            ));
        }
        (Some(token), None) if token.expose().trim().is_empty() => {
            return Err(options.err("application_token", "must not be empty"));
        }
        (Some(token), None) => {
            check_secret_text(token.expose(), "application token")
                .map_err(|problem| options.err("application_token", problem))?;
            SecretSource::Inline(token)
        }
        (None, Some(path)) if path.as_os_str().is_empty() => {
            return Err(options.err("application_token_file", "must not be empty"));
        }
        (None, Some(path)) => SecretSource::File(path),
        (None, None) => {
            SecretSource::Credential(format!("{}.application_token", options.sink_name()))
        }
    };

    Ok(BitrixFormConfig {
        domain,
        client_endpoint,
        server_endpoint,
        member_id,
        application_token,
        event_handler_id: raw.event_handler_id.take().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::{parse_test_config, parse_test_config_routed};

    const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    /// The keys of an http sink `erp` posting to `http://erp:8080/ev`, and `extra_keys`.
    fn http_toml(extra_keys: &str) -> String {
        format!("url = \"http://erp:8080/ev\"\n{extra_keys}")
    }

    /// [`http_toml`] with `format = "bitrix-form"` and its required keys.
    fn bitrix(extra_keys: &str) -> String {
        http_toml(&format!(
            "format = \"bitrix-form\"\nbitrix_member_id = \"d897063e1ce7c5eb9f04b9751eef5915\"\napplication_token = \"t0ken\"\n{extra_keys}"
        ))
    }

    fn http_config(keys: &str) -> HttpSinkConfig {
        match parse_test_config("erp", "http", keys) {
            Ok(SinkKind::Http(http)) => http,
            other => panic!("http sink expected: {other:?}"),
        }
    }

    #[track_caller]
    fn assert_err(keys: &str, key: &str, needle: &str) -> ConfigError {
        crate::sinks::assert_config_err("erp", "http", keys, key, needle)
    }

    #[test]
    fn http_bitrix_form_keys() {
        let http = http_config(&bitrix(""));
        let HttpFormat::BitrixForm(form) = &http.format else {
            panic!("bitrix-form expected: {http:?}")
        };
        assert_eq!(form.domain, "main.bitrix24.com", "the portal's host");
        assert_eq!(form.client_endpoint, "https://main.bitrix24.com/rest/");
        assert_eq!(form.server_endpoint, "https://oauth.bitrix.info/rest/");
        assert_eq!(form.member_id, "d897063e1ce7c5eb9f04b9751eef5915");
        assert_eq!(
            form.application_token,
            SecretSource::Inline(Secret::new("t0ken"))
        );
        assert_eq!(form.event_handler_id, 0);
        assert!(!format!("{http:?}").contains("t0ken"), "{http:?}");

        let http = http_config(&bitrix(
            "bitrix_domain = \"crm.example.com\"\nevent_handler_id = 975",
        ));
        let HttpFormat::BitrixForm(form) = &http.format else {
            panic!("bitrix-form expected")
        };
        assert_eq!(form.domain, "crm.example.com");
        assert_eq!(form.client_endpoint, "https://crm.example.com/rest/");
        assert_eq!(form.event_handler_id, 975);

        // The token from a file, or by default from the credentials directory.
        let text = http_toml(
            "format = \"bitrix-form\"\nbitrix_member_id = \"m\"\napplication_token_file = \"/etc/b24eventd/erp.token\"",
        );
        let HttpFormat::BitrixForm(form) = http_config(&text).format else {
            panic!("bitrix-form expected")
        };
        assert_eq!(
            form.application_token,
            SecretSource::File("/etc/b24eventd/erp.token".into())
        );
        let text = http_toml("format = \"bitrix-form\"\nbitrix_member_id = \"m\"");
        let HttpFormat::BitrixForm(form) = http_config(&text).format else {
            panic!("bitrix-form expected")
        };
        assert_eq!(
            form.application_token,
            SecretSource::Credential("erp.application_token".into())
        );

        assert_err(
            &http_toml("format = \"bitrix-form\""),
            "sinks.erp.bitrix_member_id",
            "missing required key for format = \"bitrix-form\"",
        );
        assert_err(
            &http_toml("format = \"bitrix-form\"\nbitrix_member_id = \" \""),
            "sinks.erp.bitrix_member_id",
            "must not be empty",
        );
        let err = assert_err(
            &bitrix("application_token_file = \"/t\""),
            "sinks.erp.application_token",
            "both application_token and application_token_file",
        );
        assert!(!err.message.contains("t0ken"), "{err}");
        assert_err(
            &http_toml(
                "format = \"bitrix-form\"\nbitrix_member_id = \"m\"\napplication_token = \"\"",
            ),
            "sinks.erp.application_token",
            "must not be empty",
        );
        assert_err(
            &bitrix("bitrix_domain = \"https://x.bitrix24.com/\""),
            "sinks.erp.bitrix_domain",
            "without scheme or path",
        );
        assert_err(
            &bitrix("event_handler_id = -1"),
            "sinks.erp.event_handler_id",
            "invalid",
        );
        for key in [
            "bitrix_domain = \"x.bitrix24.com\"",
            "bitrix_member_id = \"m\"",
            "application_token = \"t\"",
            "application_token_file = \"/t\"",
            "event_handler_id = 5",
        ] {
            let name = key.split(' ').next().unwrap();
            assert_err(
                &http_toml(key),
                &format!("sinks.erp.{name}"),
                "only used with format = \"bitrix-form\"",
            );
            for (kind, keys) in [
                ("file", "path = \"/tmp/x\""),
                ("exec", "command = [\"/bin/x\"]"),
            ] {
                let err = parse_test_config("erp", kind, &format!("{keys}\n{key}")).unwrap_err();
                assert_eq!(err.key, format!("sinks.erp.{name}"));
                assert!(
                    err.message
                        .starts_with(&format!("not a key of a {kind:?} sink")),
                    "{err}"
                );
            }
        }
    }

    #[test]
    fn http_bitrix_form_routes_exactly_one_portal() {
        let routed = |routed: &[&str]| {
            parse_test_config_routed("erp", "http", &bitrix(""), &["main", "other"], routed)
        };
        let err = routed(&[]).unwrap_err();
        assert_eq!(err.key, "sinks.erp.portals");
        assert!(
            err.message.contains("must route exactly one portal"),
            "{err}"
        );
        assert!(err.message.contains("auth[]"), "{err}");
        assert!(
            err.message.contains("configured portals: main, other"),
            "{err}"
        );
        let err = routed(&["main", "other"]).unwrap_err();
        assert!(
            err.message.contains("must route exactly one portal"),
            "{err}"
        );
        let Ok(SinkKind::Http(HttpSinkConfig {
            format: HttpFormat::BitrixForm(form),
            ..
        })) = routed(&["other"])
        else {
            panic!("bitrix-form expected")
        };
        assert_eq!(form.domain, "other.bitrix24.com");
    }

    #[test]
    fn http_signing_secret() {
        let http = http_config(&http_toml(&format!(
            "signing_secret = \"{SIGNING_SECRET}\""
        )));
        assert_eq!(
            http.signing_secret,
            Some(SecretSource::Inline(Secret::new(SIGNING_SECRET)))
        );
        assert!(!format!("{http:?}").contains("MfKQ"), "{http:?}");
        let http = http_config(&http_toml(
            "signing_secret_file = \"/etc/b24eventd/erp.key\"",
        ));
        assert_eq!(
            http.signing_secret,
            Some(SecretSource::File("/etc/b24eventd/erp.key".into()))
        );
        assert_eq!(http_config(&http_toml("")).signing_secret, None);

        let err = assert_err(
            &http_toml("signing_secret = \"whsec_%%%notbase64\""),
            "sinks.erp.signing_secret",
            "not valid base64",
        );
        assert!(!err.message.contains("notbase64"), "{err}");
        assert_err(
            &http_toml("signing_secret = \"whsec_c2hvcnQ=\""),
            "sinks.erp.signing_secret",
            "24 to 64 random bytes",
        );
        assert_err(
            &http_toml(&format!(
                "signing_secret = \"{SIGNING_SECRET}\"\nsigning_secret_file = \"/k\""
            )),
            "sinks.erp.signing_secret",
            "both signing_secret and signing_secret_file",
        );
        assert_err(
            &http_toml(&format!(
                "signing_secret = \"{SIGNING_SECRET}\"\nheaders = {{ Webhook-Signature = \"x\" }}"
            )),
            "sinks.erp.headers.Webhook-Signature",
            "set by the sink when signing_secret is set",
        );
        // Unsigned sinks may pass such a header through.
        http_config(&http_toml("headers = { Webhook-Id = \"x\" }"));
    }

    #[test]
    fn http_status_overrides() {
        let http = http_config(&http_toml(
            "retry_on = [409, 423, 409]\ndead_on = [503, 301]",
        ));
        assert_eq!(
            http.statuses,
            StatusOverrides {
                retry_on: vec![409, 423],
                dead_on: vec![503, 301]
            }
        );
        assert_eq!(
            http_config(&http_toml("")).statuses,
            StatusOverrides::default()
        );
        assert_err(
            &http_toml("retry_on = [409, 600]"),
            "sinks.erp.retry_on[1]",
            "between 100 and 599, got 600",
        );
        assert_err(
            &http_toml("dead_on = [99]"),
            "sinks.erp.dead_on[0]",
            "between 100 and 599, got 99",
        );
        assert_err(
            &http_toml("dead_on = [70000]"),
            "sinks.erp.dead_on[0]",
            "got 70000",
        );
        assert_err(
            &http_toml("dead_on = [500, 204]"),
            "sinks.erp.dead_on[1]",
            "204 is a success status",
        );
        assert_err(
            &http_toml("retry_on = [409, 503]\ndead_on = [503]"),
            "sinks.erp.dead_on[0]",
            "503 is also listed in retry_on",
        );
        assert_err(
            &http_toml("retry_on = \"409\""),
            "sinks.erp.retry_on",
            "invalid type",
        );
    }
}
