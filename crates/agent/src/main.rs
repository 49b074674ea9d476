//! vpc-cni-agent: the node agent. Learns the node from IMDS, sets up the host network and the
//! ENIs, keeps the address pool and its checkpoint, serves the plugin, and signals readiness by
//! installing the plugin and writing the CNI network configuration.

mod checkpoint;
mod cloud_api;
mod config;
mod host;
mod http;
mod install;
mod provision;
mod server;
mod state;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};
use tracing_subscriber::EnvFilter;

use crate::config::Config;
use crate::state::State;

fn init_logging(cfg: &Config) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match cfg.log_file.as_str() {
        "stderr" => builder.with_writer(std::io::stderr).init(),
        "stdout" => builder.with_writer(std::io::stdout).init(),
        path => {
            if let Some(dir) = std::path::Path::new(path).parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("AWS_VPC_K8S_CNI_LOG_FILE={path}"))?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("AWS_VPC_K8S_CNI_LOG_FILE={path}: cannot open"))?;
            builder
                .with_writer(Mutex::new(file))
                .with_ansi(false)
                .init()
        }
    }
    Ok(())
}

/// How often the agent deletes the pod veths that DEL retired.
const VETH_REAP_INTERVAL: Duration = Duration::from_secs(1);

/// The plugin's DEL leaves the pod's veth pair down in `dataplane::RETIRED_LINK_GROUP`
/// (deleting it would make the runtime wait ~20 ms for the kernel); this thread deletes that
/// group in one batch every [`VETH_REAP_INTERVAL`], starting now (leftovers of a previous run),
/// and then returns free malloc memory to the kernel.
fn spawn_housekeeping() -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("housekeeping".into())
        .stack_size(64 * 1024)
        .spawn(|| {
            let mut last_error = None;
            loop {
                match dataplane::reap_retired_links() {
                    Ok(deleted) => {
                        if deleted {
                            debug!("deleted the retired pod veths");
                        }
                        last_error = None;
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        if last_error.as_ref() != Some(&msg) {
                            warn!("deleting retired pod veths: {msg}; retrying every second");
                        }
                        last_error = Some(msg);
                    }
                }
                trim_malloc();
                std::thread::sleep(VETH_REAP_INTERVAL);
            }
        })
        .map(|_| ())
}

async fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let vars: HashMap<String, String> = std::env::vars().collect();
    let cfg = config::from_env(&vars).context("invalid configuration")?;
    init_logging(&cfg)?;
    let imds = cloud::ImdsMetadata::from_env().context("IMDS client")?;
    let md = host::learn(&imds, 10).await?;
    info!(instance = %md.instance_id, r#type = %md.instance_type, enis = md.enis.len(), "learned the instance from IMDS");

    // With provisioning, EC2 is the truth for the attached ENIs and their addresses.
    let ec2 = if cfg.provisioning {
        Some(Arc::new(
            cloud::Ec2::from_env().await.context("EC2 client")?,
        ))
    } else {
        None
    };
    let enis = match &ec2 {
        Some(ec2) => host::enis_from_ec2(ec2.as_ref(), &md)
            .await
            .context("listing this instance's ENIs in EC2")?,
        None => host::enis_from_imds(&md),
    };

    let node = {
        let (cfg, md, enis) = (cfg.clone(), md.clone(), enis.clone());
        tokio::task::spawn_blocking(move || host::setup(&cfg, &md, &enis)).await??
    };
    info!(primary = %node.primary_ifname, vpc_cidrs = ?node.vpc_cidrs, "host network set up");
    spawn_housekeeping().context("starting the housekeeping thread")?;

    let hint = if cfg.provisioning {
        "more addresses have been requested from EC2; the runtime retries the pod".to_string()
    } else {
        "provisioning is disabled (DISABLE_NETWORK_RESOURCE_PROVISIONING=true): assign more secondary IPs to this node's ENIs, or delete pods".to_string()
    };
    let mut state = State::new(node.pool, node.vpc_cidrs, cfg.checkpoint.clone(), hint);
    let cp = checkpoint::load(&cfg.checkpoint)?;
    for w in state.restore(&cp) {
        warn!("{w}");
    }
    // Pods whose DEL ran while the agent was down were torn down from their prevResult by
    // the plugin; their addresses are still allocated here. Release them.
    match tokio::task::spawn_blocking(dataplane::wired_pod_ips).await? {
        Ok(wired) => {
            for (key, ip) in state.prune_unwired(&wired, 60_000) {
                warn!(%key, %ip, "released: no pod on this node is wired to the address (deleted while the agent was down)");
            }
        }
        Err(e) => warn!("cannot list the node's pod routes; not pruning: {e}"),
    }
    let s = state.pool().stats(state::now_ms());
    info!(
        restored = cp.allocations.len(),
        total = s.total,
        assigned = s.assigned,
        cooling = s.cooling,
        "pool ready"
    );
    let state = Arc::new(Mutex::new(state));

    let mut limits = None;
    if let Some(ec2) = &ec2 {
        let provisioner = provisioner(&cfg, &md, ec2.clone(), state.clone()).await?;
        limits = Some(provisioner.settings.limits);
        if let Err(e) = provisioner.recover().await {
            warn!("recovering unfinished ENI operations: {e}; will retry");
        }
        tokio::spawn(provisioner.run());
    }
    let shared = http::Shared {
        state: state.clone(),
        counters: Arc::new(http::Counters::default()),
        ec2,
        limits,
    };
    if let Some(addr) = cfg.metrics_addr {
        tokio::spawn(http::serve_metrics(addr, shared.clone()));
    }
    if let Some(addr) = cfg.introspection_addr {
        tokio::spawn(http::serve_introspection(addr, shared.clone()));
    }

    let listener = server::bind(&cfg.socket)?;
    let plugin_src = match &cfg.plugin_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locating the agent executable")?
            .with_file_name(install::PLUGIN_NAME),
    };
    let plugin = install::install_plugin(&plugin_src, &cfg.cni_bin_dir)?;
    let conflist = install::write_conflist(&cfg)?;
    info!(
        plugin = %plugin.display(),
        conflist = %conflist.display(),
        socket = %cfg.socket.display(),
        startup_ms = started.elapsed().as_millis() as u64,
        "ready"
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let result = tokio::select! {
        r = server::serve(listener, state, shared.counters.clone()) => r.context("plugin socket"),
        _ = term.recv() => { info!("SIGTERM: shutting down"); Ok(()) }
        _ = int.recv() => { info!("SIGINT: shutting down"); Ok(()) }
    };
    let _ = std::fs::remove_file(&cfg.socket);
    result
}

