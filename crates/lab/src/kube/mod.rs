//! The lab's Kubernetes API: a `lab_kube` server the lab daemon runs for the lab's lifetime,
//! seeded with a `Node` per node instance and the custom-networking `ENIConfig`s, reachable
//! from inside every instance's namespace at `http://127.0.0.1:6443` (as IMDS and the EC2 proxy
//! are at 1338 and 1339) and from the root namespace on a loopback port; the agents the lab
//! starts get [`agent_env`] (`KUBECONFIG`, `MY_NODE_NAME`).
//!
//! Its control, for `vpc-lab kube …`, the lab's runtime (`crate::pods` writes the `Pod` of a
//! runtime pod as a kubelet would) and tests: small requests over the daemon's unix socket
//! ([`paths::kube_control_socket`]) that read and write the store directly, so they work while
//! the API server is stopped ([`stop`]). What the server emulates and does not:
//! docs/testing.md, "The lab's Kubernetes API (lab-kube)".

pub mod objects;
pub(crate) mod serve;

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use lab_kube::EniConfig;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::paths;

/// Where the API listens inside every instance's namespace (kube-apiserver's port; plain HTTP).
pub const API_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 6443);

/// The server URL agents in the instances use (the one in [`paths::kubeconfig`]).
pub fn instance_url() -> String {
    let (ip, port) = API_ADDR;
    format!("http://{}:{port}", Ipv4Addr::from(ip))
}

/// What every agent the lab starts on `instance` gets in its environment, as a node's agent
/// would reach its cluster: the kubeconfig of the lab's API and the node's name (the
/// DaemonSet's `MY_NODE_NAME`, from `spec.nodeName`).
pub fn agent_env(instance: &str) -> Vec<(String, String)> {
    vec![
        kubeconfig_env(),
        ("MY_NODE_NAME".to_string(), instance.to_string()),
    ]
}

/// `KUBECONFIG` for the lab's API (the DaemonSet's pod gets only this: its manifest sets
/// `MY_NODE_NAME` from `spec.nodeName`, which the lab's kubelet resolves).
pub fn kubeconfig_env() -> (String, String) {
    (
        "KUBECONFIG".to_string(),
        paths::kubeconfig().display().to_string(),
    )
}

/// `vpc-lab kube status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeStatus {
    /// Whether the API answers (`false` after [`stop`]).
    pub serving: bool,
    /// The URL in the instances' namespaces.
    pub instance_url: String,
    /// The URL in the root namespace.
    pub host_url: String,
    pub kubeconfig: PathBuf,
    pub host_kubeconfig: PathBuf,
    /// The store's newest resourceVersion.
    pub resource_version: u64,
    pub nodes: usize,
    pub pods: usize,
    pub events: usize,
    pub eniconfigs: usize,
}

impl KubeStatus {
    /// The root namespace's address of the API.
    pub fn host_addr(&self) -> Result<SocketAddr> {
        self.host_url
            .strip_prefix("http://")
            .and_then(|a| a.parse().ok())
            .with_context(|| {
                format!(
                    "the lab API's URL {:?} is not http://ip:port",
                    self.host_url
                )
            })
    }
}

/// A request to the daemon's control socket (one JSON line), answered by a [`Reply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub(crate) enum Request {
    Status,
    Stop,
    Start,
    Nodes,
    Events {
        node: Option<String>,
    },
    Pod {
        namespace: String,
        name: String,
    },
    EniConfigs,
    Label {
        node: String,
        key: String,
        value: Option<String>,
    },
    Annotate {
        node: String,
        key: String,
        value: Option<String>,
    },
    Capacity {
        node: String,
        pods: u32,
    },
    PutEniConfig {
        name: String,
        subnet: String,
        security_groups: Vec<String>,
    },
    DeleteEniConfig {
        name: String,
    },
    /// A runtime pod is about to be created on `node`: its `Pod`, unless one exists.
    PodScheduled {
        namespace: String,
        name: String,
        node: String,
    },
    /// Its sandbox got its addresses.
    PodRunning {
        namespace: String,
        name: String,
        node: String,
        ips: Vec<Ipv4Addr>,
    },
    /// It is gone (its `Pod` is deleted if it is on `node`).
    PodDeleted {
        namespace: String,
        name: String,
        node: String,
    },
}

