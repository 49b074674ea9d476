//! The agent's allocation state: the pool, who holds what, and the checkpoint that makes it
//! survive restarts. Every change is written to the checkpoint before it is answered; a change
//! whose checkpoint write fails is rolled back and reported.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use ipam::{Assignment, Pool, PoolError};
use ipnet::Ipv4Net;
use proto::{Allocation, AttachmentKey, PodRef, Request, Response, StatusReply};
use tracing::{info, warn};

use crate::checkpoint::{
    self, AllocationMetadata, AllocationRecord, Checkpoint, CooldownRecord, EniRecord, IntentRecord,
};

/// CNI error codes the agent answers with (the plugin passes them through).
pub mod code {
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const IO_FAILURE: u32 = 5;
    pub const TRY_AGAIN_LATER: u32 = 11;
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug)]
pub struct State {
    pool: Pool<AttachmentKey>,
    pods: BTreeMap<AttachmentKey, PodRef>,
    /// Allocations from the checkpoint whose address is on no ENI we know. Kept (and
    /// persisted) so that the pod's DEL still finds them and nothing is silently forgotten.
    orphans: BTreeMap<AttachmentKey, AllocationRecord>,
    vpc_cidrs: Vec<Ipv4Net>,
    checkpoint: PathBuf,
    /// Hint appended to "no free address" errors: what the operator can do.
    exhausted_hint: String,
    clock: fn() -> u64,
    /// ENI operations in flight (persisted; see [`IntentRecord`]).
    pub intents: BTreeMap<String, IntentRecord>,
    /// Creation time of ENIs the agent attached.
    pub eni_created: BTreeMap<String, u64>,
    /// ADDs that found no address since the provisioner last caught up.
    pub pending: u32,
    /// Why the provisioner cannot add addresses right now (node at its limit, subnet full…),
    /// shown in ADD errors.
    pub blocker: Option<String>,
    /// Wakes the provisioner when an ADD finds no address.
    pub wake: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// The most addresses the node can hold, and the message that says so (set when the
    /// agent provisions through EC2).
    pub capacity: Option<(u32, String)>,
    /// Cached instance-type limits (persisted).
    pub instance_limits: Option<crate::checkpoint::InstanceLimitsRecord>,
}

impl State {
    pub fn new(
        pool: Pool<AttachmentKey>,
        vpc_cidrs: Vec<Ipv4Net>,
        checkpoint: PathBuf,
        exhausted_hint: String,
    ) -> Self {
        State {
            pool,
            pods: BTreeMap::new(),
            orphans: BTreeMap::new(),
            vpc_cidrs,
            checkpoint,
            exhausted_hint,
            clock: now_ms,
            intents: BTreeMap::new(),
            eni_created: BTreeMap::new(),
            pending: 0,
            blocker: None,
            wake: None,
            capacity: None,
            instance_limits: None,
        }
    }

    pub fn now(&self) -> u64 {
        (self.clock)()
    }

    pub fn pool_mut(&mut self) -> &mut Pool<AttachmentKey> {
        &mut self.pool
    }

    #[cfg(test)]
    fn with_clock(mut self, clock: fn() -> u64) -> Self {
        self.clock = clock;
        self
    }

    pub fn pool(&self) -> &Pool<AttachmentKey> {
        &self.pool
    }

    /// Restores allocations and cooldowns from a checkpoint. Returns one warning per record
    /// that could not be placed in the pool.
    pub fn restore(&mut self, cp: &Checkpoint) -> Vec<String> {
        let mut warnings = Vec::new();
        for rec in &cp.allocations {
            let key = AttachmentKey {
                network: rec.network_name.clone(),
                container_id: rec.container_id.clone(),
                ifname: rec.if_name.clone(),
            };
            let since_ms = (rec.allocation_timestamp.max(0) / 1_000_000) as u64;
            match self.pool.restore(key.clone(), rec.ipv4, since_ms) {
                Ok(_) => {
                    self.pods.insert(
                        key,
                        PodRef {
                            namespace: rec.metadata.k8s_pod_namespace.clone(),
                            name: rec.metadata.k8s_pod_name.clone(),
                            infra_container_id: None,
                        },
                    );
                }
                Err(e) => {
                    warnings.push(format!("checkpoint allocation {key} -> {}: {e}", rec.ipv4));
                    self.orphans.insert(key, rec.clone());
                }
            }
        }
        for c in &cp.cooldowns {
            self.pool.restore_cooldown(c.ipv4, c.released_ms);
        }
        self.intents = cp
            .intents
            .iter()
            .map(|i| (i.id.clone(), i.clone()))
            .collect();
        self.eni_created = cp
            .enis
            .iter()
            .map(|e| (e.id.clone(), e.created_ms))
            .collect();
        self.instance_limits = cp.instance_limits.clone();
        warnings
    }

