//! The settler of one portal: which pending `event.offline.clear`/`error` calls go into a
//! request (each method's operating time, `batch`'s, the slots left for gets), how a clear
//! addresses its rows (by `message_id`, or by ID where the conformance probe says so), and
//! marking settled what the portal confirmed; a call that failed stays pending.

use crate::bitrix::client::{ClearTarget, OfflineCommand, OfflineOutcome};
use crate::bitrix::{BitrixError, ErrorClass, PortalClient};
use crate::conformance::ClearBy;
use crate::journal::SettleAction;
use crate::journal::{Journal, PendingSettlement};
use crate::pipeline::economy::MAX_COMMANDS;
use crate::pipeline::lease_clock::LeaseClock;

/// Sends the pending `event.offline.clear` / `event.offline.error` calls of one portal.
#[derive(Clone)]
pub(crate) struct Settler {
    portal: String,
    client: PortalClient,
    journal: Journal,
    /// How `event.offline.clear` addresses rows on this portal (the conformance findings).
    clear_by: ClearBy,
    /// No settle call is sent unless it ends while the portal's lease lasts.
    lease: LeaseClock,
}

impl Settler {
    pub(super) fn new(
        portal: String,
        client: PortalClient,
        journal: Journal,
        clear_by: ClearBy,
        lease: LeaseClock,
    ) -> Settler {
        Settler {
            portal,
            client,
            journal,
            clear_by,
            lease,
        }
    }

    /// Settles everything that is ready. A call the portal rejects (a problem with that one
    /// reservation) is logged and left pending without holding up the others; any other
    /// failure (limits, auth, transport) stops the round.
    pub(super) async fn settle(&self) -> anyhow::Result<usize> {
        let mut settled = 0;
        for group in self.journal.pending_settlements(&self.portal).await? {
            if self.send(&group).await? {
                settled += group.events.len();
            }
        }
        Ok(settled)
    }

