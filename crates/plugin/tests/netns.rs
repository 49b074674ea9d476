//! The plugin binary against real network namespaces and a fake agent (root only: ignored
//! without `--include-ignored`).
//!
//! Every test makes its own "node" namespace (the plugin runs inside it, as if it were the
//! host) and pod namespaces, all `testkit::TestNs` (`vpccni-t-<pid>-…`, deleted on drop). Pod
//! addresses are 10.99.0.x and exist only inside those namespaces.

mod common;

use std::path::Path;

use common::{FakeAgent, Run, TestNetns, run_plugin};
use serde_json::{Value, json};
use testkit::require_root;

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const NETWORK: &str = "vpc-cni-test";
const MTU: u64 = 1500;

/// One attachment as the runtime would describe it.
struct Pod<'a> {
    cid: String,
    name: String,
    netns: String,
    ifname: &'a str,
}

impl<'a> Pod<'a> {
    fn new(cid: &str, name: &str, netns: &TestNetns) -> Pod<'a> {
        Pod {
            cid: cid.into(),
            name: name.into(),
            netns: netns.path_str(),
            ifname: "eth0",
        }
    }

    fn args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            self.name, self.cid
        )
    }

    fn host_veth(&self) -> String {
        dataplane::host_veth_name("eni", "default", &self.name)
    }
}

