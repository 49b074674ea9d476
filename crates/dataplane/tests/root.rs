//! Real-kernel tests (root; ignored without `--include-ignored`). Everything happens inside
//! network namespaces these tests create (`testkit::TestNs`, `vpccni-t-*`, deleted on drop);
//! every dataplane call runs inside the test's "node" namespace via `NetNs::run`, never in the
//! root namespace.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use dataplane::{
    DataplaneError, EniSetup, HostSetup, MAIN_TABLE, PodSpec, PodTeardown, RETIRED_LINK_GROUP,
    Randomize, SnatConfig, apply_snat, check_pod, link_name_by_mac, pod_group, reap_retired_links,
    remove_snat, setup_eni, setup_host, setup_pod, teardown_eni, teardown_pod,
};
use testkit::{TestNs, require_root};

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 50);
const NODE_IP: &str = "10.77.0.2";
const OUTSIDE_IP: &str = "203.0.113.10";

/// node ns with `eth0` 10.77.0.2/24 (its primary interface), veth'd to an "outside" ns that
/// holds 203.0.113.10 and can only route back to the node's primary IP.
struct Topo {
    node: TestNs,
    pod: TestNs,
    outside: TestNs,
}

impl Topo {
    fn new(tag: &str) -> Topo {
        let node = TestNs::new(&format!("{tag}-node"));
        let pod = TestNs::new(&format!("{tag}-pod"));
        let outside = TestNs::new(&format!("{tag}-out"));
        node.ip(&format!(
            "link add eth0 type veth peer name out0 netns {}",
            outside.name()
        ));
        node.ip("link set lo up");
        node.ip(&format!("addr add {NODE_IP}/24 dev eth0"));
        node.ip("link set eth0 up");
        node.ip("route add default dev eth0 scope link");
        outside.ip("link set lo up");
        outside.ip(&format!("addr add {OUTSIDE_IP}/32 dev out0"));
        outside.ip("link set out0 up");
        outside.ip(&format!("route add {NODE_IP}/32 dev out0 scope link"));
        Topo { node, pod, outside }
    }
}

fn pod_spec<'a>(netns: &'a std::path::Path, table: u32) -> PodSpec<'a> {
    PodSpec {
        netns,
        host_veth: "enitest0",
        ifname: "eth0",
        ip: POD_IP,
        mtu: 9001,
        route_table: table,
    }
}

