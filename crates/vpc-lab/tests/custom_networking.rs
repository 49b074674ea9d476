//! Issue 13 on the lab: the agent and the Kubernetes API. instance1 runs with custom networking
//! (`AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=true`, `ENI_CONFIG_LABEL_DEF=topology.kubernetes.io/zone`:
//! the lab's ENIConfig named after the zone names the pod subnet in 100.64.0.0/16 and the pods'
//! security group) and `ANNOTATE_POD_IP=true`, through the lab's API server (crates/lab-kube in
//! the lab daemon). One lab, in phases: pods get 100.64.x addresses from an ENI in the pod
//! subnet with the ENIConfig's group, reach instance2, the VPC host and (SNATed) the internet
//! host, and the primary ENI carries none; the pod IP annotation; a missing ENIConfig and one in
//! another zone: refused ADDs with the reason and node events, no ENI in the wrong place; the
//! node's capacity caps the pods; the API server down mid-run and at the agent's start: pods
//! still served, the event sent once it is back. Needs root and the built binaries.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use lab_aws::{fidelity, seed};

const NODE: &str = "instance1";

fn events(reason: &str) -> Vec<String> {
    lab::kube::events(Some(NODE))
        .expect("the node's events")
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.message)
        .collect()
}

fn wait_event(reason: &str, timeout: Duration) -> String {
    wait_for(
        timeout,
        &format!("a {reason} event on {NODE}"),
        || events(reason).into_iter().next(),
        || {
            format!(
                "{:?}",
                lab::kube::events(Some(NODE))
                    .unwrap_or_default()
                    .iter()
                    .map(|e| e.reason.clone())
                    .collect::<Vec<_>>()
            )
        },
    )
}

