//! Sequencing tests against the in-memory fake (no root needed).

use std::cell::RefCell;
use std::net::Ipv4Addr;
use std::path::Path;
use std::rc::Rc;

use ipnet::Ipv4Net;
use nix::errno::Errno;

use super::*;
use crate::fake::{FakeNet, FakeNs, FakeWorld};
use crate::host::{EniSetup, HostSetup, setup_eni_with, setup_host_with, teardown_eni_with};
use crate::ops::Mac;

const IP: Ipv4Addr = Ipv4Addr::new(172, 31, 13, 130);

fn spec(table: u32) -> PodSpec<'static> {
    PodSpec {
        netns: Path::new("/run/netns/fake-pod"),
        host_veth: "enia1b2c3d4e5f",
        ifname: "eth0",
        ip: IP,
        mtu: 9001,
        route_table: table,
    }
}

fn world() -> (Rc<RefCell<FakeWorld>>, FakeNet, FakeNet) {
    let w = FakeWorld::new(&["host", "pod"]);
    let h = FakeNet::new(&w, "host");
    let p = FakeNet::new(&w, "pod");
    (w, h, p)
}

fn ip32(ip: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::new(ip, 32).unwrap()
}

fn strip_log(w: &FakeWorld) -> Vec<String> {
    // drop the volatile `#<index>` so the expected order is readable
    w.log
        .iter()
        .map(|l| {
            l.split_whitespace()
                .filter(|t| !t.starts_with('#'))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

#[test]
fn setup_builds_everything_in_order() {
    let (w, mut h, mut p) = world();
    let links = setup_pod_with(&mut h, &mut p, &spec(3)).unwrap();
    let log = strip_log(&w.borrow());
    let expected = [
        "host: create veth enia1b2c3d4e5f peer eth0@pod",
        "host: sysctl net/ipv6/conf/enia1b2c3d4e5f/accept_ra=0",
        "host: sysctl net/ipv6/conf/enia1b2c3d4e5f/accept_redirects=1",
        "host: sysctl net/ipv6/conf/enia1b2c3d4e5f/forwarding=0",
        "host: set link up",
        "pod: set link up", // lo
        "pod: set link up", // eth0
        "pod: add address 172.31.13.130/32 dev",
        "pod: replace route 169.254.1.1/32 dev scope link table 254",
        "pod: replace route 0.0.0.0/0 via 169.254.1.1 dev table 254",
        "pod: replace neighbour 169.254.1.1 dev",
        "host: replace route 172.31.13.130/32 dev scope link table 254",
        "host: replace route 172.31.13.130/32 dev scope link table 512",
        "host: add rule from all lookup 512 pref 512",
    ];
    assert_eq!(log, expected);
    // the secondary-ENI pod's host veth is in its ENI's group (device 2: table 3)
    assert_eq!(
        w.borrow()
            .ns("host")
            .links
            .values()
            .find(|l| l.name == "enia1b2c3d4e5f")
            .unwrap()
            .group,
        crate::pod_group(2)
    );
    // CHECK wants the ENI's fwmark rule, which the agent's ENI setup adds
    let e = check_pod_with(&mut h, &mut p, &spec(3))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("fwmark 0x200/0x3f00 lookup 3 pref 1536 missing"),
        "{e}"
    );
    w.borrow_mut().ns_mut("host").rules.push(eni_rule(2));

    let wb = w.borrow();
    let hv = wb
        .ns("host")
        .links
        .values()
        .find(|l| l.name == "enia1b2c3d4e5f")
        .unwrap();
    assert_eq!(hv.mac.unwrap().to_string(), links.host_mac);
    assert_eq!(
        hv.mac.unwrap().0[0] & 0x03,
        0x02,
        "locally administered unicast"
    );
    assert_eq!(hv.mtu, 9001);
    let nb = &wb.ns("pod").neighbours[0];
    assert_eq!(nb.mac, hv.mac);
    assert_eq!(nb.state, NUD_PERMANENT);
    assert_eq!(links.container_ifname, "eth0");
    drop(wb);
    check_pod_with(&mut h, &mut p, &spec(3)).unwrap();
}

#[test]
fn primary_eni_pod_has_no_from_rule() {
    let (w, mut h, mut p) = world();
    setup_pod_with(&mut h, &mut p, &spec(MAIN_TABLE)).unwrap();
    let rules = w.borrow().ns("host").rules.clone();
    assert_eq!(rules, vec![Rule::new(512, 512)]);
    check_pod_with(&mut h, &mut p, &spec(MAIN_TABLE)).unwrap();
}

/// Links/addresses/routes/rules/neighbours, without the `up` flag of `lo` and sysctls
/// (neither is undone on rollback by design).
fn net_state(ns: &FakeNs) -> (Vec<String>, usize, usize, Vec<Rule>, usize) {
    (
        ns.links.values().map(|l| l.name.clone()).collect(),
        ns.addresses.len(),
        ns.routes.len(),
        ns.rules.clone(),
        ns.neighbours.len(),
    )
}

#[test]
fn failure_at_every_step_rolls_back_everything() {
    // how many mutating calls does a full setup make?
    let (w, mut h, mut p) = world();
    setup_pod_with(&mut h, &mut p, &spec(3)).unwrap();
    let total = w.borrow().mutations;
    assert!(total >= 14);

    for preinstalled in [true, false] {
        for k in 0..total {
            let (w, mut h, mut p) = world();
            if preinstalled {
                w.borrow_mut()
                    .ns_mut("host")
                    .rules
                    .push(Rule::new(512, 512));
            }
            let before_host = net_state(w.borrow().ns("host"));
            let before_pod = net_state(w.borrow().ns("pod"));
            w.borrow_mut().fail_at = Some(k);
            let err = setup_pod_with(&mut h, &mut p, &spec(3)).unwrap_err();
            assert!(err.to_string().contains("injected"), "step {k}: {err}");
            let wb = w.borrow();
            let mut after_host = net_state(wb.ns("host"));
            if !preinstalled {
                // the shared to-pod rule may stay (other pods rely on it)
                after_host.3.retain(|r| *r != Rule::new(512, 512));
            }
            assert_eq!(
                after_host, before_host,
                "host not clean after failing step {k}: {:?}",
                wb.log
            );
            assert_eq!(
                net_state(wb.ns("pod")),
                before_pod,
                "pod not clean after failing step {k}"
            );
        }
    }
}

#[test]
fn existing_container_interface_is_an_error_and_nothing_is_created() {
    let (w, mut h, mut p) = world();
    w.borrow_mut().add_link("pod", "eth0", None, Some("veth"));
    let err = setup_pod_with(&mut h, &mut p, &spec(3)).unwrap_err();
    assert!(
        matches!(err, DataplaneError::InterfaceExists { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("eth0"));
    assert_eq!(w.borrow().mutations, 0);
}

#[test]
fn stale_host_veth_is_replaced() {
    let (w, mut h, mut p) = world();
    let stale = w
        .borrow_mut()
        .add_link("host", "enia1b2c3d4e5f", None, Some("veth"));
    setup_pod_with(&mut h, &mut p, &spec(3)).unwrap();
    let wb = w.borrow();
    assert!(
        wb.log[0].starts_with(&format!("host: delete link #{stale}")),
        "{:?}",
        wb.log
    );
    let hv = wb
        .ns("host")
        .links
        .values()
        .find(|l| l.name == "enia1b2c3d4e5f")
        .unwrap();
    assert_ne!(hv.index, stale);
}

#[test]
fn invalid_spec_is_rejected_naming_the_value() {
    let (_w, mut h, mut p) = world();
    let mut s = spec(3);
    s.host_veth = "this-name-is-way-too-long";
    let e = setup_pod_with(&mut h, &mut p, &s).unwrap_err();
    assert!(e.to_string().contains("this-name-is-way-too-long"));
    let mut s = spec(3);
    s.mtu = 10;
    assert!(
        setup_pod_with(&mut h, &mut p, &s)
            .unwrap_err()
            .to_string()
            .contains("10")
    );
}

#[test]
fn missing_ipv6_sysctls_are_ignored() {
    let (w, mut h, mut p) = world();
    w.borrow_mut().ns_mut("host").known_sysctls = Some(vec![]);
    setup_pod_with(&mut h, &mut p, &spec(3)).unwrap();
}

#[test]
fn check_names_what_is_missing() {
    let (w, mut h, mut p) = world();
    setup_pod_with(&mut h, &mut p, &spec(3)).unwrap();
    w.borrow_mut().ns_mut("pod").neighbours.clear();
    let e = check_pod_with(&mut h, &mut p, &spec(3)).unwrap_err();
    let s = e.to_string();
    assert!(s.contains("neighbour 169.254.1.1 missing"), "{s}");
    w.borrow_mut()
        .ns_mut("host")
        .rules
        .retain(|r| r.priority != crate::FROM_POD_RULE_PRIORITY);
    w.borrow_mut()
        .ns_mut("host")
        .routes
        .retain(|r| r.table != TO_POD_TABLE);
    let s = check_pod_with(&mut h, &mut p, &spec(3))
        .unwrap_err()
        .to_string();
    assert!(s.contains("lookup 3 pref 1536 missing"), "{s}");
    assert!(s.contains("missing in table 512"), "{s}");
}

#[test]
fn check_detects_wrong_neighbour_mac_and_mtu() {
    let (w, mut h, mut p) = world();
    setup_pod_with(&mut h, &mut p, &spec(3)).unwrap();
    w.borrow_mut().ns_mut("pod").neighbours[0].mac = Some(Mac([2, 0, 0, 0, 0, 1]));
    let s = check_pod_with(&mut h, &mut p, &spec(3))
        .unwrap_err()
        .to_string();
    assert!(s.contains("02:00:00:00:00:01"), "{s}");
    let mut s2 = spec(3);
    s2.mtu = 1500;
    let s = check_pod_with(&mut h, &mut p, &s2).unwrap_err().to_string();
    assert!(s.contains("MTU 9001 instead of 1500"), "{s}");
}

fn td(host_veth: Option<&'static str>) -> PodTeardown<'static> {
    PodTeardown {
        netns: Some(Path::new("/run/netns/fake-pod")),
        host_veth,
        ifname: "eth0",
        ip: Some(IP),
    }
}

#[test]
fn teardown_removes_everything_including_legacy_rules_and_is_idempotent() {
    let (w, mut h, mut p) = world();
    setup_pod_with(&mut h, &mut p, &spec(3)).unwrap();
    {
        let mut wb = w.borrow_mut();
        let rules = &mut wb.ns_mut("host").rules;
        // reference leftovers: per-pod to-rule and legacy from-rules in other tables
        rules.push(Rule::new(512, MAIN_TABLE).to(ip32(IP)));
        rules.push(Rule::new(1536, 4).from(ip32(IP)));
        // an unrelated pod's rule must stay
        rules.push(Rule::new(1536, 3).from(ip32(Ipv4Addr::new(172, 31, 13, 131))));
    }
    teardown_pod_with(&mut h, Some(&mut p), &td(Some("enia1b2c3d4e5f"))).unwrap();
    {
        let wb = w.borrow();
        let host = wb.ns("host");
        // the veth pair is retired (down, in the retired group), not deleted
        let retired = host.links_but_lo();
        assert_eq!(retired.len(), 1, "{:?}", host.links);
        assert!(retired[0].group == RETIRED_LINK_GROUP && !retired[0].up);
        let pod_eth0 = wb.ns("pod").links_but_lo();
        assert!(pod_eth0[0].group == RETIRED_LINK_GROUP && !pod_eth0[0].up);
        assert!(host.routes.is_empty(), "{:?}", host.routes);
        assert_eq!(
            host.rules,
            vec![
                Rule::new(512, 512),
                Rule::new(1536, 3).from(ip32(Ipv4Addr::new(172, 31, 13, 131)))
            ]
        );
    }
    // twice: still fine, and nothing mutated
    let before = w.borrow().mutations;
    teardown_pod_with(&mut h, Some(&mut p), &td(Some("enia1b2c3d4e5f"))).unwrap();
    assert_eq!(w.borrow().mutations, before);
    // the reaper deletes the pair
    assert!(reap_retired_links_with(&mut h).unwrap());
    assert_eq!(w.borrow().ns("host").links.len(), 1);
    assert_eq!(w.borrow().ns("pod").links.len(), 1);
    assert!(!reap_retired_links_with(&mut h).unwrap());
}

#[test]
fn del_renames_the_retired_pair_so_the_same_pod_can_be_added_again_at_once() {
    let (w, mut h, mut p) = world();
    setup_pod_with(&mut h, &mut p, &spec(3)).unwrap();
    teardown_pod_with(&mut h, Some(&mut p), &td(Some("enia1b2c3d4e5f"))).unwrap();
    {
        let wb = w.borrow();
        for ns in ["host", "pod"] {
            let l = wb.ns(ns).links_but_lo();
            assert_eq!(l.len(), 1);
            assert_eq!(l[0].name, format!("vcr{}", l[0].index), "{ns}: {l:?}");
        }
    }
    // same pod, same netns: no deletion needed, both names are free
    let before = w.borrow().log.len();
    let links = setup_pod_with(&mut h, &mut p, &spec(3)).unwrap();
    assert!(
        !w.borrow().log[before..]
            .iter()
            .any(|l| l.contains("delete")),
        "{:?}",
        &w.borrow().log[before..]
    );
    let wb = w.borrow();
    let live: Vec<&Link> = wb
        .ns("host")
        .links_but_lo()
        .into_iter()
        .filter(|l| l.group != RETIRED_LINK_GROUP)
        .collect();
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].mac.unwrap().to_string(), links.host_mac);
    drop(wb);
    // a live (not retired) eth0 is still refused
    let e = setup_pod_with(&mut h, &mut p, &spec(3)).unwrap_err();
    assert!(matches!(e, DataplaneError::InterfaceExists { .. }), "{e}");
}

#[test]
fn add_deletes_a_retired_interface_that_kept_its_name() {
    let (w, mut h, mut p) = world();
    setup_pod_with(&mut h, &mut p, &spec(3)).unwrap();
    w.borrow_mut().fail_matching = vec![("rename".into(), Errno::EEXIST)];
    teardown_pod_with(&mut h, Some(&mut p), &td(Some("enia1b2c3d4e5f"))).unwrap();
    w.borrow_mut().fail_matching.clear();
    assert!(
        w.borrow()
            .ns("pod")
            .links
            .values()
            .any(|l| l.name == "eth0")
    );
    setup_pod_with(&mut h, &mut p, &spec(3)).unwrap();
    let wb = w.borrow();
    let host = wb.ns("host").links_but_lo();
    assert_eq!(host.len(), 1, "the retired pair was deleted: {host:?}");
    assert!(host[0].up && host[0].group == crate::pod_group(2));
}

#[test]
fn teardown_with_pod_netns_gone() {
    let (w, mut h, mut p) = world();
    setup_pod_with(&mut h, &mut p, &spec(3)).unwrap();
    w.borrow_mut().delete_namespace("pod");
    teardown_pod_with(&mut h, None, &td(Some("enia1b2c3d4e5f"))).unwrap();
    let wb = w.borrow();
    assert!(wb.ns("host").routes.is_empty());
    assert_eq!(wb.ns("host").rules, vec![Rule::new(512, 512)]);
}

#[test]
fn teardown_finds_veth_via_route_when_name_unknown() {
    let (w, mut h, mut p) = world();
    setup_pod_with(&mut h, &mut p, &spec(3)).unwrap();
    teardown_pod_with(&mut h, None, &td(None)).unwrap();
    assert!(w.borrow().ns("host").routes.is_empty());
    assert!(
        reap_retired_links_with(&mut h).unwrap(),
        "host veth not retired"
    );
    let wb = w.borrow();
    assert_eq!(wb.ns("host").links.len(), 1);
    assert_eq!(wb.ns("pod").links.len(), 1, "peer not deleted");
}

#[test]
fn teardown_via_route_never_deletes_a_non_veth_link() {
    let (w, mut h, _p) = world();
    let eth0 = w.borrow_mut().add_link("host", "eth0", None, None);
    w.borrow_mut().ns_mut("host").routes.push(
        Route::new(MAIN_TABLE, ip32(IP))
            .dev(eth0)
            .scope(Scope::Link),
    );
    teardown_pod_with(&mut h, None, &td(Some("gone-veth"))).unwrap();
    let wb = w.borrow();
    assert!(wb.ns("host").links.contains_key(&eth0), "eth0 was deleted!");
    assert!(wb.ns("host").routes.is_empty(), "stale route stays");
}

#[test]
fn teardown_continues_after_errors_and_reports_all() {
    let (w, mut h, mut p) = world();
    setup_pod_with(&mut h, &mut p, &spec(3)).unwrap();
    {
        // the reference's per-pod rules (a node migrated from aws-vpc-cni)
        let mut wb = w.borrow_mut();
        let rules = &mut wb.ns_mut("host").rules;
        rules.push(Rule::new(512, MAIN_TABLE).to(ip32(IP)));
        rules.push(Rule::new(1536, 3).from(ip32(IP)));
    }
    w.borrow_mut().fail_matching = vec![
        ("host: delete rule".into(), Errno::EPERM),
        ("table 512".into(), Errno::EBUSY),
    ];
    let err = teardown_pod_with(&mut h, Some(&mut p), &td(Some("enia1b2c3d4e5f"))).unwrap_err();
    // two rules + the table-512 route failed
    assert_eq!(err.errors.len(), 3, "{err}");
    let s = err.to_string();
    assert!(s.contains("lookup 3 pref 1536"), "{s}");
    assert!(s.contains("to 172.31.13.130/32 lookup 254 pref 512"), "{s}");
    assert!(s.contains("table 512"), "{s}");
    // later steps still ran: the main route is gone and the veth retired
    let wb = w.borrow();
    assert!(
        wb.ns("host")
            .links
            .values()
            .any(|l| l.kind.as_deref() == Some("veth") && l.group == RETIRED_LINK_GROUP && !l.up)
    );
    assert!(!wb.ns("host").routes.iter().any(|r| r.table == MAIN_TABLE));
}

#[test]
fn host_setup_is_idempotent_and_replaces_an_old_fwmark_rule() {
    let w = FakeWorld::new(&["node"]);
    let mut n = FakeNet::new(&w, "node");
    let eth0 = w.borrow_mut().add_link("node", "eth0", None, None);
    w.borrow_mut()
        .ns_mut("node")
        .rules
        .push(Rule::new(1024, MAIN_TABLE).fwmark(0x40, 0x40));
    let h = HostSetup {
        primary_ifname: "eth0".into(),
        connmark: 0x80,
        mtu: 9001,
    };
    setup_host_with(&mut n, &h).unwrap();
    setup_host_with(&mut n, &h).unwrap();
    let wb = w.borrow();
    let ns = wb.ns("node");
    assert_eq!(
        ns.links[&eth0].mtu, 9001,
        "the primary interface gets AWS_VPC_ENI_MTU"
    );
    assert_eq!(
        ns.rules,
        vec![
            Rule::new(1024, MAIN_TABLE).fwmark(0x80, 0x80),
            Rule::new(512, 512)
        ]
    );
    assert_eq!(ns.sysctls["net/ipv4/ip_forward"], "1");
    assert_eq!(ns.sysctls["net/ipv4/conf/eth0/rp_filter"], "2");
}

#[test]
fn eni_setup_builds_table_and_rule_idempotently() {
    let w = FakeWorld::new(&["node"]);
    let mut n = FakeNet::new(&w, "node");
    let mac = Mac([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]);
    let idx = w.borrow_mut().add_link("node", "eth1", Some(mac), None);
    // a foreign address and its kernel subnet route
    n.add_address(&Address {
        index: idx,
        addr: "10.9.9.9/24".parse().unwrap(),
        scope: Scope::Universe,
    })
    .unwrap();
    let e = EniSetup {
        mac: "02:11:22:33:44:55".into(),
        device_number: 2,
        primary_ip: Ipv4Addr::new(172, 31, 3, 173),
        subnet: "172.31.0.0/20".parse().unwrap(),
        mtu: 9001,
    };
    // An earlier ENI at device 2 (detached while the agent was down) left its primary's rule.
    let stale =
        Rule::new(crate::ENI_PRIMARY_RULE_PRIORITY, 3).from("172.31.4.24/32".parse().unwrap());
    n.add_rule(&stale).unwrap();
    assert_eq!(setup_eni_with(&mut n, &e).unwrap(), "eth1");
    assert!(
        !w.borrow().ns("node").rules.contains(&stale),
        "the earlier ENI's rule for this table is gone"
    );
    let snapshot = w.borrow().ns("node").clone();
    assert_eq!(setup_eni_with(&mut n, &e).unwrap(), "eth1");
    let wb = w.borrow();
    let ns = wb.ns("node");
    assert_eq!(ns, &snapshot, "second setup_eni changed state");
    let l = &ns.links[&idx];
    assert!(l.up);
    assert_eq!(l.mtu, 9001);
    assert_eq!(
        ns.addresses
            .iter()
            .map(|a| a.addr.to_string())
            .collect::<Vec<_>>(),
        vec!["172.31.3.173/20"]
    );
    let t3: Vec<String> = ns
        .routes
        .iter()
        .filter(|r| r.table == 3)
        .map(|r| r.to_string())
        .collect();
    assert_eq!(t3.len(), 2);
    assert!(
        ns.routes
            .iter()
            .any(|r| r.table == 3 && r.gateway == Some(Ipv4Addr::new(172, 31, 0, 1)))
    );
    assert!(
        ns.routes.iter().all(|r| r.table != MAIN_TABLE),
        "subnet route kept: {:?}",
        ns.routes
    );
    assert_eq!(
        ns.rules,
        vec![
            Rule::new(32765, 3).from(ip32(Ipv4Addr::new(172, 31, 3, 173))),
            Rule::new(1536, 3).fwmark(0x200, 0x3f00),
        ]
    );
    assert_eq!(
        ns.sysctls["net/ipv4/conf/eth1/rp_filter"], "2",
        "{:?}",
        ns.sysctls
    );
    drop(wb);

    teardown_eni_with(&mut n, 2, Ipv4Addr::new(172, 31, 3, 173)).unwrap();
    teardown_eni_with(&mut n, 2, Ipv4Addr::new(172, 31, 3, 173)).unwrap();
    let wb = w.borrow();
    assert!(wb.ns("node").rules.is_empty());
    assert!(wb.ns("node").routes.iter().all(|r| r.table != 3));
}

#[test]
fn eni_setup_errors_name_the_problem() {
    let w = FakeWorld::new(&["node"]);
    let mut n = FakeNet::new(&w, "node");
    let mut e = EniSetup {
        mac: "02:11:22:33:44:55".into(),
        device_number: 1,
        primary_ip: Ipv4Addr::new(172, 31, 3, 173),
        subnet: "172.31.0.0/20".parse().unwrap(),
        mtu: 9001,
    };
    let s = setup_eni_with(&mut n, &e).unwrap_err().to_string();
    assert!(s.contains("02:11:22:33:44:55"), "{s}");
    e.device_number = 0;
    assert!(setup_eni_with(&mut n, &e).is_err());
    e.device_number = 64;
    let s = setup_eni_with(&mut n, &e).unwrap_err().to_string();
    assert!(s.contains("64") && s.contains("0x3f00"), "{s}");
    e.device_number = 1;
    e.mac = "zz".into();
    assert!(
        setup_eni_with(&mut n, &e)
            .unwrap_err()
            .to_string()
            .contains("zz")
    );
}

#[test]
fn wired_pods_follow_setup_and_teardown() {
    let (_w, mut h, mut p) = world();
    assert!(wired_pods_with(&mut h).unwrap().is_empty());
    setup_pod_with(&mut h, &mut p, &spec(3)).unwrap();
    assert_eq!(
        wired_pods_with(&mut h)
            .unwrap()
            .into_iter()
            .collect::<Vec<_>>(),
        vec![(IP, "enia1b2c3d4e5f".to_string())]
    );
    teardown_pod_with(&mut h, Some(&mut p), &td(Some("enia1b2c3d4e5f"))).unwrap();
    assert!(wired_pods_with(&mut h).unwrap().is_empty());
}
