//! Provisions the seed's world in EC2 (moto) through the real SDK, as the seed did with the
//! aws CLI (issue 2 §2). Everything the lab builds afterwards is derived from this EC2 state.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail, ensure};
use cloud::{Ec2, Filter, IpRequest, NewEni, Tags};
use ipnet::Ipv4Net;

use crate::world::{ROLE_NODE, Subnet, TAG_NAME, TAG_ROLE, World};

/// `Name` tag of the lab's VPC.
pub const VPC_NAME: &str = "vpc-lab";
pub const VPC_CIDR: Ipv4Net = net(172, 31, 0, 0, 16);
pub const SUBNET_A: Ipv4Net = net(172, 31, 0, 0, 20);
pub const SUBNET_B: Ipv4Net = net(172, 31, 16, 0, 20);
/// Any image id works with moto; this one is in its bundled AMI list.
pub const IMAGE_ID: &str = "ami-12c6146b";
pub const INSTANCE_TYPE: &str = "m5.large";
pub const ROLE_HOST: &str = "host";

/// Custom networking's secondary VPC CIDR (EKS's usual choice, RFC 6598 shared space),
/// associated with the lab's VPC on every `up`.
pub const POD_CIDR: Ipv4Net = net(100, 64, 0, 0, 16);
/// The pod subnet in the instances' zone (`<region>a`): the `ENIConfig` named after that zone
/// names it.
pub const POD_SUBNET: Ipv4Net = net(100, 64, 0, 0, 19);
/// A pod subnet in another zone (`<region>b`), for the `ENIConfig` an agent must refuse.
pub const POD_SUBNET_OTHER_ZONE: Ipv4Net = net(100, 64, 32, 0, 19);
/// `Name` tags of the two pod subnets.
pub const POD_SUBNET_NAME: &str = "vpc-lab-pods-a";
pub const POD_SUBNET_OTHER_ZONE_NAME: &str = "vpc-lab-pods-b";
/// The pods' own security group (its `GroupName` and `Name` tag).
pub const POD_SG_NAME: &str = "vpc-lab-pods";
/// The instances' security group.
pub const SG_NAME: &str = "vpc-lab";
/// Name of the `ENIConfig` that names the pod subnet of the other zone.
pub const OTHER_ZONE_ENICONFIG: &str = "other-zone";

/// The instances' availability zone in `region` (`us-west-2a`).
pub fn zone(region: &str) -> String {
    format!("{region}a")
}

/// The other availability zone of the lab (`us-west-2b`): only a pod subnet lives there.
pub fn other_zone(region: &str) -> String {
    format!("{region}b")
}

/// Custom networking's part of the lab's world: the secondary CIDR, the two pod subnets and
/// the pods' security group, as found in a [`World`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetwork {
    pub cidr: Ipv4Net,
    /// In the instances' zone.
    pub subnet: Subnet,
    /// In [`other_zone`].
    pub other_zone_subnet: Subnet,
    /// The id of the security group [`POD_SG_NAME`].
    pub security_group: String,
}

/// Finds the pod network [`provision_seed`] made in `world` (by CIDR and group name); an error
/// names what is missing.
pub fn pod_network(world: &World) -> Result<PodNetwork> {
    if !world.vpc_cidrs.contains(&POD_CIDR) {
        bail!(
            "VPC {} has no CIDR {POD_CIDR} (its CIDRs: {:?})",
            world.vpc_id,
            world.vpc_cidrs
        );
    }
    let subnet = |cidr: Ipv4Net| {
        world
            .subnet_by_cidr(cidr)
            .cloned()
            .with_context(|| format!("VPC {} has no subnet {cidr}", world.vpc_id))
    };
    let in_zone = subnet(POD_SUBNET)?;
    let other_zone_subnet = subnet(POD_SUBNET_OTHER_ZONE)?;
    let sg = world
        .security_group_named(POD_SG_NAME)
        .with_context(|| {
            format!(
                "VPC {} has no security group named {POD_SG_NAME}",
                world.vpc_id
            )
        })?
        .id
        .clone();
    Ok(PodNetwork {
        cidr: POD_CIDR,
        subnet: in_zone,
        other_zone_subnet,
        security_group: sg,
    })
}

