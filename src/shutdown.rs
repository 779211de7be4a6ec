//! The one shutdown token: SIGTERM/SIGINT (through signal-hook) cancel it, every task watches it.

use tokio_util::sync::CancellationToken;

/// Cancel `token` on the first SIGTERM or SIGINT. A second signal exits at once with status 130.
///
/// signal-hook's iterator runs on its own thread so no async task has to own the signals.
pub fn cancel_on_signals(token: CancellationToken) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen == 1 {
                    tracing::info!(signal, "shutdown requested: finishing in-flight work");
                    token.cancel();
                } else {
                    tracing::warn!(signal, "second signal: exiting now");
                    std::process::exit(130);
                }
            }
        })?;
    Ok(())
}
