//! Swapping aws-node (aws/amazon-vpc-cni-k8s v1.23) and vpc-cni on a live node, both ways,
//! without moving a running pod's address or leaving its packets without a path.
//!
//! Adopting (`run`): the checkpoint is the same file in the same format, so aws-node's
//! allocations (network name `aws-cni`) are restored like ours; before any ADD is served the
//! pods it wired move to our layout ([`adopt_pods`]); once our conflist is written, aws-node's
//! conflist (kept aside for a rollback) and its iptables rules go ([`retire_aws_node`]).
//!
//! Rolling back (`vpc-cni-agent uninstall --to aws-node`, [`uninstall_to_aws_node`]): with our
//! agent stopped, every pod goes back to aws-node's layout, aws-node's SNAT and connmark rules
//! are put back before our table goes, the checkpoint's entries take aws-node's network name,
//! and its conflist replaces ours.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde_json::json;
use tracing::{info, warn};

use crate::checkpoint::{self, CheckpointError};
use crate::config::Config;
use crate::install;
use crate::startup::{self, StartupError};

/// aws-node's network configuration file and network name.
pub const AWS_CONFLIST: &str = "10-aws.conflist";
pub const AWS_NETWORK: &str = "aws-cni";

/// Where aws-node's conflist is kept while vpc-cni runs: beside the checkpoint (the node's
/// `/var/run/aws-node`), not in the conf dir, where a runtime would load it.
pub fn conflist_backup(cfg: &Config) -> PathBuf {
    cfg.checkpoint
        .with_file_name(format!("{AWS_CONFLIST}.vpc-cni-backup"))
}

#[derive(Debug, thiserror::Error)]
pub enum SwapError {
    #[error(
        "the vpc-cni agent is running (its socket {0} answers); stop it first (delete its DaemonSet or pod) and run this again"
    )]
    AgentRunning(PathBuf),
    #[error("IMDS client")]
    Imds(#[source] cloud::CloudError),
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error("no interface on this node has the primary ENI's MAC {0}")]
    NoPrimaryInterface(String),
    #[error(
        "IMDS lists no VPC CIDR for the primary ENI of {0}: without them aws-node's SNAT rules would translate traffic inside the VPC too"
    )]
    NoVpcCidrs(String),
    #[error(
        "the checkpoint holds addresses rebuilt from the node after it was lost, with no pod identity ({}): aws-node would drop them at start and could give them to new pods while their pods run; delete those pods (or wait until vpc-cni's agent has released them) and run this again",
        .0.join(", ")
    )]
    RebuiltEntries(Vec<String>),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", .0.join("; "))]
    Dataplane(Vec<String>),
    #[error(transparent)]
    Install(#[from] install::InstallError),
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

/// What adopting the node's pods did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    /// Pods moved from aws-node's layout to ours.
    pub moved: Vec<Ipv4Addr>,
    /// Pods found in aws-node's layout whose address is on none of this node's ENIs (left
    /// alone).
    pub unknown: Vec<Ipv4Addr>,
    pub errors: Vec<String>,
}

/// Moves every pod wired aws-node's way whose address the pool holds (`assigned`: address and
/// its ENI's route table) into our layout. Blocking (netlink).
pub fn adopt_pods(assigned: &[(Ipv4Addr, u32)]) -> Adopted {
    let mut out = Adopted::default();
    // aws-node's nftables connmark would wipe the ENI bits of an adopted pod's first packets.
    if let Err(e) = dataplane::remove_aws_nft_table() {
        out.errors.push(format!(
            "removing aws-node's nftables table ip {}: {e}; pods are not moved",
            dataplane::AWS_NFT_TABLE
        ));
        return out;
    }
    let legacy = match dataplane::legacy_pods() {
        Ok(l) => l,
        Err(e) => {
            out.errors
                .push(format!("listing pods in aws-node's layout: {e}"));
            return out;
        }
    };
    for ip in &legacy {
        match assigned.iter().find(|(a, _)| a == ip) {
            Some((_, table)) => match dataplane::adopt_pod(*ip, *table) {
                Ok(true) => out.moved.push(*ip),
                Ok(false) => {}
                Err(e) => out.errors.push(format!("pod {ip}: {e}")),
            },
            None => out.unknown.push(*ip),
        }
    }
    out
}

