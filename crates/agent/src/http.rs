//! The agent's two HTTP listeners: metrics (Prometheus text, `0.0.0.0:61678/metrics`) and
//! introspection (JSON, `127.0.0.1:61679`), both with the probes `/livez`, `/readyz` and
//! `/healthz` (crate::health decides what they answer).
//!
//! Metric names are the reference's `awscni_*` names, so existing dashboards and alerts keep
//! working. The exposition is written here rather than with prometheus-client because that
//! crate encodes OpenMetrics, which renames every counter to `<name>_total` — exactly the
//! names users' queries must not lose.
//!
//! Both listeners start before the agent knows its pool ([`Endpoints`]): until then the
//! probes answer (liveness, and readiness with the start-up step), `/metrics` has the build
//! information only, and the introspection paths answer 503.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use axum::Router;
use axum::extract::State as AxState;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use tracing::{info, warn};

use crate::config::{self, Config};
use crate::health::{self, Health, PoolView};
use crate::state::State;

/// Why the plugin socket refused or dropped a client (`reason` of
/// `vpccni_rejected_client_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rejection {
    /// The request frame did not arrive whole within the read deadline.
    Deadline,
    /// The length prefix exceeds the frame limit.
    Oversized,
    /// The frame is not a request (bad JSON, unknown operation).
    Malformed,
    /// The request speaks another protocol version.
    Version,
    /// The client closed or reset the connection before its request was whole.
    Incomplete,
    /// Closed to make room: the connection limit was reached and this client had waited
    /// longest (sending its request, or not reading its answer).
    Evicted,
    /// Refused at once: the connection limit was reached and every connection was being
    /// answered.
    Busy,
    /// The client did not take its answer within the write deadline.
    WriteDeadline,
    /// accept(2) failed (e.g. out of file descriptors).
    Accept,
}

impl Rejection {
    pub const ALL: [Rejection; 9] = [
        Rejection::Deadline,
        Rejection::Oversized,
        Rejection::Malformed,
        Rejection::Version,
        Rejection::Incomplete,
        Rejection::Evicted,
        Rejection::Busy,
        Rejection::WriteDeadline,
        Rejection::Accept,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejection::Deadline => "deadline",
            Rejection::Oversized => "oversized",
            Rejection::Malformed => "malformed",
            Rejection::Version => "version",
            Rejection::Incomplete => "incomplete",
            Rejection::Evicted => "evicted",
            Rejection::Busy => "busy",
            Rejection::WriteDeadline => "write_deadline",
            Rejection::Accept => "accept_error",
        }
    }

    fn index(self) -> usize {
        Rejection::ALL
            .iter()
            .position(|r| *r == self)
            .expect("listed in ALL")
    }
}

/// Request counters kept by the plugin socket.
#[derive(Debug, Default)]
pub struct Counters {
    pub add: AtomicU64,
    pub del: AtomicU64,
    /// ADDs that found no free address.
    pub no_address: AtomicU64,
    /// Clients refused or dropped, by [`Rejection`].
    rejected: [AtomicU64; Rejection::ALL.len()],
    /// Plugin connections open now.
    pub connections: AtomicU64,
}

