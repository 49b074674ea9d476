//! The lab's side of custom networking and of the agent's Kubernetes API, checked from outside
//! the agent: every `up` gives the VPC the secondary CIDR 100.64.0.0/16 with a pod subnet in
//! the instances' zone, one in another zone and the pods' own security group (in moto and in
//! world.json); the lab's API serves the Nodes (with the zone label) and the ENIConfigs to a
//! real client (kube 5 through the root namespace's kubeconfig) and to the instances at
//! 127.0.0.1:6443, and the agents get KUBECONFIG and MY_NODE_NAME; `pod add|del` write and
//! delete the Pod as a kubelet would; `vpc-lab kube` changes nodes and ENIConfigs; `kube stop`
//! makes the API unreachable and `kube start` brings it back with the same objects; and the
//! fabric delivers the addresses of an ENI in the pod subnet (made through the lab's EC2 proxy
//! with the pods' security group, attached to instance1) to instance2 and the VPC host, with
//! IMDS describing it with its subnet's CIDR.
//! Needs root: ignored without it (`make test` runs it as root with --include-ignored).

mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use lab_aws::seed;
use lab_aws::world::World;
use lab_kube::EniConfig;

/// A kube client through the lab's root-namespace kubeconfig.
async fn client() -> kube::Client {
    let kc = Kubeconfig::read_from(lab::paths::kubeconfig_host()).expect("the lab's kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("a client configuration");
    kube::Client::try_from(config).expect("a client")
}

fn label<'a>(n: &'a Node, k: &str) -> Option<&'a str> {
    n.metadata.labels.as_ref()?.get(k).map(String::as_str)
}