const fn net(a: u8, b: u8, c: u8, d: u8, len: u8) -> Ipv4Net {
    match Ipv4Net::new(Ipv4Addr::new(a, b, c, d), len) {
        Ok(n) => n,
        Err(_) => panic!("bad prefix length"),
    }
}

const fn ip(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

/// One ENI beyond the primary.
struct ExtraEni {
    device_index: u32,
    primary: Ipv4Addr,
    secondaries: &'static [Ipv4Addr],
}

/// One instance of the seed.
struct SeedInstance {
    name: &'static str,
    role: &'static str,
    in_subnet_b: bool,
    primary: Ipv4Addr,
    /// Secondary IPs of the primary ENI.
    secondaries: &'static [Ipv4Addr],
    extra_enis: &'static [ExtraEni],
}

/// The seed's experiment (issue 2 §2).
const SEED: &[SeedInstance] = &[
    SeedInstance {
        name: "instance1",
        role: ROLE_NODE,
        in_subnet_b: false,
        primary: ip(172, 31, 15, 228),
        secondaries: &[ip(172, 31, 5, 50)],
        extra_enis: &[ExtraEni {
            device_index: 1,
            primary: ip(172, 31, 3, 173),
            secondaries: &[ip(172, 31, 13, 130), ip(172, 31, 11, 77)],
        }],
    },
    SeedInstance {
        name: "instance2",
        role: ROLE_NODE,
        in_subnet_b: false,
        primary: ip(172, 31, 3, 123),
        secondaries: &[
            ip(172, 31, 3, 124),
            ip(172, 31, 3, 125),
            ip(172, 31, 3, 126),
        ],
        extra_enis: &[],
    },
    SeedInstance {
        name: "vpc-host",
        role: ROLE_HOST,
        in_subnet_b: true,
        primary: ip(172, 31, 16, 10),
        secondaries: &[],
        extra_enis: &[],
    },
];

fn tags(pairs: &[(&str, &str)]) -> Tags {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The id of the lab's VPC (tag `Name=vpc-lab`) if it exists.
pub async fn find_lab_vpc(ec2: &Ec2) -> Result<Option<String>> {
    let vpcs = ec2
        .describe_vpcs(&[], &[Filter::tag(TAG_NAME, VPC_NAME)])
        .await
        .context("looking for the lab's VPC")?;
    match vpcs.as_slice() {
        [] => Ok(None),
        [v] => Ok(Some(v.id.clone())),
        many => bail!(
            "{} VPCs are tagged {TAG_NAME}={VPC_NAME}: {:?}",
            many.len(),
            many.iter().map(|v| &v.id).collect::<Vec<_>>()
        ),
    }
}

/// Assigns exactly `ips` to `eni` and checks EC2 gave exactly those.
async fn assign_exact(ec2: &Ec2, eni: &str, ips: &[Ipv4Addr]) -> Result<()> {
    if ips.is_empty() {
        return Ok(());
    }
    let mut got = ec2
        .assign_private_ip_addresses(eni, &IpRequest::Addresses(ips.to_vec()))
        .await
        .with_context(|| format!("assigning {ips:?} to {eni}"))?;
    got.sort();
    let mut want = ips.to_vec();
    want.sort();
    ensure!(
        got == want,
        "EC2 assigned {got:?} to {eni}, asked for {want:?}"
    );
    Ok(())
}

/// Creates the seed's VPC, subnets, security group, instances, ENIs and secondary IPs.
/// Fails if the lab's VPC already exists (the lab starts from an empty EC2).
/// Node instances (role `node`) get `node_type`; the VPC host is always [`INSTANCE_TYPE`].
/// With `fresh_nodes`, node instances start as a new EC2 instance does: the primary ENI and
/// its primary address only (no secondary IPs, no second ENI).
pub async fn provision_seed(ec2: &Ec2, node_type: &str, fresh_nodes: bool) -> Result<String> {
    if let Some(vpc) = find_lab_vpc(ec2).await? {
        bail!("the lab's VPC already exists in EC2 ({vpc}); start from a fresh EC2 (moto)");
    }
    let az = zone(ec2.region());

    let vpc = ec2
        .create_vpc(VPC_CIDR, &tags(&[(TAG_NAME, VPC_NAME)]))
        .await
        .context("creating the lab's VPC")?;
    let subnet_a = ec2
        .create_subnet(&vpc, SUBNET_A, &az, &tags(&[(TAG_NAME, "vpc-lab-a")]))
        .await
        .context("creating subnet A")?;
    let subnet_b = ec2
        .create_subnet(&vpc, SUBNET_B, &az, &tags(&[(TAG_NAME, "vpc-lab-b")]))
        .await
        .context("creating subnet B")?;
    let sg = ec2
        .create_security_group(
            &vpc,
            SG_NAME,
            "vpc-lab instances",
            &tags(&[(TAG_NAME, SG_NAME)]),
        )
        .await
        .context("creating the security group")?;
    let sgs = [sg];

    for s in SEED {
        let subnet = if s.in_subnet_b { &subnet_b } else { &subnet_a };
        let inst = ec2
            .run_instance(
                IMAGE_ID,
                subnet,
                if s.role == ROLE_NODE {
                    node_type
                } else {
                    INSTANCE_TYPE
                },
                Some(s.primary),
                &sgs,
                &tags(&[(TAG_NAME, s.name), (TAG_ROLE, s.role)]),
            )
            .await
            .with_context(|| format!("running {}", s.name))?;
        ensure!(
            inst.private_ip == s.primary,
            "{} ({}) got primary IP {}, asked for {}",
            s.name,
            inst.id,
            inst.private_ip,
            s.primary
        );
        let primary_eni = inst
            .primary_eni()
            .with_context(|| format!("{} ({}) has no ENI at device index 0", s.name, inst.id))?
            .id
            .clone();
        let fresh = fresh_nodes && s.role == ROLE_NODE;
        if !fresh {
            assign_exact(ec2, &primary_eni, s.secondaries).await?;
        }

        for x in s.extra_enis.iter().filter(|_| !fresh) {
            let eni = ec2
                .create_network_interface(&NewEni {
                    subnet_id: subnet.clone(),
                    private_ip: Some(x.primary),
                    security_groups: sgs.to_vec(),
                    description: format!("vpc-lab {} eth{}", s.name, x.device_index),
                    tags: tags(&[(TAG_NAME, &format!("{}-eth{}", s.name, x.device_index))]),
                    secondary_ip_count: 0,
                })
                .await
                .with_context(|| {
                    format!(
                        "creating {}'s ENI for device index {}",
                        s.name, x.device_index
                    )
                })?;
            let attachment = ec2
                .attach_network_interface(&eni.id, &inst.id, x.device_index)
                .await
                .with_context(|| {
                    format!("attaching {} to {} at {}", eni.id, s.name, x.device_index)
                })?;
            ec2.set_delete_on_termination(&eni.id, &attachment, true)
                .await
                .with_context(|| format!("setting delete-on-termination on {}", eni.id))?;
            assign_exact(ec2, &eni.id, x.secondaries).await?;
        }
        tracing::info!(instance = s.name, id = %inst.id, ip = %s.primary, "provisioned");
    }
    provision_pod_network(ec2, &vpc).await?;
    Ok(vpc)
}

/// Custom networking's side of the VPC: the secondary CIDR [`POD_CIDR`], the pod subnets
/// [`POD_SUBNET`] (the instances' zone) and [`POD_SUBNET_OTHER_ZONE`], and the security group
/// [`POD_SG_NAME`]. Nothing uses them until an agent runs with custom networking.
async fn provision_pod_network(ec2: &Ec2, vpc: &str) -> Result<()> {
    ec2.associate_vpc_cidr_block(vpc, POD_CIDR)
        .await
        .with_context(|| format!("associating {POD_CIDR} with {vpc}"))?;
    for (cidr, az, name) in [
        (POD_SUBNET, zone(ec2.region()), POD_SUBNET_NAME),
        (
            POD_SUBNET_OTHER_ZONE,
            other_zone(ec2.region()),
            POD_SUBNET_OTHER_ZONE_NAME,
        ),
    ] {
        ec2.create_subnet(vpc, cidr, &az, &tags(&[(TAG_NAME, name)]))
            .await
            .with_context(|| format!("creating the pod subnet {cidr} in {az}"))?;
    }
    ec2.create_security_group(
        vpc,
        POD_SG_NAME,
        "vpc-lab pods (custom networking)",
        &tags(&[(TAG_NAME, POD_SG_NAME)]),
    )
    .await
    .context("creating the pods' security group")?;
    tracing::info!(%vpc, cidr = %POD_CIDR, "provisioned the pod network (custom networking)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pod_network_is_found_by_cidr_and_name_or_named_missing() {
        let mut w = crate::world::sample();
        let err = pod_network(&w).unwrap_err().to_string();
        assert!(
            err.contains("100.64.0.0/16") && err.contains("vpc-1"),
            "{err}"
        );
        w.vpc_cidrs.push(POD_CIDR);
        let err = pod_network(&w).unwrap_err().to_string();
        assert!(err.contains("no subnet 100.64.0.0/19"), "{err}");
        for (id, cidr, az) in [
            ("subnet-p", POD_SUBNET, "us-west-2a"),
            ("subnet-q", POD_SUBNET_OTHER_ZONE, "us-west-2b"),
        ] {
            w.subnets.push(Subnet {
                id: id.into(),
                cidr,
                az: az.into(),
                name: String::new(),
            });
        }
        let err = pod_network(&w).unwrap_err().to_string();
        assert!(
            err.contains("no security group named vpc-lab-pods"),
            "{err}"
        );
        w.security_groups.push(crate::world::SecurityGroup {
            id: "sg-p".into(),
            name: POD_SG_NAME.into(),
        });
        let p = pod_network(&w).unwrap();
        assert_eq!(
            (
                p.subnet.id.as_str(),
                p.other_zone_subnet.id.as_str(),
                p.security_group.as_str()
            ),
            ("subnet-p", "subnet-q", "sg-p")
        );
        assert_eq!(
            (zone("us-west-2"), other_zone("us-west-2")),
            ("us-west-2a".to_string(), "us-west-2b".to_string())
        );
        // Both pod subnets lie in the secondary CIDR and not in the primary one.
        for s in [POD_SUBNET, POD_SUBNET_OTHER_ZONE] {
            assert!(POD_CIDR.contains(&s) && !VPC_CIDR.contains(&s), "{s}");
        }
    }

    #[test]
    fn seed_addresses_lie_in_their_subnets_and_are_unique() {
        let mut seen = std::collections::BTreeSet::new();
        for s in SEED {
            let subnet = if s.in_subnet_b { SUBNET_B } else { SUBNET_A };
            let all =
                std::iter::once(s.primary)
                    .chain(s.secondaries.iter().copied())
                    .chain(s.extra_enis.iter().flat_map(|x| {
                        std::iter::once(x.primary).chain(x.secondaries.iter().copied())
                    }));
            for a in all {
                assert!(subnet.contains(&a), "{a} of {} outside {subnet}", s.name);
                assert!(
                    u32::from(a) > u32::from(subnet.network()) + 3,
                    "{a} is AWS-reserved"
                );
                assert!(seen.insert(a), "{a} used twice");
            }
        }
    }

    /// Provisions into a fresh moto and checks the world EC2 then describes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provision_seed_into_moto() {
        let moto = testkit::moto::Moto::for_test();
        let ec2 = Ec2::for_endpoint(&moto.endpoint(), "us-west-2");
        let vpc = provision_seed(&ec2, INSTANCE_TYPE, false).await.unwrap();
        assert_eq!(
            find_lab_vpc(&ec2).await.unwrap().as_deref(),
            Some(vpc.as_str())
        );
        let err = provision_seed(&ec2, INSTANCE_TYPE, false)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("already exists") && err.contains(&vpc),
            "{err}"
        );

        let w = World::load(&ec2, &vpc).await.unwrap();
        assert_eq!(w.vpc_id, vpc);
        assert_eq!(w.region, "us-west-2");
        assert_eq!(w.vpc_cidrs, [VPC_CIDR, POD_CIDR]);
        let cidrs: Vec<String> = w.subnets.iter().map(|s| s.cidr.to_string()).collect();
        assert_eq!(
            cidrs,
            [
                "100.64.0.0/19",
                "100.64.32.0/19",
                "172.31.0.0/20",
                "172.31.16.0/20"
            ],
            "moto's default VPC must not leak in"
        );
        let sub_a = w.subnet_by_cidr(SUBNET_A).unwrap().clone();
        let sub_b = w.subnet_by_cidr(SUBNET_B).unwrap().clone();
        assert_eq!(sub_a.gateway(), Ipv4Addr::new(172, 31, 0, 1));
        assert_eq!(
            (sub_a.name.as_str(), sub_b.name.as_str()),
            ("vpc-lab-a", "vpc-lab-b")
        );
        assert!(
            w.subnets
                .iter()
                .all(|s| (s.az == "us-west-2a") != (s.cidr == POD_SUBNET_OTHER_ZONE))
        );
        // Custom networking's part: the pod subnets and the pods' own security group.
        let pods = pod_network(&w).unwrap();
        assert_eq!(pods.subnet.cidr, POD_SUBNET);
        assert_eq!(pods.subnet.az, "us-west-2a");
        assert_eq!(pods.subnet.name, POD_SUBNET_NAME);
        assert_eq!(pods.subnet.gateway(), Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(pods.other_zone_subnet.az, "us-west-2b");
        let names: Vec<&str> = w.security_groups.iter().map(|g| g.name.as_str()).collect();
        assert!(
            names.contains(&SG_NAME) && names.contains(&POD_SG_NAME),
            "{names:?}"
        );
        let instances_sg = w.security_group_named(SG_NAME).unwrap().id.clone();
        assert_ne!(pods.security_group, instances_sg);
        assert!(pods.security_group.starts_with("sg-"), "{pods:?}");
        let names: Vec<&str> = w.instances.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["instance1", "instance2", "vpc-host"]);

        let a = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let i1 = w.instance("instance1").unwrap();
        assert!(i1.node);
        assert_eq!(i1.instance_type, "m5.large");
        assert_eq!(i1.az, "us-west-2a");
        assert_eq!(i1.enis.len(), 2);
        assert_eq!(
            (i1.enis[0].device_index, i1.enis[0].primary_ip),
            (0, a("172.31.15.228"))
        );
        assert_eq!(i1.enis[0].secondary_ips, [a("172.31.5.50")]);
        assert_eq!(
            (i1.enis[1].device_index, i1.enis[1].primary_ip),
            (1, a("172.31.3.173"))
        );
        let mut s1 = i1.enis[1].secondary_ips.clone();
        s1.sort();
        assert_eq!(s1, [a("172.31.11.77"), a("172.31.13.130")]);
        assert_ne!(i1.enis[0].mac, i1.enis[1].mac);
        assert!(
            i1.enis
                .iter()
                .all(|e| e.subnet_id == sub_a.id && e.security_groups == [instances_sg.clone()])
        );

        let i2 = w.instance("instance2").unwrap();
        assert!(i2.node);
        assert_eq!(i2.enis.len(), 1);
        assert_eq!(i2.enis[0].primary_ip, a("172.31.3.123"));
        assert_eq!(i2.enis[0].secondary_ips.len(), 3);

        let host = w.instance("vpc-host").unwrap();
        assert!(!host.node);
        assert_eq!(host.enis[0].primary_ip, a("172.31.16.10"));
        assert_eq!(host.enis[0].subnet_id, sub_b.id);
        assert!(host.enis[0].secondary_ips.is_empty());

        // EC2 is the source of truth: a change there shows up on the next load.
        let extra = ec2
            .assign_private_ip_addresses(&i2.enis[0].id, &IpRequest::Count(1))
            .await
            .unwrap();
        let w2 = World::load(&ec2, &vpc).await.unwrap();
        assert!(
            w2.instance("instance2").unwrap().enis[0]
                .secondary_ips
                .contains(&extra[0])
        );
        assert_ne!(w, w2);
    }
}
