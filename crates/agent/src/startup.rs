//! The node's start-up from what IMDS (and, with provisioning, EC2) says: learning the
//! instance, listing its attached ENIs, setting up the primary interface, every secondary ENI
//! and the egress (SNAT) table, and building the address pool from the ENIs' secondary IPs.

use std::time::Duration;

use cloud::{InstanceMetadata, Metadata};
use dataplane::{EniSetup, HostSetup, SnatConfig};
use ipam::{EniInfo, Pool};
use ipnet::Ipv4Net;
use proto::AttachmentKey;
use tracing::{info, warn};

use crate::cloud_api::Cloud;
use crate::config::Config;
use crate::node_net::wait_for_link;

/// How long start-up waits for the interface of an ENI that IMDS lists as attached.
const ENI_WAIT_S: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
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
pub async fn learn<M: Metadata>(imds: &M, attempts: u32) -> Result<InstanceMetadata, StartupError> {
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match imds.instance().await {
            Ok(md) => return Ok(md),
            Err(e) if attempt >= attempts => {
                return Err(StartupError::Imds { attempts, last: e });
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

/// An attached ENI, as IMDS or EC2 describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniView {
    pub id: String,
    pub mac: String,
    pub device_number: u32,
    pub subnet: Ipv4Net,
    pub primary_ip: std::net::Ipv4Addr,
    pub secondary_ips: Vec<std::net::Ipv4Addr>,
    /// Its /28 prefixes (prefix delegation).
    pub prefixes: Vec<Ipv4Net>,
    /// Why the ENI is left alone ([`crate::cloud_api::unmanaged_reason`]); `None` for ours.
    pub unmanaged: Option<String>,
}

/// The ENIs as IMDS lists them (used when provisioning is disabled).
pub fn enis_from_imds(md: &InstanceMetadata) -> Vec<EniView> {
    md.enis
        .iter()
        .map(|e| EniView {
            id: e.interface_id.clone(),
            mac: e.mac.clone(),
            device_number: e.device_number,
            subnet: e.subnet_cidr,
            primary_ip: e.primary_ip,
            secondary_ips: e.secondary_ips.clone(),
            prefixes: e.prefixes.clone(),
            unmanaged: None,
        })
        .collect()
}

/// The ENIs attached to this instance as EC2 describes them: EC2, not IMDS, is the truth for
/// which addresses an ENI holds (IMDS can lag behind by seconds after a change).
pub async fn enis_from_ec2<C: Cloud>(
    ec2: &C,
    md: &InstanceMetadata,
) -> Result<Vec<EniView>, cloud::CloudError> {
    let primary = md.primary_eni();
    let mut out = Vec::new();
    for e in ec2
        .describe_enis(&[cloud::Filter::attached_to(&md.instance_id)])
        .await?
    {
        let Some(att) = &e.attachment else { continue };
        let subnet = md
            .enis
            .iter()
            .find(|m| m.mac.eq_ignore_ascii_case(&e.mac))
            .map(|m| m.subnet_cidr)
            .or_else(|| {
                primary
                    .filter(|p| p.subnet_id == e.subnet_id)
                    .map(|p| p.subnet_cidr)
            });
        let Some(subnet) = subnet else {
            warn!(eni = %e.id, subnet = %e.subnet_id, "skipping an attached ENI whose subnet IMDS does not describe yet");
            continue;
        };
        let unmanaged = crate::cloud_api::unmanaged_reason(&e).filter(|_| att.device_index > 0);
        if let Some(why) = &unmanaged {
            info!(eni = %e.id, device = att.device_index, "leaving an ENI alone: {why}");
        }
        out.push(EniView {
            id: e.id.clone(),
            mac: e.mac.clone(),
            device_number: att.device_index,
            subnet,
            primary_ip: e.primary_ip,
            secondary_ips: e.secondary_ips.clone(),
            prefixes: e.prefixes.clone(),
            unmanaged,
        });
    }
    out.sort_by_key(|e| e.device_number);
    Ok(out)
}

/// What start-up produced.
#[derive(Debug)]
pub struct StartedNode {
    pub primary_ifname: String,
    pub vpc_cidrs: Vec<Ipv4Net>,
    pub pool: Pool<AttachmentKey>,
}

fn dp(what: impl Into<String>) -> impl FnOnce(dataplane::DataplaneError) -> StartupError {
    let what = what.into();
    move |source| StartupError::Dataplane { what, source }
}

/// The egress (SNAT, connmark) settings of this node.
pub fn snat_config(
    cfg: &Config,
    primary_ip: std::net::Ipv4Addr,
    vpc_cidrs: &[Ipv4Net],
    primary_ifname: &str,
) -> SnatConfig {
    SnatConfig {
        primary_ifname: primary_ifname.to_string(),
        primary_ip,
        vpc_cidrs: vpc_cidrs.to_vec(),
        exclude_cidrs: cfg.exclude_snat_cidrs.clone(),
        external_snat: cfg.external_snat,
        randomize: cfg.randomize_snat,
        connmark: cfg.connmark,
        veth_prefix: cfg.veth_prefix.clone(),
        node_port_support: cfg.node_port_support,
    }
}

/// Sets up the host and every secondary ENI, and builds the pool. Blocking (netlink, nft):
/// call it from a blocking thread.
pub fn setup(
    cfg: &Config,
    md: &InstanceMetadata,
    enis: &[EniView],
) -> Result<StartedNode, StartupError> {
    let primary = md.primary_eni().ok_or_else(|| StartupError::NoPrimaryEni {
        instance: md.instance_id.clone(),
    })?;
    let primary_ifname = dataplane::link_name_by_mac(&md.primary_mac)
        .map_err(dp("finding the primary interface"))?
        .ok_or_else(|| StartupError::NoPrimaryInterface {
            mac: md.primary_mac.clone(),
        })?;
    dataplane::setup_host(&HostSetup {
        primary_ifname: primary_ifname.clone(),
        connmark: cfg.connmark,
        mtu: cfg.eni_mtu,
    })
    .map_err(dp(format!("the host (primary interface {primary_ifname})")))?;

    for eni in enis
        .iter()
        .filter(|e| e.device_number > 0 && e.unmanaged.is_none())
    {
        let setup = EniSetup {
            mac: eni.mac.clone(),
            device_number: eni.device_number,
            primary_ip: eni.primary_ip,
            subnet: eni.subnet,
            mtu: cfg.eni_mtu,
        };
        let ifname =
            wait_for_link(&eni.mac, ENI_WAIT_S).ok_or_else(|| StartupError::EniMissing {
                eni: eni.id.clone(),
                mac: eni.mac.clone(),
                device: eni.device_number,
                waited_s: ENI_WAIT_S,
            })?;
        dataplane::setup_eni(&setup).map_err(dp(format!(
            "ENI {} ({ifname}, device {})",
            eni.id, eni.device_number
        )))?;
        info!(eni = %eni.id, %ifname, device = eni.device_number, table = eni.device_number + 1, "ENI set up");
    }

    let vpc_cidrs = primary.vpc_cidrs.clone();
    let snat = snat_config(cfg, md.local_ipv4, &vpc_cidrs, &primary_ifname);
    dataplane::apply_snat(&snat).map_err(dp("the egress table ip vpc-cni"))?;

    let mut pool = Pool::new(cfg.ip_cooldown_s * 1000);
    pool.set_prefer_prefixes(cfg.prefix_delegation);
    // Custom networking: the primary ENI carries no pods.
    for eni in enis
        .iter()
        .filter(|e| e.unmanaged.is_none() && !(cfg.custom_networking && e.device_number == 0))
    {
        pool.add_eni(
            EniInfo {
                id: eni.id.clone(),
                device_number: eni.device_number,
                subnet: eni.subnet,
                primary_ip: eni.primary_ip,
            },
            &eni.secondary_ips,
        )?;
        for prefix in &eni.prefixes {
            pool.add_prefix(&eni.id, *prefix, &ipam::prefix_addresses(*prefix))?;
        }
    }
    Ok(StartedNode {
        primary_ifname,
        vpc_cidrs,
        pool,
    })
}
