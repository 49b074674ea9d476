//! `vpc-lab up`, `down`, `status` and `agent …`: the lab's life cycle.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::world::World;
use crate::{daemon, fabric, moto, ns, pods, procs};

/// What `up` leaves for the other commands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub vpc_id: String,
    pub moto: SocketAddr,
    pub region: String,
}

pub fn run_dir() -> PathBuf {
    PathBuf::from(ns::RUN_DIR)
}

fn state_path() -> PathBuf {
    run_dir().join("state.json")
}

pub fn world_path() -> PathBuf {
    run_dir().join("world.json")
}

impl State {
    pub fn load() -> Result<State> {
        let p = state_path();
        let s = std::fs::read_to_string(&p).with_context(|| {
            format!("reading {} — is the lab up? run `vpc-lab up`", p.display())
        })?;
        serde_json::from_str(&s).with_context(|| format!("parsing {}", p.display()))
    }
}

/// The World as last published by `up` or the daemon.
pub fn load_world() -> Result<World> {
    let p = world_path();
    let s = std::fs::read_to_string(&p)
        .with_context(|| format!("reading {} — is the lab up? run `vpc-lab up`", p.display()))?;
    serde_json::from_str(&s).with_context(|| format!("parsing {}", p.display()))
}

pub fn write_world(world: &World) -> Result<()> {
    let p = world_path();
    let tmp = p.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(world)?)?;
    std::fs::rename(&tmp, &p)?;
    Ok(())
}

/// Points the AWS SDK of this process at moto. Must run before any thread is started.
pub fn set_sdk_env(moto: SocketAddr, region: &str) {
    // SAFETY: called from `main` before the tokio runtime (or any other thread) exists.
    unsafe {
        std::env::set_var("AWS_ENDPOINT_URL_EC2", format!("http://{moto}"));
        std::env::set_var("AWS_REGION", region);
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
}

/// The region the lab uses when none is set.
pub fn region() -> String {
    std::env::var("AWS_REGION").unwrap_or_else(|_| "us-west-2".to_string())
}

/// An instance's node layout root.
pub fn inst_dir(instance: &str) -> PathBuf {
    run_dir().join(instance)
}
pub fn conf_dir(instance: &str) -> PathBuf {
    inst_dir(instance).join("etc/cni/net.d")
}
pub fn bin_dir(instance: &str) -> PathBuf {
    inst_dir(instance).join("opt/cni/bin")
}
fn agent_socket(instance: &str) -> PathBuf {
    inst_dir(instance).join("run/vpc-cni/agent.sock")
}
fn agent_pid(instance: &str) -> PathBuf {
    inst_dir(instance).join("agent.pid")
}
fn agent_log(instance: &str) -> PathBuf {
    inst_dir(instance).join("agent.log")
}
fn agent_env_file(instance: &str) -> PathBuf {
    inst_dir(instance).join("agent.env.json")
}
const AGENT_MARKER: &[&str] = &["vpc-cni-agent"];
const DAEMON_MARKER: &[&str] = &["vpc-lab", "daemon"];
pub const CONFLIST: &str = "10-vpc-cni.conflist";

fn make_node_dirs(instance: &str) -> Result<()> {
    for d in [
        "etc/cni/net.d",
        "opt/cni/bin",
        "run/vpc-cni",
        "var/run/aws-node",
        "pods",
    ] {
        let p = inst_dir(instance).join(d);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
    }
    Ok(())
}

fn exe_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the vpc-lab executable")?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// Phase 1 of `up` (before any thread exists): clean up, start moto.
pub fn up_prepare() -> Result<State> {
    down()?;
    std::fs::create_dir_all(run_dir())?;
    let moto = moto::start(&run_dir())?;
    Ok(State {
        vpc_id: String::new(),
        moto,
        region: region(),
    })
}

/// How `up` builds the lab.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// Extra environment for every agent.
    pub agent_env: Vec<(String, String)>,
    pub agents: bool,
    /// Node instances whose agents provision through EC2 (`None`: none; empty: all).
    pub provisioning: Option<Vec<String>>,
    /// Instance type of the node instances.
    pub instance_type: String,
    /// Node instances start with their primary address only (like a new EC2 instance).
    pub fresh_nodes: bool,
    pub knobs: crate::fidelity::Knobs,
}

