//! The node's address pool: ENIs, their secondary IPv4 addresses and IPv4 prefixes, and who
//! holds which.
//!
//! An ENI slot holds one secondary address or one prefix (a /28 with prefix delegation: 16
//! addresses, each of them given to a pod as a /32 like a secondary address). Both kinds
//! coexist on an ENI, as on EC2; the pool hands out addresses of the preferred kind first
//! ([`Pool::set_prefer_prefixes`]), and a prefix leaves the pool only when none of its
//! addresses is held or cooling down ([`Pool::remove_prefixes`]).
//!
//! Pure logic, no I/O and no clock: every time-dependent call takes `now` (milliseconds since
//! the Unix epoch), so the behaviour is reproducible in tests.
//!
//! Rules that differ from the reference implementation on purpose:
//! - an address in cooldown is *not* available (aws-vpc-cni counts it as available, #2896);
//! - cooldowns are part of the state that is persisted and restored (#1127);
//! - a new pod goes to the fullest ENI that still has an available address, so that pods
//!   concentrate and surplus ENIs become empty and can be released;
//! - an address a pod holds that EC2 takes away behind the agent's back (unassigned, or its
//!   ENI detached) is *lost*, not forgotten: it stays blocked — never available, never handed
//!   to another pod, not on any ENI of the pool — until its pod's DEL drops it (the reference
//!   force-removes it and may hand it out again once EC2 re-assigns it).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub mod planner;

/// Every address of a prefix, the network and broadcast addresses included (EC2 gives a pod
/// any address of a delegated prefix).
pub fn prefix_addresses(prefix: Ipv4Net) -> Vec<Ipv4Addr> {
    ipnet::Ipv4AddrRange::new(prefix.network(), prefix.broadcast()).collect()
}

/// One ENI as the pool sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EniInfo {
    pub id: String,
    pub device_number: u32,
    pub subnet: Ipv4Net,
    pub primary_ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot<K> {
    Free,
    Assigned {
        key: K,
        since_ms: u64,
    },
    Cooling {
        released_ms: u64,
    },
    /// A lost address (held by `key`) that EC2 lists on this ENI again, which is not the ENI
    /// it was lost from: it takes a slot here but is not the pod's working address.
    Parked {
        key: K,
    },
}

#[derive(Debug, Clone)]
struct Eni<K> {
    info: EniInfo,
    /// Every address of the ENI the pool holds: secondary addresses and the addresses of its
    /// prefixes.
    ips: BTreeMap<Ipv4Addr, Slot<K>>,
    prefixes: BTreeSet<Ipv4Net>,
}

impl<K> Eni<K> {
    /// The prefix of this ENI that `ip` belongs to (`None`: a secondary address).
    fn prefix_of(&self, ip: Ipv4Addr) -> Option<Ipv4Net> {
        self.prefixes.iter().find(|p| p.contains(&ip)).copied()
    }

    /// Slots taken: secondary addresses plus prefixes.
    fn slots(&self) -> usize {
        self.ips
            .keys()
            .filter(|ip| self.prefix_of(**ip).is_none())
            .count()
            + self.prefixes.len()
    }

    /// Slots pods hold (assigned, and parked lost addresses).
    fn assigned(&self) -> usize {
        self.ips
            .values()
            .filter(|s| matches!(s, Slot::Assigned { .. } | Slot::Parked { .. }))
            .count()
    }
}

/// Where an assigned address lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub ip: Ipv4Addr,
    pub eni: EniInfo,
    pub since_ms: u64,
}

/// One ENI's counts at one instant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EniUsage {
    pub info: EniInfo,
    /// Addresses: secondary ones and those of prefixes.
    pub total: usize,
    pub assigned: usize,
    pub cooling: usize,
    /// Free and out of cooldown.
    pub available: Vec<Ipv4Addr>,
    /// Slots taken (secondary addresses plus prefixes): what the instance type limits.
    pub slots: usize,
    /// The ENI's prefixes.
    pub prefixes: Vec<Ipv4Net>,
    /// Prefixes none of whose addresses is held or cooling down: they can go back to EC2.
    pub free_prefixes: Vec<Ipv4Net>,
    /// Available secondary addresses (not of a prefix): they can go back to EC2.
    pub available_secondary: Vec<Ipv4Addr>,
}

/// Counts at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub enis: usize,
    /// Secondary addresses on the pool's ENIs: `assigned + cooling + available`.
    pub total: usize,
    /// Held by pods: assignments, and lost addresses EC2 lists on another ENI again.
    pub assigned: usize,
    pub cooling: usize,
    /// Free and out of cooldown: what the next ADD can get.
    pub available: usize,
    /// Addresses pods hold that EC2 took away ([`Lost`]); in `total` (and `assigned`) only
    /// when EC2 lists them on another ENI of the pool again.
    pub lost: usize,
    /// Prefixes on the pool's ENIs (their addresses are in `total`).
    pub prefixes: usize,
}

/// Why a pod's address was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostReason {
    /// EC2 no longer lists the address on its ENI (someone unassigned it).
    Unassigned,
    /// The address's ENI is no longer attached to the instance (detached or deleted).
    EniDetached,
}

impl LostReason {
    pub const ALL: [LostReason; 2] = [LostReason::Unassigned, LostReason::EniDetached];

    /// The metric label: `unassigned`, `eni_detached`.
    pub fn label(self) -> &'static str {
        match self {
            LostReason::Unassigned => "unassigned",
            LostReason::EniDetached => "eni_detached",
        }
    }
}

impl fmt::Display for LostReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LostReason::Unassigned => "EC2 no longer lists it on its ENI (unassigned outside the agent)",
            LostReason::EniDetached => "its ENI is no longer attached to this instance (detached or deleted outside the agent)",
        })
    }
}

/// An address a pod holds that EC2 no longer gives the node: blocked until the pod goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lost {
    /// The assignment as it was when the address was lost (its ENI as the pool knew it).
    pub assignment: Assignment,
    pub reason: LostReason,
    pub lost_ms: u64,
    /// The pool ENI on which EC2 lists the address again (not its own: see
    /// [`Pool::relist_lost`]), where it takes a slot until the pod goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked_on: Option<String>,
}

/// What [`Pool::forget_ip`] did with an address EC2 no longer lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forgotten<K> {
    /// The pool did not have it.
    NotInPool,
    /// It was free or cooling down: gone from the pool.
    Removed,
    /// A pod held it: now lost, held by this key.
    Lost(K),
}

/// What [`Pool::relist_lost`] did with a lost address EC2 lists on a pool ENI again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Relisted<K> {
    /// On the ENI it was lost from: assigned to its pod again, as before (the pod's wiring
    /// for that ENI is intact).
    Revived(K),
    /// On another ENI: still lost, taking a slot there until the pod goes.
    Parked(K),
}