/// GET of an API path from inside an instance (what its agent reaches); the HTTP code.
fn http_code_in(instance: &str, path: &str) -> String {
    let out = lab_quiet(&[
        "exec",
        instance,
        "--",
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "2",
        &format!("http://127.0.0.1:6443{path}"),
    ]);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One IMDS leaf of `instance`.
fn imds(instance: &str, path: &str) -> String {
    let out = sh(
        instance,
        &format!(
            "t=$(curl -sf -X PUT -H 'x-aws-ec2-metadata-token-ttl-seconds: 60' http://127.0.0.1:1338/latest/api/token) && \
             curl -sf -H \"x-aws-ec2-metadata-token: $t\" http://127.0.0.1:1338/latest/meta-data/{path}"
        ),
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
#[ignore = "root: brings up the lab (network namespaces)"]
fn the_labs_kubernetes_api_and_pod_network() {
    require_lab();
    let _serial = serial();
    let _down = Down;
    let t0 = Instant::now();
    lab_ok(&["up"]);
    eprintln!("up: {:?}", t0.elapsed());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();

    // ---- the world: the secondary CIDR, the pod subnets, the pods' group, in moto ----------
    let state = lab::store::LabState::load().expect("the lab's state");
    let moto = state.ec2();
    let vpc = rt
        .block_on(moto.describe_vpcs(std::slice::from_ref(&state.vpc_id), &[]))
        .expect("DescribeVpcs");
    assert_eq!(vpc[0].cidrs, [seed::VPC_CIDR, seed::POD_CIDR]);
    let subnets = rt
        .block_on(moto.describe_subnets(&state.vpc_id))
        .expect("DescribeSubnets");
    let in_moto = |cidr: ipnet::Ipv4Net| {
        subnets
            .iter()
            .find(|s| s.cidr == cidr)
            .unwrap_or_else(|| panic!("no subnet {cidr} in moto: {subnets:?}"))
    };
    let pod_subnet = in_moto(seed::POD_SUBNET);
    let far_subnet = in_moto(seed::POD_SUBNET_OTHER_ZONE);
    assert_eq!(pod_subnet.availability_zone, "us-west-2a");
    assert_eq!(far_subnet.availability_zone, "us-west-2b");
    let groups = rt
        .block_on(moto.describe_security_groups(&[], &[cloud::Filter::vpc(state.vpc_id.clone())]))
        .expect("DescribeSecurityGroups");
    let pod_sg = groups
        .iter()
        .find(|g| g.name == seed::POD_SG_NAME)
        .unwrap_or_else(|| panic!("no group {} in moto: {groups:?}", seed::POD_SG_NAME))
        .id
        .clone();
    // world.json records the same.
    let world: World = serde_json::from_value(world()).expect("world.json is a World");
    let pods = seed::pod_network(&world).expect("world.json has the pod network");
    assert_eq!(
        (pods.subnet.id.as_str(), pods.other_zone_subnet.id.as_str()),
        (pod_subnet.id.as_str(), far_subnet.id.as_str())
    );
    assert_eq!(pods.security_group, pod_sg);

    // ---- the API, read by a real client ---------------------------------------------------
    let status = lab::kube::status().expect("vpc-lab kube status");
    assert!(status.serving, "{status:?}");
    let c = rt.block_on(client());
    let nodes: Api<Node> = Api::all(c.clone());
    let list = rt.block_on(nodes.list(&Default::default())).expect("nodes");
    let names: Vec<&str> = list
        .items
        .iter()
        .filter_map(|n| n.metadata.name.as_deref())
        .collect();
    assert_eq!(names, ["instance1", "instance2"]);
    let i1 = world.instance("instance1").unwrap();
    for n in &list.items {
        assert_eq!(label(n, "topology.kubernetes.io/zone"), Some("us-west-2a"));
        assert_eq!(
            label(n, "node.kubernetes.io/instance-type"),
            Some("m5.large")
        );
        let cap = n.status.as_ref().and_then(|s| s.capacity.as_ref()).unwrap();
        assert_eq!(cap["pods"].0, "110");
    }
    assert_eq!(
        list.items[0].spec.as_ref().unwrap().provider_id.as_deref(),
        Some(format!("aws:///us-west-2a/{}", i1.id).as_str())
    );
    let configs: Api<EniConfig> = Api::all(c.clone());
    let zone = rt
        .block_on(configs.get("us-west-2a"))
        .expect("the ENIConfig named after the zone");
    let spec = zone.spec.clone().unwrap();
    assert_eq!(spec.subnet, pod_subnet.id);
    assert_eq!(spec.security_groups, Some(vec![pod_sg.clone()]));
    let other = rt
        .block_on(configs.get(seed::OTHER_ZONE_ENICONFIG))
        .expect("the other zone's ENIConfig");
    assert_eq!(other.spec.unwrap().subnet, far_subnet.id);
    // The agents' view: the API inside the instance, and their environment.
    assert_eq!(http_code_in("instance1", "/api/v1/nodes/instance1"), "200");
    let pid = std::fs::read_to_string(lab::paths::agent_pid("instance1")).unwrap();
    let environ = std::fs::read(format!("/proc/{}/environ", pid.trim())).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    for want in [
        "KUBECONFIG=/run/vpc-lab/kube/kubeconfig",
        "MY_NODE_NAME=instance1",
    ] {
        assert!(
            environ.split('\0').any(|v| v == want),
            "{want} not in the agent's environment"
        );
    }

    // ---- pods as a kubelet would hold them --------------------------------------------------
    let (ip, _) = pod_add_retry("instance1", "default/kube-a", Duration::from_secs(20));
    let pods_api: Api<Pod> = Api::namespaced(c.clone(), "default");
    let p = rt.block_on(pods_api.get("kube-a")).expect("the Pod");
    assert_eq!(
        p.spec.as_ref().unwrap().node_name.as_deref(),
        Some("instance1")
    );
    let st = p.status.unwrap();
    assert_eq!(st.phase.as_deref(), Some("Running"));
    assert_eq!(st.pod_ip, Some(ip.to_string()));
    lab_ok(&["pod", "del", "instance1", "default/kube-a"]);
    let gone = rt.block_on(pods_api.get_opt("kube-a")).expect("GET");
    assert!(gone.is_none(), "the Pod is deleted after DEL: {gone:?}");

    // ---- vpc-lab kube changes nodes and ENIConfigs -----------------------------------------
    lab_ok(&[
        "kube",
        "label",
        "instance2",
        "k8s.amazonaws.com/eniConfig=us-west-2a",
    ]);
    lab_ok(&[
        "kube",
        "unlabel",
        "instance2",
        "topology.kubernetes.io/zone",
    ]);
    lab_ok(&["kube", "capacity", "instance2", "29"]);
    lab_ok(&["kube", "annotate", "instance2", "example.com/note=a b"]);
    let n2 = rt.block_on(nodes.get("instance2")).unwrap();
    assert_eq!(
        label(&n2, "k8s.amazonaws.com/eniConfig"),
        Some("us-west-2a")
    );
    assert_eq!(label(&n2, "topology.kubernetes.io/zone"), None);
    let st = n2.status.unwrap();
    assert_eq!(st.capacity.unwrap()["pods"].0, "29");
    assert_eq!(st.allocatable.unwrap()["pods"].0, "29");
    assert_eq!(n2.metadata.annotations.unwrap()["example.com/note"], "a b");
    assert!(
        !lab(&["kube", "label", "instance2", "bad key=x"])
            .status
            .success()
    );
    assert!(
        !lab(&["kube", "label", "nosuchnode", "a=b"])
            .status
            .success()
    );
    lab_ok(&[
        "kube",
        "eniconfig",
        "custom",
        &pod_subnet.id,
        &format!("{pod_sg},sg-0example"),
    ]);
    let custom = rt.block_on(configs.get("custom")).unwrap();
    assert_eq!(
        custom.spec.unwrap().security_groups,
        Some(vec![pod_sg.clone(), "sg-0example".into()])
    );
    lab_ok(&["kube", "eniconfig-delete", "custom"]);
    assert!(rt.block_on(configs.get_opt("custom")).unwrap().is_none());
    assert!(
        !lab(&["kube", "eniconfig-delete", "custom"])
            .status
            .success()
    );

    // ---- the API server down and back ------------------------------------------------------
    let before = rt.block_on(nodes.get("instance1")).unwrap();
    lab_ok(&["kube", "stop"]);
    assert!(!lab::kube::status().unwrap().serving);
    assert!(
        rt.block_on(nodes.list(&Default::default())).is_err(),
        "the API answers while stopped"
    );
    assert_eq!(http_code_in("instance1", "/api/v1/nodes"), "000");
    lab_ok(&["kube", "start"]);
    let after = lab::kube::status().unwrap();
    assert!(after.serving);
    assert_eq!(after.host_url, status.host_url, "the same address");
    let back = rt.block_on(nodes.get("instance1")).expect("served again");
    assert_eq!(back.metadata.uid, before.metadata.uid);
    assert_eq!(
        back.metadata.resource_version,
        before.metadata.resource_version
    );
    assert_eq!(http_code_in("instance1", "/api/v1/nodes/instance1"), "200");

    // ---- the fabric delivers the pod subnet's addresses ------------------------------------
    // instance1's agent would take the new ENI: stop it, and wire the ENI by hand.
    lab_ok(&["agent", "stop", "instance1"]);
    let ec2 = proxy_ec2(&rt, &state, &world);
    let eni = rt
        .block_on(ec2.create_network_interface(&cloud::NewEni {
            subnet_id: pod_subnet.id.clone(),
            security_groups: vec![pod_sg.clone()],
            description: "kube_lab pod-subnet ENI".into(),
            secondary_ip_count: 1,
            ..Default::default()
        }))
        .expect("an ENI in the pod subnet");
    let [secondary] = eni.secondary_ips[..] else {
        panic!("one secondary address expected: {eni:?}")
    };
    for a in [eni.primary_ip, secondary] {
        assert!(seed::POD_SUBNET.contains(&a), "{a}");
    }
    rt.block_on(ec2.attach_network_interface(&eni.id, &i1.id, 2))
        .expect("attached to instance1");
    // The other zone's subnet does not attach (as on EC2).
    let far = rt
        .block_on(ec2.create_network_interface(&cloud::NewEni {
            subnet_id: far_subnet.id.clone(),
            security_groups: vec![pod_sg.clone()],
            ..Default::default()
        }))
        .unwrap();
    let err = rt
        .block_on(ec2.attach_network_interface(
            &far.id,
            &world.instance("instance2").unwrap().id,
            1,
        ))
        .unwrap_err();
    assert_eq!(err.code(), Some("InvalidParameterCombination"), "{err}");

    wait_for(
        Duration::from_secs(10),
        "instance1's eth2 (the pod-subnet ENI) to appear",
        || {
            let out = lab_quiet(&[
                "exec",
                "instance1",
                "--",
                "ip",
                "-o",
                "link",
                "show",
                "eth2",
            ]);
            out.status.success().then_some(())
        },
        || format!("{:?}", world_eni_ids("instance1")),
    );
    let mac = eni.mac.clone();
    assert_eq!(
        imds(
            "instance1",
            &format!("network/interfaces/macs/{mac}/subnet-ipv4-cidr-block")
        ),
        "100.64.0.0/19"
    );
    assert_eq!(
        imds(
            "instance1",
            &format!("network/interfaces/macs/{mac}/vpc-ipv4-cidr-blocks")
        ),
        "172.31.0.0/16\n100.64.0.0/16"
    );
    assert_eq!(
        imds(
            "instance1",
            &format!("network/interfaces/macs/{mac}/security-group-ids")
        ),
        pod_sg
    );
    // As an agent would: the ENI's addresses on eth2, replies from them out of eth2.
    let wire = format!(
        "ip addr add {p}/19 dev eth2 && ip addr add {s}/32 dev eth2 && ip link set eth2 up && \
         sysctl -qw net.ipv4.conf.eth2.rp_filter=2 && \
         ip route add default via 100.64.0.1 dev eth2 table 77 && \
         ip rule add from 100.64.0.0/19 lookup 77 pref 77",
        p = eni.primary_ip,
        s = secondary
    );
    let out = sh("instance1", &wire);
    assert!(out.status.success(), "wiring eth2 by hand");
    let both = [eni.primary_ip, secondary];
    assert_eq!(unreachable("instance2", &both), Vec::<Ipv4Addr>::new());
    assert_eq!(unreachable("vpc-host", &both), Vec::<Ipv4Addr>::new());
    // An address of the subnet that no ENI holds is not delivered.
    let stray = (1..)
        .map(|k| Ipv4Addr::from(u32::from(secondary) ^ (k << 8)))
        .find(|a| !both.contains(a))
        .unwrap();
    assert_eq!(unreachable("instance2", &[stray]), [stray]);

    // `down` stops the API with the daemon and leaves nothing behind.
    let pids = lab_pids();
    let host = after.host_addr().expect("the API's root-namespace address");
    down_and_assert_clean(&pids);
    assert!(
        std::net::TcpStream::connect_timeout(&host, Duration::from_secs(1)).is_err(),
        "the API still answers on {host} after down"
    );
    eprintln!("total: {:?}", t0.elapsed());
}

fn world_eni_ids(instance: &str) -> Vec<String> {
    let w: World = serde_json::from_value(world()).expect("world.json is a World");
    w.instance(instance)
        .map(|i| i.enis.iter().map(|e| e.id.clone()).collect())
        .unwrap_or_default()
}
