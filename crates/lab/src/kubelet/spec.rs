//! The DaemonSet's pod template read as kubelet reads a pod, into the CRI configurations the
//! lab's kubelet sends containerd: pure, no I/O (the caller passes the node's facts).
//!
//! What is translated, as kubelet does it: host network (and host PID/IPC) as
//! `NamespaceMode::NODE`; `dnsPolicy: Default` as the node's resolv.conf; init containers and
//! containers with their image, pull policy, command and args (`$(VAR)` expanded), env
//! (`$(VAR)` expanded), security context (privileged, capabilities, read-only root, user and
//! group, no-new-privileges), volume mounts of `hostPath` volumes (read-only, propagation), CPU
//! request as CPU shares, the node-critical OOM score, container ports (host ports on the host
//! network), the `httpGet` liveness and readiness probes with kubelet's defaults, the
//! termination grace period, labels and annotations.
//!
//! Where the lab differs, it is here and in `docs/install.md` ("The lab's kubelet"):
//! - **host paths**: a `hostPath` `/p` is `<node root>/p` (`/run/vpc-lab/<instance>/p`): the
//!   lab's instances share one file system ([`host_path`]);
//! - **the node's environment**: what a real node gives its pods without asking (IMDS at the
//!   link-local address, the region from IMDS, the instance profile's credentials) the lab
//!   passes as environment variables into every container ([`LabEnv::node`]), and the lab's
//!   own settings for the agent (`--agent-env`, provisioning off unless `--provisioning`) go
//!   into the pod's containers on top of the manifest ([`LabEnv::extra`]);
//! - **paths the host side uses**: the agent writes its socket and the plugin's log file into
//!   the conflist, and the plugin opens them on the host. On a real node `/run/vpc-cni` is the
//!   same directory inside and out; in the lab the host's is `<node root>/run/vpc-cni`, so such
//!   a variable ([`HOST_SIDE_PATH_VARS`]) is set to the host path, and the host directory is
//!   mounted at that same path in the container too ([`container_env`]).
//!
//! Anything the lab does not model (other volume types, a `valueFrom` other than the node name (`spec.nodeName`), other probe kinds,
//! lifecycle hooks, limits, …) is refused with its name rather than ignored.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use conformance::cri::api;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};

use super::probe::{self, Kind};

/// Variables whose value the agent hands to programs on the host (through the conflist): the
/// plugin connects to `agentSocket` and writes `pluginLogFile` on the host, so in the lab these
/// must be the host's paths, visible at the same path in the container.
pub const HOST_SIDE_PATH_VARS: &[&str] = &["VPC_CNI_AGENT_SOCKET", "AWS_VPC_K8S_PLUGIN_LOG_FILE"];

/// Reads a DaemonSet manifest (one YAML document) into the API's type.
pub fn parse_daemonset(yaml: &str) -> Result<DaemonSet> {
    let ds: DaemonSet = serde_norway::from_str(yaml).context("not a DaemonSet manifest")?;
    if ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .is_none()
    {
        bail!("the DaemonSet has no spec.template.spec");
    }
    Ok(ds)
}

/// Reads the DaemonSet manifest at `path`.
pub fn load_daemonset(path: &Path) -> Result<DaemonSet> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_daemonset(&text).with_context(|| format!("in {}", path.display()))
}

/// The host's net sysctls, which the DaemonSet mounts for `VPC_CNI_PROC_SYS`.
pub const PROC_SYS_NET: &str = "/proc/sys/net";

/// Where the lab keeps a node's `hostPath` `path`: under the node's root, so `/opt/cni/bin` on
/// instance1 is `/run/vpc-lab/instance1/opt/cni/bin`. The path must be absolute without `..`,
/// so it cannot leave the root.
pub fn host_path(root: &Path, path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if !p.is_absolute() {
        bail!("hostPath {path:?} is not an absolute path");
    }
    // The kernel's net sysctls: each file belongs to the network namespace of the process that
    // opens it, so the machine's own /proc/sys/net is the node's for a container in the
    // node's namespace (host network) — the one path the lab does not move under the root.
    if p.starts_with(PROC_SYS_NET) && !path.contains("/..") {
        return Ok(p.to_path_buf());
    }
    let mut out = root.to_path_buf();
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => out.push(n),
            _ => bail!("hostPath {path:?} has a '..' component"),
        }
    }
    if out == root {
        bail!("hostPath {path:?} is the node's root: the lab does not mount that");
    }
    Ok(out)
}

/// A `hostPath` volume's `type`, and what kubelet checks or creates before mounting it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostPathType {
    /// `""` (unset): nothing checked.
    Unset,
    DirectoryOrCreate,
    Directory,
    FileOrCreate,
    File,
    Socket,
}

impl HostPathType {
    fn parse(t: Option<&str>) -> Result<HostPathType> {
        Ok(match t.unwrap_or("") {
            "" => HostPathType::Unset,
            "DirectoryOrCreate" => HostPathType::DirectoryOrCreate,
            "Directory" => HostPathType::Directory,
            "FileOrCreate" => HostPathType::FileOrCreate,
            "File" => HostPathType::File,
            "Socket" => HostPathType::Socket,
            other => bail!("hostPath type {other:?} is not modelled by the lab's kubelet"),
        })
    }
}

/// A `hostPath` volume on the lab's node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostVolume {
    pub name: String,
    /// As the manifest writes it (`/opt/cni/bin`).
    pub manifest_path: String,
    /// Where it is on the lab's node (`/run/vpc-lab/instance1/opt/cni/bin`).
    pub host: PathBuf,
    pub kind: HostPathType,
}

/// An environment, in order (a name at most once).
pub type EnvList = Vec<(String, String)>;

