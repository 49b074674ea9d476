//! Provisions the seed's world in EC2 (moto) through the real SDK, as the seed did with the
//! aws CLI (issue 2 §2). Everything the lab builds afterwards is derived from this EC2 state.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail, ensure};
use cloud::{Ec2, Filter, IpRequest, NewEni, Tags};
use ipnet::Ipv4Net;

use crate::world::{ROLE_NODE, TAG_NAME, TAG_ROLE};

/// `Name` tag of the lab's VPC.
pub const VPC_NAME: &str = "vpc-lab";
pub const VPC_CIDR: Ipv4Net = net(172, 31, 0, 0, 16);
pub const SUBNET_A: Ipv4Net = net(172, 31, 0, 0, 20);
pub const SUBNET_B: Ipv4Net = net(172, 31, 16, 0, 20);
/// Any image id works with moto; this one is in its bundled AMI list.
pub const IMAGE_ID: &str = "ami-12c6146b";
pub const INSTANCE_TYPE: &str = "m5.large";
pub const ROLE_HOST: &str = "host";

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
    let az = format!("{}a", ec2.region());

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
            "vpc-lab",
            "vpc-lab instances",
            &tags(&[(TAG_NAME, "vpc-lab")]),
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
    Ok(vpc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::World;

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
        assert_eq!(w.vpc_cidrs, ["172.31.0.0/16".parse::<Ipv4Net>().unwrap()]);
        let cidrs: Vec<String> = w.subnets.iter().map(|s| s.cidr.to_string()).collect();
        assert_eq!(
            cidrs,
            ["172.31.0.0/20", "172.31.16.0/20"],
            "moto's default VPC must not leak in"
        );
        assert_eq!(w.subnets[0].gateway(), Ipv4Addr::new(172, 31, 0, 1));
        assert!(w.subnets.iter().all(|s| s.az == "us-west-2a"));
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
                .all(|e| e.subnet_id == w.subnets[0].id && e.security_groups.len() == 1)
        );

        let i2 = w.instance("instance2").unwrap();
        assert!(i2.node);
        assert_eq!(i2.enis.len(), 1);
        assert_eq!(i2.enis[0].primary_ip, a("172.31.3.123"));
        assert_eq!(i2.enis[0].secondary_ips.len(), 3);

        let host = w.instance("vpc-host").unwrap();
        assert!(!host.node);
        assert_eq!(host.enis[0].primary_ip, a("172.31.16.10"));
        assert_eq!(host.enis[0].subnet_id, w.subnets[1].id);
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
