//! SIGHUP: re-reads the configuration file and swaps the two things a reload may change, the
//! routing table and the dispatcher set.

use super::dispatchers::Dispatchers;
use crate::config::Config;
use crate::pipeline::SharedRoutes;

/// SIGHUP: re-reads the config file. Sinks and routes change in place (a changed sink's
/// in-flight batch finishes on the old one first); anything else needs a restart and is named
/// in the log; an invalid file is logged and the running config kept.
pub(super) async fn reload_config(
    running: &mut Config,
    dispatchers: &mut Dispatchers,
    routes: &SharedRoutes,
) {
    let path = running.source.clone();
    tracing::info!(config = %path.display(), "reloading the configuration");
    let reloaded = match tokio::task::spawn_blocking(move || crate::config::load(&path)).await {
        Ok(Ok(config)) => config,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "configuration reload rejected: keeping the running configuration");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "configuration reload failed: keeping the running configuration");
            return;
        }
    };
    let restart = crate::config::changes_needing_restart(running, &reloaded);
    if !restart.is_empty() {
        tracing::warn!(
            keys = restart.join(", "),
            "these changes take effect only after a restart; the running values stay"
        );
    }
    let changes = crate::config::sink_changes(running, &reloaded);
    if changes.is_empty() {
        tracing::info!("configuration reloaded: sinks and routes unchanged");
        return;
    }
    // Build every new or changed sink first: one that cannot start rejects the whole reload.
    let mut built = Vec::new();
    for name in changes.added.iter().chain(&changes.changed) {
        let config = reloaded.sinks[name].clone();
        match crate::sinks::build(&config) {
            Ok(sink) => built.push((sink, config)),
            Err(e) => {
                tracing::error!(sink = %name, error = format!("{e:#}"), "configuration reload rejected: a sink cannot start; keeping the running configuration");
                return;
            }
        }
    }
    for name in changes.removed.iter().chain(&changes.changed) {
        dispatchers.stop(name).await;
    }
    running.sinks = reloaded.sinks;
    routes.replace(running);
    if let Err(e) = dispatchers.drop_unknown(running).await {
        tracing::error!(
            error = format!("{e:#}"),
            "cannot drop deliveries to removed sinks"
        );
    }
    for (sink, config) in built {
        dispatchers.start(sink, config);
    }
    dispatchers.wake_all();
    tracing::info!(
        added = changes.added.join(", "),
        removed = changes.removed.join(", "),
        changed = changes.changed.join(", "),
        "configuration reloaded: sinks and routes updated"
    );
}