impl Counters {
    pub fn reject(&self, why: Rejection) {
        self.rejected[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected(&self, why: Rejection) -> u64 {
        self.rejected[why.index()].load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
pub struct Shared {
    pub state: Arc<Mutex<State>>,
    pub counters: Arc<Counters>,
    pub ec2: Option<Arc<cloud::Ec2>>,
    pub limits: Option<ipam::planner::Limits>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

struct Exposition(String);

impl Exposition {
    fn metric(&mut self, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(self.0, "{name}{labels} {v}");
        }
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.metric(name, kind, help, &[(String::new(), v)]);
    }
}

fn label_escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render_metrics(s: &Shared) -> String {
    let mut out = Exposition(String::new());
    let (stats, usage, rebuilt, write_failures, recovered_from, lost, drift) = {
        let st = s.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = st.now();
        (
            st.pool().stats(now),
            st.pool().usage(now),
            st.rebuilt().len(),
            st.write_failures(),
            st.recovered_from,
            st.lost().len(),
            st.drift.clone(),
        )
    };
    let (capacity, prefix_fallbacks, prefix_fallback_active) = {
        let st = s.state.lock().unwrap_or_else(|p| p.into_inner());
        (
            st.capacity.as_ref().map(|c| c.0),
            st.prefix_fallbacks,
            st.prefix_fallback_active,
        )
    };
    out.single(
        "awscni_eni_allocated",
        "gauge",
        "The number of ENIs allocated",
        stats.enis as f64,
    );
    out.single(
        "awscni_total_ip_addresses",
        "gauge",
        "The total number of IP addresses",
        stats.total as f64,
    );
    out.single(
        "awscni_assigned_ip_addresses",
        "gauge",
        "The number of IP addresses assigned to pods",
        stats.assigned as f64,
    );
    out.single(
        "awscni_total_ipv4_prefixes",
        "gauge",
        "The total number of IPv4 prefixes",
        stats.prefixes as f64,
    );
    out.single(
        "vpccni_prefix_fallbacks_total",
        "counter",
        "Prefix delegation: times EC2 had no free /28 for an ENI (InsufficientCidrBlocks) and the agent fell back to secondary IPs there",
        prefix_fallbacks as f64,
    );
    out.single(
        "vpccni_prefix_fallback_enis",
        "gauge",
        "Prefix delegation: ENIs (new ENIs counting as one) on secondary IPs now because EC2 had no free /28",
        prefix_fallback_active as f64,
    );
    out.single(
        "vpccni_cooling_ip_addresses",
        "gauge",
        "Addresses released less than IP_COOLDOWN_PERIOD ago (not available to new pods)",
        stats.cooling as f64,
    );
    let per_eni: Vec<(String, f64)> = usage
        .iter()
        .map(|u| {
            (
                format!("{{eni=\"{}\"}}", label_escape(&u.info.id)),
                u.assigned as f64,
            )
        })
        .collect();
    out.metric(
        "awscni_assigned_ip_per_eni",
        "gauge",
        "The number of allocated ips partitioned by eni",
        &per_eni,
    );
    if let Some(l) = s.limits {
        out.single(
            "awscni_eni_max",
            "gauge",
            "The maximum number of ENIs that can be attached to the instance",
            f64::from(l.max_enis),
        );
        out.single(
            "awscni_ip_max",
            "gauge",
            "The maximum number of IP addresses that can be allocated to the instance",
            f64::from(capacity.unwrap_or(l.max_enis * l.ips_per_eni)),
        );
    }
    let c = &s.counters;
    out.single(
        "awscni_add_ip_req_count",
        "counter",
        "The number of add IP address requests",
        c.add.load(Ordering::Relaxed) as f64,
    );
    out.single(
        "awscni_del_ip_req_count",
        "counter",
        "The number of delete IP address requests",
        c.del.load(Ordering::Relaxed) as f64,
    );
    out.single(
        "awscni_no_available_ip_addresses",
        "counter",
        "The number of pod IP assignments that fail due to no available IP addresses",
        c.no_address.load(Ordering::Relaxed) as f64,
    );
    let rejected: Vec<(String, f64)> = Rejection::ALL
        .iter()
        .map(|r| {
            (
                format!("{{reason=\"{}\"}}", r.label()),
                c.rejected(*r) as f64,
            )
        })
        .collect();
    out.metric(
        "vpccni_rejected_client_requests_total",
        "counter",
        "Plugin socket clients refused or dropped: deadline (request not whole in time), oversized, malformed, version, incomplete (closed early), evicted (stalled, closed to make room), busy (connection limit), write_deadline, accept_error",
        &rejected,
    );
    out.single(
        "vpccni_plugin_connections",
        "gauge",
        "Plugin socket connections open now",
        c.connections.load(Ordering::Relaxed) as f64,
    );
    out.single(
        "vpccni_checkpoint_write_failures_total",
        "counter",
        "Checkpoint writes that failed (the change was undone and the request refused)",
        write_failures as f64,
    );
    let rebuilds: Vec<(String, f64)> = std::iter::once("missing")
        .chain(crate::checkpoint::DamageKind::ALL.map(|k| k.as_str()))
        .map(|r| {
            (
                format!("{{reason=\"{r}\"}}"),
                f64::from(u8::from(recovered_from == Some(r))),
            )
        })
        .collect();
    out.metric(
        "vpccni_checkpoint_rebuilds_total",
        "counter",
        "Starts at which the checkpoint was unusable (kept aside as ipam.json.corrupt-<time>) or missing with pods on the node, and the allocations were rebuilt from the node",
        &rebuilds,
    );
    out.single(
        "vpccni_rebuilt_ip_addresses",
        "gauge",
        "Addresses held for pods found wired on the node that no checkpoint record held (released when the pod goes)",
        rebuilt as f64,
    );
    let lost_by_reason: Vec<(String, f64)> = ipam::LostReason::ALL
        .iter()
        .map(|r| {
            (
                format!("{{reason=\"{}\"}}", r.label()),
                drift.lost.get(r.label()).copied().unwrap_or(0) as f64,
            )
        })
        .collect();
    out.metric(
        "vpccni_lost_addresses_total",
        "counter",
        "Pods' addresses EC2 took away outside the agent, found by the reconcile with EC2: unassigned (no longer listed on its ENI) or eni_detached (its ENI no longer attached); each stays blocked until its pod is deleted",
        &lost_by_reason,
    );
    out.single(
        "vpccni_lost_ip_addresses",
        "gauge",
        "Addresses pods hold that are on no ENI of the node (lost, or restored from the checkpoint onto no ENI): never handed out, dropped when the pod is deleted",
        lost as f64,
    );
    out.single(
        "awscni_force_removed_ips",
        "counter",
        "The number of IPs force removed while assigned to a pod (EC2 no longer gives them to the node)",
        drift.lost.values().sum::<u64>() as f64,
    );
    out.single(
        "awscni_force_removed_enis",
        "counter",
        "The number of ENIs removed from the pool because EC2 no longer lists them attached",
        drift.enis_detached as f64,
    );
    if let Some(ec2) = &s.ec2 {
        let api = ec2.api_stats();
        let reqs: Vec<(String, f64)> = api
            .iter()
            .map(|(name, c)| {
                (
                    format!("{{fn=\"{}\"}}", label_escape(name)),
                    c.attempts as f64,
                )
            })
            .collect();
        out.metric(
            "awscni_ec2api_req_count",
            "counter",
            "The number of requests made to EC2 APIs by CNI",
            &reqs,
        );
        let mut errs: Vec<(String, f64)> = Vec::new();
        for (name, c) in &api {
            for (error, n) in [("RequestLimitExceeded", c.throttled), ("other", c.failed)] {
                if n > 0 {
                    errs.push((
                        format!("{{api=\"{}\",error=\"{error}\"}}", label_escape(name)),
                        n as f64,
                    ));
                }
            }
        }
        out.metric(
            "awscni_aws_api_error_count",
            "counter",
            "The number of times AWS API returns an error",
            &errs,
        );
        let failed: Vec<(String, f64)> = api
            .iter()
            .map(|(name, c)| {
                (
                    format!("{{fn=\"{}\"}}", label_escape(name)),
                    (c.throttled + c.failed) as f64,
                )
            })
            .collect();
        out.metric(
            "awscni_ec2api_error_count",
            "counter",
            "The number of failed EC2 APIs requests",
            &failed,
        );
    }
    out.0
}

/// `vpccni_build_info{version,commit} 1`: what this binary is (crate::build_info).
pub fn render_build_info() -> String {
    let mut out = Exposition(String::new());
    out.metric(
        "vpccni_build_info",
        "gauge",
        "The agent's version and the git commit it was built from; always 1",
        &[(
            format!(
                "{{version=\"{}\",commit=\"{}\"}}",
                label_escape(crate::build_info::VERSION),
                label_escape(crate::build_info::COMMIT)
            ),
            1.0,
        )],
    );
    out.0
}

/// What `/v1/state`'s `lost[].why` says of an allocation restored from the checkpoint onto no
/// ENI of the node (`reason` "on no ENI at start").
pub const LOST_AT_START: &str = "restored from the checkpoint at start, but the address is on \
    no ENI of this node";

/// Milliseconds left of a cooldown that began at `released_ms` (0 once over).
pub fn cooldown_left_ms(released_ms: u64, cooldown_ms: u64, now_ms: u64) -> u64 {
    released_ms
        .saturating_add(cooldown_ms)
        .saturating_sub(now_ms)
}

/// The pool's document (`/v1/state` has it, with [`state_document`]'s additions): every
/// count, pod and fact the pool holds. Beside the counts (`stats`, per-ENI `enis`), the pods
/// (`pods`: key, `namespace`, `pod`, `ip`, `eni`, `sinceMs`), the `lost` addresses (`reason`,
/// `why` in words, `lostMs`), `drift`, `pending`, `blocker`, `intents` and `ec2` call counts:
/// - `nowMs`: the agent's clock now (every `…Ms` time is on it);
/// - `cooldownMs` (`IP_COOLDOWN_PERIOD`) and `cooling`: each address in cooldown with its ENI,
///   `releasedMs` and `leftMs`;
/// - `limits` (with provisioning, else null): `maxENIs`, `ipsPerENI`, `maxPods`, `maxIPs`
///   (`maxENIs` × `ipsPerENI`), whether the pool holds that many (`atLimit`) or max pods
///   (`atMaxPods`), and the `message` an ADD refused at the limit carries.
pub fn introspection(s: &Shared) -> serde_json::Value {
    let st = s.state.lock().unwrap_or_else(|p| p.into_inner());
    let now = st.now();
    let pods: Vec<serde_json::Value> = st
        .pool()
        .assignments()
        .into_iter()
        .map(|(k, a)| {
            let pod = st.pod(&k).cloned().unwrap_or_default();
            json!({
                "network": k.network, "containerID": k.container_id, "ifName": k.ifname,
                "ip": a.ip, "eni": a.eni.id, "deviceNumber": a.eni.device_number,
                "namespace": pod.namespace, "pod": pod.name, "sinceMs": a.since_ms,
            })
        })
        .collect();
    let lost: Vec<serde_json::Value> = st
        .lost()
        .into_iter()
        .map(|(k, ip, l)| {
            let pod = st.pod(&k).cloned().unwrap_or_default();
            json!({
                "network": k.network, "containerID": k.container_id, "ifName": k.ifname,
                "namespace": pod.namespace, "pod": pod.name, "ip": ip,
                "eni": l.as_ref().map(|l| l.assignment.eni.id.clone()),
                "reason": l.as_ref().map_or("on no ENI at start", |l| l.reason.label()),
                "why": l.as_ref().map_or_else(
                    || LOST_AT_START.to_string(),
                    |l| l.reason.to_string(),
                ),
                "lostMs": l.as_ref().map(|l| l.lost_ms),
                "parkedOn": l.as_ref().and_then(|l| l.parked_on.clone()),
            })
        })
        .collect();
    let stats = st.pool().stats(now);
    let cooldown_ms = st.pool().cooldown_ms();
    let eni_of: std::collections::BTreeMap<std::net::Ipv4Addr, String> = st
        .pool()
        .enis()
        .into_iter()
        .flat_map(|e| {
            st.pool()
                .ips_of(&e.id)
                .into_iter()
                .map(move |ip| (ip, e.id.clone()))
        })
        .collect();
    let cooling: Vec<serde_json::Value> = st
        .pool()
        .cooldowns(now)
        .into_iter()
        .map(|(ip, released)| {
            json!({
                "address": ip, "eni": eni_of.get(&ip), "releasedMs": released,
                "leftMs": cooldown_left_ms(released, cooldown_ms, now),
            })
        })
        .collect();
    let limits = s.limits.map(|l| {
        let max_ips = st
            .capacity
            .as_ref()
            .map_or(l.max_enis * l.ips_per_eni, |c| c.0);
        json!({
            "maxENIs": l.max_enis, "ipsPerENI": l.ips_per_eni, "maxPods": l.max_pods,
            "maxIPs": max_ips,
            "atLimit": stats.total as u64 >= u64::from(max_ips),
            "atMaxPods": stats.total as u64 >= u64::from(l.max_pods),
            "message": st.capacity.as_ref().map(|(_, m)| m.clone()),
        })
    });
    json!({
        "nowMs": now,
        "cooldownMs": cooldown_ms,
        "cooling": cooling,
        "limits": limits,
        "checkpointRebuiltFrom": st.recovered_from,
        "checkpointWriteFailures": st.write_failures(),
        "stats": stats,
        "enis": st.pool().usage(now),
        "pods": pods,
        "lost": lost,
        "drift": st.drift,
        "pending": st.pending,
        "blocker": st.blocker,
        "prefixFallbacks": st.prefix_fallbacks,
        "prefixFallbackEnis": st.prefix_fallback_active,
        "intents": st.intents.values().collect::<Vec<_>>(),
        "ec2": s.ec2.as_ref().map(|e| e.api_stats()).unwrap_or_default(),
    })
}

/// `/v1/enis`: every ENI of the pool (in device-number order) with each of its secondary
/// addresses, its state and the pod that holds it:
///
/// ```json
/// {"totalIPs": 10, "assignedIPs": 1, "availableIPs": 8, "coolingIPs": 1,
///  "enis": [{"id": "eni-0a…", "deviceNumber": 1, "isPrimary": false,
///            "subnet": "172.31.0.0/20", "primaryIP": "172.31.3.173", "routeTable": 2,
///            "addresses": [
///              {"address": "172.31.13.130", "state": "assigned", "sinceMs": 1718000000000,
///               "pod": {"namespace": "default", "name": "web-0", "containerID": "8f…",
///                       "ifName": "eth0", "network": "vpc-cni"}},
///              {"address": "172.31.13.131", "state": "cooling", "releasedMs": 1718000001000,
///               "leftMs": 21000},
///              {"address": "172.31.13.132", "state": "available"},
///              {"address": "172.31.13.133", "state": "parked", "pod": {…}}]}]}
/// ```
///
/// `state` is `assigned` (a pod's), `cooling` (released less than `IP_COOLDOWN_PERIOD` ago),
/// `available`, or `parked` (a lost address of the pod named, which EC2 lists on this ENI
/// again: taken, but not the pod's working address). Times are the agent's clock in
/// milliseconds; `leftMs` is what is left of a cooldown. Addresses on no ENI of the pool are
/// in `/v1/state`'s `lost`.
pub fn enis(s: &Shared) -> serde_json::Value {
    use std::collections::BTreeMap;
    let st = s.state.lock().unwrap_or_else(|p| p.into_inner());
    let now = st.now();
    let pool = st.pool();
    let pod = |k: &proto::AttachmentKey| {
        let p = st.pod(k).cloned().unwrap_or_default();
        json!({"namespace": p.namespace, "name": p.name, "containerID": k.container_id,
               "ifName": k.ifname, "network": k.network})
    };
    let assigned: BTreeMap<std::net::Ipv4Addr, (proto::AttachmentKey, u64)> = pool
        .assignments()
        .into_iter()
        .map(|(k, a)| (a.ip, (k, a.since_ms)))
        .collect();
    let cooling: BTreeMap<std::net::Ipv4Addr, u64> = pool.cooldowns(now).into_iter().collect();
    let stats = pool.stats(now);
    let enis: Vec<serde_json::Value> = pool
        .usage(now)
        .into_iter()
        .map(|u| {
            let addresses: Vec<serde_json::Value> = pool
                .ips_of(&u.info.id)
                .into_iter()
                .map(|ip| {
                    if let Some((k, since)) = assigned.get(&ip) {
                        json!({"address": ip, "state": "assigned", "sinceMs": since, "pod": pod(k)})
                    } else if let Some(released) = cooling.get(&ip) {
                        json!({"address": ip, "state": "cooling", "releasedMs": released,
                               "leftMs": cooldown_left_ms(*released, pool.cooldown_ms(), now)})
                    } else if u.available.contains(&ip) {
                        json!({"address": ip, "state": "available"})
                    } else if let Some((k, _)) = pool.lost_holder(ip) {
                        json!({"address": ip, "state": "parked", "pod": pod(k)})
                    } else {
                        json!({"address": ip, "state": "unknown"})
                    }
                })
                .collect();
            json!({
                "id": u.info.id,
                "deviceNumber": u.info.device_number,
                "isPrimary": u.info.device_number == 0,
                "subnet": u.info.subnet,
                "primaryIP": u.info.primary_ip,
                "routeTable": dataplane::route_table_for_device(u.info.device_number),
                "addresses": addresses,
            })
        })
        .collect();
    json!({
        "totalIPs": stats.total,
        "assignedIPs": stats.assigned,
        "availableIPs": stats.available,
        "coolingIPs": stats.cooling,
        "enis": enis,
    })
}

/// What both listeners answer from: the probes' [`Health`], the pool once the agent has one
/// ([`Endpoints::set_shared`]), and the configuration in effect.
#[derive(Debug)]
pub struct Endpoints {
    pub health: Arc<Health>,
    shared: OnceLock<Shared>,
    provisioning: bool,
    /// The warm-pool targets in effect (`/v1/state`'s `targets`).
    targets: ipam::planner::Targets,
    /// `/v1/ipamd-env-settings`.
    ipamd_env: serde_json::Value,
    /// `/v1/networkutils-env-settings`.
    network_env: serde_json::Value,
}

/// The introspection paths, for `/`.
pub const INTROSPECTION_PATHS: [&str; 9] = [
    "/v1/state",
    "/v1/enis",
    "/v1/eni-configs",
    "/v1/ipamd-env-settings",
    "/v1/networkutils-env-settings",
    "/livez",
    "/readyz",
    "/healthz",
    "/",
];

impl Endpoints {
    pub fn new(cfg: &Config, health: Arc<Health>) -> Endpoints {
        let (network, ipamd): (Vec<_>, Vec<_>) = cfg
            .effective_values()
            .into_iter()
            .partition(|(name, _)| config::NETWORK_VARS.contains(name));
        let object = |v: Vec<(&str, String)>| {
            serde_json::Value::Object(
                v.into_iter()
                    .map(|(k, v)| (k.to_string(), serde_json::Value::String(v)))
                    .collect(),
            )
        };
        Endpoints {
            health,
            shared: OnceLock::new(),
            provisioning: cfg.provisioning,
            targets: cfg.targets(),
            ipamd_env: object(ipamd),
            network_env: object(network),
        }
    }

    /// The pool is known: metrics and introspection answer from it from now on.
    pub fn set_shared(&self, shared: Shared) {
        let _ = self.shared.set(shared);
    }

    pub fn shared(&self) -> Option<&Shared> {
        self.shared.get()
    }

    /// `/livez`.
    pub fn liveness(&self) -> Result<(), String> {
        self.health.liveness(Instant::now())
    }

    /// `/readyz` ([`health::readiness`] of the phase and the pool now).
    pub fn readiness(&self) -> Result<(), String> {
        let pool = self.shared().map(|s| {
            let st = s.state.lock().unwrap_or_else(|p| p.into_inner());
            PoolView {
                stats: st.pool().stats(st.now()),
                provisioning: self.provisioning,
                capacity: st.capacity.as_ref().map(|(cap, _)| *cap),
                blocker: st.blocker.clone(),
                refused: self.health.refused(),
            }
        });
        health::readiness(self.health.phase(), pool.as_ref(), Instant::now())
    }
}

/// `/v1/state`: the pool's [`introspection`] document, plus what the endpoints know beside the
/// pool:
/// - `provisioning`: whether the agent adds addresses through EC2;
/// - `targets`: `warmENI`, `warmIP`, `minimumIP` (`WARM_ENI_TARGET`, `WARM_IP_TARGET`,
///   `MINIMUM_IP_TARGET`; null when unset);
/// - `probes`: `live` and `ready`, each with the reason when false (`liveness`, `readiness`:
///   what `/livez` and `/readyz` answer);
/// - `ec2Refused`: why EC2 last refused to add addresses, until a later call adding them
///   succeeded ([`Health::refused`]).
pub fn state_document(e: &Endpoints, s: &Shared) -> serde_json::Value {
    let mut doc = introspection(s);
    let live = e.liveness();
    let ready = e.readiness();
    let t = e.targets;
    if let Some(m) = doc.as_object_mut() {
        m.insert("provisioning".into(), json!(e.provisioning));
        m.insert(
            "targets".into(),
            json!({"warmENI": t.warm_eni, "warmIP": t.warm_ip, "minimumIP": t.min_ip}),
        );
        m.insert(
            "probes".into(),
            json!({
                "live": live.is_ok(), "liveness": live.err().map(|w| health::one_line(&w)),
                "ready": ready.is_ok(), "readiness": ready.err().map(|w| health::one_line(&w)),
            }),
        );
        m.insert("ec2Refused".into(), json!(e.health.refused()));
    }
    doc
}

/// A probe's answer: 200 `ok`, or 503 with the reason (one line).
fn probe(result: Result<(), String>) -> Response {
    match result {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{}\n", health::one_line(&why)),
        )
            .into_response(),
    }
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string_pretty(v).unwrap_or_default(),
    )
        .into_response()
}

/// An introspection document from the pool, or 503 while the agent has none yet.
fn from_pool(e: &Endpoints, doc: fn(&Endpoints, &Shared) -> serde_json::Value) -> Response {
    match e.shared() {
        Some(s) => json_response(StatusCode::OK, &doc(e, s)),
        None => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"error": e.readiness().err().unwrap_or_else(|| "starting".into())}),
        ),
    }
}

