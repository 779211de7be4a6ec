//! `[portals.NAME]`: endpoint, credentials, events, mode, limits, schedules, enrichment.

use super::{Validator, valid_name};
use crate::config::raw::RawPortal;
use crate::config::types::{EnrichRule, Mode, PortalConfig, RateLimit};
use crate::options::{ConfigError, SecretSource, check_secret_text, env_var_name};
use std::time::Duration;

const DEFAULT_OAUTH_TOKEN_URL: &str = "https://oauth.bitrix.info/oauth/token/";
const DEFAULT_BATCH_SIZE: u32 = 50;
const MAX_BATCH_SIZE: u32 = 1000;
pub(super) const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_BURST: u32 = 50;
const DEFAULT_PER_SECOND: f64 = 2.0;
/// Half the portal's bucket: the rest is left to the other integrations of the account.
const DEFAULT_SHARE: f64 = 0.5;
/// `LoadLimiter::$limitTime` of the rest module: 420 s per method per 10 minutes unless the
/// plan sets `rest_load_limiter_seconds` (the docs' older example said 480).
pub(super) const DEFAULT_OPERATING_BUDGET: Duration = Duration::from_secs(420);
/// How slowly an idle portal is polled at most (when `poll_interval` is shorter).
pub(super) const DEFAULT_IDLE_POLL_MAX: Duration = Duration::from_secs(30);
const DEFAULT_MAX_UNSETTLED: u32 = 5000;
const DEFAULT_ERROR_LANE_SCHEDULE: &str = "0 */10 * * * *";
const DEFAULT_ORPHAN_SWEEP_SCHEDULE: &str = "0 */5 * * * *";
pub(super) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