#[test]
#[ignore = "root: creates network namespaces, veths, routes and rules"]
fn root_pod_setup_ping_check_teardown() {
    require_root();
    let t = Topo::new("pod");
    let node = t.node.open();
    let pod_path = t.pod.path();
    let spec = pod_spec(&pod_path, MAIN_TABLE);

    let links = node.run(|| setup_pod(&spec)).unwrap().unwrap();
    assert_eq!(links.host_veth, "enitest0");
    assert_eq!(links.container_ifname, "eth0");
    // the host MAC is pinned and the neighbour uses it
    let hv = t.node.ip("-o link show enitest0");
    assert!(hv.contains(&links.host_mac), "{hv}");
    assert!(hv.contains("mtu 9001"), "{hv}");
    let neigh = t.pod.ip("neigh show dev eth0");
    assert!(
        neigh.contains(&format!("169.254.1.1 lladdr {} PERMANENT", links.host_mac)),
        "{neigh}"
    );
    let pod_link = t.pod.ip("-o link show eth0");
    assert!(pod_link.contains(&links.container_mac), "{pod_link}");
    assert!(
        t.node
            .ip("route show table 512")
            .contains("10.77.0.50 dev enitest0 scope link")
    );
    assert!(t.node.ip("rule").contains("512:\tfrom all lookup 512"));

    assert!(t.node.ping("10.77.0.50"), "node -> pod failed");
    assert!(t.pod.ping(NODE_IP), "pod -> node failed");

    node.run(|| check_pod(&spec)).unwrap().unwrap();
    t.pod.ip("neigh del 169.254.1.1 dev eth0");
    let err = node.run(|| check_pod(&spec)).unwrap().unwrap_err();
    assert!(
        err.to_string().contains("neighbour 169.254.1.1 missing"),
        "{err}"
    );

    // a second ADD into the same pod ns fails: eth0 exists
    let err = node.run(|| setup_pod(&spec)).unwrap().unwrap_err();
    assert!(
        matches!(err, DataplaneError::InterfaceExists { .. }),
        "{err}"
    );

    let td = PodTeardown {
        netns: Some(&pod_path),
        host_veth: Some("enitest0"),
        ifname: "eth0",
        ip: Some(POD_IP),
    };
    node.run(|| teardown_pod(&td)).unwrap().unwrap();
    // DEL retires the pair (down, retired group); the reaper deletes it later
    let retired = t
        .node
        .ip(&format!("-o link show group {RETIRED_LINK_GROUP}"));
    assert!(
        retired.contains(": vcr") && !retired.contains("UP"),
        "{retired}"
    );
    assert!(
        !t.node.ip("-o link").contains("enitest0"),
        "the name is free"
    );
    let pod_side = t
        .pod
        .ip(&format!("-o link show group {RETIRED_LINK_GROUP}"));
    assert!(pod_side.contains(": vcr"), "{pod_side}");
    assert!(!t.pod.ip("-o link").contains("eth0"), "the name is free");
    assert!(!t.node.ip("route show table all").contains("10.77.0.50"));
    // an ADD into the same netns before the reaper ran replaces the retired pair
    node.run(|| setup_pod(&spec)).unwrap().unwrap();
    node.run(|| check_pod(&spec)).unwrap().unwrap();
    assert!(t.node.ping("10.77.0.50"), "node -> re-added pod failed");
    node.run(|| teardown_pod(&td)).unwrap().unwrap();
    assert!(node.run(reap_retired_links).unwrap().unwrap());
    assert!(!t.node.ip("-o link").contains("enitest0"));
    assert!(!t.pod.ip("-o link").contains("eth0"));
    assert!(!node.run(reap_retired_links).unwrap().unwrap());
    let rules = t.node.ip("rule");
    assert!(!rules.contains("10.77.0.50"), "{rules}");
    assert!(
        rules.contains("lookup 512"),
        "shared rule must stay: {rules}"
    );
    // idempotent
    node.run(|| teardown_pod(&td)).unwrap().unwrap();
}

#[test]
#[ignore = "root: creates network namespaces, veths, routes and rules"]
fn root_secondary_eni_pod_and_teardown_with_netns_gone() {
    require_root();
    let mut t = Topo::new("sec");
    let node = t.node.open();
    let pod_path = t.pod.path();
    let spec = pod_spec(&pod_path, 3);
    node.run(|| setup_pod(&spec)).unwrap().unwrap();
    // CHECK wants the ENI's fwmark rule (setup_eni adds it; the pod adds no rule of its own)
    let e = node.run(|| check_pod(&spec)).unwrap().unwrap_err();
    assert!(e.to_string().contains("fwmark 0x200/0x3f00"), "{e}");
    t.node.ip(ENI2_RULE);
    node.run(|| check_pod(&spec)).unwrap().unwrap();
    let rules = t.node.ip("rule");
    assert!(!rules.contains("10.77.0.50"), "no per-pod rule: {rules}");
    let group = t.node.ip(&format!("-o link show group {}", pod_group(2)));
    assert!(
        group.contains("enitest0"),
        "the host veth is in ENI 2's group: {group}"
    );
    // a legacy per-pod from-rule of the reference, to be removed by DEL too
    t.node.ip("rule add from 10.77.0.50 lookup 3 pref 1536");
    // a legacy per-pod rule of the reference, to be removed by DEL too
    t.node.ip("rule add to 10.77.0.50/32 lookup main pref 512");

    t.pod.delete();
    let td = PodTeardown {
        netns: Some(&pod_path),
        host_veth: None, // unknown: found via the main-table route (it is gone with the ns)
        ifname: "eth0",
        ip: Some(POD_IP),
    };
    node.run(|| teardown_pod(&td)).unwrap().unwrap();
    let rules = t.node.ip("rule");
    assert!(!rules.contains("10.77.0.50"), "{rules}");
    assert!(!t.node.ip("route show table all").contains("10.77.0.50"));
    // gone with the netns, or retired (the kernel cleans up a deleted netns asynchronously)
    node.run(reap_retired_links).unwrap().unwrap();
    assert!(!t.node.ip("-o link").contains("enitest0"));
    node.run(|| teardown_pod(&td)).unwrap().unwrap();
}

