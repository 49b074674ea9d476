//! The warm-pool planner: given the pool and the targets, the next EC2 action to take.
//!
//! The knobs and their meanings are the reference's (`WARM_ENI_TARGET`, `WARM_IP_TARGET`,
//! `MINIMUM_IP_TARGET`, `MAX_ENI`; with prefix delegation `WARM_PREFIX_TARGET`, and
//! `WARM_IP_TARGET`/`MINIMUM_IP_TARGET` counted in addresses and rounded up to whole /28
//! prefixes), with these deliberate differences:
//! - addresses in cooldown are not counted as available, so a node with churn asks for more
//!   addresses instead of failing ADDs (aws-vpc-cni #2896);
//! - the node never holds more addresses than it can run pods (the max-pods ceiling; #2793);
//! - ADDs that are waiting for an address count as demand (`pending`), so a burst of pods is
//!   served by one batched request rather than one per pod;
//! - surplus addresses are released from the emptiest ENI first, so ENIs drain and can go;
//! - with prefix delegation, an ENI on which EC2 has no free /28 for us (`InsufficientCidrBlocks`
//!   on a fragmented subnet: [`Fallback`]) gets secondary addresses instead, and the other
//!   mode's free addresses (secondary ones with prefixes, free prefixes without) go back to EC2
//!   once the targets are met without them, so a node moves between modes with its pods
//!   keeping their addresses.
//!
//! [`plan`] returns one action; the caller executes it, updates the pool, and asks again until
//! the answer is `None`.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::EniUsage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    pub warm_eni: u32,
    pub warm_ip: Option<u32>,
    pub min_ip: Option<u32>,
    /// Prefix delegation (`ENABLE_PREFIX_DELEGATION`): ENI slots take /28 prefixes.
    #[serde(default)]
    pub prefixes: bool,
    /// `WARM_PREFIX_TARGET`: whole prefixes' worth of available addresses to keep (prefix
    /// delegation, unless WARM_IP_TARGET or MINIMUM_IP_TARGET is set).
    #[serde(default)]
    pub warm_prefix: u32,
}

/// Addresses in a prefix (a /28).
pub const PREFIX_ADDRS: u32 = 16;

/// Prefixes that hold `addrs` addresses.
pub fn prefixes_for(addrs: u32) -> u32 {
    addrs.div_ceil(PREFIX_ADDRS)
}

impl Targets {
    /// WARM_IP_TARGET / MINIMUM_IP_TARGET mode (otherwise WARM_ENI_TARGET mode).
    pub fn ip_mode(&self) -> bool {
        self.warm_ip.is_some() || self.min_ip.is_some()
    }

    /// Addresses an ENI slot holds in this mode: a prefix's 16, or one secondary IP.
    pub fn addresses_per_slot(&self) -> u32 {
        if self.prefixes { PREFIX_ADDRS } else { 1 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// ENIs this node may have: min(MAX_ENI, the instance type's limit).
    pub max_enis: u32,
    /// Slots per ENI, each a secondary IPv4 address or a prefix: the instance type's limit of
    /// addresses per ENI minus the primary.
    pub ips_per_eni: u32,
    /// Ceiling on the addresses held (the node's max pods).
    pub max_pods: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Assign `count` more secondary IPs to an attached ENI (one EC2 call).
    Assign { eni_id: String, count: u32 },
    /// Assign `count` more /28 prefixes to an attached ENI (one EC2 call).
    AssignPrefixes { eni_id: String, count: u32 },
    /// Create and attach a new ENI carrying `ips` secondary IPs or `prefixes` prefixes (EC2
    /// takes one or the other).
    CreateEni { ips: u32, prefixes: u32 },
    /// Give these free addresses back to EC2 (one call).
    Unassign { eni_id: String, ips: Vec<Ipv4Addr> },
    /// Give these free prefixes back to EC2 (one call).
    UnassignPrefixes {
        eni_id: String,
        prefixes: Vec<Ipv4Net>,
    },
    /// Detach and delete an ENI with no pods.
    DeleteEni { eni_id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Demand {
    /// ADDs waiting for an address right now.
    pub pending: u32,
    /// Addresses the pool last grew by for waiting ADDs, if that was a moment ago (a burst of
    /// pods under way): while ADDs still wait, the next request is at least twice that, so a
    /// burst is served in a few calls however its ADDs trickle in.
    #[serde(default)]
    pub burst: u32,
}

/// How old each ENI is, in milliseconds; ENIs younger than `min_eni_age_ms` are kept.
pub struct Ages<'a> {
    pub age_ms: &'a dyn Fn(&str) -> u64,
    pub min_eni_age_ms: u64,
}

impl std::fmt::Debug for Ages<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ages")
            .field("min_eni_age_ms", &self.min_eni_age_ms)
            .finish()
    }
}

/// Where prefixes cannot be had now (EC2 answered `InsufficientCidrBlocks`): those ENIs, or a
/// new ENI, get secondary addresses instead, and their secondary addresses are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fallback {
    pub enis: BTreeSet<String>,
    pub new_eni: bool,
}