/// The lab's additions to the pod's environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabEnv {
    /// Into every container, over the manifest's: what a real node provides by itself (IMDS and
    /// EC2 endpoints, region, credentials; `daemon::node_env`).
    pub node: EnvList,
    /// Into the pod's containers (not the init containers), over everything: the lab's settings
    /// for the agent (`vpc-lab up --agent-env`, `--provisioning`, the lab's defaults) — what an
    /// operator's kustomize patch of the DaemonSet's env would be.
    pub extra: EnvList,
    /// Host directories mounted read-only at the same path into the pod's containers (not
    /// the init containers): the lab's kubeconfig directory, for the `KUBECONFIG` in
    /// [`LabEnv::extra`] (a real pod reaches the API with its service account instead).
    #[serde(default)]
    pub mounts: Vec<PathBuf>,
}

/// The node as the lab's kubelet knows it.
#[derive(Debug, Clone)]
pub struct Node {
    pub instance: String,
    /// The node's root: every `hostPath` lives under it (`/run/vpc-lab/<instance>`).
    pub root: PathBuf,
    /// The node's address: a host-network pod's IP, and its probes' default host.
    pub ip: Ipv4Addr,
    /// The text of the node's `/etc/resolv.conf` (`dnsPolicy: Default`).
    pub resolv_conf: String,
    /// Where pod logs go (kubelet: `/var/log/pods`).
    pub log_root: PathBuf,
    pub env: LabEnv,
}

/// The pod the DaemonSet controller would have made for the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodId {
    pub name: String,
    pub namespace: String,
    pub uid: String,
}

/// `imagePullPolicy`, with the API's default (Always for `:latest` or no tag, else
/// IfNotPresent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn of(image: &str, policy: Option<&str>) -> Result<PullPolicy> {
        Ok(match policy {
            Some("Always") => PullPolicy::Always,
            Some("IfNotPresent") => PullPolicy::IfNotPresent,
            Some("Never") => PullPolicy::Never,
            Some(other) => bail!("imagePullPolicy {other:?} is not Always, IfNotPresent or Never"),
            None => {
                // The tag is after the last '/' (a registry host may carry a port).
                let last = image.rsplit('/').next().unwrap_or(image);
                let untagged = !last.contains(':') && !image.contains('@');
                if untagged || last.ends_with(":latest") {
                    PullPolicy::Always
                } else {
                    PullPolicy::IfNotPresent
                }
            }
        })
    }
}

/// One container of the pod, ready for CreateContainer (the image reference, log path and
/// restart count are filled in when it is created).
#[derive(Debug, Clone)]
pub struct ContainerPlan {
    pub name: String,
    pub init: bool,
    /// As the manifest writes it (`vpc-cni:latest`).
    pub image: String,
    pub pull_policy: PullPolicy,
    pub config: api::ContainerConfig,
    pub liveness: Option<probe::Spec>,
    pub readiness: Option<probe::Spec>,
}

/// The pod, ready for RunPodSandbox and its containers.
#[derive(Debug, Clone)]
pub struct PodPlan {
    pub id: PodId,
    pub sandbox: api::PodSandboxConfig,
    /// Its log directory (`<log root>/<namespace>_<name>_<uid>`).
    pub log_dir: PathBuf,
    pub volumes: Vec<HostVolume>,
    pub init: Vec<ContainerPlan>,
    pub containers: Vec<ContainerPlan>,
    /// `terminationGracePeriodSeconds` (default 30).
    pub grace: Duration,
}

/// A mount of a container, resolved to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountPlan {
    container_path: String,
    host: PathBuf,
    readonly: bool,
    propagation: api::MountPropagation,
}

/// The pod the DaemonSet `ds` runs on `node`, as kubelet would run it.
pub fn plan(ds: &DaemonSet, node: &Node, id: &PodId) -> Result<PodPlan> {
    let template = &ds
        .spec
        .as_ref()
        .context("the DaemonSet has no spec")?
        .template;
    let spec = template
        .spec
        .as_ref()
        .context("the DaemonSet has no spec.template.spec")?;
    check_pod(spec)?;
    let host_ns = |b: Option<bool>| {
        if b == Some(true) {
            api::NamespaceMode::Node
        } else {
            api::NamespaceMode::Pod
        }
    };
    let namespaces = api::NamespaceOption {
        network: host_ns(spec.host_network) as i32,
        pid: host_ns(spec.host_pid) as i32,
        ipc: host_ns(spec.host_ipc) as i32,
        ..Default::default()
    };

    let mut volumes = Vec::new();
    for v in spec.volumes.iter().flatten() {
        let Some(hp) = &v.host_path else {
            bail!(
                "volume {:?} is not a hostPath volume: the lab's kubelet mounts hostPath volumes only",
                v.name
            );
        };
        volumes.push(HostVolume {
            name: v.name.clone(),
            manifest_path: hp.path.clone(),
            host: host_path(&node.root, &hp.path)
                .with_context(|| format!("volume {:?}", v.name))?,
            kind: HostPathType::parse(hp.type_.as_deref())
                .with_context(|| format!("volume {:?}", v.name))?,
        });
    }

    let meta = template.metadata.clone().unwrap_or_default();
    let mut labels: HashMap<String, String> = meta.labels.unwrap_or_default().into_iter().collect();
    labels.insert("io.kubernetes.pod.name".into(), id.name.clone());
    labels.insert("io.kubernetes.pod.namespace".into(), id.namespace.clone());
    labels.insert("io.kubernetes.pod.uid".into(), id.uid.clone());
    let annotations: HashMap<String, String> =
        meta.annotations.unwrap_or_default().into_iter().collect();
    let log_dir = node
        .log_root
        .join(format!("{}_{}_{}", id.namespace, id.name, id.uid));

    let critical = spec.priority_class_name.as_deref() == Some("system-node-critical");
    let mut init = Vec::new();
    for c in spec.init_containers.iter().flatten() {
        init.push(container_plan(
            c,
            true,
            &volumes,
            &namespaces,
            node,
            &labels,
            critical,
        )?);
    }
    let mut containers = Vec::new();
    for c in &spec.containers {
        containers.push(container_plan(
            c,
            false,
            &volumes,
            &namespaces,
            node,
            &labels,
            critical,
        )?);
    }
    if containers.is_empty() {
        bail!("the pod template has no containers");
    }
    let privileged = init
        .iter()
        .chain(&containers)
        .any(|c| security(&c.config).is_some_and(|s| s.privileged));

    let mut port_mappings = Vec::new();
    for c in &spec.containers {
        for p in c.ports.iter().flatten() {
            let host_port = match (spec.host_network, p.host_port) {
                (Some(true), _) => p.container_port,
                (_, Some(h)) => h,
                _ => continue,
            };
            port_mappings.push(api::PortMapping {
                protocol: protocol(p.protocol.as_deref())? as i32,
                container_port: p.container_port,
                host_port,
                host_ip: p.host_ip.clone().unwrap_or_default(),
            });
        }
    }

    let sandbox = api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: id.name.clone(),
            uid: id.uid.clone(),
            namespace: id.namespace.clone(),
            attempt: 0,
        }),
        // A host-network pod shares the node's UTS namespace: kubelet sets no host name (runc
        // refuses one without a private UTS namespace).
        hostname: String::new(),
        log_directory: log_dir.display().to_string(),
        dns_config: dns_config(
            spec.dns_policy.as_deref(),
            spec.host_network == Some(true),
            &node.resolv_conf,
        )?,
        port_mappings,
        labels: labels.clone(),
        annotations,
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces),
                privileged,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    Ok(PodPlan {
        id: id.clone(),
        sandbox,
        log_dir,
        volumes,
        init,
        containers,
        grace: Duration::from_secs(
            spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64
        ),
    })
}

