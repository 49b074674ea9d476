//! The agent's Kubernetes API client (`kube`): the node's `status.capacity.pods` and the labels
//! and annotations that name its ENIConfig (a watch on this node only, no polling), the
//! ENIConfigs (custom networking: a watch), events on the node when it cannot get addresses,
//! and the `vpc.amazonaws.com/pod-ips` pod annotation (`ANNOTATE_POD_IP`).
//!
//! Nothing here is in the plugin's path: the agent starts and serves pods from its checkpoint
//! and EC2 while the API server is unreachable, and says so; what it has to tell the API (an
//! event, an annotation) waits in a bounded queue and goes once the API server answers again.
//! The client comes from `KUBECONFIG` when it is set, else from the pod's service account
//! (in-cluster); with neither, these features are off and the agent says so at start.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Event, EventSource, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The pod annotation `ANNOTATE_POD_IP` writes (the reference's).
pub const POD_IPS_ANNOTATION: &str = "vpc.amazonaws.com/pod-ips";

/// The default node label and annotation naming the node's ENIConfig
/// (`ENI_CONFIG_LABEL_DEF`, `ENI_CONFIG_ANNOTATION_DEF`).
pub const ENI_CONFIG_KEY: &str = "k8s.amazonaws.com/eniConfig";
/// The node label that names the ENIConfig before anything else (the reference's).
pub const EXTERNAL_ENI_CONFIG_LABEL: &str = "vpc.amazonaws.com/externalEniConfig";
/// The ENIConfig a node uses when nothing names one.
pub const DEFAULT_ENI_CONFIG: &str = "default";

/// The `ENIConfig` custom resource (`crd.k8s.amazonaws.com/v1alpha1`, cluster-scoped; the
/// reference's schema): the subnet and security groups of a node's ENIs with custom networking.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct EniConfig {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: EniConfigSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EniConfigSpec {
    #[serde(default)]
    pub subnet: String,
    #[serde(default)]
    pub security_groups: Vec<String>,
}

impl k8s_openapi::Resource for EniConfig {
    const API_VERSION: &'static str = "crd.k8s.amazonaws.com/v1alpha1";
    const GROUP: &'static str = "crd.k8s.amazonaws.com";
    const KIND: &'static str = "ENIConfig";
    const VERSION: &'static str = "v1alpha1";
    const URL_PATH_SEGMENT: &'static str = "eniconfigs";
    type Scope = k8s_openapi::ClusterResourceScope;
}

impl k8s_openapi::ListableResource for EniConfig {
    const LIST_KIND: &'static str = "ENIConfigList";
}