#[test]
#[ignore = "root: creates network namespaces, veths and routes"]
fn root_teardown_finds_veth_by_route_when_name_unknown() {
    require_root();
    let t = Topo::new("byroute");
    let node = t.node.open();
    let pod_path = t.pod.path();
    let spec = pod_spec(&pod_path, MAIN_TABLE);
    node.run(|| setup_pod(&spec)).unwrap().unwrap();
    let td = PodTeardown {
        netns: None,
        host_veth: None,
        ifname: "eth0",
        ip: Some(POD_IP),
    };
    node.run(|| teardown_pod(&td)).unwrap().unwrap();
    assert!(
        node.run(reap_retired_links).unwrap().unwrap(),
        "veth not found via route"
    );
    assert!(!t.node.ip("-o link").contains("enitest0"));
    assert!(!t.pod.ip("-o link").contains("eth0"), "peer survived");
    assert!(
        t.node.ip("-o link").contains("eth0"),
        "primary interface must survive"
    );
}

#[test]
#[ignore = "root: creates network namespaces and veths"]
fn root_stale_host_veth_is_replaced() {
    require_root();
    let t = Topo::new("stale");
    t.node.ip("link add enitest0 type veth peer name stalepeer");
    let node = t.node.open();
    let pod_path = t.pod.path();
    let spec = pod_spec(&pod_path, MAIN_TABLE);
    node.run(|| setup_pod(&spec)).unwrap().unwrap();
    assert!(!t.node.ip("-o link").contains("stalepeer"));
    assert!(t.node.ping("10.77.0.50"));
}

#[test]
#[ignore = "root: creates network namespaces, links, routes and rules; writes their sysctls"]
fn root_host_and_eni_setup() {
    require_root();
    let node = TestNs::new("eni-node");
    node.ip("link add eth0 type veth peer name eth0p");
    node.ip("link add eth1 address 02:aa:bb:cc:dd:01 type veth peer name eth1p");
    node.ip("link set eth1p up");
    let n = node.open();
    let root_fwd = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();

    let h = HostSetup {
        primary_ifname: "eth0".into(),
        connmark: 0x80,
        mtu: 9001,
    };
    n.run(|| setup_host(&h)).unwrap().unwrap();
    n.run(|| setup_host(&h)).unwrap().unwrap();
    let fwd = node.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(String::from_utf8_lossy(&fwd.stdout).trim(), "1");
    let rp = node.exec(&["cat", "/proc/sys/net/ipv4/conf/eth0/rp_filter"]);
    assert_eq!(String::from_utf8_lossy(&rp.stdout).trim(), "2");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        root_fwd,
        "root namespace sysctl changed"
    );
    let rules = node.ip("rule");
    assert_eq!(
        rules.matches("fwmark 0x80/0x80 lookup main").count(),
        1,
        "{rules}"
    );
    assert_eq!(
        rules.matches("512:\tfrom all lookup 512").count(),
        1,
        "{rules}"
    );

    let e = EniSetup {
        mac: "02:AA:BB:CC:DD:01".into(),
        device_number: 2,
        primary_ip: Ipv4Addr::new(172, 31, 3, 173),
        subnet: "172.31.0.0/20".parse().unwrap(),
        mtu: 9001,
    };
    node.ip("addr add 192.0.2.9/24 dev eth1"); // foreign address: replaced
    assert_eq!(n.run(|| setup_eni(&e)).unwrap().unwrap(), "eth1");
    assert_eq!(n.run(|| setup_eni(&e)).unwrap().unwrap(), "eth1");
    let addrs = node.ip("-4 -o addr show dev eth1");
    assert!(addrs.contains("172.31.3.173/20"), "{addrs}");
    assert!(!addrs.contains("192.0.2.9"), "{addrs}");
    let link = node.ip("-o link show eth1");
    assert!(link.contains("mtu 9001") && link.contains(",UP"), "{link}");
    let t3 = node.ip("route show table 3");
    assert!(t3.contains("default via 172.31.0.1 dev eth1"), "{t3}");
    assert!(t3.contains("172.31.0.1 dev eth1 scope link"), "{t3}");
    let main = node.ip("route show table main");
    assert!(
        !main.contains("172.31.0.0/20"),
        "kernel subnet route kept: {main}"
    );
    let rules = node.ip("rule");
    assert_eq!(
        rules.matches("32765:\tfrom 172.31.3.173 lookup 3").count(),
        1,
        "{rules}"
    );
    assert_eq!(
        rules
            .matches("1536:\tfrom all fwmark 0x200/0x3f00 lookup 3")
            .count(),
        1,
        "{rules}"
    );
    assert_eq!(
        n.run(|| link_name_by_mac("02:aa:bb:cc:dd:01"))
            .unwrap()
            .unwrap(),
        Some("eth1".to_string())
    );
    assert_eq!(
        n.run(|| link_name_by_mac("02:00:00:00:00:99"))
            .unwrap()
            .unwrap(),
        None
    );

    n.run(|| teardown_eni(2, Ipv4Addr::new(172, 31, 3, 173)))
        .unwrap()
        .unwrap();
    n.run(|| teardown_eni(2, Ipv4Addr::new(172, 31, 3, 173)))
        .unwrap()
        .unwrap();
    assert!(node.ip("route show table 3").trim().is_empty());
    let rules = node.ip("rule");
    assert!(!rules.contains("172.31.3.173"), "{rules}");
    assert!(
        !rules.contains("lookup 3"),
        "the ENI's pod rule stays: {rules}"
    );
}

