//! A CRI (Kubernetes Container Runtime Interface, `runtime.v1`) client over a unix socket, with
//! the calls a kubelet makes to give a pod its network: RunPodSandbox, PodSandboxStatus,
//! StopPodSandbox, RemovePodSandbox, ListPodSandbox; plus a concurrent burst of sandboxes.
//! The calls it makes to run a pod's containers (CreateContainer, StartContainer,
//! ContainerStatus, StopContainer, RemoveContainer, ListContainers, and ImageStatus of the
//! image service) serve the lab's kubelet (`lab::kubelet`), which builds the configurations.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use serde::Serialize;
use testkit::stats::ms;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::util::Stats;

/// The CRI `runtime.v1` types, for callers that build their own sandbox and container
/// configurations (the lab's kubelet).
pub use k8s_cri::v1 as api;

/// A connected CRI runtime service client. Cheap to clone: clones share one HTTP/2 connection
/// and their calls run concurrently.
#[derive(Debug, Clone)]
pub struct Cri {
    client: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    socket: PathBuf,
}

/// What a sandbox is created with.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub name: String,
    pub namespace: String,
    /// Pod UID; derived from namespace and name when empty.
    pub uid: String,
    pub attempt: u32,
}

impl SandboxSpec {
    pub fn new(name: &str, namespace: &str) -> SandboxSpec {
        SandboxSpec {
            name: name.to_string(),
            namespace: namespace.to_string(),
            uid: String::new(),
            attempt: 0,
        }
    }

    fn uid(&self) -> String {
        if self.uid.is_empty() {
            format!("{}-{}-uid", self.namespace, self.name)
        } else {
            self.uid.clone()
        }
    }