/// What [`Pool::detach_eni`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetachedEni<K> {
    pub info: EniInfo,
    /// Free and cooling addresses that went with the ENI.
    pub removed: Vec<Ipv4Addr>,
    /// Keys whose address is now lost.
    pub lost: Vec<K>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error(
        "no free address on this node: {total} secondary IPs on {enis} ENIs, {assigned} assigned, {cooling} in cooldown (freed less than {cooldown_s}s ago)"
    )]
    Exhausted {
        enis: usize,
        total: usize,
        assigned: usize,
        cooling: usize,
        cooldown_s: u64,
    },
    #[error("address {ip} is not a secondary IP of any ENI in the pool")]
    UnknownIp { ip: Ipv4Addr },
    #[error("address {ip} is already held by {holder}")]
    AlreadyHeld { ip: Ipv4Addr, holder: String },
    #[error("ENI {0} is already in the pool")]
    DuplicateEni(String),
    #[error("ENI {0} is not in the pool")]
    UnknownEni(String),
    #[error("{what} is in use")]
    Busy { what: String },
    #[error("address {ip} is already in the pool on ENI {eni}")]
    DuplicateIp { ip: Ipv4Addr, eni: String },
    #[error("prefix {prefix} overlaps {existing} already in the pool on ENI {eni}")]
    OverlappingPrefix {
        prefix: Ipv4Net,
        existing: String,
        eni: String,
    },
    #[error("prefix {prefix} is not on ENI {eni} in the pool")]
    UnknownPrefix { prefix: Ipv4Net, eni: String },
    #[error(
        "address {ip} belongs to prefix {prefix}: it goes back to EC2 with its prefix, not alone"
    )]
    InPrefix { ip: Ipv4Addr, prefix: Ipv4Net },
    #[error(
        "address {ip} of {holder} is lost ({reason}); it stays blocked until that pod is deleted"
    )]
    Lost {
        ip: Ipv4Addr,
        holder: String,
        reason: LostReason,
    },
}

/// The pool. `K` identifies an attachment (the CNI's network, container id and ifname).
#[derive(Debug, Clone)]
pub struct Pool<K> {
    enis: BTreeMap<String, Eni<K>>,
    by_key: BTreeMap<K, Ipv4Addr>,
    /// Lost addresses by the key that holds them. A lost address is on no ENI of `enis`, and
    /// a key is in at most one of `by_key` and `lost`.
    lost: BTreeMap<K, Lost>,
    cooldown_ms: u64,
    /// Hand out addresses of prefixes before secondary addresses (prefix delegation).
    prefer_prefixes: bool,
}

impl<K: Ord + Clone + fmt::Display> Pool<K> {
    pub fn new(cooldown_ms: u64) -> Self {
        Pool {
            enis: BTreeMap::new(),
            by_key: BTreeMap::new(),
            lost: BTreeMap::new(),
            cooldown_ms,
            prefer_prefixes: false,
        }
    }

    /// Which kind of address new pods get first: addresses of prefixes (prefix delegation) or
    /// secondary addresses. Either way a pod gets the other kind when its kind is used up.
    pub fn set_prefer_prefixes(&mut self, prefer: bool) {
        self.prefer_prefixes = prefer;
    }

    pub fn cooldown_ms(&self) -> u64 {
        self.cooldown_ms
    }

    /// Adds an ENI with its secondary addresses (all free). All or nothing: on error the pool
    /// is unchanged.
    pub fn add_eni(&mut self, info: EniInfo, ips: &[Ipv4Addr]) -> Result<(), PoolError> {
        if self.enis.contains_key(&info.id) {
            return Err(PoolError::DuplicateEni(info.id));
        }
        self.check_new_ips(ips)?;
        let id = info.id.clone();
        self.enis.insert(
            id.clone(),
            Eni {
                info,
                ips: BTreeMap::new(),
                prefixes: BTreeSet::new(),
            },
        );
        self.add_ips(&id, ips)
    }

    /// Adds free secondary addresses to a known ENI.
    pub fn add_ips(&mut self, eni_id: &str, ips: &[Ipv4Addr]) -> Result<(), PoolError> {
        self.check_new_ips(ips)?;
        let eni = self
            .enis
            .get_mut(eni_id)
            .ok_or_else(|| PoolError::UnknownEni(eni_id.to_string()))?;
        for ip in ips {
            eni.ips.insert(*ip, Slot::Free);
        }
        Ok(())
    }

    /// Adds a prefix to a known ENI, with `ips` (addresses of the prefix) free. The caller
    /// leaves out addresses pods hold off the pool (lost ones, checkpoint records on no ENI),
    /// which it places itself. All or nothing.
    pub fn add_prefix(
        &mut self,
        eni_id: &str,
        prefix: Ipv4Net,
        ips: &[Ipv4Addr],
    ) -> Result<(), PoolError> {
        let prefix = prefix.trunc();
        if !self.enis.contains_key(eni_id) {
            return Err(PoolError::UnknownEni(eni_id.to_string()));
        }
        for eni in self.enis.values() {
            // Another prefix, or an address the pool has (a secondary one, or a prefix's).
            let clash = eni
                .prefixes
                .iter()
                .find(|p| p.contains(&prefix) || prefix.contains(*p))
                .map(ToString::to_string)
                .or_else(|| {
                    eni.ips
                        .keys()
                        .find(|ip| prefix.contains(*ip))
                        .map(ToString::to_string)
                });
            if let Some(existing) = clash {
                return Err(PoolError::OverlappingPrefix {
                    prefix,
                    existing,
                    eni: eni.info.id.clone(),
                });
            }
        }
        if let Some(ip) = ips.iter().find(|ip| !prefix.contains(*ip)) {
            return Err(PoolError::UnknownIp { ip: *ip });
        }
        self.check_new_ips(ips)?;
        let eni = self.enis.get_mut(eni_id).expect("checked above");
        eni.prefixes.insert(prefix);
        for ip in ips {
            eni.ips.insert(*ip, Slot::Free);
        }
        Ok(())
    }

    /// Removes prefixes none of whose addresses is held or cooling down (given back to
    /// EC2). Refuses, and changes nothing, otherwise.
    pub fn remove_prefixes(
        &mut self,
        eni_id: &str,
        prefixes: &[Ipv4Net],
        now_ms: u64,
    ) -> Result<(), PoolError> {
        let eni = self
            .enis
            .get(eni_id)
            .ok_or_else(|| PoolError::UnknownEni(eni_id.to_string()))?;
        for prefix in prefixes {
            if !eni.prefixes.contains(prefix) {
                return Err(PoolError::UnknownPrefix {
                    prefix: *prefix,
                    eni: eni_id.to_string(),
                });
            }
            let busy = eni
                .ips
                .iter()
                .filter(|(ip, s)| prefix.contains(*ip) && !self.is_available(s, now_ms))
                .count();
            if busy > 0 {
                return Err(PoolError::Busy {
                    what: format!("prefix {prefix} ({busy} addresses held or cooling down)"),
                });
            }
        }
        let eni = self.enis.get_mut(eni_id).expect("checked above");
        for prefix in prefixes {
            eni.prefixes.remove(prefix);
            eni.ips.retain(|ip, _| !prefix.contains(ip));
        }
        Ok(())
    }

    /// Forgets a prefix EC2 no longer lists on its ENI: its free and cooling addresses leave
    /// the pool, its held ones become lost (as [`Pool::forget_ip`] does for each).
    pub fn forget_prefix(
        &mut self,
        eni_id: &str,
        prefix: Ipv4Net,
        now_ms: u64,
    ) -> Result<Vec<(Ipv4Addr, Forgotten<K>)>, PoolError> {
        let eni = self
            .enis
            .get_mut(eni_id)
            .ok_or_else(|| PoolError::UnknownEni(eni_id.to_string()))?;
        if !eni.prefixes.remove(&prefix) {
            return Err(PoolError::UnknownPrefix {
                prefix,
                eni: eni_id.to_string(),
            });
        }
        let ips: Vec<Ipv4Addr> = eni
            .ips
            .keys()
            .filter(|ip| prefix.contains(*ip))
            .copied()
            .collect();
        Ok(ips
            .into_iter()
            .map(|ip| (ip, self.forget_ip(ip, now_ms)))
            .collect())
    }

