//! The agent's life from a parsed configuration to SIGTERM: start the endpoints (probes
//! first), learn the node, set it up, restore the pool, start the provisioner, install the
//! plugin and its network configuration (the readiness signal), then serve the plugin socket.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloud::CloudError;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::checkpoint::CheckpointError;
use crate::cloud_api::LimitsError;
use crate::config::Config;
use crate::health::{Health, Watched};
use crate::install::InstallError;
use crate::node_net::KernelNode;
use crate::provisioner::{NodeIdentity, Provisioner, Settings};
use crate::recovery::RecoveryError;
use crate::server::ServerError;
use crate::startup::StartupError;
use crate::state::State;
use crate::{
    checkpoint, cloud_api, health, housekeeping, http, install, k8s, recovery, server, startup,
    state, swap,
};

/// Why the agent could not start, or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("IMDS client")]
    ImdsClient(#[source] CloudError),
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error("EC2 client")]
    Ec2Client(#[source] CloudError),
    #[error("listing this instance's ENIs in EC2")]
    ListEnis(#[source] CloudError),
    #[error("starting the housekeeping thread")]
    Housekeeping(#[source] std::io::Error),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
    #[error(transparent)]
    Limits(#[from] LimitsError),
    #[error("IMDS lists no primary ENI (device number 0)")]
    NoPrimaryEni,
    #[error(
        "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=true needs the Kubernetes API (the node's ENIConfig): {0}"
    )]
    CustomNetworking(String),
    #[error(
        "ENABLE_PREFIX_DELEGATION=true, but {instance_type} is not a Nitro instance type (hypervisor {hypervisor}): EC2 assigns /28 prefixes only to Nitro-based instances; set ENABLE_PREFIX_DELEGATION=false on this node, or run it on a Nitro type"
    )]
    PrefixesNeedNitro {
        instance_type: String,
        hypervisor: String,
    },
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error(transparent)]
    Signals(std::io::Error),
    #[error("plugin socket")]
    Socket(#[source] std::io::Error),
    /// A blocking task (node set-up, listing pod routes) died.
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

/// Threads for blocking work (the plugin's requests, which serialise on the state's lock,
/// and netlink calls). Tokio's default of 512 let a burst of concurrent ADDs start one thread
/// (stack and malloc arena) per request.
const MAX_BLOCKING_THREADS: usize = 8;

/// The agent's tokio runtime: two workers and at most [`MAX_BLOCKING_THREADS`] blocking threads.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .build()
}