/// ADDs `pod` until it is refused with a message containing `needle` (the pool is still
/// being emptied of what it had); returns that message.
fn refused_with(pod: &str, needle: &str) -> String {
    let t = Instant::now();
    loop {
        match pod_add_once(NODE, pod) {
            Add::Ok(ip) => panic!("{pod} got {ip}, expected a refusal saying {needle:?}"),
            Add::Failed(code, msg) if msg.contains(needle) => {
                assert_eq!(code, 11, "{msg}");
                return msg;
            }
            Add::Failed(_, msg) => assert!(
                t.elapsed() < Duration::from_secs(30),
                "{pod} refused, but not for {needle:?}: {msg}"
            ),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
#[ignore = "root: brings up the lab (network namespaces)"]
fn custom_networking_and_the_kubernetes_api() {
    require_lab();
    let _serial = serial();
    let _down = Down;
    let t0 = Instant::now();
    lab_ok(&[
        "up",
        "--provisioning=instance1",
        "--fresh-nodes",
        "--agent-env",
        "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG=true",
        "--agent-env",
        "ENI_CONFIG_LABEL_DEF=topology.kubernetes.io/zone",
        "--agent-env",
        "ANNOTATE_POD_IP=true",
        "--agent-env",
        "WARM_IP_TARGET=2",
        "--agent-env",
        "VPC_CNI_MIN_ENI_AGE=2",
        "--agent-env",
        "IP_COOLDOWN_PERIOD=1",
    ]);
    let world: lab_aws::world::World = serde_json::from_value(world()).expect("world.json");
    let net = seed::pod_network(&world).expect("the pod network");
    let ec2 = Ec2::new();
    let i1 = instance_id(NODE);

    // ---- pods in the pod subnet, from an ENI with the ENIConfig's group --------------------
    let mut pods: BTreeMap<String, Ipv4Addr> = BTreeMap::new();
    for n in 0..3 {
        let name = format!("cn/p{n}");
        let (ip, _) = pod_add_retry(NODE, &name, Duration::from_secs(60));
        assert!(
            net.subnet.cidr.contains(&ip),
            "{name} got {ip}, not in {}",
            net.subnet.cidr
        );
        pods.insert(name, ip);
    }
    let attached = ec2.attached(&i1);
    let primary = attached
        .iter()
        .find(|e| e.attachment.as_ref().is_some_and(|a| a.device_index == 0))
        .expect("the primary ENI");
    assert!(
        primary.secondary_ips.is_empty() && !pods.values().any(|ip| *ip == primary.primary_ip),
        "the primary ENI carries no pods: {primary:?}"
    );
    for e in attached.iter().filter(|e| e.id != primary.id) {
        assert_eq!(
            e.subnet_id, net.subnet.id,
            "ENI {} is in the pod subnet",
            e.id
        );
        assert_eq!(
            e.tags.get(fidelity::GROUPS_TAG).map(String::as_str),
            Some(net.security_group.as_str()),
            "ENI {} has exactly the ENIConfig's security group",
            e.id
        );
    }
    let ips: Vec<Ipv4Addr> = pods.values().copied().collect();
    assert_eq!(unreachable("instance2", &ips), Vec::<Ipv4Addr>::new());
    assert_eq!(unreachable("vpc-host", &ips), Vec::<Ipv4Addr>::new());
    let whoami = format!(
        "timeout 5 bash -c 'cat < /dev/tcp/{}/{}'",
        lab_net::fabric::INTERNET_HOST,
        lab::daemon::WHOAMI_PORT
    );
    for pod in pods.keys() {
        let out = sh(pod, &whoami);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            primary.primary_ip.to_string(),
            "{pod} reaches the internet host SNATed to the node's primary address"
        );
    }
    eprintln!(
        "custom networking pods up and reachable: {:?}",
        t0.elapsed()
    );

    // ---- the pod IP annotation --------------------------------------------------------------
    for (name, ip) in &pods {
        let (ns, n) = name.split_once('/').unwrap();
        let want = ip.to_string();
        wait_for(
            Duration::from_secs(15),
            &format!("{name}'s vpc.amazonaws.com/pod-ips annotation"),
            || {
                lab::kube::pod(ns, n)
                    .ok()
                    .flatten()
                    .and_then(|p| p.metadata.annotations)
                    .and_then(|a| a.get("vpc.amazonaws.com/pod-ips").cloned())
                    .filter(|v| *v == want)
            },
            || {
                format!(
                    "{:?}",
                    lab::kube::pod(ns, n)
                        .ok()
                        .flatten()
                        .map(|p| p.metadata.annotations)
                )
            },
        );
    }

    // ---- a missing ENIConfig, then one in another zone: refused, told, no ENI --------------
    let enis_before = ec2.attached(&i1).len();
    lab::kube::annotate(NODE, "k8s.amazonaws.com/eniConfig", "missing").unwrap();
    // Fill what the pool has until it needs another ENI.
    let mut n = pods.len();
    let msg = loop {
        let name = format!("cn/p{n}");
        match pod_add_once(NODE, &name) {
            Add::Ok(ip) => {
                pods.insert(name, ip);
                n += 1;
                assert!(n < 40, "the pool never needed another ENI");
            }
            Add::Failed(code, msg) if msg.contains("ENIConfig") => {
                assert_eq!(code, 11, "{msg}");
                break msg;
            }
            Add::Failed(..) => std::thread::sleep(Duration::from_millis(300)),
        }
    };
    assert!(msg.contains("\"missing\", and there is none"), "{msg}");
    assert!(wait_event("ENIConfigMissing", Duration::from_secs(15)).contains("missing"));
    lab::kube::annotate(NODE, "k8s.amazonaws.com/eniConfig", "other-zone").unwrap();
    let msg = refused_with(&format!("cn/p{n}"), "zone");
    assert!(
        msg.contains("in zone us-west-2b, but this node is in us-west-2a"),
        "{msg}"
    );
    wait_event("ENIConfigWrongZone", Duration::from_secs(15));
    assert_eq!(
        ec2.attached(&i1).len(),
        enis_before,
        "no ENI in the wrong place"
    );
    lab::kube::unannotate(NODE, "k8s.amazonaws.com/eniConfig").unwrap();
    let (ip, _) = pod_add_retry(NODE, &format!("cn/p{n}"), Duration::from_secs(60));
    assert!(net.subnet.cidr.contains(&ip));
    pods.insert(format!("cn/p{n}"), ip);
    eprintln!("ENIConfig refusals: {:?}", t0.elapsed());

    // ---- the node's capacity caps the pods ----------------------------------------------------
    lab::kube::capacity(NODE, pods.len() as u32).unwrap();
    let msg = refused_with("cn/over", "capacity.pods");
    assert!(
        msg.contains(&format!("the node's max pods is {}", pods.len())),
        "{msg}"
    );
    lab::kube::capacity(NODE, 110).unwrap();
    let (ip, _) = pod_add_retry(NODE, "cn/over", Duration::from_secs(30));
    pods.insert("cn/over".into(), ip);

    // ---- the API server down mid-run: pods served, the event goes once it is back ----------
    lab_ok(&["kube", "stop"]);
    pod_del_retry(NODE, "cn/over", Duration::from_secs(30));
    pods.remove("cn/over");
    // custom networking on an m5.large: 2 ENIs × 9 addresses for pods; fill them.
    let mut k = 0;
    loop {
        let name = format!("cn/d{k}");
        match pod_add_once(NODE, &name) {
            Add::Ok(ip) => {
                pods.insert(name, ip);
                k += 1;
                assert!(k < 40, "the node never reached its limit");
            }
            Add::Failed(_, msg) if msg.contains("limit") => break,
            Add::Failed(..) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
    assert!(k > 0, "pods were served while the API server was down");
    let before: Vec<String> = ["NodeAtMaxPods", "NodeAtENILimit"]
        .iter()
        .flat_map(|r| events(r))
        .collect();
    lab_ok(&["kube", "start"]);
    // The node at its limit while the API server was down: the event goes once it is back.
    wait_for(
        Duration::from_secs(30),
        "the event of the node at its limit, sent once the API server is back",
        || {
            ["NodeAtMaxPods", "NodeAtENILimit"]
                .iter()
                .flat_map(|r| events(r))
                .find(|m| !before.contains(m))
        },
        || format!("{before:?}"),
    );

    // ---- the API server down at the agent's start: it starts and serves -------------------
    for p in (0..k).map(|i| format!("cn/d{i}")) {
        pod_del_retry(NODE, &p, Duration::from_secs(30));
        pods.remove(&p);
    }
    lab_ok(&["kube", "stop"]);
    lab_ok(&["agent", "restart", NODE]);
    let (ip, _) = pod_add_retry(NODE, "cn/after-restart", Duration::from_secs(60));
    assert!(net.subnet.cidr.contains(&ip));
    lab_ok(&["kube", "start"]);
    wait_for(
        Duration::from_secs(30),
        "the annotation of the pod added while the API server was down",
        || {
            lab::kube::pod("cn", "after-restart")
                .ok()
                .flatten()
                .and_then(|p| p.metadata.annotations)
                .and_then(|a| a.get("vpc.amazonaws.com/pod-ips").cloned())
                .filter(|v| *v == ip.to_string())
        },
        String::new,
    );
    eprintln!(
        "custom networking and the Kubernetes API on the lab: {:?}",
        t0.elapsed()
    );
}