    /// Refuses addresses already in the pool, lost (held by a pod), or listed twice.
    fn check_new_ips(&self, ips: &[Ipv4Addr]) -> Result<(), PoolError> {
        for (i, ip) in ips.iter().enumerate() {
            self.refuse_lost(*ip)?;
            if let Some(owner) = self.eni_of(*ip) {
                return Err(PoolError::DuplicateIp {
                    ip: *ip,
                    eni: owner.info.id.clone(),
                });
            }
            if ips[..i].contains(ip) {
                return Err(PoolError::DuplicateIp {
                    ip: *ip,
                    eni: "(listed twice)".into(),
                });
            }
        }
        Ok(())
    }

    /// `Err(PoolError::Lost)` when a pod holds `ip` as a lost address.
    fn refuse_lost(&self, ip: Ipv4Addr) -> Result<(), PoolError> {
        match self.lost_holder(ip) {
            Some((key, l)) => Err(PoolError::Lost {
                ip,
                holder: key.to_string(),
                reason: l.reason,
            }),
            None => Ok(()),
        }
    }

    /// The key holding `ip` as a lost address, if any.
    pub fn lost_holder(&self, ip: Ipv4Addr) -> Option<(&K, &Lost)> {
        self.lost.iter().find(|(_, l)| l.assignment.ip == ip)
    }

    fn eni_of(&self, ip: Ipv4Addr) -> Option<&Eni<K>> {
        self.enis.values().find(|e| e.ips.contains_key(&ip))
    }

    fn is_available(&self, slot: &Slot<K>, now_ms: u64) -> bool {
        match slot {
            Slot::Free => true,
            Slot::Assigned { .. } | Slot::Parked { .. } => false,
            Slot::Cooling { released_ms } => {
                now_ms.saturating_sub(*released_ms) >= self.cooldown_ms
            }
        }
    }

    /// The address held by `key`, if any.
    pub fn lookup(&self, key: &K) -> Option<Assignment> {
        let ip = *self.by_key.get(key)?;
        let eni = self.eni_of(ip)?;
        match eni.ips.get(&ip) {
            Some(Slot::Assigned { since_ms, .. }) => Some(Assignment {
                ip,
                eni: eni.info.clone(),
                since_ms: *since_ms,
            }),
            _ => None,
        }
    }

    /// Gives `key` an address. Idempotent: a key that holds one gets the same one back.
    ///
    /// Picks the fullest ENI (most assigned addresses) that has an available address, lowest
    /// device number on ties, and the lowest available address on it.
    ///
    /// A key whose address is lost gets no other one ([`PoolError::Lost`]): its pod must go.
    pub fn assign(&mut self, key: K, now_ms: u64) -> Result<Assignment, PoolError> {
        if let Some(a) = self.lookup(&key) {
            return Ok(a);
        }
        if let Some(l) = self.lost.get(&key) {
            return Err(PoolError::Lost {
                ip: l.assignment.ip,
                holder: key.to_string(),
                reason: l.reason,
            });
        }
        let choice = self
            .enis
            .values()
            .filter_map(|eni| {
                let (preferred, ip) = self.pick(eni, now_ms)?;
                Some((
                    (
                        preferred,
                        eni.assigned(),
                        std::cmp::Reverse(eni.info.device_number),
                    ),
                    eni.info.id.clone(),
                    ip,
                ))
            })
            .max_by(|a, b| a.0.cmp(&b.0));
        let Some((_, eni_id, ip)) = choice else {
            let s = self.stats(now_ms);
            return Err(PoolError::Exhausted {
                enis: s.enis,
                total: s.total,
                assigned: s.assigned,
                cooling: s.cooling,
                cooldown_s: self.cooldown_ms / 1000,
            });
        };
        self.place(key, ip, &eni_id, now_ms)
    }

    /// The address of `eni` a new pod gets, and whether it is of the preferred kind: the
    /// preferred kind first; among addresses of prefixes, one of the prefix with the fewest
    /// available addresses (pods concentrate, so whole prefixes come free); then the lowest.
    /// Runs in every ADD: one pass over the ENI's addresses.
    fn pick(&self, eni: &Eni<K>, now_ms: u64) -> Option<(bool, Ipv4Addr)> {
        let mut free: BTreeMap<Option<Ipv4Net>, (usize, Ipv4Addr)> = BTreeMap::new();
        for (ip, _) in eni.ips.iter().filter(|(_, s)| self.is_available(s, now_ms)) {
            // Addresses come in order: the first of a group is its lowest.
            free.entry(eni.prefix_of(*ip)).or_insert((0, *ip)).0 += 1;
        }
        free.into_iter()
            .map(|(prefix, (n, lowest))| {
                let preferred = prefix.is_some() == self.prefer_prefixes;
                // Secondary addresses (no prefix) as one group, picked by address alone.
                let crowd = prefix.map(|_| std::cmp::Reverse(n));
                ((preferred, crowd, std::cmp::Reverse(lowest)), lowest)
            })
            .max_by(|a, b| a.0.cmp(&b.0))
            .map(|((preferred, _, _), ip)| (preferred, ip))
    }

    fn place(
        &mut self,
        key: K,
        ip: Ipv4Addr,
        eni_id: &str,
        now_ms: u64,
    ) -> Result<Assignment, PoolError> {
        let eni = self.enis.get_mut(eni_id).expect("ENI chosen from the pool");
        eni.ips.insert(
            ip,
            Slot::Assigned {
                key: key.clone(),
                since_ms: now_ms,
            },
        );
        let info = eni.info.clone();
        self.by_key.insert(key, ip);
        Ok(Assignment {
            ip,
            eni: info,
            since_ms: now_ms,
        })
    }

    /// Re-establishes an assignment read from the checkpoint (after a restart).
    pub fn restore(
        &mut self,
        key: K,
        ip: Ipv4Addr,
        since_ms: u64,
    ) -> Result<Assignment, PoolError> {
        if self.by_key.get(&key) == Some(&ip) {
            return Ok(self.lookup(&key).expect("indexed key has an assignment"));
        }
        self.refuse_lost(ip)?;
        if let Some(l) = self.lost.get(&key) {
            return Err(PoolError::Lost {
                ip: l.assignment.ip,
                holder: key.to_string(),
                reason: l.reason,
            });
        }
        let eni = self.eni_of(ip).ok_or(PoolError::UnknownIp { ip })?;
        if let Some(Slot::Assigned { key: holder, .. }) = eni.ips.get(&ip) {
            return Err(PoolError::AlreadyHeld {
                ip,
                holder: holder.to_string(),
            });
        }
        let eni_id = eni.info.id.clone();
        self.place(key, ip, &eni_id, since_ms)
    }

    /// Re-establishes a cooldown read from the checkpoint. Unknown addresses are ignored
    /// (the ENI or address may have gone while the agent was down).
    pub fn restore_cooldown(&mut self, ip: Ipv4Addr, released_ms: u64) {
        for eni in self.enis.values_mut() {
            if let Some(slot @ Slot::Free) = eni.ips.get_mut(&ip) {
                *slot = Slot::Cooling { released_ms };
            }
        }
    }

    /// Releases `key`'s address into cooldown. Returns what it held, or `None` if nothing.
    /// A lost address is dropped instead (EC2 no longer gives it to the node), unless EC2
    /// lists it on a pool ENI again (parked there): then it cools down there.
    pub fn release(&mut self, key: &K, now_ms: u64) -> Option<Assignment> {
        if let Some(l) = self.lost.remove(key) {
            if let Some(slot) = l
                .parked_on
                .as_ref()
                .and_then(|e| self.enis.get_mut(e))
                .and_then(|e| e.ips.get_mut(&l.assignment.ip))
            {
                *slot = Slot::Cooling {
                    released_ms: now_ms,
                };
            }
            return Some(l.assignment);
        }
        let a = self.lookup(key)?;
        self.by_key.remove(key);
        if let Some(eni) = self.enis.get_mut(&a.eni.id) {
            eni.ips.insert(
                a.ip,
                Slot::Cooling {
                    released_ms: now_ms,
                },
            );
        }
        Some(a)
    }