fn conf(version: &str, agent: &FakeAgent, extra: Value) -> Vec<u8> {
    let mut c = json!({
        "cniVersion": version, "name": NETWORK, "type": "vpc-cni",
        "mtu": MTU, "agentSocket": agent.socket_str(), "pluginLogLevel": "debug"
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    serde_json::to_vec(&c).unwrap()
}

fn cni(cmd: &str, pod: &Pod, stdin: &[u8], node: &TestNetns) -> Run {
    let args = pod.args();
    let env = [
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", pod.cid.as_str()),
        ("CNI_NETNS", pod.netns.as_str()),
        ("CNI_IFNAME", pod.ifname),
        ("CNI_PATH", "/opt/cni/bin"),
        ("CNI_ARGS", args.as_str()),
    ];
    run_plugin(&env, stdin, Some(&node.path()))
}

fn with_prev(version: &str, agent: &FakeAgent, prev: &Value) -> Vec<u8> {
    conf(version, agent, json!({ "prevResult": prev }))
}

/// The pod's /32 from an ADD result.
fn result_ip(r: &Value) -> String {
    let a = r["ips"][0]["address"].as_str().unwrap();
    a.strip_suffix("/32")
        .unwrap_or_else(|| panic!("not a /32: {a}"))
        .to_string()
}

/// Checks the ADD result's shape for `version` and returns (ip, host veth mac).
fn assert_result_shape(r: &Value, version: &str, pod: &Pod) -> (String, String) {
    assert_eq!(r["cniVersion"], version, "{r}");
    let ifs = r["interfaces"].as_array().unwrap();
    assert_eq!(ifs.len(), 2, "{r}");
    assert_eq!(ifs[0]["name"], pod.host_veth().as_str(), "{r}");
    assert!(ifs[0].get("sandbox").is_none(), "{r}");
    assert_eq!(ifs[1]["name"], "eth0", "{r}");
    assert_eq!(ifs[1]["sandbox"], pod.netns.as_str(), "{r}");
    for i in ifs {
        let mac = i["mac"].as_str().unwrap();
        assert_eq!(mac.len(), 17, "{r}");
        assert_eq!(i.get("mtu").is_some(), version == "1.1.0", "{r}");
    }
    let ips = r["ips"].as_array().unwrap();
    assert_eq!(ips.len(), 1, "{r}");
    assert_eq!(ips[0]["gateway"], "169.254.1.1", "{r}");
    assert_eq!(ips[0]["interface"], 1, "{r}");
    if version.starts_with("0.") {
        assert_eq!(ips[0]["version"], "4", "{r}");
    } else {
        assert!(ips[0].get("version").is_none(), "{r}");
    }
    assert_eq!(
        r["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]),
        "{r}"
    );
    (result_ip(r), ifs[0]["mac"].as_str().unwrap().to_string())
}

/// The pod side: address, routes, neighbour, MTU; the node side: veth, /32 routes, rules.
fn assert_wired(
    node: &TestNetns,
    pod_ns: &TestNetns,
    pod: &Pod,
    ip: &str,
    host_mac: &str,
    table: u32,
) {
    let links = pod_ns.ip_json(&["link", "show", "eth0"]);
    assert_eq!(links[0]["mtu"], MTU, "{links}");
    assert!(
        links[0]["flags"].as_array().unwrap().contains(&json!("UP")),
        "{links}"
    );
    let addrs = pod_ns.ip_json(&["-4", "addr", "show", "dev", "eth0"]);
    let a = &addrs[0]["addr_info"];
    assert!(
        a.as_array()
            .unwrap()
            .iter()
            .any(|x| x["local"] == ip && x["prefixlen"] == 32),
        "{addrs}"
    );
    let routes = pod_ns.ip_json(&["-4", "route", "show"]);
    let rs = routes.as_array().unwrap();
    assert!(
        rs.iter()
            .any(|r| r["dst"] == "default" && r["gateway"] == "169.254.1.1" && r["dev"] == "eth0"),
        "{routes}"
    );
    assert!(
        rs.iter()
            .any(|r| r["dst"] == "169.254.1.1" && r["scope"] == "link" && r["dev"] == "eth0"),
        "{routes}"
    );
    let neigh = pod_ns.ip_json(&["neigh", "show", "dev", "eth0"]);
    assert!(
        neigh
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["dst"] == "169.254.1.1"
                && n["lladdr"] == host_mac
                && n["state"]
                    .as_array()
                    .is_some_and(|s| s.contains(&json!("PERMANENT")))),
        "{neigh}"
    );

    let veth = pod.host_veth();
    let hl = node.ip_json(&["link", "show", &veth]);
    assert_eq!(hl[0]["address"], host_mac, "{hl}");
    for t in ["main", "512"] {
        let r = node.ip_json(&["-4", "route", "show", "table", t, &format!("{ip}/32")]);
        assert_eq!(r[0]["dev"], veth.as_str(), "table {t}: {r}");
        assert_eq!(r[0]["scope"], "link", "table {t}: {r}");
    }
    let rules = node.ip_json(&["-4", "rule", "show"]);
    let rules = rules.as_array().unwrap();
    assert!(
        rules
            .iter()
            .any(|r| r["priority"] == 512 && r["src"] == "all" && r["table"] == "512"),
        "{rules:?}"
    );
    // no per-pod rule; a secondary-ENI pod's host veth is in its ENI's device group
    assert!(!rules.iter().any(|r| r["src"] == ip), "{rules:?}");
    let group = if table == 254 {
        "default".to_string()
    } else {
        dataplane::pod_group(table - 1).to_string()
    };
    assert_eq!(hl[0]["group"], group.as_str(), "{hl}");
}

/// The agent's ENI setup for the ENI whose table is `table`: its pod rule (CHECK wants it).
fn add_eni_rule(node: &TestNetns, table: u32) {
    let mark = format!(
        "{:#x}/{:#x}",
        dataplane::eni_mark(table - 1),
        dataplane::ENI_MARK_MASK
    );
    let table = table.to_string();
    node.ip(&[
        "rule", "add", "fwmark", &mark, "lookup", &table, "pref", "1536",
    ]);
}

/// Nothing of any pod is left in the node namespace: only `lo`, no route or rule that
/// mentions a pod address.
fn assert_node_clean(node: &TestNetns) {
    assert_eq!(
        node.live_link_names(),
        vec!["lo".to_string()],
        "leftover links"
    );
    // what DEL retired, the agent deletes (here: the same kernel call, by hand)
    node.reap_retired();
    assert_eq!(
        node.link_names(),
        vec!["lo".to_string()],
        "retired links survived"
    );
    let routes = node.ip_json(&["-4", "route", "show", "table", "all"]);
    for r in routes.as_array().unwrap() {
        assert!(!r.to_string().contains("10.99."), "leftover route {r}");
    }
    let rules = node.ip_json(&["-4", "rule", "show"]);
    for r in rules.as_array().unwrap() {
        assert!(!r.to_string().contains("10.99."), "leftover rule {r}");
    }
}

fn pod_has_no_eth0(pod_ns: &TestNetns) {
    assert!(
        !pod_ns.live_link_names().contains(&"eth0".to_string()),
        "eth0 left in {}",
        pod_ns.name()
    );
}

#[test]
#[ignore = "root: creates network namespaces and runs the plugin in them"]
fn add_check_del_del_in_every_version() {
    require_root();
    let node = TestNetns::new("life-node");
    add_eni_rule(&node, 3);
    let agent = FakeAgent::start(2, 20, 254);
    for (i, v) in VERSIONS.iter().enumerate() {
        // alternate primary-ENI (main) and secondary-ENI (table 3) addresses
        let table = if i % 2 == 0 { 254 } else { 3 };
        agent.pool.lock().unwrap().route_table = table;
        let pod_ns = TestNetns::new(&format!("life-pod{i}"));
        let pod = Pod::new(&format!("life{i}"), &format!("web-{i}"), &pod_ns);

        let add = cni("ADD", &pod, &conf(v, &agent, json!({})), &node);
        let result = add.ok().json();
        let (ip, host_mac) = assert_result_shape(&result, v, &pod);
        assert_wired(&node, &pod_ns, &pod, &ip, &host_mac, table);
        assert_eq!(agent.assigned(), 1);

        if *v >= "0.4.0" {
            cni("CHECK", &pod, &with_prev(v, &agent, &result), &node).ok_empty();
        } else {
            cni("CHECK", &pod, &with_prev(v, &agent, &result), &node).error(1);
        }

        cni("DEL", &pod, &with_prev(v, &agent, &result), &node).ok_empty();
        assert_node_clean(&node);
        pod_has_no_eth0(&pod_ns);
        assert_eq!(agent.assigned(), 0, "address not released");

        // repeated DEL, with and without prevResult
        cni("DEL", &pod, &with_prev(v, &agent, &result), &node).ok_empty();
        cni("DEL", &pod, &conf(v, &agent, json!({})), &node).ok_empty();
        assert_node_clean(&node);
    }
}

#[test]
#[ignore = "root: creates network namespaces and runs the plugin in them"]
fn check_reports_damage() {
    require_root();
    let node = TestNetns::new("chk-node");
    let agent = FakeAgent::start(30, 31, 254);
    let pod_ns = TestNetns::new("chk-pod");
    let pod = Pod::new("chk", "chk", &pod_ns);
    let result = cni("ADD", &pod, &conf("1.0.0", &agent, json!({})), &node)
        .ok()
        .json();
    cni("CHECK", &pod, &with_prev("1.0.0", &agent, &result), &node).ok_empty();

    // a prevResult with another address
    let mut wrong = result.clone();
    wrong["ips"][0]["address"] = json!("10.99.0.99/32");
    let v = cni("CHECK", &pod, &with_prev("1.0.0", &agent, &wrong), &node).error(101);
    assert!(v["details"].as_str().unwrap().contains("10.99.0.99"), "{v}");

    // the gateway neighbour removed inside the pod
    pod_ns.ip(&["neigh", "del", "169.254.1.1", "dev", "eth0"]);
    let v = cni("CHECK", &pod, &with_prev("1.0.0", &agent, &result), &node).error(101);
    assert!(
        v["details"].as_str().unwrap().contains("169.254.1.1"),
        "{v}"
    );

    // CHECK without prevResult
    let v = cni("CHECK", &pod, &conf("1.0.0", &agent, json!({})), &node).error(7);
    assert!(v["msg"].as_str().unwrap().contains("prevResult"), "{v}");

    cni("DEL", &pod, &with_prev("1.0.0", &agent, &result), &node).ok_empty();
    assert_node_clean(&node);
}

#[test]
#[ignore = "root: creates network namespaces and runs the plugin in them"]
fn del_after_the_pod_netns_is_gone() {
    require_root();
    let node = TestNetns::new("gone-node");
    let agent = FakeAgent::start(40, 49, 3);
    for (i, v) in VERSIONS.iter().enumerate() {
        let mut pod_ns = TestNetns::new(&format!("gone-pod{i}"));
        let pod = Pod::new(&format!("gone{i}"), &format!("gone-{i}"), &pod_ns);
        let result = cni("ADD", &pod, &conf(v, &agent, json!({})), &node)
            .ok()
            .json();
        pod_ns.delete();
        assert!(!Path::new(&pod.netns).exists());
        cni("DEL", &pod, &with_prev(v, &agent, &result), &node).ok_empty();
        assert_node_clean(&node);
        assert_eq!(agent.assigned(), 0);
        // and once more, now without prevResult
        cni("DEL", &pod, &conf(v, &agent, json!({})), &node).ok_empty();
    }
}

#[test]
#[ignore = "root: creates network namespaces and runs the plugin in them"]
fn del_with_the_agent_down_tears_down_from_prev_result() {
    require_root();
    let node = TestNetns::new("down-node");
    for (i, v) in VERSIONS.iter().enumerate() {
        let mut agent = FakeAgent::start(50, 59, 3);
        let pod_ns = TestNetns::new(&format!("down-pod{i}"));
        let pod = Pod::new(&format!("down{i}"), &format!("down-{i}"), &pod_ns);
        let result = cni("ADD", &pod, &conf(v, &agent, json!({})), &node)
            .ok()
            .json();
        let ip = result_ip(&result);
        agent.stop();
        let r = cni("DEL", &pod, &with_prev(v, &agent, &result), &node);
        r.ok_empty();
        assert!(r.stderr.contains("agent unavailable"), "{}", r.stderr);
        assert_node_clean(&node);
        pod_has_no_eth0(&pod_ns);
        // the ADD with the agent still down is "try again later" and touches nothing
        let v2 = cni("ADD", &pod, &conf(v, &agent, json!({})), &node).error(11);
        assert!(
            v2["msg"].as_str().unwrap().contains(&agent.socket_str()),
            "{v2}"
        );
        assert_node_clean(&node);
        assert!(!ip.is_empty());
    }
}

#[test]
#[ignore = "root: creates network namespaces and runs the plugin in them"]
fn add_with_an_existing_ifname_fails_and_leaks_nothing() {
    require_root();
    let node = TestNetns::new("dup-node");
    let agent = FakeAgent::start(60, 69, 3);
    for (i, v) in VERSIONS.iter().enumerate() {
        let pod_ns = TestNetns::new(&format!("dup-pod{i}"));
        // (a veth pair inside the pod: the dummy module may be absent)
        pod_ns.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
        ]);
        let pod = Pod::new(&format!("dup{i}"), &format!("dup-{i}"), &pod_ns);
        let r = cni("ADD", &pod, &conf(v, &agent, json!({})), &node);
        let e = r.error(100);
        assert!(e["details"].as_str().unwrap().contains("eth0"), "{e}");
        assert_eq!(e["cniVersion"], *v);
        assert_node_clean(&node);
        assert_eq!(agent.assigned(), 0, "address not released after failed ADD");
        // the pre-existing interface is untouched
        let l = pod_ns.ip_json(&["-d", "link", "show", "eth0"]);
        assert_eq!(l[0]["linkinfo"]["info_kind"], "veth", "{l}");
        assert!(pod_ns.link_names().contains(&"other0".to_string()));
        // The runtime's DEL after a failed ADD succeeds. Like the reference plugins (ptp),
        // DEL removes CNI_IFNAME from the pod namespace whoever created it: in a pod netns
        // made by the runtime, an existing eth0 is a leftover of this same attachment.
        cni("DEL", &pod, &conf(v, &agent, json!({})), &node).ok_empty();
        pod_has_no_eth0(&pod_ns);
        assert_node_clean(&node);
    }
}

