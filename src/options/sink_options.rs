//! [`SinkOptions`]: the type-specific keys of one `[sinks.NAME]`, handed to the sink type's own
//! module, which reads them into its typed config with [`SinkOptions::parse`] and names the key
//! (and the file or environment variable it came from) in every error.

use super::duration::duration_problem;
use super::{ConfigError, env_var_name, push_leaf, render_key};
use figment::value::{Dict, Value};
use std::fmt;
use std::time::Duration;

/// The keys every `[sinks.NAME]` has, whatever its type; `config` reads them, the sink type's
/// module never sees them.
pub const COMMON_SINK_KEYS: &[&str] = &[
    "type",
    "events",
    "portals",
    "timeout",
    "concurrency",
    "retry",
];

/// A configured portal as a sink type may need it (a `bitrix-form` http sink posts one portal's
/// `auth[]`): its name and its two endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortalRef {
    pub name: String,
    /// The REST base, ending with `/`.
    pub client_endpoint: String,
    pub oauth_token_url: String,
}

/// The type-specific keys of one `[sinks.NAME]`: every key but [`COMMON_SINK_KEYS`]. The sink
/// type's module reads them into its typed config with [`SinkOptions::parse`] and reports
/// problems with [`SinkOptions::err`].
#[derive(Clone)]
pub struct SinkOptions {
    file: String,
    sink: String,
    kind: &'static str,
    values: Dict,
    /// Keys (paths below `sinks.NAME`, lower case) set by a `B24EVENTD_SINKS__NAME__…` variable.
    env_keys: Vec<Vec<String>>,
    portals: Vec<PortalRef>,
    routed_portals: Vec<String>,
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
            env_keys: Vec::new(),
            portals: Vec::new(),
            routed_portals: Vec::new(),
        }
    }

    /// Marks the keys (paths below `sinks.NAME`) that an environment variable set, so that an
    /// error about one names the variable instead of the file.
    pub(crate) fn with_env_keys(mut self, env_keys: Vec<Vec<String>>) -> SinkOptions {
        self.env_keys = env_keys;
        self
    }

    /// The configured portals, and those this sink's `portals` key routes (empty: every portal).
    pub(crate) fn with_portals(
        mut self,
        portals: Vec<PortalRef>,
        routed_portals: Vec<String>,
    ) -> SinkOptions {
        self.portals = portals;
        self.routed_portals = routed_portals;
        self
    }

    /// The `[sinks.NAME]` these options belong to.
    pub fn sink_name(&self) -> &str {
        &self.sink
    }

    /// Every configured portal, in name order.
    pub fn portals(&self) -> &[PortalRef] {
        &self.portals
    }

    /// The portals this sink's `portals` key names; empty when it routes every portal.
    pub fn routed_portals(&self) -> &[String] {
        &self.routed_portals
    }

    /// The dotted path of one of these keys, `sinks.NAME.key`.
    pub fn key(&self, key: &str) -> String {
        format!("sinks.{}.{key}", self.sink)
    }

    /// A duration key of this sink: `default` when unset, else the value, which must lie in
    /// the key's [`DurationRange`](super::DurationRange).
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

    /// A required text key: missing, or blank after trimming, is an error; the value is trimmed.
    pub fn required_text(&self, key: &str, value: Option<String>) -> Result<String, ConfigError> {
        match value {
            None => Err(self.err(key, "missing required key")),
            Some(text) if text.trim().is_empty() => Err(self.err(key, "must not be empty")),
            Some(text) => Ok(text.trim().to_string()),
        }
    }

    /// An error about `key` (a key of this sink as rendered below `sinks.NAME.`: `url`,
    /// `headers.X-Token`, `retry_on[1]`), naming the environment variable that set it, if one did.
    pub fn err(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let source = match self.env_key_of(key) {
            Some(path) => {
                let mut keys = vec!["sinks", self.sink.as_str()];
                keys.extend(path.iter().map(String::as_str));
                format!("{} {}", super::ENV_SOURCE, env_var_name(&keys))
            }
            None => self.file.clone(),
        };
        ConfigError::new(source, self.key(key), message)
    }

    /// The environment-set key that `key` is or lies below.
    fn env_key_of(&self, key: &str) -> Option<&Vec<String>> {
        let segments: Vec<String> = key
            .split('.')
            .map(|segment| {
                segment
                    .split('[')
                    .next()
                    .unwrap_or_default()
                    .to_ascii_lowercase()
            })
            .collect();
        self.env_keys
            .iter()
            .find(|path| !path.is_empty() && segments.starts_with(path))
    }

    /// Reads the options into `T`, which should be `#[serde(deny_unknown_fields)]` so that a
    /// misspelt key is named with the keys there are. Messages never echo a value (a URL may
    /// carry a password, a header a token).
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
                    "not a key of a {:?} sink; its keys: {}; every sink also has: {}",
                    self.kind,
                    expected.join(", "),
                    COMMON_SINK_KEYS.join(", ")
                )
            }
            Kind::MissingField(field) => {
                push_leaf(&mut path, field);
                "missing required key".to_string()
            }
            Kind::InvalidType(actual, expected) => {
                format!(
                    "invalid type: found {}, expected {expected}",
                    kind_of(actual)
                )
            }
            Kind::InvalidValue(_, expected) => format!("invalid value, expected {expected}"),
            _ => "invalid value".to_string(),
        };
        Err(self.err(&render_key(&path), message))
    }
}

/// What a value is, without the value.
fn kind_of(actual: &figment::error::Actual) -> &'static str {
    use figment::error::Actual;
    match actual {
        Actual::Bool(_) => "a boolean",
        Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
        Actual::Float(_) => "a float",
        Actual::Char(_) | Actual::Str(_) => "a string",
        Actual::Bytes(_) => "bytes",
        Actual::Seq => "a list",
        Actual::Map => "a table",
        _ => "another kind of value",
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
            err.message
                .starts_with("invalid type: found an integer, expected a string"),
            "{}",
            err.message
        );
        assert!(
            typo.parse::<Options>().unwrap_err().message.ends_with(
                "every sink also has: type, events, portals, timeout, concurrency, retry"
            )
        );

        // A key an environment variable set is named by the variable, a nested one in full.
        let from_env = wrong.with_env_keys(vec![vec!["stream".to_string()]]);
        let err = from_env.parse::<Options>().unwrap_err();
        assert_eq!(
            (err.file.as_str(), err.key.as_str()),
            (
                "environment variable B24EVENTD_SINKS__Q__STREAM",
                "sinks.q.stream"
            )
        );
        let nested = options(url, &[]).with_env_keys(vec![vec!["headers".into(), "x-a".into()]]);
        assert_eq!(
            nested.err("headers.X-A", "bad").file,
            "environment variable B24EVENTD_SINKS__Q__HEADERS__X-A"
        );
        assert_eq!(nested.err("headers.X-B", "bad").file, "c.toml");
        let listed = options(url, &[]).with_env_keys(vec![vec!["retry_on".into()]]);
        assert_eq!(
            listed.err("retry_on[1]", "bad").file,
            "environment variable B24EVENTD_SINKS__Q__RETRY_ON"
        );
    }
}
