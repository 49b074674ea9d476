//! Pod wiring and node host setup for vpc-cni, via netlink (synchronous; no tokio) and one
//! private nftables table.
//!
//! The data path (DESIGN §3, docs/architecture.md):
//!
//! * pod: `<ip>/32` on `eth0`, `169.254.1.1/32 dev eth0 scope link`,
//!   `default via 169.254.1.1 dev eth0`, permanent neighbour `169.254.1.1` → host veth MAC;
//! * host: `<ip>/32 dev <veth> scope link` in `main` and in [`TO_POD_TABLE`]; one rule
//!   `from all lookup 512 pref 512`; the host veth of a pod on a secondary ENI in that ENI's
//!   device group ([`pod_group`]), which the nftables table turns into the ENI's mark for the
//!   one rule per ENI `fwmark <mark>/0x3f00 lookup <eni table> pref 1536`;
//! * node: `fwmark 0x80/0x80 lookup main pref 1024`, ENI tables `device number + 1`, ENI
//!   primary-IP rules at 32765, and the nftables table `ip vpc-cni` (connmark + SNAT).
//!
//! Every operation goes through [`ops::NetOps`] (real: [`netlink::Netlink`], fake:
//! [`fake::FakeNet`]), so the sequencing is unit-tested without root.

mod aws_node;
pub mod fake;
mod host;
pub mod netlink;
pub mod ops;
mod pod;
mod rules;
mod snat;

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;

pub use aws_node::{
    AWS_NFT_TABLE, adopt_pod, adopt_pod_with, aws_iptables_script, aws_removal_script,
    install_aws_iptables, legacy_pods, legacy_pods_with, release_pod, release_pod_with,
    remove_aws_iptables, remove_aws_nft_table, remove_our_rules, remove_our_rules_with,
};
pub use host::{
    EniSetup, HostSetup, link_name_by_mac, setup_eni, setup_eni_with, setup_host, setup_host_with,
    teardown_eni, teardown_eni_with,
};
pub use netns::{NetNs, NetnsError};
pub use ops::{NetError, NetOps};
pub use pod::{
    PodLinks, PodSpec, PodTeardown, check_pod, check_pod_with, reap_retired_links,
    reap_retired_links_with, setup_pod, setup_pod_with, teardown_pod, teardown_pod_with,
    wired_pods, wired_pods_with,
};
pub use snat::{NFT_TABLE, Randomize, SnatConfig, apply_snat, remove_snat, snat_ruleset};

/// The kernel's main routing table: the primary ENI's (device 0) table.
pub const MAIN_TABLE: u32 = 254;

/// The routing table of the ENI with device number `device` on network card 0, in the
/// reference's numbering: [`MAIN_TABLE`] for the primary ENI (0), else `device + 1`.
pub const fn route_table_for_device(device: u32) -> u32 {
    if device == 0 { MAIN_TABLE } else { device + 1 }
}

/// The device number of the ENI whose routing table is `table` (the inverse of
/// [`route_table_for_device`]): 0 for [`MAIN_TABLE`], `table - 1` for the secondary ENIs'
/// tables 2..=64; `None` for any other table.
pub const fn device_for_route_table(table: u32) -> Option<u32> {
    match table {
        MAIN_TABLE => Some(0),
        2..=ENI_TABLE_MAX => Some(table - 1),
        _ => None,
    }
}

/// The highest secondary-ENI table: that of device [`MAX_ENI_DEVICE`].
const ENI_TABLE_MAX: u32 = MAX_ENI_DEVICE + 1;

/// The pod's default gateway (link-local; answered by the static neighbour entry).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// Routing table holding every local pod's /32 (looked up by the single rule at
/// [`TO_POD_RULE_PRIORITY`]).
pub const TO_POD_TABLE: u32 = 512;
/// Priority of `from all lookup 512` (and of the reference's per-pod `to <ip> lookup main`).
pub const TO_POD_RULE_PRIORITY: u32 = 512;
/// Priority of the per-ENI rule `fwmark <eni mark>/<mask> lookup <eni table>` (and of the
/// reference's per-pod `from <pod ip> lookup <eni table>`, which DEL still removes).
pub const FROM_POD_RULE_PRIORITY: u32 = 1536;
/// Packet-mark bits that select a secondary ENI's routing table for pod egress (device
/// numbers 1..=63). Clear of the connmark bit (0x80) and of kube-proxy's 0x4000/0x8000.
pub const ENI_MARK_MASK: u32 = 0x3f00;
/// Highest device number [`ENI_MARK_MASK`] can express.
pub const MAX_ENI_DEVICE: u32 = ENI_MARK_MASK >> ENI_MARK_SHIFT;
const ENI_MARK_SHIFT: u32 = 8;
/// Device group of a host veth whose pod holds an address of the secondary ENI with device
/// number `d`: this base + `d`. The nftables table marks the pod's packets by this group.
pub const POD_GROUP_BASE: u32 = 0x7663_0000;

/// The packet mark of pod egress through the ENI with device number `device` (1..=63).
pub fn eni_mark(device: u32) -> u32 {
    (device << ENI_MARK_SHIFT) & ENI_MARK_MASK
}

/// The host-veth device group of pods on the ENI with device number `device` (1..=63).
pub fn pod_group(device: u32) -> u32 {
    POD_GROUP_BASE + device
}

