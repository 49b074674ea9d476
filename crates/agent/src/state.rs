//! The agent's allocation state: the pool, who holds what, and the checkpoint that makes it
//! survive restarts. Every change is written to the checkpoint before it is answered; a change
//! whose checkpoint write fails is rolled back and reported (code 5, I/O failure): a full or
//! read-only disk fails ADDs instead of handing out addresses the agent could not remember.
//!
//! Times (`now`) come from [`Clock`]: monotonic within the process, carried exactly across a
//! restart within one boot, so a wall-clock step neither shortens nor stretches a cooldown.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ipam::{Assignment, Pool, PoolError};
use ipnet::Ipv4Net;
use proto::{Allocation, AttachmentKey, PodRef, Request, Response, StatusReply};
use tracing::{info, warn};

use crate::checkpoint::{
    self, AllocationMetadata, AllocationRecord, Checkpoint, CooldownRecord, EniRecord, IntentRecord,
};
use crate::clock::{CarryKind, Clock};

/// Network name of the allocations rebuilt from the node (a pod found wired to an address no
/// checkpoint record holds). Not a valid CNI network name (`:`), so no runtime's GC of a real
/// network ever lists or releases them; the container id is the pod's host veth and the
/// interface name is the address (`vpc-cni:rebuilt/eni0123456789a/10.0.1.5`).
pub const REBUILT_NETWORK: &str = "vpc-cni:rebuilt";

/// The key an address found wired to `veth` is held under until its pod goes.
pub fn rebuilt_key(ip: Ipv4Addr, veth: &str) -> AttachmentKey {
    AttachmentKey {
        network: REBUILT_NETWORK.to_string(),
        container_id: veth.to_string(),
        ifname: ip.to_string(),
    }
}

/// CNI error codes the agent answers with (the plugin passes them through).
pub mod code {
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const IO_FAILURE: u32 = 5;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The spec's generic failure (CHECK of a pod whose address EC2 took away).
    pub const INTERNAL: u32 = 999;
}

/// What the provisioner's reconciles with EC2 found changed outside the agent, since start.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Drift {
    /// Pods' addresses lost, by reason (`ipam::LostReason::label`).
    pub lost: BTreeMap<&'static str, u64>,
    /// Free or cooling addresses EC2 no longer listed (removed from the pool).
    pub removed_free: u64,
    /// ENIs no longer attached (removed from the pool).
    pub enis_detached: u64,
    /// Addresses EC2 listed on a pool ENI that the pool lacked (taken into the pool).
    pub adopted: u64,
    /// Lost addresses EC2 listed on a pool ENI again: their pod's again (on their own ENI)
    /// or parked (on another, still lost).
    pub relisted: u64,
    /// Reconciles done, and the last one's outcome (`None` while none has finished).
    pub reconciles: u64,
    pub last_reconcile_ms: Option<u64>,
    pub last_reconcile_error: Option<String>,
}

/// What [`OnAssigned`] calls: the pod and its new address.
pub type AssignedFn = dyn Fn(&PodRef, Ipv4Addr) + Send;

/// A callback told of each pod given an address (it must not block: the ADD waits).
pub struct OnAssigned(pub Box<AssignedFn>);

impl std::fmt::Debug for OnAssigned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnAssigned")
    }
}

