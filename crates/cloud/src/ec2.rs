//! EC2 through the AWS SDK for Rust, with domain types in and out (no SDK type leaks): the
//! calls the agent makes (ENIs, their addresses, instance-type limits). The calls only the lab
//! makes live in `crate::lab` (feature `lab`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use aws_sdk_ec2::types::{
    self as sdk, Filter as SdkFilter, NetworkInterfaceAttachmentChanges, ResourceType, Tag,
    TagSpecification,
};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::CloudError;
use crate::parse::{self, ec2_field, ec2_str, ec2_u32};
use crate::stats::{self, ApiStats, Counter};

/// Resource tags, ordered by key.
pub type Tags = BTreeMap<String, String>;

/// An elastic network interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub id: String,
    pub mac: String,
    pub subnet_id: String,
    pub vpc_id: String,
    /// `available`, `in-use`, `attaching`, `detaching`, ...
    pub status: String,
    pub description: String,
    pub primary_ip: Ipv4Addr,
    /// Every private IPv4 address except the primary, in EC2 order.
    pub secondary_ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Ipv4Net>,
    pub security_groups: Vec<String>,
    pub tags: Tags,
    pub attachment: Option<EniAttachment>,
    /// EC2's `InterfaceType`: `interface` (a plain ENI), `trunk`, `efa`, `efa-only`, `branch`, …
    pub interface_type: String,
}

impl NetworkInterface {
    /// Primary and secondary addresses.
    pub fn all_ips(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        std::iter::once(self.primary_ip).chain(self.secondary_ips.iter().copied())
    }
}

/// The attachment of an ENI to an instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EniAttachment {
    pub attachment_id: String,
    pub instance_id: String,
    pub device_index: u32,
    /// `attaching`, `attached`, `detaching`, `detached`.
    pub status: String,
    pub delete_on_termination: bool,
}

/// ENI limits of an instance type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceTypeLimits {
    pub max_enis: u32,
    /// IPv4 addresses per ENI, primary included.
    pub ipv4_per_eni: u32,
}

/// What DescribeInstanceTypes says about one instance type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceTypeInfo {
    pub limits: InstanceTypeLimits,
    /// EC2's `Hypervisor`: `nitro` or `xen`; `None` for bare metal (EC2 lists none there).
    pub hypervisor: Option<String>,
    /// `VCpuInfo.DefaultVCpus`, when EC2 lists it.
    pub vcpus: Option<u32>,
}

impl InstanceTypeInfo {
    /// Nitro-based: EC2 assigns IPv4 prefixes only to network interfaces of these (bare-metal
    /// types, which list no hypervisor, are built on Nitro too).
    pub fn is_nitro(&self) -> bool {
        self.hypervisor.as_deref().is_none_or(|h| h == "nitro")
    }
}

/// A subnet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub id: String,
    pub vpc_id: String,
    pub cidr: Ipv4Net,
    pub availability_zone: String,
    pub available_ip_address_count: u32,
    pub tags: Tags,
}

/// A subnet as DescribeSubnets answers it.
pub(crate) fn subnet_from_sdk(
    call: &'static str,
    s: &aws_sdk_ec2::types::Subnet,
) -> Result<Subnet, CloudError> {
    Ok(Subnet {
        id: ec2_str(call, "SubnetId", s.subnet_id())?,
        vpc_id: ec2_str(call, "VpcId", s.vpc_id())?,
        cidr: ec2_field(call, "CidrBlock", s.cidr_block(), parse::ipv4_net)?,
        availability_zone: ec2_str(call, "AvailabilityZone", s.availability_zone())?,
        available_ip_address_count: ec2_u32(
            call,
            "AvailableIpAddressCount",
            s.available_ip_address_count(),
        )?,
        tags: tags_of(s.tags()),
    })
}

/// Which secondary addresses to ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IpRequest {
    /// These exact addresses.
    Addresses(Vec<Ipv4Addr>),
    /// This many addresses chosen by EC2 (batched in one call).
    Count(u32),
}

