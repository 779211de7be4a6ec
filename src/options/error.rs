//! `ConfigError`: a configuration problem, naming the file (or variable) and the key.

/// A configuration problem: the file (or environment variable) and the exact key it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {}{message}", key_prefix(.key))]
pub struct ConfigError {
    /// The config file, a secret file, or `environment variable B24EVENTD_...`.
    pub file: String,
    /// Dotted key path (`portals.main.batch_size`, `sinks.erp.events[0]`); empty for a syntax
    /// error or an unreadable file.
    pub key: String,
    pub message: String,
}

fn key_prefix(key: &str) -> String {
    if key.is_empty() {
        String::new()
    } else {
        format!("{key}: ")
    }
}

impl ConfigError {
    pub fn new(
        file: impl Into<String>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            file: file.into(),
            key: key.into(),
            message: message.into(),
        }
    }
}