/// The answer: `value` or `error`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Reply {
    #[serde(default)]
    pub value: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The longest request or reply line (a list of many pods' events fits).
pub(crate) const MAX_LINE: u64 = 64 << 20;

/// Sends `req` to the daemon and returns its value.
fn call(req: &Request) -> Result<Value> {
    let sock = paths::kube_control_socket();
    let mut s = UnixStream::connect(&sock).with_context(|| {
        format!(
            "connecting to the lab's Kubernetes API control socket {} (is the lab up? `vpc-lab up`)",
            sock.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line)
        .with_context(|| format!("writing to {}", sock.display()))?;
    let mut answer = String::new();
    BufReader::new(std::io::Read::take(&s, MAX_LINE))
        .read_line(&mut answer)
        .with_context(|| format!("reading the answer on {}", sock.display()))?;
    if answer.is_empty() {
        bail!(
            "the lab daemon closed {} without answering (see {})",
            sock.display(),
            paths::daemon_log().display()
        );
    }
    let reply: Reply = serde_json::from_str(&answer)
        .with_context(|| format!("parsing the lab daemon's answer {answer:?}"))?;
    match reply.error {
        Some(e) => bail!("{e}"),
        None => Ok(reply.value),
    }
}

fn call_as<T: DeserializeOwned>(req: &Request) -> Result<T> {
    let v = call(req)?;
    serde_json::from_value(v).context("decoding the lab daemon's answer")
}

/// `vpc-lab kube status`: where the API is and whether it answers.
pub fn status() -> Result<KubeStatus> {
    call_as(&Request::Status)
}

/// `vpc-lab kube stop`: the API server stops answering (open watches end, connections are
/// refused) in every namespace; the objects stay, and [`start`] serves them again on the same
/// addresses.
pub fn stop() -> Result<()> {
    call(&Request::Stop).map(drop)
}

/// `vpc-lab kube start`: serves again after [`stop`] (a no-op when serving).
pub fn start() -> Result<()> {
    call(&Request::Start).map(drop)
}

/// `vpc-lab kube nodes`: every `Node`.
pub fn nodes() -> Result<Vec<Node>> {
    call_as(&Request::Nodes)
}

/// One `Node`.
pub fn node(name: &str) -> Result<Option<Node>> {
    Ok(nodes()?
        .into_iter()
        .find(|n| n.metadata.name.as_deref() == Some(name)))
}

/// `vpc-lab kube events [--node N]`: every core/v1 `Event`, or those that concern node `N`
/// (about the `Node`, reported from its host, or about a pod scheduled there).
pub fn events(node: Option<&str>) -> Result<Vec<Event>> {
    call_as(&Request::Events {
        node: node.map(str::to_string),
    })
}

/// `vpc-lab kube pod NS/NAME`: the `Pod`, if the API holds it.
pub fn pod(namespace: &str, name: &str) -> Result<Option<Pod>> {
    call_as(&Request::Pod {
        namespace: namespace.to_string(),
        name: name.to_string(),
    })
}

/// Every `ENIConfig`.
pub fn eniconfigs() -> Result<Vec<EniConfig>> {
    call_as(&Request::EniConfigs)
}

/// `vpc-lab kube label NODE K=V`.
pub fn label(node: &str, key: &str, value: &str) -> Result<()> {
    objects::check_key(key)?;
    if !lab_kube::valid_label_value(value) {
        // The same check and message as `vpc-lab kube label` gets.
        objects::parse_key_value(&format!("{key}={value}"), false)?;
    }
    call(&Request::Label {
        node: node.to_string(),
        key: key.to_string(),
        value: Some(value.to_string()),
    })
    .map(drop)
}

/// `vpc-lab kube unlabel NODE K` (no error when the label is not there).
pub fn unlabel(node: &str, key: &str) -> Result<()> {
    objects::check_key(key)?;
    call(&Request::Label {
        node: node.to_string(),
        key: key.to_string(),
        value: None,
    })
    .map(drop)
}

/// `vpc-lab kube annotate NODE K=V`.
pub fn annotate(node: &str, key: &str, value: &str) -> Result<()> {
    objects::check_key(key)?;
    call(&Request::Annotate {
        node: node.to_string(),
        key: key.to_string(),
        value: Some(value.to_string()),
    })
    .map(drop)
}

/// `vpc-lab kube unannotate NODE K`.
pub fn unannotate(node: &str, key: &str) -> Result<()> {
    objects::check_key(key)?;
    call(&Request::Annotate {
        node: node.to_string(),
        key: key.to_string(),
        value: None,
    })
    .map(drop)
}

/// `vpc-lab kube capacity NODE PODS`: `status.capacity.pods` and `status.allocatable.pods`.
pub fn capacity(node: &str, pods: u32) -> Result<()> {
    call(&Request::Capacity {
        node: node.to_string(),
        pods,
    })
    .map(drop)
}

/// `vpc-lab kube eniconfig NAME SUBNET SG[,SG]`: creates or replaces the `ENIConfig`.
pub fn eniconfig(name: &str, subnet: &str, security_groups: &[String]) -> Result<()> {
    call(&Request::PutEniConfig {
        name: name.to_string(),
        subnet: subnet.to_string(),
        security_groups: security_groups.to_vec(),
    })
    .map(drop)
}

/// `vpc-lab kube eniconfig-delete NAME`; whether it existed.
pub fn eniconfig_delete(name: &str) -> Result<bool> {
    call_as(&Request::DeleteEniConfig {
        name: name.to_string(),
    })
}

/// Whether the daemon's control socket exists (the lab runs a Kubernetes API).
pub fn available() -> bool {
    paths::kube_control_socket().exists()
}

/// The lab's runtime creates a pod on `node`: its `Pod` (scheduled there) is written unless
/// the API holds one; whether it was written.
pub fn pod_scheduled(namespace: &str, name: &str, node: &str) -> Result<bool> {
    call_as(&Request::PodScheduled {
        namespace: namespace.to_string(),
        name: name.to_string(),
        node: node.to_string(),
    })
}

/// The pod's sandbox has `ips`: its `Pod` is `Running` with them (if it is on `node`).
pub fn pod_running(namespace: &str, name: &str, node: &str, ips: &[Ipv4Addr]) -> Result<()> {
    call(&Request::PodRunning {
        namespace: namespace.to_string(),
        name: name.to_string(),
        node: node.to_string(),
        ips: ips.to_vec(),
    })
    .map(drop)
}

/// The pod is gone from `node`: its `Pod` is deleted (if it is on `node`); whether it was.
pub fn pod_deleted(namespace: &str, name: &str, node: &str) -> Result<bool> {
    call_as(&Request::PodDeleted {
        namespace: namespace.to_string(),
        name: name.to_string(),
        node: node.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_json_line_each() {
        let r = Request::PodScheduled {
            namespace: "default".into(),
            name: "pod-a".into(),
            node: "instance1".into(),
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(!s.contains('\n'));
        assert!(s.contains(r#""op":"pod-scheduled""#), "{s}");
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        let s = serde_json::to_string(&Request::Status).unwrap();
        assert_eq!(s, r#"{"op":"status"}"#);
        let reply = Reply {
            value: Value::Null,
            error: Some("no node \"x\"".into()),
        };
        let back: Reply = serde_json::from_str(&serde_json::to_string(&reply).unwrap()).unwrap();
        assert_eq!(back, reply);
    }

    #[test]
    fn agents_get_the_kubeconfig_and_their_node_name() {
        let env: std::collections::HashMap<String, String> =
            agent_env("instance1").into_iter().collect();
        assert_eq!(env["KUBECONFIG"], "/run/vpc-lab/kube/kubeconfig");
        assert_eq!(env["MY_NODE_NAME"], "instance1");
        assert_eq!(instance_url(), "http://127.0.0.1:6443");
    }
}
