//! The warm-pool provisioner: keeps the pool at its targets through EC2 (assigns and releases
//! secondary IPs and /28 prefixes; creates, attaches, detaches and deletes ENIs) as the planner
//! (`ipam::planner`) decides.
//!
//! Prefix delegation: when EC2 has no free /28 for an ENI (`InsufficientCidrBlocks`, a
//! fragmented subnet), that ENI (or new ENIs, when creating one failed so) falls back to
//! secondary addresses for [`Settings::prefix_retry`]; the agent says so once in its log and
//! in `vpccni_prefix_fallbacks_total`, then tries prefixes again. Prefixes live in EC2: after a
//! kill -9 the start-up takes whatever EC2 lists, so an interrupted assignment leaks nothing.
//!
//! Crash safety: every ENI operation is recorded as an intent in the checkpoint *before* its
//! first EC2 call, and the ENI carries the intent's id as a tag. A restart finds every intent
//! and finishes (delete) or undoes (create) it, so a kill -9 at any instant leaks no ENI.
//! ENIs tagged with this instance that are detached (leaked by an earlier life or by the
//! reference plugin) are deleted.
//!
//! The world changes under the agent: every [`Settings::reconcile_interval`] (and at once
//! after EC2 calls an ENI or address of the pool unknown) [`Provisioner::reconcile`] compares
//! the pool with EC2's description of the instance's attached ENIs — EC2, never IMDS, is the
//! truth. A pool ENI no longer attached leaves the pool; an address EC2 no longer lists
//! leaves it too; a pod's address among them is *lost* (`ipam::Lost`): reported, never handed
//! out again, dropped by its pod's DEL. The planner then sees the smaller pool and asks EC2
//! for more as usual. Should EC2 list a lost address on a pool ENI again (re-assigned, or
//! picked by EC2 for this node), it is its pod's again on its own ENI, or parked (a slot taken,
//! still lost) on another — never free while its pod lives. A difference is acted on only when a second answer (by ENI id)
//! confirms it, and not for addresses or ENIs this agent changed within
//! [`Settings::reconcile_grace`] (EC2's answers are eventually consistent).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloud::{CloudError, Filter, NetworkInterface, NewEni};
use ipam::planner::{self, Action, Ages, Demand, Limits, Targets};
use ipam::{EniInfo, Forgotten, LostReason};
use ipnet::Ipv4Net;
use proto::AttachmentKey;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::checkpoint::{IntentOp, IntentRecord};
use crate::cloud_api::Cloud;
use crate::node_net::{NodeError, NodeNet};
use crate::state::State;

pub const TAG_INSTANCE: &str = "node.k8s.amazonaws.com/instance_id";
pub const TAG_CREATED: &str = "node.k8s.amazonaws.com/createdAt";
pub const TAG_CLUSTER: &str = "cluster.k8s.amazonaws.com/name";
pub const TAG_OWNER: &str = "eks:eni:owner";
/// vpc-cni's own tag: the id of the intent that created the ENI.
pub const TAG_INTENT: &str = "vpc-cni.k8s.aws/intent";

/// What the provisioner needs to know about the node.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub instance_id: String,
    pub instance_type: String,
    pub subnet_id: String,
    pub subnet: Ipv4Net,
    pub security_groups: Vec<String>,
    /// The instance's zone: an ENIConfig's subnet must be in it.
    pub availability_zone: String,
    pub eni_mtu: u32,
    pub cluster_name: Option<String>,
    pub additional_tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub targets: Targets,
    pub limits: Limits,
    pub min_eni_age: Duration,
    /// Minimum spacing between two releases of surplus addresses (the reference's 30 s).
    pub decrease_interval: Duration,
    /// Back-off after EC2 says the subnet is out of addresses (the reference's 120 s).
    pub subnet_full_backoff: Duration,
    /// How often the pool is re-planned when nothing wakes the provisioner.
    pub interval: Duration,
    /// Device indexes of attached ENIs that are not ours ([`crate::cloud_api::unmanaged_reason`]):
    /// never used for a new ENI (and not counted in `limits.max_enis`).
    pub reserved_devices: Vec<u32>,
    /// How often the pool is compared with EC2 ([`Provisioner::reconcile`]; the reference's
    /// `nodeIPPoolReconcile` runs every 60 s).
    pub reconcile_interval: Duration,
    /// Addresses and ENIs this agent added or removed less than this long ago are left out
    /// of a reconcile: EC2's answers are eventually consistent (the reference's 60 s
    /// reconcile cooldown).
    pub reconcile_grace: Duration,
    /// How long an ENI EC2 could give no prefix (`InsufficientCidrBlocks`) gets secondary
    /// addresses before prefixes are tried again.
    pub prefix_retry: Duration,
}

/// Custom networking: the node's ENIConfig as the Kubernetes API last gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EniConfigState {
    /// Not read yet (the API server has not answered).
    Unknown,
    /// The node names this ENIConfig, and there is none of that name.
    Missing { name: String },
    Found {
        name: String,
        subnet: String,
        security_groups: Vec<String>,
    },
}

/// Where a new ENI goes: subnet and security groups.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EniTarget {
    subnet_id: String,
    subnet: Ipv4Net,
    security_groups: Vec<String>,
}

/// How long a failed reconcile waits before the next try (at most the reconcile interval).
const RECONCILE_RETRY: Duration = Duration::from_secs(15);

/// What one [`Provisioner::reconcile`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Pool ENIs EC2 no longer lists attached: removed from the pool.
    pub enis_detached: Vec<String>,
    /// Pods' addresses lost: the key, the address, why.
    pub lost: Vec<(AttachmentKey, Ipv4Addr, LostReason)>,
    /// Free or cooling addresses that left the pool with them.
    pub removed: Vec<Ipv4Addr>,
    /// Addresses EC2 lists on a pool ENI that the pool lacked: taken in, cooling down.
    pub adopted: Vec<Ipv4Addr>,
    /// Addresses pods hold that EC2 lists on a pool ENI again (see `place_held`).
    pub relisted: Vec<(AttachmentKey, Ipv4Addr)>,
    /// Differences left for a later reconcile: too recent a change of this agent's, or not
    /// confirmed by EC2's second answer.
    pub deferred: usize,
}

impl Reconciled {
    pub fn changed(&self) -> bool {
        !(self.enis_detached.is_empty()
            && self.lost.is_empty()
            && self.removed.is_empty()
            && self.adopted.is_empty()
            && self.relisted.is_empty())
    }
}

/// The pool's ENIs and their addresses against EC2's answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Drift {
    /// Pool ENIs not attached to the instance.
    gone: BTreeSet<String>,
    /// Addresses the pool has that EC2 does not list on their ENI.
    missing: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    /// Addresses EC2 lists on a pool ENI that the pool lacks.
    extra: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    /// Prefixes the pool has that EC2 does not list on their ENI.
    missing_prefixes: BTreeMap<String, BTreeSet<Ipv4Net>>,
    /// Prefixes EC2 lists on a pool ENI that the pool lacks.
    extra_prefixes: BTreeMap<String, BTreeSet<Ipv4Net>>,
}

/// What both maps hold, ENI by ENI.
fn both<T: Ord + Copy>(
    a: &BTreeMap<String, BTreeSet<T>>,
    b: &BTreeMap<String, BTreeSet<T>>,
) -> BTreeMap<String, BTreeSet<T>> {
    a.iter()
        .filter_map(|(eni, xs)| {
            let common: BTreeSet<T> = xs.intersection(b.get(eni)?).copied().collect();
            (!common.is_empty()).then(|| (eni.clone(), common))
        })
        .collect()
}

fn count<T>(m: &BTreeMap<String, BTreeSet<T>>) -> usize {
    m.values().map(BTreeSet::len).sum()
}

impl Drift {
    fn is_empty(&self) -> bool {
        self.count() == 0
    }

    fn enis(&self) -> BTreeSet<String> {
        self.gone
            .iter()
            .chain(self.missing.keys())
            .chain(self.extra.keys())
            .chain(self.missing_prefixes.keys())
            .chain(self.extra_prefixes.keys())
            .cloned()
            .collect()
    }

