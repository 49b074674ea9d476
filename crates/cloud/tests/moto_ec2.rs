//! The EC2 side of `cloud` against moto_server: the whole provisioning flow the lab and the
//! agent rely on, through the real SDK.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use cloud::{Ec2, Filter, IpRequest, NewEni, Tags};
use ipnet::Ipv4Net;
use testkit::moto::Moto;

fn tags(pairs: &[(&str, &str)]) -> Tags {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_flow_against_moto() {
    let moto = Moto::for_test();
    let ec2 = Ec2::for_endpoint(&moto.endpoint(), "us-west-2");
    assert_eq!(ec2.region(), "us-west-2");

    // VPC overlapping moto's default VPC: always filter by id.
    let vpc = ec2
        .create_vpc(net("172.31.0.0/16"), &tags(&[("Name", "t")]))
        .await
        .unwrap();
    let vpcs = ec2
        .describe_vpcs(std::slice::from_ref(&vpc), &[])
        .await
        .unwrap();
    assert_eq!(vpcs.len(), 1);
    assert_eq!(vpcs[0].cidrs, [net("172.31.0.0/16")]);
    assert!(!vpcs[0].is_default);
    assert_eq!(vpcs[0].tags.get("Name").map(String::as_str), Some("t"));
    let by_tag = ec2
        .describe_vpcs(&[], &[Filter::tag("Name", "t")])
        .await
        .unwrap();
    assert_eq!(by_tag.iter().map(|v| &v.id).collect::<Vec<_>>(), [&vpc]);

    let sub_a = ec2
        .create_subnet(
            &vpc,
            net("172.31.0.0/20"),
            "us-west-2a",
            &tags(&[("Name", "a")]),
        )
        .await
        .unwrap();
    let sub_b = ec2
        .create_subnet(&vpc, net("172.31.16.0/20"), "us-west-2a", &Tags::new())
        .await
        .unwrap();
    let mut subnets = ec2.describe_subnets(&vpc).await.unwrap();
    subnets.sort_by_key(|s| s.cidr);
    assert_eq!(
        subnets.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        [sub_a.clone(), sub_b.clone()]
    );
    assert!(
        subnets
            .iter()
            .all(|s| s.vpc_id == vpc && s.availability_zone == "us-west-2a")
    );
    let free_a = subnets[0].available_ip_address_count;
    assert_eq!(free_a, 4096 - 5, "fresh /20 has 4091 usable addresses");

    let sg = ec2
        .create_security_group(&vpc, "t-sg", "test group", &Tags::new())
        .await
        .unwrap();
    assert!(sg.starts_with("sg-"), "{sg}");

    // Instance with an explicit primary IP.
    let inst = ec2
        .run_instance(
            "ami-12c6146b",
            &sub_a,
            "m5.large",
            Some(ip("172.31.15.228")),
            std::slice::from_ref(&sg),
            &tags(&[("Name", "instance1"), ("vpc-lab:role", "node")]),
        )
        .await
        .unwrap();
    assert_eq!(inst.private_ip, ip("172.31.15.228"));
    assert_eq!(inst.instance_type, "m5.large");
    let primary = inst.primary_eni().expect("primary ENI").clone();
    assert_eq!(primary.primary_ip, ip("172.31.15.228"));
    let described = ec2
        .describe_instances(std::slice::from_ref(&inst.id), &[])
        .await
        .unwrap();
    assert_eq!(described.len(), 1);
    assert_eq!(
        described[0].tags.get("vpc-lab:role").map(String::as_str),
        Some("node")
    );
    assert_eq!(described[0].availability_zone, "us-west-2a");
    assert_eq!(described[0].vpc_id, vpc);
    let in_vpc = ec2
        .describe_instances(&[], &[Filter::vpc(&vpc)])
        .await
        .unwrap();
    assert_eq!(in_vpc.len(), 1);

    let limits = ec2.describe_instance_types("m5.large").await.unwrap();
    assert_eq!((limits.max_enis, limits.ipv4_per_eni), (3, 10));
    let info = ec2.describe_instance_type_info("m5.large").await.unwrap();
    assert_eq!(info.limits, limits);
    assert!(info.is_nitro(), "{info:?}");
    assert_eq!(info.vcpus, Some(2), "{info:?}");
    let xen = ec2.describe_instance_type_info("t2.micro").await.unwrap();
    assert_eq!(xen.hypervisor.as_deref(), Some("xen"));
    assert!(!xen.is_nitro());
    let err = ec2
        .describe_instance_types("m5.nonsense")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("DescribeInstanceTypes"), "{err}");
    assert!(
        err.code().is_some(),
        "an AWS error code for an unknown type: {err}"
    );

    // Second ENI with an explicit primary, attached at device index 1.
    let eni = ec2
        .create_network_interface(&NewEni {
            subnet_id: sub_a.clone(),
            private_ip: Some(ip("172.31.3.173")),
            security_groups: vec![sg.clone()],
            description: format!("aws-K8S-{}", inst.id),
            tags: tags(&[("node.k8s.amazonaws.com/instance_id", &inst.id)]),
            secondary_ip_count: 0,
        })
        .await
        .unwrap();
    assert_eq!(eni.primary_ip, ip("172.31.3.173"));
    assert!(eni.secondary_ips.is_empty());
    assert_eq!(eni.security_groups, std::slice::from_ref(&sg));
    assert_eq!(eni.status, "available");
    assert!(eni.attachment.is_none());
    let att = ec2
        .attach_network_interface(&eni.id, &inst.id, 1)
        .await
        .unwrap();
    ec2.set_delete_on_termination(&eni.id, &att, true)
        .await
        .unwrap();

    let attached = ec2
        .describe_network_interfaces(&[], &[Filter::attached_to(&inst.id)])
        .await
        .unwrap();
    assert_eq!(attached.len(), 2);
    let e1 = attached
        .iter()
        .find(|e| e.id == eni.id)
        .expect("ENI listed as attached");
    let a = e1.attachment.as_ref().unwrap();
    assert_eq!(
        (
            a.device_index,
            a.instance_id.as_str(),
            a.attachment_id.as_str()
        ),
        (1, inst.id.as_str(), att.as_str())
    );
    assert_eq!(e1.description, format!("aws-K8S-{}", inst.id));
    let by_tag = ec2
        .describe_network_interfaces(
            &[],
            &[Filter::tag("node.k8s.amazonaws.com/instance_id", &inst.id)],
        )
        .await
        .unwrap();
    assert_eq!(by_tag.iter().map(|e| &e.id).collect::<Vec<_>>(), [&eni.id]);
    let after = ec2
        .describe_instances(std::slice::from_ref(&inst.id), &[])
        .await
        .unwrap();
    assert_eq!(
        after[0]
            .network_interfaces
            .iter()
            .map(|e| e.device_index)
            .collect::<Vec<_>>(),
        [0, 1]
    );

    // Explicit secondaries: exactly those come back.
    let got = ec2
        .assign_private_ip_addresses(
            &eni.id,
            &IpRequest::Addresses(vec![ip("172.31.13.130"), ip("172.31.11.77")]),
        )
        .await
        .unwrap();
    assert_eq!(
        got.iter().copied().collect::<BTreeSet<_>>(),
        [ip("172.31.13.130"), ip("172.31.11.77")].into()
    );
    // By count: only the NEW ones, although moto answers with every address of the ENI.
    let counted = ec2
        .assign_private_ip_addresses(&eni.id, &IpRequest::Count(3))
        .await
        .unwrap();
    assert_eq!(counted.len(), 3, "{counted:?}");
    let subnet_a = net("172.31.0.0/20");
    for a in &counted {
        assert!(subnet_a.contains(a), "{a} outside subnet A");
        assert!(
            ![ip("172.31.3.173"), ip("172.31.13.130"), ip("172.31.11.77")].contains(a),
            "{a} not new"
        );
    }
    let now = ec2.describe_network_interface(&eni.id).await.unwrap();
    assert_eq!(now.secondary_ips.len(), 5);
    let free_now = ec2
        .describe_subnets(&vpc)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.id == sub_a)
        .unwrap();
    // instance primary + ENI primary + 5 secondaries
    assert_eq!(free_now.available_ip_address_count, free_a - 7);

    ec2.unassign_private_ip_addresses(&eni.id, &counted)
        .await
        .unwrap();
    let now = ec2.describe_network_interface(&eni.id).await.unwrap();
    assert_eq!(
        now.secondary_ips.iter().copied().collect::<BTreeSet<_>>(),
        [ip("172.31.13.130"), ip("172.31.11.77")].into()
    );
    let err = ec2
        .unassign_private_ip_addresses(&eni.id, &[])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("UnassignPrivateIpAddresses"),
        "{err}"
    );

    // An ENI created with secondaries by count.
    let eni2 = ec2
        .create_network_interface(&NewEni {
            subnet_id: sub_b.clone(),
            security_groups: vec![sg.clone()],
            description: "counted".into(),
            secondary_ip_count: 2,
            ..NewEni::default()
        })
        .await
        .unwrap();
    assert!(net("172.31.16.0/20").contains(&eni2.primary_ip));
    assert_eq!(eni2.secondary_ips.len(), 2);

    // Detach and delete; a deleted ENI is NotFound, and the error names the call and code.
    ec2.detach_network_interface(&att, false).await.unwrap();
    let detached = ec2.describe_network_interface(&eni.id).await.unwrap();
    assert_eq!(detached.status, "available");
    assert!(
        detached
            .attachment
            .as_ref()
            .is_none_or(|a| a.status == "detached"),
        "{detached:?}"
    );
    ec2.delete_network_interface(&eni.id).await.unwrap();
    let err = ec2.describe_network_interface(&eni.id).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(
        err.to_string().contains("DescribeNetworkInterfaces"),
        "{err}"
    );
    assert_eq!(err.code(), Some("InvalidNetworkInterfaceID.NotFound"));

    ec2.create_tags(std::slice::from_ref(&eni2.id), &tags(&[("k", "v")]))
        .await
        .unwrap();
    let tagged = ec2
        .describe_network_interfaces(&[], &[Filter::tag_key("k"), Filter::vpc(&vpc)])
        .await
        .unwrap();
    assert_eq!(tagged.iter().map(|e| &e.id).collect::<Vec<_>>(), [&eni2.id]);

    // Every attempt was counted under its API name.
    let stats = ec2.api_stats();
    for api in [
        "CreateNetworkInterface",
        "AttachNetworkInterface",
        "AssignPrivateIpAddresses",
        "CreateTags",
    ] {
        let c = stats
            .get(api)
            .unwrap_or_else(|| panic!("{api} not counted: {stats:?}"));
        assert!(c.ok >= 1 && c.attempts >= c.ok, "{api}: {c:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_failure_names_the_call() {
    // Nothing listens on this loopback port (bound then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ec2 = Ec2::for_endpoint(&format!("http://127.0.0.1:{port}"), "us-west-2");
    let err = ec2.describe_subnets("vpc-1").await.unwrap_err();
    assert!(
        err.to_string().starts_with("EC2 DescribeSubnets failed"),
        "{err}"
    );
    assert_eq!(err.code(), None);
    // A connection failure is transient: retried up to the limit, every attempt counted.
    let c = ec2.api_stats()["DescribeSubnets"];
    assert_eq!(
        (c.attempts, c.failed),
        (
            u64::from(cloud::MAX_ATTEMPTS),
            u64::from(cloud::MAX_ATTEMPTS)
        )
    );
}
