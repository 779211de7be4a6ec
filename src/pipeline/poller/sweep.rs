//! The orphan sweep: finds the reservations the portal holds that the journal does not know
//! as open (a `get` whose answer was lost), and adopts them.

use super::Poller;
use crate::conformance::ReservedListing;
use crate::envelope::Lane;
use crate::journal::BatchOrigin;
use crate::pipeline::economy::MAX_COMMANDS;
use crate::pipeline::orphans;
use serde_json::Value;
use std::collections::BTreeMap;

impl Poller {
    /// Finds reservations the portal holds that the journal does not know as open (a `get`
    /// whose answer was lost; rows left under a reservation the journal settled) and adopts
    /// them. Sets of `process_id`s are compared, not counts (see [`orphans`]): one
    /// `event.offline.list` per gap between the journal's open reservations, 50 to a request.
    /// Deferred (flagged again) while `event.offline.list` or `batch` has no operating time
    /// left.
    pub(super) async fn sweep_orphans(&self) -> anyhow::Result<()> {
        /// More requests than this in one sweep means the portal ignores the filter.
        const MAX_SWEEP_REQUESTS: usize = 1000;
        let now = self.client.portal_now();
        if let Some(wait) = ["event.offline.list", "batch"]
            .into_iter()
            .filter_map(|m| self.budget(m).pause(now))
            .max()
        {
            self.triggers.orphan_sweep.set_quietly();
            tracing::debug!(portal = %self.portal(), wait = ?wait, "orphan sweep deferred: event.offline.list or batch has no operating time left");
            return Ok(());
        }
        let open: Vec<String> = self
            .journal
            .open_batches(self.portal())
            .await?
            .into_iter()
            .map(|b| b.process_id)
            .collect();
        let is_open = |pid: &str| {
            let key = orphans::collation_key(pid);
            open.iter().any(|p| orphans::collation_key(p) == key)
        };
        // process_id → whether its rows are in the error lane
        let mut found: BTreeMap<String, bool> = BTreeMap::new();
        let mut note = |items: &[crate::bitrix::types::ListedEvent]| {
            for item in items {
                if !item.process_id.is_empty() && !is_open(&item.process_id) {
                    found.entry(item.process_id.clone()).or_insert(item.error);
                }
            }
        };
        let (gaps, requests) = if self.conformance().reserved_listing() == ReservedListing::Broken {
            // The conformance probe found the PROCESS_ID filter not honoured: read every row
            // of the queue, by ID, and filter here.
            let by_id = serde_json::json!({"ID": "ASC"});
            let first = self
                .client
                .offline_list_pages(&by_id, &[(serde_json::json!({}), 0)])
                .await?
                .remove(0)?;
            note(&first.items);
            let mut start = first.items.len().max(1) as u64;
            let mut requests = 1;
            while start < first.total && !self.shutdown.is_cancelled() {
                let queries: Vec<(Value, u64)> = (0..MAX_COMMANDS as u64)
                    .map(|i| start + i * orphans::PAGE)
                    .take_while(|s| *s < first.total)
                    .map(|s| (serde_json::json!({}), s))
                    .collect();
                start += queries.len() as u64 * orphans::PAGE;
                for page in self.client.offline_list_pages(&by_id, &queries).await? {
                    note(&page?.items);
                }
                requests += 1;
            }
            (0, requests)
        } else {
            let by_process = serde_json::json!({"PROCESS_ID": "ASC"});
            let mut pending = orphans::gaps(&open);
            let gaps = pending.len();
            let mut requests = 0;
            while !pending.is_empty() && !self.shutdown.is_cancelled() {
                if requests >= MAX_SWEEP_REQUESTS {
                    anyhow::bail!(
                        "portal {}: the orphan sweep did not finish in {MAX_SWEEP_REQUESTS} requests: does event.offline.list honour its PROCESS_ID filter? (doctor --conformance checks it)",
                        self.portal()
                    );
                }
                let chunk: Vec<orphans::Gap> =
                    pending.drain(..pending.len().min(MAX_COMMANDS)).collect();
                let queries: Vec<(Value, u64)> = chunk.iter().map(|g| (g.filter(), 0)).collect();
                let pages = self
                    .client
                    .offline_list_pages(&by_process, &queries)
                    .await?;
                requests += 1;
                for (gap, page) in chunk.iter().zip(pages) {
                    let page = page?;
                    note(&page.items);
                    // More rows than one page: the rest of the gap lies after the last id seen
                    // (its remaining rows belong to a reservation already found).
                    if let Some(last) = page.items.last().map(|i| i.process_id.as_str())
                        && page.total > page.items.len() as u64
                        && orphans::collation_key(last) > gap.after
                    {
                        pending.push(gap.after(last));
                    }
                }
            }
            (gaps, requests)
        };
        tracing::debug!(portal = %self.portal(), open = open.len(), gaps, requests, found = found.len(), "orphan sweep");
        let known = self.journal.known_process_ids(self.portal()).await?;
        for (process_id, error) in found {
            if self.shutdown.is_cancelled() {
                break;
            }
            let lane = if error { Lane::Error } else { Lane::Normal };
            let adopted = self.reread(&process_id, lane, BatchOrigin::Adopted).await?;
            if known.contains_key(&process_id) {
                tracing::warn!(portal = %self.portal(), %process_id, lane = lane.as_str(), events = adopted, "the portal still holds rows of a reservation the journal settled: read again and settled again");
            } else {
                tracing::warn!(portal = %self.portal(), %process_id, lane = lane.as_str(), events = adopted, "adopted an orphaned reservation (its get response was lost)");
            }
        }
        Ok(())
    }
}
