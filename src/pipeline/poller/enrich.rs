//! Enrichment, the lowest priority of a round: the entities of events waiting for them, read
//! with one `batch` of up to 50 distinct getters.

use super::Poller;
use crate::bitrix::ErrorClass;
use crate::bitrix::client::EntityOutcome;
use crate::bitrix::entities::{self, Getter};
use crate::journal::Enriched;
use crate::pipeline::economy::MAX_COMMANDS;
use serde_json::Value;
use std::collections::HashMap;

impl Poller {
    /// Reads the entities of events waiting for enrichment: one `batch` request of up to 50
    /// distinct entities (events about the same entity share one getter). A deleted entity gives
    /// `entity = null` with `entity_error`; so does a getter the portal refuses for good (rights,
    /// scope), so that no event waits forever; a transient failure leaves the events waiting.
    /// Returns whether more events are waiting.
    pub(super) async fn enrich(&self) -> anyhow::Result<bool> {
        if self.config.enrich.is_empty() {
            return Ok(false);
        }
        const SCAN: usize = 2000;
        let pending = self.journal.pending_enrichment(self.portal(), SCAN).await?;
        if pending.is_empty() {
            return Ok(false);
        }
        // The getters ride in one `batch`: it and each getter method need operating time left.
        let now = self.client.portal_now();
        if self.budget("batch").affordable(now) == 0 {
            tracing::debug!(portal = %self.portal(), "enrichment waits: batch has no operating time left");
            return Ok(false);
        }
        let mut affordable: HashMap<&'static str, u32> = HashMap::new();
        let mut held_back = false;
        let mut keys: Vec<(Getter, u64)> = Vec::new();
        let mut waiting: Vec<(i64, usize)> = Vec::new();
        let mut results = Vec::new();
        let mut taken = 0;
        for event in &pending {
            let Some(getter) = self.config.getter_for(&event.event) else {
                results.push(Enriched {
                    event_id: event.event_id,
                    entity: Value::Null,
                    error: Some(format!("no enrich rule matches {}", event.event)),
                });
                taken += 1;
                continue;
            };
            let Some(id) = entities::entity_id(&event.data) else {
                results.push(Enriched {
                    event_id: event.event_id,
                    entity: Value::Null,
                    error: Some(format!(
                        "no entity id in the event data (FIELDS.ID) for {}",
                        getter.method()
                    )),
                });
                taken += 1;
                continue;
            };
            let index = match keys.iter().position(|k| *k == (getter, id)) {
                Some(index) => index,
                None if keys.len() < MAX_COMMANDS => {
                    let left = affordable
                        .entry(getter.method())
                        .or_insert_with(|| self.budget(getter.method()).affordable(now));
                    if *left == 0 {
                        held_back = true;
                        continue;
                    }
                    *left -= 1;
                    keys.push((getter, id));
                    keys.len() - 1
                }
                None => break,
            };
            waiting.push((event.event_id, index));
            taken += 1;
        }
        let mut transient = 0;
        if !keys.is_empty() {
            let outcomes = match self.client.get_entities(&keys).await {
                Ok(outcomes) => outcomes,
                Err(e) => {
                    self.journal.record_enrichment(results).await?;
                    return Err(e.into());
                }
            };
            for (event_id, index) in waiting {
                let (entity, error) = match &outcomes[index] {
                    EntityOutcome::Found(entity) => (entity.clone(), None),
                    EntityOutcome::NotFound(why) => (Value::Null, Some(why.clone())),
                    EntityOutcome::Failed(e)
                        if matches!(e.class, ErrorClass::Fatal | ErrorClass::Rejected) =>
                    {
                        (Value::Null, Some(e.to_string()))
                    }
                    EntityOutcome::Failed(e) => {
                        transient += 1;
                        tracing::debug!(portal = %self.portal(), error = %e, "entity read failed; retried");
                        continue;
                    }
                };
                results.push(Enriched {
                    event_id,
                    entity,
                    error,
                });
            }
        }
        let enriched = results.len();
        if enriched > 0 {
            self.journal.record_enrichment(results).await?;
            self.wakers.wake_sinks();
        }
        tracing::debug!(portal = %self.portal(), events = enriched, entities = keys.len(), "entities attached");
        if transient > 0 {
            tracing::warn!(portal = %self.portal(), events = transient, "reading entities failed for some events; they wait for the next round");
            return Ok(false);
        }
        if held_back {
            tracing::debug!(portal = %self.portal(), "some entities wait for their getter's operating time");
            return Ok(false);
        }
        Ok(taken < pending.len() || pending.len() == SCAN)
    }
}
