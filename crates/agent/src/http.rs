//! Metrics (Prometheus text, `:61678/metrics`) and introspection (JSON, `127.0.0.1:61679`).
//!
//! Metric names are the reference's `awscni_*` names, so existing dashboards and alerts keep
//! working. The exposition is written here rather than with prometheus-client because that
//! crate encodes OpenMetrics, which renames every counter to `<name>_total` — exactly the
//! names users' queries must not lose.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State as AxState;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;
use tracing::{info, warn};

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
            f64::from(l.max_enis * l.ips_per_eni),
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
    }
    out.0
}

/// The introspection document (`/v1/state`).
pub fn introspection(s: &Shared) -> serde_json::Value {
    let st = s.state.lock().unwrap_or_else(|p| p.into_inner());
    let now = st.now();
    let pods: Vec<serde_json::Value> = st
        .pool()
        .assignments()
        .into_iter()
        .map(|(k, a)| {
            json!({
                "network": k.network, "containerID": k.container_id, "ifName": k.ifname,
                "ip": a.ip, "eni": a.eni.id, "deviceNumber": a.eni.device_number,
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
                "lostMs": l.as_ref().map(|l| l.lost_ms),
                "parkedOn": l.as_ref().and_then(|l| l.parked_on.clone()),
            })
        })
        .collect();
    json!({
        "checkpointRebuiltFrom": st.recovered_from,
        "checkpointWriteFailures": st.write_failures(),
        "stats": st.pool().stats(now),
        "enis": st.pool().usage(now),
        "pods": pods,
        "lost": lost,
        "drift": st.drift,
        "pending": st.pending,
        "blocker": st.blocker,
        "intents": st.intents.values().collect::<Vec<_>>(),
        "ec2": s.ec2.as_ref().map(|e| e.api_stats()).unwrap_or_default(),
    })
}

/// Serves the metrics endpoint on `addr` until the process ends.
pub async fn serve_metrics(addr: SocketAddr, shared: Shared) {
    let app = Router::new()
        .route(
            "/metrics",
            get(|AxState(s): AxState<Shared>| async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    render_metrics(&s),
                )
                    .into_response()
            }),
        )
        .with_state(shared);
    serve(addr, app, "metrics").await;
}

/// Serves the introspection API on `addr` until the process ends.
pub async fn serve_introspection(addr: SocketAddr, shared: Shared) {
    let app = Router::new()
        .route(
            "/v1/state",
            get(|AxState(s): AxState<Shared>| async move {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    serde_json::to_string_pretty(&introspection(&s)).unwrap_or_default(),
                )
                    .into_response()
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(shared);
    serve(addr, app, "introspection").await;
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
        let mut pool = Pool::new(30_000);
        pool.add_eni(
            EniInfo {
                id: "eni-1".into(),
                device_number: 0,
                subnet: "10.0.0.0/16".parse().unwrap(),
                primary_ip: "10.0.0.10".parse().unwrap(),
            },
            &["10.0.0.11".parse().unwrap(), "10.0.0.12".parse().unwrap()],
        )
        .unwrap();
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
}