type Ep = AxState<Arc<Endpoints>>;

fn with_probes(router: Router<Arc<Endpoints>>) -> Router<Arc<Endpoints>> {
    router
        .route(
            "/livez",
            get(|AxState(e): Ep| async move { probe(e.liveness()) }),
        )
        .route(
            "/healthz",
            get(|AxState(e): Ep| async move { probe(e.liveness()) }),
        )
        .route(
            "/readyz",
            get(|AxState(e): Ep| async move { probe(e.readiness()) }),
        )
}

/// The metrics listener's routes: `/metrics` and the probes.
pub fn metrics_router(endpoints: Arc<Endpoints>) -> Router {
    with_probes(Router::new().route(
        "/metrics",
        get(|AxState(e): Ep| async move {
            let mut text = render_build_info();
            if let Some(s) = e.shared() {
                text.push_str(&render_metrics(s));
            }
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
        }),
    ))
    .with_state(endpoints)
}

/// The introspection listener's routes: the `/v1/…` documents, `/` (their list) and the
/// probes.
pub fn introspection_router(endpoints: Arc<Endpoints>) -> Router {
    with_probes(
        Router::new()
            .route(
                "/",
                get(|| async { json_response(StatusCode::OK, &json!(INTROSPECTION_PATHS)) }),
            )
            .route(
                "/v1/state",
                get(|AxState(e): Ep| async move { from_pool(&e, state_document) }),
            )
            .route(
                "/v1/enis",
                get(|AxState(e): Ep| async move { from_pool(&e, |_, s| enis(s)) }),
            )
            .route(
                "/v1/eni-configs",
                get(|| async {
                    json_response(
                        StatusCode::NOT_FOUND,
                        &json!({"error": "custom networking (ENIConfig) is not implemented: \
                            vpc-cni refuses AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=true, so this node \
                            uses no ENIConfig"}),
                    )
                }),
            )
            .route(
                "/v1/ipamd-env-settings",
                get(|AxState(e): Ep| async move { json_response(StatusCode::OK, &e.ipamd_env) }),
            )
            .route(
                "/v1/networkutils-env-settings",
                get(|AxState(e): Ep| async move { json_response(StatusCode::OK, &e.network_env) }),
            ),
    )
    .with_state(endpoints)
}

