//! `vpc-cni-agent init`'s sysctls on a real kernel, in a network namespace the test creates
//! (never the host's): the primary interface found by its MAC, the values written there.

use agent::init::{set_sysctls, sysctls};
use dataplane::netlink::Netlink;
use testkit::{TestNs, require_root};

fn read(ns: &TestNs, key: &str) -> String {
    let out = ns.exec(&["cat", &format!("/proc/sys/{key}")]);
    assert!(
        out.status.success(),
        "cat /proc/sys/{key} in {}: {out:?}",
        ns.name()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn write(ns: &TestNs, key: &str, value: &str) {
    let out = ns.exec(&["sh", "-c", &format!("echo {value} > /proc/sys/{key}")]);
    assert!(
        out.status.success(),
        "{key}={value} in {}: {out:?}",
        ns.name()
    );
}

#[test]
#[ignore = "root: creates a network namespace and writes sysctls in it"]
fn init_sets_the_reference_sysctls_in_the_node_namespace() {
    require_root();
    let host_demux = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_early_demux").unwrap();
    let ns = TestNs::new("init");
    // A node with interfaces (a veth pair: this kernel may have no dummy driver); the primary
    // ENI's MAC is ens5's.
    ns.ip("link add eth0 address 02:00:00:00:00:01 type veth peer name ens5 address 02:00:00:00:00:aa");
    write(&ns, "net/ipv4/tcp_early_demux", "0");
    write(&ns, "net/ipv4/conf/ens5/rp_filter", "1");
    assert_eq!(read(&ns, "net/ipv4/tcp_early_demux"), "0");

    let mut n = Netlink::new_in(&ns.open()).expect("netlink in the test namespace");
    let (ifname, set) = set_sysctls(&mut n, "02:00:00:00:00:AA").unwrap();
    assert_eq!(ifname, "ens5");
    assert_eq!(set, sysctls("ens5"));
    for s in &set {
        assert_eq!(read(&ns, &s.key), s.value, "{s}");
    }
    assert_eq!(
        read(&ns, "net/ipv4/conf/eth0/rp_filter"),
        read(&ns, "net/ipv4/conf/default/rp_filter"),
        "another interface is left alone"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_early_demux").unwrap(),
        host_demux,
        "the host's namespace is untouched"
    );

    // Again: idempotent. An unknown MAC is an error naming it.
    set_sysctls(&mut n, "02:00:00:00:00:aa").unwrap();
    let e = set_sysctls(&mut n, "02:00:00:00:00:bb").unwrap_err();
    assert!(e.to_string().contains("02:00:00:00:00:bb"), "{e}");
}
