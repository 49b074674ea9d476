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

/// Request counters kept by the plugin socket.
#[derive(Debug, Default)]
pub struct Counters {
    pub add: AtomicU64,
    pub del: AtomicU64,
    /// ADDs that found no free address.
    pub no_address: AtomicU64,
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
    let (stats, usage) = {
        let st = s.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = st.now();
        (st.pool().stats(now), st.pool().usage(now))
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

fn introspection(s: &Shared) -> serde_json::Value {
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
    json!({
        "stats": st.pool().stats(now),
        "enis": st.pool().usage(now),
        "pods": pods,
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
        let text = render_metrics(&shared);
        for line in [
            "awscni_total_ip_addresses 2",
            "awscni_assigned_ip_addresses 1",
            "awscni_assigned_ip_per_eni{eni=\"eni-1\"} 1",
            "awscni_ip_max 27",
            "# TYPE awscni_add_ip_req_count counter",
            "awscni_add_ip_req_count 1",
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
