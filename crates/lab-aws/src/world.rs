//! The lab's model of EC2 state, rebuilt from EC2 (moto), which is the source of truth (with
//! the IPv4 prefixes and an ENI's own security groups, which the EC2 proxy keeps in moto as ENI
//! tags). The fabric, IMDS and `status`
//! are all derived from a [`World`].

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::fidelity;

/// Tag naming an instance (`instance1`, `instance2`, `vpc-host`).
pub const TAG_NAME: &str = "Name";
/// Tag giving an instance's role: `node` (runs an agent) or `host`.
pub const TAG_ROLE: &str = "vpc-lab:role";
pub const ROLE_NODE: &str = "node";

/// The VPC as EC2 describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct World {
    pub vpc_id: String,
    pub vpc_cidrs: Vec<Ipv4Net>,
    pub region: String,
    /// Sorted by CIDR.
    pub subnets: Vec<Subnet>,
    /// Live (pending or running) instances, sorted by name.
    pub instances: Vec<Instance>,
    /// The VPC's security groups, sorted by name then id.
    #[serde(default)]
    pub security_groups: Vec<SecurityGroup>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub id: String,
    pub cidr: Ipv4Net,
    pub az: String,
    /// Tag `Name` (empty when untagged).
    #[serde(default)]
    pub name: String,
}

/// A security group of the VPC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityGroup {
    pub id: String,
    /// `GroupName`.
    pub name: String,
}

impl Subnet {
    /// The subnet router, the network address + 1 (as in AWS).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.cidr.network()).wrapping_add(1))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Tag `Name`.
    pub name: String,
    pub id: String,
    pub instance_type: String,
    pub az: String,
    /// Tag `vpc-lab:role=node`: the lab runs an agent on it.
    pub node: bool,
    /// Attached ENIs, sorted by device index.
    pub enis: Vec<Eni>,
}

