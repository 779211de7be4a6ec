//! The configuration vocabulary `config` and the sink modules share: the error type
//! ([`ConfigError`]), [`Secret`] and where one comes from, the one table of duration ranges,
//! [`SinkOptions`] (a sink type's own keys, read into its typed config with
//! [`SinkOptions::parse`]), key paths and [`redact_url`]. A leaf: it depends on no module of the
//! crate but [`crate::redact`], so `sinks` can use it without depending on `config`.

mod duration;
mod error;
mod secret;
mod sink_options;
mod url;

pub(crate) use duration::duration_problem;
#[cfg(test)]
pub(crate) use duration::{DURATION_RANGES, DurationRange};
pub use error::ConfigError;
#[cfg(test)]
pub(crate) use secret::{MAX_SECRET_FILE, read_secret_file};
pub use secret::{Secret, SecretSource};
pub(crate) use secret::{SecretKeys, check_secret_text, credentials_directory, read_secret};
pub use sink_options::{COMMON_SINK_KEYS, PortalRef, SinkOptions};
pub(crate) use url::{host_of, parse_http_url, redact_url, valid_domain};

use std::collections::BTreeMap;
use std::fmt;

/// The prefix of environment variables that override config keys (`__` separates nesting).
pub(crate) const ENV_PREFIX: &str = "B24EVENTD_";
/// How a [`ConfigError`] names a value set by the environment: `environment variable B24EVENTD_…`.
pub(crate) const ENV_SOURCE: &str = "environment variable";
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("1048576"), Some(1 << 20));
        assert_eq!(parse_bytes("500MB"), Some(500_000_000));
        assert_eq!(parse_bytes("2 GiB"), Some(2 << 30));
        assert_eq!(parse_bytes("1kib"), Some(1024));
        assert_eq!(parse_bytes("MB"), None);
        assert_eq!(parse_bytes("1.5GB"), None);
    }
}