/// Pool-wide sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub enis: u32,
    pub total: u32,
    pub assigned: u32,
    pub cooling: u32,
    pub available: u32,
}

pub fn totals(usage: &[EniUsage]) -> Totals {
    let mut t = Totals {
        enis: usage.len() as u32,
        total: 0,
        assigned: 0,
        cooling: 0,
        available: 0,
    };
    for u in usage {
        t.total += u.total as u32;
        t.assigned += u.assigned as u32;
        t.cooling += u.cooling as u32;
        t.available += u.available.len() as u32;
    }
    t
}

/// How many more addresses the targets (and waiting ADDs) ask for, before the ceiling.
pub fn shortfall(t: &Totals, targets: &Targets, limits: &Limits, demand: Demand) -> u32 {
    let want = if targets.ip_mode() {
        let warm = targets.warm_ip.unwrap_or(0);
        let min = targets.min_ip.unwrap_or(0);
        warm.saturating_sub(t.available)
            .max(min.saturating_sub(t.total))
    } else {
        // WARM_ENI_TARGET whole ENIs, or WARM_PREFIX_TARGET whole prefixes, of addresses.
        let (unit, warm) = if targets.prefixes {
            (PREFIX_ADDRS, targets.warm_prefix)
        } else {
            (limits.ips_per_eni, targets.warm_eni)
        };
        let target = unit * warm;
        if t.available < target {
            target - t.available
        } else if warm == 0 && t.available == 0 {
            1
        } else {
            0
        }
    };
    let waiting = if demand.pending > t.available {
        (demand.pending - t.available).max(demand.burst.saturating_mul(2))
    } else {
        0
    };
    want.max(waiting)
}

/// The next action that moves the pool towards its targets, or `None` when it is there (or
/// can get no closer: at the ENI limit or the max-pods ceiling).
pub fn plan(
    usage: &[EniUsage],
    targets: &Targets,
    limits: &Limits,
    demand: Demand,
    ages: &Ages<'_>,
    fallback: &Fallback,
) -> Option<Action> {
    let t = totals(usage);
    let other = |u: &EniUsage| other_mode_free(u, targets, fallback);
    // The targets count the mode's own addresses: the other mode's free ones are on their
    // way back to EC2.
    let gone: u32 = usage.iter().map(|u| other(u).0).sum();
    let t_mode = without(&t, gone, gone, 0);
    let room_under_ceiling = limits.max_pods.saturating_sub(t.total);
    let want = shortfall(&t_mode, targets, limits, demand).min(room_under_ceiling);
    if want > 0 {
        return grow(
            usage,
            targets,
            limits,
            want,
            room_under_ceiling,
            fallback,
            t.enis,
        );
    }
    if let Some(a) = release(usage, targets, limits, demand, fallback, &t_mode) {
        return Some(a);
    }

    // Delete an ENI with no pods when the rest still meets the targets.
    let deletable = usage.iter().rev().find(|u| {
        let own = u.available.len() as u32 - other(u).0;
        u.info.device_number > 0
            && u.assigned == 0
            && u.cooling == 0
            && (ages.age_ms)(&u.info.id) >= ages.min_eni_age_ms
            && shortfall(
                &without(&t_mode, u.total as u32 - other(u).0, own, 1),
                targets,
                limits,
                demand,
            ) == 0
    })?;
    Some(Action::DeleteEni {
        eni_id: deletable.info.id.clone(),
    })
}

