//! Node setup from what IMDS says: the primary interface, every secondary ENI, the egress
//! (SNAT) table, and the address pool built from the ENIs' secondary IPs.

use std::time::Duration;

use cloud::{InstanceMetadata, Metadata};
use dataplane::{EniSetup, HostSetup, SnatConfig};
use ipam::{EniInfo, Pool};
use ipnet::Ipv4Net;
use proto::AttachmentKey;
use tracing::{info, warn};

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("IMDS did not answer after {attempts} attempts: {last}")]
    Imds {
        attempts: u32,
        last: cloud::CloudError,
    },
    #[error("IMDS lists no primary ENI (device number 0) for {instance}")]
    NoPrimaryEni { instance: String },
    #[error(
        "no interface on this node has the primary ENI's MAC {mac} (from IMDS); is the agent running in the host network namespace?"
    )]
    NoPrimaryInterface { mac: String },
    #[error(
        "ENI {eni} (MAC {mac}, device {device}) is attached according to IMDS but no interface with that MAC appeared within {waited_s}s"
    )]
    EniMissing {
        eni: String,
        mac: String,
        device: u32,
        waited_s: u64,
    },
    #[error("setting up {what}: {source}")]
    Dataplane {
        what: String,
        source: dataplane::DataplaneError,
    },
    #[error("building the pool: {0}")]
    Pool(#[from] ipam::PoolError),
}

/// Reads IMDS, retrying while it is not answering yet (a node that just booted).
pub async fn learn<M: Metadata>(imds: &M, attempts: u32) -> Result<InstanceMetadata, HostError> {
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match imds.instance().await {
            Ok(md) => return Ok(md),
            Err(e) if attempt >= attempts => {
                return Err(HostError::Imds { attempts, last: e });
            }
            Err(e) => {
                warn!(attempt, "IMDS not ready: {e}; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(3));
                attempt += 1;
            }
        }
    }
}

/// What host setup produced.
#[derive(Debug)]
pub struct Node {
    pub primary_ifname: String,
    pub vpc_cidrs: Vec<Ipv4Net>,
    pub pool: Pool<AttachmentKey>,
}

fn dp(what: impl Into<String>) -> impl FnOnce(dataplane::DataplaneError) -> HostError {
    let what = what.into();
    move |source| HostError::Dataplane { what, source }
}

/// Sets up the host and every secondary ENI, and builds the pool. Blocking (netlink, nft):
/// call it from a blocking thread.
pub fn setup(cfg: &Config, md: &InstanceMetadata) -> Result<Node, HostError> {
    let primary = md.primary_eni().ok_or_else(|| HostError::NoPrimaryEni {
        instance: md.instance_id.clone(),
    })?;
    let primary_ifname = dataplane::link_name_by_mac(&md.primary_mac)
        .map_err(dp("finding the primary interface"))?
        .ok_or_else(|| HostError::NoPrimaryInterface {
            mac: md.primary_mac.clone(),
        })?;
    dataplane::setup_host(&HostSetup {
        primary_ifname: primary_ifname.clone(),
        connmark: cfg.connmark,
    })
    .map_err(dp(format!("the host (primary interface {primary_ifname})")))?;

    for eni in md.enis.iter().filter(|e| e.device_number > 0) {
        let setup = EniSetup {
            mac: eni.mac.clone(),
            device_number: eni.device_number,
            primary_ip: eni.primary_ip,
            subnet: eni.subnet_cidr,
            mtu: cfg.eni_mtu,
        };
        let ifname = wait_for_link(&eni.mac, 10).map_err(|waited_s| HostError::EniMissing {
            eni: eni.interface_id.clone(),
            mac: eni.mac.clone(),
            device: eni.device_number,
            waited_s,
        })?;
        dataplane::setup_eni(&setup).map_err(dp(format!(
            "ENI {} ({ifname}, device {})",
            eni.interface_id, eni.device_number
        )))?;
        info!(eni = %eni.interface_id, %ifname, device = eni.device_number, table = eni.device_number + 1, "ENI set up");
    }

    let vpc_cidrs = primary.vpc_cidrs.clone();
    let snat = SnatConfig {
        primary_ifname: primary_ifname.clone(),
        primary_ip: md.local_ipv4,
        vpc_cidrs: vpc_cidrs.clone(),
        exclude_cidrs: cfg.exclude_snat_cidrs.clone(),
        external_snat: cfg.external_snat,
        randomize: cfg.randomize_snat,
        connmark: cfg.connmark,
        veth_prefix: cfg.veth_prefix.clone(),
        node_port_support: cfg.node_port_support,
    };
    dataplane::apply_snat(&snat).map_err(dp("the egress table ip vpc-cni"))?;

    let mut pool = Pool::new(cfg.ip_cooldown_s * 1000);
    for eni in &md.enis {
        pool.add_eni(
            EniInfo {
                id: eni.interface_id.clone(),
                device_number: eni.device_number,
                subnet: eni.subnet_cidr,
                primary_ip: eni.primary_ip,
            },
            &eni.secondary_ips,
        )?;
    }
    Ok(Node {
        primary_ifname,
        vpc_cidrs,
        pool,
    })
}

/// Waits up to `seconds` for an interface with `mac` (a just-attached ENI appears
/// asynchronously). Returns its name, or the seconds waited.
fn wait_for_link(mac: &str, seconds: u64) -> Result<String, u64> {
    for _ in 0..seconds * 10 {
        if let Ok(Some(name)) = dataplane::link_name_by_mac(mac) {
            return Ok(name);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(seconds)
}
