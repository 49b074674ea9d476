//! `vpc-cni-agent init`, the DaemonSet's init container: installs the plugin binaries shipped
//! in the image into the host's CNI bin dir (`crate::install::install_binaries`, as the agent
//! does at start) and sets the host sysctls the reference's init container sets, then exits.
//!
//! The sysctls ([`sysctls`]), written in the network namespace the command runs in (the
//! node's: the init container has the host network):
//! - `net/ipv4/conf/<primary>/rp_filter = 2`: loose reverse-path filtering on the primary
//!   interface, found as the agent finds it (the interface with IMDS's primary MAC);
//! - `net/ipv4/tcp_early_demux = 1`: the reference writes 0 only with
//!   `DISABLE_TCP_EARLY_DEMUX=true`, which vpc-cni refuses (it matters only with security
//!   groups for pods).
//!
//! The reference's IPv6 sysctls (`disable_ipv6`, `forwarding`, `accept_ra`) are written only
//! with `ENABLE_IPv6` or `ENABLE_V6_EGRESS`, both refused by the configuration, so never here.

use std::fmt;

use dataplane::NetOps;
use dataplane::ops::Mac;

use crate::config::Config;
use crate::install::{InstallError, Installed};
use crate::startup::{self, StartupError};

/// One sysctl the init step writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysctl {
    /// Below `/proc/sys`, e.g. `net/ipv4/tcp_early_demux`.
    pub key: String,
    pub value: &'static str,
}

impl fmt::Display for Sysctl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key.replace('/', "."), self.value)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error("IMDS client")]
    ImdsClient(#[source] cloud::CloudError),
    #[error(transparent)]
    Startup(#[from] StartupError),
    #[error("IMDS's primary MAC {mac:?} is not a MAC address")]
    BadMac { mac: String },
    #[error(
        "no interface in this network namespace has the primary ENI's MAC {mac}; does the init container run with the host network?"
    )]
    NoPrimaryInterface { mac: String },
    #[error("listing the interfaces")]
    Links(#[source] dataplane::NetError),
    #[error("setting {sysctl}")]
    Sysctl {
        sysctl: String,
        source: dataplane::NetError,
    },
    /// The blocking task that writes the sysctls died.
    #[error(transparent)]
    Task(#[from] tokio::task::JoinError),
}

/// The sysctls the reference's init container sets on a node (IPv4 cluster), the primary
/// interface being `primary_ifname`.
pub fn sysctls(primary_ifname: &str) -> Vec<Sysctl> {
    vec![
        Sysctl {
            key: format!("net/ipv4/conf/{primary_ifname}/rp_filter"),
            value: "2",
        },
        Sysctl {
            key: "net/ipv4/tcp_early_demux".to_string(),
            value: "1",
        },
    ]
}

/// Finds the interface with `primary_mac` in `n`'s namespace and writes [`sysctls`] there.
/// Returns the interface's name and what was written.
pub fn set_sysctls<N: NetOps>(
    n: &mut N,
    primary_mac: &str,
) -> Result<(String, Vec<Sysctl>), InitError> {
    let mac = Mac::parse(primary_mac).ok_or_else(|| InitError::BadMac {
        mac: primary_mac.to_string(),
    })?;
    let link = n
        .link_by_mac(mac)
        .map_err(InitError::Links)?
        .ok_or_else(|| InitError::NoPrimaryInterface {
            mac: primary_mac.to_string(),
        })?;
    let wanted = sysctls(&link.name);
    for s in &wanted {
        n.write_sysctl(&s.key, s.value)
            .map_err(|source| InitError::Sysctl {
                sysctl: s.to_string(),
                source,
            })?;
    }
    Ok((link.name, wanted))
}

/// What `vpc-cni-agent init` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub installed: Installed,
    pub primary_ifname: String,
    pub sysctls: Vec<Sysctl>,
}