/// The other mode's free addresses on `u`, and the action that gives them back: available
/// secondary addresses with prefix delegation (except on an ENI in fallback), free prefixes
/// without.
fn other_mode_free(u: &EniUsage, targets: &Targets, fallback: &Fallback) -> (u32, Option<Action>) {
    let eni_id = u.info.id.clone();
    if targets.prefixes {
        if fallback.enis.contains(&u.info.id) || u.available_secondary.is_empty() {
            return (0, None);
        }
        let ips = u.available_secondary.clone();
        (ips.len() as u32, Some(Action::Unassign { eni_id, ips }))
    } else if u.free_prefixes.is_empty() {
        (0, None)
    } else {
        let prefixes = u.free_prefixes.clone();
        (
            prefixes.len() as u32 * PREFIX_ADDRS,
            Some(Action::UnassignPrefixes { eni_id, prefixes }),
        )
    }
}

/// `t` less `total` addresses, `available` of them available, on `enis` ENIs.
fn without(t: &Totals, total: u32, available: u32, enis: u32) -> Totals {
    Totals {
        enis: t.enis - enis,
        total: t.total - total,
        available: t.available - available,
        ..*t
    }
}

/// The action that adds `want` addresses (`want > 0`, already under the ceiling, which is
/// `ceiling` addresses away).
fn grow(
    usage: &[EniUsage],
    targets: &Targets,
    limits: &Limits,
    want: u32,
    ceiling: u32,
    fallback: &Fallback,
    enis: u32,
) -> Option<Action> {
    let room = |u: &EniUsage| limits.ips_per_eni.saturating_sub(u.slots as u32);
    // Fill attached ENIs first (lowest device number; with prefixes, ENIs that can take
    // them first), then attach a new one.
    let with_room = || usage.iter().filter(|u| room(u) > 0);
    if targets.prefixes {
        if let Some(u) = with_room().find(|u| !fallback.enis.contains(&u.info.id)) {
            return Some(Action::AssignPrefixes {
                eni_id: u.info.id.clone(),
                count: prefixes_for(want).min(room(u)),
            });
        }
        if let Some(u) = with_room().next() {
            return Some(Action::Assign {
                eni_id: u.info.id.clone(),
                count: want.min(room(u)),
            });
        }
        if enis >= limits.max_enis {
            return None;
        }
        return Some(if fallback.new_eni {
            Action::CreateEni {
                ips: want.min(limits.ips_per_eni),
                prefixes: 0,
            }
        } else {
            Action::CreateEni {
                ips: 0,
                prefixes: prefixes_for(want).min(limits.ips_per_eni),
            }
        });
    }
    if let Some(u) = with_room().next() {
        // WARM_ENI mode asks for whole ENIs' worth, as the reference does (fewer calls);
        // WARM_IP mode asks for exactly what is short.
        let count = if targets.ip_mode() {
            want.min(room(u))
        } else {
            room(u)
        };
        return Some(Action::Assign {
            eni_id: u.info.id.clone(),
            count: count.min(ceiling),
        });
    }
    if enis >= limits.max_enis {
        return None;
    }
    let ips = if targets.ip_mode() { want } else { ceiling };
    Some(Action::CreateEni {
        ips: ips.min(limits.ips_per_eni),
        prefixes: 0,
    })
}