/// After our conflist is written: aws-node's conflist leaves the conf dir (kept at
/// [`conflist_backup`]) and its iptables rules go. Returns what was done, for the log;
/// failures are returned too (the node works either way: our rules come first).
pub fn retire_aws_node(cfg: &Config) -> (Vec<String>, Vec<String>) {
    let (mut done, mut failed) = (Vec::new(), Vec::new());
    let theirs = cfg.cni_conf_dir.join(AWS_CONFLIST);
    if theirs.exists() {
        let backup = conflist_backup(cfg);
        // Written durably beside the checkpoint (another file system, on a real node) first,
        // then removed from the conf dir.
        let moved = std::fs::read(&theirs)
            .map_err(|e| e.to_string())
            .and_then(|b| install::atomic_write(&backup, &b, 0o644).map_err(|e| e.to_string()))
            .and_then(|()| std::fs::remove_file(&theirs).map_err(|e| e.to_string()));
        match moved {
            Ok(()) => done.push(format!(
                "moved {} to {}",
                theirs.display(),
                backup.display()
            )),
            Err(e) => failed.push(format!("moving {} aside: {e}", theirs.display())),
        }
    }
    match dataplane::remove_aws_iptables() {
        Ok(0) => {}
        Ok(n) => done.push(format!("removed aws-node's iptables rules ({n} tables)")),
        Err(e) => failed.push(format!("removing aws-node's iptables rules: {e}")),
    }
    (done, failed)
}

/// aws-node's conflist as its container writes it (`misc/10-aws.conflist`) for an IPv4
/// cluster, from the same settings.
pub fn aws_conflist(cfg: &Config) -> serde_json::Value {
    let mtu = cfg.pod_mtu.to_string();
    json!({
        "cniVersion": "0.4.0",
        "name": AWS_NETWORK,
        "disableCheck": true,
        "plugins": [
            {
                "name": AWS_NETWORK,
                "type": "aws-cni",
                "vethPrefix": cfg.veth_prefix,
                "mtu": mtu,
                "podSGEnforcingMode": "strict",
                "pluginLogFile": cfg.plugin_log_file,
                "pluginLogLevel": cfg.plugin_log_level,
                "capabilities": {"io.kubernetes.cri.pod-annotations": true}
            },
            {
                "name": "egress-cni",
                "type": "egress-cni",
                "mtu": mtu,
                "enabled": "false",
                "randomizeSNAT": match cfg.randomize_snat {
                    dataplane::Randomize::Prng => "prng",
                    dataplane::Randomize::HashRandom => "hashrandom",
                    dataplane::Randomize::None => "none",
                },
                "nodeIP": "",
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "fd00::ac:00/118"}]],
                    "routes": [{"dst": "::/0"}],
                    "dataDir": "/run/cni/v4pd/egress-v6-ipam"
                },
                "pluginLogFile": "/var/log/aws-routed-eni/egress-v6-plugin.log",
                "pluginLogLevel": cfg.plugin_log_level
            },
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
        ]
    })
}

/// What the rollback did.
#[derive(Debug, Default)]
pub struct Uninstalled {
    pub pods: usize,
    pub conflist: PathBuf,
}