/// The container security context of a plan's configuration.
pub fn security(c: &api::ContainerConfig) -> Option<&api::LinuxContainerSecurityContext> {
    c.linux.as_ref()?.security_context.as_ref()
}

/// Refuses what the lab's kubelet does not model at the pod level.
fn check_pod(spec: &PodSpec) -> Result<()> {
    if spec.host_network != Some(true) {
        bail!(
            "the pod template is not hostNetwork: the lab's kubelet runs host-network pods only (pods get their network from `vpc-lab pod add`)"
        );
    }
    match spec.restart_policy.as_deref() {
        None | Some("Always") => {}
        Some(p) => bail!("restartPolicy {p:?}: a DaemonSet's pods restart Always"),
    }
    let unsupported = [
        ("hostAliases", spec.host_aliases.is_some()),
        ("dnsConfig", spec.dns_config.is_some()),
        ("ephemeralContainers", spec.ephemeral_containers.is_some()),
        ("runtimeClassName", spec.runtime_class_name.is_some()),
        (
            "securityContext.sysctls",
            spec.security_context
                .as_ref()
                .is_some_and(|s| s.sysctls.is_some()),
        ),
        (
            "shareProcessNamespace",
            spec.share_process_namespace == Some(true),
        ),
    ];
    if let Some((what, _)) = unsupported.iter().find(|(_, set)| *set) {
        bail!("the pod template sets {what}, which the lab's kubelet does not model");
    }
    Ok(())
}

fn protocol(p: Option<&str>) -> Result<api::Protocol> {
    Ok(match p.unwrap_or("TCP") {
        "TCP" => api::Protocol::Tcp,
        "UDP" => api::Protocol::Udp,
        "SCTP" => api::Protocol::Sctp,
        other => bail!("port protocol {other:?} is not TCP, UDP or SCTP"),
    })
}

/// The pod's DNS configuration: `Default` (and `ClusterFirst` on the host network, which
/// kubelet turns into `Default`) is the node's resolv.conf, as kubelet passes it: its
/// nameservers (at most 3), the last `search` line's domains (at most 32) and the options.
pub fn dns_config(
    policy: Option<&str>,
    host_network: bool,
    resolv_conf: &str,
) -> Result<Option<api::DnsConfig>> {
    match policy.unwrap_or("ClusterFirst") {
        "Default" => {}
        "ClusterFirst" if host_network => {}
        other => {
            bail!("dnsPolicy {other:?} needs the cluster's DNS, which the lab has not: use Default")
        }
    }
    let mut servers = Vec::new();
    let mut searches = Vec::new();
    let mut options = Vec::new();
    for line in resolv_conf.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut f = line.split_whitespace();
        match f.next() {
            Some("nameserver") => servers.extend(f.next().map(str::to_string)),
            Some("search") | Some("domain") => searches = f.map(str::to_string).collect(),
            Some("options") => options.extend(f.map(str::to_string)),
            _ => {}
        }
    }
    servers.truncate(3);
    searches.truncate(32);
    Ok(Some(api::DnsConfig {
        servers,
        searches,
        options,
    }))
}