/// Runs the agent until SIGTERM or SIGINT (`Ok`) or a fatal error. `started` is when the
/// process began, for the start-up time logged at readiness.
pub async fn run(cfg: Config, started: Instant) -> Result<(), AgentError> {
    dataplane::netlink::set_proc_sys(&cfg.proc_sys);
    // The probes answer from the start: liveness at once, readiness with the step under way.
    let health = Arc::new(Health::new());
    let endpoints = Arc::new(http::Endpoints::new(&cfg, health.clone()));
    if let Some(addr) = cfg.metrics_addr {
        tokio::spawn(http::serve_metrics(addr, endpoints.clone()));
    }
    if let Some(addr) = cfg.introspection_addr {
        tokio::spawn(http::serve_introspection(addr, endpoints.clone()));
    }
    tokio::spawn(health::heartbeat(health.clone(), {
        let endpoints = endpoints.clone();
        move || {
            if let Some(s) = endpoints.shared() {
                let _held = s.state.lock().unwrap_or_else(|p| p.into_inner());
            }
        }
    }));

    health.step("learning the instance from IMDS");
    let imds = cloud::ImdsMetadata::from_env().map_err(AgentError::ImdsClient)?;
    let md = startup::learn(&imds, 10).await?;
    info!(instance = %md.instance_id, r#type = %md.instance_type, enis = md.enis.len(), "learned the instance from IMDS");

    // With provisioning, EC2 is the truth for the attached ENIs and their addresses.
    let ec2 = if cfg.provisioning {
        Some(Arc::new(
            cloud::Ec2::from_env()
                .await
                .map_err(AgentError::Ec2Client)?,
        ))
    } else {
        None
    };
    health.step("listing the instance's ENIs");
    let enis = match &ec2 {
        Some(ec2) => startup::enis_from_ec2(ec2.as_ref(), &md)
            .await
            .map_err(AgentError::ListEnis)?,
        None => startup::enis_from_imds(&md),
    };

    health.step("setting up the host network");
    let node = {
        let (cfg, md, enis) = (cfg.clone(), md.clone(), enis.clone());
        tokio::task::spawn_blocking(move || startup::setup(&cfg, &md, &enis)).await??
    };
    info!(primary = %node.primary_ifname, vpc_cidrs = ?node.vpc_cidrs, "host network set up");
    housekeeping::spawn(health.clone()).map_err(AgentError::Housekeeping)?;
    health.step("restoring the pool");

    let hint = if cfg.provisioning {
        "more addresses have been requested from EC2; the runtime retries the pod".to_string()
    } else {
        "provisioning is disabled (DISABLE_NETWORK_RESOURCE_PROVISIONING=true): assign more secondary IPs to this node's ENIs, or delete pods".to_string()
    };
    let mut state = State::new(node.pool, node.vpc_cidrs, cfg.checkpoint.clone(), hint);
    // The checkpoint, or (torn, missing) the node's pod wiring: every address a running pod
    // has is held before any ADD is served. Allocations whose pod was deleted while the agent
    // was down (the plugin tore it down from its prevResult) are released.
    let wired = tokio::task::spawn_blocking(dataplane::wired_pods).await?;
    let recovered = recovery::recover(&mut state, &cfg.checkpoint, wired, state::now_ms() / 1000)?;
    recovered.log();
    let rescan = Arc::new(tokio::sync::Notify::new());
    state.rescan = Some(rescan.clone());
    let s = state.pool().stats(state.now());
    info!(
        rebuilt = recovered.rebuilt.len(),
        total = s.total,
        assigned = s.assigned,
        cooling = s.cooling,
        "pool ready"
    );
    let state = Arc::new(Mutex::new(state));
    tokio::spawn(recovery::watch_rebuilt(
        state.clone(),
        rescan,
        || dataplane::wired_pods().map(|w| w.into_keys().collect()),
        recovery::RESCAN_SETTLE,
        recovery::RESCAN_PERIOD,
    ));

    let mut limits = None;
    let mut provisioner = None;
    if let Some(ec2) = &ec2 {
        let reserved: Vec<u32> = enis
            .iter()
            .filter(|e| e.unmanaged.is_some())
            .map(|e| e.device_number)
            .collect();
        health.step("starting the provisioner");
        let cloud = Arc::new(Watched::new(ec2.clone(), health.clone()));
        let p = self::provisioner(&cfg, &md, cloud, state.clone(), reserved).await?;
        limits = Some(p.settings.limits);
        if let Err(e) = p.recover().await {
            warn!("recovering unfinished ENI operations: {e}; will retry");
        }
        tokio::spawn(p.clone().run());
        provisioner = Some(p);
    }
    start_k8s(&cfg, state.clone(), provisioner.clone()).await?;
    let shared = http::Shared {
        state: state.clone(),
        counters: Arc::new(http::Counters::default()),
        ec2,
        limits,
    };
    endpoints.set_shared(shared.clone());

    let listener = server::bind(&cfg.socket)?;
    health.step("installing the plugin binaries");
    let installed = install::install_binaries(&cfg)?;
    for p in &installed.chained.plugins {
        info!(plugin = p.name, path = %p.path.display(), from = %p.source(), versions = ?p.versions, "chained plugin");
    }
    health.step("moving aws-node's pods to vpc-cni's layout");
    // A node aws-node wired: its pods move to our layout before any ADD is served, and only
    // once every step that can still fail has passed (an agent that exits leaves them as they
    // were, for aws-node).
    let assigned = state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .assigned_routes();
    let adopted = tokio::task::spawn_blocking(move || swap::adopt_pods(&assigned)).await?;
    if !adopted.moved.is_empty() {
        info!(
            pods = adopted.moved.len(),
            "pods wired by aws-node moved to vpc-cni's layout"
        );
    }
    for ip in &adopted.unknown {
        warn!(%ip, "a pod is wired aws-node's way to an address on none of this node's ENIs; left as it is");
    }
    for e in &adopted.errors {
        warn!("adopting aws-node's pods: {e}");
    }
    health.step("writing the conflist");
    let conflist = install::write_conflist(&cfg, &installed.chained)?;
    health.serving();
    // Ours is live: aws-node's conflist and iptables rules go (never before).
    let retire_cfg = cfg.clone();
    let (done, failed) =
        tokio::task::spawn_blocking(move || swap::retire_aws_node(&retire_cfg)).await?;
    swap::log_retired(&done, &failed);
    info!(
        plugin = %installed.plugin.display(),
        conflist = %conflist.display(),
        cni_versions = ?installed.chained.cni_versions,
        socket = %cfg.socket.display(),
        startup_ms = started.elapsed().as_millis() as u64,
        "ready"
    );

    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    let result = tokio::select! {
        r = server::serve(listener, state, shared.counters.clone()) => r.map_err(AgentError::Socket),
        _ = term.recv() => { info!("SIGTERM: shutting down"); Ok(()) }
        _ = int.recv() => { info!("SIGINT: shutting down"); Ok(()) }
    };
    let _ = std::fs::remove_file(&cfg.socket);
    result
}

/// The Kubernetes API side, if the agent has a client (`KUBECONFIG`, or the pod's service
/// account): the node's capacity caps the pool, events on the node, the pod IP annotation.
/// Starts background tasks only: nothing waits on the API server.
async fn start_k8s(
    cfg: &Config,
    state: Arc<Mutex<State>>,
    provisioner: Option<Arc<Provisioner<Watched<cloud::Ec2>, KernelNode>>>,
) -> Result<(), AgentError> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let custom = cfg.custom_networking && provisioner.is_some();
    let client = match k8s::client_from_env(cfg.kubeconfig.as_deref(), in_cluster).await {
        Ok(Some(c)) => c,
        Ok(None) if custom => {
            return Err(AgentError::CustomNetworking(
                "neither KUBECONFIG nor a service account gives the agent the Kubernetes API"
                    .into(),
            ));
        }
        Err(e) if custom => return Err(AgentError::CustomNetworking(e.to_string())),
        Ok(None) => {
            info!(
                "no Kubernetes API client (neither KUBECONFIG nor a service account): the node's capacity, node events and the pod IP annotation are off"
            );
            if cfg.annotate_pod_ip {
                warn!(
                    "ANNOTATE_POD_IP=true, but without a Kubernetes API client no pod is annotated"
                );
            }
            return Ok(());
        }
        Err(e) => {
            warn!("{e}: the node's capacity, node events and the pod IP annotation are off");
            return Ok(());
        }
    };
    let (outbox, sender) =
        k8s::Outbox::new(client.clone(), cfg.node_name.clone().unwrap_or_default());
    tokio::spawn(sender);
    if cfg.annotate_pod_ip {
        let o = outbox.clone();
        state.lock().unwrap_or_else(|p| p.into_inner()).on_assigned =
            Some(state::OnAssigned(Box::new(move |pod, ip| {
                o.pod_ip(&pod.namespace, &pod.name, ip)
            })));
    }
    let Some(node) = cfg.node_name.clone() else {
        if custom {
            return Err(AgentError::CustomNetworking(
                "MY_NODE_NAME is not set, so the agent cannot read its node's ENIConfig label"
                    .into(),
            ));
        }
        warn!(
            "MY_NODE_NAME is not set: the agent does not know its node in the Kubernetes API (no capacity, no node events)"
        );
        return Ok(());
    };
    info!(%node, annotate_pod_ip = cfg.annotate_pod_ip, custom_networking = custom, "Kubernetes API client ready");
    let st = state.clone();
    tokio::spawn(k8s::events_from_blockers(
        move || {
            let st = st.lock().unwrap_or_else(|p| p.into_inner());
            st.blocker_reason.zip(st.blocker.clone())
        },
        outbox,
    ));
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(k8s::watch_node(client.clone(), node, tx));
    if let Some(p) = provisioner.clone().filter(|_| custom) {
        let (ctx, crx) = tokio::sync::watch::channel(None);
        tokio::spawn(k8s::watch_eni_configs(client, ctx));
        tokio::spawn(k8s::follow_eni_config(
            rx.clone(),
            crx,
            cfg.eni_config_label.clone(),
            cfg.eni_config_annotation.clone(),
            move |s| p.set_eni_config(s),
        ));
    }
    tokio::spawn(k8s::follow_capacity(rx, move |pods| match &provisioner {
        Some(p) => p.set_node_max_pods(pods),
        None => {
            state.lock().unwrap_or_else(|p| p.into_inner()).max_pods = pods.map(|n| {
                (
                    n,
                    format!("the node's max pods is {n} (its capacity.pods in the Kubernetes API)"),
                )
            });
        }
    }));
    Ok(())
}

