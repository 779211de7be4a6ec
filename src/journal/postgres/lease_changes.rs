//! Wakes the lease task when an instance changes the leases: a connection of its own
//! `LISTEN`s on [`CHANNEL`], which the lease statements `NOTIFY` when an instance joins,
//! releases portals or retires (`lease.rs`). Without it the others would see the change only
//! at their next tick, up to a third of the TTL later.

use crate::pg::{Tls, tls_connector};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The channel of lease changes.
pub(super) const CHANNEL: &str = "b24eventd_leases";
/// How long after its connection ended the listener connects again.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// A listening connection that lasted this long had worked: its end is worth a warning again.
const WORKED_FOR: Duration = Duration::from_secs(10);

/// Starts listening on `handle` (the journal's runtime) with `config`, and returns what is
/// notified on each change. The listener ends when the returned `Notify` is dropped (at its
/// connection's next end) or with the journal's runtime. While its connection is down, a
/// change may go unheard: each reconnection notifies once, so the lease task looks then.
pub(super) fn watch(
    handle: &tokio::runtime::Handle,
    config: tokio_postgres::Config,
    tls: Tls,
    location: String,
) -> Arc<Notify> {
    let notify = Arc::new(Notify::new());
    let weak = Arc::downgrade(&notify);
    handle.spawn(async move {
        let mut warned = false;
        loop {
            let started = Instant::now();
            let on_notify = {
                let weak = weak.clone();
                move || {
                    if let Some(notify) = weak.upgrade() {
                        notify.notify_one();
                    }
                }
            };
            let ended: anyhow::Result<()> = match tls {
                Tls::Off => crate::pg::listen(&config, tokio_postgres::NoTls, CHANNEL, on_notify)
                    .await
                    .map_err(Into::into),
                Tls::Prefer | Tls::Require => match tls_connector() {
                    Ok(tls) => crate::pg::listen(&config, tls, CHANNEL, on_notify)
                        .await
                        .map_err(Into::into),
                    Err(e) => Err(anyhow::anyhow!(e)),
                },
            };
            let Some(notify) = weak.upgrade() else {
                return; // nobody listens any more
            };
            notify.notify_one();
            if started.elapsed() >= WORKED_FOR {
                warned = false;
            }
            if !warned {
                let error = match ended {
                    Ok(()) => "the server closed the connection".to_string(),
                    Err(e) => format!("{e:#}"),
                };
                tracing::warn!(journal = %location, error = %error, "journal lease-change listener: connection ended; until it is back, lease changes are seen at the next tick; connecting again every second");
                warned = true;
            }
            tokio::time::sleep(RECONNECT_AFTER).await;
        }
    });
    notify
}