/// What `setup_eni` adds for device 2 (table 3): pod egress marked for that ENI uses its table.
const ENI2_RULE: &str = "rule add fwmark 0x200/0x3f00 lookup 3 pref 1536";

fn snat_cfg(external: bool) -> SnatConfig {
    SnatConfig {
        primary_ifname: "eth0".into(),
        primary_ip: NODE_IP.parse().unwrap(),
        vpc_cidrs: vec!["10.77.0.0/16".parse().unwrap()],
        exclude_cidrs: vec![],
        external_snat: external,
        randomize: Randomize::Prng,
        connmark: 0x80,
        veth_prefix: "eni".into(),
        node_port_support: true,
    }
}

#[test]
#[ignore = "root: creates network namespaces and nftables tables in them"]
fn root_snat_and_connmark_egress() {
    require_root();
    let t = Topo::new("snat");
    let node = t.node.open();
    let pod_path = t.pod.path();
    // pod on a "secondary ENI" (eth1, table 3) that leads nowhere (its wire is unplugged):
    // egress to the outside works only through connmark -> fwmark rule 1024 -> main -> eth0,
    // and SNAT to the primary IP. (A blackhole table would not do: loose rp_filter drops
    // replies whose reverse lookup fails.)
    t.node.ip("link add eth1 type veth peer name eth1p");
    t.node.ip("link set eth1 up");
    t.node.ip("route add default dev eth1 scope link table 3");
    t.node.ip(ENI2_RULE);
    let spec = pod_spec(&pod_path, 3);
    let h = HostSetup {
        primary_ifname: "eth0".into(),
        connmark: 0x80,
        mtu: 9001,
    };
    node.run(|| setup_host(&h)).unwrap().unwrap();
    node.run(|| setup_pod(&spec)).unwrap().unwrap();

    // no nft table yet: the outside cannot answer the pod (and table 3 blackholes)
    assert!(!t.pod.ping(OUTSIDE_IP), "egress worked without SNAT?");

    node.run(|| apply_snat(&snat_cfg(false))).unwrap().unwrap();
    let table = t.node.exec(&["nft", "list", "table", "ip", "vpc-cni"]);
    assert!(table.status.success(), "{table:?}");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("snat to 10.77.0.2 fully-random"), "{text}");
    assert!(
        t.pod.ping(OUTSIDE_IP),
        "pod -> outside failed with SNAT\n{}",
        t.node.dump()
    );
    // the first packet takes the mark in snat-mark, the later ones from the ct mark (from-pod)
    assert!(
        t.pod.ping_flow(OUTSIDE_IP),
        "later packets of a SNATed flow were lost\n{}",
        t.node.dump()
    );
    // the outside saw the node's primary IP: conntrack in the node shows the translation
    let ct = t.node.exec(&["conntrack", "-L", "-p", "icmp"]);
    if ct.status.success() {
        let ct = String::from_utf8_lossy(&ct.stdout);
        assert!(
            ct.contains("src=10.77.0.50 dst=203.0.113.10") && ct.contains("dst=10.77.0.2"),
            "{ct}"
        );
        assert!(ct.contains("mark=128"), "connmark not set: {ct}");
    }
    // applying twice replaces the table (no duplicate rules)
    node.run(|| apply_snat(&snat_cfg(false))).unwrap().unwrap();
    let again = String::from_utf8_lossy(
        &t.node
            .exec(&["nft", "list", "table", "ip", "vpc-cni"])
            .stdout,
    )
    .into_owned();
    assert_eq!(again.matches("snat to").count(), 1, "{again}");

    // negative control: without the fwmark rule the pod's traffic hits table 3's blackhole
    t.node.ip("rule del pref 1024");
    let _ = t.node.exec(&["conntrack", "-F"]);
    assert!(
        !t.pod.ping(OUTSIDE_IP),
        "egress worked without the fwmark rule?"
    );
    node.run(|| setup_host(&h)).unwrap().unwrap();
    assert!(t.pod.ping(OUTSIDE_IP));

    // NodePort: a connection arriving on eth0 for the node's address, DNATed to the pod (as
    // kube-proxy would), is connmarked on its first packet; the pod's replies get the mark
    // back and leave by eth0, not by the pod's ENI (whose wire is unplugged)
    let kube_proxy = [
        "add table ip kp",
        "add chain ip kp pre { type nat hook prerouting priority dstnat; }",
        &format!("add rule ip kp pre ip daddr {NODE_IP} icmp type echo-request dnat to {POD_IP}"),
    ];
    for cmd in kube_proxy {
        let args: Vec<&str> = std::iter::once("nft").chain(cmd.split(' ')).collect();
        assert!(t.node.exec(&args).status.success(), "nft {cmd}");
    }
    assert!(
        t.outside.ping_flow(NODE_IP),
        "NodePort flow to the pod not answered\n{}",
        t.node.dump()
    );
    let no_node_port = SnatConfig {
        node_port_support: false,
        ..snat_cfg(false)
    };
    node.run(|| apply_snat(&no_node_port)).unwrap().unwrap();
    let _ = t.node.exec(&["conntrack", "-F"]);
    assert!(
        !t.outside.ping_flow(NODE_IP),
        "NodePort replies found their way without the connmark?"
    );
    node.run(|| apply_snat(&snat_cfg(false))).unwrap().unwrap();
    assert!(
        t.node
            .exec(&["nft", "delete", "table", "ip", "kp"])
            .status
            .success()
    );

    // a second pod, on the primary ENI (main table): its only obstacle is the missing
    // route back from the outside, so this isolates SNAT itself
    let pod2 = TestNs::new("snat-pod2");
    let pod2_path = pod2.path();
    let spec2 = PodSpec {
        netns: &pod2_path,
        host_veth: "enitest1",
        ifname: "eth0",
        ip: Ipv4Addr::new(10, 77, 0, 51),
        mtu: 9001,
        route_table: MAIN_TABLE,
    };
    node.run(|| setup_pod(&spec2)).unwrap().unwrap();
    assert!(
        pod2.ping(OUTSIDE_IP),
        "primary-ENI pod -> outside failed with SNAT"
    );
    assert!(pod2.ping("10.77.0.50"), "pod2 -> pod (same node) failed");

    // external SNAT: no translation, the outside cannot answer
    node.run(|| apply_snat(&snat_cfg(true))).unwrap().unwrap();
    let _ = t.node.exec(&["conntrack", "-F"]);
    assert!(!pod2.ping(OUTSIDE_IP), "external_snat still SNATs");
    assert!(
        !t.pod.ping(OUTSIDE_IP),
        "external_snat still marks pod egress"
    );
    assert!(pod2.ping("10.77.0.50"), "pod2 -> pod (same node) failed");
    // excluded CIDR: like external SNAT for that destination only
    let mut c = snat_cfg(false);
    c.exclude_cidrs = vec!["203.0.113.0/24".parse().unwrap()];
    node.run(|| apply_snat(&c)).unwrap().unwrap();
    let _ = t.node.exec(&["conntrack", "-F"]);
    assert!(!pod2.ping(OUTSIDE_IP), "excluded destination was SNATed");

    node.run(remove_snat).unwrap().unwrap();
    assert!(
        !t.node
            .exec(&["nft", "list", "table", "ip", "vpc-cni"])
            .status
            .success()
    );
    node.run(remove_snat).unwrap().unwrap();
    let _ = &t.outside;
}

