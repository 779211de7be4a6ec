//! Which portals an instance should own: a pure function of what every instance sees in the
//! lease table, so that all of them reach the same answer without talking to each other.
//!
//! With `P` configured portals and `N` live instances, sorted by id, the first `P mod N`
//! instances own `⌈P/N⌉` portals and the others `⌊P/N⌋`: every instance is within one portal
//! of its share. An instance above its share releases the excess; one below takes free or
//! expired leases. Nobody takes a lease a live instance holds, so when an instance joins or
//! leaves, each portal that has to move moves once: from an instance above its new share to one
//! below it.
//!
//! That holds only if every instance counts the others before it takes anything. Instances
//! started together (two or three units under systemd) register a few seconds apart, and the
//! first to register would see itself alone, take every portal, and then hand two thirds back:
//! each of those moved twice, their work started and stopped for nothing, while the others
//! waited for them. So a new instance is first [`Phase::Discovering`]: registered (the others
//! already count it and leave its share free) but taking nothing, until one discovery window
//! (`lease_ttl / 3`, at most 5 s) has passed since it registered and since the youngest other
//! instance registered, at most `lease_ttl` (at most 15 s) in all (`super::lease_task`, `Discovery`): every instance
//! of a start is counted when the first one plans its first acquisition. A lone instance owns
//! every portal one window after it registered; an instance that registers once the
//! others are working joins like any newcomer (the others release its share, once).

use std::collections::{BTreeMap, BTreeSet};

/// What one instance sees of one portal's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSeen {
    /// The instance that holds it, if any.
    pub owner: Option<String>,
    /// Its expiry has passed on the database's clock.
    pub expired: bool,
}

/// What an instance should do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Portals to take (free, expired, or held by an instance no longer live), in this order.
    pub acquire: Vec<String>,
    /// Portals to give up (stop their work first, then release the lease).
    pub release: Vec<String>,
}

/// Where an instance is in its life, for what it may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Registered less than a renewal period ago: instances started at about the same time may
    /// not have registered yet, so the share it would compute now may be too large. It takes
    /// nothing (and holds nothing to give up).
    Discovering,
    /// Past its discovery window: it takes and gives up whatever its share says.
    Working,
}

/// How many of `portals` the instance at `index` of `instances` (sorted) should own.
pub fn share(portals: usize, instances: usize, index: usize) -> usize {
    if instances == 0 {
        return 0;
    }
    portals / instances + usize::from(index < portals % instances)
}