impl Validator {
    pub(super) fn portal(&self, name: &str, raw: RawPortal) -> Result<PortalConfig, ConfigError> {
        let k = |key: &str| format!("portals.{name}.{key}");
        if !valid_name(name) {
            return Err(self.err(
                format!("portals.{name}"),
                "invalid portal name; use lowercase letters, digits, '_' and '-'",
            ));
        }

        let client_endpoint = self.client_endpoint(&k("client_endpoint"), raw.client_endpoint)?;
        let oauth_token_url = raw
            .oauth_token_url
            .unwrap_or_else(|| DEFAULT_OAUTH_TOKEN_URL.to_string());
        self.http_url(&k("oauth_token_url"), &oauth_token_url)?;
        let client_id = self.non_empty(&k("client_id"), raw.client_id)?;

        let client_secret = match (raw.client_secret, raw.client_secret_file) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    k("client_secret"),
                    format!(
                        "both client_secret and client_secret_file are set; keep one (the environment variable {} also sets client_secret)",
                        env_var_name(&["portals", name, "client_secret"])
                    ),
                ));
            }
            (Some(secret), None) if secret.expose().trim().is_empty() => {
                return Err(self.err(k("client_secret"), "must not be empty"));
            }
            (Some(secret), None) => {
                check_secret_text(secret.expose(), "client secret")
                    .map_err(|problem| self.err(k("client_secret"), problem))?;
                SecretSource::Inline(secret)
            }
            (None, Some(path)) if path.as_os_str().is_empty() => {
                return Err(self.err(k("client_secret_file"), "must not be empty"));
            }
            (None, Some(path)) => SecretSource::File(path),
            (None, None) => SecretSource::Credential(format!("{name}.client_secret")),
        };

        let auth_connector = match raw.auth_connector {
            Some(s) if s.trim().is_empty() => {
                return Err(self.err(
                    k("auth_connector"),
                    "must not be empty (leave the key out instead)",
                ));
            }
            other => other.map(|s| s.trim().to_string()),
        };

        let events = self.portal_events(&k("events"), raw.events)?;

        let mode = match raw.mode.as_deref() {
            None | Some("reserve") => Mode::Reserve,
            Some("fetch-delete") => Mode::FetchDelete,
            Some(other) => {
                return Err(self.err(
                    k("mode"),
                    format!(
                        "unsupported mode {other:?}; supported: \"reserve\" (needs rest_offline_extended) and \"fetch-delete\""
                    ),
                ));
            }
        };

        let batch_size = raw.batch_size.unwrap_or(DEFAULT_BATCH_SIZE);
        if !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
            return Err(self.err(
                k("batch_size"),
                format!("must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}"),
            ));
        }
        let max_unsettled = raw.max_unsettled.unwrap_or(DEFAULT_MAX_UNSETTLED);
        if max_unsettled < batch_size {
            return Err(self.err(
                k("max_unsettled"),
                format!("must be at least batch_size ({batch_size}), got {max_unsettled}"),
            ));
        }

        let rate = raw.rate_limit.unwrap_or_default();
        let burst = rate.burst.unwrap_or(DEFAULT_BURST);
        if burst < 1 {
            return Err(self.err(k("rate_limit.burst"), "must be at least 1"));
        }
        let per_second = rate.per_second.unwrap_or(DEFAULT_PER_SECOND);
        if !(per_second.is_finite() && per_second > 0.0) {
            return Err(self.err(
                k("rate_limit.per_second"),
                format!("must be greater than 0, got {per_second}"),
            ));
        }

        let share = rate.share.unwrap_or(DEFAULT_SHARE);
        if !(share.is_finite() && share > 0.0 && share <= 1.0) {
            return Err(self.err(
                k("rate_limit.share"),
                format!("must be a fraction greater than 0 and at most 1, got {share}"),
            ));
        }
        let poll_interval = self.duration(
            &k("poll_interval"),
            raw.poll_interval,
            DEFAULT_POLL_INTERVAL,
        )?;
        let idle_poll_max = self
            .bounded(&k("idle_poll_max"), raw.idle_poll_max)?
            .unwrap_or(DEFAULT_IDLE_POLL_MAX.max(poll_interval));
        if idle_poll_max < poll_interval {
            return Err(self.err(
                k("idle_poll_max"),
                format!(
                    "must not be shorter than poll_interval ({}), got {}",
                    humantime::format_duration(poll_interval),
                    humantime::format_duration(idle_poll_max)
                ),
            ));
        }

        let mut enrich = Vec::new();
        for (glob, method) in raw.enrich.unwrap_or_default() {
            let key = format!("{}.{glob:?}", k("enrich"));
            if glob.trim().is_empty() {
                return Err(self.err(key, "the event glob must not be empty"));
            }
            let Some(getter) = crate::bitrix::entities::Getter::from_method(&method) else {
                let known: Vec<&str> = crate::bitrix::entities::Getter::ALL
                    .iter()
                    .map(|g| g.method())
                    .collect();
                return Err(self.err(
                    key,
                    format!("unknown getter {method:?}; supported: {}", known.join(", ")),
                ));
            };
            enrich.push(EnrichRule {
                events: glob.trim().to_ascii_uppercase(),
                getter,
            });
        }

        Ok(PortalConfig {
            name: name.to_string(),
            client_endpoint,
            oauth_token_url,
            client_id,
            client_secret,
            auth_connector,
            events,
            mode,
            batch_size,
            poll_interval,
            idle_poll_max,
            rate_limit: RateLimit {
                burst,
                per_second,
                share,
                operating_budget: self.duration(
                    &k("rate_limit.operating_budget"),
                    rate.operating_budget,
                    DEFAULT_OPERATING_BUDGET,
                )?,
            },
            max_unsettled,
            error_lane_schedule: self.schedule(
                &k("error_lane_schedule"),
                raw.error_lane_schedule,
                DEFAULT_ERROR_LANE_SCHEDULE,
            )?,
            orphan_sweep_schedule: self.schedule(
                &k("orphan_sweep_schedule"),
                raw.orphan_sweep_schedule,
                DEFAULT_ORPHAN_SWEEP_SCHEDULE,
            )?,
            request_timeout: self.duration(
                &k("request_timeout"),
                raw.request_timeout,
                DEFAULT_REQUEST_TIMEOUT,
            )?,
            enrich,
        })
    }

    fn client_endpoint(&self, key: &str, value: Option<String>) -> Result<String, ConfigError> {
        let value = self.non_empty(key, value)?;
        let url = self.http_url(key, &value)?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(self.err(key, "must not have a query string or fragment"));
        }
        let segments: Vec<&str> = url
            .path_segments()
            .map(|s| s.filter(|s| !s.is_empty()).collect())
            .unwrap_or_default();
        let is_webhook = matches!(
            segments.as_slice(),
            ["rest", user, code, ..] if user.bytes().all(|b| b.is_ascii_digit()) && !code.is_empty()
        );
        if is_webhook {
            let portal = url.host_str().unwrap_or("<portal>");
            return Err(self.err(
                key,
                format!(
                    "this is an incoming webhook URL, but the event.* methods reject incoming webhooks (WRONG_AUTH_TYPE); create a local application and configure its client_endpoint (`https://{portal}/rest/`), client_id and client_secret"
                ),
            ));
        }
        let mut endpoint = value;
        if !endpoint.ends_with('/') {
            endpoint.push('/');
        }
        Ok(endpoint)
    }

    fn portal_events(
        &self,
        key: &str,
        value: Option<Vec<String>>,
    ) -> Result<Vec<String>, ConfigError> {
        let list = value.ok_or_else(|| {
            self.err(
                key,
                "missing required key: the event names to receive, e.g. [\"ONCRMDEALUPDATE\"]",
            )
        })?;
        if list.is_empty() {
            return Err(self.err(key, "at least one event name is required"));
        }
        let mut events: Vec<String> = Vec::with_capacity(list.len());
        for (i, event) in list.iter().enumerate() {
            let event = event.trim();
            if event.is_empty() {
                return Err(self.err(format!("{key}[{i}]"), "must not be empty"));
            }
            if event.contains(['*', '?']) {
                return Err(self.err(
                    format!("{key}[{i}]"),
                    format!("{event:?} is a glob; portal events are exact names to subscribe to (globs belong in sinks.NAME.events)"),
                ));
            }
            let event = event.to_ascii_uppercase();
            if !events.contains(&event) {
                events.push(event);
            }
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_support::*;

    #[test]
    fn enrich_rules_name_known_getters() {
        let config = load_str(
            &portal(
                "enrich = { \"ONCRMDEAL*\" = \"crm.deal.get\", \"ontask*\" = \"tasks.task.get\" }",
            ),
            &[],
        )
        .unwrap();
        let p = &config.portals["main"];
        use crate::bitrix::entities::Getter;
        assert_eq!(p.getter_for("ONCRMDEALUPDATE"), Some(Getter::CrmDeal));
        assert_eq!(p.getter_for("ONTASKADD"), Some(Getter::Task));
        assert_eq!(p.getter_for("ONCRMLEADADD"), None);
        assert_err(
            &portal("enrich = { \"ONCRMDEAL*\" = \"crm.deal.list\" }"),
            "portals.main.enrich.\"ONCRMDEAL*\"",
            "unknown getter \"crm.deal.list\"; supported: crm.deal.get",
        );
        assert_eq!(
            load_str(MINIMAL, &[]).unwrap().portals["main"].enrich,
            vec![]
        );
    }

    #[test]
    fn portal_required_keys() {
        let text = portal("").replace("client_id = \"local.1.2\"\n", "");
        assert_err(&text, "portals.main.client_id", "missing");
        let text = portal("").replace(
            "client_endpoint = \"https://example.bitrix24.com/rest/\"\n",
            "",
        );
        assert_err(&text, "portals.main.client_endpoint", "missing");
        let text = portal("").replace("events = [\"ONCRMDEALADD\"]\n", "");
        assert_err(&text, "portals.main.events", "missing");
    }

    #[test]
    fn batch_size_and_max_unsettled() {
        assert_err(
            &portal("batch_size = 0"),
            "portals.main.batch_size",
            "between 1 and 1000",
        );
        assert_err(
            &portal("batch_size = 1001"),
            "portals.main.batch_size",
            "between 1 and 1000",
        );
        assert!(load_str(&portal("batch_size = 1000"), &[]).is_ok());
        assert_err(
            &portal("batch_size = 100\nmax_unsettled = 99"),
            "portals.main.max_unsettled",
            "at least batch_size (100)",
        );
        assert_err(
            &portal("batch_size = -1"),
            "portals.main.batch_size",
            "invalid",
        );
    }

    #[test]
    fn rate_limit_bounds() {
        assert_err(
            &portal("rate_limit = { burst = 0 }"),
            "portals.main.rate_limit.burst",
            "at least 1",
        );
        assert_err(
            &portal("rate_limit = { per_second = 0.0 }"),
            "portals.main.rate_limit.per_second",
            "greater than 0",
        );
        assert_err(
            &portal("rate_limit = { per_second = -1 }"),
            "portals.main.rate_limit.per_second",
            "greater than 0",
        );
        assert_err(
            &portal("rate_limit = { burst = 5, rate = 1 }"),
            "portals.main.rate_limit.rate",
            "unknown key",
        );
        let config =
            load_str(&portal("rate_limit = { burst = 250, per_second = 5 }"), &[]).unwrap();
        assert_eq!(
            config.portals["main"].rate_limit,
            RateLimit {
                burst: 250,
                per_second: 5.0,
                share: 0.5,
                operating_budget: Duration::from_secs(420)
            }
        );
        assert_eq!(
            config.portals["main"].rate_limit.client_bucket(),
            (125, 2.5)
        );
        let config = load_str(&portal("rate_limit = { share = 1.0 }"), &[]).unwrap();
        assert_eq!(config.portals["main"].rate_limit.client_bucket(), (50, 2.0));
        let config = load_str(&portal("rate_limit = { burst = 1, share = 0.1 }"), &[]).unwrap();
        assert_eq!(config.portals["main"].rate_limit.client_bucket().0, 1);
        for bad in ["0.0", "1.5", "-0.5"] {
            assert_err(
                &portal(&format!("rate_limit = {{ share = {bad} }}")),
                "portals.main.rate_limit.share",
                "must be a fraction greater than 0 and at most 1",
            );
        }
    }

    #[test]
    fn portal_events_are_exact_names() {
        assert_err(
            &portal("").replace("[\"ONCRMDEALADD\"]", "[]"),
            "portals.main.events",
            "at least one",
        );
        assert_err(
            &portal("").replace("[\"ONCRMDEALADD\"]", "[\"A\", \"\"]"),
            "portals.main.events[1]",
            "must not be empty",
        );
        assert_err(
            &portal("").replace("[\"ONCRMDEALADD\"]", "[\"ONCRMDEAL*\"]"),
            "portals.main.events[0]",
            "glob",
        );
        let config = load_str(
            &portal("").replace("[\"ONCRMDEALADD\"]", "[\"a\", \"A\", \"b\"]"),
            &[],
        )
        .unwrap();
        assert_eq!(config.portals["main"].events, vec!["A", "B"]);
    }

    #[test]
    fn modes() {
        let mode = |extra: &str| load_str(&portal(extra), &[]).unwrap().portals["main"].mode;
        assert_eq!(mode("mode = \"reserve\""), Mode::Reserve);
        assert_eq!(mode("mode = \"fetch-delete\""), Mode::FetchDelete);
        let err = assert_err(
            &portal("mode = \"delete\""),
            "portals.main.mode",
            "unsupported mode \"delete\"",
        );
        assert!(err.message.contains("\"reserve\"") && err.message.contains("\"fetch-delete\""));
    }

    #[test]
    fn client_endpoint_must_be_http_and_not_a_webhook() {
        let text = portal("").replace(
            "https://example.bitrix24.com/rest/",
            "ftp://example.bitrix24.com/rest/",
        );
        assert_err(&text, "portals.main.client_endpoint", "http:// or https://");
        let text = portal("").replace("https://example.bitrix24.com/rest/", "example.bitrix24.com");
        assert_err(&text, "portals.main.client_endpoint", "invalid URL");
        let text = portal("").replace(
            "https://example.bitrix24.com/rest/",
            "https://example.bitrix24.com/rest/1/83te1pjdphsa9u15/",
        );
        let err = assert_err(&text, "portals.main.client_endpoint", "WRONG_AUTH_TYPE");
        assert!(
            err.message
                .contains("the event.* methods reject incoming webhooks (WRONG_AUTH_TYPE)")
        );
        assert!(err.message.contains("create a local application and configure its client_endpoint (`https://example.bitrix24.com/rest/`), client_id and client_secret"));
        assert!(
            !err.message.contains("83te1pjdphsa9u15"),
            "the webhook code is a secret: {err}"
        );
        let text = portal("").replace(
            "https://example.bitrix24.com/rest/",
            "https://example.bitrix24.com/rest/12/abc/profile.json",
        );
        assert_err(&text, "portals.main.client_endpoint", "WRONG_AUTH_TYPE");
        let text = portal("oauth_token_url = \"file:///x\"");
        assert_err(&text, "portals.main.oauth_token_url", "http:// or https://");
    }

    #[test]
    fn secret_sources() {
        let config = load_str(
            &portal("").replace(
                "client_secret = \"s3cr3t\"",
                "client_secret_file = \"/etc/b24/main.secret\"",
            ),
            &[],
        )
        .unwrap();
        assert_eq!(
            config.portals["main"].client_secret,
            SecretSource::File("/etc/b24/main.secret".into())
        );

        let config =
            load_str(&portal("").replace("client_secret = \"s3cr3t\"\n", ""), &[]).unwrap();
        assert_eq!(
            config.portals["main"].client_secret,
            SecretSource::Credential("main.client_secret".into())
        );

        let both = portal("client_secret_file = \"/x\"");
        assert_err(
            &both,
            "portals.main.client_secret",
            "both client_secret and client_secret_file",
        );
        assert_err(
            &portal("").replace("\"s3cr3t\"", "\"\""),
            "portals.main.client_secret",
            "must not be empty",
        );
        assert_err(
            &portal("auth_connector = \" \""),
            "portals.main.auth_connector",
            "must not be empty",
        );
    }
}