    fn count(&self) -> usize {
        self.gone.len()
            + count(&self.missing)
            + count(&self.extra)
            + count(&self.missing_prefixes)
            + count(&self.extra_prefixes)
    }

    /// What both answers agree on.
    fn confirmed_by(&self, again: &Drift) -> Drift {
        Drift {
            gone: self.gone.intersection(&again.gone).cloned().collect(),
            missing: both(&self.missing, &again.missing),
            extra: both(&self.extra, &again.extra),
            missing_prefixes: both(&self.missing_prefixes, &again.missing_prefixes),
            extra_prefixes: both(&self.extra_prefixes, &again.extra_prefixes),
        }
    }
}

/// One attached ENI as EC2 lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listed {
    ips: BTreeSet<Ipv4Addr>,
    prefixes: BTreeSet<Ipv4Net>,
}

/// EC2's attached ENIs of `instance` by id. ENIs being detached count as gone.
fn attached_view(listed: &[NetworkInterface], instance: &str) -> BTreeMap<String, Listed> {
    listed
        .iter()
        .filter_map(|e| {
            let a = e.attachment.as_ref()?;
            (a.instance_id == instance && !matches!(a.status.as_str(), "detaching" | "detached"))
                .then(|| {
                    (
                        e.id.clone(),
                        Listed {
                            ips: e.secondary_ips.iter().copied().collect(),
                            prefixes: e.prefixes.iter().copied().collect(),
                        },
                    )
                })
        })
        .collect()
}

/// A prefix taken into the pool ([`take_prefix`]).
struct Taken {
    /// Its addresses that are free.
    free: Vec<Ipv4Addr>,
    /// Its addresses pods hold off the pool, placed again ([`place_held`]).
    placed: Vec<(AttachmentKey, Ipv4Addr)>,
}

/// Takes a prefix EC2 gives this node into the pool on `eni`: its addresses free, but those
/// pods hold off the pool ([`held_off_pool`]), which go to [`place_held`].
fn take_prefix(st: &mut State, eni: &str, prefix: Ipv4Net) -> Result<Taken, ipam::PoolError> {
    let (free, held) = split_held(st, &ipam::prefix_addresses(prefix));
    st.pool_mut().add_prefix(eni, prefix, &free)?;
    let placed = place_held(st, eni, &held);
    Ok(Taken { free, placed })
}

/// Addresses pods hold that EC2 took away (lost, or on no ENI at start): when EC2 gives one
/// to this node again (someone re-assigned it, or EC2 picked it for a request of this node),
/// it is not free.
fn held_off_pool(st: &State) -> BTreeSet<Ipv4Addr> {
    st.lost().into_iter().map(|(_, ip, _)| ip).collect()
}

/// Splits addresses EC2 gives this node into free ones and ones pods hold
/// ([`held_off_pool`]), which go to [`place_held`] once the ENI is in the pool.
fn split_held(st: &State, ips: &[Ipv4Addr]) -> (Vec<Ipv4Addr>, Vec<Ipv4Addr>) {
    let held = held_off_pool(st);
    ips.iter().copied().partition(|ip| !held.contains(ip))
}

/// Takes addresses pods hold that EC2 lists on the pool ENI `eni` again: a lost one is its
/// pod's again on its own ENI, or parked on another ([`ipam::Pool::relist_lost`]); one a
/// checkpoint record holds is that pod's again, as at a start. Returns the keys.
fn place_held(st: &mut State, eni: &str, held: &[Ipv4Addr]) -> Vec<(AttachmentKey, Ipv4Addr)> {
    let mut out = Vec::new();
    for ip in held {
        let pod = |st: &State, k: &AttachmentKey| {
            st.pod(k)
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .unwrap_or_default()
        };
        if st.pool().lost_holder(*ip).is_some() {
            match st.pool_mut().relist_lost(eni, *ip) {
                Ok(ipam::Relisted::Revived(k)) => {
                    warn!(pod = %pod(st, &k), key = %k, %ip, %eni, "EC2 lists a lost address on its own ENI again: the pod holds it again, as before");
                    out.push((k, *ip));
                }
                Ok(ipam::Relisted::Parked(k)) => {
                    warn!(pod = %pod(st, &k), key = %k, %ip, %eni, "EC2 lists a lost address on another ENI: it takes a slot there, still lost and never handed out, until the pod is deleted");
                    out.push((k, *ip));
                }
                Err(e) => warn!(%ip, %eni, "placing a lost address EC2 lists again: {e}"),
            }
            continue;
        }
        if let Err(e) = st.pool_mut().add_ips(eni, &[*ip]) {
            warn!(%ip, %eni, "taking in an address a checkpoint record holds: {e}");
            continue;
        }
        match st.orphan_listed(*ip) {
            Some(k) => {
                warn!(pod = %pod(st, &k), key = %k, %ip, %eni, "EC2 lists an address a checkpoint record holds (on no ENI at start): the pod holds it again");
                out.push((k, *ip));
            }
            None => warn!(%ip, %eni, "an address a checkpoint record held is free again"),
        }
    }
    out
}

/// Whether an EC2 error says an ENI, attachment or address the agent named does not exist
/// (as the pool knows it): the world changed, so reconcile now.
fn names_something_unknown(e: &CloudError) -> bool {
    e.is_not_found() || e.code() == Some("InvalidParameterValue")
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{0}")]
    Cloud(#[from] CloudError),
    /// The node side of a new ENI (its interface, table, rule) could not be set up.
    #[error("setting up ENI {eni}: {source}")]
    Node { eni: String, source: NodeError },
    /// The blocking task that set up a new ENI died.
    #[error("setting up the ENI: {0}")]
    SetupTask(tokio::task::JoinError),
    /// The pool refused a change (`what` names it).
    #[error("{what}: {source}")]
    Pool {
        what: String,
        source: ipam::PoolError,
    },
    #[error("detaching ENI {eni}: still attached after 40 checks")]
    StillAttached { eni: String },
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// Custom networking: no ENI can be created where the node's ENIConfig says (`reason` is
    /// the node event's).
    #[error("{message}")]
    CustomNetworking {
        reason: &'static str,
        message: String,
    },
    /// EC2's list of the instance's attached ENIs cannot be right: it lacks the primary ENI
    /// (which cannot be detached). The pool is not changed on such an answer.
    #[error(
        "EC2 lists {listed} ENIs attached to {instance}, but not its primary ENI {primary}: not reconciling the pool on that answer"
    )]
    ImplausibleAnswer {
        instance: String,
        primary: String,
        listed: usize,
    },
}

/// Maps a pool error to [`ProvisionError::Pool`], naming the change.
fn pool(what: impl Into<String>) -> impl FnOnce(ipam::PoolError) -> ProvisionError {
    let what = what.into();
    move |source| ProvisionError::Pool { what, source }
}

/// RFC 3339 UTC, whole seconds, for the createdAt tag (`None` only past the year 9999).
fn rfc3339(ms: u64) -> Option<String> {
    let secs = i64::try_from(ms / 1000).ok()?;
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()?
        .format(&Rfc3339)
        .ok()
}

fn new_intent_id() -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("{n:016x}")
}

