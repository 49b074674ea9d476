//! The EC2 calls only the lab makes (feature `lab`): VPCs, subnets, security groups, tags
//! (created and deleted), instances, the one-ENI describe, and a client for an emulator such as
//! moto. The agent does not enable the feature, so its view of EC2 is the ENI calls of
//! [`crate::Ec2`] alone.

use std::net::Ipv4Addr;

use aws_sdk_ec2::types::{self as sdk, ResourceType, Tag};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::ec2::{ids, sdk_filters, subnet_from_sdk, tag_spec, tags_of, timeouts};
use crate::parse::{self, ec2_field, ec2_str, ec2_u32};
use crate::stats::{self, ApiStats, Counter};
use crate::{CloudError, Ec2, Filter, NetworkInterface, Tags};

/// A VPC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vpc {
    pub id: String,
    /// Primary CIDR first, then associated CIDRs.
    pub cidrs: Vec<Ipv4Net>,
    pub is_default: bool,
    pub tags: Tags,
}

pub use crate::ec2::Subnet;

/// A security group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityGroup {
    pub id: String,
    pub name: String,
    pub vpc_id: String,
    pub tags: Tags,
}

/// An instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub id: String,
    pub instance_type: String,
    /// `pending`, `running`, `stopped`, `terminated`, ...
    pub state: String,
    pub availability_zone: String,
    pub vpc_id: String,
    pub subnet_id: String,
    pub private_ip: Ipv4Addr,
    pub security_groups: Vec<String>,
    pub tags: Tags,
    /// Attached ENIs as DescribeInstances lists them, sorted by device index.
    pub network_interfaces: Vec<InstanceEni>,
}

impl Instance {
    /// The ENI at device index 0.
    pub fn primary_eni(&self) -> Option<&InstanceEni> {
        self.network_interfaces.iter().find(|e| e.device_index == 0)
    }
}

/// An ENI attached to an instance, as summarised by DescribeInstances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceEni {
    pub id: String,
    pub attachment_id: String,
    pub device_index: u32,
    pub mac: String,
    pub primary_ip: Ipv4Addr,
}

/// Filters only the lab's queries use.
impl Filter {
    /// `name` equals any of `values`.
    pub fn any(name: &str, values: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Filter {
            name: name.to_owned(),
            values: values.into_iter().map(Into::into).collect(),
        }
    }
    /// Resource has tag `key` (any value).
    pub fn tag_key(key: &str) -> Self {
        Self::eq("tag-key", key)
    }
    /// Resources in VPC `vpc_id`.
    pub fn vpc(vpc_id: impl Into<String>) -> Self {
        Self::eq("vpc-id", vpc_id)
    }
}

impl Ec2 {
    /// A client for an EC2 emulator such as moto at `endpoint` (e.g. `http://127.0.0.1:5000`),
    /// with fixed dummy credentials. Never use this against real AWS.
    pub fn for_endpoint(endpoint: &str, region: &str) -> Self {
        let stats = ApiStats::default();
        let creds =
            aws_sdk_ec2::config::Credentials::new("vpc-lab", "vpc-lab", None, None, "vpc-lab");
        let conf = aws_sdk_ec2::Config::builder()
            .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
            .region(aws_sdk_ec2::config::Region::new(region.to_owned()))
            .endpoint_url(endpoint)
            .credentials_provider(creds)
            .timeout_config(timeouts())
            .retry_config(stats::retry_config())
            .retry_partition(stats::retry_partition())
            .interceptor(Counter(stats.clone()))
            .build();
        Ec2 {
            client: aws_sdk_ec2::Client::from_conf(conf),
            region: region.to_owned(),
            stats,
        }
    }

    // ---- VPC, subnets, security groups -------------------------------------------------

    /// CreateVpc; returns the VPC id.
    pub async fn create_vpc(&self, cidr: Ipv4Net, tags: &Tags) -> Result<String, CloudError> {
        const CALL: &str = "CreateVpc";
        let out = self
            .client
            .create_vpc()
            .cidr_block(cidr.to_string())
            .set_tag_specifications(tag_spec(ResourceType::Vpc, tags))
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        let id = ec2_str(CALL, "Vpc.VpcId", out.vpc().and_then(|v| v.vpc_id()))?;
        tracing::info!(vpc = %id, %cidr, "created VPC");
        Ok(id)
    }