#[test]
#[ignore = "root: creates network namespaces and nftables tables in them"]
fn root_nodeport_return_path_uses_connmark() {
    require_root();
    let t = Topo::new("np");
    let node = t.node.open();
    let pod_path = t.pod.path();
    // secondary-ENI pod whose ENI leads nowhere (see root_snat_and_connmark_egress)
    t.node.ip("link add eth1 type veth peer name eth1p");
    t.node.ip("link set eth1 up");
    t.node.ip("route add default dev eth1 scope link table 3");
    t.node.ip(ENI2_RULE);
    let h = HostSetup {
        primary_ifname: "eth0".into(),
        connmark: 0x80,
        mtu: 9001,
    };
    node.run(|| setup_host(&h)).unwrap().unwrap();
    node.run(|| setup_pod(&pod_spec(&pod_path, 3)))
        .unwrap()
        .unwrap();
    // "kube-proxy": NodePort-style DNAT of pings to the node's primary IP onto the pod
    for cmd in [
        "add table ip kp",
        "add chain ip kp pre { type nat hook prerouting priority -100 ; }",
        "add rule ip kp pre iifname eth0 ip daddr 10.77.0.2 icmp type echo-request dnat to 10.77.0.50",
    ] {
        let args: Vec<&str> = std::iter::once("nft").chain(cmd.split(' ')).collect();
        let o = t.node.exec(&args);
        assert!(o.status.success(), "nft {cmd}: {o:?}");
    }

    let mut c = snat_cfg(false);
    c.node_port_support = false;
    node.run(|| apply_snat(&c)).unwrap().unwrap();
    assert!(
        !t.outside.ping(NODE_IP),
        "NodePort reply found its way without the connmark?"
    );

    c.node_port_support = true;
    node.run(|| apply_snat(&c)).unwrap().unwrap();
    let _ = t.node.exec(&["conntrack", "-F"]);
    assert!(
        t.outside.ping(NODE_IP),
        "NodePort reply from a secondary-ENI pod did not return via eth0\n{}",
        t.node.dump()
    );
}