    /// Releases allocations whose address no pod on this node is wired to (no host route),
    /// e.g. because the runtime's DEL ran while the agent was down and tore the pod down from
    /// its prevResult. Allocations younger than `min_age_ms` are kept: their ADD may still be
    /// wiring the pod. Returns what was released.
    pub fn prune_unwired(
        &mut self,
        wired: &std::collections::BTreeSet<Ipv4Addr>,
        min_age_ms: u64,
    ) -> Vec<(AttachmentKey, Ipv4Addr)> {
        let now = (self.clock)();
        let stale: Vec<(AttachmentKey, Ipv4Addr)> = self
            .pool
            .assignments()
            .into_iter()
            .filter(|(_, a)| !wired.contains(&a.ip) && now.saturating_sub(a.since_ms) >= min_age_ms)
            .map(|(k, a)| (k, a.ip))
            .collect();
        for (key, _) in &stale {
            self.pool.release(key, now);
            self.pods.remove(key);
        }
        if !stale.is_empty()
            && let Err(e) = self.save()
        {
            warn!("writing the checkpoint after pruning: {e}");
        }
        stale
    }

    fn snapshot(&self) -> Checkpoint {
        let mut allocations: Vec<AllocationRecord> = self
            .pool
            .assignments()
            .into_iter()
            .map(|(key, a)| {
                let pod = self.pods.get(&key).cloned().unwrap_or_default();
                AllocationRecord {
                    network_name: key.network,
                    container_id: key.container_id,
                    if_name: key.ifname,
                    ipv4: a.ip,
                    allocation_timestamp: (a.since_ms as i64).saturating_mul(1_000_000),
                    metadata: AllocationMetadata {
                        k8s_pod_namespace: pod.namespace,
                        k8s_pod_name: pod.name,
                    },
                }
            })
            .collect();
        allocations.extend(self.orphans.values().cloned());
        Checkpoint {
            allocations,
            cooldowns: self
                .pool
                .cooldowns((self.clock)())
                .into_iter()
                .map(|(ipv4, released_ms)| CooldownRecord { ipv4, released_ms })
                .collect(),
            intents: self.intents.values().cloned().collect(),
            enis: self
                .eni_created
                .iter()
                .filter(|(id, _)| self.pool.has_eni(id))
                .map(|(id, at)| EniRecord {
                    id: id.clone(),
                    created_ms: *at,
                })
                .collect(),
            instance_limits: self.instance_limits.clone(),
            ..Checkpoint::default()
        }
    }

    /// Writes the checkpoint now (after a change the caller made).
    pub fn save(&self) -> Result<(), checkpoint::CheckpointError> {
        checkpoint::store(&self.checkpoint, &self.snapshot())
    }

    fn persist(&self) -> Result<(), Response> {
        checkpoint::store(&self.checkpoint, &self.snapshot()).map_err(|e| Response::Error {
            code: code::IO_FAILURE,
            message: e.to_string(),
        })
    }

    fn allocation(&self, a: &Assignment) -> Allocation {
        Allocation {
            ip: a.ip,
            eni_id: a.eni.id.clone(),
            device_number: a.eni.device_number,
            route_table: dataplane::route_table_for_device(a.eni.device_number),
            subnet: a.eni.subnet,
            vpc_cidrs: self.vpc_cidrs.clone(),
        }
    }