/// Kubelet's `$(VAR)` expansion (for env values, command and args): `$(NAME)` becomes the
/// variable's value when `lookup` knows it and stays as written when not; `$$` is a `$`.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('(')
            && let Some(end) = r.find(')')
        {
            let name = &r[..end];
            match lookup(name) {
                Some(v) => out.push_str(&v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Sets `k` to `v` in an ordered environment (a later value replaces an earlier one in place).
fn set(env: &mut EnvList, k: &str, v: String) {
    match env.iter_mut().find(|(ek, _)| ek == k) {
        Some(e) => e.1 = v,
        None => env.push((k.to_string(), v)),
    }
}

/// The mounts of container `c`, resolved to the node.
fn mounts(c: &Container, volumes: &[HostVolume]) -> Result<Vec<MountPlan>> {
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let v = volumes
            .iter()
            .find(|v| v.name == m.name)
            .with_context(|| format!("volumeMount {:?} names no volume of the pod", m.name))?;
        if m.sub_path.is_some() || m.sub_path_expr.is_some() {
            bail!(
                "volumeMount {:?} uses subPath, which the lab's kubelet does not model",
                m.name
            );
        }
        let propagation = match m.mount_propagation.as_deref() {
            None | Some("None") => api::MountPropagation::PropagationPrivate,
            Some("HostToContainer") => api::MountPropagation::PropagationHostToContainer,
            Some("Bidirectional") => api::MountPropagation::PropagationBidirectional,
            Some(p) => bail!("volumeMount {:?}: mountPropagation {p:?}", m.name),
        };
        out.push(MountPlan {
            container_path: m.mount_path.clone(),
            host: v.host.clone(),
            readonly: m.read_only == Some(true),
            propagation,
        });
    }
    Ok(out)
}

/// Where `path` (a path in the container) is on the node, through `mounts`; also the mount.
fn through_mount<'a>(path: &str, mounts: &'a [MountPlan]) -> Option<(PathBuf, &'a MountPlan)> {
    mounts.iter().find_map(|m| {
        let rel = Path::new(path).strip_prefix(&m.container_path).ok()?;
        let host = if rel.as_os_str().is_empty() {
            m.host.clone()
        } else {
            m.host.join(rel)
        };
        Some((host, m))
    })
}

/// The container's environment as the lab runs it, in this order, each over the one before:
/// 1. the manifest's `env`, `$(VAR)` expanded against the variables before it, as kubelet does;
/// 2. each [`HOST_SIDE_PATH_VARS`] variable whose value lies in a mounted host path is set to
///    that file's path on the node, and the host directory is mounted at that same path (the
///    extra mounts are returned);
/// 3. the lab's node environment ([`LabEnv::node`]);
/// 4. for the pod's containers (not init containers), the lab's settings ([`LabEnv::extra`]),
///    and its read-only mounts ([`LabEnv::mounts`]).
fn container_env(
    c: &Container,
    init: bool,
    mounts: &[MountPlan],
    lab: &LabEnv,
    node_name: &str,
) -> Result<(EnvList, Vec<MountPlan>)> {
    let mut env: EnvList = Vec::new();
    for e in c.env.iter().flatten() {
        if let Some(from) = &e.value_from {
            // The downward API's node name is the one `valueFrom` the lab models.
            match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                Some("spec.nodeName") => {
                    set(&mut env, &e.name, node_name.to_string());
                    continue;
                }
                _ => bail!(
                    "env {:?} uses a valueFrom other than fieldRef spec.nodeName, which the lab's kubelet does not model",
                    e.name
                ),
            }
        }
        let v = expand(e.value.as_deref().unwrap_or(""), |n| {
            env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
        });
        set(&mut env, &e.name, v);
    }
    if c.env_from.is_some() {
        bail!("envFrom is not modelled by the lab's kubelet (no ConfigMaps or Secrets)");
    }
    let mut extra_mounts: Vec<MountPlan> = Vec::new();
    for var in HOST_SIDE_PATH_VARS {
        let Some(value) = env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone()) else {
            continue;
        };
        let Some((host, m)) = through_mount(&value, mounts) else {
            continue;
        };
        let same_path = MountPlan {
            container_path: m.host.display().to_string(),
            host: m.host.clone(),
            readonly: m.readonly,
            propagation: m.propagation,
        };
        if !extra_mounts.contains(&same_path) {
            extra_mounts.push(same_path);
        }
        set(&mut env, var, host.display().to_string());
    }
    for (k, v) in &lab.node {
        set(&mut env, k, v.clone());
    }
    if !init {
        for (k, v) in &lab.extra {
            set(&mut env, k, v.clone());
        }
        for dir in &lab.mounts {
            let m = MountPlan {
                container_path: dir.display().to_string(),
                host: dir.clone(),
                readonly: true,
                propagation: api::MountPropagation::PropagationPrivate,
            };
            if !extra_mounts.contains(&m) {
                extra_mounts.push(m);
            }
        }
    }
    Ok((env, extra_mounts))
}

/// Kubelet's CPU shares for a CPU request (`MilliCPUToShares`: 1024 per CPU, at least 2).
pub fn cpu_shares(request: Option<&str>) -> Result<i64> {
    let milli = match request {
        None => 0,
        Some(q) => {
            if let Some(m) = q.strip_suffix('m') {
                m.parse::<i64>()
                    .with_context(|| format!("CPU quantity {q:?}"))?
            } else {
                let cpus: f64 = q.parse().with_context(|| format!("CPU quantity {q:?}"))?;
                (cpus * 1000.0).ceil() as i64
            }
        }
    };
    Ok((milli * 1024 / 1000).max(2))
}

/// The OOM score kubelet gives a `system-node-critical` pod's containers.
pub const NODE_CRITICAL_OOM_SCORE_ADJ: i64 = -997;