    /// DescribeVpcs by ids (empty = all) and filters.
    pub async fn describe_vpcs(
        &self,
        vpc_ids: &[String],
        filters: &[Filter],
    ) -> Result<Vec<Vpc>, CloudError> {
        const CALL: &str = "DescribeVpcs";
        let vpcs = self
            .client
            .describe_vpcs()
            .set_vpc_ids(ids(vpc_ids))
            .set_filters(sdk_filters(filters))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        vpcs.iter().map(vpc_from_sdk).collect()
    }

    /// AssociateVpcCidrBlock of an IPv4 CIDR (a secondary CIDR such as 100.64.0.0/16);
    /// returns the association id.
    pub async fn associate_vpc_cidr_block(
        &self,
        vpc_id: &str,
        cidr: Ipv4Net,
    ) -> Result<String, CloudError> {
        const CALL: &str = "AssociateVpcCidrBlock";
        let out = self
            .client
            .associate_vpc_cidr_block()
            .vpc_id(vpc_id)
            .cidr_block(cidr.to_string())
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        let id = ec2_str(
            CALL,
            "CidrBlockAssociation.AssociationId",
            out.cidr_block_association()
                .and_then(|a| a.association_id()),
        )?;
        tracing::info!(vpc = vpc_id, %cidr, association = %id, "associated VPC CIDR");
        Ok(id)
    }

    /// CreateSubnet; returns the subnet id.
    pub async fn create_subnet(
        &self,
        vpc_id: &str,
        cidr: Ipv4Net,
        availability_zone: &str,
        tags: &Tags,
    ) -> Result<String, CloudError> {
        const CALL: &str = "CreateSubnet";
        let out = self
            .client
            .create_subnet()
            .vpc_id(vpc_id)
            .cidr_block(cidr.to_string())
            .availability_zone(availability_zone)
            .set_tag_specifications(tag_spec(ResourceType::Subnet, tags))
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        let id = ec2_str(
            CALL,
            "Subnet.SubnetId",
            out.subnet().and_then(|s| s.subnet_id()),
        )?;
        tracing::info!(subnet = %id, vpc = vpc_id, %cidr, az = availability_zone, "created subnet");
        Ok(id)
    }

    /// DescribeSubnets of one VPC (filtered by VpcId, never by CIDR: VPCs may overlap).
    pub async fn describe_subnets(&self, vpc_id: &str) -> Result<Vec<Subnet>, CloudError> {
        const CALL: &str = "DescribeSubnets";
        let subnets = self
            .client
            .describe_subnets()
            .filters(Filter::vpc(vpc_id).to_sdk())
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        subnets.iter().map(|s| subnet_from_sdk(CALL, s)).collect()
    }

    /// CreateSecurityGroup in a VPC; returns the group id.
    pub async fn create_security_group(
        &self,
        vpc_id: &str,
        name: &str,
        description: &str,
        tags: &Tags,
    ) -> Result<String, CloudError> {
        const CALL: &str = "CreateSecurityGroup";
        let out = self
            .client
            .create_security_group()
            .vpc_id(vpc_id)
            .group_name(name)
            .description(description)
            .set_tag_specifications(tag_spec(ResourceType::SecurityGroup, tags))
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        let id = ec2_str(CALL, "GroupId", out.group_id())?;
        tracing::info!(group = %id, vpc = vpc_id, name, "created security group");
        Ok(id)
    }

    /// DescribeSecurityGroups by ids (empty = all) and filters.
    pub async fn describe_security_groups(
        &self,
        group_ids: &[String],
        filters: &[Filter],
    ) -> Result<Vec<SecurityGroup>, CloudError> {
        const CALL: &str = "DescribeSecurityGroups";
        let groups = self
            .client
            .describe_security_groups()
            .set_group_ids(ids(group_ids))
            .set_filters(sdk_filters(filters))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        groups
            .iter()
            .map(|g| {
                Ok(SecurityGroup {
                    id: ec2_str(CALL, "GroupId", g.group_id())?,
                    name: ec2_str(CALL, "GroupName", g.group_name())?,
                    vpc_id: g.vpc_id().unwrap_or_default().to_owned(),
                    tags: tags_of(g.tags()),
                })
            })
            .collect()
    }

