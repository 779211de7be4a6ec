//! Process signals: the one shutdown token (SIGTERM/SIGINT cancel it, every task watches it)
//! and the reload request (SIGHUP), both delivered through signal-hook's own thread.

use std::sync::Arc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Cancel `token` on the first SIGTERM or SIGINT. A second one exits at once with status 128 +
/// the signal's number, as a shell reports a process the signal ended: 143 for SIGTERM, 130 for
/// SIGINT (what is in flight is recovered at the next start, as after a kill).
///
/// signal-hook's iterator runs on its own thread so no async task has to own the signals.
pub fn cancel_on_signals(token: CancellationToken) -> std::io::Result<()> {
    watch_signals(token, None)
}

/// [`cancel_on_signals`], and SIGHUP notifies `reload` (the daemon re-reads its config).
pub fn watch_signals(token: CancellationToken, reload: Option<Arc<Notify>>) -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut wanted = vec![SIGTERM, SIGINT];
    if reload.is_some() {
        wanted.push(SIGHUP);
    }
    let mut signals = signal_hook::iterator::Signals::new(&wanted)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                if signal == SIGHUP {
                    if let Some(reload) = &reload {
                        tracing::info!(signal, "reload requested");
                        reload.notify_one();
                    }
                    continue;
                }
                seen += 1;
                if seen == 1 {
                    tracing::info!(signal, "shutdown requested: finishing in-flight work");
                    token.cancel();
                } else {
                    let status = 128 + signal;
                    tracing::warn!(
                        signal,
                        status,
                        "second signal: exiting now, in-flight work is recovered at the next start"
                    );
                    std::process::exit(status);
                }
            }
        })?;
    Ok(())
}