/// What to create in [`Ec2::create_network_interface`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NewEni {
    pub subnet_id: String,
    /// Explicit primary address; EC2 picks one when `None`.
    pub private_ip: Option<Ipv4Addr>,
    pub security_groups: Vec<String>,
    pub description: String,
    pub tags: Tags,
    /// Secondary addresses EC2 assigns at creation.
    pub secondary_ip_count: u32,
}

/// An EC2 Describe* filter (`Name` + any of `Values`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub name: String,
    pub values: Vec<String>,
}

impl Filter {
    /// `name` equals `value`.
    pub fn eq(name: &str, value: impl Into<String>) -> Self {
        Filter {
            name: name.to_owned(),
            values: vec![value.into()],
        }
    }
    /// Tag `key` equals `value`.
    pub fn tag(key: &str, value: impl Into<String>) -> Self {
        Self::eq(&format!("tag:{key}"), value)
    }
    /// ENIs attached to `instance_id`.
    pub fn attached_to(instance_id: impl Into<String>) -> Self {
        Self::eq("attachment.instance-id", instance_id)
    }

    pub(crate) fn to_sdk(&self) -> SdkFilter {
        SdkFilter::builder()
            .name(&self.name)
            .set_values(Some(self.values.clone()))
            .build()
    }
}

pub(crate) fn sdk_filters(filters: &[Filter]) -> Option<Vec<SdkFilter>> {
    (!filters.is_empty()).then(|| filters.iter().map(Filter::to_sdk).collect())
}

pub(crate) fn ids(ids: &[String]) -> Option<Vec<String>> {
    (!ids.is_empty()).then(|| ids.to_vec())
}

pub(crate) fn tag_spec(resource: ResourceType, tags: &Tags) -> Option<Vec<TagSpecification>> {
    if tags.is_empty() {
        return None;
    }
    let tags = tags
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    Some(vec![
        TagSpecification::builder()
            .resource_type(resource)
            .set_tags(Some(tags))
            .build(),
    ])
}

pub(crate) fn tags_of(tags: &[Tag]) -> Tags {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_owned(),
                t.value().unwrap_or_default().to_owned(),
            ))
        })
        .collect()
}

/// Per-attempt and whole-operation timeouts (the reference uses a 10 s HTTP timeout), so a
/// hung endpoint fails a call instead of blocking its caller forever.
pub(crate) fn timeouts() -> aws_sdk_ec2::config::timeout::TimeoutConfig {
    aws_sdk_ec2::config::timeout::TimeoutConfig::builder()
        .connect_timeout(std::time::Duration::from_secs(3))
        .operation_attempt_timeout(std::time::Duration::from_secs(10))
        .operation_timeout(std::time::Duration::from_secs(40))
        .build()
}

/// The EC2 client. Cheap to clone (the SDK client is reference-counted).
#[derive(Clone, Debug)]
pub struct Ec2 {
    pub(crate) client: aws_sdk_ec2::Client,
    pub(crate) region: String,
    pub(crate) stats: ApiStats,
}

impl Ec2 {
    /// A client from the SDK's standard configuration chain: `AWS_REGION`, credentials from the
    /// environment / profile / IMDS, and the endpoint override `AWS_ENDPOINT_URL_EC2`.
    pub async fn from_env() -> Result<Self, CloudError> {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .load()
            .await;
        let region = conf.region().ok_or(CloudError::NoRegion)?.to_string();
        tracing::debug!(%region, endpoint = ?conf.endpoint_url(), "EC2 client configured from environment");
        let stats = ApiStats::default();
        let conf = aws_sdk_ec2::config::Builder::from(&conf)
            .timeout_config(timeouts())
            .retry_config(stats::retry_config())
            .retry_partition(stats::retry_partition())
            .interceptor(Counter(stats.clone()))
            .build();
        Ok(Ec2 {
            client: aws_sdk_ec2::Client::from_conf(conf),
            region,
            stats,
        })
    }

    /// Attempts made so far by this client and its clones, by API name.
    pub fn api_stats(&self) -> BTreeMap<String, stats::ApiCount> {
        self.stats.snapshot()
    }

    /// The region this client talks to.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// DescribeInstanceTypes for one type: its ENI and per-ENI IPv4 limits.
    pub async fn describe_instance_types(
        &self,
        instance_type: &str,
    ) -> Result<InstanceTypeLimits, CloudError> {
        Ok(self
            .describe_instance_type_info(instance_type)
            .await?
            .limits)
    }