/// Phase 2 of `up` (in the runtime): provision, build the namespaces, start daemon and agents.
pub async fn up(mut state: State, opts: &UpOptions, t0: Instant) -> Result<()> {
    let ec2 = cloud::Ec2::from_env()
        .await
        .context("configuring the EC2 client for moto")?;
    opts.knobs.save()?;
    state.vpc_id = crate::provision::provision_seed(&ec2, &opts.instance_type, opts.fresh_nodes)
        .await
        .context("provisioning the seed world in moto")?;
    let world = World::load(&ec2, &state.vpc_id)
        .await
        .context("loading the world from EC2")?;
    std::fs::write(state_path(), serde_json::to_vec_pretty(&state)?)?;
    write_world(&world)?;
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

    daemon::spawn(&state)?;
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
        for n in &nodes {
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
            agent_start(n, &env, &world.region)?;
        }
        for n in &nodes {
            wait_agent_ready(n, Duration::from_secs(30))?;
        }
        tracing::info!(elapsed = ?t0.elapsed(), "agents ready");
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
    let rd = run_dir();
    let mut errors = Vec::new();
    // Agents first (they talk to the daemon), then the daemon, then moto.
    if let Ok(entries) = std::fs::read_dir(&rd) {
        for e in entries.flatten() {
            let pf = e.path().join("agent.pid");
            if pf.exists()
                && let Err(err) = procs::stop(&pf, AGENT_MARKER, false, Duration::from_secs(5))
            {
                errors.push(format!("{err:#}"));
            }
        }
    }
    for (pf, marker) in [
        (rd.join("daemon.pid"), DAEMON_MARKER),
        (PathBuf::from(moto::PID_FILE), moto::MARKER),
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
    let world = load_world()?;
    let holders = pods::ip_holders()?;
    let proc_state = |pf: PathBuf, marker: &[&str]| match procs::read_pid(&pf) {
        Some(p) if procs::is_ours(p, marker) => format!("pid {p}"),
        Some(p) => format!("NOT RUNNING (pid {p} gone)"),
        None => "NOT RUNNING".to_string(),
    };
    let moto_addr = State::load()
        .map(|s| s.moto.to_string())
        .unwrap_or_else(|_| "?".into());
    println!(
        "EC2 (moto) at http://{moto_addr}: {}; lab daemon (IMDS, EC2 proxy, fabric sync): {}",
        proc_state(PathBuf::from(moto::PID_FILE), moto::MARKER),
        proc_state(run_dir().join("daemon.pid"), DAEMON_MARKER)
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
    for inst in &world.instances {
        let agent = if inst.node {
            match procs::read_pid(&agent_pid(&inst.name)) {
                Some(p) if procs::is_ours(p, AGENT_MARKER) => format!("agent pid {p}"),
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
                println!("    prefix {p}");
            }
        }
    }
    let orphans: Vec<_> = holders
        .iter()
        .filter(|((inst, ip), _)| {
            !world
                .instance(inst)
                .is_some_and(|i| i.enis.iter().any(|e| e.secondary_ips.contains(ip)))
        })
        .collect();
    for ((inst, ip), pod) in orphans {
        println!("WARNING: pod {pod} on {inst} holds {ip}, which is not a secondary IP of {inst}");
    }
    Ok(())
}

fn fmt_list<T: std::fmt::Display>(v: &[T]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Starts the agent of `instance` inside its namespace.
pub fn agent_start(instance: &str, extra: &[(String, String)], region: &str) -> Result<u32> {
    let ins = ns::instance_ns(instance);
    if !ns::exists(&ins) {
        bail!("no namespace {ins}: is {instance:?} an instance of the lab, and is the lab up?");
    }
    if let Some(p) = procs::read_pid(&agent_pid(instance))
        && procs::is_ours(p, AGENT_MARKER)
    {
        bail!(
            "the agent of {instance} is already running (pid {p}); use `vpc-lab agent restart {instance}`"
        );
    }
    let dir = exe_dir()?;
    let agent = dir.join("vpc-cni-agent");
    if !agent.is_file() {
        bail!(
            "agent binary {} not found: build it with `cargo build -p agent` (or run `vpc-lab up --no-agents`)",
            agent.display()
        );
    }
    make_node_dirs(instance)?;
    // Extra env: what the last start used, with what is given now on top.
    let mut merged: Vec<(String, String)> = std::fs::read(agent_env_file(instance))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    for (k, v) in extra {
        merged.retain(|(mk, _)| mk != k);
        merged.push((k.clone(), v.clone()));
    }
    let extra = merged;
    std::fs::write(agent_env_file(instance), serde_json::to_vec(&extra)?)?;
    let base = inst_dir(instance);
    let mut cmd = ns::command(&ins, agent.to_str().context("agent path is not UTF-8")?)?;
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in [
        (
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            "http://127.0.0.1:1338".to_string(),
        ),
        ("AWS_ENDPOINT_URL_EC2", "http://127.0.0.1:1339".to_string()),
        ("AWS_REGION", region.to_string()),
        ("AWS_ACCESS_KEY_ID", "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
        ("HOST_CNI_BIN_PATH", bin_dir(instance).display().to_string()),
        (
            "HOST_CNI_CONFDIR_PATH",
            conf_dir(instance).display().to_string(),
        ),
        (
            "AWS_VPC_K8S_CNI_BACKING_STORE",
            base.join("var/run/aws-node/ipam.json")
                .display()
                .to_string(),
        ),
        (
            "VPC_CNI_AGENT_SOCKET",
            agent_socket(instance).display().to_string(),
        ),
        (
            "VPC_CNI_PLUGIN_BINARY",
            dir.join("vpc-cni").display().to_string(),
        ),
        ("DISABLE_NETWORK_RESOURCE_PROVISIONING", "true".to_string()),
        ("RUST_LOG", "info".to_string()),
    ] {
        env.insert(k.to_string(), v);
    }
    for (k, v) in &extra {
        env.insert(k.clone(), v.clone());
    }
    cmd.env_remove("AWS_EC2_METADATA_DISABLED");
    cmd.envs(&env);
    let pid = procs::spawn_detached(cmd, &agent_log(instance), &agent_pid(instance))?;
    tracing::info!(instance, pid, "started agent");
    Ok(pid)
}

/// Waits until the agent of `instance` is ready: its conflist exists and its socket answers.
pub fn wait_agent_ready(instance: &str, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    let conf = conf_dir(instance).join(CONFLIST);
    let sock = agent_socket(instance);
    loop {
        let pid = procs::read_pid(&agent_pid(instance));
        let alive = pid.is_some_and(|p| procs::is_ours(p, AGENT_MARKER));
        if !alive {
            bail!(
                "the agent of {instance} exited before it was ready; last lines of {}:\n{}",
                agent_log(instance).display(),
                procs::tail(&agent_log(instance), 30)
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
                agent_log(instance).display(),
                procs::tail(&agent_log(instance), 30)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `vpc-lab agent stop|kill <instance>`.
pub fn agent_stop(instance: &str, hard: bool) -> Result<()> {
    let pf = agent_pid(instance);
    if !procs::stop(&pf, AGENT_MARKER, hard, Duration::from_secs(10))? {
        bail!(
            "the agent of {instance} is not running (no live process in {})",
            pf.display()
        );
    }
    Ok(())
}