    pub fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Add { key, pod, netns: _ } => self.add(key, pod),
            Request::Del { key } => self.del(&key),
            Request::Check { key } => match self.pool.lookup(&key) {
                Some(a) => Response::Checked {
                    allocation: self.allocation(&a),
                },
                None => Response::Error {
                    code: code::UNKNOWN_CONTAINER,
                    message: format!("the agent holds no address for attachment {key}"),
                },
            },
            Request::Status => {
                let s = self.pool.stats((self.clock)());
                Response::Status(StatusReply {
                    ready: true,
                    message: format!(
                        "{} ENIs, {} addresses: {} assigned, {} available, {} cooling down",
                        s.enis, s.total, s.assigned, s.available, s.cooling
                    ),
                    free_ips: s.available as u32,
                    assigned_ips: s.assigned as u32,
                })
            }
            Request::Gc { network, valid } => self.gc(&network, &valid),
        }
    }

    fn add(&mut self, key: AttachmentKey, pod: PodRef) -> Response {
        if let Some(a) = self.pool.lookup(&key) {
            return Response::Added {
                allocation: self.allocation(&a),
                existing: true,
            };
        }
        if let Some(rec) = self.orphans.get(&key) {
            return Response::Error {
                code: code::TRY_AGAIN_LATER,
                message: format!(
                    "attachment {key} holds {} from the checkpoint, but that address is on no ENI of this node; delete the pod so it can be released",
                    rec.ipv4
                ),
            };
        }
        let now = (self.clock)();
        let a = match self.pool.assign(key.clone(), now) {
            Ok(a) => a,
            Err(e @ PoolError::Exhausted { .. }) => {
                self.pending = self.pending.saturating_add(1);
                if let Some(w) = &self.wake {
                    w.notify_one();
                }
                let total = self.pool.stats(now).total as u32;
                let hint = match &self.capacity {
                    Some((cap, msg)) if total >= *cap => msg.as_str(),
                    _ => self.blocker.as_deref().unwrap_or(&self.exhausted_hint),
                };
                return Response::Error {
                    code: code::TRY_AGAIN_LATER,
                    message: format!("{e}; {hint}"),
                };
            }
            Err(e) => {
                return Response::Error {
                    code: code::TRY_AGAIN_LATER,
                    message: e.to_string(),
                };
            }
        };
        self.pods.insert(key.clone(), pod.clone());
        if let Err(resp) = self.persist() {
            // Roll back: the address was never handed out. Its slot must not stay cooling.
            self.pool.release(&key, 0);
            self.pods.remove(&key);
            return resp;
        }
        info!(%key, pod = %format!("{}/{}", pod.namespace, pod.name), ip = %a.ip, eni = %a.eni.id, "assigned");
        Response::Added {
            allocation: self.allocation(&a),
            existing: false,
        }
    }

    fn del(&mut self, key: &AttachmentKey) -> Response {
        if let Some(rec) = self.orphans.remove(key) {
            if let Err(resp) = self.persist() {
                self.orphans.insert(key.clone(), rec);
                return resp;
            }
            return Response::Deleted { released: None };
        }
        let Some(before) = self.pool.lookup(key) else {
            return Response::Deleted { released: None };
        };
        let pod = self.pods.remove(key);
        self.pool.release(key, (self.clock)());
        if let Err(resp) = self.persist() {
            // Put the assignment back exactly as it was.
            let _ = self.pool.restore(key.clone(), before.ip, before.since_ms);
            if let Some(pod) = pod {
                self.pods.insert(key.clone(), pod);
            }
            return resp;
        }
        info!(%key, ip = %before.ip, "released");
        Response::Deleted {
            released: Some(self.allocation(&before)),
        }
    }

    fn gc(&mut self, network: &str, valid: &[AttachmentKey]) -> Response {
        let stale: Vec<AttachmentKey> = self
            .pool
            .assignments()
            .into_iter()
            .map(|(k, _)| k)
            .chain(self.orphans.keys().cloned())
            .filter(|k| k.network == network && !valid.contains(k))
            .collect();
        let mut released: Vec<(AttachmentKey, Ipv4Addr)> = Vec::new();
        for key in stale {
            let ip = match self.del(&key) {
                Response::Deleted {
                    released: Some(a), ..
                } => a.ip,
                Response::Deleted { released: None } => continue,
                other => return other,
            };
            warn!(%key, %ip, "released by GC: attachment unknown to the runtime");
            released.push((key, ip));
        }
        Response::Collected { released }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipam::EniInfo;

    fn key(c: &str) -> AttachmentKey {
        AttachmentKey {
            network: "vpc-cni".into(),
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    fn pod(name: &str) -> PodRef {
        PodRef {
            namespace: "default".into(),
            name: name.into(),
            infra_container_id: None,
        }
    }

    fn add(c: &str) -> Request {
        Request::Add {
            key: key(c),
            pod: pod(c),
            netns: "/run/netns/x".into(),
        }
    }

    fn pool() -> Pool<AttachmentKey> {
        let mut p = Pool::new(30_000);
        p.add_eni(
            EniInfo {
                id: "eni-1".into(),
                device_number: 1,
                subnet: "172.31.0.0/20".parse().unwrap(),
                primary_ip: "172.31.3.173".parse().unwrap(),
            },
            &[
                "172.31.13.130".parse().unwrap(),
                "172.31.11.77".parse().unwrap(),
            ],
        )
        .unwrap();
        p
    }

    fn state(dir: &tempfile::TempDir) -> State {
        State::new(
            pool(),
            vec!["172.31.0.0/16".parse().unwrap()],
            dir.path().join("ipam.json"),
            "attach more IPs".into(),
        )
        .with_clock(|| 1_000_000)
    }

    fn ip_of(r: &Response) -> Ipv4Addr {
        match r {
            Response::Added { allocation, .. } | Response::Checked { allocation } => allocation.ip,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn add_is_idempotent_and_routes_secondary_eni_pods_via_its_table() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        let r = s.handle(add("a"));
        let Response::Added {
            allocation,
            existing: false,
        } = &r
        else {
            panic!("{r:?}")
        };
        assert_eq!(allocation.route_table, 2);
        assert_ne!(
            allocation.route_table,
            dataplane::MAIN_TABLE,
            "needs a from rule"
        );
        let again = s.handle(add("a"));
        assert_eq!(ip_of(&again), allocation.ip);
        assert!(matches!(again, Response::Added { existing: true, .. }));
    }

    #[test]
    fn restart_restores_allocations_and_cooldowns() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        let a = ip_of(&s.handle(add("a")));
        let b = ip_of(&s.handle(add("b")));
        s.handle(Request::Del { key: key("b") });

        let mut again = state(&dir);
        let warnings = again.restore(&checkpoint::load(&dir.path().join("ipam.json")).unwrap());
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(ip_of(&again.handle(Request::Check { key: key("a") })), a);
        assert_eq!(again.instance_limits, None);
        // b's address is still cooling down after the restart, so c cannot have it.
        let r = again.handle(add("c"));
        assert!(
            matches!(&r, Response::Error { code: 11, message } if message.contains("1 in cooldown") && message.contains("attach more IPs")),
            "{r:?} (b was {b})"
        );
    }

    #[test]
    fn instance_limits_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        s.instance_limits = Some(crate::checkpoint::InstanceLimitsRecord {
            instance_type: "m5.large".into(),
            max_enis: 3,
            ipv4_per_eni: 10,
        });
        s.save().unwrap();
        let mut again = state(&dir);
        again.restore(&checkpoint::load(&dir.path().join("ipam.json")).unwrap());
        assert_eq!(again.instance_limits, s.instance_limits);
    }

    #[test]
    fn unknown_attachments() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        assert_eq!(
            s.handle(Request::Del { key: key("zz") }),
            Response::Deleted { released: None }
        );
        assert!(matches!(
            s.handle(Request::Check { key: key("zz") }),
            Response::Error { code: 3, .. }
        ));
    }

    #[test]
    fn gc_releases_only_what_the_runtime_does_not_know() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        s.handle(add("keep"));
        let gone = ip_of(&s.handle(add("gone")));
        let r = s.handle(Request::Gc {
            network: "vpc-cni".into(),
            valid: vec![key("keep")],
        });
        assert_eq!(
            r,
            Response::Collected {
                released: vec![(key("gone"), gone)]
            }
        );
        assert!(matches!(
            s.handle(Request::Check { key: key("keep") }),
            Response::Checked { .. }
        ));
    }

    #[test]
    fn a_failed_checkpoint_write_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        s.checkpoint = PathBuf::from("/proc/vpc-cni-cannot-write/ipam.json");
        let r = s.handle(add("a"));
        assert!(
            matches!(&r, Response::Error { code: 5, message } if message.contains("/proc/vpc-cni-cannot-write")),
            "{r:?}"
        );
        let st = s.pool.stats(1_000_000);
        assert_eq!(
            (st.assigned, st.available),
            (0, 2),
            "nothing was handed out"
        );
    }

    #[test]
    fn allocations_without_a_wired_pod_are_pruned_unless_young() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        let a = ip_of(&s.handle(add("a")));
        let b = ip_of(&s.handle(add("b")));
        let wired = std::collections::BTreeSet::from([a]);
        // Both were assigned "now": too young to prune.
        assert!(s.prune_unwired(&wired, 60_000).is_empty());
        // With no minimum age, b (not wired) goes, a stays.
        assert_eq!(s.prune_unwired(&wired, 0), vec![(key("b"), b)]);
        assert!(matches!(
            s.handle(Request::Check { key: key("a") }),
            Response::Checked { .. }
        ));
        let saved = checkpoint::load(&dir.path().join("ipam.json")).unwrap();
        assert_eq!(saved.allocations.len(), 1);
        assert_eq!(saved.cooldowns.len(), 1, "the pruned address cools down");
    }

    #[test]
    fn orphaned_checkpoint_entries_are_kept_until_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        let cp = Checkpoint {
            allocations: vec![AllocationRecord {
                network_name: "vpc-cni".into(),
                container_id: "old".into(),
                if_name: "eth0".into(),
                ipv4: "10.9.9.9".parse().unwrap(),
                allocation_timestamp: 0,
                metadata: AllocationMetadata::default(),
            }],
            ..Checkpoint::default()
        };
        assert_eq!(s.restore(&cp).len(), 1);
        s.handle(add("a"));
        let saved = checkpoint::load(&dir.path().join("ipam.json")).unwrap();
        assert_eq!(
            saved.allocations.len(),
            2,
            "the orphan is persisted, not dropped"
        );
        assert_eq!(
            s.handle(Request::Del { key: key("old") }),
            Response::Deleted { released: None }
        );
        let saved = checkpoint::load(&dir.path().join("ipam.json")).unwrap();
        assert_eq!(saved.allocations.len(), 1);
    }
}
