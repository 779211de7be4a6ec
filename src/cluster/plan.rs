//! Which portals an instance should own: a pure function of what every instance sees in the
//! lease table, so that all of them reach the same answer without talking to each other.
//!
//! With `P` configured portals and `N` live instances, sorted by id, the first `P mod N`
//! instances own `⌈P/N⌉` portals and the others `⌊P/N⌋`: every instance is within one portal
//! of its share. An instance above its share releases the excess; one below takes free or
//! expired leases. Nobody takes a lease a live instance holds, so when an instance joins or
//! leaves, each portal that has to move moves once: from an instance above its new share to one
//! below it.

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

/// How many of `portals` the instance at `index` of `instances` (sorted) should own.
pub fn share(portals: usize, instances: usize, index: usize) -> usize {
    if instances == 0 {
        return 0;
    }
    portals / instances + usize::from(index < portals % instances)
}

/// The plan of instance `me`, given the live instances (`me` counts as live), the configured
/// portals and the leases it sees (a portal without a row is free).
pub fn plan(
    me: &str,
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
    if free.is_empty() {
        return plan;
    }
    // Instances taking at the same moment start at different places in the free list, so they
    // mostly try different rows; the database decides the races.
    let start = index * free.len() / instances.len();
    plan.acquire = free
        .iter()
        .cycle()
        .skip(start)
        .take(free.len())
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

    /// Runs every instance's plan in turn (acquisitions succeed when the row is still free)
    /// until nothing changes; returns the leases and how often each portal changed hands.
    fn settle(
        instances: &BTreeSet<String>,
        portals: &BTreeSet<String>,
        leases: &mut BTreeMap<String, LeaseSeen>,
    ) -> BTreeMap<String, usize> {
        let mut moves = BTreeMap::new();
        for _ in 0..20 {
            let mut changed = false;
            for me in instances {
                let p = plan(me, instances, portals, leases);
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
                                owner: Some(me.clone()),
                                expired: false,
                            },
                        );
                        *moves.entry(portal.clone()).or_insert(0) += 1;
                        changed = true;
                    }
                }
            }
            if !changed {
                return moves;
            }
        }
        panic!("the plans did not settle in 20 rounds");
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
        let p = plan("i00000", &instances, &portals, &leases);
        assert_eq!(p.release, ["p00002", "p00003"]);
        assert!(p.acquire.is_empty());
        // The other one waits until they are free: it never takes a live instance's lease.
        assert_eq!(
            plan("i00001", &instances, &portals, &leases),
            Plan::default()
        );
    }

    #[test]
    fn an_instance_alone_owns_everything_and_a_lone_new_start_is_live_too() {
        let portals = names("p", 3);
        let p = plan("me", &BTreeSet::new(), &portals, &BTreeMap::new());
        assert_eq!(p.acquire.len(), 3);
    }
}
