//! The settle lattice: from the states of an event's deliveries, what the event is and what to
//! tell Bitrix24. Pure; every journal backend applies it inside the transaction that records
//! outcomes.

use crate::envelope::Lane;

/// Where one delivery (event × sink) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DeliveryState {
    Pending,
    Delivered,
    Dead,
}

/// The upstream call an event needs once every routed sink is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleAction {
    /// `event.offline.clear`: delivered everywhere, or dead in the error lane (it stays dead here).
    Clear,
    /// `event.offline.error`: some sink gave up on a normal-lane event; it moves to the error lane.
    Error,
}

impl SettleAction {
    /// The Bitrix24 method that performs it.
    pub fn method(self) -> &'static str {
        match self {
            SettleAction::Clear => "event.offline.clear",
            SettleAction::Error => "event.offline.error",
        }
    }
}

/// The final state of an event and its upstream action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Decision {
    pub dead: bool,
    pub action: SettleAction,
}

/// `None` while any delivery is pending. Otherwise: dead iff some sink is dead; `Error` iff dead
/// in the normal lane; `Clear` in every other case (including no routed sink at all).
pub(super) fn decide(lane: Lane, deliveries: &[DeliveryState]) -> Option<Decision> {
    if deliveries.contains(&DeliveryState::Pending) {
        return None;
    }
    let dead = deliveries.contains(&DeliveryState::Dead);
    let action = match (dead, lane) {
        (true, Lane::Normal) => SettleAction::Error,
        _ => SettleAction::Clear,
    };
    Some(Decision { dead, action })
}

#[cfg(test)]
mod tests {
    use super::DeliveryState::*;
    use super::*;

    #[test]
    fn waits_while_any_delivery_is_pending() {
        assert_eq!(decide(Lane::Normal, &[Delivered, Pending]), None);
        assert_eq!(decide(Lane::Error, &[Dead, Pending]), None);
    }

    #[test]
    fn clears_when_every_sink_delivered() {
        let d = decide(Lane::Normal, &[Delivered, Delivered]).unwrap();
        assert_eq!(
            d,
            Decision {
                dead: false,
                action: SettleAction::Clear
            }
        );
    }

    #[test]
    fn errors_a_normal_lane_event_when_one_sink_is_dead() {
        let d = decide(Lane::Normal, &[Delivered, Dead]).unwrap();
        assert_eq!(
            d,
            Decision {
                dead: true,
                action: SettleAction::Error
            }
        );
    }

    #[test]
    fn clears_a_dead_error_lane_event_and_keeps_it_dead() {
        let d = decide(Lane::Error, &[Dead]).unwrap();
        assert_eq!(
            d,
            Decision {
                dead: true,
                action: SettleAction::Clear
            }
        );
    }

    #[test]
    fn an_event_no_sink_wants_is_cleared() {
        let d = decide(Lane::Normal, &[]).unwrap();
        assert_eq!(
            d,
            Decision {
                dead: false,
                action: SettleAction::Clear
            }
        );
    }

    #[test]
    fn never_errored_and_cleared_at_once_exhaustive() {
        let states = [Pending, Delivered, Dead];
        for lane in [Lane::Normal, Lane::Error] {
            for a in states {
                for b in states {
                    for c in states {
                        let ds = [a, b, c];
                        match decide(lane, &ds) {
                            None => assert!(ds.contains(&Pending)),
                            Some(d) => {
                                assert!(!ds.contains(&Pending));
                                assert_eq!(d.dead, ds.contains(&Dead));
                                assert_eq!(
                                    d.action == SettleAction::Error,
                                    d.dead && lane == Lane::Normal
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn states() -> impl Strategy<Value = Vec<DeliveryState>> {
        proptest::collection::vec(
            prop_oneof![
                Just(DeliveryState::Pending),
                Just(DeliveryState::Delivered),
                Just(DeliveryState::Dead)
            ],
            0..6,
        )
    }

    proptest! {
        #[test]
        fn decided_iff_nothing_pending_and_errored_iff_dead_in_the_normal_lane(
            deliveries in states(),
            error_lane in any::<bool>(),
        ) {
            let lane = if error_lane { Lane::Error } else { Lane::Normal };
            let decision = decide(lane, &deliveries);
            let pending = deliveries.contains(&DeliveryState::Pending);
            prop_assert_eq!(decision.is_none(), pending);
            if let Some(d) = decision {
                let dead = deliveries.contains(&DeliveryState::Dead);
                prop_assert_eq!(d.dead, dead);
                prop_assert_eq!(d.action == SettleAction::Error, dead && lane == Lane::Normal);
                prop_assert_eq!(
                    d.action == SettleAction::Clear,
                    deliveries.iter().all(|s| *s == DeliveryState::Delivered) || lane == Lane::Error
                );
            }
        }

        #[test]
        fn the_order_of_the_sinks_does_not_matter(
            mut deliveries in states(),
            error_lane in any::<bool>(),
        ) {
            let lane = if error_lane { Lane::Error } else { Lane::Normal };
            let before = decide(lane, &deliveries);
            deliveries.reverse();
            prop_assert_eq!(decide(lane, &deliveries), before);
        }
    }
}
