//! Reserving and journaling: how many events a fetch may take (`max_unsettled`,
//! `batch_size`), the `get` itself (or, in fetch-delete mode, the take), the batch routed to its
//! sinks and journaled before anything else happens, and the re-read of a known reservation.

use super::{Fetched, Poller};
use crate::bitrix::OfflineEvent;
use crate::bitrix::client::{ClearTarget, GetRequest};
use crate::envelope::Lane;
use crate::journal::{BatchOrigin, NewBatch, NewEvent};

/// How many rows a `get` with a known `process_id` may return: more than any batch we reserve.
const RESUME_LIMIT: u32 = 1000;

impl Poller {
    /// How many events the next fetch may reserve without passing `max_unsettled`, at most
    /// `batch_size`; `None` when the portal is at the cap.
    pub(super) async fn fetch_limit(&self) -> anyhow::Result<Option<u32>> {
        Ok(self.fetch_room().await?.map(|room| {
            u32::try_from(room)
                .unwrap_or(u32::MAX)
                .min(self.config.batch_size)
        }))
    }

    /// How many events may still be reserved (`max_unsettled` minus what is open); `None` at
    /// the cap.
    pub(super) async fn fetch_room(&self) -> anyhow::Result<Option<u64>> {
        // Reserve mode counts what is open upstream; fetch-delete mode, where nothing stays
        // open upstream, counts what the sinks still have to take.
        let unsettled = if self.reserving() {
            self.journal.unsettled_count(self.portal()).await?
        } else {
            self.journal.undelivered_count(self.portal()).await?
        };
        let room = u64::from(self.config.max_unsettled).saturating_sub(unsettled);
        if room == 0 {
            tracing::debug!(portal = %self.portal(), unsettled, "max_unsettled reached: not fetching");
            return Ok(None);
        }
        Ok(Some(room))
    }

    /// Reserves (or, in fetch-delete mode, takes) up to `limit` events of `lane` and journals
    /// them before anything else happens.
    pub(super) async fn fetch(&self, lane: Lane, limit: u32) -> anyhow::Result<Fetched> {
        let request = GetRequest {
            limit,
            clear: !self.reserving(),
            process_id: None,
            error_lane: lane == Lane::Error,
        };
        let batch = match self.client.offline_get(&request).await {
            Ok(batch) => batch,
            Err(e) => {
                if e.maybe_executed && self.reserving() {
                    // The portal may have reserved a batch whose answer we never saw.
                    self.triggers.orphan_sweep.set_quietly();
                } else if e.maybe_executed {
                    tracing::error!(portal = %self.portal(), lane = lane.as_str(), error = %e, "fetch-delete mode: a get response was lost after the portal may have deleted its events; those events are lost (reserve mode would have recovered them)");
                }
                return Err(e.into());
            }
        };
        if batch.events.is_empty() {
            tracing::debug!(portal = %self.portal(), lane = lane.as_str(), "queue empty");
            return Ok(Fetched::Partial { events: 0 });
        }
        if !self.reserving() {
            return self.record_deleted(lane, limit, batch.events).await;
        }
        let Some(process_id) = batch.process_id.filter(|p| !p.is_empty()) else {
            self.triggers.orphan_sweep.set_quietly();
            anyhow::bail!(
                "portal {}: event.offline.get with clear=0 returned {} events without a process_id",
                self.portal(),
                batch.events.len()
            );
        };
        let count = batch.events.len();
        if let Err(e) = self
            .record(
                &process_id,
                lane,
                BatchOrigin::Fetched,
                batch.events,
                false,
                true,
            )
            .await
        {
            // Reserved upstream but not journaled: the sweep adopts it once the journal works.
            self.triggers.orphan_sweep.set_quietly();
            return Err(e);
        }
        tracing::info!(portal = %self.portal(), lane = lane.as_str(), %process_id, events = count, "reserved and journaled");
        Ok(if count >= limit as usize {
            Fetched::Full
        } else {
            Fetched::Partial { events: count }
        })
    }

    /// Fetch-delete mode: journals a batch the portal has already deleted, under a local id.
    async fn record_deleted(
        &self,
        lane: Lane,
        limit: u32,
        events: Vec<OfflineEvent>,
    ) -> anyhow::Result<Fetched> {
        let count = events.len();
        let first = events.first().map(|e| e.id).unwrap_or_default();
        let local_id = format!(
            "fetch-delete:{}:{first}",
            chrono::Utc::now().timestamp_micros()
        );
        if let Err(e) = self
            .record(&local_id, lane, BatchOrigin::Fetched, events, true, true)
            .await
        {
            tracing::error!(portal = %self.portal(), events = count, error = format!("{e:#}"), "fetch-delete mode: the journal failed after the portal deleted the batch; those events are lost");
            return Err(e);
        }
        tracing::info!(portal = %self.portal(), lane = lane.as_str(), batch = %local_id, events = count, "fetched (deleted upstream) and journaled");
        Ok(if count >= limit as usize {
            Fetched::Full
        } else {
            Fetched::Partial { events: count }
        })
    }