#[derive(Debug)]
pub struct Provisioner<C: Cloud, N: NodeNet> {
    pub cloud: Arc<C>,
    pub net: Arc<N>,
    pub state: Arc<Mutex<State>>,
    pub wake: Arc<Notify>,
    pub node: NodeIdentity,
    pub settings: Settings,
    last_decrease: Mutex<Option<Instant>>,
    subnet_full_until: Mutex<Option<Instant>>,
    /// When the next reconcile is due (tokio's clock, so tests can pause it).
    next_reconcile: Mutex<tokio::time::Instant>,
    /// Set when EC2 called something of the pool unknown: reconcile before the next step.
    reconcile_now: AtomicBool,
    /// Addresses and ENIs this agent changed, and when (see [`Settings::reconcile_grace`]).
    recent: Mutex<Recent>,
    /// Device indexes EC2 last listed for attached ENIs outside the pool: not free.
    foreign_devices: Mutex<Vec<u32>>,
    /// ENIs of the pool detached behind the agent's back, and since when: deleted once EC2
    /// shows them detached (see [`ORPHAN_WATCH`]).
    orphans: Mutex<BTreeMap<String, tokio::time::Instant>>,
    /// Prefix delegation: where EC2 had no free /28 (an ENI, or `None` for new ENIs), and
    /// until when secondary addresses are used there instead.
    fallback: Mutex<BTreeMap<Option<String>, tokio::time::Instant>>,
    /// When the pool last grew for waiting ADDs, and by how many addresses
    /// ([`planner::Demand::burst`]).
    burst: Mutex<Option<(tokio::time::Instant, u32)>>,
    /// The node's `status.capacity.pods` from the Kubernetes API (0: not known): caps
    /// [`Settings::limits`]' max pods.
    node_max_pods: std::sync::atomic::AtomicU32,
    /// Custom networking (`None`: off): the node's ENIConfig.
    eni_config: Option<Mutex<EniConfigState>>,
    /// Subnets learned from EC2 (custom networking), by id.
    subnets: Mutex<BTreeMap<String, cloud::Subnet>>,
}

/// How long after growing for waiting ADDs more waiting ADDs count as the same burst.
const BURST_WINDOW: Duration = Duration::from_secs(2);

/// How long a reconcile keeps looking for an ENI detached behind the agent's back to delete
/// it (it stays `detaching` for a while; someone may also attach it elsewhere, and then it is
/// not ours to delete).
pub const ORPHAN_WATCH: Duration = Duration::from_secs(600);

#[derive(Debug, Default)]
struct Recent {
    ips: BTreeMap<Ipv4Addr, tokio::time::Instant>,
    enis: BTreeMap<String, tokio::time::Instant>,
    prefixes: BTreeMap<Ipv4Net, tokio::time::Instant>,
}

impl<C: Cloud, N: NodeNet> Provisioner<C, N> {
    pub fn new(
        cloud: Arc<C>,
        net: Arc<N>,
        state: Arc<Mutex<State>>,
        node: NodeIdentity,
        settings: Settings,
    ) -> Self {
        let wake = Arc::new(Notify::new());
        let settings_interval = settings.reconcile_interval;
        let p = Provisioner {
            cloud,
            net,
            state,
            wake,
            node,
            settings,
            last_decrease: Mutex::new(None),
            subnet_full_until: Mutex::new(None),
            next_reconcile: Mutex::new(tokio::time::Instant::now() + settings_interval),
            orphans: Mutex::default(),
            reconcile_now: AtomicBool::new(false),
            recent: Mutex::new(Recent::default()),
            foreign_devices: Mutex::new(Vec::new()),
            fallback: Mutex::default(),
            burst: Mutex::default(),
            node_max_pods: Default::default(),
            eni_config: None,
            subnets: Mutex::default(),
        };
        {
            let mut st = p.lock();
            st.wake = Some(p.wake.clone());
            st.capacity = Some((p.capacity(), p.limit_message()));
            st.max_pods = Some((p.limits().max_pods, p.max_pods_message()));
            st.pool_mut()
                .set_prefer_prefixes(p.settings.targets.prefixes);
        }
        p
    }

    /// Custom networking: new ENIs go where the node's ENIConfig says (set with
    /// [`Provisioner::set_eni_config`]); the start-up leaves the primary ENI out of the pool.
    pub fn with_custom_networking(mut self) -> Self {
        self.eni_config = Some(Mutex::new(EniConfigState::Unknown));
        self
    }

    /// The node's ENIConfig changed (custom networking): new ENIs only follow it, as in the
    /// reference.
    pub fn set_eni_config(&self, state: EniConfigState) {
        let Some(cur) = &self.eni_config else { return };
        let mut cur = cur.lock().unwrap_or_else(|p| p.into_inner());
        if *cur != state {
            info!(
                ?state,
                "the node's ENIConfig (custom networking): new ENIs follow it"
            );
            *cur = state;
            if let Some(w) = &self.lock().wake {
                w.notify_one();
            }
        }
    }

