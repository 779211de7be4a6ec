//! The configuration vocabulary `config` and the sink modules share: the error type
//! ([`ConfigError`]), [`Secret`] and where one comes from, the one table of duration ranges,
//! [`SinkOptions`] (a sink type's own keys, read into its typed config with
//! [`SinkOptions::parse`]), key paths and [`redact_url`]. A leaf: it depends on no module of the
//! crate but [`crate::redact`], so `sinks` can use it without depending on `config`.

mod duration;
mod error;
mod secret;

pub(crate) use duration::duration_problem;
#[cfg(test)]
pub(crate) use duration::{DURATION_RANGES, DurationRange};
pub use error::ConfigError;
#[cfg(test)]
pub(crate) use secret::{MAX_SECRET_FILE, read_secret_file};
pub use secret::{Secret, SecretSource};
pub(crate) use secret::{SecretKeys, check_secret_text, credentials_directory, read_secret};

use figment::value::{Dict, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The prefix of environment variables that override config keys (`__` separates nesting).
pub(crate) const ENV_PREFIX: &str = "B24EVENTD_";
/// Variables with [`ENV_PREFIX`] that are not config keys (used by the CLI itself).
pub(crate) const IGNORED_ENV: &[&str] = &["B24EVENTD_CONFIG", "B24EVENTD_LOG"];

/// The environment variable that sets the key `keys` (`B24EVENTD_PORTALS__MAIN__CLIENT_SECRET`).
pub(crate) fn env_var_name(keys: &[&str]) -> String {
    let upper: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
    format!("{ENV_PREFIX}{}", upper.join("__"))
}

/// Renders a key path: `portals.main.batch_size`, list items as `events[0]`.
pub(crate) fn render_key<S: AsRef<str>>(path: &[S]) -> String {
    let mut key = String::new();
    for (i, seg) in path.iter().enumerate() {
        let seg = seg.as_ref();
        let is_index = i >= 2
            && !seg.is_empty()
            && seg.bytes().all(|b| b.is_ascii_digit())
            && matches!(
                path[i - 1].as_ref(),
                "events" | "portals" | "command" | "permanent_exit_codes" | "retry_on" | "dead_on"
            );
        if is_index {
            key.push_str(&format!("[{seg}]"));
        } else {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(seg);
        }
    }
    key
}

/// Appends `field` unless figment already ended the path with it.
pub(crate) fn push_leaf(path: &mut Vec<String>, field: &str) {
    if path.last().map(String::as_str) != Some(field) {
        path.push(field.to_string());
    }
}

/// Map keys (header or variable names) with their values hidden, for `Debug`.
pub(crate) struct RedactedValues<'a>(pub(crate) &'a BTreeMap<String, String>);

impl fmt::Debug for RedactedValues<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "[redacted]")))
            .finish()
    }
}

/// `url` with any `user:password@` removed, for logs and error messages.
pub(crate) fn redact_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(mut parsed) => {
            if !parsed.username().is_empty() || parsed.password().is_some() {
                let _ = parsed.set_username("");
                let _ = parsed.set_password(None);
            }
            parsed.to_string()
        }
        // Not a URL: drop everything up to an `@` that could be userinfo.
        Err(_) => match (url.find("://"), url.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                format!("{}{}", &url[..scheme_end + 3], &url[at + 1..])
            }
            _ => url.to_string(),
        },
    }
}

/// A size such as `500MB`, `2GiB`, `1048576` (bytes; decimal and binary units).
pub(crate) fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(factor)
}

/// The type-specific keys of one `[sinks.NAME]` of a type that defines its own config (`redis`,
/// `nats`, ...): `url` and every key `RawSink` does not name. A sink module reads them into its
/// typed config with [`SinkOptions::parse`] and reports problems with [`SinkOptions::err`].
#[derive(Clone)]
pub struct SinkOptions {
    file: String,
    sink: String,
    kind: &'static str,
    values: Dict,
}

impl SinkOptions {
    /// The keys `values` of `[sinks.NAME]` (`sink`) of type `kind`, read from `file`.
    pub(crate) fn new(
        file: impl Into<String>,
        sink: impl Into<String>,
        kind: &'static str,
        values: Dict,
    ) -> SinkOptions {
        SinkOptions {
            file: file.into(),
            sink: sink.into(),
            kind,
            values,
        }
    }

    /// The `[sinks.NAME]` these options belong to.
    pub fn sink_name(&self) -> &str {
        &self.sink
    }

