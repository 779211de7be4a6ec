//! Configuration: the TOML file, `B24EVENTD_*` overrides, defaults, validation, client secrets.
//!
//! Loading is two steps. [`load`] reads the file, layers built-in defaults < TOML < environment
//! (`B24EVENTD_PORTALS__MAIN__CLIENT_SECRET` sets `portals.main.client_secret`) with figment and
//! deserializes a `RawConfig`; `validate` (pure, no I/O) turns that into a typed [`Config`] or
//! one [`ConfigError`] naming the file and the exact key. Secrets are read later, when a portal
//! client is built, by [`resolve_secret`]. One concern per file: `raw` (the deserialized
//! structs), `load` (figment and its errors), `validate` (raw into typed), `types` (the typed
//! config), `secrets` (the build phase's I/O), `reload` (what a SIGHUP changes). What sinks need
//! too (errors, `Secret`, `SinkOptions`, the duration ranges) is in the leaf [`crate::options`].

mod load;
mod raw;
mod reload;
mod secrets;
#[cfg(test)]
mod test_support;
mod types;
mod validate;

/// The environment variable that names the config file.
pub const CONFIG_ENV: &str = "B24EVENTD_CONFIG";

pub use crate::options::{ConfigError, Secret};
pub use crate::sinks::{RetryPolicy, SinkConfig, SinkKind};
pub use load::{default_config_path, load, load_with_env};
pub use reload::{SinkChanges, changes_needing_restart, sink_changes};
pub use secrets::{resolve_secret, resolve_sink_secrets};
pub use types::{
    AdminConfig, AlertsConfig, Config, DEFAULT_LEASE_TTL, EnrichRule, JournalConfig, LogFormat,
    Mode, PortalConfig, PostgresJournalConfig, RateLimit, Synchronous,
};
pub(crate) use validate::{DEFAULT_JOURNAL_SCHEMA, check_schema_name};