    /// CreateTags on resources.
    pub async fn create_tags(
        &self,
        resource_ids: &[String],
        tags: &Tags,
    ) -> Result<(), CloudError> {
        const CALL: &str = "CreateTags";
        if resource_ids.is_empty() || tags.is_empty() {
            return Err(CloudError::InvalidArgument {
                call: CALL,
                detail: format!("need resources and tags, got {resource_ids:?} and {tags:?}"),
            });
        }
        let tags = tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        self.client
            .create_tags()
            .set_resources(Some(resource_ids.to_vec()))
            .set_tags(Some(tags))
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        Ok(())
    }

    /// DeleteTags: removes the tags with these keys (whatever their values) from resources.
    pub async fn delete_tags(
        &self,
        resource_ids: &[String],
        keys: &[&str],
    ) -> Result<(), CloudError> {
        const CALL: &str = "DeleteTags";
        if resource_ids.is_empty() || keys.is_empty() {
            return Err(CloudError::InvalidArgument {
                call: CALL,
                detail: format!("need resources and tag keys, got {resource_ids:?} and {keys:?}"),
            });
        }
        self.client
            .delete_tags()
            .set_resources(Some(resource_ids.to_vec()))
            .set_tags(Some(
                keys.iter()
                    .map(|k| Tag::builder().key(*k).build())
                    .collect(),
            ))
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        Ok(())
    }

    // ---- instances ---------------------------------------------------------------------

    /// RunInstances for one instance; returns it with its primary ENI.
    pub async fn run_instance(
        &self,
        image_id: &str,
        subnet_id: &str,
        instance_type: &str,
        private_ip: Option<Ipv4Addr>,
        security_groups: &[String],
        tags: &Tags,
    ) -> Result<Instance, CloudError> {
        const CALL: &str = "RunInstances";
        let out = self
            .client
            .run_instances()
            .image_id(image_id)
            .instance_type(sdk::InstanceType::from(instance_type))
            .min_count(1)
            .max_count(1)
            .subnet_id(subnet_id)
            .set_private_ip_address(private_ip.map(|ip| ip.to_string()))
            .set_security_group_ids(ids(security_groups))
            .set_tag_specifications(tag_spec(ResourceType::Instance, tags))
            .send()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        let [inst] = out.instances() else {
            return Err(CloudError::answer(
                CALL,
                "Instances",
                format!("has {} entries, expected 1", out.instances().len()),
            ));
        };
        let inst = instance_from_sdk(CALL, inst)?;
        tracing::info!(instance = %inst.id, ip = %inst.private_ip, instance_type, "ran instance");
        Ok(inst)
    }

    /// DescribeInstances by ids (empty = all) and filters.
    pub async fn describe_instances(
        &self,
        instance_ids: &[String],
        filters: &[Filter],
    ) -> Result<Vec<Instance>, CloudError> {
        const CALL: &str = "DescribeInstances";
        let reservations = self
            .client
            .describe_instances()
            .set_instance_ids(ids(instance_ids))
            .set_filters(sdk_filters(filters))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| CloudError::ec2(CALL, e))?;
        reservations
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| instance_from_sdk(CALL, i))
            .collect()
    }

    /// One ENI by id.
    pub async fn describe_network_interface(
        &self,
        eni_id: &str,
    ) -> Result<NetworkInterface, CloudError> {
        self.describe_one_eni(eni_id).await
    }
}

// ---- SDK → domain conversions --------------------------------------------------------------

