//! The agent's seam to the node's network: the [`NodeNet`] trait that the provisioner drives
//! when it adds or removes an ENI, its real implementation on the kernel ([`KernelNode`],
//! through crate `dataplane`), and [`wait_for_link`] for a hot-plugged interface.

use std::net::Ipv4Addr;
use std::time::Duration;

/// Why the node side of an ENI change failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The attached ENI's interface did not show up on the node in time.
    #[error("no interface with MAC {mac} appeared within {waited_s}s of attaching the ENI")]
    LinkMissing { mac: String, waited_s: u64 },
    /// Setting up the ENI's interface, table or rule failed.
    #[error(transparent)]
    Dataplane(#[from] dataplane::DataplaneError),
    /// Removing the ENI's table and rule failed (every error of the teardown).
    #[error(transparent)]
    Teardown(#[from] dataplane::TeardownError),
}

/// The node side of ENI changes.
pub trait NodeNet: Send + Sync + 'static {
    /// Waits for the interface with the ENI's MAC to appear, then sets it up (table, rule).
    /// Returns the interface name.
    fn setup_eni(&self, e: &dataplane::EniSetup) -> Result<String, NodeError>;
    /// Removes the ENI's table and rule.
    fn teardown_eni(&self, device_number: u32, primary_ip: Ipv4Addr) -> Result<(), NodeError>;
}

/// The real node: the kernel through netlink, waiting up to `wait_s` seconds for a
/// hot-plugged interface.
#[derive(Debug, Clone, Copy)]
pub struct KernelNode {
    pub wait_s: u64,
}

impl NodeNet for KernelNode {
    fn setup_eni(&self, e: &dataplane::EniSetup) -> Result<String, NodeError> {
        wait_for_link(&e.mac, self.wait_s).ok_or_else(|| NodeError::LinkMissing {
            mac: e.mac.clone(),
            waited_s: self.wait_s,
        })?;
        Ok(dataplane::setup_eni(e)?)
    }

    fn teardown_eni(&self, device_number: u32, primary_ip: Ipv4Addr) -> Result<(), NodeError> {
        Ok(dataplane::teardown_eni(device_number, primary_ip)?)
    }
}

/// Waits up to `seconds` for an interface with `mac` (a just-attached ENI appears
/// asynchronously). Returns its name, or `None` when none appeared in time.
pub fn wait_for_link(mac: &str, seconds: u64) -> Option<String> {
    for _ in 0..seconds * 10 {
        if let Ok(Some(name)) = dataplane::link_name_by_mac(mac) {
            return Some(name);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}