    /// Takes back an assignment that was never handed out (its record could not be written):
    /// the address becomes free at once, with no cooldown. Returns what `key` held.
    pub fn cancel(&mut self, key: &K) -> Option<Assignment> {
        let a = self.lookup(key)?;
        self.by_key.remove(key);
        if let Some(eni) = self.enis.get_mut(&a.eni.id) {
            eni.ips.insert(a.ip, Slot::Free);
        }
        Some(a)
    }

    /// Every assignment (not the lost ones: [`Pool::lost`]), in key order.
    pub fn assignments(&self) -> Vec<(K, Assignment)> {
        self.by_key
            .keys()
            .filter_map(|k| self.lookup(k).map(|a| (k.clone(), a)))
            .collect()
    }

    /// Addresses still in cooldown at `now_ms`, with the time they were released.
    pub fn cooldowns(&self, now_ms: u64) -> Vec<(Ipv4Addr, u64)> {
        self.enis
            .values()
            .flat_map(|e| e.ips.iter())
            .filter_map(|(ip, s)| match s {
                Slot::Cooling { released_ms }
                    if now_ms.saturating_sub(*released_ms) < self.cooldown_ms =>
                {
                    Some((*ip, *released_ms))
                }
                _ => None,
            })
            .collect()
    }

    pub fn enis(&self) -> Vec<EniInfo> {
        self.enis.values().map(|e| e.info.clone()).collect()
    }

    /// Per-ENI counts, in device-number order.
    pub fn usage(&self, now_ms: u64) -> Vec<EniUsage> {
        let mut out: Vec<EniUsage> = self
            .enis
            .values()
            .map(|e| {
                let mut u = EniUsage {
                    info: e.info.clone(),
                    total: e.ips.len(),
                    assigned: 0,
                    cooling: 0,
                    available: Vec::new(),
                    slots: e.slots(),
                    prefixes: e.prefixes.iter().copied().collect(),
                    free_prefixes: Vec::new(),
                    available_secondary: Vec::new(),
                };
                let mut busy_prefixes = BTreeSet::new();
                for (ip, slot) in &e.ips {
                    let prefix = e.prefix_of(*ip);
                    match slot {
                        Slot::Assigned { .. } | Slot::Parked { .. } => u.assigned += 1,
                        _ if self.is_available(slot, now_ms) => {
                            u.available.push(*ip);
                            if prefix.is_none() {
                                u.available_secondary.push(*ip);
                            }
                            continue;
                        }
                        _ => u.cooling += 1,
                    }
                    busy_prefixes.extend(prefix);
                }
                u.free_prefixes = e
                    .prefixes
                    .iter()
                    .filter(|p| !busy_prefixes.contains(*p))
                    .copied()
                    .collect();
                u
            })
            .collect();
        out.sort_by_key(|u| u.info.device_number);
        out
    }

    /// Removes addresses that are free and out of cooldown (given back to EC2). Refuses, and
    /// changes nothing, if any of them is assigned, cooling down or unknown.
    pub fn remove_ips(
        &mut self,
        eni_id: &str,
        ips: &[Ipv4Addr],
        now_ms: u64,
    ) -> Result<(), PoolError> {
        let eni = self
            .enis
            .get(eni_id)
            .ok_or_else(|| PoolError::UnknownEni(eni_id.to_string()))?;
        for ip in ips {
            if let Some(prefix) = eni.prefix_of(*ip) {
                return Err(PoolError::InPrefix { ip: *ip, prefix });
            }
            match eni.ips.get(ip) {
                None => return Err(PoolError::UnknownIp { ip: *ip }),
                Some(slot) if !self.is_available(slot, now_ms) => {
                    return Err(PoolError::Busy {
                        what: format!("address {ip}"),
                    });
                }
                Some(_) => {}
            }
        }
        let eni = self.enis.get_mut(eni_id).expect("checked above");
        for ip in ips {
            eni.ips.remove(ip);
        }
        Ok(())
    }

    /// Removes an ENI that holds no assigned address; its free addresses go with it.
    pub fn remove_eni(&mut self, eni_id: &str) -> Result<EniInfo, PoolError> {
        let eni = self
            .enis
            .get(eni_id)
            .ok_or_else(|| PoolError::UnknownEni(eni_id.to_string()))?;
        if eni.assigned() > 0 {
            return Err(PoolError::Busy {
                what: format!("ENI {eni_id} ({} pods)", eni.assigned()),
            });
        }
        Ok(self.enis.remove(eni_id).expect("checked above").info)
    }

    /// Forgets an address EC2 no longer lists on its ENI: free or cooling (or parked: still
    /// lost), it leaves the pool; assigned, it becomes lost ([`LostReason::Unassigned`]) and
    /// stays blocked until its key is released.
    pub fn forget_ip(&mut self, ip: Ipv4Addr, now_ms: u64) -> Forgotten<K> {
        let Some(eni) = self.enis.values_mut().find(|e| e.ips.contains_key(&ip)) else {
            return Forgotten::NotInPool;
        };
        let info = eni.info.clone();
        match eni.ips.remove(&ip) {
            Some(Slot::Assigned { key, since_ms }) => {
                self.by_key.remove(&key);
                self.lost.insert(
                    key.clone(),
                    Lost {
                        assignment: Assignment {
                            ip,
                            eni: info,
                            since_ms,
                        },
                        reason: LostReason::Unassigned,
                        lost_ms: now_ms,
                        parked_on: None,
                    },
                );
                Forgotten::Lost(key)
            }
            Some(Slot::Parked { key }) => {
                if let Some(l) = self.lost.get_mut(&key) {
                    l.parked_on = None;
                }
                Forgotten::Removed
            }
            _ => Forgotten::Removed,
        }
    }

    /// A lost address that EC2 lists on the pool ENI `eni_id` again (someone re-assigned it,
    /// or EC2 picked it for a request of this node): on the ENI it was lost from it is the
    /// pod's again ([`Relisted::Revived`]); on another ENI it takes a slot there, still lost,
    /// never available, until the pod goes ([`Relisted::Parked`]; the release then cools it
    /// down there). Refuses an address that is not lost, or that the pool already has.
    pub fn relist_lost(&mut self, eni_id: &str, ip: Ipv4Addr) -> Result<Relisted<K>, PoolError> {
        let key = self
            .lost_holder(ip)
            .map(|(k, _)| k.clone())
            .ok_or(PoolError::UnknownIp { ip })?;
        if let Some(owner) = self.eni_of(ip) {
            return Err(PoolError::DuplicateIp {
                ip,
                eni: owner.info.id.clone(),
            });
        }
        let eni = self
            .enis
            .get_mut(eni_id)
            .ok_or_else(|| PoolError::UnknownEni(eni_id.to_string()))?;
        let lost = self.lost.get_mut(&key).expect("found above");
        if lost.assignment.eni.id == eni_id {
            let l = self.lost.remove(&key).expect("found above");
            eni.ips.insert(
                ip,
                Slot::Assigned {
                    key: key.clone(),
                    since_ms: l.assignment.since_ms,
                },
            );
            self.by_key.insert(key.clone(), ip);
            return Ok(Relisted::Revived(key));
        }
        eni.ips.insert(ip, Slot::Parked { key: key.clone() });
        lost.parked_on = Some(eni_id.to_string());
        Ok(Relisted::Parked(key))
    }

