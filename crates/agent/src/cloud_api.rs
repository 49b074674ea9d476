//! The agent's seam to EC2: the [`Cloud`] trait with the calls the agent makes (implemented by
//! `cloud::Ec2`, and by an in-memory fake in the provisioner's tests), and an instance type's
//! limits from DescribeInstanceTypes or, failing that, a built-in table.

use std::future::Future;
use std::net::Ipv4Addr;

use cloud::{
    CloudError, Ec2, Filter, InstanceTypeInfo, IpRequest, NetworkInterface, NewEni, Subnet,
};
use ipnet::Ipv4Net;
use tracing::warn;

/// Neither EC2 nor the built-in table knows the instance type's limits.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot learn the ENI and IP limits of {instance_type}: DescribeInstanceTypes failed ({cause}) and the type is not in the built-in table"
)]
pub struct LimitsError {
    pub instance_type: String,
    /// DescribeInstanceTypes' error (shown in the message).
    pub cause: CloudError,
}

/// The EC2 calls the agent makes.
pub trait Cloud: Send + Sync + 'static {
    /// Creates an ENI with `spec.secondary_ip_count` secondary addresses or `prefixes` /28
    /// prefixes (EC2 takes one or the other).
    fn create_eni(
        &self,
        spec: &NewEni,
        prefixes: u32,
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
    /// Assigns `count` /28 prefixes chosen by EC2; returns the new ones.
    fn assign_prefixes(
        &self,
        eni_id: &str,
        count: u32,
    ) -> impl Future<Output = Result<Vec<Ipv4Net>, CloudError>> + Send;
    fn unassign_prefixes(
        &self,
        eni_id: &str,
        prefixes: &[Ipv4Net],
    ) -> impl Future<Output = Result<(), CloudError>> + Send;
    fn describe_enis(
        &self,
        filters: &[Filter],
    ) -> impl Future<Output = Result<Vec<NetworkInterface>, CloudError>> + Send;
    fn instance_type_info(
        &self,
        instance_type: &str,
    ) -> impl Future<Output = Result<InstanceTypeInfo, CloudError>> + Send;
    /// One subnet by id (custom networking: the ENIConfig's subnet).
    fn describe_subnet(
        &self,
        subnet_id: &str,
    ) -> impl Future<Output = Result<Subnet, CloudError>> + Send;
}

impl Cloud for Ec2 {
    async fn create_eni(
        &self,
        spec: &NewEni,
        prefixes: u32,
    ) -> Result<NetworkInterface, CloudError> {
        if prefixes > 0 {
            self.create_network_interface_with_prefixes(spec, prefixes)
                .await
        } else {
            self.create_network_interface(spec).await
        }
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
    async fn assign_prefixes(&self, eni_id: &str, count: u32) -> Result<Vec<Ipv4Net>, CloudError> {
        self.assign_ipv4_prefixes(eni_id, count).await
    }
    async fn unassign_prefixes(
        &self,
        eni_id: &str,
        prefixes: &[Ipv4Net],
    ) -> Result<(), CloudError> {
        self.unassign_ipv4_prefixes(eni_id, prefixes).await
    }
    async fn describe_enis(&self, filters: &[Filter]) -> Result<Vec<NetworkInterface>, CloudError> {
        self.describe_network_interfaces(&[], filters).await
    }
    async fn instance_type_info(
        &self,
        instance_type: &str,
    ) -> Result<InstanceTypeInfo, CloudError> {
        self.describe_instance_type_info(instance_type).await
    }
    async fn describe_subnet(&self, subnet_id: &str) -> Result<Subnet, CloudError> {
        Ec2::describe_subnet(self, subnet_id).await
    }
}

/// The tag with which an operator tells aws-node (and vpc-cni) to leave an ENI alone.
pub const TAG_NO_MANAGE: &str = "node.k8s.amazonaws.com/no_manage";

/// Why an attached ENI is not ours to use, as aws-node decides it: tagged
/// [`TAG_NO_MANAGE`]`=true`, or a trunk (security groups for pods) or EFA interface. Its
/// addresses never go to pods and it is never detached or deleted; its device index stays
/// taken.
pub fn unmanaged_reason(e: &NetworkInterface) -> Option<String> {
    if e.tags.get(TAG_NO_MANAGE).map(String::as_str) == Some("true") {
        return Some(format!("tagged {TAG_NO_MANAGE}=true"));
    }
    match e.interface_type.as_str() {
        t @ ("trunk" | "efa" | "efa-only" | "branch") => Some(format!("a {t} interface")),
        _ => None,
    }
}

/// What the built-in table ([`crate::max_pods`]) knows of common instance types (ENIs, IPv4
/// addresses per ENI, vCPUs, Nitro or not), used when DescribeInstanceTypes cannot be reached.
pub fn builtin_limits(instance_type: &str) -> Option<InstanceTypeInfo> {
    crate::max_pods::builtin(instance_type).map(|i| InstanceTypeInfo {
        limits: i.limits,
        hypervisor: Some(if i.prefix_capable { "nitro" } else { "xen" }.into()),
        vcpus: Some(i.vcpus),
    })
}

/// DescribeInstanceTypes, or the built-in table when EC2 cannot answer.
pub async fn limits_or_builtin<C: Cloud>(
    cloud: &C,
    instance_type: &str,
) -> Result<InstanceTypeInfo, LimitsError> {
    match cloud.instance_type_info(instance_type).await {
        Ok(l) => Ok(l),
        Err(e) => match builtin_limits(instance_type) {
            Some(l) => {
                warn!(r#type = %instance_type, "DescribeInstanceTypes failed ({e}); using the built-in limits");
                Ok(l)
            }
            None => Err(LimitsError {
                instance_type: instance_type.to_owned(),
                cause: e,
            }),
        },
    }
}
