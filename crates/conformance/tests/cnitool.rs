//! cnitool (built from Debian's source package) driven by `vpc-cni-conformance cnitool`, with
//! Debian's ptp + host-local, inside a throwaway node namespace and a pod namespace
//! (`testkit::TestNs`). Root only: ignored without `--include-ignored`; fails, naming what is
//! missing and `scripts/setup.sh`, when a client is not installed.

mod common;

use std::path::Path;

use common::*;

/// Removes the attachment's libcni cache entry on drop (it is gone already when DEL worked).
struct CacheEntry(Option<String>);

impl Drop for CacheEntry {
    fn drop(&mut self) {
        if let Some(f) = &self.0
            && Path::new(f).exists()
        {
            eprintln!("cleanup: removing {f}");
            let _ = std::fs::remove_file(f);
        }
    }
}

#[test]
#[ignore = "root: creates network namespaces and runs cnitool in them"]
fn cnitool_add_check_del_with_ptp_host_local() {
    require_root();
    require(&["cnitool", "ptp", "host-local", "ping"]);
    let conf = Conf::new();
    let node = Netns::new("rc-node-tool");
    let pod = Netns::new("rc-pod-tool");
    let conf_dir = conf.conf_dir();
    let mut cache = CacheEntry(None);
    let tool = |verb: &str, extra: &[&str]| {
        let mut a = vec![
            "cnitool",
            verb,
            "--netns",
            node.name(),
            "--net",
            NET,
            "--pod-netns",
            pod.name(),
            "--conf-dir",
            &conf_dir,
            "--cni-bin",
            CNI_BIN,
        ];
        a.extend_from_slice(extra);
        conformance(&a)
    };

    // ADD (CNI_ARGS passed through: libcni records them in its cache entry)
    let add = tool(
        "add",
        &[
            "--cni-args",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=rc;K8S_POD_NAME=tool",
        ],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    cache.0 = add["cache_file"].as_str().map(str::to_string);
    println!("cnitool add: {} in {} ms", add["ips"], add["elapsed_ms"]);
    let ips = add["ips"].as_array().unwrap();
    assert_eq!(ips.len(), 1, "{add}");
    let cidr = ips[0].as_str().unwrap();
    assert!(in_subnet(cidr), "{cidr} not in {SUBNET}");
    let ip = cidr.split('/').next().unwrap().to_string();
    assert_eq!(add["result"]["cniVersion"], "1.0.0", "{add}");
    assert_eq!(conf.reserved(), vec![ip.clone()]);
    let pod_addrs = pod.exec_ok(&["ip", "-4", "-br", "addr", "show", "dev", "eth0"]);
    assert!(
        pod_addrs.contains(cidr),
        "pod eth0 has {pod_addrs}, not {cidr}"
    );
    assert!(node.ping(&ip), "cannot ping {ip} from {}", node.name());
    // the host side of ptp is in the node namespace, not in ours
    let node_routes = node.exec_ok(&["ip", "-4", "route", "show", &ip]);
    assert!(
        node_routes.contains(&ip),
        "no route to {ip} in the node: {node_routes}"
    );
    // our idea of cnitool's container id matches the cache file libcni wrote
    assert_eq!(add["cache_file_exists"], true, "{add}");
    let cached: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cache.0.as_ref().unwrap()).unwrap()).unwrap();
    assert_eq!(
        cached["cniArgs"],
        serde_json::json!([
            ["IgnoreUnknown", "1"],
            ["K8S_POD_NAMESPACE", "rc"],
            ["K8S_POD_NAME", "tool"]
        ]),
        "{cached}"
    );

    // CHECK passes
    let check = tool("check", &[]).unwrap_or_else(|e| panic!("{e}"));
    println!("cnitool check: {} ms", check["elapsed_ms"]);
    assert_eq!(check["exit_code"], 0);

    // CHECK fails once the pod's interface is gone
    pod.exec_ok(&["ip", "link", "set", "eth0", "down"]);
    pod.exec_ok(&["ip", "addr", "flush", "dev", "eth0"]);
    let bad = tool("check", &[]).unwrap_err();
    assert!(bad.contains("cnitool check"), "{bad}");
    println!("cnitool check on a broken pod fails as it should: {bad}");

    // DEL releases everything, and is repeatable
    let del = tool("del", &[]).unwrap_or_else(|e| panic!("{e}"));
    println!("cnitool del: {} ms", del["elapsed_ms"]);
    assert_eq!(del["cache_file_exists"], false, "{del}");
    assert!(conf.reserved().is_empty(), "{:?}", conf.reserved());
    let links = pod.exec_ok(&["ip", "-br", "link"]);
    assert!(!links.contains("eth0"), "pod eth0 left: {links}");
    let node_links = node.exec_ok(&["ip", "-br", "link", "show", "type", "veth"]);
    assert!(
        node_links.trim().is_empty(),
        "veth left in the node: {node_links}"
    );
    tool("del", &[]).unwrap_or_else(|e| panic!("second del: {e}"));

    // errors name the bad value
    let err = conformance(&[
        "cnitool",
        "add",
        "--netns",
        node.name(),
        "--net",
        "no-such-net",
        "--pod-netns",
        pod.name(),
        "--conf-dir",
        &conf_dir,
        "--cni-bin",
        CNI_BIN,
    ])
    .unwrap_err();
    assert!(err.contains("no-such-net"), "{err}");
    let err = conformance(&[
        "cnitool",
        "add",
        "--netns",
        "vpccni-rc-absent",
        "--net",
        NET,
        "--pod-netns",
        pod.name(),
        "--conf-dir",
        &conf_dir,
        "--cni-bin",
        CNI_BIN,
    ])
    .unwrap_err();
    assert!(err.contains("/run/netns/vpccni-rc-absent"), "{err}");
}