    /// Removes an ENI that is no longer attached, whatever it holds: its free and cooling
    /// addresses go with it, its assigned ones become lost ([`LostReason::EniDetached`]).
    pub fn detach_eni(&mut self, eni_id: &str, now_ms: u64) -> Result<DetachedEni<K>, PoolError> {
        let eni = self
            .enis
            .remove(eni_id)
            .ok_or_else(|| PoolError::UnknownEni(eni_id.to_string()))?;
        let mut out = DetachedEni {
            info: eni.info.clone(),
            removed: Vec::new(),
            lost: Vec::new(),
        };
        for (ip, slot) in eni.ips {
            match slot {
                Slot::Assigned { key, since_ms } => {
                    self.by_key.remove(&key);
                    self.lost.insert(
                        key.clone(),
                        Lost {
                            assignment: Assignment {
                                ip,
                                eni: eni.info.clone(),
                                since_ms,
                            },
                            reason: LostReason::EniDetached,
                            lost_ms: now_ms,
                            parked_on: None,
                        },
                    );
                    out.lost.push(key);
                }
                // Lost already; off the pool again.
                Slot::Parked { key } => {
                    if let Some(l) = self.lost.get_mut(&key) {
                        l.parked_on = None;
                    }
                }
                Slot::Free | Slot::Cooling { .. } => out.removed.push(ip),
            }
        }
        Ok(out)
    }

    /// Every lost address, in key order.
    pub fn lost(&self) -> Vec<(K, Lost)> {
        self.lost
            .iter()
            .map(|(k, l)| (k.clone(), l.clone()))
            .collect()
    }

    /// The lost address `key` holds, if any.
    pub fn lost_of(&self, key: &K) -> Option<&Lost> {
        self.lost.get(key)
    }

    /// Puts back a lost address exactly as it was (undoing a release whose record could not
    /// be written). Refuses a key that holds an address, or an address the pool has (other
    /// than where it was parked, not held by anyone).
    pub fn restore_lost(&mut self, key: K, mut lost: Lost) -> Result<(), PoolError> {
        let ip = lost.assignment.ip;
        if let Some(holder) = self
            .by_key
            .get(&key)
            .or(self.lost.get(&key).map(|l| &l.assignment.ip))
        {
            return Err(PoolError::AlreadyHeld {
                ip: *holder,
                holder: key.to_string(),
            });
        }
        self.refuse_lost(ip)?;
        if let Some(owner) = self.eni_of(ip) {
            let parked_here = lost.parked_on.as_deref() == Some(owner.info.id.as_str())
                && matches!(owner.ips.get(&ip), Some(Slot::Free | Slot::Cooling { .. }));
            if !parked_here {
                return Err(PoolError::DuplicateIp {
                    ip,
                    eni: owner.info.id.clone(),
                });
            }
            let eni_id = owner.info.id.clone();
            if let Some(e) = self.enis.get_mut(&eni_id) {
                e.ips.insert(ip, Slot::Parked { key: key.clone() });
            }
        } else {
            lost.parked_on = None;
        }
        self.lost.insert(key, lost);
        Ok(())
    }

    pub fn has_eni(&self, eni_id: &str) -> bool {
        self.enis.contains_key(eni_id)
    }