    /// DescribeSubnets of one subnet by id (custom networking: the ENIConfig's subnet, its
    /// CIDR and zone).
    pub async fn describe_subnet(&self, subnet_id: &str) -> Result<Subnet, CloudError> {
        const CALL: &str = "DescribeSubnets";
        let out = self
            .client
            .describe_subnets()
            .subnet_ids(subnet_id)
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        let s = out.subnets().first().ok_or_else(|| CloudError::Ec2Answer {
            call: CALL,
            field: "Subnets".into(),
            problem: format!("lists no subnet {subnet_id}"),
        })?;
        subnet_from_sdk(CALL, s)
    }

    /// DescribeInstanceTypes for one type: its limits and its hypervisor (prefixes need Nitro).
    pub async fn describe_instance_type_info(
        &self,
        instance_type: &str,
    ) -> Result<InstanceTypeInfo, CloudError> {
        const CALL: &str = "DescribeInstanceTypes";
        let out = self
            .client
            .describe_instance_types()
            .instance_types(sdk::InstanceType::from(instance_type))
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        let info = out
            .instance_types()
            .iter()
            .find(|t| t.instance_type().map(|t| t.as_str()) == Some(instance_type))
            .ok_or_else(|| {
                CloudError::answer(
                    CALL,
                    "InstanceTypes",
                    format!("has no entry for {instance_type}"),
                )
            })?;
        let net = info
            .network_info()
            .ok_or_else(|| CloudError::missing(CALL, format!("{instance_type}.NetworkInfo")))?;
        let limits = InstanceTypeLimits {
            max_enis: ec2_u32(
                CALL,
                "NetworkInfo.MaximumNetworkInterfaces",
                net.maximum_network_interfaces(),
            )?,
            ipv4_per_eni: ec2_u32(
                CALL,
                "NetworkInfo.Ipv4AddressesPerInterface",
                net.ipv4_addresses_per_interface(),
            )?,
        };
        Ok(InstanceTypeInfo {
            limits,
            hypervisor: info.hypervisor().map(|h| h.as_str().to_owned()),
            vcpus: info
                .v_cpu_info()
                .and_then(|v| v.default_v_cpus())
                .and_then(|n| u32::try_from(n).ok()),
        })
    }

    // ---- network interfaces ------------------------------------------------------------

    /// CreateNetworkInterface.
    pub async fn create_network_interface(
        &self,
        spec: &NewEni,
    ) -> Result<NetworkInterface, CloudError> {
        self.create_eni(spec, 0).await
    }

    /// CreateNetworkInterface with `ipv4_prefix_count` /28 prefixes assigned at creation: one
    /// mutating call instead of a create and an assign. EC2 takes a prefix count only without
    /// secondary addresses (`spec.secondary_ip_count` must be 0).
    pub async fn create_network_interface_with_prefixes(
        &self,
        spec: &NewEni,
        ipv4_prefix_count: u32,
    ) -> Result<NetworkInterface, CloudError> {
        self.create_eni(spec, ipv4_prefix_count).await
    }

    async fn create_eni(
        &self,
        spec: &NewEni,
        ipv4_prefix_count: u32,
    ) -> Result<NetworkInterface, CloudError> {
        const CALL: &str = "CreateNetworkInterface";
        let count = api_count(CALL, "secondary_ip_count", spec.secondary_ip_count)?;
        let prefixes = api_count(CALL, "ipv4_prefix_count", ipv4_prefix_count)?;
        if count > 0 && prefixes > 0 {
            return Err(CloudError::InvalidArgument {
                call: CALL,
                detail: format!(
                    "{count} secondary addresses and {prefixes} prefixes: EC2 takes one or the other"
                ),
            });
        }
        let out = self
            .client
            .create_network_interface()
            .subnet_id(&spec.subnet_id)
            .set_private_ip_address(spec.private_ip.map(|ip| ip.to_string()))
            .set_groups(ids(&spec.security_groups))
            .description(&spec.description)
            .set_secondary_private_ip_address_count((count > 0).then_some(count))
            .set_ipv4_prefix_count((prefixes > 0).then_some(prefixes))
            .set_tag_specifications(tag_spec(ResourceType::NetworkInterface, &spec.tags))
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        let eni = out
            .network_interface()
            .ok_or_else(|| CloudError::missing(CALL, "NetworkInterface"))?;
        let eni = eni_from_sdk(CALL, eni)?;
        tracing::info!(eni = %eni.id, subnet = %eni.subnet_id, ip = %eni.primary_ip, prefixes = ?eni.prefixes, "created ENI");
        Ok(eni)
    }