/// Serves the metrics endpoint and the probes on `addr` until the process ends.
pub async fn serve_metrics(addr: SocketAddr, endpoints: Arc<Endpoints>) {
    serve(addr, metrics_router(endpoints), "metrics").await;
}

/// Serves the introspection API and the probes on `addr` until the process ends.
pub async fn serve_introspection(addr: SocketAddr, endpoints: Arc<Endpoints>) {
    serve(addr, introspection_router(endpoints), "introspection").await;
}

async fn serve(addr: SocketAddr, app: Router, what: &str) {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => {
            info!(%addr, "{what} endpoint listening");
            if let Err(e) = axum::serve(l, app).await {
                warn!(%addr, "{what} endpoint stopped: {e}");
            }
        }
        Err(e) => warn!(%addr, "{what} endpoint not started: cannot bind: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipam::{EniInfo, Pool};

    #[test]
    fn metrics_use_the_reference_names_and_values() {
        let pool = pool_on_eni1(0, &["10.0.0.11", "10.0.0.12"]);
        let dir = tempfile::tempdir().unwrap();
        let mut st = State::new(pool, vec![], dir.path().join("c.json"), String::new());
        st.handle(proto::Request::Add {
            key: proto::AttachmentKey {
                network: "n".into(),
                container_id: "c".into(),
                ifname: "eth0".into(),
            },
            pod: Default::default(),
            netns: String::new(),
        });
        let shared = Shared {
            state: Arc::new(Mutex::new(st)),
            counters: Arc::new(Counters::default()),
            ec2: None,
            limits: Some(ipam::planner::Limits {
                max_enis: 3,
                ips_per_eni: 9,
                max_pods: 27,
            }),
        };
        shared.counters.add.fetch_add(1, Ordering::Relaxed);
        shared.counters.reject(Rejection::Oversized);
        shared.counters.reject(Rejection::Oversized);
        shared.state.lock().unwrap().recovered_from = Some("truncated");
        let text = render_metrics(&shared);
        for line in [
            "awscni_total_ip_addresses 2",
            "awscni_assigned_ip_addresses 1",
            "awscni_assigned_ip_per_eni{eni=\"eni-1\"} 1",
            "awscni_ip_max 27",
            "# TYPE awscni_add_ip_req_count counter",
            "awscni_add_ip_req_count 1",
            "# TYPE vpccni_rejected_client_requests_total counter",
            "vpccni_rejected_client_requests_total{reason=\"oversized\"} 2",
            "vpccni_rejected_client_requests_total{reason=\"busy\"} 0",
            "vpccni_plugin_connections 0",
            "vpccni_checkpoint_write_failures_total 0",
            "vpccni_checkpoint_rebuilds_total{reason=\"truncated\"} 1",
            "vpccni_checkpoint_rebuilds_total{reason=\"corrupt\"} 0",
            "vpccni_rebuilt_ip_addresses 0",
            "vpccni_lost_addresses_total{reason=\"unassigned\"} 0",
            "vpccni_lost_addresses_total{reason=\"eni_detached\"} 0",
            "vpccni_lost_ip_addresses 0",
            "awscni_force_removed_ips 0",
            "awscni_force_removed_enis 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        let j = introspection(&shared);
        assert_eq!(j["pods"][0]["ip"], "10.0.0.11");
    }

    /// A pool of `ips` on eni-1 (10.0.0.0/16, primary 10.0.0.10) at `device`.
    fn pool_on_eni1(device: u32, ips: &[&str]) -> Pool<proto::AttachmentKey> {
        let mut pool = Pool::new(30_000);
        let ips: Vec<std::net::Ipv4Addr> = ips.iter().map(|i| i.parse().unwrap()).collect();
        pool.add_eni(
            EniInfo {
                id: "eni-1".into(),
                device_number: device,
                subnet: "10.0.0.0/16".parse().unwrap(),
                primary_ip: "10.0.0.10".parse().unwrap(),
            },
            &ips,
        )
        .unwrap();
        pool
    }

    /// A pool of `ips` on eni-1 (device 1), with a pod on the first.
    fn shared_with_pod(ips: &[&str]) -> (Shared, tempfile::TempDir) {
        let pool = pool_on_eni1(1, ips);
        let dir = tempfile::tempdir().unwrap();
        let mut st = State::new(pool, vec![], dir.path().join("c.json"), String::new());
        add(&mut st, "c1", "default", "web-0");
        let shared = Shared {
            state: Arc::new(Mutex::new(st)),
            counters: Arc::new(Counters::default()),
            ec2: None,
            limits: None,
        };
        (shared, dir)
    }

    fn add(st: &mut State, container: &str, ns: &str, name: &str) -> proto::Response {
        st.handle(proto::Request::Add {
            key: proto::AttachmentKey {
                network: "vpc-cni".into(),
                container_id: container.into(),
                ifname: "eth0".into(),
            },
            pod: proto::PodRef {
                namespace: ns.into(),
                name: name.into(),
                infra_container_id: None,
            },
            netns: String::new(),
        })
    }

    #[test]
    fn the_state_names_pods_cooldowns_limits_targets_and_probes() {
        use crate::clock::fake::FakeTime;
        let time = FakeTime::new(1_700_000_000_000, 5_000, "boot");
        let pool = pool_on_eni1(1, &["10.0.0.11", "10.0.0.12"]);
        let dir = tempfile::tempdir().unwrap();
        let mut st = State::new(pool, vec![], dir.path().join("c.json"), String::new())
            .with_clock(time.clock());
        st.capacity = Some((
            2,
            "node at its limit of 2 pod IPs: 1 ENIs × 2 secondary IPs for t".into(),
        ));
        add(&mut st, "c1", "default", "web-0");
        add(&mut st, "c2", "default", "web-1");
        let shared = Shared {
            state: Arc::new(Mutex::new(st)),
            counters: Arc::new(Counters::default()),
            ec2: None,
            limits: Some(ipam::planner::Limits {
                max_enis: 1,
                ips_per_eni: 2,
                max_pods: 29,
            }),
        };
        let mut vars = std::collections::HashMap::new();
        vars.insert("WARM_IP_TARGET".to_string(), "3".to_string());
        vars.insert(
            "DISABLE_NETWORK_RESOURCE_PROVISIONING".to_string(),
            "false".to_string(),
        );
        let cfg = crate::config::from_env(&vars).unwrap();
        let health = Arc::new(Health::new());
        let e = Endpoints::new(&cfg, health.clone());
        e.set_shared(shared.clone());
        health.serving();

        // Full: both addresses held, at the limit.
        let v = state_document(&e, &shared);
        let now = v["nowMs"].as_u64().unwrap();
        assert_eq!(now, 1_700_000_000_000);
        assert_eq!(v["pods"][0]["namespace"], "default");
        assert_eq!(v["pods"][0]["pod"], "web-0");
        assert_eq!(v["pods"][0]["ip"], "10.0.0.11");
        assert_eq!(v["pods"][0]["sinceMs"], now);
        assert_eq!(v["pods"][1]["pod"], "web-1");
        assert_eq!(
            v["limits"],
            json!({"maxENIs": 1, "ipsPerENI": 2, "maxPods": 29, "maxIPs": 2, "atLimit": true,
                   "atMaxPods": false,
                   "message": "node at its limit of 2 pod IPs: 1 ENIs × 2 secondary IPs for t"})
        );
        assert_eq!(v["cooldownMs"], 30_000);
        assert_eq!(v["cooling"], json!([]));
        assert_eq!(v["provisioning"], true);
        assert_eq!(
            v["targets"],
            json!({"warmENI": 1, "warmIP": 3, "minimumIP": null})
        );
        assert_eq!(
            v["probes"],
            json!({"live": true, "liveness": null, "ready": true, "readiness": null}),
            "a full node at its limit is ready"
        );
        assert_eq!(v["ec2Refused"], json!(null));
        // Existing fields stay as they were.
        assert_eq!(v["stats"]["assigned"], 2);
        assert_eq!(v["enis"][0]["info"]["id"], "eni-1");

        // web-0 goes: its address cools down, 21 s of 30 left after 9 s.
        shared.state.lock().unwrap().handle(proto::Request::Del {
            key: proto::AttachmentKey {
                network: "vpc-cni".into(),
                container_id: "c1".into(),
                ifname: "eth0".into(),
            },
        });
        time.advance(9_000);
        let v = state_document(&e, &shared);
        assert_eq!(
            v["cooling"],
            json!([{"address": "10.0.0.11", "eni": "eni-1", "releasedMs": now,
                    "leftMs": 21_000}])
        );
        assert_eq!(
            v["limits"]["atLimit"], true,
            "a cooling address is the node's"
        );
        let enis = enis(&shared);
        assert_eq!(
            enis["enis"][0]["addresses"][0],
            json!({"address": "10.0.0.11", "state": "cooling", "releasedMs": now,
                   "leftMs": 21_000})
        );

        // EC2 refused more, and nothing is free: the probes and the state say so.
        time.advance(21_000);
        let r = add(&mut shared.state.lock().unwrap(), "c3", "default", "web-2");
        assert!(matches!(r, proto::Response::Added { .. }), "{r:?}");
        assert_eq!(state_document(&e, &shared)["cooling"], json!([]));
        health.record_growth(Err(&cloud::CloudError::Ec2 {
            call: "AssignPrivateIpAddresses",
            code: Some("UnauthorizedOperation".into()),
            message: "no".into(),
        }));
        let v = state_document(&e, &shared);
        assert_eq!(
            v["ec2Refused"],
            "EC2 refused AssignPrivateIpAddresses: UnauthorizedOperation: no"
        );
        assert_eq!(
            v["probes"]["ready"], true,
            "full at the limit: ready all the same"
        );
        // Below the limit (6 addresses now), the refusal makes the node unready.
        shared.state.lock().unwrap().capacity = Some((6, "node at its limit of 6".into()));
        let below = Shared {
            limits: Some(ipam::planner::Limits {
                max_enis: 3,
                ips_per_eni: 2,
                max_pods: 29,
            }),
            ..shared.clone()
        };
        let v = state_document(&e, &below);
        assert_eq!(v["limits"]["atLimit"], false);
        assert_eq!(v["limits"]["maxIPs"], 6);
        assert_eq!(v["probes"]["ready"], false);
        assert_eq!(
            v["probes"]["readiness"],
            "no address available: EC2 refused AssignPrivateIpAddresses: UnauthorizedOperation: no"
        );
    }

    #[test]
    fn a_lost_address_says_why_in_words() {
        let (shared, _dir) = shared_with_pod(&["10.0.0.11", "10.0.0.12"]);
        {
            let mut st = shared.state.lock().unwrap();
            let now = st.now();
            st.pool_mut().detach_eni("eni-1", now).unwrap();
        }
        let v = introspection(&shared);
        let lost = &v["lost"][0];
        assert_eq!(lost["namespace"], "default");
        assert_eq!(lost["pod"], "web-0");
        assert_eq!(lost["reason"], "eni_detached");
        assert_eq!(lost["why"], ipam::LostReason::EniDetached.to_string());
        assert_eq!(v["pods"], json!([]));
        assert_eq!(cooldown_left_ms(1_000, 30_000, 40_000), 0);
        assert_eq!(cooldown_left_ms(1_000, 30_000, 2_000), 29_000);
    }

    /// Serves `router` on 127.0.0.1 (a free port); returns the address.
    async fn serve_local(router: Router) -> SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, router).await });
        addr
    }

    /// `GET path` over HTTP/1.1: the status and the body.
    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut raw = String::new();
        c.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, body.to_string())
    }

    #[tokio::test]
    async fn probes_and_documents_before_and_after_start_up() {
        let mut vars = std::collections::HashMap::new();
        vars.insert("WARM_IP_TARGET".to_string(), "3".to_string());
        let cfg = crate::config::from_env(&vars).unwrap();
        let health = Arc::new(Health::new());
        let e = Arc::new(Endpoints::new(&cfg, health.clone()));
        let metrics = serve_local(metrics_router(e.clone())).await;
        let intro = serve_local(introspection_router(e.clone())).await;

        // Starting: alive, not ready (with the step), the documents not there yet.
        health.step("setting up the host network");
        for addr in [metrics, intro] {
            assert_eq!(get(addr, "/livez").await, (200, "ok\n".into()));
            assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
            let (code, body) = get(addr, "/readyz").await;
            assert_eq!(code, 503);
            assert!(
                body.starts_with("conflist not written yet: setting up the host network (for "),
                "{body}"
            );
        }
        let (code, text) = get(metrics, "/metrics").await;
        assert_eq!(code, 200);
        let build = format!(
            "vpccni_build_info{{version=\"{}\",commit=\"{}\"}} 1",
            crate::build_info::VERSION,
            crate::build_info::COMMIT
        );
        assert!(text.lines().any(|l| l == build), "{text}");
        assert!(!text.contains("awscni_"), "{text}");
        let (code, body) = get(intro, "/v1/state").await;
        assert_eq!(code, 503);
        assert!(body.contains("conflist not written yet"), "{body}");
        // Known from the configuration at once.
        let (code, body) = get(intro, "/v1/ipamd-env-settings").await;
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["WARM_IP_TARGET"], "3");
        assert_eq!(v["WARM_ENI_TARGET"], "1");
        assert!(
            v.get("AWS_VPC_ENI_MTU").is_none(),
            "a network variable: {v}"
        );
        let (_, body) = get(intro, "/v1/networkutils-env-settings").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["AWS_VPC_ENI_MTU"], "9001");
        assert_eq!(v["AWS_VPC_K8S_CNI_RANDOMIZESNAT"], "prng");
        let (code, body) = get(intro, "/v1/eni-configs").await;
        assert_eq!(code, 404);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["error"].as_str().unwrap().contains("not implemented"),
            "{v}"
        );
        let (code, body) = get(intro, "/").await;
        assert_eq!(code, 200);
        assert!(body.contains("/v1/enis"), "{body}");
        assert_eq!(get(metrics, "/v1/state").await.0, 404, "introspection only");

        // Serving: ready while the pool can serve.
        let (shared, _dir) = shared_with_pod(&["10.0.0.11", "10.0.0.12"]);
        e.set_shared(shared.clone());
        health.serving();
        assert_eq!(get(metrics, "/readyz").await, (200, "ok\n".into()));
        let (_, text) = get(metrics, "/metrics").await;
        assert!(text.lines().any(|l| l == build), "{text}");
        assert!(
            text.lines().any(|l| l == "awscni_assigned_ip_addresses 1"),
            "{text}"
        );

        let (code, body) = get(intro, "/v1/enis").await;
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (v["totalIPs"].as_u64(), v["assignedIPs"].as_u64()),
            (Some(2), Some(1))
        );
        let eni = &v["enis"][0];
        assert_eq!(eni["id"], "eni-1");
        assert_eq!(eni["routeTable"], 2);
        assert_eq!(eni["isPrimary"], false);
        let a = &eni["addresses"];
        assert_eq!(a[0]["address"], "10.0.0.11");
        assert_eq!(a[0]["state"], "assigned");
        assert_eq!(a[0]["pod"]["name"], "web-0");
        assert_eq!(a[0]["pod"]["namespace"], "default");
        assert_eq!(a[0]["pod"]["containerID"], "c1");
        assert_eq!(a[1], json!({"address": "10.0.0.12", "state": "available"}));

        // The last free address taken and EC2 refusing more: not ready, and why.
        shared.state.lock().unwrap().handle(proto::Request::Add {
            key: proto::AttachmentKey {
                network: "vpc-cni".into(),
                container_id: "c2".into(),
                ifname: "eth0".into(),
            },
            pod: Default::default(),
            netns: String::new(),
        });
        assert_eq!(
            get(metrics, "/readyz").await.0,
            200,
            "more are being asked for"
        );
        health.record_growth(Err(&cloud::CloudError::Ec2 {
            call: "AssignPrivateIpAddresses",
            code: Some("UnauthorizedOperation".into()),
            message: "You are not authorized\nto perform this operation.".into(),
        }));
        assert_eq!(
            get(intro, "/readyz").await,
            (
                503,
                "no address available: EC2 refused AssignPrivateIpAddresses: \
                 UnauthorizedOperation: You are not authorized to perform this operation.\n"
                    .into()
            )
        );
        assert_eq!(get(intro, "/livez").await.0, 200, "alive all the same");
    }
}
