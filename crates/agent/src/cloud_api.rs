//! The agent's boundary to EC2 and to the node's interfaces, as small traits: the real
//! implementations (`cloud::Ec2`, `dataplane`) and in-memory fakes for unit tests.

use std::future::Future;
use std::net::Ipv4Addr;

use cloud::{CloudError, Ec2, Filter, InstanceTypeLimits, IpRequest, NetworkInterface, NewEni};

/// The EC2 calls the agent makes.
pub trait Cloud: Send + Sync + 'static {
    fn create_eni(
        &self,
        spec: &NewEni,
    ) -> impl Future<Output = Result<NetworkInterface, CloudError>> + Send;
    fn attach(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
    ) -> impl Future<Output = Result<String, CloudError>> + Send;
    fn set_delete_on_termination(
        &self,
        eni_id: &str,
        attachment_id: &str,
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn detach(&self, attachment_id: &str) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn delete_eni(&self, eni_id: &str) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn assign_ips(
        &self,
        eni_id: &str,
        count: u32,
    ) -> impl Future<Output = Result<Vec<Ipv4Addr>, CloudError>> + Send;
    fn unassign_ips(
        &self,
        eni_id: &str,
        ips: &[Ipv4Addr],
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn describe_enis(
        &self,
        filters: &[Filter],
    ) -> impl Future<Output = Result<Vec<NetworkInterface>, CloudError>> + Send;
    fn instance_limits(
        &self,
        instance_type: &str,
    ) -> impl Future<Output = Result<InstanceTypeLimits, CloudError>> + Send;
}

impl Cloud for Ec2 {
    async fn create_eni(&self, spec: &NewEni) -> Result<NetworkInterface, CloudError> {
        self.create_network_interface(spec).await
    }
    async fn attach(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
    ) -> Result<String, CloudError> {
        self.attach_network_interface(eni_id, instance_id, device_index)
            .await
    }
    async fn set_delete_on_termination(
        &self,
        eni_id: &str,
        attachment_id: &str,
    ) -> Result<(), CloudError> {
        Ec2::set_delete_on_termination(self, eni_id, attachment_id, true).await
    }
    async fn detach(&self, attachment_id: &str) -> Result<(), CloudError> {
        self.detach_network_interface(attachment_id, false).await
    }
    async fn delete_eni(&self, eni_id: &str) -> Result<(), CloudError> {
        self.delete_network_interface(eni_id).await
    }
    async fn assign_ips(&self, eni_id: &str, count: u32) -> Result<Vec<Ipv4Addr>, CloudError> {
        self.assign_private_ip_addresses(eni_id, &IpRequest::Count(count))
            .await
    }
    async fn unassign_ips(&self, eni_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError> {
        self.unassign_private_ip_addresses(eni_id, ips).await
    }
    async fn describe_enis(&self, filters: &[Filter]) -> Result<Vec<NetworkInterface>, CloudError> {
        self.describe_network_interfaces(&[], filters).await
    }
    async fn instance_limits(&self, instance_type: &str) -> Result<InstanceTypeLimits, CloudError> {
        self.describe_instance_types(instance_type).await
    }
}

/// Limits of common instance types (ENIs, IPv4 addresses per ENI), used when
/// DescribeInstanceTypes cannot be reached. Values from EC2's published limits.
pub fn builtin_limits(instance_type: &str) -> Option<InstanceTypeLimits> {
    let (max_enis, ipv4_per_eni) = match instance_type {
        "t3.nano" | "t3.micro" => (2, 2),
        "t3.small" => (3, 4),
        "t3.medium" => (3, 6),
        "t3.large" => (3, 12),
        "t3.xlarge" | "t3.2xlarge" => (4, 15),
        "m5.large" | "c5.large" | "r5.large" | "m6i.large" | "c6i.large" => (3, 10),
        "m5.xlarge" | "c5.xlarge" | "r5.xlarge" | "m6i.xlarge" | "c6i.xlarge" => (4, 15),
        "m5.2xlarge" | "c5.2xlarge" | "r5.2xlarge" | "m6i.2xlarge" | "c6i.2xlarge" => (4, 15),
        "m5.4xlarge" | "c5.4xlarge" | "r5.4xlarge" | "m6i.4xlarge" | "c6i.4xlarge" => (8, 30),
        "m5.8xlarge" | "m5.12xlarge" | "r5.8xlarge" | "r5.12xlarge" | "m6i.8xlarge" => (8, 30),
        "c5.9xlarge" | "c5.12xlarge" => (8, 30),
        "m5.16xlarge" | "m5.24xlarge" | "c5.18xlarge" | "c5.24xlarge" | "r5.16xlarge"
        | "r5.24xlarge" => (15, 50),
        _ => return None,
    };
    Some(InstanceTypeLimits {
        max_enis,
        ipv4_per_eni,
    })
}

/// The node side of ENI changes.
pub trait NodeNet: Send + Sync + 'static {
    /// Waits for the interface with the ENI's MAC to appear, then sets it up (table, rule).
    /// Returns the interface name.
    fn setup_eni(&self, e: &dataplane::EniSetup) -> Result<String, String>;
    fn teardown_eni(&self, device_number: u32, primary_ip: Ipv4Addr) -> Result<(), String>;
}

/// The real node: netlink, with a wait for the hot-plugged interface.
#[derive(Debug, Clone, Copy)]
pub struct Netlink {
    pub wait_s: u64,
}

impl NodeNet for Netlink {
    fn setup_eni(&self, e: &dataplane::EniSetup) -> Result<String, String> {
        crate::host::wait_for_link(&e.mac, self.wait_s).map_err(|waited| {
            format!(
                "no interface with MAC {} appeared within {waited}s of attaching the ENI",
                e.mac
            )
        })?;
        dataplane::setup_eni(e).map_err(|err| err.to_string())
    }

    fn teardown_eni(&self, device_number: u32, primary_ip: Ipv4Addr) -> Result<(), String> {
        dataplane::teardown_eni(device_number, primary_ip).map_err(|e| e.to_string())
    }
}
