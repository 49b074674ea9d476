//! `vpc-lab up`, `down`, `status` and `agent …`: the lab's life cycle. The agents run as
//! processes in the instances' namespaces, or (`up --deploy daemonset`) as the DaemonSet's pod
//! through the lab's kubelet (`crate::kubelet`).

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lab_aws::fidelity::Knobs;
use lab_aws::world::World;
use lab_aws::{moto, seed};
use lab_net::{fabric, ns};
use testkit::procs;

use crate::store::{self, LabState};
use crate::{daemon, kube, kubelet, paths, pods};

fn make_node_dirs(instance: &str) -> Result<()> {
    for d in [
        "etc/cni/net.d",
        "opt/cni/bin",
        "run/vpc-cni",
        "var/run/aws-node",
        "pods",
    ] {
        let p = paths::inst_dir(instance).join(d);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    }
    Ok(())
}

/// How the agents run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Deploy {
    /// A process per instance, in its namespace, with the lab's node paths (`vpc-lab agent …`).
    #[default]
    Process,
    /// The DaemonSet's pod per node instance, run by the lab's kubelet through containerd's CRI
    /// from the node image (`crate::kubelet`; `vpc-lab kubelet …`).
    DaemonSet,
}

/// The lab's default for its agents, over the agent's own (and the DaemonSet's): they use the
/// addresses the seed's world gives the instances and provision nothing, unless `up
/// --provisioning` says so.
const LAB_AGENT_DEFAULTS: &[(&str, &str)] = &[("DISABLE_NETWORK_RESOURCE_PROVISIONING", "true")];

/// How `up` builds the lab.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Extra environment for every agent.
    pub agent_env: Vec<(String, String)>,
    pub agents: bool,
    /// How the agents run.
    pub deploy: Deploy,
    /// Node instances whose agents provision through EC2 (`None`: none; empty: all).
    pub provisioning: Option<Vec<String>>,
    /// Instance type of the node instances.
    pub instance_type: String,
    /// Node instances start with their primary address only (like a new EC2 instance).
    pub fresh_nodes: bool,
    pub knobs: Knobs,
}

impl Default for UpOptions {
    /// `vpc-lab up` without options: the seed's layout, agents that do not provision.
    fn default() -> Self {
        UpOptions {
            agent_env: Vec::new(),
            agents: true,
            deploy: Deploy::Process,
            provisioning: None,
            instance_type: seed::INSTANCE_TYPE.to_string(),
            fresh_nodes: false,
            knobs: Knobs::default(),
        }
    }
}

/// `vpc-lab up`: cleans up a crashed run, starts moto, provisions the seed's world, builds the
/// namespaces and the fabric, starts the daemon and the agents; returns when every agent is
/// ready. On failure the lab is left as it is for inspection.
pub fn up(opts: &UpOptions) -> Result<()> {
    let t0 = Instant::now();
    down()?;
    std::fs::create_dir_all(paths::run_dir())?;
    let state = LabState {
        vpc_id: String::new(),
        moto: moto::start(&paths::run_dir())?,
        region: store::region(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(up_in_runtime(state, opts, t0)).map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\n(the lab is left as it is for inspection; `vpc-lab down` removes it)"
        )
    })
}