/// The host-veth device group of a pod routed through `route_table`: 0 (the default group) for
/// the primary ENI's `main`, else its ENI's [`pod_group`]; `None` for a table no ENI has.
pub fn group_for_route_table(route_table: u32) -> Option<u32> {
    match device_for_route_table(route_table)? {
        0 => Some(0),
        device => Some(pod_group(device)),
    }
}

/// The inverse of [`group_for_route_table`]: the route table of a pod whose host veth is in
/// device group `group`; `None` for a group that is no ENI's.
pub fn route_table_for_group(group: u32) -> Option<u32> {
    match group {
        0 => Some(MAIN_TABLE),
        g if g > POD_GROUP_BASE && g - POD_GROUP_BASE <= MAX_ENI_DEVICE => {
            Some(route_table_for_device(g - POD_GROUP_BASE))
        }
        _ => None,
    }
}
/// Priority of `from <eni primary ip> lookup <eni table>`.
pub const ENI_PRIMARY_RULE_PRIORITY: u32 = 32765;
/// Priority of `fwmark <connmark>/<connmark> lookup main`.
pub const FWMARK_RULE_PRIORITY: u32 = 1024;
/// Device group of pod veths that DEL has torn down (down, no routes or rules) but not yet
/// deleted: "vcni" in ASCII. Deleting a veth costs the caller a kernel RCU grace period
/// (~20 ms); [`reap_retired_links`] deletes the whole group in one batch off the runtime's
/// path (the agent does it every second and at start).
pub const RETIRED_LINK_GROUP: u32 = 0x7663_6e69;
/// Retired links are renamed to this prefix + their ifindex.
pub const RETIRED_NAME_PREFIX: &str = "vcr";

/// Host veth name: `prefix` + the first 11 hex characters of SHA-1(`"<ns>.<name>"`), as the
/// reference (`pkg/networkutils/names.go`) computes it.
pub fn host_veth_name(prefix: &str, pod_namespace: &str, pod_name: &str) -> String {
    use sha1::{Digest, Sha1};
    let digest = Sha1::digest(format!("{pod_namespace}.{pod_name}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{}", &hex[..11])
}

/// Errors of the dataplane. Each names the interface, address, rule or namespace involved.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Net(#[from] NetError),
    /// The pod's interface name is taken in its namespace.
    #[error("interface {ifname} already exists in network namespace {netns}")]
    InterfaceExists { ifname: String, netns: String },
    /// A link that must exist does not.
    #[error("{what}")]
    LinkNotFound { what: String },
    /// CHECK found differences from what `setup_pod` builds.
    #[error("pod network check failed: {}", problems.join("; "))]
    CheckFailed { problems: Vec<String> },
    /// An argument is unusable.
    #[error("invalid {what}: {value}")]
    Invalid { what: &'static str, value: String },
    /// iptables (aws-node's rules, when swapping with it) failed.
    #[error("{command}: {msg}")]
    Iptables { command: String, msg: String },
    /// `nft` rejected or could not apply the table.
    #[error("nftables table ip {table}: {msg}")]
    Nft { table: String, msg: String },
}

/// Every error of a teardown (teardown does not stop at the first one).
#[derive(Debug)]
pub struct TeardownError {
    pub errors: Vec<DataplaneError>,
}

impl fmt::Display for TeardownError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "teardown failed with {} error(s): ", self.errors.len())?;
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                write!(f, "; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TeardownError {}

impl TeardownError {
    pub(crate) fn from_vec(errors: Vec<DataplaneError>) -> Result<(), TeardownError> {
        if errors.is_empty() {
            Ok(())
        } else {
            Err(TeardownError { errors })
        }
    }
}

/// Opens a pod namespace, distinguishing "gone" (Ok(None)).
pub(crate) fn open_ns_opt(path: &Path) -> Result<Option<NetNs>, NetnsError> {
    match NetNs::open(path) {
        Ok(ns) => Ok(Some(ns)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_tables_follow_the_reference() {
        assert_eq!(route_table_for_device(0), 254);
        assert_eq!(route_table_for_device(1), 2);
        assert_eq!(route_table_for_device(7), 8);
        for d in 0..=MAX_ENI_DEVICE {
            assert_eq!(device_for_route_table(route_table_for_device(d)), Some(d));
        }
        for t in [0, 1, 65, 253, 255, TO_POD_TABLE] {
            assert_eq!(device_for_route_table(t), None, "table {t}");
        }
    }

    #[test]
    fn veth_name_matches_reference() {
        // known values from coreutils: `printf 'default.nginx' | sha1sum` = c440f455693b69cd...
        assert_eq!(host_veth_name("eni", "default", "nginx"), "enic440f455693");
        // `printf 'kube-system.coredns-abc' | sha1sum` = 3d5d6ab04b5152ac...
        assert_eq!(
            host_veth_name("eni", "kube-system", "coredns-abc"),
            KNOWN_COREDNS
        );
        assert_eq!(host_veth_name("eni", "a", "b").len(), 14);
        assert!(host_veth_name("vlan", "a", "b").starts_with("vlan"));
    }

    const KNOWN_COREDNS: &str = "eni3d5d6ab04b5";
}