    fn to_config(&self) -> api::PodSandboxConfig {
        api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid(),
                namespace: self.namespace.clone(),
                attempt: self.attempt,
            }),
            hostname: self.name.clone(),
            linux: Some(api::LinuxPodSandboxConfig {
                security_context: Some(api::LinuxSandboxSecurityContext {
                    namespace_options: Some(api::NamespaceOption {
                        network: api::NamespaceMode::Pod as i32,
                        pid: api::NamespaceMode::Pod as i32,
                        ipc: api::NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// A sandbox as PodSandboxStatus reports it.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxInfo {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub attempt: u32,
    /// `SANDBOX_READY` or `SANDBOX_NOTREADY`.
    pub state: String,
    /// The pod IP the CNI plugin gave (empty when there is none).
    pub ip: String,
    pub additional_ips: Vec<String>,
    /// The sandbox's network namespace path (from the verbose info; containerd: `/run/netns/cni-<uuid>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

/// One line of ListPodSandbox.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxSummary {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub state: String,
}

/// RuntimeReady / NetworkReady as the runtime's Status call reports them.
#[derive(Debug, Clone, Serialize)]
pub struct RuntimeStatus {
    pub runtime_name: String,
    pub runtime_version: String,
    pub runtime_ready: bool,
    pub network_ready: bool,
    /// reason: message of every condition that is not true.
    pub not_ready: Vec<String>,
}

/// A container as ContainerStatus reports it (times in nanoseconds since the epoch, 0 when not
/// yet).
#[derive(Debug, Clone, Serialize)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub attempt: u32,
    /// `CONTAINER_CREATED`, `CONTAINER_RUNNING`, `CONTAINER_EXITED` or `CONTAINER_UNKNOWN`.
    pub state: String,
    pub created_at_ns: i64,
    pub started_at_ns: i64,
    pub finished_at_ns: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    pub log_path: String,
}

/// One line of ListContainers.
#[derive(Debug, Clone, Serialize)]
pub struct ContainerSummary {
    pub id: String,
    pub name: String,
    pub attempt: u32,
    pub state: String,
}

/// An image as ImageStatus reports it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub id: String,
    pub repo_tags: Vec<String>,
    pub size: u64,
}

fn container_state_name(state: i32) -> String {
    api::ContainerState::try_from(state)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| format!("UNKNOWN({state})"))
}

fn state_name(state: i32) -> String {
    api::PodSandboxState::try_from(state)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| format!("UNKNOWN({state})"))
}

fn status_err(call: &str, what: &str, e: tonic::Status) -> anyhow::Error {
    let sep = if what.is_empty() { "" } else { " " };
    anyhow!(
        "CRI {call}{sep}{what} failed: {:?}: {}",
        e.code(),
        e.message()
    )
}

/// The network namespace path from PodSandboxStatus' verbose info (containerd puts the OCI
/// runtime spec of the sandbox under `info.runtimeSpec`).
fn netns_from_info(info: &HashMap<String, String>) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    let nss = v.pointer("/runtimeSpec/linux/namespaces")?.as_array()?;
    nss.iter()
        .find(|n| n.get("type").and_then(|t| t.as_str()) == Some("network"))
        .and_then(|n| n.get("path"))
        .and_then(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .map(str::to_string)
}

impl Cri {
    /// Connects to the CRI socket (containerd: its `grpc.address`). Every call times out after
    /// `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Cri> {
        if !socket.exists() {
            bail!(
                "CRI socket {} does not exist; is containerd running (`vpc-cni-conformance containerd start`)?",
                socket.display()
            );
        }
        let path = socket.to_path_buf();
        // The URI is required by tonic but unused: the connector always dials the socket.
        let channel =
            Endpoint::try_from("http://[::]:50051")?
                .timeout(timeout)
                .connect_timeout(timeout)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                    }
                }))
                .await
                .with_context(|| {
                    format!("cannot connect to the CRI socket {}", socket.display())
                })?;
        Ok(Cri {
            client: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            socket: socket.to_path_buf(),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Version and readiness of the runtime (Version + Status).
    pub async fn status(&self) -> Result<RuntimeStatus> {
        let mut c = self.client.clone();
        let v = c
            .version(api::VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(|e| status_err("Version", "", e))?
            .into_inner();
        let s = c
            .status(api::StatusRequest { verbose: false })
            .await
            .map_err(|e| status_err("Status", "", e))?
            .into_inner();
        let conds = s.status.map(|s| s.conditions).unwrap_or_default();
        let is = |t: &str| conds.iter().any(|c| c.r#type == t && c.status);
        Ok(RuntimeStatus {
            runtime_name: v.runtime_name,
            runtime_version: v.runtime_version,
            runtime_ready: is("RuntimeReady"),
            network_ready: is("NetworkReady"),
            not_ready: conds
                .iter()
                .filter(|c| !c.status)
                .map(|c| format!("{}: {}: {}", c.r#type, c.reason, c.message))
                .collect(),
        })
    }

    /// RunPodSandbox; returns the sandbox id.
    pub async fn run_sandbox(&self, spec: &SandboxSpec) -> Result<String> {
        self.run_sandbox_config(spec.to_config()).await
    }

    /// RunPodSandbox with a configuration the caller built; returns the sandbox id.
    pub async fn run_sandbox_config(&self, config: api::PodSandboxConfig) -> Result<String> {
        let md = config.metadata.clone().unwrap_or_default();
        let mut c = self.client.clone();
        let r = c
            .run_pod_sandbox(api::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
            .map_err(|e| {
                status_err(
                    "RunPodSandbox",
                    &format!("for {}/{}", md.namespace, md.name),
                    e,
                )
            })?;
        Ok(r.into_inner().pod_sandbox_id)
    }

    /// PodSandboxStatus (verbose, to learn the network namespace path).
    pub async fn sandbox_status(&self, id: &str) -> Result<SandboxInfo> {
        let mut c = self.client.clone();
        let r = c
            .pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: id.to_string(),
                verbose: true,
            })
            .await
            .map_err(|e| status_err("PodSandboxStatus", &format!("of sandbox {id}"), e))?
            .into_inner();
        let s = r
            .status
            .ok_or_else(|| anyhow!("CRI PodSandboxStatus of sandbox {id} returned no status"))?;
        let md = s.metadata.unwrap_or_default();
        let net = s.network.unwrap_or_default();
        Ok(SandboxInfo {
            id: s.id,
            name: md.name,
            namespace: md.namespace,
            uid: md.uid,
            attempt: md.attempt,
            state: state_name(s.state),
            ip: net.ip,
            additional_ips: net.additional_ips.into_iter().map(|p| p.ip).collect(),
            netns: netns_from_info(&r.info),
        })
    }

    pub async fn stop_sandbox(&self, id: &str) -> Result<()> {
        let mut c = self.client.clone();
        c.stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        })
        .await
        .map_err(|e| status_err("StopPodSandbox", &format!("of sandbox {id}"), e))?;
        Ok(())
    }

    pub async fn remove_sandbox(&self, id: &str) -> Result<()> {
        let mut c = self.client.clone();
        c.remove_pod_sandbox(api::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_string(),
        })
        .await
        .map_err(|e| status_err("RemovePodSandbox", &format!("of sandbox {id}"), e))?;
        Ok(())
    }

    /// StopPodSandbox then RemovePodSandbox (what the kubelet does when a pod goes away).
    pub async fn stop_remove(&self, id: &str) -> Result<()> {
        self.stop_sandbox(id).await?;
        self.remove_sandbox(id).await
    }

    /// ListPodSandbox (all states).
    pub async fn list(&self) -> Result<Vec<SandboxSummary>> {
        let mut c = self.client.clone();
        let r = c
            .list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
            .await
            .map_err(|e| status_err("ListPodSandbox", "", e))?
            .into_inner();
        Ok(r.items
            .into_iter()
            .map(|p| {
                let md = p.metadata.unwrap_or_default();
                SandboxSummary {
                    id: p.id,
                    name: md.name,
                    namespace: md.namespace,
                    uid: md.uid,
                    state: state_name(p.state),
                }
            })
            .collect())
    }

    /// CreateContainer in sandbox `sandbox_id` (whose configuration is passed again, as the
    /// CRI asks); returns the container id.
    pub async fn create_container(
        &self,
        sandbox_id: &str,
        config: api::ContainerConfig,
        sandbox_config: api::PodSandboxConfig,
    ) -> Result<String> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let mut c = self.client.clone();
        let r = c
            .create_container(api::CreateContainerRequest {
                pod_sandbox_id: sandbox_id.to_string(),
                config: Some(config),
                sandbox_config: Some(sandbox_config),
            })
            .await
            .map_err(|e| {
                status_err(
                    "CreateContainer",
                    &format!("{name} in sandbox {sandbox_id}"),
                    e,
                )
            })?;
        Ok(r.into_inner().container_id)
    }

    pub async fn start_container(&self, id: &str) -> Result<()> {
        let mut c = self.client.clone();
        c.start_container(api::StartContainerRequest {
            container_id: id.to_string(),
        })
        .await
        .map_err(|e| status_err("StartContainer", id, e))?;
        Ok(())
    }

    /// ContainerStatus.
    pub async fn container_status(&self, id: &str) -> Result<ContainerInfo> {
        let mut c = self.client.clone();
        let r = c
            .container_status(api::ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: false,
            })
            .await
            .map_err(|e| status_err("ContainerStatus", id, e))?
            .into_inner();
        let s = r
            .status
            .ok_or_else(|| anyhow!("CRI ContainerStatus of {id} returned no status"))?;
        let md = s.metadata.unwrap_or_default();
        Ok(ContainerInfo {
            id: s.id,
            name: md.name,
            attempt: md.attempt,
            state: container_state_name(s.state),
            created_at_ns: s.created_at,
            started_at_ns: s.started_at,
            finished_at_ns: s.finished_at,
            exit_code: s.exit_code,
            reason: s.reason,
            message: s.message,
            log_path: s.log_path,
        })
    }

    /// StopContainer: the stop signal, then SIGKILL after `timeout` (seconds; 0: at once).
    pub async fn stop_container(&self, id: &str, timeout: i64) -> Result<()> {
        let mut c = self.client.clone();
        c.stop_container(api::StopContainerRequest {
            container_id: id.to_string(),
            timeout,
        })
        .await
        .map_err(|e| status_err("StopContainer", id, e))?;
        Ok(())
    }

    pub async fn remove_container(&self, id: &str) -> Result<()> {
        let mut c = self.client.clone();
        c.remove_container(api::RemoveContainerRequest {
            container_id: id.to_string(),
        })
        .await
        .map_err(|e| status_err("RemoveContainer", id, e))?;
        Ok(())
    }

    /// ListContainers of one sandbox (every state): (id, name, attempt, state).
    pub async fn list_containers(&self, sandbox_id: &str) -> Result<Vec<ContainerSummary>> {
        let mut c = self.client.clone();
        let r = c
            .list_containers(api::ListContainersRequest {
                filter: Some(api::ContainerFilter {
                    pod_sandbox_id: sandbox_id.to_string(),
                    ..Default::default()
                }),
            })
            .await
            .map_err(|e| status_err("ListContainers", &format!("of sandbox {sandbox_id}"), e))?
            .into_inner();
        Ok(r.containers
            .into_iter()
            .map(|x| {
                let md = x.metadata.unwrap_or_default();
                ContainerSummary {
                    id: x.id,
                    name: md.name,
                    attempt: md.attempt,
                    state: container_state_name(x.state),
                }
            })
            .collect())
    }

    /// ImageStatus (image service): the image's id and size when the runtime has `image`
    /// (a reference as a pod spec writes it; the runtime normalizes it), `None` when not.
    pub async fn image_status(&self, image: &str) -> Result<Option<ImageInfo>> {
        let mut c = self.images.clone();
        let r = c
            .image_status(api::ImageStatusRequest {
                image: Some(api::ImageSpec {
                    image: image.to_string(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .map_err(|e| status_err("ImageStatus", image, e))?
            .into_inner();
        Ok(r.image.map(|i| ImageInfo {
            id: i.id,
            repo_tags: i.repo_tags,
            size: i.size,
        }))
    }

    /// Finds the sandbox id of `namespace/name` (the newest attempt when there are several).
    pub async fn find(&self, name: &str, namespace: &str) -> Result<Option<String>> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .find(|s| s.name == name && s.namespace == namespace)
            .map(|s| s.id))
    }

    /// RunPodSandbox and PodSandboxStatus; fails when the sandbox is not ready or has no IP.
    pub async fn run_and_status(&self, spec: &SandboxSpec) -> Result<(SandboxInfo, Duration)> {
        let t = Instant::now();
        let id = self.run_sandbox(spec).await?;
        let took = t.elapsed();
        let info = self.sandbox_status(&id).await?;
        if info.state != "SANDBOX_READY" {
            bail!(
                "sandbox {}/{} ({id}) is {} after RunPodSandbox, not SANDBOX_READY",
                spec.namespace,
                spec.name,
                info.state
            );
        }
        if info.ip.is_empty() {
            bail!(
                "sandbox {}/{} ({id}) has no pod IP after RunPodSandbox: the CNI ADD result had no IP",
                spec.namespace,
                spec.name
            );
        }
        Ok((info, took))
    }

    /// Starts `count` sandboxes concurrently (`<prefix>-<i>` in `namespace`), checks every one
    /// is ready with a distinct IP, then stops and removes all of them concurrently.
    /// With `keep`, the sandboxes are left running (the report lists them).
    pub async fn burst(
        &self,
        count: usize,
        prefix: &str,
        namespace: &str,
        keep: bool,
    ) -> Result<BurstReport> {
        if count == 0 {
            bail!("burst --count 0: give at least one sandbox");
        }
        let t0 = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..count {
            let cri = self.clone();
            let spec = SandboxSpec::new(&format!("{prefix}-{i}"), namespace);
            set.spawn(async move {
                let r = cri.run_and_status(&spec).await;
                (spec.name, r)
            });
        }
        let mut up: Vec<(SandboxInfo, Duration)> = Vec::new();
        let mut errors: BTreeMap<String, String> = BTreeMap::new();
        while let Some(j) = set.join_next().await {
            let (name, r) = j.context("a RunPodSandbox task panicked")?;
            match r {
                Ok(x) => up.push(x),
                Err(e) => {
                    errors.insert(name, format!("{e:#}"));
                }
            }
        }
        let all_up = t0.elapsed();
        // Sandboxes whose RunPodSandbox failed may still exist (NOTREADY): list them so they
        // are removed too.
        let mut ids: Vec<String> = up.iter().map(|(i, _)| i.id.clone()).collect();
        for s in self.list().await? {
            let ours = s.namespace == namespace
                && s.name
                    .strip_prefix(prefix)
                    .and_then(|r| r.strip_prefix('-'))
                    .is_some_and(|n| n.parse::<usize>().is_ok_and(|n| n < count));
            if ours && !ids.contains(&s.id) {
                ids.push(s.id);
            }
        }
        let mut ips: Vec<String> = up.iter().map(|(i, _)| i.ip.clone()).collect();
        ips.sort();
        let distinct = {
            let mut d = ips.clone();
            d.dedup();
            d.len()
        };
        if distinct != ips.len() {
            errors.insert(
                "duplicate-ips".into(),
                format!("{} sandboxes share {} IPs: {ips:?}", ips.len(), distinct),
            );
        }
        let run_latencies: Vec<Duration> = up.iter().map(|(_, d)| *d).collect();
        let mut report = BurstReport {
            count,
            ready: up.len(),
            all_ready_ms: ms(all_up),
            run_pod_sandbox: Stats::of(&run_latencies),
            stop_remove: None,
            all_removed_ms: None,
            remaining: Vec::new(),
            ips,
            errors,
        };
        if keep {
            report.remaining = ids;
            return Ok(report);
        }
        let t1 = Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for id in ids {
            let cri = self.clone();
            set.spawn(async move {
                let t = Instant::now();
                let r = cri.stop_remove(&id).await;
                (id, r, t.elapsed())
            });
        }
        let mut rm_latencies = Vec::new();
        while let Some(j) = set.join_next().await {
            let (id, r, d) = j.context("a StopPodSandbox task panicked")?;
            match r {
                Ok(()) => rm_latencies.push(d),
                Err(e) => {
                    report.errors.insert(id, format!("{e:#}"));
                }
            }
        }
        report.all_removed_ms = Some(ms(t1.elapsed()));
        report.stop_remove = Stats::of(&rm_latencies);
        report.remaining = self
            .list()
            .await?
            .into_iter()
            .filter(|s| s.namespace == namespace && s.name.starts_with(prefix))
            .map(|s| s.id)
            .collect();
        if !report.remaining.is_empty() {
            report.errors.insert(
                "remaining".into(),
                format!(
                    "{} sandboxes still listed after Stop+Remove",
                    report.remaining.len()
                ),
            );
        }
        Ok(report)
    }
}

/// What a burst measured. `errors` is empty when every sandbox came up with its own IP and
/// (unless kept) went away.
#[derive(Debug, Clone, Serialize)]
pub struct BurstReport {
    pub count: usize,
    pub ready: usize,
    /// From the first RunPodSandbox to the last sandbox ready (with its status read).
    pub all_ready_ms: f64,
    /// Per-sandbox RunPodSandbox latency.
    pub run_pod_sandbox: Option<Stats>,
    /// Per-sandbox StopPodSandbox + RemovePodSandbox latency.
    pub stop_remove: Option<Stats>,
    pub all_removed_ms: Option<f64>,
    /// Sandbox ids still present at the end (with `keep`: all of them).
    pub remaining: Vec<String>,
    pub ips: Vec<String>,
    pub errors: BTreeMap<String, String>,
}

impl BurstReport {
    pub fn ok(&self) -> bool {
        self.errors.is_empty() && self.ready == self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_is_read_from_containerd_verbose_info() {
        let info = HashMap::from([(
            "info".to_string(),
            r#"{"pid":1,"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/var/run/netns/cni-1234"}]}}}"#.to_string(),
        )]);
        assert_eq!(
            netns_from_info(&info).as_deref(),
            Some("/var/run/netns/cni-1234")
        );
        assert_eq!(netns_from_info(&HashMap::new()), None);
    }

    #[test]
    fn sandbox_config_asks_for_a_pod_network_namespace() {
        let c = SandboxSpec::new("p", "ns").to_config();
        let md = c.metadata.unwrap();
        assert_eq!((md.name.as_str(), md.namespace.as_str()), ("p", "ns"));
        assert_eq!(md.uid, "ns-p-uid");
        let nso = c
            .linux
            .unwrap()
            .security_context
            .unwrap()
            .namespace_options
            .unwrap();
        assert_eq!(nso.network, api::NamespaceMode::Pod as i32);
    }
}