async fn up_in_runtime(mut state: LabState, opts: &UpOptions, t0: Instant) -> Result<()> {
    let ec2 = state.ec2();
    opts.knobs.save_to(&paths::knobs_file())?;
    state.vpc_id = seed::provision_seed(&ec2, &opts.instance_type, opts.fresh_nodes)
        .await
        .context("provisioning the seed world in moto")?;
    let world = World::load(&ec2, &state.vpc_id)
        .await
        .context("loading the world from EC2")?;
    state.save()?;
    store::write_world(&world)?;
    tracing::info!(vpc = %state.vpc_id, elapsed = ?t0.elapsed(), "provisioned");

    let w = world.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        fabric::create_base(&w)?;
        fabric::apply(&w, &mut fabric::Applied::default())?;
        for i in &w.instances {
            make_node_dirs(&i.name)?;
        }
        Ok(())
    })
    .await??;
    tracing::info!(elapsed = ?t0.elapsed(), "namespaces and fabric built");

    daemon::spawn()?;
    tracing::info!(elapsed = ?t0.elapsed(), knobs = ?opts.knobs, "lab daemon ready (IMDS, EC2 proxy, whoami)");

    let nodes: Vec<String> = world
        .instances
        .iter()
        .filter(|i| i.node)
        .map(|i| i.name.clone())
        .collect();
    if let Some(p) = &opts.provisioning
        && let Some(bad) = p.iter().find(|n| !nodes.contains(n))
    {
        bail!(
            "--provisioning names {bad:?}, which is not a node instance of the lab (nodes: {})",
            nodes.join(", ")
        );
    }
    if opts.agents {
        let env_of = |n: &String| {
            let mut env = Vec::new();
            if opts
                .provisioning
                .as_ref()
                .is_some_and(|p| p.is_empty() || p.contains(n))
            {
                env.push((
                    "DISABLE_NETWORK_RESOURCE_PROVISIONING".to_string(),
                    "false".to_string(),
                ));
            }
            env.extend(opts.agent_env.iter().cloned());
            env
        };
        match opts.deploy {
            Deploy::Process => {
                for n in &nodes {
                    agent_start(n, &env_of(n), &world.region)?;
                }
                for n in &nodes {
                    wait_agent_ready(n, Duration::from_secs(30))?;
                }
            }
            Deploy::DaemonSet => {
                for n in &nodes {
                    let mut extra: Vec<(String, String)> = LAB_AGENT_DEFAULTS
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect();
                    // The lab's API through its kubeconfig (mounted read-only at the same
                    // path), where a real pod would use its service account; MY_NODE_NAME
                    // comes from the manifest (spec.nodeName).
                    extra.push(kube::kubeconfig_env());
                    extra.extend(env_of(n));
                    let env = kubelet::spec::LabEnv {
                        node: daemon::node_env(&world.region),
                        extra,
                        mounts: vec![paths::kube_dir()],
                    };
                    kubelet::start(n, env)?;
                }
                for n in &nodes {
                    let s = kubelet::wait_ready(n, Duration::from_secs(180))?;
                    if let Some(p) = &s.pod {
                        println!(
                            "{n}: pod {}/{} Ready; {}",
                            p.namespace,
                            p.name,
                            p.timeline.summary()
                        );
                    }
                }
            }
        }
        tracing::info!(elapsed = ?t0.elapsed(), deploy = ?opts.deploy, "agents ready");
    }
    println!(
        "vpc-lab is up in {:.2} s: VPC {} ({} instances), EC2 at http://{}",
        t0.elapsed().as_secs_f64(),
        state.vpc_id,
        world.instances.len(),
        state.moto
    );
    Ok(())
}

/// Kills every process the lab started, deletes every vpclab-* namespace and /run/vpc-lab.
pub fn down() -> Result<()> {
    let rd = paths::run_dir();
    let mut errors = Vec::new();
    // Agents first (they talk to the daemon): the kubelets and their containerd with the
    // DaemonSet's pods, the agent processes; then the daemon, then moto.
    if let Ok(entries) = std::fs::read_dir(&rd) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                errors.extend(kubelet::stop(&e.file_name().to_string_lossy()));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(&rd) {
        for e in entries.flatten() {
            let pf = e.path().join("agent.pid");
            if pf.exists()
                && let Err(err) =
                    procs::stop(&pf, paths::AGENT_MARKER, false, Duration::from_secs(5))
            {
                errors.push(format!("{err:#}"));
            }
        }
    }
    for (pf, marker) in [
        (paths::daemon_pid(), daemon::MARKER),
        (moto::pid_file(&rd), moto::MARKER),
    ] {
        if let Err(err) = procs::stop(&pf, marker, false, Duration::from_secs(5)) {
            errors.push(format!("{err:#}"));
        }
    }
    // Pods, then instances, then the rest.
    let mut names = ns::list_lab();
    names.sort_by_key(|n| {
        if n.starts_with("vpclab-pod-") {
            0
        } else if n == ns::FABRIC {
            2
        } else {
            1
        }
    });
    for n in names {
        if let Err(err) = ns::del(&n) {
            errors.push(format!("{err:#}"));
        }
    }
    if rd.exists()
        && let Err(err) = std::fs::remove_dir_all(&rd)
    {
        errors.push(format!("removing {}: {err}", rd.display()));
    }
    let left = ns::list_lab();
    if !left.is_empty() {
        errors.push(format!("namespaces left behind: {}", left.join(", ")));
    }
    if !errors.is_empty() {
        bail!(
            "vpc-lab down did not clean up everything:\n  {}",
            errors.join("\n  ")
        );
    }
    Ok(())
}