    /// Journals a reservation, routing each event to its sinks, and wakes the dispatchers. Events
    /// the journal had already settled but that are still reserved upstream are cleared again.
    async fn record(
        &self,
        process_id: &str,
        lane: Lane,
        origin: BatchOrigin,
        events: Vec<OfflineEvent>,
        deleted_upstream: bool,
        new_reservation: bool,
    ) -> anyhow::Result<usize> {
        let mut batch = self.new_batch(
            process_id.to_string(),
            lane,
            origin,
            events,
            deleted_upstream,
        );
        batch.new_reservation = new_reservation;
        self.record_batches(vec![batch]).await
    }

    /// [`Poller::record`] for the reservations of one combined request, in one transaction.
    pub(super) async fn record_many(
        &self,
        reservations: Vec<(String, Vec<OfflineEvent>)>,
        lane: Lane,
        origin: BatchOrigin,
    ) -> anyhow::Result<usize> {
        let batches = reservations
            .into_iter()
            .map(|(process_id, events)| self.new_batch(process_id, lane, origin, events, false))
            .collect();
        self.record_batches(batches).await
    }

    /// A reservation with each event routed to its sinks.
    fn new_batch(
        &self,
        process_id: String,
        lane: Lane,
        origin: BatchOrigin,
        events: Vec<OfflineEvent>,
        deleted_upstream: bool,
    ) -> NewBatch {
        let portal = self.portal().to_string();
        let routes = self.routes.current();
        let events = events
            .into_iter()
            .map(|e| NewEvent {
                enrich: self.config.getter_for(&e.event_name).is_some(),
                sinks: routes
                    .iter()
                    .filter(|(_, route)| route.matches(&portal, &e.event_name))
                    .map(|(name, _)| name.clone())
                    .collect(),
                offline_id: e.id,
                event: e.event_name,
                message_id: e.message_id,
                timestamp: e.timestamp,
                data: e.data,
                additional: e.additional,
            })
            .collect();
        NewBatch {
            portal,
            process_id,
            lane,
            origin,
            events,
            deleted_upstream,
            // What the fetches made; a re-read says otherwise.
            new_reservation: true,
        }
    }

    async fn record_batches(&self, batches: Vec<NewBatch>) -> anyhow::Result<usize> {
        let process_ids: Vec<String> = batches.iter().map(|b| b.process_id.clone()).collect();
        let recorded = self.journal.record_batches(batches).await?;
        let inserted: usize = recorded.iter().map(|r| r.inserted).sum();
        if inserted > 0 {
            self.metrics.fetched(self.portal(), inserted as u64);
            self.wakers.wake_sinks();
        }
        for (process_id, recorded) in process_ids.iter().zip(&recorded) {
            if recorded.known_settled.is_empty() {
                continue;
            }
            let ids = recorded.known_settled.iter().map(|(id, _)| *id).collect();
            tracing::warn!(portal = %self.portal(), %process_id, events = recorded.known_settled.len(), "settled events still reserved upstream: clearing them again");
            self.client
                .offline_clear(process_id, &ClearTarget::Ids(ids))
                .await?;
        }
        Ok(inserted)
    }

    /// At start: re-reads every reservation the journal has not finished (`get` with its
    /// `process_id`, `clear=0`) and journals anything it did not have.
    pub(super) async fn resume_open_batches(&self) -> anyhow::Result<()> {
        let open = self.journal.open_batches(self.portal()).await?;
        for batch in &open {
            if self.shutdown.is_cancelled() {
                break;
            }
            self.reread(&batch.process_id, batch.lane, BatchOrigin::Fetched)
                .await?;
        }
        if !open.is_empty() {
            tracing::info!(portal = %self.portal(), reservations = open.len(), "resumed unsettled reservations from the journal");
        }
        Ok(())
    }

    pub(super) async fn reread(
        &self,
        process_id: &str,
        lane: Lane,
        origin: BatchOrigin,
    ) -> anyhow::Result<usize> {
        let request = GetRequest {
            limit: RESUME_LIMIT,
            clear: false,
            process_id: Some(process_id.to_string()),
            error_lane: lane == Lane::Error,
        };
        // A re-read is a get like any other: it waits for operating time like the fetches.
        if let Some(wait) = self
            .budget("event.offline.get")
            .pause(self.client.portal_now())
        {
            tracing::info!(portal = %self.portal(), %process_id, wait = ?wait, "re-reading a reservation waits for event.offline.get's operating time");
            tokio::time::sleep(wait).await;
        }
        let batch = self.client.offline_get(&request).await?;
        self.record(process_id, lane, origin, batch.events, false, false)
            .await
    }
}