    /// The dotted path of one of these keys, `sinks.NAME.key`.
    pub fn key(&self, key: &str) -> String {
        format!("sinks.{}.{key}", self.sink)
    }

    /// A duration key of this sink: `default` when unset, else the value, which must lie in
    /// the key's [`DurationRange`].
    pub fn duration(
        &self,
        key: &str,
        value: Option<Duration>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        match duration_problem(&self.key(key), value) {
            Some(problem) => Err(self.err(key, problem)),
            None => Ok(value),
        }
    }

    /// An error about `key` (a key of this sink, without the `sinks.NAME.` prefix).
    pub fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::new(&self.file, self.key(key), message)
    }

    /// Reads the options into `T`, which should be `#[serde(deny_unknown_fields)]` so that a
    /// misspelt key is named. Messages never echo a value (a URL may carry a password).
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        use figment::error::Kind;
        let error = match Value::from(self.values.clone()).deserialize::<T>() {
            Ok(parsed) => return Ok(parsed),
            Err(e) => e
                .into_iter()
                .next()
                .unwrap_or_else(|| figment::Error::from("invalid value".to_string())),
        };
        let mut path = error.path.clone();
        let message = match &error.kind {
            Kind::UnknownField(field, expected) => {
                push_leaf(&mut path, field);
                format!(
                    "not a key of a {:?} sink; its keys: {}",
                    self.kind,
                    expected.join(", ")
                )
            }
            Kind::MissingField(field) => {
                push_leaf(&mut path, field);
                "missing required key".to_string()
            }
            Kind::InvalidType(_, expected) | Kind::InvalidValue(_, expected) => {
                format!("invalid value, expected {expected}")
            }
            _ => "invalid value".to_string(),
        };
        Err(self.err(&render_key(&path), message))
    }
}

impl fmt::Debug for SinkOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkOptions")
            .field("sink", &self.sink)
            .field("kind", &self.kind)
            .field("keys", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[test]
    fn redact_url_strips_userinfo() {
        assert_eq!(
            redact_url("https://user:pw@host:8080/p?q=1"),
            "https://host:8080/p?q=1"
        );
        assert_eq!(redact_url("http://host/p"), "http://host/p");
        assert_eq!(redact_url("weird://user:pw@"), "weird://");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("1048576"), Some(1 << 20));
        assert_eq!(parse_bytes("500MB"), Some(500_000_000));
        assert_eq!(parse_bytes("2 GiB"), Some(2 << 30));
        assert_eq!(parse_bytes("1kib"), Some(1024));
        assert_eq!(parse_bytes("MB"), None);
        assert_eq!(parse_bytes("1.5GB"), None);
    }

    #[test]
    fn sink_options_reach_a_typed_config_with_named_errors() {
        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct Options {
            url: String,
            stream: String,
            maxlen: Option<u64>,
        }
        let options = |url: &str, pairs: &[(&str, Value)]| -> SinkOptions {
            let mut values: Dict = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            values.insert("url".to_string(), Value::from(url));
            SinkOptions::new("c.toml", "q", "redis", values)
        };
        let url = "redis://:hunter2@127.0.0.1/";

        let ok = options(url, &[("stream", Value::from("s"))]);
        assert_eq!(
            ok.parse::<Options>().unwrap(),
            Options {
                url: url.to_string(),
                stream: "s".into(),
                maxlen: None
            }
        );
        assert!(!format!("{ok:?}").contains("hunter2"));

        let typo = options(
            url,
            &[("stream", Value::from("s")), ("max_len", Value::from(5u64))],
        );
        let err = typo.parse::<Options>().unwrap_err();
        assert_eq!(
            (err.file.as_str(), err.key.as_str()),
            ("c.toml", "sinks.q.max_len")
        );
        assert!(
            err.message
                .starts_with("not a key of a \"redis\" sink; its keys: url, stream, maxlen"),
            "{}",
            err.message
        );

        let missing = options(url, &[]);
        let err = missing.parse::<Options>().unwrap_err();
        assert_eq!(
            (err.key.as_str(), err.message.as_str()),
            ("sinks.q.stream", "missing required key")
        );

        let wrong = options("x", &[("stream", Value::from(7u64))]);
        let err = wrong.parse::<Options>().unwrap_err();
        assert_eq!(err.key, "sinks.q.stream");
        assert!(
            err.message.starts_with("invalid value, expected"),
            "{}",
            err.message
        );
    }
}