/// `vpc-lab status`.
pub fn status() -> Result<()> {
    let world = store::load_world()?;
    let holders = pods::ip_holders()?;
    let proc_state = |pf: PathBuf, marker: &[&str]| match procs::read_pid(&pf) {
        Some(p) if procs::is_ours(p, marker) => format!("pid {p}"),
        Some(p) => format!("NOT RUNNING (pid {p} gone)"),
        None => "NOT RUNNING".to_string(),
    };
    let moto_addr = LabState::load()
        .map(|s| s.moto.to_string())
        .unwrap_or_else(|_| "?".into());
    println!(
        "EC2 (moto) at http://{moto_addr}: {}; lab daemon (IMDS, EC2 proxy, fabric sync): {}",
        proc_state(moto::pid_file(&paths::run_dir()), moto::MARKER),
        proc_state(paths::daemon_pid(), daemon::MARKER)
    );
    println!(
        "Kubernetes API: {}",
        match kube::status() {
            Ok(k) => format!(
                "{} at {} in the instances, {} here ({} nodes, {} pods, {} ENIConfigs; KUBECONFIG={})",
                if k.serving { "serving" } else { "STOPPED" },
                k.instance_url,
                k.host_url,
                k.nodes,
                k.pods,
                k.eniconfigs,
                k.kubeconfig.display()
            ),
            Err(e) => format!("NOT AVAILABLE ({e:#})"),
        }
    );
    println!(
        "VPC {} ({}) region {}",
        world.vpc_id,
        fmt_list(&world.vpc_cidrs),
        world.region
    );
    for s in &world.subnets {
        println!(
            "  subnet {} {} az {} gateway {}",
            s.id,
            s.cidr,
            s.az,
            s.gateway()
        );
    }
    if !world.security_groups.is_empty() {
        println!(
            "  security groups: {}",
            world
                .security_groups
                .iter()
                .map(|g| format!("{} {}", g.id, g.name))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for inst in &world.instances {
        let agent = if inst.node {
            match procs::read_pid(&paths::agent_pid(&inst.name)) {
                Some(p) if procs::is_ours(p, paths::AGENT_MARKER) => format!("agent pid {p}"),
                _ if kubelet::running(&inst.name).is_some() => {
                    "agent in the DaemonSet's pod: vpc-lab kubelet status".to_string()
                }
                _ => "agent not running".to_string(),
            }
        } else {
            "no agent".to_string()
        };
        println!(
            "{} {} {} az {} ({agent})",
            inst.name, inst.id, inst.instance_type, inst.az
        );
        let mut enis: Vec<_> = inst.enis.iter().collect();
        enis.sort_by_key(|e| e.device_index);
        for e in enis {
            println!(
                "  eth{} {} mac {} subnet {} primary {}",
                e.device_index, e.id, e.mac, e.subnet_id, e.primary_ip
            );
            for ip in &e.secondary_ips {
                let who = holders
                    .get(&(inst.name.clone(), *ip))
                    .map(|p| format!("pod {p}"))
                    .unwrap_or_else(|| "free".to_string());
                println!("    secondary {ip:<15} {who}");
            }
            for p in &e.prefixes {
                let pods: Vec<String> = holders
                    .iter()
                    .filter(|((i, ip), _)| *i == inst.name && p.contains(ip))
                    .map(|((_, ip), pod)| format!("{ip} {pod}"))
                    .collect();
                println!(
                    "    prefix {p:<18} {} pods{}",
                    pods.len(),
                    if pods.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", pods.join(", "))
                    }
                );
            }
        }
    }
    let orphans: Vec<_> = holders
        .iter()
        .filter(|((inst, ip), _)| {
            !world.instance(inst).is_some_and(|i| {
                i.enis.iter().any(|e| {
                    e.secondary_ips.contains(ip) || e.prefixes.iter().any(|p| p.contains(ip))
                })
            })
        })
        .collect();
    for ((inst, ip), pod) in orphans {
        println!(
            "WARNING: pod {pod} on {inst} holds {ip}, which is neither a secondary IP nor in a prefix of {inst}"
        );
    }
    Ok(())
}

fn fmt_list<T: std::fmt::Display>(v: &[T]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where Debian's containernetworking-plugins puts portmap and bandwidth (scripts/setup-clients.sh
/// installs it): the agents copy the plugins they chain from here.
pub const DEBIAN_CNI_PLUGINS: &str = "/usr/lib/cni";

/// Starts the agent of `instance` inside its namespace.
pub fn agent_start(instance: &str, extra: &[(String, String)], region: &str) -> Result<u32> {
    let ins = ns::instance_ns(instance);
    if !ns::exists(&ins) {
        bail!("no namespace {ins}: is {instance:?} an instance of the lab, and is the lab up?");
    }
    if let Some(p) = procs::read_pid(&paths::agent_pid(instance))
        && procs::is_ours(p, paths::AGENT_MARKER)
    {
        bail!(
            "the agent of {instance} is already running (pid {p}); use `vpc-lab agent restart {instance}`"
        );
    }
    if let Some(p) = kubelet::running(instance) {
        bail!(
            "the lab's kubelet (pid {p}) runs the agent of {instance} as the DaemonSet's pod; use `vpc-lab kubelet delete|deploy {instance}`"
        );
    }
    make_node_dirs(instance)?;
    // The conflist of an earlier run would make this run look ready before it has installed
    // the plugin: readiness (`wait_agent_ready`) is this agent's own conflist.
    let stale = paths::conf_dir(instance).join(paths::CONFLIST);
    if let Err(e) = std::fs::remove_file(&stale)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(e).with_context(|| format!("removing the stale {}", stale.display()));
    }
    // Extra env: what the last start used, with what is given now on top.
    let mut merged: Vec<(String, String)> = std::fs::read(paths::agent_env_file(instance))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for (k, v) in extra {
        merged.retain(|(mk, _)| mk != k);
        merged.push((k.clone(), v.clone()));
    }
    let extra = merged;
    std::fs::write(paths::agent_env_file(instance), serde_json::to_vec(&extra)?)?;
    let cmd = agent_command(instance, &extra, region)?;
    let pid = procs::spawn_detached(
        cmd,
        &paths::agent_log(instance),
        &paths::agent_pid(instance),
    )?;
    tracing::info!(instance, pid, "started agent");
    Ok(pid)
}

/// The agent binary of the lab, to run inside `instance` with the lab's node environment (IMDS
/// and EC2 endpoints, the lab's Kubernetes API and the node's name, the node's paths) and
/// `extra` on top.
fn agent_command(
    instance: &str,
    extra: &[(String, String)],
    region: &str,
) -> Result<std::process::Command> {
    let dir = paths::exe_dir()?;
    let agent = dir.join("vpc-cni-agent");
    if !agent.is_file() {
        bail!(
            "agent binary {} not found: build it with `cargo build -p agent` (or run `vpc-lab up --no-agents`)",
            agent.display()
        );
    }
    let mut cmd = ns::command(
        &ns::instance_ns(instance),
        agent.to_str().context("agent path is not UTF-8")?,
    )?;
    let mut env: BTreeMap<String, String> = daemon::node_env(region).into_iter().collect();
    env.extend(kube::agent_env(instance));
    for (k, v) in [
        (
            "HOST_CNI_BIN_PATH",
            paths::cni_bin_dir(instance).display().to_string(),
        ),
        (
            "HOST_CNI_CONFDIR_PATH",
            paths::conf_dir(instance).display().to_string(),
        ),
        (
            "AWS_VPC_K8S_CNI_BACKING_STORE",
            paths::agent_checkpoint(instance).display().to_string(),
        ),
        (
            "VPC_CNI_AGENT_SOCKET",
            paths::agent_socket(instance).display().to_string(),
        ),
        (
            "VPC_CNI_PLUGIN_BINARY",
            dir.join("vpc-cni").display().to_string(),
        ),
        // portmap (and bandwidth) chained after our plugin: Debian's containernetworking-plugins.
        (
            "VPC_CNI_CHAINED_PLUGINS_DIR",
            DEBIAN_CNI_PLUGINS.to_string(),
        ),
        ("RUST_LOG", "info".to_string()),
    ] {
        env.insert(k.to_string(), v);
    }
    for (k, v) in LAB_AGENT_DEFAULTS {
        env.insert(k.to_string(), v.to_string());
    }
    for (k, v) in extra {
        env.insert(k.clone(), v.clone());
    }
    cmd.env_remove("AWS_EC2_METADATA_DISABLED");
    cmd.envs(&env);
    Ok(cmd)
}

/// `vpc-lab agent uninstall <instance>`: runs `vpc-cni-agent uninstall --to aws-node` on the
/// instance with its agent's environment (the agent must be stopped); returns its output.
pub fn agent_uninstall_to_aws_node(instance: &str) -> Result<String> {
    let region = store::load_world()?.region;
    let extra: Vec<(String, String)> = std::fs::read(paths::agent_env_file(instance))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let out = agent_command(instance, &extra, &region)?
        .args(["uninstall", "--to", "aws-node"])
        .env("AWS_VPC_K8S_CNI_LOG_FILE", "stderr")
        .output()
        .context("running vpc-cni-agent uninstall")?;
    if !out.status.success() {
        bail!(
            "vpc-cni-agent uninstall --to aws-node on {instance} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until the agent of `instance` is ready: its conflist exists and its socket answers.
pub fn wait_agent_ready(instance: &str, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    let conf = paths::conf_dir(instance).join(paths::CONFLIST);
    let sock = paths::agent_socket(instance);
    loop {
        let pid = procs::read_pid(&paths::agent_pid(instance));
        let alive = pid.is_some_and(|p| procs::is_ours(p, paths::AGENT_MARKER));
        if !alive {
            bail!(
                "the agent of {instance} exited before it was ready; last lines of {}:\n{}",
                paths::agent_log(instance).display(),
                procs::tail(&paths::agent_log(instance), 30)
            );
        }
        if conf.is_file() && UnixStream::connect(&sock).is_ok() {
            tracing::info!(instance, elapsed = ?t.elapsed(), "agent ready");
            return Ok(());
        }
        if t.elapsed() > timeout {
            bail!(
                "the agent of {instance} was not ready after {timeout:?} (no {} or no answer on {}); last lines of {}:\n{}",
                conf.display(),
                sock.display(),
                paths::agent_log(instance).display(),
                procs::tail(&paths::agent_log(instance), 30)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `vpc-lab agent start <instance>`: starts the agent with the lab's region and waits (30 s at
/// most) until it is ready.
pub fn agent_start_ready(instance: &str, extra: &[(String, String)]) -> Result<u32> {
    let region = store::load_world()?.region;
    let pid = agent_start(instance, extra, &region)?;
    wait_agent_ready(instance, Duration::from_secs(30))?;
    Ok(pid)
}

/// `vpc-lab agent stop|kill <instance>`.
pub fn agent_stop(instance: &str, hard: bool) -> Result<()> {
    let pf = paths::agent_pid(instance);
    if !procs::stop(&pf, paths::AGENT_MARKER, hard, Duration::from_secs(10))? {
        bail!(
            "the agent of {instance} is not running (no live process in {})",
            pf.display()
        );
    }
    Ok(())
}

/// The agent's introspection state (`/v1/state` on 127.0.0.1:61679 inside the instance), or
/// `None` when the agent does not answer within 2 s.
pub fn agent_state(instance: &str) -> Option<serde_json::Value> {
    let out = ns::command(&ns::instance_ns(instance), "curl")
        .ok()?
        .args(["-sf", "--max-time", "2", "http://127.0.0.1:61679/v1/state"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}