impl k8s_openapi::Metadata for EniConfig {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The name of the node's ENIConfig, as the reference finds it: the label
/// [`EXTERNAL_ENI_CONFIG_LABEL`], else the annotation `annotation`, else the label `label`,
/// else [`DEFAULT_ENI_CONFIG`].
pub fn eni_config_name(node: &NodeView, label: &str, annotation: &str) -> String {
    node.labels
        .get(EXTERNAL_ENI_CONFIG_LABEL)
        .or_else(|| node.annotations.get(annotation))
        .or_else(|| node.labels.get(label))
        .cloned()
        .unwrap_or_else(|| DEFAULT_ENI_CONFIG.to_string())
}

/// Calls `apply` with the node's ENIConfig (custom networking) each time the node's naming of
/// it or the ENIConfigs change: unknown until both have been read.
pub async fn follow_eni_config(
    mut node: tokio::sync::watch::Receiver<Option<NodeView>>,
    mut configs: tokio::sync::watch::Receiver<Option<BTreeMap<String, EniConfigSpec>>>,
    label: String,
    annotation: String,
    apply: impl Fn(crate::provisioner::EniConfigState),
) {
    use crate::provisioner::EniConfigState;
    loop {
        let state = match (&*node.borrow_and_update(), &*configs.borrow_and_update()) {
            (Some(n), Some(all)) => {
                let name = eni_config_name(n, &label, &annotation);
                match all.get(&name) {
                    Some(spec) => EniConfigState::Found {
                        name,
                        subnet: spec.subnet.clone(),
                        security_groups: spec.security_groups.clone(),
                    },
                    None => EniConfigState::Missing { name },
                }
            }
            _ => EniConfigState::Unknown,
        };
        apply(state);
        tokio::select! {
            r = node.changed() => if r.is_err() { return },
            r = configs.changed() => if r.is_err() { return },
        }
    }
}

/// Watches the ENIConfigs and publishes them by name; runs until the process ends, through
/// API server outages (retried with kube's backoff).
pub async fn watch_eni_configs(
    client: kube::Client,
    tx: tokio::sync::watch::Sender<Option<BTreeMap<String, EniConfigSpec>>>,
) {
    let api: Api<EniConfig> = Api::all(client);
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    let mut stream = std::pin::pin!(stream);
    let mut next: BTreeMap<String, EniConfigSpec> = BTreeMap::new();
    let mut down = false;
    while let Some(item) = stream.next().await {
        let event = match item {
            Ok(e) => e,
            Err(e) => {
                if !down {
                    warn!("watching the ENIConfigs through the Kubernetes API: {e}; retrying");
                    down = true;
                }
                continue;
            }
        };
        down = false;
        let name = |c: &EniConfig| c.metadata.name.clone().unwrap_or_default();
        match event {
            watcher::Event::Init => next.clear(),
            watcher::Event::InitApply(c) => {
                next.insert(name(&c), c.spec);
            }
            watcher::Event::InitDone => {
                tx.send_replace(Some(next.clone()));
            }
            watcher::Event::Apply(c) => {
                tx.send_modify(|m| {
                    m.get_or_insert_default().insert(name(&c), c.spec.clone());
                });
                next.insert(name(&c), c.spec);
            }
            watcher::Event::Delete(c) => {
                tx.send_modify(|m| {
                    if let Some(m) = m {
                        m.remove(&name(&c));
                    }
                });
                next.remove(&name(&c));
            }
        }
    }
}

/// How many events or annotations wait for the API server at most; older ones go first.
const QUEUE: usize = 1024;
/// Pause between tries while the API server does not answer.
const RETRY: Duration = Duration::from_secs(2);
/// The same event is not sent again within this time.
const EVENT_REPEAT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("reading the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("the pod's service account (in-cluster configuration): {0}")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("building the Kubernetes API client: {0}")]
    Client(#[from] kube::Error),
}

/// A client for the API server: from the kubeconfig `KUBECONFIG` names, else in-cluster (the
/// service account); `None` when the agent runs neither way.
pub async fn client_from_env(
    kubeconfig: Option<&str>,
    in_cluster: bool,
) -> Result<Option<kube::Client>, K8sError> {
    let config = if let Some(path) = kubeconfig {
        let kc =
            kube::config::Kubeconfig::read_from(path).map_err(|source| K8sError::Kubeconfig {
                path: path.to_string(),
                source,
            })?;
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .map_err(|source| K8sError::Kubeconfig {
                path: path.to_string(),
                source,
            })?
    } else if in_cluster {
        kube::Config::incluster()?
    } else {
        return Ok(None);
    };
    Ok(Some(kube::Client::try_from(config)?))
}

/// What the agent reads of its node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeView {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// `status.capacity.pods`.
    pub capacity_pods: Option<u32>,
}

impl NodeView {
    fn of(node: &Node) -> NodeView {
        NodeView {
            labels: node.metadata.labels.clone().unwrap_or_default(),
            annotations: node.metadata.annotations.clone().unwrap_or_default(),
            capacity_pods: node
                .status
                .as_ref()
                .and_then(|s| s.capacity.as_ref())
                .and_then(|c| c.get("pods"))
                .and_then(|q| q.0.parse().ok()),
        }
    }
}

/// Watches the node `name` (a watch on this node only) and publishes what it reads; runs until
/// the process ends, through API server outages (logged once each, retried with kube's
/// backoff).
pub async fn watch_node(
    client: kube::Client,
    name: String,
    tx: tokio::sync::watch::Sender<Option<NodeView>>,
) {
    let api: Api<Node> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let stream = watcher(api, cfg).default_backoff().applied_objects();
    let mut stream = std::pin::pin!(stream);
    let mut down = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(node) => {
                if down {
                    info!(node = %name, "the Kubernetes API server answers again");
                    down = false;
                }
                let view = NodeView::of(&node);
                tx.send_if_modified(|old| {
                    let changed = old.as_ref() != Some(&view);
                    *old = Some(view);
                    changed
                });
            }
            Err(e) => {
                if !down {
                    warn!(node = %name, "watching the node through the Kubernetes API: {e}; pods are still served (from the checkpoint and EC2), retrying");
                    down = true;
                }
            }
        }
    }
}