/// `vpc-cni-agent uninstall --to aws-node`: leaves the node as aws-node v1.23 expects it, every
/// running pod keeping its address and its path. The agent must be stopped.
pub async fn uninstall_to_aws_node(cfg: &Config) -> Result<Uninstalled, SwapError> {
    if std::os::unix::net::UnixStream::connect(&cfg.socket).is_ok() {
        return Err(SwapError::AgentRunning(cfg.socket.clone()));
    }
    let imds = cloud::ImdsMetadata::from_env().map_err(SwapError::Imds)?;
    let md = startup::learn(&imds, 10).await?;
    let primary_ifname = dataplane::link_name_by_mac(&md.primary_mac)
        .map_err(|e| SwapError::Dataplane(vec![e.to_string()]))?
        .ok_or_else(|| SwapError::NoPrimaryInterface(md.primary_mac.clone()))?;
    let vpc_cidrs = md
        .primary_eni()
        .map(|e| e.vpc_cidrs.clone())
        .filter(|c| !c.is_empty())
        .ok_or_else(|| SwapError::NoVpcCidrs(md.instance_id.clone()))?;
    let snat = startup::snat_config(cfg, md.local_ipv4, &vpc_cidrs, &primary_ifname);
    let mut cp = checkpoint::load(&cfg.checkpoint)?;
    let rebuilt: Vec<String> = cp
        .allocations
        .iter()
        .filter(|a| a.network_name == crate::state::REBUILT_NETWORK)
        .map(|a| format!("{} ({})", a.ipv4, a.container_id))
        .collect();
    if !rebuilt.is_empty() {
        return Err(SwapError::RebuiltEntries(rebuilt));
    }
    // Allocations with no pod wired on the node (deleted while the agent was stopped, an ADD
    // that never finished) are not handed to aws-node: it would drop them at start anyway.
    let wired = tokio::task::spawn_blocking(dataplane::wired_pods)
        .await?
        .map_err(|e| SwapError::Dataplane(vec![e.to_string()]))?;
    let (kept, dropped): (Vec<_>, Vec<_>) = std::mem::take(&mut cp.allocations)
        .into_iter()
        .partition(|a| wired.contains_key(&a.ipv4));
    for a in &dropped {
        warn!(ip = %a.ipv4, container = %a.container_id, "no pod is wired to this allocation; not handed to aws-node");
    }
    cp.allocations = kept;
    let ips: Vec<Ipv4Addr> = cp.allocations.iter().map(|a| a.ipv4).collect();

    // 1. Pods: aws-node's per-pod rules back, then ours go; veths DEL retired are deleted
    //    (our agent's housekeeping did that; aws-node does not know their group).
    let errors = tokio::task::spawn_blocking(move || {
        let mut errors = Vec::new();
        for ip in ips {
            if let Err(e) = dataplane::release_pod(ip) {
                errors.push(format!("pod {ip}: {e}"));
            }
        }
        if let Err(e) = dataplane::reap_retired_links() {
            errors.push(format!("deleting retired veths: {e}"));
        }
        errors
    })
    .await?;
    if !errors.is_empty() {
        return Err(SwapError::Dataplane(errors));
    }
    // 2. Egress: aws-node's SNAT and connmark before ours goes (never a moment without).
    tokio::task::spawn_blocking(move || -> Result<(), SwapError> {
        let one = |e: dataplane::DataplaneError| SwapError::Dataplane(vec![e.to_string()]);
        dataplane::install_aws_iptables(&snat).map_err(one)?;
        dataplane::remove_snat().map_err(one)?;
        dataplane::remove_our_rules()
            .map_err(|es| SwapError::Dataplane(es.iter().map(ToString::to_string).collect()))
    })
    .await??;
    // 3. Checkpoint: aws-node's network name on every entry, and nothing of ours.
    for a in &mut cp.allocations {
        a.network_name = AWS_NETWORK.to_string();
    }
    let pods = cp.allocations.len();
    let theirs = checkpoint::Checkpoint {
        allocations: std::mem::take(&mut cp.allocations),
        ..checkpoint::Checkpoint::default()
    };
    checkpoint::store(&cfg.checkpoint, &theirs)?;
    // 4. Network configuration: theirs first (it sorts first, so runtimes switch at once),
    //    then ours and our plugin go.
    let conflist = cfg.cni_conf_dir.join(AWS_CONFLIST);
    let backup = conflist_backup(cfg);
    let bytes = match std::fs::read(&backup) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            serde_json::to_vec_pretty(&aws_conflist(cfg)).expect("JSON serializes")
        }
        Err(source) => {
            return Err(SwapError::File {
                what: "reading",
                path: backup,
                source,
            });
        }
    };
    install::atomic_write(&conflist, &bytes, 0o644)?;
    for (what, path) in [
        ("removing", cfg.cni_conf_dir.join(install::CONFLIST_NAME)),
        ("removing", cfg.cni_bin_dir.join(install::PLUGIN_NAME)),
        ("removing", backup),
    ] {
        if let Err(source) = std::fs::remove_file(&path)
            && source.kind() != std::io::ErrorKind::NotFound
        {
            return Err(SwapError::File { what, path, source });
        }
    }
    info!(pods, conflist = %conflist.display(), "node handed back to aws-node");
    Ok(Uninstalled { pods, conflist })
}

/// Logs what [`retire_aws_node`] did.
pub fn log_retired(done: &[String], failed: &[String]) {
    for d in done {
        info!("aws-node: {d}");
    }
    for f in failed {
        warn!("aws-node: {f}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        let vars = std::collections::HashMap::new();
        crate::config::from_env(&vars).expect("defaults are valid")
    }

    #[test]
    fn aws_conflist_has_the_reference_shape() {
        let c = aws_conflist(&cfg());
        assert_eq!(c["name"], "aws-cni");
        assert_eq!(c["cniVersion"], "0.4.0");
        let types: Vec<&str> = c["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["aws-cni", "egress-cni", "portmap"]);
        assert_eq!(c["plugins"][0]["mtu"], "9001");
        assert_eq!(c["plugins"][0]["vethPrefix"], "eni");
    }

    #[test]
    fn the_backup_lives_beside_the_checkpoint_not_in_the_conf_dir() {
        let c = cfg();
        let b = conflist_backup(&c);
        assert_eq!(b.parent(), c.checkpoint.parent());
        assert_ne!(b.parent(), Some(c.cni_conf_dir.as_path()));
    }
}