/// The wall clock in Unix milliseconds (for display; the pool's times come from [`Clock`]).
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
    clock: Clock,
    /// Checkpoint writes that failed since start.
    write_failures: AtomicU64,
    /// Allocations restored at start that no pod was wired to yet but too young to prune:
    /// their ADD may have been cut off by this agent's restart (the plugin failed, and the
    /// runtime's DEL tore down nothing while the agent was down). Released once they are old
    /// enough and still unwired ([`State::release_unconfirmed`]). Also the checkpoint's
    /// allocations on no ENI (orphans) that no pod was wired to at start: their DEL may have
    /// come while the agent was down, and will not come again.
    pub unconfirmed: BTreeMap<AttachmentKey, Ipv4Addr>,
    /// When the unconfirmed set was taken (the agent's clock): an orphan's age.
    unconfirmed_since_ms: u64,
    /// Why this process rebuilt its allocations from the node at start (`corrupt`,
    /// `truncated`, `empty`, `version`, `missing`), if it did.
    pub recovered_from: Option<&'static str>,
    /// Woken when a DEL or GC may have removed a pod held under a rebuilt key: the agent then
    /// looks at the node again (`crate::recovery::watch_rebuilt`).
    pub rescan: Option<Arc<tokio::sync::Notify>>,
    /// ENI operations in flight (persisted; see [`IntentRecord`]).
    pub intents: BTreeMap<String, IntentRecord>,
    /// Creation time of ENIs the agent attached.
    pub eni_created: BTreeMap<String, u64>,
    /// ADDs that found no address since the provisioner last caught up.
    pub pending: u32,
    /// Why the provisioner cannot add addresses right now (node at its limit, subnet full…),
    /// shown in ADD errors.
    pub blocker: Option<String>,
    /// The blocker's kind, in CamelCase (the reason of the node event that tells it).
    pub blocker_reason: Option<&'static str>,
    /// Wakes the provisioner when an ADD finds no address.
    pub wake: Option<std::sync::Arc<tokio::sync::Notify>>,
    /// The most addresses the node can hold, and the message that says so (set when the
    /// agent provisions through EC2).
    pub capacity: Option<(u32, String)>,
    /// The node's max pods and the message that says so: an ADD beyond it is refused, however
    /// many addresses the pool holds (prefixes come 16 at a time).
    pub max_pods: Option<(u32, String)>,
    /// Prefix delegation: fallbacks to secondary IPs since start (EC2 had no free /28), and
    /// how many ENIs (or new ENIs) are in one now.
    pub prefix_fallbacks: u64,
    pub prefix_fallback_active: usize,
    /// Told of each pod given an address (`ANNOTATE_POD_IP`: the pod IP annotation).
    pub on_assigned: Option<OnAssigned>,
    /// Cached instance-type limits (persisted).
    pub instance_limits: Option<crate::checkpoint::InstanceLimitsRecord>,
    /// Changes outside the agent that the provisioner's reconciles found.
    pub drift: Drift,
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
            clock: Clock::system(),
            write_failures: AtomicU64::new(0),
            unconfirmed: BTreeMap::new(),
            unconfirmed_since_ms: 0,
            recovered_from: None,
            rescan: None,
            intents: BTreeMap::new(),
            eni_created: BTreeMap::new(),
            pending: 0,
            blocker: None,
            blocker_reason: None,
            on_assigned: None,
            wake: None,
            capacity: None,
            max_pods: None,
            prefix_fallbacks: 0,
            prefix_fallback_active: 0,
            instance_limits: None,
            drift: Drift::default(),
        }
    }

    /// Sets (or clears) why the provisioner cannot add addresses: `(reason, message)`.
    pub fn set_blocker(&mut self, b: Option<(&'static str, String)>) {
        (self.blocker_reason, self.blocker) = match b {
            Some((r, m)) => (Some(r), Some(m)),
            None => (None, None),
        };
    }

    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    pub fn pool_mut(&mut self) -> &mut Pool<AttachmentKey> {
        &mut self.pool
    }

    #[cfg(test)]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Checkpoint writes that failed since start.
    pub fn write_failures(&self) -> u64 {
        self.write_failures.load(Ordering::Relaxed)
    }

    pub fn pool(&self) -> &Pool<AttachmentKey> {
        &self.pool
    }

    /// The pod an attachment belongs to, as its ADD named it.
    pub fn pod(&self, key: &AttachmentKey) -> Option<&PodRef> {
        self.pods.get(key)
    }

    /// An address a checkpoint record holds that was on no ENI at start, which EC2 now lists
    /// on a pool ENI (the caller has added it to the pool): the record's pod holds it again,
    /// as a start would have it. Returns the key.
    pub fn orphan_listed(&mut self, ip: Ipv4Addr) -> Option<AttachmentKey> {
        let key = self
            .orphans
            .iter()
            .find(|(_, r)| r.ipv4 == ip)
            .map(|(k, _)| k.clone())?;
        self.pool.restore(key.clone(), ip, self.clock.now()).ok()?;
        let rec = self.orphans.remove(&key)?;
        self.pods.insert(
            key.clone(),
            PodRef {
                namespace: rec.metadata.k8s_pod_namespace,
                name: rec.metadata.k8s_pod_name,
                infra_container_id: None,
            },
        );
        Some(key)
    }

    /// Addresses pods hold that EC2 took away: lost by a reconcile (with the reason; parked
    /// on another ENI when EC2 lists it there again), or restored from the checkpoint onto no
    /// ENI (`None`: the agent restarted since).
    pub fn lost(&self) -> Vec<(AttachmentKey, Ipv4Addr, Option<ipam::Lost>)> {
        self.pool
            .lost()
            .into_iter()
            .map(|(k, l)| (k, l.assignment.ip, Some(l)))
            .chain(self.orphans.iter().map(|(k, r)| (k.clone(), r.ipv4, None)))
            .collect()
    }

    /// Restores allocations and cooldowns from a checkpoint, carrying its times onto this
    /// process's clock (see `crate::clock`). Returns one warning per record that could not be
    /// placed in the pool, and how the times were carried.
    pub fn restore(&mut self, cp: &Checkpoint) -> Restored {
        let carry = self.clock.carry(cp.clock.as_ref());
        let mut warnings = Vec::new();
        for rec in &cp.allocations {
            let key = AttachmentKey {
                network: rec.network_name.clone(),
                container_id: rec.container_id.clone(),
                ifname: rec.if_name.clone(),
            };
            let since_ms = carry.map((rec.allocation_timestamp.max(0) / 1_000_000) as u64);
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
            self.pool.restore_cooldown(c.ipv4, carry.map(c.released_ms));
        }
        self.intents = cp
            .intents
            .iter()
            .map(|i| {
                let mut i = i.clone();
                i.started_ms = carry.map(i.started_ms);
                (i.id.clone(), i)
            })
            .collect();
        self.eni_created = cp
            .enis
            .iter()
            .map(|e| (e.id.clone(), carry.map(e.created_ms)))
            .collect();
        self.instance_limits = cp.instance_limits.clone();
        Restored {
            warnings,
            carry: carry.how,
        }
    }

    /// Holds every address a pod on this node is wired to (`wired`: address → host veth)
    /// that no allocation holds yet, under [`rebuilt_key`], so no ADD can hand it out again.
    /// Addresses the pool does not have (not on this node's ENIs as EC2 or IMDS list them)
    /// cannot be handed out anyway; they are returned for the log.
    pub fn hold_wired(&mut self, wired: &BTreeMap<Ipv4Addr, String>) -> HeldWired {
        let now = self.clock.now();
        let held: BTreeSet<Ipv4Addr> = self
            .pool
            .assignments()
            .into_iter()
            .map(|(_, a)| a.ip)
            .chain(self.orphans.values().map(|r| r.ipv4))
            .chain(self.pool.lost().into_iter().map(|(_, l)| l.assignment.ip))
            .collect();
        let mut out = HeldWired::default();
        for (ip, veth) in wired {
            if held.contains(ip) {
                continue;
            }
            let key = rebuilt_key(*ip, veth);
            match self.pool.restore(key.clone(), *ip, now) {
                Ok(_) => {
                    self.pods.insert(key.clone(), PodRef::default());
                    out.rebuilt.push((key, *ip));
                }
                Err(_) => out.outside.push((*ip, veth.clone())),
            }
        }
        out
    }

    /// Allocations held under rebuilt keys (lost ones included: their pod's DEL never names
    /// the key either).
    pub fn rebuilt(&self) -> Vec<(AttachmentKey, Ipv4Addr)> {
        self.pool
            .assignments()
            .into_iter()
            .chain(self.pool.lost().into_iter().map(|(k, l)| (k, l.assignment)))
            .filter(|(k, _)| k.network == REBUILT_NETWORK)
            .map(|(k, a)| (k, a.ip))
            .collect()
    }

    /// Starts a cooldown now for every free address; returns how many. For a start whose
    /// checkpoint (and so its cooldowns) was lost: any free address may have been released a
    /// moment before, and other nodes may still send to its old pod.
    pub fn cool_all_free(&mut self) -> usize {
        let now = self.clock.now();
        let free: Vec<Ipv4Addr> = self
            .pool
            .usage(now)
            .into_iter()
            .flat_map(|u| u.available)
            .collect();
        for ip in &free {
            self.pool.restore_cooldown(*ip, now);
        }
        free.len()
    }

    /// Releases (into cooldown) the rebuilt allocations whose address no pod is wired to any
    /// more: the runtime's DEL of such a pod finds no attachment here (its container id is
    /// unknown), and the plugin then tears the pod down from its prevResult and host veth.
    pub fn release_unwired_rebuilt(
        &mut self,
        wired: &BTreeSet<Ipv4Addr>,
    ) -> Vec<(AttachmentKey, Ipv4Addr)> {
        let now = self.clock.now();
        let gone: Vec<(AttachmentKey, Ipv4Addr)> = self
            .rebuilt()
            .into_iter()
            .filter(|(_, ip)| !wired.contains(ip))
            .collect();
        for (key, _) in &gone {
            self.pool.release(key, now);
            self.pods.remove(key);
        }
        if !gone.is_empty()
            && let Err(e) = self.save()
        {
            warn!("writing the checkpoint after releasing rebuilt allocations: {e}");
        }
        gone
    }

    fn wake_rescan(&self) {
        if let Some(n) = &self.rescan
            && !self.rebuilt().is_empty()
        {
            n.notify_one();
        }
    }

    /// Releases allocations whose address no pod on this node is wired to (no host route),
    /// e.g. because the runtime's DEL ran while the agent was down and tore the pod down from
    /// its prevResult. Allocations younger than `min_age_ms` are kept: their ADD may still be
    /// wiring the pod; they are remembered in [`State::unconfirmed`]. Returns what was
    /// released.
    pub fn prune_unwired(
        &mut self,
        wired: &std::collections::BTreeSet<Ipv4Addr>,
        min_age_ms: u64,
    ) -> Vec<(AttachmentKey, Ipv4Addr)> {
        let now = self.clock.now();
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
        self.unconfirmed = self
            .pool
            .assignments()
            .into_iter()
            .map(|(k, a)| (k, a.ip))
            .chain(self.orphans.iter().map(|(k, r)| (k.clone(), r.ipv4)))
            .filter(|(_, ip)| !wired.contains(ip))
            .collect();
        self.unconfirmed_since_ms = now;
        if !stale.is_empty()
            && let Err(e) = self.save()
        {
            warn!("writing the checkpoint after pruning: {e}");
        }
        stale
    }

    /// Looks again at the [`unconfirmed`](State::unconfirmed) allocations: one whose pod is
    /// now wired, or that a DEL released, is forgotten; one still unwired at `min_age_ms` is
    /// released (its ADD never finished), also if its address was lost since. Returns what was
    /// released.
    pub fn release_unconfirmed(
        &mut self,
        wired: &BTreeSet<Ipv4Addr>,
        min_age_ms: u64,
    ) -> Vec<(AttachmentKey, Ipv4Addr)> {
        let now = self.clock.now();
        let mut released = Vec::new();
        let pool = &mut self.pool;
        let orphans = &mut self.orphans;
        let orphan_age = now.saturating_sub(self.unconfirmed_since_ms);
        // Held, or lost since (its ENI detached, its address unassigned): still never wired.
        let held = |pool: &Pool<AttachmentKey>, key: &AttachmentKey| {
            pool.lookup(key)
                .or_else(|| pool.lost_of(key).map(|l| l.assignment.clone()))
        };
        self.unconfirmed.retain(|key, ip| {
            if wired.contains(ip) {
                return false;
            }
            match held(pool, key) {
                Some(a) if a.ip == *ip => {
                    if now.saturating_sub(a.since_ms) < min_age_ms {
                        return true;
                    }
                    pool.release(key, now);
                    released.push((key.clone(), *ip));
                    false
                }
                Some(_) => false,
                // An orphan (its address on no ENI): nothing to release in the pool, the
                // record goes.
                None => match orphans.get(key) {
                    Some(r) if r.ipv4 == *ip && orphan_age < min_age_ms => true,
                    Some(r) if r.ipv4 == *ip => {
                        orphans.remove(key);
                        released.push((key.clone(), *ip));
                        false
                    }
                    _ => false,
                },
            }
        });
        for (key, _) in &released {
            self.pods.remove(key);
        }
        if !released.is_empty()
            && let Err(e) = self.save()
        {
            warn!("writing the checkpoint after releasing unfinished ADDs: {e}");
        }
        released
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
                        interfaces_count: 1,
                    },
                }
            })
            .collect();
        // Lost addresses stay recorded until their pod goes: after a restart they are on no
        // ENI of the pool, so they come back as orphans, still blocked.
        allocations.extend(self.pool.lost().into_iter().map(|(key, l)| {
            let pod = self.pods.get(&key).cloned().unwrap_or_default();
            AllocationRecord {
                network_name: key.network,
                container_id: key.container_id,
                if_name: key.ifname,
                ipv4: l.assignment.ip,
                allocation_timestamp: (l.assignment.since_ms as i64).saturating_mul(1_000_000),
                metadata: AllocationMetadata {
                    k8s_pod_namespace: pod.namespace,
                    k8s_pod_name: pod.name,
                    interfaces_count: 1,
                },
            }
        }));
        allocations.extend(self.orphans.values().cloned());
        Checkpoint {
            allocations,
            cooldowns: self
                .pool
                .cooldowns(self.clock.now())
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
            clock: Some(self.clock.record()),
            ..Checkpoint::default()
        }
    }

    /// Writes the checkpoint now (after a change the caller made).
    pub fn save(&self) -> Result<(), checkpoint::CheckpointError> {
        let r = checkpoint::store(&self.checkpoint, &self.snapshot());
        if r.is_err() {
            self.write_failures.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Writes the checkpoint for a request's change; `undone` says what the caller undoes on
    /// failure (the answer the runtime sees).
    fn persist(&self, undone: &str) -> Result<(), Response> {
        self.save().map_err(|e| {
            warn!("{undone}: {e}");
            Response::Error {
                code: code::IO_FAILURE,
                message: format!(
                    "{undone}: {e}; the agent hands out and releases only what it can record: free space on (or make writable) the file system of {}, then retry",
                    self.checkpoint.display()
                ),
            }
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

    /// The key under which `key`'s attachment is held: `key` itself, else the one attachment
    /// with the same container id and interface whatever its network name. A node adopted from
    /// aws-node holds its pods under `aws-cni`, and a runtime may release them under either
    /// name (after a rollback, aws-node sees ours under `vpc-cni`).
    fn resolve(&self, key: &AttachmentKey) -> AttachmentKey {
        if self.pool.lookup(key).is_some()
            || self.pool.lost_of(key).is_some()
            || self.orphans.contains_key(key)
        {
            return key.clone();
        }
        let same = |k: &AttachmentKey| k.container_id == key.container_id && k.ifname == key.ifname;
        self.pool
            .assignments()
            .into_iter()
            .map(|(k, _)| k)
            .chain(self.pool.lost().into_iter().map(|(k, _)| k))
            .chain(self.orphans.keys().cloned())
            .find(same)
            .unwrap_or_else(|| key.clone())
    }

    /// Every assigned address with the route table of its ENI (for moving pods between
    /// aws-node's layout and ours).
    pub fn assigned_routes(&self) -> Vec<(Ipv4Addr, u32)> {
        self.pool
            .assignments()
            .into_iter()
            .map(|(_, a)| (a.ip, dataplane::route_table_for_device(a.eni.device_number)))
            .collect()
    }

    pub fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Add { key, pod, netns: _ } => self.add(key, pod),
            Request::Del { key } => {
                let key = self.resolve(&key);
                self.del(&key)
            }
            Request::Check { key } => match self.pool.lookup(&self.resolve(&key)) {
                Some(a) => Response::Checked {
                    allocation: self.allocation(&a),
                },
                None if let Some(l) = self.pool.lost_of(&self.resolve(&key)) => Response::Error {
                    code: code::INTERNAL,
                    message: lost_message(&key, l),
                },
                None => Response::Error {
                    code: code::UNKNOWN_CONTAINER,
                    message: format!("the agent holds no address for attachment {key}"),
                },
            },
            Request::Status => {
                let s = self.pool.stats(self.clock.now());
                let rebuilt = self.rebuilt().len();
                let mut rebuilt = if rebuilt > 0 {
                    format!(" ({rebuilt} held for pods found on the node, not in the checkpoint)")
                } else {
                    String::new()
                };
                let lost = self.lost().len();
                if lost > 0 {
                    rebuilt.push_str(&format!(
                        ", {lost} lost (held by pods, taken away outside the agent)"
                    ));
                }
                Response::Status(StatusReply {
                    ready: true,
                    message: format!(
                        "{} ENIs, {} addresses: {} assigned{rebuilt}, {} available, {} cooling down",
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
        if let Some(l) = self.pool.lost_of(&key) {
            return Response::Error {
                code: code::TRY_AGAIN_LATER,
                message: lost_message(&key, l),
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
        if let Some((max, why)) = &self.max_pods
            && self.pool.holders() >= *max as usize
        {
            // At the ENIs' capacity too (secondary IPs: the same number), that says it best.
            let total = self.pool.stats(self.clock.now()).total as u32;
            let at_capacity = match &self.capacity {
                Some((cap, msg)) if total >= *cap => format!("; {msg}"),
                _ => String::new(),
            };
            return Response::Error {
                code: code::TRY_AGAIN_LATER,
                message: format!(
                    "no address for {key}: {} pods hold addresses on this node, and {why}{at_capacity}; the kubelet should not run more pods here (is its --max-pods above {max}?)",
                    self.pool.holders()
                ),
            };
        }
        let now = self.clock.now();
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
        if let Err(resp) = self.persist(&format!(
            "no address assigned to {key}: recording {} failed, so the assignment was undone",
            a.ip
        )) {
            // Roll back: the address was never handed out, so it does not cool down.
            self.pool.cancel(&key);
            self.pods.remove(&key);
            return resp;
        }
        info!(%key, pod = %format!("{}/{}", pod.namespace, pod.name), ip = %a.ip, eni = %a.eni.id, "assigned");
        if let Some(f) = &self.on_assigned
            && !pod.name.is_empty()
        {
            (f.0)(&pod, a.ip);
        }
        Response::Added {
            allocation: self.allocation(&a),
            existing: false,
        }
    }

    fn del(&mut self, key: &AttachmentKey) -> Response {
        if let Some(rec) = self.orphans.remove(key) {
            if let Err(resp) = self.persist(&format!(
                "{key} still holds {}: recording its release failed",
                rec.ipv4
            )) {
                self.orphans.insert(key.clone(), rec);
                return resp;
            }
            return Response::Deleted { released: None };
        }
        if let Some(lost) = self.pool.lost_of(key).cloned() {
            // Dropped, not released: EC2 no longer gives the node this address.
            self.pool.release(key, self.clock.now());
            let pod = self.pods.remove(key);
            if let Err(resp) = self.persist(&format!(
                "{key} still holds its lost address {}: recording its release failed",
                lost.assignment.ip
            )) {
                let _ = self.pool.restore_lost(key.clone(), lost);
                if let Some(pod) = pod {
                    self.pods.insert(key.clone(), pod);
                }
                return resp;
            }
            info!(%key, ip = %lost.assignment.ip, reason = lost.reason.label(), "released a lost address: dropped, not returned to the pool");
            return Response::Deleted {
                released: Some(self.allocation(&lost.assignment)),
            };
        }
        let Some(before) = self.pool.lookup(key) else {
            // Perhaps a pod the agent holds under a rebuilt key: look at the node again
            // once the plugin has torn it down.
            self.wake_rescan();
            return Response::Deleted { released: None };
        };
        let pod = self.pods.remove(key);
        self.pool.release(key, self.clock.now());
        if let Err(resp) = self.persist(&format!(
            "{key} still holds {}: recording its release failed",
            before.ip
        )) {
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
        self.wake_rescan();
        let stale: Vec<AttachmentKey> = self
            .pool
            .assignments()
            .into_iter()
            .map(|(k, _)| k)
            .chain(self.pool.lost().into_iter().map(|(k, _)| k))
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

/// Why `key` cannot use its address any more, and what to do.
fn lost_message(key: &AttachmentKey, l: &ipam::Lost) -> String {
    format!(
        "attachment {key} holds {} on ENI {}, which is lost: {}; the pod has no working network and the address stays blocked until the pod is deleted",
        l.assignment.ip, l.assignment.eni.id, l.reason
    )
}

/// What [`State::restore`] did.
#[derive(Debug)]
pub struct Restored {
    /// One per checkpoint record that could not be placed in the pool.
    pub warnings: Vec<String>,
    /// How the checkpoint's times were carried onto this process's clock.
    pub carry: CarryKind,
}

/// What [`State::hold_wired`] did.
#[derive(Debug, Default)]
pub struct HeldWired {
    /// Addresses now held under a rebuilt key.
    pub rebuilt: Vec<(AttachmentKey, Ipv4Addr)>,
    /// Wired addresses the pool does not have: address and host veth.
    pub outside: Vec<(Ipv4Addr, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::fake::FakeTime;
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
        .with_clock(FakeTime::new(1_000_000, 50_000, "boot-1").clock())
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
        let r = again.restore(&checkpoint::load(&dir.path().join("ipam.json")).unwrap());
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_eq!(r.carry, CarryKind::SameBoot { down_ms: 0 });
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
            prefix_capable: Some(true),
            hypervisor: Some("nitro".into()),
            vcpus: Some(2),
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
    fn del_and_check_find_an_attachment_under_another_network_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        let theirs = AttachmentKey {
            network: "aws-cni".into(),
            ..key("c1")
        };
        let ip = ip_of(&s.handle(Request::Add {
            key: theirs.clone(),
            pod: pod("a"),
            netns: "/run/netns/x".into(),
        }));
        // The runtime now knows the pod under our network name (or the other way round).
        let ours = key("c1");
        assert!(matches!(
            s.handle(Request::Check { key: ours.clone() }),
            Response::Checked { .. }
        ));
        match s.handle(Request::Del { key: ours }) {
            Response::Deleted { released: Some(a) } => assert_eq!(a.ip, ip),
            other => panic!("{other:?}"),
        }
        assert!(s.pool().assignments().is_empty());
        // Another interface of the same container is a different attachment.
        let other_if = AttachmentKey {
            ifname: "net1".into(),
            ..key("c2")
        };
        s.handle(add("c2"));
        assert!(matches!(
            s.handle(Request::Del { key: other_if }),
            Response::Deleted { released: None }
        ));
        assert_eq!(s.pool().assignments().len(), 1);
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

    /// The checkpoint cannot be written (`break_it` makes it so): ADD fails with code 5 and a
    /// message that says why, allocates nothing, and works again once the disk does.
    fn add_fails_cleanly_when(break_it: impl Fn(&std::path::Path), needle: &str) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        let kept = ip_of(&s.handle(add("kept")));
        let path = dir.path().join("ipam.json");
        let before = std::fs::read(&path).unwrap();
        break_it(dir.path());
        let r = s.handle(add("a"));
        let Response::Error { code, message } = &r else {
            panic!("{r:?}")
        };
        assert_eq!(*code, code::IO_FAILURE);
        for part in [
            "no address assigned to vpc-cni/a/eth0",
            "cannot write checkpoint",
            needle,
            "free space on (or make writable)",
        ] {
            assert!(message.contains(part), "{part:?} not in {message}");
        }
        let st = s.pool.stats(s.now());
        assert_eq!(
            (st.assigned, st.available, st.cooling),
            (1, 1, 0),
            "nothing was handed out"
        );
        assert!(s.pool.lookup(&key("a")).is_none());
        assert_eq!(s.write_failures(), 1);
        // A DEL that cannot be recorded keeps the address too.
        break_it(dir.path());
        let r = s.handle(Request::Del { key: key("kept") });
        assert!(
            matches!(&r, Response::Error { code: 5, message } if message.contains("vpc-cni/kept/eth0 still holds")),
            "{r:?}"
        );
        assert_eq!(ip_of(&s.handle(Request::Check { key: key("kept") })), kept);
        // The old checkpoint is intact.
        if path.is_file() {
            assert_eq!(std::fs::read(&path).unwrap(), before);
        }
        // Disk repaired: the next ADD gets the address the failed one would have had.
        let _ = std::fs::remove_file(dir.path().join(".ipam.json.tmp"));
        let _ = std::fs::remove_dir(dir.path().join(".ipam.json.tmp"));
        if path.is_dir() {
            std::fs::remove_dir(&path).unwrap();
        }
        let again = ip_of(&s.handle(add("a")));
        assert_ne!(again, kept);
        assert_eq!(checkpoint::load(&path).unwrap().allocations.len(), 2);
    }

    #[test]
    fn add_fails_with_a_clear_error_on_a_full_disk() {
        // The temporary file is /dev/full: every write fails with ENOSPC. (A failed write
        // removes its temporary file, so the test puts it back before each request.)
        add_fails_cleanly_when(
            |d| std::os::unix::fs::symlink("/dev/full", d.join(".ipam.json.tmp")).unwrap(),
            "No space left on device",
        );
    }

    #[test]
    fn add_fails_with_a_clear_error_when_the_file_cannot_be_replaced() {
        // A directory where the checkpoint should be: the rename fails (as on a read-only
        // or otherwise unwritable path, which root would not notice in a test).
        add_fails_cleanly_when(
            |d| {
                let p = d.join("ipam.json");
                if p.is_file() {
                    std::fs::remove_file(&p).unwrap();
                    std::fs::create_dir(&p).unwrap();
                }
            },
            "Is a directory",
        );
    }

    #[test]
    fn wall_clock_steps_neither_shorten_nor_stretch_a_cooldown() {
        const HOUR: i64 = 3_600_000;
        for step in [-HOUR, HOUR] {
            let dir = tempfile::tempdir().unwrap();
            let t = FakeTime::new(1_700_000_000_000, 9_000, "boot-1");
            let mut s = state(&dir).with_clock(t.clock());
            ip_of(&s.handle(add("a")));
            let b = ip_of(&s.handle(add("b")));
            s.handle(Request::Del { key: key("b") });
            t.advance(1_000);
            t.step_wall(step);
            // 29 s after the release b's address is still cooling…
            t.advance(28_000);
            assert!(
                matches!(s.handle(add("c")), Response::Error { code: 11, .. }),
                "step {step}: cooldown shortened"
            );
            // …and at 30 s it is free, not an hour later.
            t.advance(1_000);
            assert_eq!(
                ip_of(&s.handle(add("c"))),
                b,
                "step {step}: cooldown stretched"
            );
        }
    }

    #[test]
    fn a_restart_carries_cooldowns_across_a_wall_clock_step() {
        const HOUR: i64 = 3_600_000;
        let cooling_left = |s: &State| {
            // Milliseconds until the one cooling address is free (probed by the pool).
            let now = s.now();
            (0..=30_000u64)
                .step_by(500)
                .find(|d| s.pool.stats(now + d).cooling == 0)
                .unwrap()
        };
        for (step, reboot, left) in [
            (-HOUR, false, 20_000), // same boot: exact, whatever the wall clock did
            (HOUR, false, 20_000),
            (-HOUR, true, 30_000), // a reboot and the wall clock back: at most the period
        ] {
            let dir = tempfile::tempdir().unwrap();
            let t = FakeTime::new(1_700_000_000_000, 9_000, "boot-1");
            let mut s = state(&dir).with_clock(t.clock());
            s.handle(add("a"));
            s.handle(Request::Del { key: key("a") });
            t.advance(4_000);
            s.save().unwrap();
            // The agent is down 6 s; the wall clock is stepped meanwhile.
            t.advance(6_000);
            t.step_wall(step);
            if reboot {
                t.reboot("boot-2", 3_000);
            }
            let mut again = state(&dir).with_clock(t.clock());
            again.restore(&checkpoint::load(&dir.path().join("ipam.json")).unwrap());
            assert_eq!(cooling_left(&again), left, "step {step}, reboot {reboot}");
        }
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
    fn young_unwired_allocations_are_released_once_old_enough_unless_wired_or_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let t = FakeTime::new(1_700_000_000_000, 9_000, "boot-1");
        let mut s = state(&dir).with_clock(t.clock());
        s.pool
            .add_eni(
                EniInfo {
                    id: "eni-2".into(),
                    device_number: 2,
                    subnet: "172.31.0.0/20".parse().unwrap(),
                    primary_ip: "172.31.3.174".parse().unwrap(),
                },
                &[
                    "172.31.13.131".parse().unwrap(),
                    "172.31.11.78".parse().unwrap(),
                ],
            )
            .unwrap();
        // At start: a is wired, b's ADD was cut off by the restart, c's pod gets wired
        // later, d's DEL comes in; all too young to prune.
        let [a, b, c, d] = ["a", "b", "c", "d"].map(|k| ip_of(&s.handle(add(k))));
        let wired = std::collections::BTreeSet::from([a]);
        assert!(s.prune_unwired(&wired, 60_000).is_empty());
        assert_eq!(
            s.unconfirmed,
            BTreeMap::from([(key("b"), b), (key("c"), c), (key("d"), d)])
        );
        s.handle(Request::Del { key: key("d") });
        let wired = std::collections::BTreeSet::from([a, c]);
        // Not yet old enough: nothing released, c (now wired) and d (deleted) forgotten.
        t.advance(30_000);
        assert!(s.release_unconfirmed(&wired, 60_000).is_empty());
        assert_eq!(s.unconfirmed, BTreeMap::from([(key("b"), b)]));
        t.advance(30_000);
        assert_eq!(s.release_unconfirmed(&wired, 60_000), vec![(key("b"), b)]);
        assert!(s.unconfirmed.is_empty());
        assert!(s.pool.lookup(&key("b")).is_none());
        assert!(
            s.pool.lookup(&key("c")).is_some(),
            "a wired pod keeps its address"
        );
        let saved = checkpoint::load(&dir.path().join("ipam.json")).unwrap();
        assert_eq!(saved.allocations.len(), 2, "a and c");
    }

    #[test]
    fn a_lost_address_is_dropped_by_del_and_kept_when_that_cannot_be_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = state(&dir);
        let a = ip_of(&s.handle(add("a")));
        assert!(matches!(s.pool.forget_ip(a, 0), ipam::Forgotten::Lost(_)));
        s.save().unwrap();
        // Recorded as an allocation (a restart keeps it blocked), listed as lost.
        let saved = checkpoint::load(&dir.path().join("ipam.json")).unwrap();
        assert_eq!(saved.allocations.len(), 1);
        assert_eq!(s.lost().len(), 1);
        // A DEL that cannot be recorded keeps it lost.
        let path = s.checkpoint.clone();
        s.checkpoint = PathBuf::from("/proc/vpc-cni-cannot-write/ipam.json");
        assert!(matches!(
            s.handle(Request::Del { key: key("a") }),
            Response::Error { code: 5, .. }
        ));
        assert_eq!(s.pool.lost_of(&key("a")).unwrap().assignment.ip, a);
        s.checkpoint = path;
        match s.handle(Request::Del { key: key("a") }) {
            Response::Deleted { released: Some(al) } => assert_eq!(al.ip, a),
            other => panic!("{other:?}"),
        }
        assert!(s.lost().is_empty());
        let st = s.pool.stats(s.now());
        assert_eq!((st.total, st.available), (1, 1), "dropped, not freed");
    }

    #[test]
    fn an_orphan_no_pod_is_wired_to_is_dropped_a_minute_after_start_unless_wired() {
        let dir = tempfile::tempdir().unwrap();
        let t = FakeTime::new(1_700_000_000_000, 9_000, "boot-1");
        let mut s = state(&dir).with_clock(t.clock());
        let orphan = |c: &str, ip: &str| AllocationRecord {
            network_name: "vpc-cni".into(),
            container_id: c.into(),
            if_name: "eth0".into(),
            ipv4: ip.parse().unwrap(),
            allocation_timestamp: 0,
            metadata: AllocationMetadata::default(),
        };
        // Two allocations whose addresses are on no ENI: "gone"'s pod was deleted while the
        // agent was down (its DEL will not come again), "running"'s pod is wired.
        let cp = Checkpoint {
            allocations: vec![orphan("gone", "10.9.9.9"), orphan("running", "10.9.9.8")],
            ..Checkpoint::default()
        };
        assert_eq!(s.restore(&cp).warnings.len(), 2);
        let wired = std::collections::BTreeSet::from(["10.9.9.8".parse().unwrap()]);
        assert!(s.prune_unwired(&wired, 60_000).is_empty());
        t.advance(30_000);
        assert!(s.release_unconfirmed(&wired, 60_000).is_empty());
        t.advance(30_000);
        assert_eq!(
            s.release_unconfirmed(&wired, 60_000),
            vec![(key("gone"), "10.9.9.9".parse().unwrap())]
        );
        let saved = checkpoint::load(&dir.path().join("ipam.json")).unwrap();
        assert_eq!(
            saved
                .allocations
                .iter()
                .map(|a| a.container_id.as_str())
                .collect::<Vec<_>>(),
            ["running"],
            "the wired orphan is kept until its DEL"
        );
        assert!(s.lost().iter().all(|(k, _, _)| k.container_id != "gone"));
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
        assert_eq!(s.restore(&cp).warnings.len(), 1);
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
