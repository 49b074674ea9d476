//! Where the lab keeps its files: one home for every path under `/run/vpc-lab`, and for where
//! the built binaries are.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Where all lab state lives.
pub const RUN_DIR: &str = "/run/vpc-lab";

/// The CNI network configuration the agent writes when it is ready.
pub use agent::install::CONFLIST_NAME as CONFLIST;

pub fn run_dir() -> PathBuf {
    PathBuf::from(RUN_DIR)
}

/// What `up` leaves for the other commands ([`crate::store::LabState`]).
pub fn state_file() -> PathBuf {
    run_dir().join("state.json")
}

/// The world as last published by `up` or the daemon.
pub fn world_file() -> PathBuf {
    run_dir().join("world.json")
}

/// The EC2/IMDS fidelity knobs (`vpc-lab fidelity`).
pub fn knobs_file() -> PathBuf {
    run_dir().join("fidelity.json")
}

/// EC2 calls by instance and API, as the EC2 proxy counts them.
pub fn ec2_stats_file() -> PathBuf {
    run_dir().join("ec2-stats.json")
}

pub fn daemon_pid() -> PathBuf {
    run_dir().join("daemon.pid")
}

pub fn daemon_log() -> PathBuf {
    run_dir().join("daemon.log")
}

/// Written by the daemon once it serves IMDS and the EC2 proxy everywhere.
pub fn daemon_ready() -> PathBuf {
    run_dir().join("daemon.ready")
}

/// The lab's Kubernetes API (`crate::kube`): its kubeconfigs and control socket.
pub fn kube_dir() -> PathBuf {
    run_dir().join("kube")
}

/// The kubeconfig every agent the lab starts gets as `KUBECONFIG`: the API at
/// `http://127.0.0.1:6443`, valid inside any instance's namespace (where the daemon serves it).
pub fn kubeconfig() -> PathBuf {
    kube_dir().join("kubeconfig")
}

/// The kubeconfig for the root namespace (`vpc-lab`, tests): the same API on a loopback port
/// of the root namespace.
pub fn kubeconfig_host() -> PathBuf {
    kube_dir().join("kubeconfig-host")
}

/// The daemon's control socket for the Kubernetes API (`vpc-lab kube …`, `pod add|del`).
pub fn kube_control_socket() -> PathBuf {
    kube_dir().join("control.sock")
}

/// An instance's node layout root (its `/`, as far as the agent and the runtime see it).
pub fn inst_dir(instance: &str) -> PathBuf {
    run_dir().join(instance)
}

/// The instance's CNI conf dir (`/etc/cni/net.d`).
pub fn conf_dir(instance: &str) -> PathBuf {
    inst_dir(instance).join("etc/cni/net.d")
}

/// The instance's CNI bin dir (`/opt/cni/bin`).
pub fn cni_bin_dir(instance: &str) -> PathBuf {
    inst_dir(instance).join("opt/cni/bin")
}

pub fn agent_socket(instance: &str) -> PathBuf {
    inst_dir(instance).join("run/vpc-cni/agent.sock")
}

/// What the process in [`agent_pid`] must show in its `/proc` cmdline before it is signalled.
pub const AGENT_MARKER: &[&str] = &["vpc-cni-agent"];

pub fn agent_pid(instance: &str) -> PathBuf {
    inst_dir(instance).join("agent.pid")
}

pub fn agent_log(instance: &str) -> PathBuf {
    inst_dir(instance).join("agent.log")
}

/// The extra agent environment the last `agent start` used.
pub fn agent_env_file(instance: &str) -> PathBuf {
    inst_dir(instance).join("agent.env.json")
}

/// The agent's checkpoint (the reference's backing store path under the node root).
pub fn agent_checkpoint(instance: &str) -> PathBuf {
    inst_dir(instance).join("var/run/aws-node/ipam.json")
}

/// The containerd of an instance (`lab::kubelet`'s runtime; also the conformance tests'): its
/// config, root, state, sockets and log, all under this directory.
pub fn containerd_dir(instance: &str) -> PathBuf {
    inst_dir(instance).join("containerd")
}

/// The lab kubelet's files for an instance: its configuration, the pod it must run, the status
/// it reports, its pid file and log, and the containers' logs (`logs/`).
pub fn kubelet_dir(instance: &str) -> PathBuf {
    inst_dir(instance).join("kubelet")
}

/// The directory of the built binaries (`vpc-lab`, `vpc-cni-agent`, `vpc-cni`): the one of
/// this executable, or its parent when this is a test binary in `target/<profile>/deps`.
pub fn exe_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") && !dir.join("vpc-cni-agent").exists() {
        return Ok(dir.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    Ok(dir)
}
