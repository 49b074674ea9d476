//! The agent's introspection documents as vpcctl reads them: `/v1/state` ([`State`]) and
//! `/v1/enis` ([`Enis`]), field for field as `agent::http` writes them (`state_document`,
//! `enis`). Every field vpcctl shows is required, so an agent whose shape changed is an error
//! that names the field, never a silently empty column.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::Deserialize;

/// What `/v1/state` answered: the pool's document, or (503) why the agent has no pool yet.
#[derive(Debug, Clone, PartialEq)]
pub enum StateAnswer {
    Known(Box<State>),
    /// The agent is starting: its readiness reason (the 503 body's `error`).
    Starting(String),
}

/// `/v1/state`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    /// The agent's clock now (every `…_ms` below is on it).
    pub now_ms: u64,
    pub stats: Stats,
    pub enis: Vec<EniUsage>,
    pub pods: Vec<Pod>,
    pub lost: Vec<LostPod>,
    pub cooldown_ms: u64,
    pub cooling: Vec<Cooling>,
    /// With provisioning; null without.
    pub limits: Option<Limits>,
    pub provisioning: bool,
    pub targets: Targets,
    pub probes: Probes,
    pub ec2_refused: Option<String>,
    /// ADDs that found no address since the provisioner last caught up.
    pub pending: u32,
    pub blocker: Option<String>,
    pub drift: Drift,
    pub intents: Vec<Intent>,
    /// EC2 request attempts by API.
    pub ec2: BTreeMap<String, ApiCount>,
    pub checkpoint_rebuilt_from: Option<String>,
    pub checkpoint_write_failures: u64,
}

/// `ipam::Stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Stats {
    pub enis: usize,
    pub total: usize,
    pub assigned: usize,
    pub cooling: usize,
    pub available: usize,
    pub lost: usize,
}

/// `ipam::EniUsage`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EniUsage {
    pub info: EniInfo,
    pub total: usize,
    pub assigned: usize,
    pub cooling: usize,
    pub available: Vec<Ipv4Addr>,
}

/// `ipam::EniInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct EniInfo {
    pub id: String,
    pub device_number: u32,
    pub subnet: String,
    pub primary_ip: Ipv4Addr,
}

/// One assigned address and its pod (empty namespace and name: a pod found wired at start
/// that no checkpoint record named).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub network: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub if_name: String,
    pub namespace: String,
    pub pod: String,
    pub ip: Ipv4Addr,
    pub eni: String,
    pub device_number: u32,
    pub since_ms: u64,
}

/// A pod's address that EC2 took away (or that was on no ENI at start).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LostPod {
    pub network: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub if_name: String,
    pub namespace: String,
    pub pod: String,
    pub ip: Ipv4Addr,
    pub eni: Option<String>,
    /// `unassigned`, `eni_detached`, or `on no ENI at start`.
    pub reason: String,
    /// The reason in words.
    pub why: String,
    pub lost_ms: Option<u64>,
    pub parked_on: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cooling {
    pub address: Ipv4Addr,
    pub eni: Option<String>,
    pub released_ms: u64,
    pub left_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    #[serde(rename = "maxENIs")]
    pub max_enis: u32,
    #[serde(rename = "ipsPerENI")]
    pub ips_per_eni: u32,
    pub max_pods: u32,
    #[serde(rename = "maxIPs")]
    pub max_ips: u32,
    pub at_limit: bool,
    pub at_max_pods: bool,
    /// What an ADD refused at the limit says.
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Targets {
    #[serde(rename = "warmENI")]
    pub warm_eni: u32,
    #[serde(rename = "warmIP")]
    pub warm_ip: Option<u32>,
    #[serde(rename = "minimumIP")]
    pub minimum_ip: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Probes {
    pub live: bool,
    pub liveness: Option<String>,
    pub ready: bool,
    pub readiness: Option<String>,
}

/// `agent::state::Drift`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Drift {
    pub lost: BTreeMap<String, u64>,
    pub removed_free: u64,
    pub enis_detached: u64,
    pub adopted: u64,
    pub relisted: u64,
    pub reconciles: u64,
    pub last_reconcile_ms: Option<u64>,
    pub last_reconcile_error: Option<String>,
}

/// An ENI operation in flight (`agent::checkpoint::IntentRecord`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Intent {
    pub id: String,
    /// `create` or `delete`.
    pub op: String,
    pub eni_id: Option<String>,
    pub device_index: Option<u32>,
    pub started_ms: u64,
}

/// `cloud::ApiCount`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct ApiCount {
    pub attempts: u64,
    pub ok: u64,
    pub throttled: u64,
    pub failed: u64,
}

/// `/v1/enis`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Enis {
    #[serde(rename = "totalIPs")]
    pub total_ips: usize,
    #[serde(rename = "assignedIPs")]
    pub assigned_ips: usize,
    #[serde(rename = "availableIPs")]
    pub available_ips: usize,
    #[serde(rename = "coolingIPs")]
    pub cooling_ips: usize,
    pub enis: Vec<Eni>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Eni {
    pub id: String,
    pub device_number: u32,
    pub is_primary: bool,
    pub subnet: String,
    #[serde(rename = "primaryIP")]
    pub primary_ip: Ipv4Addr,
    pub route_table: u32,
    pub addresses: Vec<Address>,
}

/// One secondary address of an ENI: `state` is `assigned`, `cooling`, `available`,
/// `parked` (or `unknown`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Address {
    pub address: Ipv4Addr,
    pub state: String,
    #[serde(default)]
    pub since_ms: Option<u64>,
    #[serde(default)]
    pub released_ms: Option<u64>,
    #[serde(default)]
    pub left_ms: Option<u64>,
    #[serde(default)]
    pub pod: Option<PodRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub if_name: String,
    pub network: String,
}

/// `namespace/name`, or `-` for a pod the agent knows no name of.
pub fn pod_name(namespace: &str, name: &str) -> String {
    if namespace.is_empty() && name.is_empty() {
        "-".to_string()
    } else {
        format!("{namespace}/{name}")
    }
}