#[allow(clippy::too_many_arguments)]
fn container_plan(
    c: &Container,
    init: bool,
    volumes: &[HostVolume],
    namespaces: &api::NamespaceOption,
    node: &Node,
    pod_labels: &HashMap<String, String>,
    critical: bool,
) -> Result<ContainerPlan> {
    let what = if init { "initContainer" } else { "container" };
    let ctx = || format!("{what} {:?}", c.name);
    let unsupported = [
        ("lifecycle", c.lifecycle.is_some()),
        ("startupProbe", c.startup_probe.is_some()),
        ("volumeDevices", c.volume_devices.is_some()),
        ("stdin/tty", c.stdin == Some(true) || c.tty == Some(true)),
        ("restartPolicy (sidecar)", c.restart_policy.is_some()),
        (
            "resources.limits",
            c.resources.as_ref().is_some_and(|r| r.limits.is_some()),
        ),
    ];
    if let Some((f, _)) = unsupported.iter().find(|(_, set)| *set) {
        bail!("{} sets {f}, which the lab's kubelet does not model", ctx());
    }
    if init && (c.liveness_probe.is_some() || c.readiness_probe.is_some()) {
        bail!("{}: init containers have no probes", ctx());
    }
    let image = c
        .image
        .clone()
        .with_context(|| format!("{} has no image", ctx()))?;
    let pull_policy = PullPolicy::of(&image, c.image_pull_policy.as_deref()).with_context(ctx)?;
    let mounts = mounts(c, volumes).with_context(ctx)?;
    let (env, extra_mounts) =
        container_env(c, init, &mounts, &node.env, &node.instance).with_context(ctx)?;
    let lookup = |n: &str| env.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let command: Vec<String> = c
        .command
        .iter()
        .flatten()
        .map(|s| expand(s, lookup))
        .collect();
    let args: Vec<String> = c.args.iter().flatten().map(|s| expand(s, lookup)).collect();

    let sc = c.security_context.clone().unwrap_or_default();
    let caps = sc.capabilities.clone().unwrap_or_default();
    if sc.se_linux_options.is_some() || sc.app_armor_profile.is_some() {
        bail!(
            "{}: seLinuxOptions and appArmorProfile are not modelled",
            ctx()
        );
    }
    let seccomp = match sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()) {
        // Kubelet's default without --seccomp-default.
        None | Some("Unconfined") => api::security_profile::ProfileType::Unconfined,
        Some("RuntimeDefault") => api::security_profile::ProfileType::RuntimeDefault,
        Some(t) => bail!("{}: seccompProfile {t:?} is not modelled", ctx()),
    };
    let security = api::LinuxContainerSecurityContext {
        capabilities: Some(api::Capability {
            add_capabilities: caps.add.unwrap_or_default(),
            drop_capabilities: caps.drop.unwrap_or_default(),
            ..Default::default()
        }),
        privileged: sc.privileged == Some(true),
        namespace_options: Some(namespaces.clone()),
        run_as_user: sc.run_as_user.map(|value| api::Int64Value { value }),
        run_as_group: sc.run_as_group.map(|value| api::Int64Value { value }),
        readonly_rootfs: sc.read_only_root_filesystem == Some(true),
        no_new_privs: sc.allow_privilege_escalation == Some(false),
        seccomp: Some(api::SecurityProfile {
            profile_type: seccomp as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    let cpu_request = c
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("cpu"))
        .map(|q| q.0.as_str());
    let resources = api::LinuxContainerResources {
        cpu_shares: cpu_shares(cpu_request).with_context(ctx)?,
        oom_score_adj: if critical {
            NODE_CRITICAL_OOM_SCORE_ADJ
        } else {
            0
        },
        ..Default::default()
    };

    let mut labels: HashMap<String, String> = pod_labels
        .iter()
        .filter(|(k, _)| k.starts_with("io.kubernetes.pod."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert("io.kubernetes.container.name".into(), c.name.clone());
    let mut annotations = HashMap::new();
    annotations.insert(
        "io.kubernetes.container.terminationMessagePath".into(),
        c.termination_message_path
            .clone()
            .unwrap_or_else(|| "/dev/termination-log".into()),
    );

    let config = api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: c.name.clone(),
            attempt: 0,
        }),
        image: Some(api::ImageSpec {
            image: image.clone(),
            user_specified_image: image.clone(),
            ..Default::default()
        }),
        command,
        args,
        working_dir: c.working_dir.clone().unwrap_or_default(),
        envs: env
            .iter()
            .map(|(key, value)| api::KeyValue {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
        mounts: mounts
            .iter()
            .chain(&extra_mounts)
            .map(|m| api::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host.display().to_string(),
                readonly: m.readonly,
                propagation: m.propagation as i32,
                ..Default::default()
            })
            .collect(),
        labels,
        annotations,
        linux: Some(api::LinuxContainerConfig {
            resources: Some(resources),
            security_context: Some(security),
        }),
        ..Default::default()
    };
    let probe = |kind: Kind, p: &Option<Probe>| -> Result<Option<probe::Spec>> {
        p.as_ref()
            .map(|p| probe_spec(kind, p, c, node.ip))
            .transpose()
            .with_context(ctx)
    };
    Ok(ContainerPlan {
        name: c.name.clone(),
        init,
        image,
        pull_policy,
        config,
        liveness: probe(Kind::Liveness, &c.liveness_probe)?,
        readiness: probe(Kind::Readiness, &c.readiness_probe)?,
    })
}

/// An `httpGet` probe with kubelet's defaults (period 10 s, timeout 1 s, thresholds 1 and 3,
/// no initial delay); a named port is looked up in the container's ports; the host defaults to
/// the pod's IP, the node's for a host-network pod.
pub fn probe_spec(kind: Kind, p: &Probe, c: &Container, pod_ip: Ipv4Addr) -> Result<probe::Spec> {
    let what = match kind {
        Kind::Liveness => "livenessProbe",
        Kind::Readiness => "readinessProbe",
    };
    let Some(h) = &p.http_get else {
        bail!("{what}: only httpGet probes are modelled by the lab's kubelet");
    };
    if h.scheme.as_deref().is_some_and(|s| s != "HTTP") {
        bail!("{what}: scheme {:?} is not modelled (HTTP only)", h.scheme);
    }
    let port = match &h.port {
        IntOrString::Int(n) => u16::try_from(*n).with_context(|| format!("{what}: port {n}"))?,
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|cp| cp.name.as_deref() == Some(name))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .with_context(|| format!("{what}: the container has no port named {name:?}"))?,
    };
    let secs =
        |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
    let count = |v: Option<i32>, default: i32| v.unwrap_or(default).max(1) as u32;
    let mut path = h.path.clone().unwrap_or_default();
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    Ok(probe::Spec {
        kind,
        host: h.host.clone().unwrap_or_else(|| pod_ip.to_string()),
        port,
        path,
        headers: h
            .http_headers
            .iter()
            .flatten()
            .map(|x| (x.name.clone(), x.value.clone()))
            .collect(),
        initial_delay: secs(p.initial_delay_seconds, 0),
        period: secs(p.period_seconds, 10),
        timeout: secs(p.timeout_seconds, 1),
        success_threshold: count(p.success_threshold, 1),
        failure_threshold: count(p.failure_threshold, 3),
    })
}

