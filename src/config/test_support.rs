//! Helpers the config tests share: a minimal config and loading a TOML text.

use super::{Config, ConfigError, SinkKind, load_with_env};
use crate::sinks::http::HttpSinkConfig;
use std::io::Write;

pub(crate) const MINIMAL: &str = r#"
[portals.main]
client_endpoint = "https://example.bitrix24.com/rest"
client_id = "local.1.2"
client_secret = "s3cr3t"
events = ["ONCRMDEALADD", "oncrmdealupdate"]

[sinks.archive]
type = "file"
path = "/tmp/events.jsonl"
"#;

pub(crate) fn write_config(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

pub(crate) fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let f = write_config(text);
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    load_with_env(f.path(), &env)
}

/// MINIMAL with `extra` appended (TOML tables may be reopened only once, so `extra` adds keys
/// through dotted names or new tables).
pub(crate) fn with(extra: &str) -> String {
    format!("{MINIMAL}\n{extra}\n")
}

#[track_caller]
pub(crate) fn assert_err(text: &str, key: &str, needle: &str) -> ConfigError {
    let err = load_str(text, &[]).expect_err("config should be rejected");
    assert_eq!(err.key, key, "wrong key in {err}");
    assert!(
        err.message.contains(needle),
        "message {:?} should contain {needle:?}",
        err.message
    );
    err
}

pub(crate) fn portal(extra_keys: &str) -> String {
    format!(
        r#"
[portals.main]
client_endpoint = "https://example.bitrix24.com/rest/"
client_id = "local.1.2"
client_secret = "s3cr3t"
events = ["ONCRMDEALADD"]
{extra_keys}

[sinks.archive]
type = "file"
path = "/tmp/events.jsonl"
"#
    )
}

pub(crate) fn sink(extra_keys: &str) -> String {
    format!(
        r#"
[portals.main]
client_endpoint = "https://example.bitrix24.com/rest/"
client_id = "local.1.2"
client_secret = "s3cr3t"
events = ["ONCRMDEALADD"]

[sinks.erp]
{extra_keys}
"#
    )
}

pub(crate) const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

pub(crate) fn http_toml(extra_keys: &str) -> String {
    sink(&format!(
        "type = \"http\"\nurl = \"http://erp:8080/ev\"\n{extra_keys}"
    ))
}

pub(crate) fn bitrix(extra_keys: &str) -> String {
    http_toml(&format!(
        "format = \"bitrix-form\"\nbitrix_member_id = \"d897063e1ce7c5eb9f04b9751eef5915\"\napplication_token = \"t0ken\"\n{extra_keys}"
    ))
}

pub(crate) fn http_config(text: &str) -> HttpSinkConfig {
    let config = load_str(text, &[]).unwrap_or_else(|e| panic!("{e}"));
    let SinkKind::Http(http) = &config.sinks["erp"].kind else {
        panic!("http sink expected")
    };
    http.clone()
}