#[test]
#[ignore = "root: creates a network namespace and rules in it"]
fn root_netlink_socket_opened_in_ns_works_from_any_thread() {
    use dataplane::netlink::Netlink;
    use dataplane::ops::{NetOps, Route, Rule};
    require_root();
    let ns = TestNs::new("nl");
    let handle = ns.open();
    // opened inside `ns`, used from this (root-namespace) thread
    let mut nl = Netlink::new_in(&handle).unwrap();
    let rule = Rule::new(4242, 77).from("10.99.0.1/32".parse().unwrap());
    nl.add_rule(&rule).unwrap();
    let again = nl.add_rule(&rule).unwrap_err();
    assert!(again.is_exists(), "{again}");
    assert!(nl.rules().unwrap().contains(&rule));
    assert!(ns.ip("rule").contains("4242:\tfrom 10.99.0.1 lookup 77"));
    let root_rules = Command::new("ip").arg("rule").output().unwrap();
    assert!(
        !String::from_utf8_lossy(&root_rules.stdout).contains("4242"),
        "rule leaked into root ns"
    );
    nl.del_rule(&rule).unwrap();
    let gone = nl.del_rule(&rule).unwrap_err();
    assert!(gone.is_not_found(), "{gone}");

    // errors keep the errno and name the operation
    assert_eq!(nl.link_by_name("nope0").unwrap(), None);
    let e = nl.set_link_up(9999).unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert!(e.to_string().contains("#9999"), "{e}");
    let lo = nl.link_by_name("lo").unwrap().unwrap();
    let r =
        Route::new(MAIN_TABLE, "10.98.0.0/24".parse().unwrap()).via("10.97.0.1".parse().unwrap());
    let e = nl.add_route(&r).unwrap_err();
    assert!(e.errno().is_some(), "{e}");
    assert!(
        e.to_string()
            .contains("add route 10.98.0.0/24 via 10.97.0.1"),
        "{e}"
    );
    let missing = nl
        .del_route(&Route::new(5, "10.98.0.0/24".parse().unwrap()))
        .unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
    assert!(
        nl.links()
            .unwrap()
            .iter()
            .any(|l| l.index == lo.index && l.name == "lo")
    );

    // sysctls through a handle of another namespace go to that namespace
    let root_fwd = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    let want = if root_fwd.trim() == "1" { "0" } else { "1" };
    nl.write_sysctl("net/ipv4/ip_forward", want).unwrap();
    let got = ns.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(String::from_utf8_lossy(&got.stdout).trim(), want);
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        root_fwd
    );
    let e = nl
        .write_sysctl("net/ipv6/conf/nope0/accept_ra", "0")
        .unwrap_err();
    assert_eq!(e.errno(), Some(nix::errno::Errno::ENOENT), "{e}");
    assert!(e.to_string().contains("nope0"), "{e}");
}

