//! The dispatcher of every configured sink: started at start and on reload, stopped on reload
//! (after the batch in hand is journaled) and at the drain.

use crate::alerts::SinkDirectory;
use crate::config::{Config, SinkConfig};
use crate::journal::Journal;
use crate::metrics::Metrics;
use crate::pipeline::Wakers;
use crate::pipeline::dispatcher::Dispatcher;
use crate::sinks::Sink;
use crate::supervisor::Supervisor;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The dispatcher of every configured sink, started and stopped as the config says.
pub(super) struct Dispatchers {
    running: BTreeMap<String, RunningSink>,
    /// The running sinks by name, for the alerts task.
    directory: SinkDirectory,
    journal: Journal,
    wakers: Arc<Wakers>,
    metrics: Metrics,
    /// Parent of every dispatcher's token: cancelled at the drain, after the pollers stopped
    /// fetching, so nothing new is journaled while deliveries drain.
    stop: CancellationToken,
    /// Restarts a dispatcher that died.
    supervisor: Supervisor,
}

struct RunningSink {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Option<()>>,
}

impl Dispatchers {
    pub(super) fn new(
        journal: Journal,
        wakers: Arc<Wakers>,
        metrics: Metrics,
        supervisor: Supervisor,
    ) -> Dispatchers {
        Dispatchers {
            running: BTreeMap::new(),
            directory: SinkDirectory::default(),
            journal,
            wakers,
            metrics,
            stop: CancellationToken::new(),
            supervisor,
        }
    }

    /// The running sinks by name (the alerts task sends through them; a reload updates it).
    pub(super) fn directory(&self) -> SinkDirectory {
        self.directory.clone()
    }

    pub(super) fn start(&mut self, sink: Arc<dyn Sink>, config: SinkConfig) {
        let wake = Arc::new(Notify::new());
        self.wakers
            .deliver
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(config.name.clone(), wake.clone());
        let stop = self.stop.child_token();
        self.directory
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(config.name.clone(), sink.clone());
        let worker = Dispatcher {
            wake,
            sink,
            policy: config.retry,
            journal: self.journal.clone(),
            wakers: self.wakers.clone(),
            metrics: self.metrics.clone(),
            stop: stop.clone(),
        };
        let task = tokio::spawn(self.supervisor.supervise(
            format!("dispatcher/{}", config.name),
            stop.clone(),
            move || {
                let worker = worker.clone();
                async move {
                    worker.run().await;
                    Ok(())
                }
            },
        ));
        self.running.insert(config.name, RunningSink { stop, task });
    }

    /// Stops a sink's dispatcher and waits for the batch it has in flight to finish (its
    /// outcome is journaled), so no other dispatcher takes the same deliveries meanwhile.
    pub(super) async fn stop(&mut self, name: &str) {
        self.wakers
            .deliver
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        self.directory
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if let Some(sink) = self.running.remove(name) {
            sink.stop.cancel();
            if let Err(e) = sink.task.await {
                tracing::error!(sink = %name, error = %e, "dispatcher task failed");
            }
        }
    }

    /// Wakes every dispatcher (after a reload changed the sinks).
    pub(super) fn wake_all(&self) {
        self.wakers.wake_sinks();
    }

    /// Drops pending deliveries to sinks the config no longer has (see the journal).
    pub(super) async fn drop_unknown(&self, config: &Config) -> anyhow::Result<()> {
        let known: Vec<String> = config.sinks.keys().cloned().collect();
        for (sink, count) in self.journal.drop_deliveries_to_unknown_sinks(known).await? {
            tracing::warn!(
                %sink,
                deliveries = count,
                "sink no longer configured: its pending deliveries were dropped"
            );
        }
        Ok(())
    }

    /// Stops every dispatcher and waits for them until `deadline`; the names of the sinks
    /// whose deliveries were still in flight then (their tasks are aborted).
    pub(super) async fn drain(&mut self, deadline: tokio::time::Instant) -> Vec<String> {
        self.stop.cancel();
        let mut in_flight = Vec::new();
        for (name, sink) in std::mem::take(&mut self.running) {
            let mut task = sink.task;
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(sink = %name, error = %e, "dispatcher task failed"),
                Err(_) => {
                    task.abort();
                    in_flight.push(name);
                }
            }
        }
        in_flight
    }
}