#[test]
#[ignore = "root: creates network namespaces and runs the plugin in them"]
fn status_and_gc() {
    require_root();
    let node = TestNetns::new("gc-node");
    add_eni_rule(&node, 3);
    let agent = FakeAgent::start(70, 79, 3);
    let cfg = |extra: Value| conf("1.1.0", &agent, extra);
    let status = |stdin: &[u8]| run_plugin(&[("CNI_COMMAND", "STATUS")], stdin, Some(&node.path()));

    status(&cfg(json!({}))).ok_empty();
    agent.pool.lock().unwrap().ready = false;
    let v = status(&cfg(json!({}))).error(50);
    assert!(
        v["details"]
            .as_str()
            .unwrap()
            .contains("waiting for the first ENI"),
        "{v}"
    );
    agent.pool.lock().unwrap().ready = true;
    status(&conf("1.0.0", &agent, json!({}))).error(1);

    let ns_a = TestNetns::new("gc-a");
    let ns_b = TestNetns::new("gc-b");
    let a = Pod::new("gca", "gc-a", &ns_a);
    let b = Pod::new("gcb", "gc-b", &ns_b);
    let ra = cni("ADD", &a, &cfg(json!({})), &node).ok().json();
    let rb = cni("ADD", &b, &cfg(json!({})), &node).ok().json();
    let (ip_a, ip_b) = (result_ip(&ra), result_ip(&rb));
    assert_eq!(agent.assigned(), 2);

    let gc = |valid: Value| {
        run_plugin(
            &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
            &cfg(json!({ "cni.dev/valid-attachments": valid })),
            Some(&node.path()),
        )
    };
    gc(json!([{"containerID": "gca", "ifname": "eth0"}])).ok_empty();
    assert_eq!(agent.assigned(), 1);
    // b's host side is gone (veth, /32 routes, from-rule); a is intact
    let links = node.live_link_names();
    assert!(!links.contains(&b.host_veth()), "{links:?}");
    assert!(links.contains(&a.host_veth()), "{links:?}");
    let all = node
        .ip_json(&["-4", "route", "show", "table", "all"])
        .to_string()
        + &node.ip_json(&["-4", "rule", "show"]).to_string();
    assert!(!all.contains(&format!("\"{ip_b}\"")), "{all}");
    assert!(all.contains(&format!("\"{ip_a}\"")), "{all}");
    cni("CHECK", &a, &with_prev("1.1.0", &agent, &ra), &node).ok_empty();

    // the older key is accepted too; a GC that keeps everything changes nothing
    run_plugin(
        &[("CNI_COMMAND", "GC")],
        &cfg(json!({ "cni.dev/attachments": [{"containerID": "gca", "ifname": "eth0"}] })),
        Some(&node.path()),
    )
    .ok_empty();
    assert_eq!(agent.assigned(), 1);
    // GC needs 1.1.0
    run_plugin(
        &[("CNI_COMMAND", "GC")],
        &conf("1.0.0", &agent, json!({"cni.dev/valid-attachments": []})),
        Some(&node.path()),
    )
    .error(1);

    cni("DEL", &a, &with_prev("1.1.0", &agent, &ra), &node).ok_empty();
    cni("DEL", &b, &with_prev("1.1.0", &agent, &rb), &node).ok_empty();
    assert_node_clean(&node);
    assert_eq!(agent.assigned(), 0);
}