    /// AttachNetworkInterface; returns the attachment id.
    pub async fn attach_network_interface(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
    ) -> Result<String, CloudError> {
        const CALL: &str = "AttachNetworkInterface";
        let index = i32::try_from(device_index).map_err(|_| CloudError::InvalidArgument {
            call: CALL,
            detail: format!("device index {device_index} too large"),
        })?;
        let out = self
            .client
            .attach_network_interface()
            .network_interface_id(eni_id)
            .instance_id(instance_id)
            .device_index(index)
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        let id = ec2_str(CALL, "AttachmentId", out.attachment_id())?;
        tracing::info!(eni = eni_id, instance = instance_id, device_index, attachment = %id, "attached ENI");
        Ok(id)
    }

    /// ModifyNetworkInterfaceAttribute: the attachment's DeleteOnTermination.
    /// (moto accepts this but does not reflect it in DescribeNetworkInterfaces.)
    pub async fn set_delete_on_termination(
        &self,
        eni_id: &str,
        attachment_id: &str,
        delete_on_termination: bool,
    ) -> Result<(), CloudError> {
        const CALL: &str = "ModifyNetworkInterfaceAttribute";
        self.client
            .modify_network_interface_attribute()
            .network_interface_id(eni_id)
            .attachment(
                NetworkInterfaceAttachmentChanges::builder()
                    .attachment_id(attachment_id)
                    .delete_on_termination(delete_on_termination)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        Ok(())
    }

    /// DetachNetworkInterface.
    pub async fn detach_network_interface(
        &self,
        attachment_id: &str,
        force: bool,
    ) -> Result<(), CloudError> {
        const CALL: &str = "DetachNetworkInterface";
        self.client
            .detach_network_interface()
            .attachment_id(attachment_id)
            .force(force)
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        tracing::info!(attachment = attachment_id, force, "detached ENI");
        Ok(())
    }

    /// DeleteNetworkInterface.
    pub async fn delete_network_interface(&self, eni_id: &str) -> Result<(), CloudError> {
        const CALL: &str = "DeleteNetworkInterface";
        self.client
            .delete_network_interface()
            .network_interface_id(eni_id)
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        tracing::info!(eni = eni_id, "deleted ENI");
        Ok(())
    }

    /// DescribeNetworkInterfaces by ids (empty = all) and filters (AND across filters).
    pub async fn describe_network_interfaces(
        &self,
        eni_ids: &[String],
        filters: &[Filter],
    ) -> Result<Vec<NetworkInterface>, CloudError> {
        const CALL: &str = "DescribeNetworkInterfaces";
        let enis = self
            .client
            .describe_network_interfaces()
            .set_network_interface_ids(ids(eni_ids))
            .set_filters(sdk_filters(filters))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        enis.iter().map(|n| eni_from_sdk(CALL, n)).collect()
    }

    /// One ENI by id (exactly one, or an error).
    pub(crate) async fn describe_one_eni(
        &self,
        eni_id: &str,
    ) -> Result<NetworkInterface, CloudError> {
        let mut found = self
            .describe_network_interfaces(&[eni_id.to_owned()], &[])
            .await?;
        match found.len() {
            1 => Ok(found.remove(0)),
            n => Err(CloudError::answer(
                "DescribeNetworkInterfaces",
                "NetworkInterfaces",
                format!("has {n} entries for {eni_id}, expected 1"),
            )),
        }
    }

    /// AssignPrivateIpAddresses in one call; returns only the addresses that are new on the ENI.
    ///
    /// Some EC2 implementations (moto) list every address of the ENI in the answer, so the
    /// answer is diffed against the ENI's addresses described just before the call.
    pub async fn assign_private_ip_addresses(
        &self,
        eni_id: &str,
        request: &IpRequest,
    ) -> Result<Vec<Ipv4Addr>, CloudError> {
        const CALL: &str = "AssignPrivateIpAddresses";
        let mut req = self
            .client
            .assign_private_ip_addresses()
            .network_interface_id(eni_id);
        match request {
            IpRequest::Addresses(ips) if ips.is_empty() => {
                return Err(CloudError::InvalidArgument {
                    call: CALL,
                    detail: format!("empty address list for {eni_id}"),
                });
            }
            IpRequest::Addresses(ips) => {
                req = req
                    .set_private_ip_addresses(Some(ips.iter().map(Ipv4Addr::to_string).collect()));
            }
            IpRequest::Count(n) => {
                let n = i32::try_from(*n).ok().filter(|n| *n > 0).ok_or_else(|| {
                    CloudError::InvalidArgument {
                        call: CALL,
                        detail: format!("address count {n} for {eni_id} must be 1..={}", i32::MAX),
                    }
                })?;
                req = req.secondary_private_ip_address_count(n);
            }
        }
        let before: BTreeSet<Ipv4Addr> = self.describe_one_eni(eni_id).await?.all_ips().collect();
        let out = req.send().await.map_err(|e| CloudError::ec2(CALL, e))?;
        let answered = out
            .assigned_private_ip_addresses()
            .iter()
            .map(|a| {
                ec2_field(
                    CALL,
                    "AssignedPrivateIpAddresses.PrivateIpAddress",
                    a.private_ip_address(),
                    parse::ipv4,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let new = only_new(&before, answered);
        tracing::info!(eni = eni_id, ?request, assigned = ?new, "assigned private IPs");
        Ok(new)
    }

    /// UnassignPrivateIpAddresses.
    pub async fn unassign_private_ip_addresses(
        &self,
        eni_id: &str,
        ips: &[Ipv4Addr],
    ) -> Result<(), CloudError> {
        const CALL: &str = "UnassignPrivateIpAddresses";
        if ips.is_empty() {
            return Err(CloudError::InvalidArgument {
                call: CALL,
                detail: format!("empty address list for {eni_id}"),
            });
        }
        self.client
            .unassign_private_ip_addresses()
            .network_interface_id(eni_id)
            .set_private_ip_addresses(Some(ips.iter().map(Ipv4Addr::to_string).collect()))
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        tracing::info!(eni = eni_id, ?ips, "unassigned private IPs");
        Ok(())
    }

    /// AssignPrivateIpAddresses with `Ipv4PrefixCount`: `count` /28 prefixes chosen by EC2, in
    /// one call; returns only the prefixes that are new on the ENI (the answer is diffed
    /// against the ENI described just before, as for addresses). A subnet without a free
    /// aligned /28 answers `InsufficientCidrBlocks` ([`CloudError::is_insufficient_cidr_blocks`]).
    pub async fn assign_ipv4_prefixes(
        &self,
        eni_id: &str,
        count: u32,
    ) -> Result<Vec<Ipv4Net>, CloudError> {
        const CALL: &str = "AssignPrivateIpAddresses";
        let n = i32::try_from(count)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| CloudError::InvalidArgument {
                call: CALL,
                detail: format!("prefix count {count} for {eni_id} must be 1..={}", i32::MAX),
            })?;
        let before: BTreeSet<Ipv4Net> = self
            .describe_one_eni(eni_id)
            .await?
            .prefixes
            .into_iter()
            .collect();
        let out = self
            .client
            .assign_private_ip_addresses()
            .network_interface_id(eni_id)
            .ipv4_prefix_count(n)
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        let answered = out
            .assigned_ipv4_prefixes()
            .iter()
            .map(|p| {
                ec2_field(
                    CALL,
                    "AssignedIpv4Prefixes.Ipv4Prefix",
                    p.ipv4_prefix(),
                    parse::ipv4_net,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let new = only_new(&before, answered);
        tracing::info!(eni = eni_id, count, assigned = ?new, "assigned IPv4 prefixes");
        Ok(new)
    }

    /// UnassignPrivateIpAddresses with `Ipv4Prefixes`.
    pub async fn unassign_ipv4_prefixes(
        &self,
        eni_id: &str,
        prefixes: &[Ipv4Net],
    ) -> Result<(), CloudError> {
        const CALL: &str = "UnassignPrivateIpAddresses";
        if prefixes.is_empty() {
            return Err(CloudError::InvalidArgument {
                call: CALL,
                detail: format!("empty prefix list for {eni_id}"),
            });
        }
        self.client
            .unassign_private_ip_addresses()
            .network_interface_id(eni_id)
            .set_ipv4_prefixes(Some(prefixes.iter().map(Ipv4Net::to_string).collect()))
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        tracing::info!(eni = eni_id, ?prefixes, "unassigned IPv4 prefixes");
        Ok(())
    }
}

/// A count for an EC2 request (EC2's integers are `i32`).
fn api_count(call: &'static str, what: &str, n: u32) -> Result<i32, CloudError> {
    i32::try_from(n).map_err(|_| CloudError::InvalidArgument {
        call,
        detail: format!("{what} {n} too large"),
    })
}

/// The entries of an Assign* answer that are not in `before`, once each, in answer order
/// (some EC2 implementations list everything the ENI holds).
fn only_new<T: Ord + Copy>(before: &BTreeSet<T>, answered: Vec<T>) -> Vec<T> {
    let mut new = Vec::new();
    for x in answered {
        if !before.contains(&x) && !new.contains(&x) {
            new.push(x);
        }
    }
    new
}

// ---- SDK → domain conversions --------------------------------------------------------------

fn eni_from_sdk(
    call: &'static str,
    n: &sdk::NetworkInterface,
) -> Result<NetworkInterface, CloudError> {
    let id = ec2_str(call, "NetworkInterfaceId", n.network_interface_id())?;
    let primary_ip = ec2_field(
        call,
        "PrivateIpAddress",
        n.private_ip_address(),
        parse::ipv4,
    )?;
    let mut secondary_ips = Vec::new();
    for a in n.private_ip_addresses() {
        let ip = ec2_field(
            call,
            "PrivateIpAddresses.PrivateIpAddress",
            a.private_ip_address(),
            parse::ipv4,
        )?;
        if ip != primary_ip && a.primary() != Some(true) && !secondary_ips.contains(&ip) {
            secondary_ips.push(ip);
        }
    }
    let prefixes = n
        .ipv4_prefixes()
        .iter()
        .map(|p| {
            ec2_field(
                call,
                "Ipv4Prefixes.Ipv4Prefix",
                p.ipv4_prefix(),
                parse::ipv4_net,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let attachment = match n.attachment() {
        None => None,
        Some(a) => Some(EniAttachment {
            attachment_id: ec2_str(call, "Attachment.AttachmentId", a.attachment_id())?,
            instance_id: a.instance_id().unwrap_or_default().to_owned(),
            device_index: ec2_u32(call, "Attachment.DeviceIndex", a.device_index())?,
            status: a
                .status()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            delete_on_termination: a.delete_on_termination().unwrap_or(false),
        }),
    };
    Ok(NetworkInterface {
        interface_type: n
            .interface_type()
            .map_or("interface", |t| t.as_str())
            .to_owned(),
        mac: ec2_str(call, "MacAddress", n.mac_address())?.to_ascii_lowercase(),
        subnet_id: ec2_str(call, "SubnetId", n.subnet_id())?,
        vpc_id: ec2_str(call, "VpcId", n.vpc_id())?,
        status: n
            .status()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default(),
        description: n.description().unwrap_or_default().to_owned(),
        primary_ip,
        secondary_ips,
        prefixes,
        security_groups: n
            .groups()
            .iter()
            .filter_map(|g| g.group_id())
            .map(str::to_owned)
            .collect(),
        tags: tags_of(n.tag_set()),
        attachment,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eni_conversion_splits_primary_and_secondaries() {
        let n = sdk::NetworkInterface::builder()
            .network_interface_id("eni-1")
            .mac_address("02:00:00:AA:BB:01")
            .subnet_id("subnet-a")
            .vpc_id("vpc-1")
            .status(sdk::NetworkInterfaceStatus::InUse)
            .private_ip_address("172.31.3.173")
            .private_ip_addresses(
                sdk::NetworkInterfacePrivateIpAddress::builder()
                    .private_ip_address("172.31.3.173")
                    .primary(true)
                    .build(),
            )
            .private_ip_addresses(
                sdk::NetworkInterfacePrivateIpAddress::builder()
                    .private_ip_address("172.31.13.130")
                    .primary(false)
                    .build(),
            )
            .ipv4_prefixes(
                sdk::Ipv4PrefixSpecification::builder()
                    .ipv4_prefix("172.31.8.0/28")
                    .build(),
            )
            .groups(sdk::GroupIdentifier::builder().group_id("sg-1").build())
            .tag_set(Tag::builder().key("Name").value("x").build())
            .attachment(
                sdk::NetworkInterfaceAttachment::builder()
                    .attachment_id("eni-attach-1")
                    .instance_id("i-1")
                    .device_index(1)
                    .status(sdk::AttachmentStatus::Attached)
                    .build(),
            )
            .build();
        let e = eni_from_sdk("DescribeNetworkInterfaces", &n).unwrap();
        assert_eq!(e.mac, "02:00:00:aa:bb:01");
        assert_eq!(e.primary_ip, Ipv4Addr::new(172, 31, 3, 173));
        assert_eq!(e.secondary_ips, [Ipv4Addr::new(172, 31, 13, 130)]);
        assert_eq!(e.prefixes, ["172.31.8.0/28".parse::<Ipv4Net>().unwrap()]);
        assert_eq!(e.status, "in-use");
        assert_eq!(e.security_groups, ["sg-1"]);
        assert_eq!(e.tags.get("Name").map(String::as_str), Some("x"));
        let a = e.attachment.unwrap();
        assert_eq!(
            (a.device_index, a.status.as_str(), a.instance_id.as_str()),
            (1, "attached", "i-1")
        );
    }

    #[test]
    fn eni_conversion_names_the_bad_field() {
        let n = sdk::NetworkInterface::builder()
            .network_interface_id("eni-1")
            .mac_address("02:00:00:aa:bb:01")
            .subnet_id("subnet-a")
            .vpc_id("vpc-1")
            .private_ip_address("172.31.3.999")
            .build();
        let err = eni_from_sdk("DescribeNetworkInterfaces", &n)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("DescribeNetworkInterfaces")
                && err.contains("PrivateIpAddress")
                && err.contains("172.31.3.999"),
            "{err}"
        );
    }

    #[test]
    fn only_new_entries_of_an_assign_answer() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        let before: BTreeSet<Ipv4Net> = [net("10.0.0.16/28")].into();
        // EC2 lists only the new prefixes; an emulator may list all of them, or one twice.
        let answered = vec![
            net("10.0.0.48/28"),
            net("10.0.0.16/28"),
            net("10.0.0.32/28"),
            net("10.0.0.48/28"),
        ];
        assert_eq!(
            only_new(&before, answered),
            [net("10.0.0.48/28"), net("10.0.0.32/28")]
        );
        assert!(only_new(&before, vec![net("10.0.0.16/28")]).is_empty());
    }

    #[test]
    fn nitro_from_the_hypervisor() {
        let info = |h: Option<&str>| InstanceTypeInfo {
            limits: InstanceTypeLimits {
                max_enis: 3,
                ipv4_per_eni: 10,
            },
            hypervisor: h.map(str::to_owned),
            vcpus: Some(2),
        };
        assert!(info(Some("nitro")).is_nitro());
        assert!(!info(Some("xen")).is_nitro());
        assert!(info(None).is_nitro(), "bare metal lists no hypervisor");
    }

    #[test]
    fn counts_must_fit_ec2s_integers() {
        assert_eq!(api_count("C", "n", 9).unwrap(), 9);
        let e = api_count("CreateNetworkInterface", "ipv4_prefix_count", u32::MAX)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ipv4_prefix_count") && e.contains("too large"),
            "{e}"
        );
    }

    #[test]
    fn filters_map_to_names_and_values() {
        assert_eq!(Filter::tag("Name", "vpc-lab").name, "tag:Name");
        assert_eq!(Filter::attached_to("i-1").name, "attachment.instance-id");
        assert!(sdk_filters(&[]).is_none());
        assert!(tag_spec(ResourceType::NetworkInterface, &Tags::new()).is_none());
    }
}