/// The plan of instance `me` in `phase`, given the live instances (`me` counts as live), the
/// configured portals and the leases it sees (a portal without a row is free).
pub fn plan(
    me: &str,
    phase: Phase,
    live: &BTreeSet<String>,
    portals: &BTreeSet<String>,
    leases: &BTreeMap<String, LeaseSeen>,
) -> Plan {
    let mut instances = live.clone();
    instances.insert(me.to_string());
    let index = instances.iter().position(|i| i == me).unwrap_or(0);
    let target = share(portals.len(), instances.len(), index);
    let held_by = |portal: &str| -> Option<&str> {
        leases
            .get(portal)
            .filter(|lease| !lease.expired)
            .and_then(|lease| lease.owner.as_deref())
            .filter(|owner| instances.contains(*owner))
    };
    let owned: Vec<&String> = portals.iter().filter(|p| held_by(p) == Some(me)).collect();
    let mut plan = Plan::default();
    if owned.len() > target {
        // The last ones by name: each instance keeps a stable prefix of what it holds.
        plan.release = owned[target..].iter().map(|p| p.to_string()).collect();
        return plan;
    }
    let free: Vec<&String> = portals.iter().filter(|p| held_by(p).is_none()).collect();
    if free.is_empty() || phase == Phase::Discovering {
        return plan;
    }
    // Each instance prefers its own block of the portals in name order (the first `share(0)`
    // for the first instance, the next `share(1)` for the second…): instances that take at the
    // same moment from a table with every portal free (a start) try disjoint rows, so nobody
    // loses a race and waits a tick for the rest. Beyond its block (a join, a leave), it starts
    // at a different place in the free list from the others, so they mostly try different
    // rows; the database decides the races.
    let block_start: usize = (0..index)
        .map(|i| share(portals.len(), instances.len(), i))
        .sum();
    let block: BTreeSet<&String> = portals.iter().skip(block_start).take(target).collect();
    let start = index * free.len() / instances.len();
    let others = free
        .iter()
        .cycle()
        .skip(start)
        .take(free.len())
        .filter(|p| !block.contains(*p));
    plan.acquire = free
        .iter()
        .filter(|p| block.contains(*p))
        .chain(others)
        .take(target - owned.len())
        .map(|p| p.to_string())
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(prefix: &str, n: usize) -> BTreeSet<String> {
        (0..n).map(|i| format!("{prefix}{i:05}")).collect()
    }

    /// Carries out `me`'s plan in `phase` as the database would (an acquisition succeeds when
    /// the row is still free); counts each acquisition in `moves`; whether anything changed.
    fn step(
        me: &str,
        phase: Phase,
        instances: &BTreeSet<String>,
        portals: &BTreeSet<String>,
        leases: &mut BTreeMap<String, LeaseSeen>,
        moves: &mut BTreeMap<String, usize>,
    ) -> bool {
        let p = plan(me, phase, instances, portals, leases);
        let mut changed = false;
        for portal in &p.release {
            leases.remove(portal);
            changed = true;
        }
        for portal in &p.acquire {
            let free = leases.get(portal).is_none_or(|l| {
                l.expired || l.owner.as_ref().is_none_or(|o| !instances.contains(o))
            });
            if free {
                leases.insert(
                    portal.clone(),
                    LeaseSeen {
                        owner: Some(me.to_string()),
                        expired: false,
                    },
                );
                *moves.entry(portal.clone()).or_insert(0) += 1;
                changed = true;
            }
        }
        changed
    }

    /// Runs every instance's plan in turn, each past its discovery window, until nothing
    /// changes; returns how often each portal was taken, `moves` included.
    fn settle_counting(
        instances: &BTreeSet<String>,
        portals: &BTreeSet<String>,
        leases: &mut BTreeMap<String, LeaseSeen>,
        mut moves: BTreeMap<String, usize>,
    ) -> BTreeMap<String, usize> {
        for _ in 0..20 {
            let mut changed = false;
            for me in instances {
                changed |= step(me, Phase::Working, instances, portals, leases, &mut moves);
            }
            if !changed {
                return moves;
            }
        }
        panic!("the plans did not settle in 20 rounds");
    }

    /// [`settle_counting`] from no move yet: how often each portal changed hands.
    fn settle(
        instances: &BTreeSet<String>,
        portals: &BTreeSet<String>,
        leases: &mut BTreeMap<String, LeaseSeen>,
    ) -> BTreeMap<String, usize> {
        settle_counting(instances, portals, leases, BTreeMap::new())
    }

    fn counts(leases: &BTreeMap<String, LeaseSeen>) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for lease in leases.values() {
            *counts.entry(lease.owner.clone().unwrap()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn shares_differ_by_at_most_one_and_add_up() {
        for portals in [0, 1, 2, 7, 200, 10_000] {
            for instances in 1..=7 {
                let shares: Vec<usize> = (0..instances)
                    .map(|i| share(portals, instances, i))
                    .collect();
                assert_eq!(shares.iter().sum::<usize>(), portals);
                let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
                assert!(max - min <= 1, "{portals} over {instances}: {shares:?}");
            }
        }
        assert_eq!(share(5, 0, 0), 0);
    }

    #[test]
    fn three_instances_split_200_portals_and_each_portal_is_taken_once() {
        let instances = names("i", 3);
        let portals = names("p", 200);
        let mut leases = BTreeMap::new();
        let moves = settle(&instances, &portals, &mut leases);
        assert_eq!(leases.len(), 200, "every portal owned");
        assert!(moves.values().all(|n| *n == 1), "taken once each");
        let counts = counts(&leases);
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), [67, 67, 66]);
    }

    #[test]
    fn a_joining_instance_takes_its_share_and_no_portal_moves_twice() {
        let mut instances = names("i", 2);
        let portals = names("p", 10_000);
        let mut leases = BTreeMap::new();
        settle(&instances, &portals, &mut leases);
        instances.insert("i00002".into());
        let moves = settle(&instances, &portals, &mut leases);
        assert!(moves.values().all(|n| *n == 1), "no portal moved twice");
        assert_eq!(moves.len(), 3333, "only the newcomer's share moved");
        let counts = counts(&leases);
        assert_eq!(
            counts.values().copied().collect::<Vec<_>>(),
            [3334, 3333, 3333]
        );
    }

    #[test]
    fn a_dead_instances_portals_are_spread_over_the_others_once_expired() {
        let mut instances = names("i", 3);
        let portals = names("p", 200);
        let mut leases = BTreeMap::new();
        settle(&instances, &portals, &mut leases);
        instances.remove("i00001");
        // Still within its lease: nobody takes the dead instance's portals.
        let before = leases.clone();
        for lease in leases.values_mut() {
            lease.expired = lease.owner.as_deref() == Some("i00001");
        }
        let moves = settle(&instances, &portals, &mut leases);
        assert_eq!(moves.len(), 67, "exactly the dead instance's portals moved");
        assert!(
            moves
                .keys()
                .all(|p| before[p].owner.as_deref() == Some("i00001"))
        );
        assert_eq!(
            counts(&leases).values().copied().collect::<Vec<_>>(),
            [100, 100]
        );
    }

    #[test]
    fn an_instance_above_its_share_releases_only_the_excess() {
        let instances = names("i", 2);
        let portals = names("p", 4);
        let leases: BTreeMap<String, LeaseSeen> = portals
            .iter()
            .map(|p| {
                (
                    p.clone(),
                    LeaseSeen {
                        owner: Some("i00000".into()),
                        expired: false,
                    },
                )
            })
            .collect();
        let p = plan("i00000", Phase::Working, &instances, &portals, &leases);
        assert_eq!(p.release, ["p00002", "p00003"]);
        assert!(p.acquire.is_empty());
        // The other one waits until they are free: it never takes a live instance's lease.
        assert_eq!(
            plan("i00001", Phase::Working, &instances, &portals, &leases),
            Plan::default()
        );
    }

    #[test]
    fn an_instance_alone_owns_everything_and_a_lone_new_start_is_live_too() {
        let portals = names("p", 3);
        let p = plan(
            "me",
            Phase::Working,
            &BTreeSet::new(),
            &portals,
            &BTreeMap::new(),
        );
        assert_eq!(p.acquire.len(), 3);
    }

    #[test]
    fn a_discovering_instance_takes_nothing_even_alone_with_every_portal_free() {
        let portals = names("p", 3);
        let alone = plan(
            "me",
            Phase::Discovering,
            &BTreeSet::new(),
            &portals,
            &BTreeMap::new(),
        );
        assert_eq!(alone, Plan::default());
        // Nor a dead instance's expired leases: those wait for the window's end too.
        let expired: BTreeMap<String, LeaseSeen> = portals
            .iter()
            .map(|p| {
                let seen = LeaseSeen {
                    owner: Some("gone".into()),
                    expired: true,
                };
                (p.clone(), seen)
            })
            .collect();
        let live = names("i", 2);
        assert_eq!(
            plan("i00000", Phase::Discovering, &live, &portals, &expired),
            Plan::default()
        );
        assert_eq!(
            plan("i00000", Phase::Working, &live, &portals, &expired)
                .acquire
                .len(),
            2
        );
    }

    /// Three instances started together register one after the other, the first alone for a
    /// while: `first_phase` is what the first one's plan at its registration is.
    fn start_three_together(
        first_phase: Phase,
    ) -> (BTreeMap<String, LeaseSeen>, BTreeMap<String, usize>) {
        let portals = names("p", 10_000);
        let all = names("i", 3);
        let mut leases = BTreeMap::new();
        let mut moves = BTreeMap::new();
        // The last by id registers first (its index is the one that changes most as the others
        // come), then the two others, each planning at once in its discovery window.
        let mut live = BTreeSet::new();
        for (n, me) in all.iter().rev().enumerate() {
            live.insert(me.clone());
            let phase = if n == 0 {
                first_phase
            } else {
                Phase::Discovering
            };
            step(me, phase, &live, &portals, &mut leases, &mut moves);
        }
        let moves = settle_counting(&all, &portals, &mut leases, moves);
        (leases, moves)
    }

    #[test]
    fn instances_planning_at_once_on_a_free_table_try_disjoint_portals() {
        let instances = names("i", 3);
        for count in [1, 2, 3, 60, 200, 10_001] {
            let portals = names("p", count);
            let mut tried = BTreeSet::new();
            for me in &instances {
                let p = plan(me, Phase::Working, &instances, &portals, &BTreeMap::new());
                for portal in p.acquire {
                    assert!(tried.insert(portal), "{count} portals: tried twice");
                }
            }
            assert_eq!(tried, portals, "{count} portals: each tried once");
        }
    }

    #[test]
    fn instances_registering_within_the_window_each_take_their_share_and_each_portal_once() {
        let (leases, moves) = start_three_together(Phase::Discovering);
        assert_eq!(leases.len(), 10_000, "every portal owned");
        assert_eq!(moves.len(), 10_000);
        assert!(moves.values().all(|n| *n == 1), "taken once each");
        assert_eq!(
            counts(&leases).values().copied().collect::<Vec<_>>(),
            [3334, 3333, 3333]
        );
    }

    #[test]
    fn without_the_window_the_first_instance_takes_everything_and_two_thirds_move_twice() {
        // What the window prevents: the first one sees itself alone and takes all 10,000, and
        // the others wait for it to hand their shares back.
        let (leases, moves) = start_three_together(Phase::Working);
        assert_eq!(
            counts(&leases).values().copied().collect::<Vec<_>>(),
            [3334, 3333, 3333]
        );
        assert_eq!(moves.values().filter(|n| **n == 2).count(), 6_667);
    }
}
