//! IPv4 prefixes in the lab without agents: a /28 assigned through the lab's EC2 emulation (an
//! EC2 proxy like the daemon's, in front of the lab's moto: an out-of-band change, as an
//! operator would make) shows in IMDS and is delivered to its ENI by the fabric — each of its
//! 16 addresses, ARP and the source/destination check included — until it is unassigned; the
//! `subnet-fragmented` knob (`vpc-lab fidelity set`) refuses prefixes meanwhile.
//! Needs root: ignored without it (`make test` runs it as root with --include-ignored).

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use lab_aws::world::World;

/// The prefixes world.json lists for `instance`'s ENI at device index 0.
fn eth0_prefixes(instance: &str) -> Vec<String> {
    let w: World = serde_json::from_value(world()).expect("world.json is a World");
    w.instance(instance)
        .and_then(|i| i.primary_eni())
        .map(|e| e.prefixes.iter().map(ToString::to_string).collect())
        .unwrap_or_default()
}

#[test]
#[ignore = "root: brings up the lab (network namespaces)"]
fn a_prefix_is_delivered_to_its_eni_until_released() {
    testkit::require_root();
    let _serial = serial();
    let _down = Down;
    lab_ok(&["up", "--no-agents"]);

    let state = lab::store::LabState::load().expect("the lab's state");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let world = rt
        .block_on(World::load(&state.ec2(), &state.vpc_id))
        .expect("the lab's world");
    let ec2 = proxy_ec2(&rt, &state, &world);
    let eth0 = world
        .instance("instance1")
        .and_then(|i| i.primary_eni())
        .expect("instance1's eth0")
        .clone();

    // A fragmented subnet has no /28 to give.
    lab_ok(&["fidelity", "set", "subnet-fragmented=all"]);
    let err = rt
        .block_on(ec2.assign_ipv4_prefixes(&eth0.id, 1))
        .unwrap_err();
    assert!(err.is_insufficient_cidr_blocks(), "{err}");
    lab_ok(&["fidelity", "set", "subnet-fragmented=none"]);

    let got = rt
        .block_on(ec2.assign_ipv4_prefixes(&eth0.id, 1))
        .expect("a /28 for instance1's eth0");
    let [p] = got[..] else {
        panic!("one prefix expected: {got:?}")
    };
    eprintln!("assigned {p} to {} (instance1 eth0)", eth0.id);
    wait_for(
        Duration::from_secs(10),
        "the lab daemon to see the prefix in EC2",
        || {
            eth0_prefixes("instance1")
                .contains(&p.to_string())
                .then_some(())
        },
        || format!("{:?}", eth0_prefixes("instance1")),
    );
    let imds = sh(
        "instance1",
        &format!(
            "t=$(curl -sf -X PUT -H 'x-aws-ec2-metadata-token-ttl-seconds: 60' http://127.0.0.1:1338/latest/api/token) && \
             curl -sf -H \"x-aws-ec2-metadata-token: $t\" http://127.0.0.1:1338/latest/meta-data/network/interfaces/macs/{}/ipv4-prefix",
            eth0.mac
        ),
    );
    assert_eq!(String::from_utf8_lossy(&imds.stdout).trim(), p.to_string());

    // All 16 addresses on instance1's eth0 answer instance2: the fabric answers ARP for them
    // and its check lets them through both ways.
    let addrs: Vec<Ipv4Addr> = (u32::from(p.network())..=u32::from(p.broadcast()))
        .map(Ipv4Addr::from)
        .collect();
    let add: String = addrs
        .iter()
        .map(|a| format!("ip addr add {a}/32 dev eth0 && "))
        .collect();
    let out = sh("instance1", &format!("{add}true"));
    assert!(out.status.success(), "adding the prefix's addresses");
    assert_eq!(unreachable("instance2", &addrs), Vec::<Ipv4Addr>::new());

    // Released: no longer delivered (instance2's neighbour cache still points at instance1,
    // so this is the destination check, not only ARP).
    rt.block_on(ec2.unassign_ipv4_prefixes(&eth0.id, &[p]))
        .expect("UnassignPrivateIpAddresses");
    wait_for(
        Duration::from_secs(10),
        "the lab daemon to see the prefix gone",
        || (!eth0_prefixes("instance1").contains(&p.to_string())).then_some(()),
        || format!("{:?}", eth0_prefixes("instance1")),
    );
    let sample = [addrs[0], addrs[7], addrs[15]];
    assert_eq!(unreachable("instance2", &sample), sample);
}
