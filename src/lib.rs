//! b24eventd: pulls Bitrix24 offline events, journals them in SQLite, delivers them to sinks and
//! settles them upstream. `main.rs` only calls [`cli::main`]; everything else lives here.
//!
//! See ARCHITECTURE.md for the code map and the invariants each module keeps.

pub mod admin;
pub mod age;
pub mod alerts;
pub mod bitrix;
#[cfg(test)]
mod boundaries;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod conformance;
pub mod daemon;
pub mod envelope;
pub mod journal;
pub mod json_depth;
pub mod metrics;
pub mod options;
pub(crate) mod pg;
pub mod pipeline;
pub mod redact;
pub mod shutdown;
pub mod sinks;
pub mod status_page;
pub mod supervisor;
pub mod systemd;

/// A boxed, sendable future: the return type of the object-safe async traits (sinks, token store).
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