#[test]
#[ignore = "root: creates network namespaces and runs the plugin in them"]
fn concurrent_adds_and_dels() {
    require_root();
    let node = TestNetns::new("par-node");
    let agent = FakeAgent::start(80, 99, 3);
    let nss: Vec<TestNetns> = (0..6).map(|i| TestNetns::new(&format!("par{i}"))).collect();
    let pods: Vec<Pod> = nss
        .iter()
        .enumerate()
        .map(|(i, ns)| Pod::new(&format!("par{i}"), &format!("par-{i}"), ns))
        .collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = pods
            .iter()
            .map(|p| s.spawn(|| cni("ADD", p, &conf("1.0.0", &agent, json!({})), &node)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap().ok().json())
            .collect()
    });
    let mut ips: Vec<String> = results.iter().map(result_ip).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), pods.len());
    for ((p, r), ns) in pods.iter().zip(&results).zip(&nss) {
        let (ip, mac) = assert_result_shape(r, "1.0.0", p);
        assert_wired(&node, ns, p, &ip, &mac, 3);
    }
    std::thread::scope(|s| {
        for (p, r) in pods.iter().zip(&results) {
            let node = &node;
            let agent = &agent;
            s.spawn(move || cni("DEL", p, &with_prev("1.0.0", agent, r), node).ok_empty());
        }
    });
    assert_node_clean(&node);
    assert_eq!(agent.assigned(), 0);
}