    /// Where a new ENI goes: the node's subnet and groups, or (custom networking) its
    /// ENIConfig's, refused when the ENIConfig is missing or names a subnet in another zone.
    async fn eni_target(&self) -> Result<EniTarget, ProvisionError> {
        let Some(state) = &self.eni_config else {
            return Ok(EniTarget {
                subnet_id: self.node.subnet_id.clone(),
                subnet: self.node.subnet,
                security_groups: self.node.security_groups.clone(),
            });
        };
        let state = state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (name, subnet_id, groups) = match state {
            EniConfigState::Unknown => {
                return Err(ProvisionError::CustomNetworking {
                    reason: "ENIConfigUnknown",
                    message: "custom networking: the node's ENIConfig is not known yet (the Kubernetes API has not answered); no ENI is created until it is".into(),
                });
            }
            EniConfigState::Missing { name } => {
                return Err(ProvisionError::CustomNetworking {
                    reason: "ENIConfigMissing",
                    message: format!(
                        "custom networking: the node names ENIConfig {name:?}, and there is none; create it (spec.subnet, spec.securityGroups) or label the node with an existing one; no ENI is created meanwhile"
                    ),
                });
            }
            EniConfigState::Found {
                name,
                subnet,
                security_groups,
            } => (name, subnet, security_groups),
        };
        let known = self
            .subnets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&subnet_id)
            .cloned();
        let subnet = match known {
            Some(s) => s,
            None => {
                let s = match self.cloud.describe_subnet(&subnet_id).await {
                    Ok(s) => s,
                    Err(e) if e.is_not_found() => {
                        return Err(ProvisionError::CustomNetworking {
                            reason: "ENIConfigSubnetMissing",
                            message: format!(
                                "custom networking: ENIConfig {name:?} names subnet {subnet_id}, which EC2 does not know ({e}); no ENI is created"
                            ),
                        });
                    }
                    Err(e) => return Err(e.into()),
                };
                self.subnets
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(subnet_id.clone(), s.clone());
                s
            }
        };
        if subnet.availability_zone != self.node.availability_zone {
            return Err(ProvisionError::CustomNetworking {
                reason: "ENIConfigWrongZone",
                message: format!(
                    "custom networking: ENIConfig {name:?} names subnet {subnet_id} in zone {}, but this node is in {}: an ENI can only attach in its instance's zone; no ENI is created (name an ENIConfig of this zone, e.g. label the node with ENI_CONFIG_LABEL_DEF=topology.kubernetes.io/zone and one ENIConfig per zone)",
                    subnet.availability_zone, self.node.availability_zone
                ),
            });
        }
        Ok(EniTarget {
            subnet_id,
            subnet: subnet.cidr,
            security_groups: if groups.is_empty() {
                self.node.security_groups.clone()
            } else {
                groups
            },
        })
    }

    /// The limits in effect: the settings', with max pods capped by the node's capacity.
    pub fn limits(&self) -> Limits {
        let mut l = self.settings.limits;
        match self.node_max_pods.load(Ordering::SeqCst) {
            0 => {}
            n => l.max_pods = l.max_pods.min(n),
        }
        l
    }

    /// The node's `status.capacity.pods` (from the Kubernetes API): the pool holds no more
    /// addresses than that, and ADDs beyond it are refused.
    pub fn set_node_max_pods(&self, pods: Option<u32>) {
        let n = pods.unwrap_or(0);
        if self.node_max_pods.swap(n, Ordering::SeqCst) == n {
            return;
        }
        info!(capacity_pods = ?pods, max_pods = self.limits().max_pods, "the node's capacity in pods changed: the pool's ceiling follows");
        let mut st = self.lock();
        st.max_pods = Some((self.limits().max_pods, self.max_pods_message()));
        if let Some(w) = &st.wake {
            w.notify_one();
        }
    }

    /// The most addresses the node's ENIs can hold in its mode.
    fn capacity(&self) -> u32 {
        let l = &self.settings.limits;
        l.max_enis * l.ips_per_eni * self.settings.targets.addresses_per_slot()
    }

    /// "max pods 110 (m5.large with prefix delegation)"
    fn max_pods_message(&self) -> String {
        let l = self.limits();
        if l.max_pods < self.settings.limits.max_pods {
            return format!(
                "the node's max pods is {} (its capacity.pods in the Kubernetes API; {} {} allows {})",
                l.max_pods,
                self.node.instance_type,
                self.mode(),
                self.settings.limits.max_pods
            );
        }
        format!(
            "the node's max pods is {} ({} {})",
            l.max_pods,
            self.node.instance_type,
            self.mode()
        )
    }

    fn mode(&self) -> &'static str {
        if self.settings.targets.prefixes {
            "with prefix delegation"
        } else {
            "with secondary IPs"
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes addresses (and an ENI) this agent just changed in EC2.
    fn touch(&self, eni: Option<&str>, ips: &[Ipv4Addr]) {
        self.touch_prefixes(eni, ips, &[]);
    }

    /// Notes addresses, prefixes (and an ENI) this agent just changed in EC2.
    fn touch_prefixes(&self, eni: Option<&str>, ips: &[Ipv4Addr], prefixes: &[Ipv4Net]) {
        let now = tokio::time::Instant::now();
        let mut r = self.recent();
        if let Some(eni) = eni {
            r.enis.insert(eni.to_owned(), now);
        }
        for ip in ips {
            r.ips.insert(*ip, now);
        }
        for p in prefixes {
            r.prefixes.insert(*p, now);
        }
    }

    /// Whether a reconcile is due: its period has passed, or EC2 called something unknown.
    pub fn reconcile_due(&self) -> bool {
        self.reconcile_now.load(Ordering::SeqCst)
            || tokio::time::Instant::now()
                >= *self
                    .next_reconcile
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for a reconcile before the next step.
    pub fn request_reconcile(&self) {
        self.reconcile_now.store(true, Ordering::SeqCst);
    }

    /// Compares the pool with EC2 and applies what EC2 confirms changed outside the agent
    /// (see the module's documentation). Records the outcome in the state's drift counters;
    /// the next reconcile is due a period after a success, [`RECONCILE_RETRY`] after a failure.
    pub async fn reconcile(&self) -> Result<Reconciled, ProvisionError> {
        self.reconcile_now.store(false, Ordering::SeqCst);
        let mut result = self.reconcile_once().await;
        if let Ok(r) = &result {
            let now = tokio::time::Instant::now();
            let watching = {
                let mut o = self.orphans.lock().unwrap_or_else(|p| p.into_inner());
                for id in &r.enis_detached {
                    o.insert(id.clone(), now);
                }
                o.retain(|_, since| now.duration_since(*since) < ORPHAN_WATCH);
                !o.is_empty()
            };
            // An ENI detached behind the agent's back is tagged with this instance and
            // held no pods the agent still serves: a leak once it is detached.
            if watching {
                match self.delete_leaked().await {
                    Ok(deleted) => self
                        .orphans
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .retain(|id, _| !deleted.contains(id)),
                    Err(e) => result = Err(e),
                }
            }
        }
        let next = match &result {
            Ok(_) => self.settings.reconcile_interval,
            Err(_) => RECONCILE_RETRY.min(self.settings.reconcile_interval),
        };
        *self
            .next_reconcile
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = tokio::time::Instant::now() + next;
        let mut st = self.lock();
        st.drift.reconciles += 1;
        st.drift.last_reconcile_ms = Some(st.now());
        st.drift.last_reconcile_error = result.as_ref().err().map(ToString::to_string);
        result
    }

    async fn reconcile_once(&self) -> Result<Reconciled, ProvisionError> {
        let instance = &self.node.instance_id;
        let listed = self
            .cloud
            .describe_enis(&[Filter::attached_to(instance)])
            .await?;
        let attached = attached_view(&listed, instance);
        let pool_enis = self.lock().pool().enis();
        if let Some(primary) = pool_enis.iter().find(|e| e.device_number == 0)
            && !attached.contains_key(&primary.id)
        {
            return Err(ProvisionError::ImplausibleAnswer {
                instance: instance.clone(),
                primary: primary.id.clone(),
                listed: listed.len(),
            });
        }
        *self
            .foreign_devices
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = listed
            .iter()
            .filter_map(|e| e.attachment.as_ref().map(|a| (e, a)))
            .filter(|(e, a)| a.instance_id == *instance && !pool_enis.iter().any(|p| p.id == e.id))
            .map(|(_, a)| a.device_index)
            .collect();
        let (first, deferred) = self.drift(&attached);
        if first.is_empty() {
            return Ok(Reconciled {
                deferred,
                ..Reconciled::default()
            });
        }
        // A second answer, by ENI id: act only on what both show.
        let ids: Vec<String> = first.enis().into_iter().collect();
        let again = match self
            .cloud
            .describe_enis(&[Filter {
                name: "network-interface-id".into(),
                values: ids,
            }])
            .await
        {
            Ok(v) => v,
            Err(e) if e.is_not_found() => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let mut second = self.drift(&attached_view(&again, instance)).0;
        // ENIs the first answer did not question are not judged on the second.
        second.gone.retain(|id| first.enis().contains(id));
        let confirmed = first.confirmed_by(&second);
        let deferred = deferred + first.count() - confirmed.count();
        let mut done = self.apply(&confirmed);
        done.deferred = deferred;
        Ok(done)
    }

    /// The pool against `attached`, leaving out what this agent changed within the grace
    /// period; returns also how many differences were left out.
    fn drift(&self, attached: &BTreeMap<String, Listed>) -> (Drift, usize) {
        let now = tokio::time::Instant::now();
        let grace = self.settings.reconcile_grace;
        let mut recent = self.recent();
        recent.ips.retain(|_, at| now.duration_since(*at) < grace);
        recent.enis.retain(|_, at| now.duration_since(*at) < grace);
        recent
            .prefixes
            .retain(|_, at| now.duration_since(*at) < grace);
        let st = self.lock();
        let pool = st.pool();
        let mut d = Drift::default();
        let mut deferred = 0;
        for eni in pool.enis() {
            let young = recent.enis.contains_key(&eni.id);
            let Some(listed) = attached.get(&eni.id) else {
                if young {
                    deferred += 1;
                } else {
                    d.gone.insert(eni.id);
                }
                continue;
            };
            let have: BTreeSet<Ipv4Net> = pool.prefixes_of(&eni.id).into_iter().collect();
            for p in have.difference(&listed.prefixes) {
                if young || recent.prefixes.contains_key(p) {
                    deferred += 1;
                } else {
                    d.missing_prefixes
                        .entry(eni.id.clone())
                        .or_default()
                        .insert(*p);
                }
            }
            for p in listed.prefixes.difference(&have) {
                if young || recent.prefixes.contains_key(p) {
                    deferred += 1;
                } else {
                    d.extra_prefixes
                        .entry(eni.id.clone())
                        .or_default()
                        .insert(*p);
                }
            }
            let listed = &listed.ips;
            let have: BTreeSet<Ipv4Addr> = pool.secondary_ips_of(&eni.id).into_iter().collect();
            for ip in have.difference(listed) {
                if young || recent.ips.contains_key(ip) {
                    deferred += 1;
                } else {
                    d.missing.entry(eni.id.clone()).or_default().insert(*ip);
                }
            }
            for ip in listed.difference(&have) {
                if young || recent.ips.contains_key(ip) {
                    deferred += 1;
                } else {
                    d.extra.entry(eni.id.clone()).or_default().insert(*ip);
                }
            }
        }
        (d, deferred)
    }

    /// Applies confirmed differences to the pool, reports them, writes the checkpoint and
    /// removes the node side of ENIs that left.
    fn apply(&self, d: &Drift) -> Reconciled {
        let mut out = Reconciled::default();
        let mut teardown = Vec::new();
        {
            let mut st = self.lock();
            let now = st.now();
            for id in &d.gone {
                match st.pool_mut().detach_eni(id, now) {
                    Ok(det) => {
                        warn!(eni = %id, device = det.info.device_number, pods = det.lost.len(), free = det.removed.len(),
                            "ENI no longer attached to this instance (detached or deleted outside the agent): removed from the pool");
                        st.eni_created.remove(id);
                        teardown.push(det.info.clone());
                        out.enis_detached.push(id.clone());
                        out.removed.extend(det.removed);
                        for key in det.lost {
                            let ip = st.pool().lost_of(&key).map(|l| l.assignment.ip);
                            if let Some(ip) = ip {
                                out.lost.push((key, ip, LostReason::EniDetached));
                            }
                        }
                    }
                    Err(e) => warn!(eni = %id, "removing a detached ENI from the pool: {e}"),
                }
            }
            for (eni, ips) in &d.missing {
                for ip in ips {
                    match st.pool_mut().forget_ip(*ip, now) {
                        Forgotten::Lost(key) => out.lost.push((key, *ip, LostReason::Unassigned)),
                        Forgotten::Removed => {
                            warn!(%eni, %ip, "EC2 no longer lists this free address on its ENI (unassigned outside the agent): removed from the pool");
                            out.removed.push(*ip);
                        }
                        Forgotten::NotInPool => {}
                    }
                }
            }
            for (eni, prefixes) in &d.missing_prefixes {
                for prefix in prefixes {
                    let forgotten = match st.pool_mut().forget_prefix(eni, *prefix, now) {
                        Ok(f) => f,
                        Err(e) => {
                            warn!(%eni, %prefix, "removing a prefix EC2 no longer lists: {e}");
                            continue;
                        }
                    };
                    warn!(%eni, %prefix, "EC2 no longer lists this prefix on its ENI (unassigned outside the agent): removed from the pool");
                    for (ip, f) in forgotten {
                        match f {
                            Forgotten::Lost(key) => {
                                out.lost.push((key, ip, LostReason::Unassigned))
                            }
                            Forgotten::Removed => out.removed.push(ip),
                            Forgotten::NotInPool => {}
                        }
                    }
                }
            }
            for (eni, prefixes) in &d.extra_prefixes {
                for prefix in prefixes {
                    match take_prefix(&mut st, eni, *prefix) {
                        Ok(Taken { free, placed }) => {
                            // Someone assigned it; its addresses may have served pods.
                            for ip in &free {
                                st.pool_mut().restore_cooldown(*ip, now);
                            }
                            warn!(%eni, %prefix, "EC2 lists a prefix on this ENI that the pool lacked (assigned outside the agent): taken into the pool after a cooldown");
                            out.adopted.extend(free);
                            out.relisted.extend(placed);
                        }
                        Err(e) => {
                            warn!(%eni, %prefix, "not taking a prefix EC2 lists into the pool: {e}")
                        }
                    }
                }
            }
            for (eni, ips) in &d.extra {
                let ips: Vec<Ipv4Addr> = ips.iter().copied().collect();
                let (free, held) = split_held(&st, &ips);
                let placed = place_held(&mut st, eni, &held);
                out.relisted.extend(placed);
                for ip in &free {
                    let r = st.pool_mut().add_ips(eni, &[*ip]);
                    match r {
                        Ok(()) => {
                            // Someone assigned it; it may have served a pod a moment ago.
                            st.pool_mut().restore_cooldown(*ip, now);
                            warn!(%eni, %ip, "EC2 lists an address on this ENI that the pool lacked (assigned outside the agent): taken into the pool after a cooldown");
                            out.adopted.push(*ip);
                        }
                        Err(e) => {
                            warn!(%eni, %ip, "not taking an address EC2 lists into the pool: {e}")
                        }
                    }
                }
            }
            for (key, ip, reason) in &out.lost {
                let pod = st
                    .pod(key)
                    .map(|p| format!("{}/{}", p.namespace, p.name))
                    .unwrap_or_default();
                let eni = st
                    .pool()
                    .lost_of(key)
                    .map(|l| l.assignment.eni.id.clone())
                    .unwrap_or_default();
                warn!(%pod, %key, %ip, %eni, reason = reason.label(),
                    "a pod's address is lost: {reason}; the pod has no working network, and the address is never handed out again (dropped when the pod is deleted)");
                *st.drift.lost.entry(reason.label()).or_default() += 1;
            }
            st.drift.removed_free += out.removed.len() as u64;
            st.drift.enis_detached += out.enis_detached.len() as u64;
            st.drift.adopted += out.adopted.len() as u64;
            st.drift.relisted += out.relisted.len() as u64;
            if out.changed() {
                if let Err(e) = self.save(&st) {
                    warn!("writing the checkpoint after reconciling with EC2: {e}");
                }
                // The planner sees the smaller pool at once.
                if let Some(w) = &st.wake {
                    w.notify_one();
                }
            }
        }
        for eni in teardown {
            if let Err(e) = self.net.teardown_eni(eni.device_number, eni.primary_ip) {
                warn!(eni = %eni.id, "removing the detached ENI's table and rule: {e}");
            }
        }
        out
    }

    fn save(&self, st: &State) -> Result<(), ProvisionError> {
        st.save().map_err(ProvisionError::from)
    }

    /// Finishes or undoes every recorded intent, then deletes leaked ENIs of this instance.
    pub async fn recover(&self) -> Result<(), ProvisionError> {
        let intents: Vec<IntentRecord> = self.lock().intents.values().cloned().collect();
        for intent in intents {
            info!(intent = %intent.id, op = ?intent.op, eni = ?intent.eni_id, "recovering an unfinished ENI operation");
            for eni in self.intent_enis(&intent).await? {
                let adopted = self.lock().pool().has_eni(&eni.id);
                match (intent.op, adopted) {
                    // Created and attached before the crash, and the node has taken it into
                    // its pool (it is attached, so start-up found it): finish the operation.
                    (IntentOp::Create, true) => {
                        if let Some(att) = &eni.attachment {
                            self.cloud
                                .set_delete_on_termination(&eni.id, &att.attachment_id)
                                .await?;
                        }
                        let mut st = self.lock();
                        let now = st.now();
                        st.eni_created.entry(eni.id.clone()).or_insert(now);
                        info!(eni = %eni.id, "finished creating the ENI");
                    }
                    // Being deleted: it held no pods when the delete began; out of the pool
                    // again (start-up re-adopted it because it was still attached) and gone.
                    (IntentOp::Delete, true) => {
                        let removed = self.lock().pool_mut().remove_eni(&eni.id);
                        match removed {
                            Ok(_) => self.remove_eni_in_ec2(&eni).await?,
                            Err(e) => warn!(eni = %eni.id, "not deleting the ENI: {e}"),
                        }
                    }
                    (_, false) => self.remove_eni_in_ec2(&eni).await?,
                }
            }
            let mut st = self.lock();
            st.intents.remove(&intent.id);
            self.save(&st)?;
        }
        self.delete_leaked().await.map(drop)
    }

    /// The ENIs an intent may have produced: by its recorded id, or by its tag.
    async fn intent_enis(
        &self,
        intent: &IntentRecord,
    ) -> Result<Vec<NetworkInterface>, ProvisionError> {
        let mut out = self
            .cloud
            .describe_enis(&[Filter::tag(TAG_INTENT, &intent.id)])
            .await?;
        if let Some(id) = &intent.eni_id
            && !out.iter().any(|e| &e.id == id)
        {
            match self
                .cloud
                .describe_enis(&[Filter::eq("network-interface-id", id)])
                .await
            {
                Ok(v) => out.extend(v),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Detaches (if attached) and deletes an ENI that holds no pods.
    async fn remove_eni_in_ec2(&self, eni: &NetworkInterface) -> Result<(), ProvisionError> {
        if let Some(att) = &eni.attachment {
            if att.instance_id == self.node.instance_id
                && let Err(e) = self.net.teardown_eni(att.device_index, eni.primary_ip)
            {
                warn!(eni = %eni.id, "removing the ENI's table and rule: {e}");
            }
            match self.cloud.detach(&att.attachment_id).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
            self.wait_detached(&eni.id).await?;
        }
        match self.cloud.delete_eni(&eni.id).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        info!(eni = %eni.id, "ENI deleted");
        Ok(())
    }

    async fn wait_detached(&self, eni_id: &str) -> Result<(), ProvisionError> {
        let mut delay = Duration::from_millis(100);
        for _ in 0..40 {
            let v = match self
                .cloud
                .describe_enis(&[Filter::eq("network-interface-id", eni_id)])
                .await
            {
                Ok(v) => v,
                Err(e) if e.is_not_found() => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            match v.first() {
                None => return Ok(()),
                Some(e) if e.attachment.is_none() || e.status == "available" => return Ok(()),
                Some(_) => {}
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        Err(ProvisionError::StillAttached {
            eni: eni_id.to_owned(),
        })
    }

    /// Deletes ENIs tagged with this instance that are not attached (status `available`);
    /// returns their ids.
    pub async fn delete_leaked(&self) -> Result<Vec<String>, ProvisionError> {
        let leaked = self
            .cloud
            .describe_enis(&[
                Filter::tag(TAG_INSTANCE, &self.node.instance_id),
                Filter::eq("status", "available"),
            ])
            .await?;
        let mut deleted = Vec::new();
        for eni in leaked {
            if crate::cloud_api::unmanaged_reason(&eni).is_some() || eni.attachment.is_some() {
                continue;
            }
            warn!(eni = %eni.id, "deleting a leaked ENI (tagged with this instance, not attached)");
            self.remove_eni_in_ec2(&eni).await?;
            deleted.push(eni.id);
        }
        Ok(deleted)
    }

    /// Plans and executes one action. `Ok(None)`: the pool is where the targets want it (or
    /// as close as limits allow).
    pub async fn step(&self) -> Result<Option<Action>, ProvisionError> {
        let action = {
            let mut st = self.lock();
            let now = st.now();
            let usage = st.pool().usage(now);
            let created = st.eni_created.clone();
            let age = move |id: &str| {
                created
                    .get(id)
                    .map(|c| now.saturating_sub(*c))
                    .unwrap_or(u64::MAX)
            };
            let ages = Ages {
                age_ms: &age,
                min_eni_age_ms: self.settings.min_eni_age.as_millis() as u64,
            };
            let burst = self
                .burst
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .filter(|(at, _)| at.elapsed() < BURST_WINDOW)
                .map_or(0, |(_, n)| n);
            let demand = Demand {
                pending: st.pending,
                burst,
            };
            let fallback = self.fallback_now(&mut st);
            let action = planner::plan(
                &usage,
                &self.settings.targets,
                &self.limits(),
                demand,
                &ages,
                &fallback,
            );
            if action.is_none() {
                let b = self.blocker(&usage, st.pending);
                st.set_blocker(b);
                st.pending = 0;
            }
            action.map(|a| (a, demand))
        };
        let Some((action, demand)) = action else {
            return Ok(None);
        };
        if matches!(
            action,
            Action::Assign { .. } | Action::AssignPrefixes { .. } | Action::CreateEni { .. }
        ) && let Some(until) = *self
            .subnet_full_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            && Instant::now() < until
        {
            return Ok(None);
        }
        if matches!(
            action,
            Action::Unassign { .. } | Action::UnassignPrefixes { .. }
        ) && let Some(last) = *self.last_decrease.lock().unwrap_or_else(|p| p.into_inner())
            && last.elapsed() < self.settings.decrease_interval
        {
            return Ok(None);
        }
        debug!(?action, "pool action");
        let result = match &action {
            Action::Assign { eni_id, count } => self.assign(eni_id, *count).await,
            Action::AssignPrefixes { eni_id, count } => self.assign_prefixes(eni_id, *count).await,
            Action::CreateEni { ips, prefixes } => self.create_eni(*ips, *prefixes).await,
            Action::Unassign { eni_id, ips } => self.unassign(eni_id, ips).await,
            Action::UnassignPrefixes { eni_id, prefixes } => {
                self.unassign_prefixes(eni_id, prefixes).await
            }
            Action::DeleteEni { eni_id } => self.delete_eni(eni_id).await,
        };
        if let Err(ProvisionError::Cloud(e)) = &result
            && names_something_unknown(e)
        {
            warn!(
                ?action,
                "EC2 does not know what the pool names ({e}); reconciling the pool with EC2"
            );
            self.request_reconcile();
        }
        if let Err(ProvisionError::CustomNetworking { reason, message }) = &result {
            self.lock().set_blocker(Some((reason, message.clone())));
        }
        if let Err(ProvisionError::Cloud(e)) = &result
            && matches!(
                e.code(),
                Some("UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException")
            )
        {
            self.lock().set_blocker(Some((
                "EC2Denied",
                format!(
                    "EC2 denied the node's request ({e}): its IAM role lacks a permission vpc-cni needs (deploy/iam-policy.json lists them)"
                ),
            )));
        }
        if let Err(ProvisionError::Cloud(e)) = &result
            && e.is_insufficient_cidr_blocks()
        {
            let at = match &action {
                Action::AssignPrefixes { eni_id, .. } => Some(Some(eni_id.clone())),
                Action::CreateEni { prefixes, .. } if *prefixes > 0 => Some(None),
                _ => None,
            };
            if let Some(at) = at {
                self.fall_back(at, e);
                // Not a failure of the pool: the next step asks for secondary addresses.
                return Ok(Some(action));
            }
        }
        if let Err(ProvisionError::Cloud(e)) = &result
            && matches!(
                e.code(),
                Some("InsufficientFreeAddressesInSubnet" | "InsufficientCidrBlocks")
            )
        {
            *self
                .subnet_full_until
                .lock()
                .unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + self.settings.subnet_full_backoff);
            self.lock().set_blocker(Some((
                "SubnetFull",
                format!(
                    "subnet {} has no free addresses (EC2: {}); free addresses in the subnet or add a subnet",
                    self.node.subnet_id,
                    e.code().unwrap_or_default()
                ),
            )));
        }
        let grew = result.is_ok()
            && matches!(
                action,
                Action::Assign { .. } | Action::AssignPrefixes { .. } | Action::CreateEni { .. }
            );
        // A release the pool made (EC2 may have refused it) or a growth: nothing more is
        // released for a decrease interval (what was just added is not surplus: the ADDs that
        // asked for it come back, the runtime retries them).
        let released = matches!(
            action,
            Action::Unassign { .. } | Action::UnassignPrefixes { .. }
        ) && !matches!(result, Err(ProvisionError::Pool { .. }));
        if grew || released {
            *self.last_decrease.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        if grew && demand.pending > 0 {
            let added = match action {
                Action::Assign { count, .. } => count,
                Action::AssignPrefixes { count, .. } => count * planner::PREFIX_ADDRS,
                Action::CreateEni { ips, prefixes } => ips + prefixes * planner::PREFIX_ADDRS,
                _ => 0,
            };
            *self.burst.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((tokio::time::Instant::now(), added));
        }
        result.map(|()| Some(action))
    }

    /// The ENIs (and new ENIs) in prefix fallback now; ends the fallbacks whose time is up.
    fn fallback_now(&self, st: &mut State) -> planner::Fallback {
        let now = tokio::time::Instant::now();
        let mut f = self.fallback.lock().unwrap_or_else(|p| p.into_inner());
        f.retain(|at, until| {
            let keep = now < *until && at.as_ref().is_none_or(|id| st.pool().has_eni(id));
            if !keep && now >= *until {
                info!(
                    eni = at.as_deref().unwrap_or("(new ENIs)"),
                    "trying /28 prefixes again after the fallback to secondary IPs"
                );
            }
            keep
        });
        st.prefix_fallback_active = f.keys().flatten().count();
        planner::Fallback {
            enis: f.keys().flatten().cloned().collect(),
            new_eni: f.contains_key(&None),
        }
    }

    /// EC2 had no free /28 for `at` (an ENI, or `None`: a new ENI): secondary addresses
    /// there for [`Settings::prefix_retry`]. Said once per fallback, in the log and a metric.
    fn fall_back(&self, at: Option<String>, e: &CloudError) {
        let until = tokio::time::Instant::now() + self.settings.prefix_retry;
        let fresh = self
            .fallback
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(at.clone(), until)
            .is_none();
        let mut st = self.lock();
        if fresh {
            st.prefix_fallbacks += 1;
            warn!(eni = at.as_deref().unwrap_or("(new ENIs)"), subnet = %self.node.subnet_id, retry_s = self.settings.prefix_retry.as_secs(),
                "EC2 has no free /28 prefix in the subnet ({}): falling back to secondary IPs there, and trying prefixes again later", e.code().unwrap_or_default());
        }
        st.set_blocker(Some((
            "PrefixFallback",
            format!(
                "prefix delegation: EC2 has no free /28 prefix in subnet {} ({}), so secondary IPs are tried instead",
                self.node.subnet_id,
                e.code().unwrap_or_default()
            ),
        )));
    }

    /// Why no action helps the pending ADDs (None when nothing is pending): (reason, message).
    fn blocker(&self, usage: &[ipam::EniUsage], pending: u32) -> Option<(&'static str, String)> {
        if pending == 0 {
            return None;
        }
        let t = planner::totals(usage);
        let l = &self.limits();
        if t.total >= l.max_pods {
            return Some((
                "NodeAtMaxPods",
                format!(
                    "node at its max-pods ceiling of {} addresses ({}; {} ENIs × {} slots)",
                    l.max_pods,
                    self.max_pods_message(),
                    l.max_enis,
                    l.ips_per_eni
                ),
            ));
        }
        if usage.len() as u32 >= l.max_enis && usage.iter().all(|u| u.slots as u32 >= l.ips_per_eni)
        {
            return Some(("NodeAtENILimit", self.limit_message()));
        }
        None
    }

    /// "node at its limit of 27 pod IPs: 3 ENIs × 9 secondary IPs for m5.large"
    pub fn limit_message(&self) -> String {
        let l = &self.settings.limits;
        let per_slot = if self.settings.targets.prefixes {
            "/28 prefixes"
        } else {
            "secondary IPs"
        };
        format!(
            "node at its limit of {} pod IPs: {} ENIs × {} {per_slot} for {}",
            self.capacity(),
            l.max_enis,
            l.ips_per_eni,
            self.node.instance_type
        )
    }

    async fn assign(&self, eni_id: &str, count: u32) -> Result<(), ProvisionError> {
        let ips = match self.cloud.assign_ips(eni_id, count).await {
            Ok(ips) => ips,
            Err(e) if e.code() == Some("PrivateIpAddressLimitExceeded") => {
                // EC2 holds more addresses on this ENI than the pool knows (an earlier answer
                // was lost): take EC2's list, so the planner stops asking for the same room.
                self.sync_eni_from_ec2(eni_id).await?;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        self.touch(None, &ips);
        let mut st = self.lock();
        let known = st.pool().ips_of(eni_id);
        let new: Vec<Ipv4Addr> = ips.into_iter().filter(|ip| !known.contains(ip)).collect();
        let (new, held) = split_held(&st, &new);
        st.pool_mut()
            .add_ips(eni_id, &new)
            .map_err(pool(format!("adding addresses to ENI {eni_id}")))?;
        place_held(&mut st, eni_id, &held);
        st.pending = st.pending.saturating_sub(new.len() as u32);
        st.set_blocker(None);
        info!(eni = %eni_id, count = new.len(), "assigned secondary IPs");
        Ok(())
    }

    async fn assign_prefixes(&self, eni_id: &str, count: u32) -> Result<(), ProvisionError> {
        let prefixes = match self.cloud.assign_prefixes(eni_id, count).await {
            Ok(p) => p,
            Err(e) if e.code() == Some("PrivateIpAddressLimitExceeded") => {
                self.sync_eni_from_ec2(eni_id).await?;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        self.touch_prefixes(None, &[], &prefixes);
        let mut st = self.lock();
        let known = st.pool().prefixes_of(eni_id);
        let mut added = 0;
        for prefix in prefixes.iter().filter(|p| !known.contains(p)) {
            let taken = take_prefix(&mut st, eni_id, *prefix)
                .map_err(pool(format!("adding prefix {prefix} to ENI {eni_id}")))?;
            added += taken.free.len() as u32;
        }
        st.pending = st.pending.saturating_sub(added);
        st.set_blocker(None);
        if let Err(e) = self.save(&st) {
            warn!("writing the checkpoint after assigning prefixes: {e}");
        }
        info!(eni = %eni_id, ?prefixes, "assigned /28 prefixes");
        Ok(())
    }

    async fn unassign_prefixes(
        &self,
        eni_id: &str,
        prefixes: &[Ipv4Net],
    ) -> Result<(), ProvisionError> {
        {
            // Out of the pool first, so no ADD can take their addresses meanwhile.
            let mut st = self.lock();
            let now = st.now();
            st.pool_mut()
                .remove_prefixes(eni_id, prefixes, now)
                .map_err(pool(format!("releasing prefixes of ENI {eni_id}")))?;
        }
        self.touch_prefixes(None, &[], prefixes);
        if let Err(e) = self.cloud.unassign_prefixes(eni_id, prefixes).await {
            // As for addresses: refused, they are still assigned; no answer, the reconcile
            // takes back what EC2 still lists.
            if e.code().is_some() {
                let mut st = self.lock();
                for prefix in prefixes {
                    let _ = take_prefix(&mut st, eni_id, *prefix);
                }
            }
            return Err(e.into());
        }
        info!(eni = %eni_id, ?prefixes, "released free /28 prefixes");
        Ok(())
    }

    /// Adds to the pool the secondary addresses and prefixes EC2 lists for `eni_id` that the
    /// pool lacks.
    async fn sync_eni_from_ec2(&self, eni_id: &str) -> Result<(), ProvisionError> {
        let enis = self
            .cloud
            .describe_enis(&[Filter::eq("network-interface-id", eni_id)])
            .await?;
        let Some(eni) = enis.first() else {
            return Ok(());
        };
        let mut st = self.lock();
        let known = st.pool().prefixes_of(eni_id);
        for prefix in eni.prefixes.iter().filter(|p| !known.contains(p)) {
            warn!(eni = %eni_id, %prefix, "EC2 lists a prefix the pool did not know; adding it");
            take_prefix(&mut st, eni_id, *prefix)
                .map_err(pool(format!("syncing ENI {eni_id} with EC2")))?;
        }
        let known = st.pool().ips_of(eni_id);
        let missing: Vec<Ipv4Addr> = eni
            .secondary_ips
            .iter()
            .copied()
            .filter(|ip| !known.contains(ip))
            .collect();
        let (missing, held) = split_held(&st, &missing);
        if !missing.is_empty() {
            warn!(eni = %eni_id, ?missing, "EC2 lists addresses the pool did not know; adding them");
            st.pool_mut()
                .add_ips(eni_id, &missing)
                .map_err(pool(format!("syncing ENI {eni_id} with EC2")))?;
        }
        place_held(&mut st, eni_id, &held);
        Ok(())
    }

    fn next_device_index(&self, st: &State) -> u32 {
        let mut used: Vec<u32> = st.pool().enis().iter().map(|e| e.device_number).collect();
        used.extend(&self.settings.reserved_devices);
        used.extend(st.intents.values().filter_map(|i| i.device_index));
        used.extend(
            self.foreign_devices
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter(),
        );
        (1..)
            .find(|d| !used.contains(d))
            .expect("a free device index")
    }

    async fn create_eni(&self, ips: u32, prefixes: u32) -> Result<(), ProvisionError> {
        let target = self.eni_target().await?;
        let intent = {
            let mut st = self.lock();
            let intent = IntentRecord {
                id: new_intent_id(),
                op: IntentOp::Create,
                eni_id: None,
                attachment_id: None,
                device_index: Some(self.next_device_index(&st)),
                started_ms: st.now(),
            };
            st.intents.insert(intent.id.clone(), intent.clone());
            self.save(&st)?;
            intent
        };
        match self.create_eni_steps(&intent, &target, ips, prefixes).await {
            Ok(()) => Ok(()),
            Err(e) => {
                warn!(intent = %intent.id, "creating an ENI failed: {e}; undoing");
                // Undo now; if that fails too, the intent stays and the next round retries.
                let undo = async {
                    for eni in self.intent_enis(&intent).await? {
                        if !self.lock().pool().has_eni(&eni.id) {
                            self.remove_eni_in_ec2(&eni).await?;
                        }
                    }
                    let mut st = self.lock();
                    st.intents.remove(&intent.id);
                    self.save(&st)
                };
                if let Err(u) = undo.await {
                    warn!(intent = %intent.id, "undoing failed, will retry: {u}");
                }
                Err(e)
            }
        }
    }

    async fn create_eni_steps(
        &self,
        intent: &IntentRecord,
        target: &EniTarget,
        ips: u32,
        prefixes: u32,
    ) -> Result<(), ProvisionError> {
        let device_index = intent
            .device_index
            .expect("create intents carry a device index");
        let now = self.lock().now();
        let mut tags = self.node.additional_tags.clone();
        tags.insert(TAG_INSTANCE.into(), self.node.instance_id.clone());
        if let Some(created) = rfc3339(now) {
            tags.insert(TAG_CREATED.into(), created);
        }
        tags.insert(TAG_INTENT.into(), intent.id.clone());
        if let Some(cluster) = &self.node.cluster_name {
            tags.insert(TAG_CLUSTER.into(), cluster.clone());
            tags.insert(TAG_OWNER.into(), "amazon-vpc-cni".into());
        }
        let eni = self
            .cloud
            .create_eni(
                &NewEni {
                    subnet_id: target.subnet_id.clone(),
                    private_ip: None,
                    security_groups: target.security_groups.clone(),
                    description: format!("aws-K8S-{}", self.node.instance_id),
                    tags,
                    secondary_ip_count: ips,
                },
                prefixes,
            )
            .await?;
        self.touch_prefixes(Some(&eni.id), &eni.secondary_ips, &eni.prefixes);
        self.record(intent, |i| i.eni_id = Some(eni.id.clone()))?;
        let attachment = self
            .cloud
            .attach(&eni.id, &self.node.instance_id, device_index)
            .await?;
        self.record(intent, |i| i.attachment_id = Some(attachment.clone()))?;
        self.cloud
            .set_delete_on_termination(&eni.id, &attachment)
            .await?;

        let setup = dataplane::EniSetup {
            mac: eni.mac.clone(),
            device_number: device_index,
            primary_ip: eni.primary_ip,
            subnet: target.subnet,
            mtu: self.node.eni_mtu,
        };
        let net = self.net.clone();
        let ifname = tokio::task::spawn_blocking(move || net.setup_eni(&setup))
            .await
            .map_err(ProvisionError::SetupTask)?
            .map_err(|source| ProvisionError::Node {
                eni: eni.id.clone(),
                source,
            })?;

        let mut st = self.lock();
        let now = st.now();
        let (ips, held) = split_held(&st, &eni.secondary_ips);
        st.pool_mut()
            .add_eni(
                EniInfo {
                    id: eni.id.clone(),
                    device_number: device_index,
                    subnet: target.subnet,
                    primary_ip: eni.primary_ip,
                },
                &ips,
            )
            .map_err(pool(format!("adding ENI {} to the pool", eni.id)))?;
        place_held(&mut st, &eni.id, &held);
        let mut added = ips.len() as u32;
        for prefix in &eni.prefixes {
            let taken = take_prefix(&mut st, &eni.id, *prefix)
                .map_err(pool(format!("adding prefix {prefix} of ENI {}", eni.id)))?;
            added += taken.free.len() as u32;
        }
        if self.settings.targets.prefixes && prefixes == 0 {
            // Created with secondary IPs because new ENIs are in fallback: so is this one.
            let mut f = self.fallback.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(until) = f.get(&None).copied() {
                f.insert(Some(eni.id.clone()), until);
            }
        }
        st.eni_created.insert(eni.id.clone(), now);
        st.intents.remove(&intent.id);
        st.pending = st.pending.saturating_sub(added);
        st.set_blocker(None);
        self.save(&st)?;
        info!(eni = %eni.id, %ifname, device = device_index, ips = eni.secondary_ips.len(), prefixes = ?eni.prefixes, "ENI created and attached");
        Ok(())
    }

    fn record(
        &self,
        intent: &IntentRecord,
        f: impl FnOnce(&mut IntentRecord),
    ) -> Result<(), ProvisionError> {
        let mut st = self.lock();
        if let Some(i) = st.intents.get_mut(&intent.id) {
            f(i);
        }
        self.save(&st)
    }

    async fn unassign(&self, eni_id: &str, ips: &[Ipv4Addr]) -> Result<(), ProvisionError> {
        {
            // Out of the pool first, so no ADD can take them while EC2 releases them.
            let mut st = self.lock();
            let now = st.now();
            st.pool_mut()
                .remove_ips(eni_id, ips, now)
                .map_err(pool(format!("releasing addresses of ENI {eni_id}")))?;
        }
        self.touch(None, ips);
        if let Err(e) = self.cloud.unassign_ips(eni_id, ips).await {
            // EC2 refused (an error code): they are still assigned, back to the pool. No
            // answer (timeout, transport): EC2 may have released them; the reconcile takes
            // back whatever EC2 still lists once the grace period has passed.
            if e.code().is_some() {
                let mut st = self.lock();
                let _ = st.pool_mut().add_ips(eni_id, ips);
            }
            return Err(e.into());
        }
        info!(eni = %eni_id, count = ips.len(), "released surplus secondary IPs");
        Ok(())
    }

    async fn delete_eni(&self, eni_id: &str) -> Result<(), ProvisionError> {
        let intent = {
            let mut st = self.lock();
            let info = st
                .pool_mut()
                .remove_eni(eni_id)
                .map_err(pool(format!("removing ENI {eni_id} from the pool")))?;
            let intent = IntentRecord {
                id: new_intent_id(),
                op: IntentOp::Delete,
                eni_id: Some(eni_id.to_string()),
                attachment_id: None,
                device_index: Some(info.device_number),
                started_ms: st.now(),
            };
            st.intents.insert(intent.id.clone(), intent.clone());
            st.eni_created.remove(eni_id);
            self.save(&st)?;
            intent
        };
        for eni in self.intent_enis(&intent).await? {
            self.remove_eni_in_ec2(&eni).await?;
        }
        let mut st = self.lock();
        st.intents.remove(&intent.id);
        self.save(&st)?;
        Ok(())
    }

    /// Runs until the process ends: reconciles the pool with EC2 when due, re-plans on every
    /// wake-up (an ADD found no address) and every `interval`, executing actions until the
    /// pool is at its targets. No error ends it: failures back off (0.5 s doubling to 30 s).
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            if self.reconcile_due() {
                match self.reconcile().await {
                    Ok(r) if r.changed() => info!(
                        enis_detached = r.enis_detached.len(),
                        lost = r.lost.len(),
                        removed = r.removed.len(),
                        adopted = r.adopted.len(),
                        "pool reconciled with EC2"
                    ),
                    Ok(_) => {}
                    Err(e) => warn!(
                        "reconciling the pool with EC2: {e}; retrying in {:?}",
                        RECONCILE_RETRY.min(self.settings.reconcile_interval)
                    ),
                }
            }
            let pending_intents = !self.lock().intents.is_empty();
            let outcome = async {
                if pending_intents {
                    self.recover().await?;
                }
                for _ in 0..32 {
                    if self.step().await?.is_none() {
                        break;
                    }
                }
                Ok::<(), ProvisionError>(())
            }
            .await;
            match outcome {
                Ok(()) => {
                    backoff = Duration::from_millis(500);
                    let until_reconcile = self
                        .next_reconcile
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .saturating_duration_since(tokio::time::Instant::now());
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(self.settings.interval.min(until_reconcile)) => {}
                    }
                }
                Err(e) => {
                    // Back off whatever wakes us: EC2 may be throttling.
                    warn!("pool provisioning: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