/// Calls `apply` with the node's `status.capacity.pods` each time it changes (`None` while the
/// node has not been read, or lists none).
pub async fn follow_capacity(
    mut rx: tokio::sync::watch::Receiver<Option<NodeView>>,
    apply: impl Fn(Option<u32>),
) {
    let mut last = None;
    loop {
        let now = rx
            .borrow_and_update()
            .as_ref()
            .and_then(|v| v.capacity_pods);
        if now != last {
            apply(now);
            last = now;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Sends an event on the node each time the provisioner's blocker (why it cannot add
/// addresses, `(reason, message)`, read with `blocker` every 2 s from the agent's own state)
/// becomes a new one. Nothing here waits on the API server.
pub async fn events_from_blockers(
    blocker: impl Fn() -> Option<(&'static str, String)>,
    outbox: Outbox,
) {
    let mut last: Option<String> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let now = blocker();
        if let Some((reason, message)) = &now
            && last.as_ref() != Some(message)
        {
            outbox.event(NodeEvent {
                reason,
                message: message.clone(),
            });
        }
        last = now.map(|(_, m)| m);
    }
}

/// An event on the node: `reason` (CamelCase) and what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEvent {
    pub reason: &'static str,
    pub message: String,
}

/// Sends what the agent has to tell the API server, in order, waiting while it does not
/// answer: events on the node, and pod IP annotations.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Message>,
    /// Dropped because the queue was full.
    pub dropped: Arc<std::sync::atomic::AtomicU64>,
    recent: Arc<Mutex<BTreeMap<String, tokio::time::Instant>>>,
}

#[derive(Debug)]
enum Message {
    Event(NodeEvent),
    PodIp {
        namespace: String,
        name: String,
        ip: Ipv4Addr,
    },
}

impl Outbox {
    /// The outbox and its sender task (spawn it).
    pub fn new(client: kube::Client, node: String) -> (Outbox, impl Future<Output = ()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let outbox = Outbox {
            tx,
            dropped: Arc::default(),
            recent: Arc::default(),
        };
        (outbox, send_loop(client, node, rx))
    }

    /// An event on the node, unless the same one went out less than 10 minutes ago.
    pub fn event(&self, e: NodeEvent) {
        let now = tokio::time::Instant::now();
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            recent.retain(|_, at| now.duration_since(*at) < EVENT_REPEAT);
            if recent.contains_key(&e.message) {
                return;
            }
            recent.insert(e.message.clone(), now);
        }
        self.put(Message::Event(e));
    }

    /// The pod's address, for its `vpc.amazonaws.com/pod-ips` annotation.
    pub fn pod_ip(&self, namespace: &str, name: &str, ip: Ipv4Addr) {
        self.put(Message::PodIp {
            namespace: namespace.to_string(),
            name: name.to_string(),
            ip,
        });
    }

    fn put(&self, m: Message) {
        if self.tx.try_send(m).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

async fn send_loop(client: kube::Client, node: String, mut rx: mpsc::Receiver<Message>) {
    let mut pending: VecDeque<Message> = VecDeque::new();
    let mut down = false;
    loop {
        if pending.is_empty() {
            match rx.recv().await {
                Some(m) => pending.push_back(m),
                None => return,
            }
        }
        while let Ok(m) = rx.try_recv() {
            pending.push_back(m);
        }
        let Some(m) = pending.front() else { continue };
        match send(&client, &node, m).await {
            Ok(()) => {
                if down {
                    info!("the Kubernetes API server answers again: sending what waited");
                    down = false;
                }
                pending.pop_front();
            }
            // The pod is gone: nothing to annotate.
            Err(kube::Error::Api(s)) if s.code == 404 => {
                pending.pop_front();
            }
            Err(e) => {
                if !down {
                    warn!(
                        waiting = pending.len(),
                        "the Kubernetes API server does not take the agent's events and annotations ({e}); they wait and go when it answers"
                    );
                    down = true;
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

async fn send(client: &kube::Client, node: &str, m: &Message) -> Result<(), kube::Error> {
    match m {
        Message::Event(e) => {
            let api: Api<Event> = Api::namespaced(client.clone(), "default");
            api.create(&PostParams::default(), &node_event(node, e))
                .await
                .map(drop)
        }
        Message::PodIp {
            namespace,
            name,
            ip,
        } => {
            let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
            let patch = serde_json::json!({
                "metadata": {"annotations": {POD_IPS_ANNOTATION: ip.to_string()}}
            });
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop)
        }
    }
}

/// The core/v1 Event for `e` on the node (what `kubectl describe node` lists).
fn node_event(node: &str, e: &NodeEvent) -> Event {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{node}.")),
            namespace: Some("default".into()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(node.to_string()),
            ..ObjectReference::default()
        },
        reason: Some(e.reason.to_string()),
        message: Some(e.message.clone()),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some("vpc-cni-agent".into()),
            host: Some(node.to_string()),
        }),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        reporting_component: Some("vpc-cni-agent".into()),
        reporting_instance: Some(node.to_string()),
        ..Event::default()
    }
}

#[cfg(test)]
mod tests;