    /// The addresses the pool holds on `eni_id` (any state): secondary ones and those of its
    /// prefixes.
    pub fn ips_of(&self, eni_id: &str) -> Vec<Ipv4Addr> {
        self.enis
            .get(eni_id)
            .map(|e| e.ips.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The secondary addresses (not of a prefix) the pool holds on `eni_id` (any state).
    pub fn secondary_ips_of(&self, eni_id: &str) -> Vec<Ipv4Addr> {
        self.enis
            .get(eni_id)
            .map(|e| {
                e.ips
                    .keys()
                    .filter(|ip| e.prefix_of(**ip).is_none())
                    .copied()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The prefixes of `eni_id`.
    pub fn prefixes_of(&self, eni_id: &str) -> Vec<Ipv4Net> {
        self.enis
            .get(eni_id)
            .map(|e| e.prefixes.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Pods holding an address: assigned ones and lost ones.
    pub fn holders(&self) -> usize {
        self.by_key.len() + self.lost.len()
    }

    pub fn stats(&self, now_ms: u64) -> Stats {
        let mut s = Stats {
            enis: self.enis.len(),
            lost: self.lost.len(),
            prefixes: self.enis.values().map(|e| e.prefixes.len()).sum(),
            ..Stats::default()
        };
        for slot in self.enis.values().flat_map(|e| e.ips.values()) {
            s.total += 1;
            match slot {
                Slot::Assigned { .. } | Slot::Parked { .. } => s.assigned += 1,
                _ if self.is_available(slot, now_ms) => s.available += 1,
                _ => s.cooling += 1,
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn eni(id: &str, dev: u32) -> EniInfo {
        EniInfo {
            id: id.into(),
            device_number: dev,
            subnet: "172.31.0.0/20".parse().unwrap(),
            primary_ip: Ipv4Addr::new(172, 31, 0, 10 + dev as u8),
        }
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(172, 31, 1, last)
    }

    fn seed_pool() -> Pool<String> {
        let mut p: Pool<String> = Pool::new(30_000);
        p.add_eni(eni("eni-0", 0), &[ip(1)]).unwrap();
        p.add_eni(eni("eni-1", 1), &[ip(11), ip(12)]).unwrap();
        p
    }

    #[test]
    fn assign_is_idempotent_per_key() {
        let mut p = seed_pool();
        let a = p.assign("a".into(), 0).unwrap();
        let again = p.assign("a".into(), 5).unwrap();
        assert_eq!(a, again);
        assert_eq!(p.stats(5).assigned, 1);
    }

    #[test]
    fn fills_the_fullest_eni_first() {
        let mut p = seed_pool();
        // Both ENIs empty: tie on fullness, lowest device number wins.
        assert_eq!(p.assign("a".into(), 0).unwrap().eni.id, "eni-0");
        // eni-0 is full now; eni-1 takes the next two.
        assert_eq!(p.assign("b".into(), 0).unwrap().ip, ip(11));
        assert_eq!(p.assign("c".into(), 0).unwrap().ip, ip(12));
        // Free one address on each ENI; eni-1 (one pod left) is fuller than eni-0 (none).
        p.release(&"a".into(), 0);
        p.release(&"b".into(), 0);
        let d = p.assign("d".into(), 60_000).unwrap();
        assert_eq!(d.eni.id, "eni-1", "packs onto the ENI that still has a pod");
    }

    #[test]
    fn cooling_addresses_are_not_available() {
        let mut p: Pool<String> = Pool::new(30_000);
        p.add_eni(eni("eni-1", 1), &[ip(11)]).unwrap();
        p.assign("a".into(), 0).unwrap();
        p.release(&"a".into(), 1_000);
        let s = p.stats(2_000);
        assert_eq!((s.available, s.cooling), (0, 1));
        let err = p.assign("b".into(), 2_000).unwrap_err();
        assert!(
            matches!(err, PoolError::Exhausted { cooling: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("1 in cooldown"), "{err}");
        // After the cooldown the address is available again.
        assert_eq!(p.assign("b".into(), 31_000).unwrap().ip, ip(11));
    }

    #[test]
    fn cooldowns_survive_a_restore() {
        let mut p: Pool<String> = Pool::new(30_000);
        p.add_eni(eni("eni-1", 1), &[ip(11), ip(12)]).unwrap();
        p.assign("a".into(), 0).unwrap();
        p.release(&"a".into(), 10_000);
        let saved = p.cooldowns(10_500);
        assert_eq!(saved, vec![(ip(11), 10_000)]);

        let mut q: Pool<String> = Pool::new(30_000);
        q.add_eni(eni("eni-1", 1), &[ip(11), ip(12)]).unwrap();
        for (ip, at) in saved {
            q.restore_cooldown(ip, at);
        }
        assert_eq!(q.assign("b".into(), 11_000).unwrap().ip, ip(12));
    }

    #[test]
    fn restore_rejects_unknown_and_double_held_addresses() {
        let mut p = seed_pool();
        p.restore("a".into(), ip(11), 7).unwrap();
        assert_eq!(p.lookup(&"a".into()).unwrap().since_ms, 7);
        assert!(matches!(
            p.restore("b".into(), ip(11), 7),
            Err(PoolError::AlreadyHeld { .. })
        ));
        assert!(matches!(
            p.restore("c".into(), ip(99), 7),
            Err(PoolError::UnknownIp { .. })
        ));
    }

    #[test]
    fn duplicate_addresses_are_refused_and_change_nothing() {
        let mut p = seed_pool();
        let err = p.add_eni(eni("eni-2", 2), &[ip(20), ip(11)]).unwrap_err();
        assert!(err.to_string().contains("172.31.1.11"), "{err}");
        assert!(!p.has_eni("eni-2"), "a refused ENI is not half-added");
        assert!(p.add_ips("eni-1", &[ip(21), ip(21)]).is_err());
        assert_eq!(p.stats(0).total, 3);
    }

    #[test]
    fn cancel_frees_without_cooldown() {
        let mut p: Pool<String> = Pool::new(30_000);
        p.add_eni(eni("eni-1", 1), &[ip(11)]).unwrap();
        let a = p.assign("a".into(), 5).unwrap();
        assert_eq!(p.cancel(&"a".into()), Some(a.clone()));
        assert_eq!(p.cancel(&"a".into()), None);
        let s = p.stats(5);
        assert_eq!((s.assigned, s.cooling, s.available), (0, 0, 1));
        assert_eq!(p.assign("b".into(), 5).unwrap().ip, a.ip);
    }

    #[test]
    fn release_of_unknown_key_is_none() {
        let mut p = seed_pool();
        assert!(p.release(&"nobody".into(), 0).is_none());
    }

    fn lost_pool() -> (Pool<String>, Assignment, Assignment) {
        let mut p: Pool<String> = Pool::new(30_000);
        p.add_eni(eni("eni-0", 0), &[ip(1), ip(2)]).unwrap();
        p.add_eni(eni("eni-1", 1), &[ip(11), ip(12), ip(13)])
            .unwrap();
        let a = p.assign("a".into(), 0).unwrap();
        let b = p.assign("b".into(), 0).unwrap();
        (p, a, b)
    }

    #[test]
    fn an_unassigned_address_is_lost_while_its_pod_holds_it() {
        let (mut p, a, _) = lost_pool();
        // eni-0 is filled first: a = .1, b = .2.
        assert_eq!(a.ip, ip(1));
        assert_eq!(p.forget_ip(ip(1), 5), Forgotten::Lost("a".into()));
        let s = p.stats(5);
        assert_eq!((s.total, s.assigned, s.lost), (4, 1, 1));
        assert!(p.lookup(&"a".into()).is_none());
        let l = p.lost_of(&"a".into()).unwrap();
        assert_eq!(
            (l.assignment.ip, l.reason, l.lost_ms),
            (ip(1), LostReason::Unassigned, 5)
        );
        // The key gets no other address, and EC2 re-listing the address does not free it.
        let err = p.assign("a".into(), 5).unwrap_err();
        assert!(matches!(err, PoolError::Lost { .. }), "{err}");
        assert!(
            err.to_string().contains("until that pod is deleted"),
            "{err}"
        );
        assert!(matches!(
            p.add_ips("eni-0", &[ip(1)]),
            Err(PoolError::Lost { .. })
        ));
        assert!(matches!(
            p.restore("c".into(), ip(1), 5),
            Err(PoolError::Lost { .. })
        ));
        // A free address EC2 no longer lists simply leaves the pool.
        assert_eq!(p.forget_ip(ip(13), 5), Forgotten::Removed);
        assert_eq!(p.forget_ip(ip(99), 5), Forgotten::NotInPool);
        assert_eq!(p.stats(5).total, 3);
        // The pod's DEL drops the address: not back to free.
        assert_eq!(p.release(&"a".into(), 6).map(|a| a.ip), Some(ip(1)));
        assert!(p.lost().is_empty());
        let s = p.stats(100_000);
        assert_eq!((s.total, s.assigned, s.available, s.lost), (3, 1, 2, 0));
        // Once no pod holds it, EC2 listing it again brings it back.
        p.add_ips("eni-0", &[ip(1)]).unwrap();
        assert_eq!(p.stats(100_000).available, 3);
    }

    #[test]
    fn a_detached_eni_leaves_with_its_free_addresses_and_its_pods_addresses_are_lost() {
        let (mut p, _, _) = lost_pool();
        let c = p.assign("c".into(), 0).unwrap();
        p.assign("d".into(), 0).unwrap();
        p.release(&"d".into(), 1);
        assert_eq!(c.eni.id, "eni-1");
        let d = p.detach_eni("eni-1", 7).unwrap();
        assert_eq!(d.info.id, "eni-1");
        assert_eq!(d.lost, vec!["c".to_string()]);
        assert_eq!(d.removed.len(), 2, "the free and the cooling address");
        assert!(!p.has_eni("eni-1"));
        assert_eq!(
            p.lost_of(&"c".into()).unwrap().reason,
            LostReason::EniDetached
        );
        let s = p.stats(100_000);
        assert_eq!(
            (s.enis, s.total, s.assigned, s.available, s.lost),
            (1, 2, 2, 0, 1)
        );
        assert!(matches!(
            p.detach_eni("eni-1", 8),
            Err(PoolError::UnknownEni(_))
        ));
        // The pod's DEL, and a failed record of it undone.
        let l = p.lost_of(&"c".into()).unwrap().clone();
        assert_eq!(p.release(&"c".into(), 9), Some(c.clone()));
        p.restore_lost("c".into(), l.clone()).unwrap();
        assert!(p.restore_lost("c".into(), l).is_err(), "already there");
        assert_eq!(p.assignments().len(), 2);
    }

    #[test]
    fn a_lost_address_listed_again_is_its_pods_on_its_own_eni_and_parked_elsewhere() {
        let (mut p, a, b) = lost_pool();
        p.forget_ip(a.ip, 1);
        p.forget_ip(b.ip, 1);
        // Someone assigns a's address to its ENI again: a's again, as before.
        assert_eq!(
            p.relist_lost("eni-0", a.ip),
            Ok(Relisted::Revived("a".into()))
        );
        assert_eq!(p.lookup(&"a".into()), Some(a.clone()));
        assert!(p.lost_of(&"a".into()).is_none());
        // EC2 gives b's address to another ENI: it takes a slot there, still lost.
        assert_eq!(
            p.relist_lost("eni-1", b.ip),
            Ok(Relisted::Parked("b".into()))
        );
        assert_eq!(
            p.lost_of(&"b".into()).unwrap().parked_on.as_deref(),
            Some("eni-1")
        );
        let u = p.usage(100_000);
        assert_eq!((u[1].total, u[1].assigned), (4, 1));
        assert!(!u[1].available.contains(&b.ip));
        assert!(matches!(
            p.assign("b".into(), 2),
            Err(PoolError::Lost { .. })
        ));
        assert!(p.relist_lost("eni-0", b.ip).is_err(), "already parked");
        assert!(p.relist_lost("eni-0", ip(13)).is_err(), "not lost");
        assert!(matches!(
            p.remove_ips("eni-1", &[b.ip], 100_000),
            Err(PoolError::Busy { .. })
        ));
        // The pod goes: the parked address cools down where it is (a failed record undone).
        let l = p.lost_of(&"b".into()).unwrap().clone();
        assert_eq!(p.release(&"b".into(), 10).map(|x| x.ip), Some(b.ip));
        p.restore_lost("b".into(), l).unwrap();
        assert_eq!(p.stats(100_000).lost, 1);
        assert!(!p.usage(100_000)[1].available.contains(&b.ip));
        p.release(&"b".into(), 10);
        let s = p.stats(20);
        assert_eq!((s.total, s.assigned, s.cooling, s.lost), (5, 1, 1, 0));
        assert!(p.usage(100_000)[1].available.contains(&b.ip));
    }

    fn prefix(third: u8) -> Ipv4Net {
        Ipv4Net::new(Ipv4Addr::new(172, 31, third, 16), 28).unwrap()
    }

    fn all_of(p: Ipv4Net) -> Vec<Ipv4Addr> {
        let all = prefix_addresses(p);
        assert_eq!(all.len(), 16);
        all
    }

    #[test]
    fn a_prefix_gives_sixteen_addresses_preferred_when_asked_and_goes_only_when_all_are_free() {
        let mut p = seed_pool();
        let pre = prefix(2);
        p.add_prefix("eni-1", pre, &all_of(pre)).unwrap();
        let s = p.stats(0);
        assert_eq!((s.total, s.prefixes, s.available), (19, 1, 19));
        let u = &p.usage(0)[1];
        assert_eq!(
            (u.slots, u.prefixes.clone(), u.free_prefixes.clone()),
            (3, vec![pre], vec![pre])
        );
        assert_eq!(u.available_secondary, vec![ip(11), ip(12)]);
        assert_eq!(p.secondary_ips_of("eni-1"), vec![ip(11), ip(12)]);
        assert_eq!(p.prefixes_of("eni-1"), vec![pre]);

        // Secondary addresses first unless prefixes are preferred; then the network address
        // of the prefix is a pod's address like any other.
        assert_eq!(p.assign("a".into(), 0).unwrap().ip, ip(1));
        p.set_prefer_prefixes(true);
        let b = p.assign("b".into(), 0).unwrap();
        assert_eq!((b.ip, b.eni.id.as_str()), (pre.network(), "eni-1"));
        assert_eq!(p.usage(0)[1].free_prefixes, Vec::<Ipv4Net>::new());

        // Held, then cooling: the prefix stays; its addresses never go alone.
        let busy = p.remove_prefixes("eni-1", &[pre], 0).unwrap_err();
        assert!(
            busy.to_string()
                .contains("1 addresses held or cooling down"),
            "{busy}"
        );
        let alone = p.remove_ips("eni-1", &[pre.network()], 0).unwrap_err();
        assert!(matches!(alone, PoolError::InPrefix { .. }), "{alone}");
        p.release(&"b".to_string(), 1_000);
        assert!(p.remove_prefixes("eni-1", &[pre], 30_999).is_err());
        p.remove_prefixes("eni-1", &[pre], 31_000).unwrap();
        assert_eq!(p.stats(31_000).prefixes, 0);
        assert_eq!(p.ips_of("eni-1"), vec![ip(11), ip(12)]);
    }

    #[test]
    fn overlapping_prefixes_and_foreign_addresses_are_refused() {
        let mut p = seed_pool();
        p.add_prefix("eni-1", prefix(2), &all_of(prefix(2)))
            .unwrap();
        let again = p.add_prefix("eni-0", prefix(2), &[]).unwrap_err();
        assert!(
            again.to_string().contains("overlaps 172.31.2.16/28"),
            "{again}"
        );
        let wide = Ipv4Net::new(Ipv4Addr::new(172, 31, 2, 0), 24).unwrap();
        assert!(p.add_prefix("eni-0", wide, &[]).is_err());
        // A prefix over an address the pool has as a secondary one.
        let over = Ipv4Net::new(ip(0), 28).unwrap();
        assert!(p.add_prefix("eni-0", over, &[]).is_err());
        let outside = p.add_prefix("eni-0", prefix(3), &[ip(1)]).unwrap_err();
        assert!(matches!(outside, PoolError::UnknownIp { .. }), "{outside}");
        assert!(p.remove_prefixes("eni-0", &[prefix(2)], 0).is_err());
        assert_eq!(p.stats(0).prefixes, 1);
    }

    #[test]
    fn a_prefix_ec2_no_longer_lists_takes_its_pods_addresses_as_lost() {
        let mut p = seed_pool();
        p.set_prefer_prefixes(true);
        p.add_prefix("eni-1", prefix(2), &all_of(prefix(2)))
            .unwrap();
        let a = p.assign("a".into(), 0).unwrap();
        let out = p.forget_prefix("eni-1", prefix(2), 5).unwrap();
        assert_eq!(out.len(), 16);
        assert!(out.contains(&(a.ip, Forgotten::Lost("a".to_string()))));
        assert_eq!(
            p.lost_of(&"a".to_string()).unwrap().reason,
            LostReason::Unassigned
        );
        assert_eq!(p.ips_of("eni-1"), vec![ip(11), ip(12)]);
        // The lost address stays blocked if EC2 gives the prefix back.
        let back: Vec<Ipv4Addr> = all_of(prefix(2))
            .into_iter()
            .filter(|i| *i != a.ip)
            .collect();
        p.add_prefix("eni-1", prefix(2), &back).unwrap();
        assert!(matches!(
            p.relist_lost("eni-1", a.ip),
            Ok(Relisted::Revived(_))
        ));
        assert_eq!(p.lookup(&"a".to_string()).unwrap().ip, a.ip);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Assign(u8),
        Release(u8),
        Tick(u32),
        /// EC2 stops listing an address (someone unassigned it).
        Forget(u8),
        /// EC2 says an ENI is no longer attached.
        Detach(u8),
        /// EC2 lists an address (again) on an ENI (re-attached if it had gone); it comes back
        /// cooling down, or — lost — goes to [`Pool::relist_lost`].
        Relist(u8, u8),
        /// A prefix comes to an ENI (free, or its addresses pods hold placed as the agent
        /// does), or goes back to EC2 if it is on one.
        Prefix(u8),
    }

    const ADDRS: [u8; 7] = [1, 2, 3, 11, 12, 13, 14];

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..12).prop_map(Op::Assign),
            3 => (0u8..12).prop_map(Op::Release),
            2 => (0u32..40_000).prop_map(Op::Tick),
            1 => (0u8..7).prop_map(Op::Forget),
            1 => (0u8..2).prop_map(Op::Detach),
            1 => ((0u8..2), (0u8..7)).prop_map(|(e, i)| Op::Relist(e, i)),
            1 => (0u8..2).prop_map(Op::Prefix),
        ]
    }

    proptest! {
        /// Whatever the sequence, no address is ever held by two keys, counts add up, an
        /// address is never handed out again within its cooldown, and a lost address is never
        /// available, never on an ENI of the pool and never given to another key.
        #[test]
        fn invariants_hold(ops in proptest::collection::vec(op(), 1..200)) {
            let mut p: Pool<String> = Pool::new(30_000);
            p.add_eni(eni("eni-0", 0), &[ip(1), ip(2), ip(3)]).unwrap();
            p.add_eni(eni("eni-1", 1), &[ip(11), ip(12), ip(13), ip(14)]).unwrap();
            let mut now = 0u64;
            let mut released_at: BTreeMap<Ipv4Addr, u64> = BTreeMap::new();
            // The model of what is lost: key -> address.
            let mut lost: BTreeMap<String, Ipv4Addr> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Assign(k) => {
                        let key = format!("k{k}");
                        let had = p.lookup(&key);
                        match p.assign(key.clone(), now) {
                            Ok(a) => {
                                prop_assert!(!lost.contains_key(&key), "lost key {key} got {}", a.ip);
                                prop_assert!(!lost.values().any(|l| *l == a.ip), "lost {} handed out", a.ip);
                                if had.is_none() && let Some(at) = released_at.get(&a.ip) {
                                    prop_assert!(now - at >= 30_000, "{} reused after {} ms", a.ip, now - at);
                                }
                            }
                            Err(PoolError::Lost { ip, .. }) => {
                                prop_assert_eq!(lost.get(&key), Some(&ip));
                            }
                            Err(_) => prop_assert!(!lost.contains_key(&key)),
                        }
                    }
                    Op::Release(k) => {
                        let key = format!("k{k}");
                        let was_lost = lost.remove(&key);
                        let parked = p.lost_of(&key).and_then(|l| l.parked_on.clone());
                        if let Some(a) = p.release(&key, now) {
                            if let Some(l) = was_lost {
                                prop_assert_eq!(a.ip, l);
                                // Dropped; or, parked on an ENI, cooling down there.
                                prop_assert_eq!(p.ips_in_pool().contains(&l), parked.is_some());
                            }
                            released_at.insert(a.ip, now);
                        } else {
                            prop_assert!(was_lost.is_none());
                        }
                    }
                    Op::Tick(ms) => now += u64::from(ms),
                    Op::Forget(i) => {
                        let addr = ip(ADDRS[i as usize]);
                        let holder = p.assignments().into_iter().find(|(_, a)| a.ip == addr).map(|(k, _)| k);
                        let in_pool = p.ips_in_pool().contains(&addr);
                        match p.forget_ip(addr, now) {
                            Forgotten::Lost(k) => {
                                prop_assert_eq!(Some(&k), holder.as_ref());
                                lost.insert(k, addr);
                            }
                            Forgotten::Removed => prop_assert!(in_pool && holder.is_none()),
                            Forgotten::NotInPool => prop_assert!(!in_pool),
                        }
                    }
                    Op::Detach(e) => {
                        let id = format!("eni-{e}");
                        let holders: Vec<(String, Ipv4Addr)> = p.assignments().into_iter()
                            .filter(|(_, a)| a.eni.id == id).map(|(k, a)| (k, a.ip)).collect();
                        if let Ok(d) = p.detach_eni(&id, now) {
                            prop_assert_eq!(d.lost.len(), holders.len());
                            lost.extend(holders);
                        }
                    }
                    Op::Relist(e, i) => {
                        let id = format!("eni-{e}");
                        if !p.has_eni(&id) {
                            p.add_eni(eni(&id, u32::from(e)), &[]).unwrap();
                        }
                        let addr = ip(ADDRS[i as usize]);
                        let r = p.add_ips(&id, &[addr]);
                        if let Some((k, _)) = lost.iter().find(|(_, l)| **l == addr) {
                            let k = k.clone();
                            prop_assert!(matches!(r, Err(PoolError::Lost { .. })), "lost {addr} re-added: {r:?}");
                            let from = p.lost_of(&k).unwrap().assignment.eni.id.clone();
                            match p.relist_lost(&id, addr) {
                                Ok(Relisted::Revived(rk)) => {
                                    prop_assert_eq!(&rk, &k);
                                    prop_assert_eq!(&from, &id);
                                    prop_assert_eq!(p.lookup(&k).map(|a| a.ip), Some(addr));
                                    lost.remove(&k);
                                }
                                Ok(Relisted::Parked(rk)) => {
                                    prop_assert_eq!(&rk, &k);
                                    prop_assert_ne!(&from, &id);
                                }
                                // Already on an ENI (parked).
                                Err(e) => prop_assert!(matches!(e, PoolError::DuplicateIp { .. }), "{e}"),
                            }
                        }
                        // As the agent does: an address back from outside starts a cooldown
                        // (the pool forgot any it had when the address left).
                        if r.is_ok() {
                            p.restore_cooldown(addr, now);
                        }
                    }
                    Op::Prefix(e) => {
                        let pre = prefix(2);
                        let id = format!("eni-{e}");
                        match p.enis().into_iter().find(|x| p.prefixes_of(&x.id).contains(&pre)) {
                            Some(on) => {
                                let busy = p.usage(now).iter().any(|u| u.info.id == on.id && !u.free_prefixes.contains(&pre));
                                prop_assert_eq!(p.remove_prefixes(&on.id, &[pre], now).is_err(), busy);
                            }
                            None if p.has_eni(&id) => {
                                let (held, free): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) = all_of(pre)
                                    .into_iter()
                                    .partition(|a| p.lost_holder(*a).is_some());
                                p.add_prefix(&id, pre, &free).unwrap();
                                for a in held {
                                    if let Ok(Relisted::Revived(k)) = p.relist_lost(&id, a) {
                                        lost.remove(&k);
                                    }
                                }
                                // As the agent does with what EC2 gives: a cooldown first.
                                for a in free {
                                    p.restore_cooldown(a, now);
                                }
                            }
                            None => {}
                        }
                    }
                }
                let all = p.assignments();
                let mut ips: Vec<_> = all.iter().map(|(_, a)| a.ip).collect();
                ips.sort();
                ips.dedup();
                prop_assert_eq!(ips.len(), all.len());
                let s = p.stats(now);
                prop_assert_eq!(s.assigned + s.cooling + s.available, s.total);
                let parked = p.lost().iter().filter(|(_, l)| l.parked_on.is_some()).count();
                prop_assert_eq!(s.assigned, all.len() + parked);
                prop_assert_eq!(s.total, p.ips_in_pool().len());
                // The pool's lost addresses are exactly the model's.
                let pool_lost: BTreeMap<String, Ipv4Addr> =
                    p.lost().into_iter().map(|(k, l)| (k, l.assignment.ip)).collect();
                prop_assert_eq!(&pool_lost, &lost);
                prop_assert_eq!(s.lost, lost.len());
                let available: Vec<Ipv4Addr> =
                    p.usage(now).into_iter().flat_map(|u| u.available).collect();
                for (k, l) in &lost {
                    prop_assert!(!available.contains(l), "lost {l} is available");
                    let parked_on = p.lost_of(k).unwrap().parked_on.clone();
                    let on: Vec<String> = p.enis().into_iter()
                        .filter(|e| p.ips_of(&e.id).contains(l)).map(|e| e.id).collect();
                    prop_assert_eq!(on, parked_on.into_iter().collect::<Vec<_>>(), "lost {} is on an ENI other than where it is parked", l);
                    prop_assert!(p.lookup(k).is_none(), "lost key {k} holds an address");
                }
            }
        }
    }

    impl Pool<String> {
        /// Every address on the pool's ENIs, whatever its state.
        fn ips_in_pool(&self) -> Vec<Ipv4Addr> {
            self.enis()
                .iter()
                .flat_map(|e| self.ips_of(&e.id))
                .collect()
        }
    }
}