/// The most of `n` units of `unit` available addresses that can go with the targets still
/// met.
fn releasable(
    t: &Totals,
    targets: &Targets,
    limits: &Limits,
    demand: Demand,
    unit: u32,
    n: u32,
) -> u32 {
    (1..=n)
        .rev()
        .find(|k| shortfall(&without(t, k * unit, k * unit, 0), targets, limits, demand) == 0)
        .unwrap_or(0)
}

/// Free addresses or prefixes to give back, from the ENI with the fewest pods (it may then
/// go): first all of the other mode's ([`other_mode_free`]), then the mode's own surplus
/// over the targets (`t`: the mode's own addresses) — prefixes always, as the reference's
/// WARM_PREFIX_TARGET does; secondary addresses only in WARM_IP/MINIMUM_IP mode, and not
/// those of an ENI in fallback.
fn release(
    usage: &[EniUsage],
    targets: &Targets,
    limits: &Limits,
    demand: Demand,
    fallback: &Fallback,
    t: &Totals,
) -> Option<Action> {
    let mut emptiest: Vec<&EniUsage> = usage.iter().collect();
    emptiest.sort_by_key(|u| {
        (
            u.assigned,
            u.info.device_number == 0,
            std::cmp::Reverse(u.info.device_number),
        )
    });
    if let Some(a) = emptiest
        .iter()
        .find_map(|u| other_mode_free(u, targets, fallback).1)
    {
        return Some(a);
    }
    emptiest.iter().find_map(|u| {
        if targets.prefixes {
            let n = u.free_prefixes.len() as u32;
            let k = releasable(t, targets, limits, demand, PREFIX_ADDRS, n);
            (k > 0).then(|| Action::UnassignPrefixes {
                eni_id: u.info.id.clone(),
                prefixes: u.free_prefixes[..k as usize].to_vec(),
            })
        } else if targets.ip_mode() {
            let n = u.available_secondary.len() as u32;
            let k = releasable(t, targets, limits, demand, 1, n);
            (k > 0).then(|| Action::Unassign {
                eni_id: u.info.id.clone(),
                ips: u.available_secondary[..k as usize].to_vec(),
            })
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EniInfo, Pool};

    const M5_LARGE: Limits = Limits {
        max_enis: 3,
        ips_per_eni: 9,
        max_pods: 29,
    };

    const NO_PREFIXES: Targets = Targets {
        warm_eni: 1,
        warm_ip: None,
        min_ip: None,
        prefixes: false,
        warm_prefix: 0,
    };

    fn old(_: &str) -> u64 {
        u64::MAX
    }

    fn ages() -> Ages<'static> {
        Ages {
            age_ms: &old,
            min_eni_age_ms: 60_000,
        }
    }

    fn eni(dev: u32) -> EniInfo {
        EniInfo {
            id: format!("eni-{dev}"),
            device_number: dev,
            subnet: "10.0.0.0/16".parse().unwrap(),
            primary_ip: Ipv4Addr::new(10, 0, dev as u8, 1),
        }
    }

    /// Runs the planner to a fixed point against a simulated EC2, returning (ENIs, addresses).
    fn converge(
        pool: &mut Pool<String>,
        targets: Targets,
        limits: Limits,
        demand: Demand,
    ) -> (usize, usize) {
        for _ in 0..100 {
            let usage = pool.usage(1_000_000);
            let Some(action) = plan(
                &usage,
                &targets,
                &limits,
                demand,
                &ages(),
                &Fallback::default(),
            ) else {
                let s = pool.stats(1_000_000);
                return (s.enis, s.total);
            };
            match action {
                Action::Assign { eni_id, count } => {
                    let ips: Vec<_> = (0..count).map(|_| next_ip()).collect();
                    pool.add_ips(&eni_id, &ips).unwrap();
                }
                Action::AssignPrefixes { eni_id, count } => {
                    for _ in 0..count {
                        let p = next_prefix();
                        pool.add_prefix(&eni_id, p, &addrs(p)).unwrap();
                    }
                }
                Action::CreateEni { ips, prefixes } => {
                    let dev = pool.enis().len() as u32;
                    pool.add_eni(eni(dev), &[]).unwrap();
                    let ips: Vec<_> = (0..ips).map(|_| next_ip()).collect();
                    pool.add_ips(&format!("eni-{dev}"), &ips).unwrap();
                    for _ in 0..prefixes {
                        let p = next_prefix();
                        pool.add_prefix(&format!("eni-{dev}"), p, &addrs(p))
                            .unwrap();
                    }
                }
                Action::UnassignPrefixes { eni_id, prefixes } => {
                    pool.remove_prefixes(&eni_id, &prefixes, 1_000_000).unwrap()
                }
                Action::Unassign { eni_id, ips } => {
                    pool.remove_ips(&eni_id, &ips, 1_000_000).unwrap()
                }
                Action::DeleteEni { eni_id } => {
                    pool.remove_eni(&eni_id).unwrap();
                }
            }
        }
        panic!("planner did not converge");
    }

    fn next_prefix() -> Ipv4Net {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0x0a02_0000);
        let n = NEXT.fetch_add(16, std::sync::atomic::Ordering::Relaxed);
        Ipv4Net::new(Ipv4Addr::from(n), 28).unwrap()
    }

    fn addrs(p: Ipv4Net) -> Vec<Ipv4Addr> {
        crate::prefix_addresses(p)
    }

    fn next_ip() -> Ipv4Addr {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0x0a01_0000);
        Ipv4Addr::from(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }

    fn fresh() -> Pool<String> {
        let mut p = Pool::new(30_000);
        p.add_eni(eni(0), &[]).unwrap();
        p
    }

    /// Starts `n` pods, provisioning as the agent would when an ADD finds no address.
    fn pods(p: &mut Pool<String>, n: usize, t: Targets, limits: Limits) {
        for i in 0..n {
            if p.assign(format!("pod{i}"), 0).is_err() {
                converge(
                    p,
                    t,
                    limits,
                    Demand {
                        pending: 1,
                        burst: 0,
                    },
                );
                p.assign(format!("pod{i}"), 0).unwrap();
            }
        }
    }

    #[test]
    fn warm_eni_target_keeps_a_whole_eni_free() {
        let t = Targets {
            warm_eni: 1,
            warm_ip: None,
            min_ip: None,
            ..NO_PREFIXES
        };
        let mut p = fresh();
        assert_eq!(converge(&mut p, t, M5_LARGE, Demand::default()), (1, 9));
        pods(&mut p, 1, t, M5_LARGE);
        // 8 available < 9: a second ENI, fully populated.
        assert_eq!(converge(&mut p, t, M5_LARGE, Demand::default()), (2, 18));
    }

    #[test]
    fn warm_ip_and_minimum_targets() {
        let t = Targets {
            warm_eni: 1,
            warm_ip: Some(5),
            min_ip: None,
            ..NO_PREFIXES
        };
        let mut p = fresh();
        assert_eq!(converge(&mut p, t, M5_LARGE, Demand::default()), (1, 5));
        pods(&mut p, 3, t, M5_LARGE);
        assert_eq!(converge(&mut p, t, M5_LARGE, Demand::default()), (1, 8));

        let t = Targets {
            warm_eni: 1,
            warm_ip: Some(2),
            min_ip: Some(12),
            ..NO_PREFIXES
        };
        let mut p = fresh();
        assert_eq!(converge(&mut p, t, M5_LARGE, Demand::default()), (2, 12));
    }

    #[test]
    fn surplus_is_released_and_empty_enis_go() {
        let t = Targets {
            warm_eni: 1,
            warm_ip: Some(2),
            min_ip: None,
            ..NO_PREFIXES
        };
        let mut p = fresh();
        pods(&mut p, 20, t, M5_LARGE);
        assert_eq!(converge(&mut p, t, M5_LARGE, Demand::default()), (3, 22));
        for i in 0..20 {
            p.release(&format!("pod{i}"), 0);
        }
        // After the cooldown: back to 2 warm addresses on the primary ENI.
        assert_eq!(converge(&mut p, t, M5_LARGE, Demand::default()), (1, 2));
    }

    #[test]
    fn cooling_addresses_do_not_count_as_available() {
        let t = Targets {
            warm_eni: 1,
            warm_ip: Some(2),
            min_ip: None,
            ..NO_PREFIXES
        };
        let mut p = fresh();
        converge(&mut p, t, M5_LARGE, Demand::default());
        pods(&mut p, 2, t, M5_LARGE);
        p.release(&"pod0".to_string(), 999_000); // still cooling at now = 1_000_000
        p.release(&"pod1".to_string(), 999_000);
        let usage = p.usage(1_000_000);
        assert_eq!(
            plan(
                &usage,
                &t,
                &M5_LARGE,
                Demand::default(),
                &ages(),
                &Fallback::default()
            ),
            Some(Action::Assign {
                eni_id: "eni-0".into(),
                count: 2
            })
        );
    }

    #[test]
    fn never_above_max_pods_nor_max_enis() {
        let t = Targets {
            warm_eni: 1,
            warm_ip: None,
            min_ip: None,
            ..NO_PREFIXES
        };
        let limits = Limits {
            max_enis: 3,
            ips_per_eni: 9,
            max_pods: 20,
        };
        let mut p = fresh();
        pods(&mut p, 20, t, limits);
        assert_eq!(
            converge(
                &mut p,
                t,
                limits,
                Demand {
                    pending: 5,
                    burst: 0
                }
            ),
            (3, 20)
        );

        let small = Limits {
            max_enis: 1,
            ips_per_eni: 9,
            max_pods: 110,
        };
        let mut p = fresh();
        assert_eq!(
            converge(
                &mut p,
                t,
                small,
                Demand {
                    pending: 30,
                    burst: 0
                }
            ),
            (1, 9)
        );
    }

    #[test]
    fn pending_adds_are_served_in_one_batch() {
        let t = Targets {
            warm_eni: 0,
            warm_ip: Some(1),
            min_ip: None,
            ..NO_PREFIXES
        };
        let mut p = fresh();
        converge(&mut p, t, M5_LARGE, Demand::default());
        let usage = p.usage(1_000_000);
        assert_eq!(
            plan(
                &usage,
                &t,
                &M5_LARGE,
                Demand {
                    pending: 6,
                    burst: 0
                },
                &ages(),
                &Fallback::default()
            ),
            Some(Action::Assign {
                eni_id: "eni-0".into(),
                count: 5
            })
        );
    }

    #[test]
    fn young_enis_and_enis_with_pods_stay() {
        let t = Targets {
            warm_eni: 1,
            warm_ip: None,
            min_ip: None,
            ..NO_PREFIXES
        };
        let mut p = fresh();
        pods(&mut p, 9, t, M5_LARGE);
        converge(&mut p, t, M5_LARGE, Demand::default());
        for i in 0..9 {
            p.release(&format!("pod{i}"), 0);
        }
        let young = |_: &str| 1_000;
        let usage = p.usage(1_000_000);
        let a = Ages {
            age_ms: &young,
            min_eni_age_ms: 60_000,
        };
        assert_eq!(
            plan(
                &usage,
                &t,
                &M5_LARGE,
                Demand::default(),
                &a,
                &Fallback::default()
            ),
            None
        );
        assert_eq!(
            plan(
                &usage,
                &t,
                &M5_LARGE,
                Demand::default(),
                &ages(),
                &Fallback::default()
            ),
            Some(Action::DeleteEni {
                eni_id: "eni-1".into()
            })
        );
    }

    const M5_LARGE_PD: Limits = Limits {
        max_enis: 3,
        ips_per_eni: 9,
        max_pods: 110,
    };

    const PD: Targets = Targets {
        warm_eni: 1,
        warm_ip: None,
        min_ip: None,
        prefixes: true,
        warm_prefix: 1,
    };

    #[test]
    fn prefix_delegation_serves_110_pods_from_the_primary_enis_prefixes_and_gives_them_back() {
        let mut p = fresh();
        p.set_prefer_prefixes(true);
        let none = Fallback::default();
        assert_eq!(
            converge(&mut p, PD, M5_LARGE_PD, Demand::default()),
            (1, 16)
        );
        // A burst of 110 ADDs: one call for the six more prefixes they need.
        let usage = p.usage(1_000_000);
        assert_eq!(
            plan(
                &usage,
                &PD,
                &M5_LARGE_PD,
                Demand {
                    pending: 110,
                    burst: 0
                },
                &ages(),
                &none
            ),
            Some(Action::AssignPrefixes {
                eni_id: "eni-0".into(),
                count: 6
            })
        );
        pods(&mut p, 110, PD, M5_LARGE_PD);
        // 112 addresses on 7 prefixes: at the ceiling, nothing more however short.
        assert_eq!(
            converge(
                &mut p,
                PD,
                M5_LARGE_PD,
                Demand {
                    pending: 5,
                    burst: 0
                }
            ),
            (1, 112)
        );
        assert_eq!(p.stats(0).prefixes, 7);
        for i in 0..110 {
            p.release(&format!("pod{i}"), 0);
        }
        // Whole free prefixes go back, down to WARM_PREFIX_TARGET's one.
        assert_eq!(
            converge(&mut p, PD, M5_LARGE_PD, Demand::default()),
            (1, 16)
        );
    }

    #[test]
    fn a_burst_still_under_way_gets_twice_what_it_got_last() {
        let mut p = fresh();
        p.set_prefer_prefixes(true);
        converge(&mut p, PD, M5_LARGE_PD, Demand::default());
        for i in 0..16 {
            p.assign(format!("pod{i}"), 0).unwrap();
        }
        let usage = p.usage(1_000_000);
        let ask = |burst| {
            plan(
                &usage,
                &PD,
                &M5_LARGE_PD,
                Demand { pending: 3, burst },
                &ages(),
                &Fallback::default(),
            )
        };
        assert_eq!(
            ask(0),
            Some(Action::AssignPrefixes {
                eni_id: "eni-0".into(),
                count: 1
            })
        );
        assert_eq!(
            ask(32),
            Some(Action::AssignPrefixes {
                eni_id: "eni-0".into(),
                count: 4
            })
        );
        // Never past the node's slots or max pods.
        assert_eq!(
            ask(1000),
            Some(Action::AssignPrefixes {
                eni_id: "eni-0".into(),
                count: 6
            })
        );
    }

    #[test]
    fn warm_and_minimum_ip_targets_round_up_to_whole_prefixes() {
        let t = Targets {
            warm_ip: Some(5),
            min_ip: Some(20),
            ..PD
        };
        let mut p = fresh();
        assert_eq!(converge(&mut p, t, M5_LARGE_PD, Demand::default()), (1, 32));
        let t = Targets {
            warm_ip: Some(40),
            min_ip: None,
            ..PD
        };
        assert_eq!(converge(&mut p, t, M5_LARGE_PD, Demand::default()), (1, 48));
    }

    #[test]
    fn without_free_prefixes_an_eni_takes_secondary_addresses_and_keeps_them() {
        let mut fb = Fallback::default();
        fb.enis.insert("eni-0".into());
        let usage = fresh().usage(0);
        assert_eq!(
            plan(
                &usage,
                &PD,
                &M5_LARGE_PD,
                Demand {
                    pending: 3,
                    burst: 0
                },
                &ages(),
                &fb
            ),
            Some(Action::Assign {
                eni_id: "eni-0".into(),
                count: 9
            })
        );
        // The primary ENI full of secondary addresses: a new ENI, with addresses as well when
        // new ENIs cannot have prefixes either.
        let mut p = fresh();
        p.add_ips("eni-0", &(0..9).map(|_| next_ip()).collect::<Vec<_>>())
            .unwrap();
        for i in 0..9 {
            p.assign(format!("pod{i}"), 0).unwrap();
        }
        fb.new_eni = true;
        assert_eq!(
            plan(
                &p.usage(0),
                &PD,
                &M5_LARGE_PD,
                Demand::default(),
                &ages(),
                &fb
            ),
            Some(Action::CreateEni {
                ips: 9,
                prefixes: 0
            })
        );
        fb.new_eni = false;
        assert_eq!(
            plan(
                &p.usage(0),
                &PD,
                &M5_LARGE_PD,
                Demand::default(),
                &ages(),
                &fb
            ),
            Some(Action::CreateEni {
                ips: 0,
                prefixes: 1
            })
        );
        // In fallback, its free secondary addresses are not given back.
        for i in 0..9 {
            p.release(&format!("pod{i}"), 0);
        }
        let usage = p.usage(1_000_000);
        let fb = Fallback {
            enis: ["eni-0".to_string()].into(),
            new_eni: false,
        };
        let t = Targets {
            warm_prefix: 0,
            ..PD
        };
        assert_eq!(
            plan(&usage, &t, &M5_LARGE_PD, Demand::default(), &ages(), &fb),
            None
        );
        // Out of fallback, a prefix comes for the target, and then they go.
        let back = plan(
            &usage,
            &t,
            &M5_LARGE_PD,
            Demand::default(),
            &ages(),
            &Fallback::default(),
        );
        assert_eq!(
            back,
            Some(Action::CreateEni {
                ips: 0,
                prefixes: 1
            })
        );
    }

    #[test]
    fn a_mode_switch_keeps_pods_and_trades_the_other_modes_free_addresses() {
        // Secondary addresses with 3 pods, then prefix delegation turned on.
        let mut p = fresh();
        pods(
            &mut p,
            3,
            Targets {
                warm_eni: 1,
                ..NO_PREFIXES
            },
            M5_LARGE,
        );
        converge(
            &mut p,
            Targets {
                warm_eni: 1,
                ..NO_PREFIXES
            },
            M5_LARGE,
            Demand::default(),
        );
        p.set_prefer_prefixes(true);
        // Both ENIs' slots are full of secondary addresses: the prefix comes on a new ENI, the
        // free secondary addresses go, and the ENI they leave empty goes.
        assert_eq!(
            converge(&mut p, PD, M5_LARGE_PD, Demand::default()),
            (2, 3 + 16)
        );
        let u = p.usage(1_000_000);
        let sum = |f: fn(&EniUsage) -> usize| u.iter().map(f).sum::<usize>();
        assert_eq!(
            (
                sum(|u| u.prefixes.len()),
                sum(|u| u.available_secondary.len()),
                sum(|u| u.assigned)
            ),
            (1, 0, 3)
        );
        // And back: the free prefix goes once an ENI's worth of secondary addresses is there.
        p.set_prefer_prefixes(false);
        converge(&mut p, NO_PREFIXES, M5_LARGE, Demand::default());
        let s = p.stats(1_000_000);
        assert_eq!((s.prefixes, s.assigned), (0, 3));
        assert!(s.available >= 9, "{s:?}");
        for i in 0..3 {
            assert!(p.lookup(&format!("pod{i}")).is_some());
        }
    }
}