#[test]
#[ignore = "root: creates network namespaces, veths, routes and rules"]
fn root_parallel_pods_share_one_to_pod_rule() {
    require_root();
    let node = TestNs::new("par-node");
    node.ip("link set lo up");
    node.ip("link add eth0 type veth peer name eth0p");
    node.ip("link set eth0 up");
    let pods: Vec<TestNs> = (0..6)
        .map(|i| TestNs::new(&format!("par-pod{i}")))
        .collect();
    let paths: Vec<PathBuf> = pods.iter().map(|p| p.path()).collect();
    let names: Vec<String> = (0..6).map(|i| format!("enipar{i}")).collect();
    let n = node.open();
    let h = HostSetup {
        primary_ifname: "eth0".into(),
        connmark: 0x80,
        mtu: 9001,
    };
    n.run(|| setup_host(&h)).unwrap().unwrap(); // forwarding on
    // table 2 (a secondary ENI) has a default route out of eth0: without the to-pod table,
    // pod1's replies to pod0 would leave the node
    node.ip("route add default dev eth0 scope link table 2");
    // device 1's pod rule (setup_eni adds it) and the nft table that marks its pods' packets
    node.ip("rule add fwmark 0x100/0x3f00 lookup 2 pref 1536");
    let mut snat = snat_cfg(true);
    snat.veth_prefix = "enip".into();
    n.run(|| apply_snat(&snat)).unwrap().unwrap();
    let spec = |i: usize| PodSpec {
        netns: &paths[i],
        host_veth: &names[i],
        ifname: "eth0",
        ip: Ipv4Addr::new(10, 77, 1, 10 + i as u8),
        mtu: 1500,
        route_table: if i.is_multiple_of(2) { MAIN_TABLE } else { 2 },
    };
    std::thread::scope(|s| {
        for i in 0..6 {
            let n = &n;
            let spec = spec(i);
            s.spawn(move || n.run(|| setup_pod(&spec)).unwrap().unwrap());
        }
    });
    let rules = node.ip("rule");
    assert_eq!(
        rules.matches("512:\tfrom all lookup 512").count(),
        1,
        "{rules}"
    );
    assert_eq!(
        rules.matches("lookup 2").count(),
        1,
        "no per-pod rule: {rules}"
    );
    let group = node.ip(&format!("-o link show group {}", pod_group(1)));
    assert_eq!(group.matches("enipar").count(), 3, "{group}");
    for i in 0..6 {
        n.run(|| check_pod(&spec(i))).unwrap().unwrap();
    }
    // pod to pod on the same node, across ENIs
    assert!(pods[0].ping("10.77.1.11"), "pod0 -> pod1 failed");
    assert!(pods[1].ping("10.77.1.12"), "pod1 -> pod2 failed");
    // negative control: without `lookup 512` pod1's replies follow table 2 out of the node
    node.ip("rule del pref 512");
    assert!(
        !pods[0].ping("10.77.1.11"),
        "pod0 -> pod1 worked without the to-pod rule?"
    );
    n.run(|| setup_host(&h)).unwrap().unwrap();
    assert!(
        pods[0].ping("10.77.1.11"),
        "pod0 -> pod1 failed after restoring the rule"
    );
    std::thread::scope(|s| {
        for i in 0..6 {
            let n = &n;
            let (path, name) = (&paths[i], &names[i]);
            s.spawn(move || {
                let td = PodTeardown {
                    netns: Some(path),
                    host_veth: Some(name),
                    ifname: "eth0",
                    ip: Some(Ipv4Addr::new(10, 77, 1, 10 + i as u8)),
                };
                n.run(|| teardown_pod(&td)).unwrap().unwrap()
            });
        }
    });
    assert!(n.run(reap_retired_links).unwrap().unwrap());
    assert!(!node.ip("-o link").contains("enipar"));
    assert!(!node.ip("route show table all").contains("10.77.1."));
    assert!(!node.ip("rule").contains("10.77.1."));
}