/// Prefix delegation on an instance type that is not Nitro-based: refused (EC2 assigns prefixes
/// only to Nitro instances).
fn refuse_prefixes_off_nitro(
    cfg: &Config,
    instance_type: &str,
    info: &cloud::InstanceTypeInfo,
) -> Result<(), AgentError> {
    if cfg.prefix_delegation && !info.is_nitro() {
        return Err(AgentError::PrefixesNeedNitro {
            instance_type: instance_type.to_string(),
            hypervisor: info.hypervisor.clone().unwrap_or_default(),
        });
    }
    Ok(())
}

/// Builds the provisioner: instance limits from DescribeInstanceTypes (or the built-in
/// table), the node's subnet and security groups from its primary ENI.
async fn provisioner(
    cfg: &Config,
    md: &cloud::InstanceMetadata,
    ec2: Arc<Watched<cloud::Ec2>>,
    state: Arc<Mutex<State>>,
    reserved_devices: Vec<u32>,
) -> Result<Arc<Provisioner<Watched<cloud::Ec2>, KernelNode>>, AgentError> {
    let cached = state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .instance_limits
        .clone()
        .filter(|c| c.instance_type == md.instance_type);
    let info = match cached {
        Some(c) if c.prefix_capable.is_some() => cloud::InstanceTypeInfo {
            limits: cloud::InstanceTypeLimits {
                max_enis: c.max_enis,
                ipv4_per_eni: c.ipv4_per_eni,
            },
            hypervisor: c.hypervisor.clone(),
            vcpus: c.vcpus,
        },
        _ => cloud_api::limits_or_builtin(ec2.as_ref(), &md.instance_type).await?,
    };
    let limits = info.limits;
    {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        st.instance_limits = Some(checkpoint::InstanceLimitsRecord {
            instance_type: md.instance_type.clone(),
            max_enis: limits.max_enis,
            ipv4_per_eni: limits.ipv4_per_eni,
            prefix_capable: Some(info.is_nitro()),
            hypervisor: info.hypervisor.clone(),
            vcpus: info.vcpus,
        });
        st.save()?;
    }
    refuse_prefixes_off_nitro(cfg, &md.instance_type, &info)?;
    let mut max_enis = cfg
        .max_eni
        .map_or(limits.max_enis, |m| m.min(limits.max_enis));
    // Device numbers 0..=63: the ENI mark bits of the data path express 63 secondary ENIs.
    let expressible = dataplane::MAX_ENI_DEVICE + 1;
    if max_enis > expressible {
        warn!(
            max_enis,
            "using only {expressible} ENIs: the data path's ENI mark bits (0x3f00) name at most 63 secondary ENIs"
        );
        max_enis = expressible;
    }
    // ENIs that are not ours take slots of the instance's limit, as in the reference.
    max_enis = max_enis.saturating_sub(reserved_devices.len() as u32);
    // Custom networking: the primary ENI carries no pods (it is not in the pool).
    if cfg.custom_networking {
        max_enis = max_enis.saturating_sub(1);
    }
    let ips_per_eni = limits.ipv4_per_eni.saturating_sub(1);
    let primary = md.primary_eni().ok_or(AgentError::NoPrimaryEni)?;
    // The reference's max pods (ENIs × slots × addresses per slot + 2, capped at 110 below 30
    // vCPUs and 250 above): the two host-network pods need no address, so the ceiling is the
    // ENIs' capacity, capped by the kubelet's.
    let mut max_pods = max_enis * ips_per_eni * cfg.targets().addresses_per_slot();
    if let Some(t) = crate::max_pods::from_ec2(&info) {
        let mode = crate::max_pods::Mode {
            prefix_delegation: cfg.prefix_delegation,
            custom_networking: false,
            max_eni: Some(max_enis),
        };
        max_pods = max_pods.min(crate::max_pods::compute(&t, mode).recommended);
    }
    let settings = Settings {
        targets: cfg.targets(),
        limits: ipam::planner::Limits {
            max_enis,
            ips_per_eni,
            max_pods,
        },
        min_eni_age: Duration::from_secs(cfg.min_eni_age_s),
        decrease_interval: Duration::from_secs(30),
        subnet_full_backoff: Duration::from_secs(120),
        interval: Duration::from_secs(5),
        reserved_devices,
        reconcile_interval: Duration::from_secs(60),
        reconcile_grace: Duration::from_secs(30),
        prefix_retry: Duration::from_secs(cfg.prefix_retry_s),
    };
    info!(r#type = %md.instance_type, max_enis, ips_per_eni, max_pods, targets = ?settings.targets, "provisioning through EC2");
    let node = NodeIdentity {
        instance_id: md.instance_id.clone(),
        instance_type: md.instance_type.clone(),
        subnet_id: primary.subnet_id.clone(),
        subnet: primary.subnet_cidr,
        security_groups: primary.security_groups.clone(),
        availability_zone: md.availability_zone.clone(),
        eni_mtu: cfg.eni_mtu,
        cluster_name: cfg.cluster_name.clone(),
        additional_tags: cfg.additional_eni_tags.clone(),
    };
    let p = Provisioner::new(
        ec2,
        Arc::new(KernelNode { wait_s: 30 }),
        state,
        node,
        settings,
    );
    Ok(Arc::new(if cfg.custom_networking {
        p.with_custom_networking()
    } else {
        p
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_delegation_is_refused_off_nitro_with_what_to_do() {
        let cfg = |pd: &str| {
            crate::config::from_env(
                &[("ENABLE_PREFIX_DELEGATION".to_string(), pd.to_string())].into(),
            )
            .unwrap()
        };
        let t2 = crate::cloud_api::builtin_limits("t2.medium").unwrap();
        let m5 = crate::cloud_api::builtin_limits("m5.large").unwrap();
        let e = refuse_prefixes_off_nitro(&cfg("true"), "t2.medium", &t2).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("t2.medium is not a Nitro instance type (hypervisor xen)")
                && text.contains("set ENABLE_PREFIX_DELEGATION=false"),
            "{text}"
        );
        refuse_prefixes_off_nitro(&cfg("true"), "m5.large", &m5).unwrap();
        refuse_prefixes_off_nitro(&cfg("false"), "t2.medium", &t2).unwrap();
    }
}
