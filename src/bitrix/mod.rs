//! The Bitrix24 REST client: the only place that knows Bitrix24's JSON, HTTP, OAuth and limits.

mod body;
pub mod client;
pub mod entities;
pub mod error;
pub mod form;
#[cfg(test)]
mod layering;
pub mod oauth;
pub mod operating;
pub mod ratelimit;
pub mod types;

pub(crate) use client::BindOutcome;
pub use client::{ClientSettings, PortalClient};
pub use error::{BitrixError, ErrorClass};
pub use oauth::{TokenStore, Tokens};
pub use types::{
    AppInfo, EventHandler, FeatureValue, ListPage, ListedEvent, OfflineBatch, OfflineEvent,
};