    /// Sends one settle call on its own and marks its events settled. Returns false when the
    /// portal rejected it (logged; it stays pending); other failures are errors.
    pub(super) async fn send(&self, group: &PendingSettlement) -> anyhow::Result<bool> {
        if !self.lease.allows(self.client.request_timeout()) {
            anyhow::bail!(
                "portal {}: too little lease time left for a settle call: left to the lease's next holder",
                self.portal
            );
        }
        let sent = match self.command(group) {
            OfflineCommand::Clear { process_id, target } => {
                self.client.offline_clear(&process_id, &target).await
            }
            OfflineCommand::Error {
                process_id,
                message_ids,
            } => self.client.offline_error(&process_id, &message_ids).await,
            OfflineCommand::Get(_) => unreachable!("settle_command makes clear or error calls"),
        };
        match sent {
            Ok(()) => {}
            Err(e) if e.class == ErrorClass::Rejected => {
                self.log_rejected(group, &e);
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
        let ids = group.events.iter().map(|e| e.0).collect();
        self.journal.mark_settled(ids, group.action).await?;
        self.log_settled(group);
        Ok(true)
    }

    /// The settle call for one group of finished events.
    pub(super) fn command(&self, group: &PendingSettlement) -> OfflineCommand {
        settle_command(group, self.clear_by)
    }

    /// Marks settled the groups whose sub-command of a combined request succeeded; one that
    /// failed stays pending and is sent again on its own (a rejected one is logged at error).
    pub(super) async fn record_outcomes(
        &self,
        groups: &[PendingSettlement],
        outcomes: Vec<OfflineOutcome>,
    ) -> anyhow::Result<()> {
        let settled = settled_groups(groups, outcomes, |group, e| {
            if e.class == ErrorClass::Rejected {
                self.log_rejected(group, &e);
            } else {
                tracing::warn!(portal = %self.portal, process_id = %group.process_id, method = group.action.method(), error = %e, "a settle call in a combined request failed; it is sent again on its own");
            }
        });
        if settled.is_empty() {
            return Ok(());
        }
        self.journal
            .mark_settled_groups(
                settled
                    .iter()
                    .map(|g| (g.events.iter().map(|e| e.0).collect(), g.action))
                    .collect(),
            )
            .await?;
        for group in &settled {
            self.log_settled(group);
        }
        Ok(())
    }

    fn log_rejected(&self, group: &PendingSettlement, e: &BitrixError) {
        tracing::error!(
            portal = %self.portal,
            process_id = %group.process_id,
            method = group.action.method(),
            events = group.events.len(),
            error = %e,
            "the portal rejected a settle call; it stays pending and is retried"
        );
    }

    fn log_settled(&self, group: &PendingSettlement) {
        tracing::info!(
            portal = %self.portal,
            process_id = %group.process_id,
            lane = group.lane.as_str(),
            method = group.action.method(),
            events = group.events.len(),
            "settled upstream"
        );
    }

    /// Settles what it can, logging failures (used at shutdown).
    pub(crate) async fn settle_all(&self) {
        if let Err(e) = self.settle().await {
            tracing::warn!(portal = %self.portal, error = format!("{e:#}"), "settle at shutdown failed: resent on the next start");
        }
    }
}

/// The settle call for one group of finished events of a reservation; `clear_by` is
/// [`ClearBy::Id`] where the conformance probe found `message_id` ignored.
fn settle_command(group: &PendingSettlement, clear_by: ClearBy) -> OfflineCommand {
    let message_ids: Vec<String> = group.events.iter().map(|e| e.2.clone()).collect();
    match group.action {
        SettleAction::Clear => {
            // clear validates message_id as exactly 32 characters; fall back to ID otherwise
            let target =
                if clear_by == ClearBy::MessageId && message_ids.iter().all(|m| m.len() == 32) {
                    ClearTarget::MessageIds(message_ids)
                } else {
                    ClearTarget::Ids(group.events.iter().map(|e| e.1).collect())
                };
            OfflineCommand::Clear {
                process_id: group.process_id.clone(),
                target,
            }
        }
        SettleAction::Error => OfflineCommand::Error {
            process_id: group.process_id.clone(),
            message_ids,
        },
    }
}

/// The groups whose settle call succeeded, in order; `failed` is told of each one that did
/// not (it stays pending). Gets' outcomes are not settle calls and are skipped.
fn settled_groups(
    groups: &[PendingSettlement],
    outcomes: Vec<OfflineOutcome>,
    mut failed: impl FnMut(&PendingSettlement, BitrixError),
) -> Vec<&PendingSettlement> {
    let mut settled = Vec::new();
    for (group, outcome) in groups.iter().zip(outcomes) {
        match outcome {
            OfflineOutcome::Settled => settled.push(group),
            OfflineOutcome::Failed(e) => failed(group, e),
            OfflineOutcome::Got(_) => {}
        }
    }
    settled
}

/// Whether an exchange of settle calls reserves new events too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fetch {
    /// The fetch is due.
    Due,
    /// Not due, but a request with settle calls may carry gets in its free slots.
    WithSettles,
    /// Settle only (room first, before the error lane reserves).
    No,
}

/// The settle calls one request carries.
#[derive(Debug)]
pub(super) struct Packed {
    pub(super) groups: Vec<PendingSettlement>,
    /// Some ready calls were held back for their method's operating time.
    pub(super) held_back: bool,
    /// `batch` has time left: the calls (and gets) may go in one `batch`.
    pub(super) batched: bool,
    /// Command slots of the wave: [`MAX_COMMANDS`] per request it may send at once.
    pub(super) capacity: usize,
}

impl Packed {
    /// Chooses the settle calls of one wave of `requests` concurrent requests (one request
    /// unless the client's bucket refills faster, see `Poller::pipeline`) from the `pending`
    /// ones, in order: no more of each method than its operating time left pays for (`clears`,
    /// `errors`), one call alone when `batch` has no time left (`batched` false), at most
    /// [`MAX_COMMANDS`] per request.
    pub(super) fn choose(
        mut pending: Vec<PendingSettlement>,
        mut clears: u32,
        mut errors: u32,
        batched: bool,
        requests: usize,
    ) -> Packed {
        let wanted = pending.len();
        pending.retain(|g| {
            let left = match g.action {
                SettleAction::Clear => &mut clears,
                SettleAction::Error => &mut errors,
            };
            let take = *left > 0;
            *left = left.saturating_sub(1);
            take
        });
        let held_back = pending.len() < wanted;
        let capacity = if batched {
            MAX_COMMANDS * requests.max(1)
        } else {
            // No time left for `batch` itself: one call, in one request.
            1
        };
        pending.truncate(capacity);
        Packed {
            groups: pending,
            held_back,
            batched,
            capacity,
        }
    }

