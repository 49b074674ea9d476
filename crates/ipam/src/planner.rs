//! The warm-pool planner: given the pool and the targets, the next EC2 action to take.
//!
//! The knobs and their meanings are the reference's (`WARM_ENI_TARGET`, `WARM_IP_TARGET`,
//! `MINIMUM_IP_TARGET`, `MAX_ENI`), with these deliberate differences:
//! - addresses in cooldown are not counted as available, so a node with churn asks for more
//!   addresses instead of failing ADDs (aws-vpc-cni #2896);
//! - the node never holds more addresses than it can run pods (the max-pods ceiling; #2793);
//! - ADDs that are waiting for an address count as demand (`pending`), so a burst of pods is
//!   served by one batched request rather than one per pod;
//! - surplus addresses are released from the emptiest ENI first, so ENIs drain and can go.
//!
//! [`plan`] returns one action; the caller executes it, updates the pool, and asks again until
//! the answer is `None`.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::EniUsage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Targets {
    pub warm_eni: u32,
    pub warm_ip: Option<u32>,
    pub min_ip: Option<u32>,
}

impl Targets {
    /// WARM_IP_TARGET / MINIMUM_IP_TARGET mode (otherwise WARM_ENI_TARGET mode).
    pub fn ip_mode(&self) -> bool {
        self.warm_ip.is_some() || self.min_ip.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// ENIs this node may have: min(MAX_ENI, the instance type's limit).
    pub max_enis: u32,
    /// Secondary IPv4 addresses per ENI: the instance type's limit minus the primary.
    pub ips_per_eni: u32,
    /// Ceiling on the addresses held (the node's max pods).
    pub max_pods: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Assign `count` more secondary IPs to an attached ENI (one EC2 call).
    Assign { eni_id: String, count: u32 },
    /// Create and attach a new ENI carrying `ips` secondary IPs.
    CreateEni { ips: u32 },
    /// Give these free addresses back to EC2 (one call).
    Unassign { eni_id: String, ips: Vec<Ipv4Addr> },
    /// Detach and delete an ENI with no pods.
    DeleteEni { eni_id: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Demand {
    /// ADDs waiting for an address right now.
    pub pending: u32,
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
        let target = limits.ips_per_eni * targets.warm_eni;
        if t.available < target {
            target - t.available
        } else if targets.warm_eni == 0 && t.available == 0 {
            1
        } else {
            0
        }
    };
    want.max(demand.pending.saturating_sub(t.available))
}

/// How many free addresses exceed the targets (only WARM_IP/MINIMUM_IP mode releases addresses,
/// as in the reference).
pub fn surplus(t: &Totals, targets: &Targets) -> u32 {
    if !targets.ip_mode() {
        return 0;
    }
    let warm = targets.warm_ip.unwrap_or(0);
    let min = targets.min_ip.unwrap_or(0);
    t.available
        .saturating_sub(warm)
        .min(t.total.saturating_sub(min))
}

/// The next action that moves the pool towards its targets, or `None` when it is there (or
/// can get no closer: at the ENI limit or the max-pods ceiling).
pub fn plan(
    usage: &[EniUsage],
    targets: &Targets,
    limits: &Limits,
    demand: Demand,
    ages: &Ages<'_>,
) -> Option<Action> {
    let t = totals(usage);
    let room_under_ceiling = limits.max_pods.saturating_sub(t.total);
    let want = shortfall(&t, targets, limits, demand).min(room_under_ceiling);
    if want > 0 {
        // Fill attached ENIs first (lowest device number), then attach a new one.
        if let Some(u) = usage.iter().find(|u| (u.total as u32) < limits.ips_per_eni) {
            let room = limits.ips_per_eni - u.total as u32;
            // WARM_ENI mode asks for whole ENIs' worth, as the reference does (fewer calls);
            // WARM_IP mode asks for exactly what is short.
            let count = if targets.ip_mode() {
                want.min(room)
            } else {
                room
            };
            return Some(Action::Assign {
                eni_id: u.info.id.clone(),
                count: count.min(room_under_ceiling),
            });
        }
        if t.enis < limits.max_enis {
            let ips = if targets.ip_mode() {
                want.min(limits.ips_per_eni)
            } else {
                limits.ips_per_eni.min(room_under_ceiling)
            };
            return Some(Action::CreateEni { ips });
        }
        return None;
    }

    // Give back surplus addresses, from the ENI with the fewest pods (it may then go).
    let over = surplus(&t, targets);
    if over > 0
        && let Some(u) = usage
            .iter()
            .filter(|u| !u.available.is_empty())
            .min_by_key(|u| {
                (
                    u.assigned,
                    u.info.device_number == 0,
                    std::cmp::Reverse(u.info.device_number),
                )
            })
    {
        return Some(Action::Unassign {
            eni_id: u.info.id.clone(),
            ips: u.available.iter().take(over as usize).copied().collect(),
        });
    }

    // Delete an ENI with no pods when the rest still meets the targets.
    let deletable = usage.iter().rev().find(|u| {
        u.info.device_number > 0
            && u.assigned == 0
            && u.cooling == 0
            && (ages.age_ms)(&u.info.id) >= ages.min_eni_age_ms
            && {
                let rest = Totals {
                    enis: t.enis - 1,
                    total: t.total - u.total as u32,
                    assigned: t.assigned,
                    cooling: t.cooling,
                    available: t.available - u.available.len() as u32,
                };
                shortfall(&rest, targets, limits, demand) == 0
            }
    })?;
    Some(Action::DeleteEni {
        eni_id: deletable.info.id.clone(),
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
            let Some(action) = plan(&usage, &targets, &limits, demand, &ages()) else {
                let s = pool.stats(1_000_000);
                return (s.enis, s.total);
            };
            match action {
                Action::Assign { eni_id, count } => {
                    let ips: Vec<_> = (0..count).map(|_| next_ip()).collect();
                    pool.add_ips(&eni_id, &ips).unwrap();
                }
                Action::CreateEni { ips } => {
                    let dev = pool.enis().len() as u32;
                    pool.add_eni(eni(dev), &[]).unwrap();
                    let ips: Vec<_> = (0..ips).map(|_| next_ip()).collect();
                    pool.add_ips(&format!("eni-{dev}"), &ips).unwrap();
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
                converge(p, t, limits, Demand { pending: 1 });
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
        };
        let mut p = fresh();
        assert_eq!(converge(&mut p, t, M5_LARGE, Demand::default()), (1, 5));
        pods(&mut p, 3, t, M5_LARGE);
        assert_eq!(converge(&mut p, t, M5_LARGE, Demand::default()), (1, 8));

        let t = Targets {
            warm_eni: 1,
            warm_ip: Some(2),
            min_ip: Some(12),
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
        };
        let mut p = fresh();
        converge(&mut p, t, M5_LARGE, Demand::default());
        pods(&mut p, 2, t, M5_LARGE);
        p.release(&"pod0".to_string(), 999_000); // still cooling at now = 1_000_000
        p.release(&"pod1".to_string(), 999_000);
        let usage = p.usage(1_000_000);
        assert_eq!(
            plan(&usage, &t, &M5_LARGE, Demand::default(), &ages()),
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
        };
        let limits = Limits {
            max_enis: 3,
            ips_per_eni: 9,
            max_pods: 20,
        };
        let mut p = fresh();
        pods(&mut p, 20, t, limits);
        assert_eq!(converge(&mut p, t, limits, Demand { pending: 5 }), (3, 20));

        let small = Limits {
            max_enis: 1,
            ips_per_eni: 9,
            max_pods: 110,
        };
        let mut p = fresh();
        assert_eq!(converge(&mut p, t, small, Demand { pending: 30 }), (1, 9));
    }

    #[test]
    fn pending_adds_are_served_in_one_batch() {
        let t = Targets {
            warm_eni: 0,
            warm_ip: Some(1),
            min_ip: None,
        };
        let mut p = fresh();
        converge(&mut p, t, M5_LARGE, Demand::default());
        let usage = p.usage(1_000_000);
        assert_eq!(
            plan(&usage, &t, &M5_LARGE, Demand { pending: 6 }, &ages()),
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
        assert_eq!(plan(&usage, &t, &M5_LARGE, Demand::default(), &a), None);
        assert_eq!(
            plan(&usage, &t, &M5_LARGE, Demand::default(), &ages()),
            Some(Action::DeleteEni {
                eni_id: "eni-1".into()
            })
        );
    }
}
