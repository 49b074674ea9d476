//! The node's address pool: ENIs, their secondary IPv4 addresses, and who holds which.
//!
//! Pure logic, no I/O and no clock: every time-dependent call takes `now` (milliseconds since
//! the Unix epoch), so the behaviour is reproducible in tests.
//!
//! Rules that differ from the reference implementation on purpose:
//! - an address in cooldown is *not* available (aws-vpc-cni counts it as available, #2896);
//! - cooldowns are part of the state that is persisted and restored (#1127);
//! - a new pod goes to the fullest ENI that still has an available address, so that pods
//!   concentrate and surplus ENIs become empty and can be released.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

pub mod planner;

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
    Assigned { key: K, since_ms: u64 },
    Cooling { released_ms: u64 },
}

#[derive(Debug, Clone)]
struct Eni<K> {
    info: EniInfo,
    ips: BTreeMap<Ipv4Addr, Slot<K>>,
}

impl<K> Eni<K> {
    fn assigned(&self) -> usize {
        self.ips
            .values()
            .filter(|s| matches!(s, Slot::Assigned { .. }))
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
    pub total: usize,
    pub assigned: usize,
    pub cooling: usize,
    /// Free and out of cooldown.
    pub available: Vec<Ipv4Addr>,
}

/// Counts at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub enis: usize,
    pub total: usize,
    pub assigned: usize,
    pub cooling: usize,
    /// Free and out of cooldown: what the next ADD can get.
    pub available: usize,
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
}

/// The pool. `K` identifies an attachment (the CNI's network, container id and ifname).
#[derive(Debug, Clone)]
pub struct Pool<K> {
    enis: BTreeMap<String, Eni<K>>,
    by_key: BTreeMap<K, Ipv4Addr>,
    cooldown_ms: u64,
}

impl<K: Ord + Clone + fmt::Display> Pool<K> {
    pub fn new(cooldown_ms: u64) -> Self {
        Pool {
            enis: BTreeMap::new(),
            by_key: BTreeMap::new(),
            cooldown_ms,
        }
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

    /// Refuses addresses already in the pool, or listed twice.
    fn check_new_ips(&self, ips: &[Ipv4Addr]) -> Result<(), PoolError> {
        for (i, ip) in ips.iter().enumerate() {
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

    fn eni_of(&self, ip: Ipv4Addr) -> Option<&Eni<K>> {
        self.enis.values().find(|e| e.ips.contains_key(&ip))
    }

    fn is_available(&self, slot: &Slot<K>, now_ms: u64) -> bool {
        match slot {
            Slot::Free => true,
            Slot::Assigned { .. } => false,
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
    pub fn assign(&mut self, key: K, now_ms: u64) -> Result<Assignment, PoolError> {
        if let Some(a) = self.lookup(&key) {
            return Ok(a);
        }
        let choice = self
            .enis
            .values()
            .filter_map(|eni| {
                let ip = eni
                    .ips
                    .iter()
                    .find(|(_, s)| self.is_available(s, now_ms))
                    .map(|(ip, _)| *ip)?;
                Some((
                    eni.assigned(),
                    eni.info.device_number,
                    eni.info.id.clone(),
                    ip,
                ))
            })
            .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        let Some((_, _, eni_id, ip)) = choice else {
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
    pub fn release(&mut self, key: &K, now_ms: u64) -> Option<Assignment> {
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

    /// Every assignment, in key order.
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
                };
                for (ip, slot) in &e.ips {
                    match slot {
                        Slot::Assigned { .. } => u.assigned += 1,
                        _ if self.is_available(slot, now_ms) => u.available.push(*ip),
                        _ => u.cooling += 1,
                    }
                }
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

    /// Forgets an address that EC2 says is gone, whoever held it. Returns the key that held
    /// it, if any (the caller must tell that pod's owner).
    pub fn forget_ip(&mut self, ip: Ipv4Addr) -> Option<K> {
        for eni in self.enis.values_mut() {
            if let Some(slot) = eni.ips.remove(&ip) {
                if let Slot::Assigned { key, .. } = slot {
                    self.by_key.remove(&key);
                    return Some(key);
                }
                return None;
            }
        }
        None
    }

    pub fn has_eni(&self, eni_id: &str) -> bool {
        self.enis.contains_key(eni_id)
    }

    /// The secondary addresses the pool holds on `eni_id` (any state).
    pub fn ips_of(&self, eni_id: &str) -> Vec<Ipv4Addr> {
        self.enis
            .get(eni_id)
            .map(|e| e.ips.keys().copied().collect())
            .unwrap_or_default()
    }

    pub fn stats(&self, now_ms: u64) -> Stats {
        let mut s = Stats {
            enis: self.enis.len(),
            ..Stats::default()
        };
        for slot in self.enis.values().flat_map(|e| e.ips.values()) {
            s.total += 1;
            match slot {
                Slot::Assigned { .. } => s.assigned += 1,
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

    #[derive(Debug, Clone)]
    enum Op {
        Assign(u8),
        Release(u8),
        Tick(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..12).prop_map(Op::Assign),
            (0u8..12).prop_map(Op::Release),
            (0u32..40_000).prop_map(Op::Tick),
        ]
    }

    proptest! {
        /// Whatever the sequence, no address is ever held by two keys, counts add up, and an
        /// address is never handed out again within its cooldown.
        #[test]
        fn invariants_hold(ops in proptest::collection::vec(op(), 1..200)) {
            let mut p: Pool<String> = Pool::new(30_000);
            p.add_eni(eni("eni-0", 0), &[ip(1), ip(2), ip(3)]).unwrap();
            p.add_eni(eni("eni-1", 1), &[ip(11), ip(12), ip(13), ip(14)]).unwrap();
            let mut now = 0u64;
            let mut released_at: BTreeMap<Ipv4Addr, u64> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Assign(k) => {
                        let key = format!("k{k}");
                        let had = p.lookup(&key);
                        if let Ok(a) = p.assign(key, now)
                            && had.is_none()
                            && let Some(at) = released_at.get(&a.ip)
                        {
                            prop_assert!(now - at >= 30_000, "{} reused after {} ms", a.ip, now - at);
                        }
                    }
                    Op::Release(k) => {
                        if let Some(a) = p.release(&format!("k{k}"), now) {
                            released_at.insert(a.ip, now);
                        }
                    }
                    Op::Tick(ms) => now += u64::from(ms),
                }
                let all = p.assignments();
                let mut ips: Vec<_> = all.iter().map(|(_, a)| a.ip).collect();
                ips.sort();
                ips.dedup();
                prop_assert_eq!(ips.len(), all.len());
                let s = p.stats(now);
                prop_assert_eq!(s.total, 7);
                prop_assert_eq!(s.assigned + s.cooling + s.available, s.total);
                prop_assert_eq!(s.assigned, all.len());
            }
        }
    }
}