/// DescribeInstanceTypes, or the built-in table when EC2 cannot answer.
async fn learn_limits(
    ec2: &cloud::Ec2,
    instance_type: &str,
) -> anyhow::Result<cloud::InstanceTypeLimits> {
    use cloud_api::Cloud;
    match ec2.instance_limits(instance_type).await {
        Ok(l) => Ok(l),
        Err(e) => match cloud_api::builtin_limits(instance_type) {
            Some(l) => {
                warn!(r#type = %instance_type, "DescribeInstanceTypes failed ({e}); using the built-in limits");
                Ok(l)
            }
            None => bail!(
                "cannot learn the ENI and IP limits of {instance_type}: DescribeInstanceTypes failed ({e}) and the type is not in the built-in table"
            ),
        },
    }
}

/// Builds the provisioner: instance limits from DescribeInstanceTypes (or the built-in
/// table), the node's subnet and security groups from its primary ENI.
async fn provisioner(
    cfg: &Config,
    md: &cloud::InstanceMetadata,
    ec2: Arc<cloud::Ec2>,
    state: Arc<Mutex<State>>,
) -> anyhow::Result<Arc<provision::Provisioner<cloud::Ec2, cloud_api::Netlink>>> {
    let cached = state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .instance_limits
        .clone()
        .filter(|c| c.instance_type == md.instance_type);
    let limits = match cached {
        Some(c) => cloud::InstanceTypeLimits {
            max_enis: c.max_enis,
            ipv4_per_eni: c.ipv4_per_eni,
        },
        None => learn_limits(&ec2, &md.instance_type).await?,
    };
    {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        st.instance_limits = Some(checkpoint::InstanceLimitsRecord {
            instance_type: md.instance_type.clone(),
            max_enis: limits.max_enis,
            ipv4_per_eni: limits.ipv4_per_eni,
        });
        st.save()?;
    }
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
    let ips_per_eni = limits.ipv4_per_eni.saturating_sub(1);
    let primary = md
        .primary_eni()
        .context("IMDS lists no primary ENI (device number 0)")?;
    let settings = provision::Settings {
        targets: ipam::planner::Targets {
            warm_eni: cfg.warm_eni_target,
            warm_ip: cfg.warm_ip_target,
            min_ip: cfg.minimum_ip_target,
        },
        limits: ipam::planner::Limits {
            max_enis,
            ips_per_eni,
            // The reference's max pods (ENIs × (IPs − 1) + 2) counts two host-network pods
            // that need no address: the address ceiling is the ENI capacity.
            max_pods: max_enis * ips_per_eni,
        },
        min_eni_age: Duration::from_secs(cfg.min_eni_age_s),
        decrease_interval: Duration::from_secs(30),
        subnet_full_backoff: Duration::from_secs(120),
        interval: Duration::from_secs(5),
    };
    info!(r#type = %md.instance_type, max_enis, ips_per_eni, targets = ?settings.targets, "provisioning through EC2");
    let node = provision::NodeIdentity {
        instance_id: md.instance_id.clone(),
        instance_type: md.instance_type.clone(),
        subnet_id: primary.subnet_id.clone(),
        subnet: primary.subnet_cidr,
        security_groups: primary.security_groups.clone(),
        eni_mtu: cfg.eni_mtu,
        cluster_name: cfg.cluster_name.clone(),
        additional_tags: cfg.additional_eni_tags.clone(),
    };
    Ok(Arc::new(provision::Provisioner::new(
        ec2,
        Arc::new(cloud_api::Netlink { wait_s: 30 }),
        state,
        node,
        settings,
    )))
}

/// Threads for blocking work (the plugin's requests, which serialise on the state's lock,
/// and netlink calls). Tokio's default of 512 let a burst of concurrent ADDs start one thread
/// (stack and malloc arena) per request.
const MAX_BLOCKING_THREADS: usize = 8;

/// glibc malloc tuning. By default glibc gives each thread that allocates concurrently its own
/// arena (up to 8 per core), each keeping what is freed in it; the agent's allocations are
/// small and mostly serialised by the state's lock, so two arenas cost nothing in speed.
/// Blocks of 64 KiB and more (the checkpoint's JSON grows with the pods) are mmapped, so
/// freeing them returns them to the kernel.
#[cfg(target_env = "gnu")]
fn tune_malloc() {
    // SAFETY: mallopt only sets allocator parameters; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
}

/// Returns the free memory of the malloc arenas to the kernel.
#[cfg(target_env = "gnu")]
fn trim_malloc() {
    // SAFETY: malloc_trim is thread-safe and only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(target_env = "gnu"))]
fn tune_malloc() {}

#[cfg(not(target_env = "gnu"))]
fn trim_malloc() {}

fn main() -> ExitCode {
    tune_malloc();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .enable_all()
        .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(run()),
        Err(e) => Err(anyhow::Error::new(e).context("starting the tokio runtime")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("vpc-cni-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