/// The environment of a plan's configuration, as a map (for checks and the status).
pub fn env_map(c: &api::ContainerConfig) -> BTreeMap<String, String> {
    c.envs
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> DaemonSet {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/base/daemonset.yaml");
        load_daemonset(&p).expect("the repository's DaemonSet")
    }

    fn node() -> Node {
        Node {
            instance: "instance1".into(),
            root: PathBuf::from("/run/vpc-lab/instance1"),
            ip: Ipv4Addr::new(172, 31, 15, 228),
            resolv_conf:
                "# comment\nnameserver 10.0.0.2\nsearch a.example b.example\noptions ndots:2\n"
                    .into(),
            log_root: PathBuf::from("/run/vpc-lab/instance1/kubelet/logs"),
            env: LabEnv {
                node: vec![
                    (
                        "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
                        "http://127.0.0.1:1338".into(),
                    ),
                    ("AWS_REGION".into(), "us-west-2".into()),
                ],
                extra: vec![
                    (
                        "DISABLE_NETWORK_RESOURCE_PROVISIONING".into(),
                        "true".into(),
                    ),
                    ("WARM_IP_TARGET".into(), "5".into()),
                ],
                mounts: vec![],
            },
        }
    }

    fn id() -> PodId {
        PodId {
            name: "vpc-cni-instance1".into(),
            namespace: "kube-system".into(),
            uid: "u-1".into(),
        }
    }

    fn mounts_of(c: &ContainerPlan) -> BTreeMap<String, String> {
        c.config
            .mounts
            .iter()
            .map(|m| (m.container_path.clone(), m.host_path.clone()))
            .collect()
    }

    #[test]
    fn host_paths_live_under_the_node_root() {
        let root = Path::new("/run/vpc-lab/instance1");
        assert_eq!(
            host_path(root, "/opt/cni/bin").unwrap(),
            PathBuf::from("/run/vpc-lab/instance1/opt/cni/bin")
        );
        assert_eq!(
            host_path(root, "/run/xtables.lock").unwrap(),
            PathBuf::from("/run/vpc-lab/instance1/run/xtables.lock")
        );
        assert_eq!(
            host_path(root, "/var/run/aws-node/").unwrap(),
            PathBuf::from("/run/vpc-lab/instance1/var/run/aws-node")
        );
        // `.` components are dropped, as the kernel resolves them.
        assert_eq!(host_path(root, "/./x").unwrap(), root.join("x"));
        for bad in [
            "opt/cni/bin",
            "/opt/../etc",
            "/..",
            "/",
            "",
            "/proc/sys/net/../../x",
        ] {
            assert!(host_path(root, bad).is_err(), "{bad:?} must be refused");
        }
        // The kernel's net sysctls are the machine's own path (per network namespace).
        assert_eq!(
            host_path(root, "/proc/sys/net").unwrap(),
            PathBuf::from("/proc/sys/net")
        );
        assert_eq!(host_path(root, "/proc/sys").unwrap(), root.join("proc/sys"));
    }

    /// The repository's DaemonSet on instance1: every hostPath under the node's root, the
    /// mounts at the manifest's paths plus the socket's directory at its host path.
    #[test]
    fn the_daemonset_maps_to_the_instances_node_directories() {
        let p = plan(&manifest(), &node(), &id()).unwrap();
        let vols: BTreeMap<&str, (&str, &Path, HostPathType)> = p
            .volumes
            .iter()
            .map(|v| {
                (
                    v.name.as_str(),
                    (v.manifest_path.as_str(), v.host.as_path(), v.kind),
                )
            })
            .collect();
        assert_eq!(
            vols["cni-bin-dir"],
            (
                "/opt/cni/bin",
                Path::new("/run/vpc-lab/instance1/opt/cni/bin"),
                HostPathType::DirectoryOrCreate
            )
        );
        assert_eq!(
            vols["xtables-lock"].1,
            Path::new("/run/vpc-lab/instance1/run/xtables.lock")
        );
        assert_eq!(vols["xtables-lock"].2, HostPathType::FileOrCreate);
        assert!(
            p.volumes
                .iter()
                .all(|v| v.host.starts_with(&node().root) || v.host == Path::new(PROC_SYS_NET))
        );
        assert_eq!(vols["proc-sys-net"].1, Path::new("/proc/sys/net"));

        assert_eq!(p.init.len(), 1);
        assert_eq!(p.containers.len(), 1);
        let init = &p.init[0];
        assert_eq!(init.config.args, vec!["init"]);
        assert_eq!(
            mounts_of(init),
            BTreeMap::from([
                (
                    "/host/opt/cni/bin".to_string(),
                    "/run/vpc-lab/instance1/opt/cni/bin".to_string()
                ),
                (
                    "/host/proc/sys/net".to_string(),
                    "/proc/sys/net".to_string()
                )
            ])
        );
        let main = &p.containers[0];
        let m = mounts_of(main);
        assert_eq!(
            m["/host/etc/cni/net.d"],
            "/run/vpc-lab/instance1/etc/cni/net.d"
        );
        assert_eq!(
            m["/var/run/aws-node"],
            "/run/vpc-lab/instance1/var/run/aws-node"
        );
        assert_eq!(m["/run/vpc-cni"], "/run/vpc-lab/instance1/run/vpc-cni");
        // The socket's and the plugin log's directories also at their host paths.
        assert_eq!(
            m["/run/vpc-lab/instance1/run/vpc-cni"],
            "/run/vpc-lab/instance1/run/vpc-cni"
        );
        assert_eq!(
            m["/run/vpc-lab/instance1/var/log/aws-routed-eni"],
            "/run/vpc-lab/instance1/var/log/aws-routed-eni"
        );
        assert_eq!(m["/host/proc/sys/net"], "/proc/sys/net");
        assert_eq!(m.len(), 9);
        assert!(main.config.mounts.iter().all(|x| !x.readonly));
    }

    #[test]
    fn env_is_the_manifests_with_host_side_paths_and_the_labs_on_top() {
        let p = plan(&manifest(), &node(), &id()).unwrap();
        let init = env_map(&p.init[0].config);
        assert_eq!(init["HOST_CNI_BIN_PATH"], "/host/opt/cni/bin");
        assert_eq!(
            init["AWS_EC2_METADATA_SERVICE_ENDPOINT"],
            "http://127.0.0.1:1338"
        );
        assert!(
            !init.contains_key("WARM_IP_TARGET"),
            "the lab's agent settings are not the init container's"
        );
        let main = env_map(&p.containers[0].config);
        assert_eq!(
            main["VPC_CNI_AGENT_SOCKET"],
            "/run/vpc-lab/instance1/run/vpc-cni/agent.sock"
        );
        assert_eq!(
            main["AWS_VPC_K8S_PLUGIN_LOG_FILE"],
            "/run/vpc-lab/instance1/var/log/aws-routed-eni/plugin.log"
        );
        // In-container paths of the agent's own files stay as the manifest writes them.
        assert_eq!(main["HOST_CNI_CONFDIR_PATH"], "/host/etc/cni/net.d");
        assert_eq!(
            main["AWS_VPC_K8S_CNI_BACKING_STORE"],
            "/var/run/aws-node/ipam.json"
        );
        // The lab's provisioning default over the manifest's "false"; --agent-env added.
        assert_eq!(main["DISABLE_NETWORK_RESOURCE_PROVISIONING"], "true");
        assert_eq!(main["WARM_IP_TARGET"], "5");
        assert_eq!(main["AWS_REGION"], "us-west-2");
        assert_eq!(main["WARM_ENI_TARGET"], "1", "the manifest's own");
        // One entry per name.
        assert_eq!(main.len(), p.containers[0].config.envs.len());
    }

    #[test]
    fn env_values_expand_earlier_variables_and_later_entries_win() {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "c", "image": "x:1",
            "env": [
                {"name": "A", "value": "one"},
                {"name": "B", "value": "$(A)-two $(NOPE) $$(A)"},
                {"name": "A", "value": "three"},
                {"name": "VPC_CNI_AGENT_SOCKET", "value": "/elsewhere/agent.sock"},
            ],
            "args": ["--x=$(B)"],
        }))
        .unwrap();
        let mut lab = LabEnv {
            node: vec![("A".into(), "node".into())],
            extra: vec![],
            mounts: vec![],
        };
        let (env, extra_mounts) = container_env(&c, false, &[], &lab, "instance1").unwrap();
        assert_eq!(
            env,
            vec![
                ("A".to_string(), "node".to_string()),
                ("B".to_string(), "one-two $(NOPE) $(A)".to_string()),
                (
                    "VPC_CNI_AGENT_SOCKET".to_string(),
                    "/elsewhere/agent.sock".to_string()
                ),
            ],
            "a path outside every mount is left alone"
        );
        assert!(extra_mounts.is_empty());
        // The lab's mounts (its kubeconfig's directory): read-only at the same path, into the
        // pod's containers only.
        lab.mounts = vec![PathBuf::from("/run/vpc-lab/kube")];
        let (_, extra_mounts) = container_env(&c, false, &[], &lab, "instance1").unwrap();
        assert_eq!(
            extra_mounts,
            [MountPlan {
                container_path: "/run/vpc-lab/kube".into(),
                host: PathBuf::from("/run/vpc-lab/kube"),
                readonly: true,
                propagation: api::MountPropagation::PropagationPrivate,
            }]
        );
        let (_, init_mounts) = container_env(&c, true, &[], &lab, "instance1").unwrap();
        assert!(init_mounts.is_empty());
        assert_eq!(expand("a$b$", |_| None), "a$b$");
        assert_eq!(expand("$(X", |_| Some("v".into())), "$(X");
    }

    #[test]
    fn the_sandbox_is_host_network_unprivileged_with_the_nodes_dns() {
        let p = plan(&manifest(), &node(), &id()).unwrap();
        let ctx = p
            .sandbox
            .linux
            .as_ref()
            .unwrap()
            .security_context
            .as_ref()
            .unwrap();
        let ns = ctx.namespace_options.as_ref().unwrap();
        assert_eq!(ns.network, api::NamespaceMode::Node as i32);
        assert_eq!(ns.pid, api::NamespaceMode::Pod as i32);
        assert!(
            !ctx.privileged,
            "no privileged container: the sandbox is not privileged either"
        );
        let dns = p.sandbox.dns_config.as_ref().unwrap();
        assert_eq!(dns.servers, vec!["10.0.0.2"]);
        assert_eq!(dns.searches, vec!["a.example", "b.example"]);
        assert_eq!(dns.options, vec!["ndots:2"]);
        assert_eq!(p.sandbox.port_mappings.len(), 1);
        assert_eq!(p.sandbox.port_mappings[0].host_port, 61678);
        assert_eq!(
            p.sandbox.labels["app.kubernetes.io/name"], "vpc-cni",
            "the template's labels"
        );
        assert_eq!(p.sandbox.labels["io.kubernetes.pod.uid"], "u-1");
        assert_eq!(
            p.log_dir,
            PathBuf::from("/run/vpc-lab/instance1/kubelet/logs/kube-system_vpc-cni-instance1_u-1")
        );
        assert_eq!(p.grace, Duration::from_secs(10));
        let main = &p.containers[0].config;
        let sc = security(main).unwrap();
        assert!(!sc.privileged, "capabilities, not privileged");
        assert_eq!(
            sc.capabilities.as_ref().unwrap().add_capabilities,
            vec!["NET_ADMIN", "NET_RAW"]
        );
        assert_eq!(
            sc.namespace_options.as_ref().unwrap().network,
            api::NamespaceMode::Node as i32
        );
        let r = main.linux.as_ref().unwrap().resources.as_ref().unwrap();
        assert_eq!(r.cpu_shares, 25, "25m");
        assert_eq!(r.oom_score_adj, NODE_CRITICAL_OOM_SCORE_ADJ);
        assert_eq!(p.containers[0].pull_policy, PullPolicy::IfNotPresent);
    }

    #[test]
    fn probes_get_the_manifests_schedule_and_the_nodes_address() {
        let p = plan(&manifest(), &node(), &id()).unwrap();
        let c = &p.containers[0];
        let live = c.liveness.as_ref().unwrap();
        assert_eq!(live.url(), "http://172.31.15.228:61678/livez");
        assert_eq!(
            (
                live.initial_delay,
                live.period,
                live.timeout,
                live.failure_threshold
            ),
            (
                Duration::from_secs(60),
                Duration::from_secs(10),
                Duration::from_secs(5),
                6
            )
        );
        let ready = c.readiness.as_ref().unwrap();
        assert_eq!(ready.url(), "http://172.31.15.228:61678/readyz");
        assert_eq!(
            (
                ready.initial_delay,
                ready.period,
                ready.timeout,
                ready.failure_threshold,
                ready.success_threshold
            ),
            (
                Duration::ZERO,
                Duration::from_secs(5),
                Duration::from_secs(5),
                3,
                1
            )
        );
        // Kubelet's defaults for what a probe leaves out.
        let bare: Probe = serde_json::from_value(serde_json::json!({
            "httpGet": {"port": 8080, "path": "x"}
        }))
        .unwrap();
        let c: Container = serde_json::from_value(serde_json::json!({"name": "c"})).unwrap();
        let s = probe_spec(Kind::Readiness, &bare, &c, Ipv4Addr::LOCALHOST).unwrap();
        assert_eq!(s.url(), "http://127.0.0.1:8080/x");
        assert_eq!(
            (
                s.initial_delay,
                s.period,
                s.timeout,
                s.success_threshold,
                s.failure_threshold
            ),
            (
                Duration::ZERO,
                Duration::from_secs(10),
                Duration::from_secs(1),
                1,
                3
            )
        );
        let exec: Probe =
            serde_json::from_value(serde_json::json!({"exec": {"command": ["true"]}})).unwrap();
        assert!(probe_spec(Kind::Liveness, &exec, &c, Ipv4Addr::LOCALHOST).is_err());
    }

    #[test]
    fn what_the_lab_does_not_model_is_refused_by_name() {
        let base = serde_json::to_value(manifest()).unwrap();
        let with = |path: &str, v: serde_json::Value| {
            let mut d = base.clone();
            *d.pointer_mut(path).unwrap() = v;
            serde_json::from_value::<DaemonSet>(d).unwrap()
        };
        let cases = [
            (
                "/spec/template/spec/hostNetwork",
                serde_json::json!(false),
                "hostNetwork",
            ),
            (
                "/spec/template/spec/volumes/0",
                serde_json::json!({"name": "cni-bin-dir", "emptyDir": {}}),
                "not a hostPath",
            ),
            (
                "/spec/template/spec/containers/0/env/0",
                serde_json::json!({"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}}),
                "valueFrom",
            ),
            (
                "/spec/template/spec/dnsPolicy",
                serde_json::json!("ClusterFirstWithHostNet"),
                "dnsPolicy",
            ),
            (
                "/spec/template/spec/containers/0/readinessProbe",
                serde_json::json!({"tcpSocket": {"port": 1}}),
                "httpGet",
            ),
        ];
        for (path, v, want) in cases {
            let e = format!("{:#}", plan(&with(path, v), &node(), &id()).unwrap_err());
            assert!(e.contains(want), "{path}: {e}");
        }
    }

    #[test]
    fn pull_policy_defaults_as_the_api_does() {
        let of = |i: &str, p: Option<&str>| PullPolicy::of(i, p).unwrap();
        assert_eq!(of("vpc-cni:latest", None), PullPolicy::Always);
        assert_eq!(of("vpc-cni", None), PullPolicy::Always);
        assert_eq!(of("registry:5000/vpc-cni", None), PullPolicy::Always);
        assert_eq!(
            of("registry:5000/vpc-cni:0.1.0", None),
            PullPolicy::IfNotPresent
        );
        assert_eq!(
            of("vpc-cni:latest", Some("IfNotPresent")),
            PullPolicy::IfNotPresent
        );
        assert!(PullPolicy::of("x", Some("Sometimes")).is_err());
    }

    #[test]
    fn cpu_requests_become_kubelets_shares() {
        assert_eq!(cpu_shares(Some("25m")).unwrap(), 25);
        assert_eq!(cpu_shares(Some("1")).unwrap(), 1024);
        assert_eq!(cpu_shares(Some("0.5")).unwrap(), 512);
        assert_eq!(cpu_shares(Some("1m")).unwrap(), 2);
        assert_eq!(cpu_shares(None).unwrap(), 2);
        assert!(cpu_shares(Some("lots")).is_err());
    }
}