impl fmt::Display for Report {
    /// One line per thing done.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.installed;
        writeln!(
            f,
            "installed {} (from {})",
            i.plugin.display(),
            i.plugin_from.display()
        )?;
        for p in &i.chained.plugins {
            writeln!(
                f,
                "installed {} (from {}; CNI {})",
                p.path.display(),
                p.source(),
                p.versions.join(", ")
            )?;
        }
        for s in &self.sysctls {
            writeln!(f, "set {s} (primary interface {})", self.primary_ifname)?;
        }
        Ok(())
    }
}

/// Installs the binaries, learns the primary MAC from IMDS and sets the sysctls in this
/// process's network namespace.
pub async fn run(cfg: &Config) -> Result<Report, InitError> {
    dataplane::netlink::set_proc_sys(&cfg.proc_sys);
    let installed = {
        let cfg = cfg.clone();
        tokio::task::spawn_blocking(move || crate::install::install_binaries(&cfg)).await??
    };
    let imds = cloud::ImdsMetadata::from_env().map_err(InitError::ImdsClient)?;
    let md = startup::learn(&imds, 10).await?;
    let mac = md.primary_mac.clone();
    let (primary_ifname, sysctls) = tokio::task::spawn_blocking(move || {
        let mut n = dataplane::netlink::Netlink::new().map_err(InitError::Links)?;
        set_sysctls(&mut n, &mac)
    })
    .await??;
    Ok(Report {
        installed,
        primary_ifname,
        sysctls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::fake::{FakeNet, FakeWorld};

    #[test]
    fn the_reference_sysctls_on_the_primary_interface() {
        let list: Vec<String> = sysctls("ens5").iter().map(ToString::to_string).collect();
        assert_eq!(
            list,
            [
                "net.ipv4.conf.ens5.rp_filter=2",
                "net.ipv4.tcp_early_demux=1"
            ]
        );
    }

    #[test]
    fn sysctls_go_to_the_interface_with_the_primary_mac() {
        let world = FakeWorld::new(&["node"]);
        let mac = Mac::parse("02:aa:bb:cc:dd:01").unwrap();
        world.borrow_mut().add_link(
            "node",
            "eth1",
            Some(Mac::parse("02:aa:bb:cc:dd:02").unwrap()),
            None,
        );
        world.borrow_mut().add_link("node", "ens5", Some(mac), None);
        let mut n = FakeNet::new(&world, "node");
        let (ifname, set) = set_sysctls(&mut n, "02:AA:BB:CC:DD:01").unwrap();
        assert_eq!(ifname, "ens5");
        assert_eq!(set, sysctls("ens5"));
        let w = world.borrow();
        let written: Vec<(&str, &str)> = w
            .ns("node")
            .sysctls
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            written,
            [
                ("net/ipv4/conf/ens5/rp_filter", "2"),
                ("net/ipv4/tcp_early_demux", "1")
            ]
        );
    }

    #[test]
    fn a_missing_interface_or_sysctl_is_named() {
        let world = FakeWorld::new(&["node"]);
        let mut n = FakeNet::new(&world, "node");
        let e = set_sysctls(&mut n, "02:aa:bb:cc:dd:01").unwrap_err();
        assert!(matches!(e, InitError::NoPrimaryInterface { .. }), "{e}");
        assert!(e.to_string().contains("02:aa:bb:cc:dd:01"), "{e}");
        let e = set_sysctls(&mut n, "not-a-mac").unwrap_err();
        assert!(matches!(e, InitError::BadMac { .. }), "{e}");

        let mac = Mac::parse("02:aa:bb:cc:dd:01").unwrap();
        world.borrow_mut().add_link("node", "eth0", Some(mac), None);
        world.borrow_mut().ns_mut("node").known_sysctls =
            Some(vec!["net/ipv4/conf/eth0/rp_filter".into()]);
        let e = set_sysctls(&mut n, "02:aa:bb:cc:dd:01").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("setting net.ipv4.tcp_early_demux=1"),
            "{e}"
        );
    }
}