#[test]
#[ignore = "root: creates network namespaces and runs the plugin in them"]
fn without_kubernetes_args_the_veth_is_named_after_container_and_ifname() {
    require_root();
    let node = TestNetns::new("plain-node");
    let agent = FakeAgent::start(100, 101, 254);
    let pod_ns = TestNetns::new("plain-pod");
    let netns = pod_ns.path_str();
    // as cnitool runs it: no CNI_ARGS
    let env = |cmd: &'static str| {
        vec![
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "plain-1"),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
        ]
    };
    let r = run_plugin(
        &env("ADD"),
        &conf("1.0.0", &agent, json!({})),
        Some(&node.path()),
    );
    let result = r.ok().json();
    let veth = dataplane::host_veth_name("eni", "plain-1", "eth0");
    assert_eq!(result["interfaces"][0]["name"], veth.as_str(), "{result}");
    assert!(node.link_names().contains(&veth));
    run_plugin(
        &env("CHECK"),
        &with_prev("1.0.0", &agent, &result),
        Some(&node.path()),
    )
    .ok_empty();
    run_plugin(
        &env("DEL"),
        &with_prev("1.0.0", &agent, &result),
        Some(&node.path()),
    )
    .ok_empty();
    assert_node_clean(&node);
}

#[test]
#[ignore = "root: creates network namespaces and runs the plugin in them"]
fn del_with_a_stale_netns_file_cleans_the_host_side() {
    require_root();
    let node = TestNetns::new("stale-node");
    let agent = FakeAgent::start(110, 111, 3);
    let pod_ns = TestNetns::new("stale-pod");
    let pod = Pod::new("stale", "stale", &pod_ns);
    let result = cni("ADD", &pod, &conf("1.1.0", &agent, json!({})), &node)
        .ok()
        .json();
    // CNI_NETNS now names a plain file (a mount point whose namespace was unmounted)
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("netns");
    std::fs::write(&stale, b"").unwrap();
    let stale_pod = Pod {
        netns: stale.display().to_string(),
        ..Pod::new("stale", "stale", &pod_ns)
    };
    cni(
        "DEL",
        &stale_pod,
        &with_prev("1.1.0", &agent, &result),
        &node,
    )
    .ok_empty();
    assert_node_clean(&node);
    // the pod end went with the host end
    pod_has_no_eth0(&pod_ns);
    // ADD into such a file is refused before the agent is asked
    let before = agent.requests.load(std::sync::atomic::Ordering::SeqCst);
    let e = cni("ADD", &stale_pod, &conf("1.1.0", &agent, json!({})), &node).error(4);
    assert!(e["msg"].as_str().unwrap().contains("CNI_NETNS"), "{e}");
    assert_eq!(
        agent.requests.load(std::sync::atomic::Ordering::SeqCst),
        before
    );
}