impl Instance {
    /// The ENI at device index 0.
    pub fn primary_eni(&self) -> Option<&Eni> {
        self.enis.iter().find(|e| e.device_index == 0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eni {
    pub id: String,
    pub mac: String,
    pub device_index: u32,
    pub subnet_id: String,
    pub primary_ip: Ipv4Addr,
    pub secondary_ips: Vec<Ipv4Addr>,
    pub prefixes: Vec<Ipv4Net>,
    pub security_groups: Vec<String>,
}

impl World {
    /// Reads the VPC, its subnets, live instances and their attached ENIs from EC2.
    pub async fn load(ec2: &cloud::Ec2, vpc_id: &str) -> Result<World> {
        let vpcs = ec2
            .describe_vpcs(&[vpc_id.to_owned()], &[])
            .await
            .with_context(|| format!("describing VPC {vpc_id}"))?;
        let [vpc] = vpcs.as_slice() else {
            bail!(
                "EC2 returned {} VPCs for id {vpc_id}, expected 1",
                vpcs.len()
            );
        };
        let mut subnets: Vec<Subnet> = ec2
            .describe_subnets(vpc_id)
            .await
            .with_context(|| format!("describing subnets of {vpc_id}"))?
            .into_iter()
            .map(|s| Subnet {
                name: s.tags.get(TAG_NAME).cloned().unwrap_or_default(),
                id: s.id,
                cidr: s.cidr,
                az: s.availability_zone,
            })
            .collect();
        subnets.sort_by(|a, b| a.cidr.cmp(&b.cidr).then_with(|| a.id.cmp(&b.id)));
        let mut security_groups: Vec<SecurityGroup> = ec2
            .describe_security_groups(&[], &[cloud::Filter::vpc(vpc_id)])
            .await
            .with_context(|| format!("describing security groups of {vpc_id}"))?
            .into_iter()
            .filter(|g| g.vpc_id == vpc_id)
            .map(|g| SecurityGroup {
                id: g.id,
                name: g.name,
            })
            .collect();
        security_groups.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));

        let instances = ec2
            .describe_instances(
                &[],
                &[
                    cloud::Filter::vpc(vpc_id),
                    cloud::Filter::any("instance-state-name", ["pending", "running"]),
                ],
            )
            .await
            .with_context(|| format!("describing instances in {vpc_id}"))?;
        let enis = ec2
            .describe_network_interfaces(&[], &[cloud::Filter::vpc(vpc_id)])
            .await
            .with_context(|| format!("describing ENIs in {vpc_id}"))?;
        let mut world = World::assemble(vpc, ec2.region(), subnets, &instances, &enis)?;
        world.security_groups = security_groups;
        tracing::debug!(
            vpc = vpc_id,
            instances = world.instances.len(),
            "world loaded from EC2"
        );
        Ok(world)
    }

    /// Builds the world from EC2 answers (pure; unit-tested).
    fn assemble(
        vpc: &cloud::lab::Vpc,
        region: &str,
        subnets: Vec<Subnet>,
        instances: &[cloud::lab::Instance],
        enis: &[cloud::NetworkInterface],
    ) -> Result<World> {
        let mut by_instance: BTreeMap<&str, Vec<Eni>> = BTreeMap::new();
        for e in enis {
            let Some(att) = &e.attachment else { continue };
            // moto has no prefixes, and adds an attached ENI's instance's groups to its own:
            // the EC2 proxy keeps both in tags of the ENI.
            let lab = fidelity::with_lab_prefixes(e.clone());
            if att.status != "attached" {
                continue;
            }
            by_instance
                .entry(att.instance_id.as_str())
                .or_default()
                .push(Eni {
                    id: e.id.clone(),
                    mac: e.mac.clone(),
                    device_index: att.device_index,
                    subnet_id: e.subnet_id.clone(),
                    primary_ip: e.primary_ip,
                    secondary_ips: e.secondary_ips.clone(),
                    prefixes: lab.prefixes,
                    security_groups: lab.security_groups,
                });
        }

        let mut out = Vec::with_capacity(instances.len());
        for i in instances {
            let name = i
                .tags
                .get(TAG_NAME)
                .with_context(|| format!("instance {} has no {TAG_NAME} tag", i.id))?
                .clone();
            let mut enis = by_instance.remove(i.id.as_str()).unwrap_or_default();
            enis.sort_by_key(|e| e.device_index);
            if let Some(w) = enis
                .windows(2)
                .find(|w| w[0].device_index == w[1].device_index)
            {
                bail!(
                    "instance {name} ({}) has ENIs {} and {} both at device index {}",
                    i.id,
                    w[0].id,
                    w[1].id,
                    w[0].device_index
                );
            }
            if !enis.iter().any(|e| e.device_index == 0) {
                bail!(
                    "instance {name} ({}) has no attached ENI at device index 0",
                    i.id
                );
            }
            out.push(Instance {
                name,
                id: i.id.clone(),
                instance_type: i.instance_type.clone(),
                az: i.availability_zone.clone(),
                node: i.tags.get(TAG_ROLE).is_some_and(|r| r == ROLE_NODE),
                enis,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = out.windows(2).find(|w| w[0].name == w[1].name) {
            bail!(
                "two instances are named {:?}: {} and {}",
                w[0].name,
                w[0].id,
                w[1].id
            );
        }
        Ok(World {
            vpc_id: vpc.id.clone(),
            vpc_cidrs: vpc.cidrs.clone(),
            region: region.to_owned(),
            subnets,
            instances: out,
            security_groups: Vec::new(),
        })
    }

    pub fn instance(&self, name: &str) -> Option<&Instance> {
        self.instances.iter().find(|i| i.name == name)
    }

    pub fn instance_by_id(&self, id: &str) -> Option<&Instance> {
        self.instances.iter().find(|i| i.id == id)
    }

    pub fn subnet(&self, id: &str) -> Option<&Subnet> {
        self.subnets.iter().find(|s| s.id == id)
    }

    /// The subnet whose CIDR is exactly `cidr`.
    pub fn subnet_by_cidr(&self, cidr: Ipv4Net) -> Option<&Subnet> {
        self.subnets.iter().find(|s| s.cidr == cidr)
    }

    /// The VPC's security group named `name`.
    pub fn security_group_named(&self, name: &str) -> Option<&SecurityGroup> {
        self.security_groups.iter().find(|g| g.name == name)
    }
}

/// A small hand-made world, for tests of what is derived from a world (IMDS, the daemon's
/// hot-plug): one instance with two ENIs, secondary IPs and a prefix.
pub fn sample() -> World {
    let ip = |s: &str| -> Ipv4Addr { s.parse().expect("a literal address") };
    World {
        vpc_id: "vpc-1".into(),
        vpc_cidrs: vec!["172.31.0.0/16".parse().unwrap()],
        region: "us-west-2".into(),
        subnets: vec![Subnet {
            id: "subnet-a".into(),
            cidr: "172.31.0.0/20".parse().unwrap(),
            az: "us-west-2a".into(),
            name: "vpc-lab-a".into(),
        }],
        security_groups: vec![SecurityGroup {
            id: "sg-1".into(),
            name: "vpc-lab".into(),
        }],
        instances: vec![Instance {
            name: "instance1".into(),
            id: "i-1".into(),
            instance_type: "m5.large".into(),
            az: "us-west-2a".into(),
            node: true,
            enis: vec![
                Eni {
                    id: "eni-0".into(),
                    mac: "02:00:00:00:00:01".into(),
                    device_index: 0,
                    subnet_id: "subnet-a".into(),
                    primary_ip: ip("172.31.15.228"),
                    secondary_ips: vec![ip("172.31.5.50")],
                    prefixes: vec![],
                    security_groups: vec!["sg-1".into()],
                },
                Eni {
                    id: "eni-1".into(),
                    mac: "02:00:00:00:00:02".into(),
                    device_index: 1,
                    subnet_id: "subnet-a".into(),
                    primary_ip: ip("172.31.3.173"),
                    secondary_ips: vec![ip("172.31.13.130"), ip("172.31.11.77")],
                    prefixes: vec!["172.31.8.0/28".parse().unwrap()],
                    security_groups: vec!["sg-1".into(), "sg-2".into()],
                },
            ],
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn gateway_is_network_plus_one() {
        let s = Subnet {
            id: "s".into(),
            cidr: "172.31.16.0/20".parse().unwrap(),
            az: "a".into(),
            name: String::new(),
        };
        assert_eq!(s.gateway(), ip("172.31.16.1"));
    }

    fn cloud_eni(
        id: &str,
        instance: Option<(&str, u32, &str)>,
        primary: &str,
    ) -> cloud::NetworkInterface {
        cloud::NetworkInterface {
            interface_type: "interface".into(),
            id: id.into(),
            mac: format!("02:00:00:00:00:{:02x}", id.len()),
            subnet_id: "subnet-a".into(),
            vpc_id: "vpc-1".into(),
            status: if instance.is_some() {
                "in-use"
            } else {
                "available"
            }
            .into(),
            description: String::new(),
            primary_ip: ip(primary),
            secondary_ips: vec![],
            prefixes: vec![],
            security_groups: vec![],
            tags: Default::default(),
            attachment: instance.map(|(i, d, status)| cloud::EniAttachment {
                attachment_id: format!("att-{id}"),
                instance_id: i.into(),
                device_index: d,
                status: status.into(),
                delete_on_termination: false,
            }),
        }
    }

    fn cloud_instance(id: &str, name: &str, role: &str) -> cloud::lab::Instance {
        cloud::lab::Instance {
            id: id.into(),
            instance_type: "m5.large".into(),
            state: "running".into(),
            availability_zone: "us-west-2a".into(),
            vpc_id: "vpc-1".into(),
            subnet_id: "subnet-a".into(),
            private_ip: ip("172.31.0.10"),
            security_groups: vec![],
            tags: [
                (TAG_NAME.to_string(), name.to_string()),
                (TAG_ROLE.to_string(), role.to_string()),
            ]
            .into(),
            network_interfaces: vec![],
        }
    }

    fn vpc() -> cloud::lab::Vpc {
        cloud::lab::Vpc {
            id: "vpc-1".into(),
            cidrs: vec!["172.31.0.0/16".parse().unwrap()],
            is_default: false,
            tags: Default::default(),
        }
    }

    #[test]
    fn assemble_groups_attached_enis_and_sorts() {
        let instances = [
            cloud_instance("i-2", "instance2", "node"),
            cloud_instance("i-1", "instance1", "host"),
        ];
        let enis = [
            cloud_eni("eni-b", Some(("i-1", 1, "attached")), "172.31.3.173"),
            cloud_eni("eni-a", Some(("i-1", 0, "attached")), "172.31.15.228"),
            cloud_eni("eni-c", Some(("i-2", 0, "attached")), "172.31.3.123"),
            cloud_eni("eni-free", None, "172.31.3.200"),
            cloud_eni("eni-leaving", Some(("i-2", 1, "detaching")), "172.31.3.201"),
        ];
        let w = World::assemble(&vpc(), "us-west-2", vec![], &instances, &enis).unwrap();
        assert_eq!(
            w.instances
                .iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>(),
            ["instance1", "instance2"]
        );
        let i1 = w.instance("instance1").unwrap();
        assert!(!i1.node);
        assert_eq!(
            i1.enis
                .iter()
                .map(|e| (e.id.as_str(), e.device_index))
                .collect::<Vec<_>>(),
            [("eni-a", 0), ("eni-b", 1)]
        );
        let i2 = w.instance("instance2").unwrap();
        assert!(i2.node);
        assert_eq!(
            i2.enis.len(),
            1,
            "detaching and unattached ENIs are not part of an instance"
        );
        assert_eq!(w.instance_by_id("i-2").unwrap().name, "instance2");
    }

    #[test]
    fn assemble_takes_the_prefixes_the_proxy_keeps_in_moto() {
        let instances = [cloud_instance("i-1", "instance1", "node")];
        let mut eni = cloud_eni("eni-a", Some(("i-1", 0, "attached")), "172.31.15.228");
        eni.tags.insert(
            fidelity::PREFIX_TAG.into(),
            "172.31.8.0/28,172.31.8.32/28".into(),
        );
        // What a real EC2 lists is kept too (no duplicates).
        eni.prefixes = vec!["172.31.8.0/28".parse().unwrap()];
        let w = World::assemble(&vpc(), "r", vec![], &instances, &[eni]).unwrap();
        assert_eq!(
            w.instances[0].enis[0].prefixes,
            [
                "172.31.8.0/28".parse::<Ipv4Net>().unwrap(),
                "172.31.8.32/28".parse().unwrap()
            ]
        );
    }

    #[test]
    fn assemble_rejects_inconsistent_state() {
        let instances = [cloud_instance("i-1", "instance1", "node")];
        let dup = [
            cloud_eni("eni-a", Some(("i-1", 0, "attached")), "172.31.15.228"),
            cloud_eni("eni-b", Some(("i-1", 0, "attached")), "172.31.3.173"),
        ];
        let err = World::assemble(&vpc(), "r", vec![], &instances, &dup)
            .unwrap_err()
            .to_string();
        assert!(err.contains("both at device index 0"), "{err}");

        let no_primary = [cloud_eni(
            "eni-b",
            Some(("i-1", 1, "attached")),
            "172.31.3.173",
        )];
        let err = World::assemble(&vpc(), "r", vec![], &instances, &no_primary)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no attached ENI at device index 0"), "{err}");

        let mut unnamed = cloud_instance("i-9", "x", "node");
        unnamed.tags.remove(TAG_NAME);
        let err = World::assemble(&vpc(), "r", vec![], &[unnamed], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("i-9") && err.contains("Name"), "{err}");
    }

    #[test]
    fn world_round_trips_through_json() {
        let w = sample();
        let back: World = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
        assert_eq!(back, w);
    }
}
