//! `type = "http"`: URL, headers, signing secret, status overrides and the bitrix-form keys.

use super::{Validator, host_of, valid_domain};
use crate::config::raw::RawSink;
use crate::config::types::PortalConfig;
use crate::options::{ConfigError, Secret, SecretSource, check_secret_text, env_var_name};
use crate::sinks::bitrix_form::BitrixFormConfig;
use crate::sinks::http::{HttpFormat, HttpSinkConfig, StatusOverrides};
use std::collections::BTreeMap;
use std::path::PathBuf;

impl Validator {
    /// The `http`-only keys of `[sinks.NAME]`.
    pub(super) fn http_sink(
        &self,
        name: &str,
        raw: &mut RawSink,
        routed_portals: &[String],
        portals: &BTreeMap<String, PortalConfig>,
    ) -> Result<HttpSinkConfig, ConfigError> {
        let k = |key: &str| format!("sinks.{name}.{key}");
        let url = self.non_empty(&k("url"), raw.url.take())?;
        self.http_url(&k("url"), &url)?;
        let signing_secret = self.signing_secret(
            name,
            raw.signing_secret.take(),
            raw.signing_secret_file.take(),
        )?;
        let headers = self.http_headers(
            name,
            raw.headers.take().unwrap_or_default(),
            signing_secret.is_some(),
        )?;
        if let Some(header) = headers
            .keys()
            .find(|h| h.eq_ignore_ascii_case("authorization"))
            && reqwest::Url::parse(&url)
                .is_ok_and(|u| !u.username().is_empty() || u.password().is_some())
        {
            return Err(self.err(
                k(&format!("headers.{header}")),
                format!(
                    "sink {name}: url carries credentials (user:password@, sent as Authorization: Basic) and headers sets Authorization too; keep one"
                ),
            ));
        }
        let statuses = self.status_overrides(name, raw.retry_on.take(), raw.dead_on.take())?;
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
                    return Err(self.err(
                        k(key),
                        "only used with format = \"bitrix-form\" (it goes into the form body); remove it or set format = \"bitrix-form\"",
                    ));
                }
                HttpFormat::Json
            }
            Some("bitrix-form") => {
                HttpFormat::BitrixForm(self.bitrix_form(name, raw, routed_portals, portals)?)
            }
            Some(other) => {
                return Err(self.err(
                    k("format"),
                    format!("unsupported format {other:?}; supported: \"json\", \"bitrix-form\""),
                ));
            }
        };
        Ok(HttpSinkConfig {
            url,
            format,
            headers,
            signing_secret,
            statuses,
        })
    }

    /// `headers`: valid names and values, none of those the sink sets itself.
    fn http_headers(
        &self,
        name: &str,
        headers: BTreeMap<String, String>,
        signing: bool,
    ) -> Result<BTreeMap<String, String>, ConfigError> {
        use crate::sinks::standard_webhooks::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP};
        for (header, value) in &headers {
            let key = format!("sinks.{name}.headers.{header}");
            let parsed = reqwest::header::HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| self.err(&key, "invalid header name"))?;
            if matches!(
                parsed.as_str(),
                "idempotency-key" | "content-length" | "host"
            ) {
                return Err(self.err(
                    &key,
                    "this header is set by the sink and cannot be configured",
                ));
            }
            if signing && [HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE].contains(&parsed.as_str())
            {
                return Err(self.err(
                    &key,
                    "this header is set by the sink when signing_secret is set (Standard Webhooks) and cannot be configured",
                ));
            }
            reqwest::header::HeaderValue::from_str(value).map_err(|_| {
                self.err(
                    &key,
                    "invalid header value (control characters or non-ASCII text)",
                )
            })?;
        }
        Ok(headers)
    }

    /// `signing_secret` / `signing_secret_file`; an inline secret must be well-formed.
    fn signing_secret(
        &self,
        name: &str,
        inline: Option<Secret>,
        file: Option<PathBuf>,
    ) -> Result<Option<SecretSource>, ConfigError> {
        let k = |key: &str| format!("sinks.{name}.{key}");
        match (inline, file) {
            (Some(_), Some(_)) => Err(self.err(
                k("signing_secret"),
                format!(
                    "both signing_secret and signing_secret_file are set; keep one (the environment variable {} also sets signing_secret)",
                    env_var_name(&["sinks", name, "signing_secret"])
                ),
            )),
            (Some(secret), None) => {
                crate::sinks::standard_webhooks::parse_secret(secret.expose())
                    .map_err(|problem| self.err(k("signing_secret"), problem))?;
                Ok(Some(SecretSource::Inline(secret)))
            }
            (None, Some(path)) if path.as_os_str().is_empty() => {
                Err(self.err(k("signing_secret_file"), "must not be empty"))
            }
            (None, Some(path)) => Ok(Some(SecretSource::File(path))),
            (None, None) => Ok(None),
        }
    }

    /// `retry_on` / `dead_on`: status codes 100..=599, never in both lists, no 2xx in dead_on.
    fn status_overrides(
        &self,
        name: &str,
        retry_on: Option<Vec<i64>>,
        dead_on: Option<Vec<i64>>,
    ) -> Result<StatusOverrides, ConfigError> {
        let retry_on = self.status_list(&format!("sinks.{name}.retry_on"), retry_on)?;
        let dead_on = self.status_list(&format!("sinks.{name}.dead_on"), dead_on)?;
        for (i, code) in dead_on.iter().enumerate() {
            let key = format!("sinks.{name}.dead_on[{i}]");
            if (200..300).contains(code) {
                return Err(self.err(
                    key,
                    format!(
                        "{code} is a success status: a 2xx answer always means delivered; remove it"
                    ),
                ));
            }
            if retry_on.contains(code) {
                return Err(self.err(
                    key,
                    format!("{code} is also listed in retry_on; a status is either retried or dead, keep it in one list"),
                ));
            }
        }
        Ok(StatusOverrides { retry_on, dead_on })
    }

    fn status_list(&self, key: &str, list: Option<Vec<i64>>) -> Result<Vec<u16>, ConfigError> {
        let mut codes: Vec<u16> = Vec::new();
        for (i, code) in list.unwrap_or_default().into_iter().enumerate() {
            let code = u16::try_from(code)
                .ok()
                .filter(|c| (100..=599).contains(c))
                .ok_or_else(|| {
                    self.err(
                        format!("{key}[{i}]"),
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
    fn bitrix_form(
        &self,
        name: &str,
        raw: &mut RawSink,
        routed_portals: &[String],
        portals: &BTreeMap<String, PortalConfig>,
    ) -> Result<BitrixFormConfig, ConfigError> {
        let k = |key: &str| format!("sinks.{name}.{key}");
        let portal = match routed_portals {
            [only] => &portals[only],
            [] if portals.len() == 1 => portals.values().next().expect("one portal"),
            _ => {
                let known: Vec<&str> = portals.keys().map(String::as_str).collect();
                return Err(self.err(
                    k("portals"),
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
                    return Err(self.err(
                        k("bitrix_domain"),
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
                return Err(self.err(
                    k("bitrix_member_id"),
                    format!(
                        "missing required key for format = \"bitrix-form\": the member_id of portal {:?} for auth[member_id] (`b24eventd auth status` shows it)",
                        portal.name
                    ),
                ));
            }
            Some(id) if id.trim().is_empty() => {
                return Err(self.err(k("bitrix_member_id"), "must not be empty"));
            }
            Some(id) => id.trim().to_string(),
        };

        let application_token = match (
            raw.application_token.take(),
            raw.application_token_file.take(),
        ) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    k("application_token"),
                    format!(
                        "both application_token and application_token_file are set; keep one (the environment variable {} also sets application_token)",
                        env_var_name(&["sinks", name, "application_token"])
                    ),
                ));
            }
            (Some(token), None) if token.expose().trim().is_empty() => {
                return Err(self.err(k("application_token"), "must not be empty"));
            }
            (Some(token), None) => {
                check_secret_text(token.expose(), "application token")
                    .map_err(|problem| self.err(k("application_token"), problem))?;
                SecretSource::Inline(token)
            }
            (None, Some(path)) if path.as_os_str().is_empty() => {
                return Err(self.err(k("application_token_file"), "must not be empty"));
            }
            (None, Some(path)) => SecretSource::File(path),
            (None, None) => SecretSource::Credential(format!("{name}.application_token")),
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;
    use crate::config::*;
    use crate::options::*;

    #[test]
    fn http_bitrix_form_keys() {
        let http = http_config(&bitrix(""));
        let HttpFormat::BitrixForm(form) = &http.format else {
            panic!("bitrix-form expected: {http:?}")
        };
        assert_eq!(form.domain, "example.bitrix24.com", "the portal's host");
        assert_eq!(form.client_endpoint, "https://example.bitrix24.com/rest/");
        assert_eq!(form.server_endpoint, "https://oauth.bitrix.info/rest/");
        assert_eq!(form.member_id, "d897063e1ce7c5eb9f04b9751eef5915");
        assert_eq!(
            form.application_token,
            SecretSource::Inline(Secret::new("t0ken"))
        );
        assert_eq!(form.event_handler_id, 0);
        assert!(!format!("{http:?}").contains("t0ken"), "{http:?}");

        let http = http_config(&bitrix(
            "bitrix_domain = \"crm.example.com\"\nevent_handler_id = 975\nportals = [\"main\"]",
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
            for other in [
                "type = \"file\"\npath = \"/tmp/x\"",
                "type = \"exec\"\ncommand = [\"/bin/x\"]",
            ] {
                assert_err(
                    &sink(&format!("{other}\n{key}")),
                    &format!("sinks.erp.{name}"),
                    "not a key of a",
                );
            }
        }
    }

    #[test]
    fn http_bitrix_form_routes_exactly_one_portal() {
        let two_portals = |sink_keys: &str| {
            format!(
                "{}\n[portals.other]\nclient_endpoint = \"https://other.bitrix24.com/rest/\"\nclient_id = \"local.1.2\"\nclient_secret = \"s\"\nevents = [\"ONCRMDEALADD\"]\n",
                bitrix(sink_keys)
            )
        };
        let err = assert_err(
            &two_portals(""),
            "sinks.erp.portals",
            "must route exactly one portal",
        );
        assert!(err.message.contains("auth[]"), "{err}");
        assert!(
            err.message.contains("configured portals: main, other"),
            "{err}"
        );
        assert_err(
            &two_portals("portals = [\"main\", \"other\"]"),
            "sinks.erp.portals",
            "must route exactly one portal",
        );
        let config = load_str(&two_portals("portals = [\"other\"]"), &[]).unwrap();
        let SinkKind::Http(HttpSinkConfig {
            format: HttpFormat::BitrixForm(form),
            ..
        }) = &config.sinks["erp"].kind
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

        // An environment variable sets the secret; a bad one is named without its value.
        let err = load_str(
            &http_toml(""),
            &[("B24EVENTD_SINKS__ERP__SIGNING_SECRET", "whsec_12345")],
        )
        .unwrap_err();
        assert_eq!(err.key, "sinks.erp.signing_secret");
        assert!(!err.to_string().contains("12345"), "{err}");
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
