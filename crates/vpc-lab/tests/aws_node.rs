//! The aws-node node fixture end to end: `vpc-lab up`, the vpc-cni agent of instance1 stopped,
//! `vpc-lab aws-node wire` three pods over both ENIs the way aws-node v1.23 wires them, the
//! checker accepts the node, the pods reach instance2 and are reached from it, reach the
//! internet SNATed to the node's primary address; then one piece at a time is broken and the
//! checker names it. Needs root and the built binaries (ignored without root).

mod common;

use std::net::Ipv4Addr;

use common::*;

const NODE: &str = "instance1";
const NODE_PRIMARY_IP: &str = "172.31.15.228";

/// `pod ip eth<N> veth` lines of `aws-node wire`.
fn wired(out: &str) -> Vec<(String, Ipv4Addr, u32, String)> {
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 4, "wire output line {l:?}");
            (
                f[0].to_string(),
                f[1].parse().expect("an address"),
                f[2].trim_start_matches("eth").parse().expect("a device"),
                f[3].to_string(),
            )
        })
        .collect()
}

/// `vpc-lab aws-node check`: (accepted, output).
fn check() -> (bool, String) {
    let out = lab(&["aws-node", "check", NODE]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
#[ignore = "root: brings up the lab (network namespaces)"]
fn aws_node_fixture_is_wired_reachable_and_judged() {
    require_lab();
    let _serial = serial();
    let _down = Down;
    lab_ok(&["up"]);

    // Refused while the vpc-cni agent owns the node.
    let out = lab(&["aws-node", "wire", NODE, "default/a"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("vpc-lab agent stop {NODE}")),
        "says how to stop the agent: {err}"
    );

    lab_ok(&["agent", "stop", NODE]);
    let pods = wired(&lab_ok(&[
        "aws-node",
        "wire",
        NODE,
        "default/a",
        "default/b",
        "default/c",
    ]));
    assert_eq!(pods.len(), 3);
    let devices: std::collections::BTreeSet<u32> = pods.iter().map(|p| p.2).collect();
    assert!(
        devices.contains(&0) && devices.contains(&1),
        "pods on both ENIs: {pods:?}"
    );
    // No more addresses: refused, nothing wired.
    let out = lab(&["aws-node", "wire", NODE, "default/d"]);
    assert!(!out.status.success(), "a fourth pod has no address left");

    let (ok, out) = check();
    assert!(ok, "the checker accepts the wired node:\n{out}");

    // The node's files in the reference's format.
    let conf = lab::paths::conf_dir(NODE);
    assert!(conf.join("10-aws.conflist").is_file());
    assert!(!conf.join(lab::paths::CONFLIST).exists());
    let cp: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(lab::paths::agent_checkpoint(NODE)).expect("checkpoint"),
    )
    .expect("checkpoint is JSON");
    assert_eq!(cp["version"], "vpc-cni-ipam/1");
    let allocs = cp["allocations"].as_array().expect("allocations");
    assert_eq!(allocs.len(), 3, "{cp}");
    for (pod, ip, _, _) in &pods {
        let (ns, name) = pod.split_once('/').unwrap();
        assert!(
            allocs.iter().any(|a| a["networkName"] == "aws-cni"
                && a["ifName"] == "eth0"
                && a["ipv4"] == ip.to_string()
                && a["metadata"]["k8sPodNamespace"] == ns
                && a["metadata"]["k8sPodName"] == name
                && a["metadata"]["interfacesCount"] == 1),
            "allocation of {pod} {ip}: {cp}"
        );
    }
    let rules = String::from_utf8_lossy(&sh(NODE, "ip rule").stdout).into_owned();
    for (_, ip, dev, _) in &pods {
        assert!(
            rules.contains(&format!("512:\tfrom all to {ip} lookup main")),
            "{rules}"
        );
        assert_eq!(
            rules.contains(&format!("1536:\tfrom {ip} lookup")),
            *dev >= 1,
            "{rules}"
        );
    }
    let nat = String::from_utf8_lossy(&sh(NODE, "iptables -t nat -S").stdout).into_owned();
    assert!(
        nat.contains(&format!(
            "-j SNAT --to-source {NODE_PRIMARY_IP} --random-fully"
        )),
        "{nat}"
    );
    let nft = String::from_utf8_lossy(&sh(NODE, "nft list tables").stdout).into_owned();
    assert!(
        nft.contains("table ip aws-cni") && !nft.contains("table ip vpc-cni"),
        "{nft}"
    );

    // Every pod reaches instance2 and is reached from it.
    let i2: Ipv4Addr = common::world()["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "instance2")
        .expect("instance2")["enis"][0]["primary_ip"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let ips: Vec<Ipv4Addr> = pods.iter().map(|p| p.1).collect();
    assert_eq!(unreachable("instance2", &ips), Vec::<Ipv4Addr>::new());
    for (pod, ..) in &pods {
        assert_eq!(unreachable(pod, &[i2]), Vec::<Ipv4Addr>::new(), "{pod}");
    }
    // The internet host's whoami (raw TCP: it writes the peer's address) sees each pod as the
    // node's primary address.
    let whoami = format!(
        "timeout 5 bash -c 'cat < /dev/tcp/{}/{}'",
        lab_net::fabric::INTERNET_HOST,
        lab::daemon::WHOAMI_PORT
    );
    for (pod, ..) in &pods {
        let out = sh(pod, &whoami);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            NODE_PRIMARY_IP,
            "{pod} is SNATed to the node's primary address"
        );
    }

    // Break one piece at a time: the checker names it.
    let (_, secondary_ip, dev, _) = pods.iter().find(|p| p.2 >= 1).unwrap().clone();
    let table = dev + 1;
    let del = format!("ip rule del from {secondary_ip} lookup {table} pref 1536");
    assert!(sh(NODE, &del).status.success());
    let (ok, out) = check();
    assert!(!ok, "a missing 1536 rule is not accepted");
    assert!(
        out.contains(&format!(
            "no rule `from {secondary_ip} lookup {table} pref 1536`"
        )),
        "the checker names the rule:\n{out}"
    );
    let add = format!("ip rule add from {secondary_ip} lookup {table} pref 1536");
    assert!(sh(NODE, &add).status.success());
    assert!(check().0, "accepted again once restored");

    // Without aws-node's SNAT rule the pod cannot reach the internet (no other SNAT is left on
    // the node), and the checker names the rule.
    let snat = format!(
        "AWS-SNAT-CHAIN-0 ! -o vlan+ -m comment --comment 'AWS, SNAT' -m addrtype ! --dst-type LOCAL -j SNAT --to-source {NODE_PRIMARY_IP} --random-fully"
    );
    assert!(
        sh(NODE, &format!("iptables -t nat -D {snat}"))
            .status
            .success()
    );
    let (pod_a, ..) = &pods[0];
    let out = sh(pod_a, &whoami.replace("timeout 5", "timeout 2"));
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "no answer without the SNAT"
    );
    let (ok, out) = check();
    assert!(!ok && out.contains("--comment \"AWS, SNAT\""), "{out}");
    assert!(
        sh(NODE, &format!("iptables -t nat -A {snat}"))
            .status
            .success()
    );
    assert!(check().0, "accepted again once restored");

    // A vpc-cni leftover: its conflist next to aws-node's.
    std::fs::write(conf.join(lab::paths::CONFLIST), "{}").unwrap();
    let (ok, out) = check();
    assert!(!ok && out.contains(lab::paths::CONFLIST), "{out}");
    std::fs::remove_file(conf.join(lab::paths::CONFLIST)).unwrap();

    // A checkpoint entry under vpc-cni's network name.
    let cpf = lab::paths::agent_checkpoint(NODE);
    let text = std::fs::read_to_string(&cpf).unwrap();
    std::fs::write(&cpf, text.replacen("\"aws-cni\"", "\"vpc-cni\"", 1)).unwrap();
    let (ok, out) = check();
    assert!(!ok && out.contains("network name \"vpc-cni\""), "{out}");
    std::fs::write(&cpf, text).unwrap();
    assert!(check().0);

    assert_root_untouched();
}