fn vpc_from_sdk(v: &sdk::Vpc) -> Result<Vpc, CloudError> {
    const CALL: &str = "DescribeVpcs";
    let primary = ec2_field(CALL, "CidrBlock", v.cidr_block(), parse::ipv4_net)?;
    let mut cidrs = vec![primary];
    for a in v.cidr_block_association_set() {
        let state = a
            .cidr_block_state()
            .and_then(|s| s.state())
            .map(|s| s.as_str());
        if matches!(
            state,
            Some("disassociating" | "disassociated" | "failed" | "failing")
        ) {
            continue;
        }
        let c = ec2_field(
            CALL,
            "CidrBlockAssociationSet.CidrBlock",
            a.cidr_block(),
            parse::ipv4_net,
        )?;
        if !cidrs.contains(&c) {
            cidrs.push(c);
        }
    }
    Ok(Vpc {
        id: ec2_str(CALL, "VpcId", v.vpc_id())?,
        cidrs,
        is_default: v.is_default().unwrap_or(false),
        tags: tags_of(v.tags()),
    })
}

fn instance_from_sdk(call: &'static str, i: &sdk::Instance) -> Result<Instance, CloudError> {
    let id = ec2_str(call, "InstanceId", i.instance_id())?;
    let mut enis = Vec::new();
    for n in i.network_interfaces() {
        let att = n.attachment().ok_or_else(|| {
            CloudError::missing(call, format!("{id}.NetworkInterfaces.Attachment"))
        })?;
        enis.push(InstanceEni {
            id: ec2_str(
                call,
                "NetworkInterfaces.NetworkInterfaceId",
                n.network_interface_id(),
            )?,
            attachment_id: ec2_str(
                call,
                "NetworkInterfaces.Attachment.AttachmentId",
                att.attachment_id(),
            )?,
            device_index: ec2_u32(
                call,
                "NetworkInterfaces.Attachment.DeviceIndex",
                att.device_index(),
            )?,
            mac: ec2_str(call, "NetworkInterfaces.MacAddress", n.mac_address())?
                .to_ascii_lowercase(),
            primary_ip: ec2_field(
                call,
                "NetworkInterfaces.PrivateIpAddress",
                n.private_ip_address(),
                parse::ipv4,
            )?,
        });
    }
    enis.sort_by_key(|e| e.device_index);
    Ok(Instance {
        instance_type: ec2_str(call, "InstanceType", i.instance_type().map(|t| t.as_str()))?,
        state: ec2_str(
            call,
            "State.Name",
            i.state().and_then(|s| s.name()).map(|n| n.as_str()),
        )?,
        availability_zone: ec2_str(
            call,
            "Placement.AvailabilityZone",
            i.placement().and_then(|p| p.availability_zone()),
        )?,
        vpc_id: ec2_str(call, "VpcId", i.vpc_id())?,
        subnet_id: ec2_str(call, "SubnetId", i.subnet_id())?,
        private_ip: ec2_field(
            call,
            "PrivateIpAddress",
            i.private_ip_address(),
            parse::ipv4,
        )?,
        security_groups: i
            .security_groups()
            .iter()
            .filter_map(|g| g.group_id())
            .map(str::to_owned)
            .collect(),
        tags: tags_of(i.tags()),
        network_interfaces: enis,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vpc_conversion_collects_associated_cidrs() {
        let v = sdk::Vpc::builder()
            .vpc_id("vpc-1")
            .cidr_block("172.31.0.0/16")
            .cidr_block_association_set(
                sdk::VpcCidrBlockAssociation::builder()
                    .cidr_block("172.31.0.0/16")
                    .build(),
            )
            .cidr_block_association_set(
                sdk::VpcCidrBlockAssociation::builder()
                    .cidr_block("100.64.0.0/16")
                    .build(),
            )
            .build();
        let v = vpc_from_sdk(&v).unwrap();
        assert_eq!(v.cidrs.len(), 2);
        assert_eq!(v.cidrs[1].to_string(), "100.64.0.0/16");
    }

    #[test]
    fn filters_of_the_lab() {
        let f = Filter::any("status", ["available", "in-use"]);
        assert_eq!(f.values, ["available", "in-use"]);
        assert_eq!(Filter::vpc("vpc-1").name, "vpc-id");
        assert_eq!(Filter::tag_key("k").name, "tag-key");
        assert!(tag_spec(ResourceType::Vpc, &Tags::new()).is_none());
    }
}