    /// How many gets the request may carry in the slots the settle calls leave: `None` when
    /// it carries none (no fetch wanted, every slot taken, or a settle call that must go
    /// without `batch`).
    pub(super) fn get_slots(&self, fetch: Fetch) -> Option<u32> {
        let fetch = match fetch {
            Fetch::Due => true,
            // A request that goes anyway costs a tick of the bucket either way: its free
            // slots carry gets (the portal's bucket, not the idle wait, is what a busy
            // portal runs into; a settle sent alone would delay the next fetch by a tick).
            Fetch::WithSettles => self.batched && !self.groups.is_empty(),
            Fetch::No => false,
        };
        let settles = self.groups.len();
        if !fetch || settles >= self.capacity || !(self.batched || settles == 0) {
            return None;
        }
        Some(if self.batched {
            (self.capacity - settles) as u32
        } else {
            1
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Lane;

    const MESSAGE_ID: &str = "0123456789abcdef0123456789abcdef";

    fn group(process_id: &str, action: SettleAction, message_ids: &[&str]) -> PendingSettlement {
        PendingSettlement {
            batch_id: 1,
            process_id: process_id.to_string(),
            lane: Lane::Normal,
            action,
            events: message_ids
                .iter()
                .enumerate()
                .map(|(i, m)| (i as i64 + 100, i as i64 + 7, m.to_string()))
                .collect(),
        }
    }

    fn groups(actions: &[SettleAction]) -> Vec<PendingSettlement> {
        actions
            .iter()
            .enumerate()
            .map(|(i, a)| group(&format!("p{i}"), *a, &[MESSAGE_ID]))
            .collect()
    }

    fn process_ids(packed: &Packed) -> Vec<&str> {
        packed
            .groups
            .iter()
            .map(|g| g.process_id.as_str())
            .collect()
    }

    use SettleAction::{Clear, Error};

    #[test]
    fn a_clear_goes_by_message_id_when_every_id_is_32_characters() {
        let g = group("p", Clear, &[MESSAGE_ID, MESSAGE_ID]);
        assert_eq!(
            settle_command(&g, ClearBy::MessageId),
            OfflineCommand::Clear {
                process_id: "p".into(),
                target: ClearTarget::MessageIds(vec![MESSAGE_ID.into(), MESSAGE_ID.into()]),
            }
        );
    }

    #[test]
    fn a_clear_goes_by_id_where_message_id_is_ignored_or_not_32_characters() {
        let g = group("p", Clear, &[MESSAGE_ID, MESSAGE_ID]);
        let by_id = OfflineCommand::Clear {
            process_id: "p".into(),
            target: ClearTarget::Ids(vec![7, 8]),
        };
        assert_eq!(settle_command(&g, ClearBy::Id), by_id);
        let short = group("p", Clear, &[MESSAGE_ID, "abc"]);
        assert_eq!(settle_command(&short, ClearBy::MessageId), by_id);
    }

    #[test]
    fn an_error_call_names_its_message_ids_whatever_the_clear_mode() {
        let g = group("p", Error, &["abc"]);
        assert_eq!(
            settle_command(&g, ClearBy::Id),
            OfflineCommand::Error {
                process_id: "p".into(),
                message_ids: vec!["abc".into()],
            }
        );
    }

    #[test]
    fn each_method_gets_no_more_calls_than_its_time_pays_for() {
        let packed = Packed::choose(groups(&[Clear, Error, Clear, Clear, Error]), 2, 1, true, 1);
        assert_eq!(process_ids(&packed), ["p0", "p1", "p2"]);
        assert!(packed.held_back);
        let packed = Packed::choose(groups(&[Clear, Error]), 5, 5, true, 1);
        assert_eq!(process_ids(&packed), ["p0", "p1"]);
        assert!(!packed.held_back);
    }

    #[test]
    fn without_time_for_batch_one_call_goes_alone_and_carries_no_get() {
        let packed = Packed::choose(groups(&[Clear, Clear]), 5, 5, false, 4);
        assert_eq!(process_ids(&packed), ["p0"]);
        assert!(!packed.held_back, "held back by batch, not by its method");
        assert_eq!(packed.get_slots(Fetch::Due), None);
        let nothing = Packed::choose(Vec::new(), 5, 5, false, 4);
        assert_eq!(nothing.get_slots(Fetch::Due), Some(1), "a lone get goes");
    }

    #[test]
    fn a_request_takes_at_most_50_calls_and_gets_fill_the_slots_left() {
        let packed = Packed::choose(groups(&[Clear; 60]), 100, 0, true, 1);
        assert_eq!(packed.groups.len(), MAX_COMMANDS);
        assert_eq!(packed.get_slots(Fetch::Due), None);
        let packed = Packed::choose(groups(&[Clear; 3]), 100, 0, true, 1);
        assert_eq!(packed.get_slots(Fetch::Due), Some(47));
        assert_eq!(packed.get_slots(Fetch::WithSettles), Some(47));
        assert_eq!(packed.get_slots(Fetch::No), None);
    }

    #[test]
    fn a_wave_of_several_requests_takes_50_calls_per_request() {
        let packed = Packed::choose(groups(&[Clear; 160]), 200, 0, true, 3);
        assert_eq!(packed.groups.len(), 3 * MAX_COMMANDS);
        assert_eq!(packed.get_slots(Fetch::Due), None);
        let packed = Packed::choose(groups(&[Clear; 60]), 200, 0, true, 2);
        assert_eq!(packed.groups.len(), 60);
        assert_eq!(packed.get_slots(Fetch::Due), Some(40));
    }

    #[test]
    fn gets_ride_along_before_the_fetch_is_due_only_with_settle_calls() {
        let none = Packed::choose(Vec::new(), 5, 5, true, 1);
        assert_eq!(none.get_slots(Fetch::WithSettles), None);
        assert_eq!(none.get_slots(Fetch::Due), Some(50));
    }

    #[test]
    fn a_failed_sub_command_stays_pending_and_the_others_are_settled() {
        let gs = groups(&[Clear, Error, Clear]);
        let failure = BitrixError::new("main", "event.offline.error", "ERROR_CORE", "boom", None);
        let mut failed = Vec::new();
        let settled = settled_groups(
            &gs,
            vec![
                OfflineOutcome::Settled,
                OfflineOutcome::Failed(failure),
                OfflineOutcome::Settled,
            ],
            |g, e| failed.push((g.process_id.clone(), e.code)),
        );
        let settled: Vec<&str> = settled.iter().map(|g| g.process_id.as_str()).collect();
        assert_eq!(settled, ["p0", "p2"]);
        assert_eq!(failed, [("p1".to_string(), "ERROR_CORE".to_string())]);
    }
}
