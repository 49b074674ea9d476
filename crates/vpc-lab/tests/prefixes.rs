//! Issue 12 on the lab: prefix delegation on an m5.large (`ENABLE_PREFIX_DELEGATION=true`),
//! through the lab's EC2 proxy (which assigns /28 prefixes with EC2's rules and answers
//! `InsufficientCidrBlocks` on a subnet the `subnet-fragmented` knob fragments). One lab, in
//! phases: 0 → 110 pods at once and the 111th refused with code 11 and why; back to one
//! prefix; kill -9 of the agent while prefixes are being assigned, nothing leaked or given
//! twice; a fragmented subnet (fallback to secondary IPs, and back to prefixes); a switch to
//! secondary-IP mode with running pods. Figures are printed, not asserted (docs/benchmarks.md
//! has the side-by-side run). Needs root and the built binaries.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::*;
use ipnet::Ipv4Net;

const MAX_PODS: usize = 110;

fn up_with_prefixes() {
    lab_ok(&[
        "up",
        "--provisioning=instance1",
        "--fresh-nodes",
        "--agent-env",
        "ENABLE_PREFIX_DELEGATION=true",
        "--agent-env",
        "VPC_CNI_PREFIX_RETRY=5",
        "--agent-env",
        "VPC_CNI_MIN_ENI_AGE=2",
        "--agent-env",
        "IP_COOLDOWN_PERIOD=1",
    ]);
}

/// The prefixes EC2 holds on `instance_id`'s ENIs (the proxy keeps them in moto as a tag).
fn ec2_prefixes(ec2: &Ec2, instance_id: &str) -> BTreeSet<Ipv4Net> {
    ec2.attached(instance_id)
        .iter()
        .filter_map(|e| e.tags.get(lab_aws::fidelity::PREFIX_TAG))
        .flat_map(|v| lab_aws::fidelity::prefixes_from_tag(v))
        .collect()
}

/// The prefixes instance1's agent holds in its pool.
fn agent_prefixes() -> BTreeSet<Ipv4Net> {
    let st = agent_state("instance1").expect("the agent answers");
    st["enis"]
        .as_array()
        .expect("enis")
        .iter()
        .flat_map(|e| e["prefixes"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p.as_str().and_then(|s| s.parse().ok()))
        .collect()
}

/// ADDs `names` at once (a thread each, retried on code 11 like a runtime); returns their
/// addresses and the wall time.
fn burst(names: &[String]) -> (BTreeMap<String, Ipv4Addr>, Duration) {
    let t = Instant::now();
    let got = std::thread::scope(|s| {
        let handles: Vec<_> = names
            .chunks(names.len().div_ceil(12).max(1))
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .iter()
                        .map(|n| {
                            let (ip, _) = pod_add_retry("instance1", n, Duration::from_secs(90));
                            (n.clone(), ip)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("an ADD thread"))
            .collect::<BTreeMap<_, _>>()
    });
    (got, t.elapsed())
}

fn del_all(pods: &mut BTreeMap<String, Ipv4Addr>, keep: usize) {
    let names: Vec<String> = pods.keys().skip(keep).cloned().collect();
    std::thread::scope(|s| {
        for chunk in names.chunks(names.len().div_ceil(8).max(1)) {
            s.spawn(move || {
                for n in chunk {
                    pod_del_retry("instance1", n, Duration::from_secs(60));
                }
            });
        }
    });
    for n in names {
        pods.remove(&n);
    }
}

/// No address held twice; each pod's address in one of EC2's prefixes or secondary IPs of
/// instance1.
fn assert_unique_and_in_ec2(ec2: &Ec2, i1: &str, pods: &BTreeMap<String, Ipv4Addr>) {
    let mut seen: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
    for (p, ip) in pods {
        if let Some(other) = seen.insert(*ip, p) {
            panic!("{ip} is held by two pods: {other} and {p}");
        }
    }
    let prefixes = ec2_prefixes(ec2, i1);
    let secondary = ec2.secondary_ips(i1);
    for (p, ip) in pods {
        assert!(
            prefixes.iter().any(|pre| pre.contains(ip)) || secondary.contains(ip),
            "pod {p} holds {ip}: in none of {i1}'s prefixes {prefixes:?} nor its secondary IPs"
        );
    }
}

/// A number of instance1's agent's `/v1/state`.
fn state_number(field: &str) -> u64 {
    let st = agent_state("instance1").expect("the agent answers");
    st[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in the agent's state: {st}"))
}

/// Every address answers instance2's ping, within 10 s: an address EC2 has just assigned (or
/// moved from a released prefix to a secondary IP) reaches the fabric a moment after the call
/// returns, on the lab as on EC2.
fn assert_reachable(ips: &[Ipv4Addr]) {
    let mut lost = unreachable("instance2", ips);
    let t = Instant::now();
    while !lost.is_empty() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(500));
        lost = unreachable("instance2", &lost);
    }
    assert!(
        lost.is_empty(),
        "pods not reachable from instance2 within 10 s: {lost:?}"
    );
}

fn knob(kv: &str) {
    lab_ok(&["fidelity", "set", kv]);
}

fn mutating_calls(instance: &str) -> BTreeMap<String, u64> {
    ec2_calls(instance)
        .into_iter()
        .filter(|(api, _)| !api.starts_with("Describe"))
        .map(|(api, c)| (api, c["ok"].as_u64().unwrap_or(0)))
        .collect()
}

#[test]
#[ignore = "root: brings up the lab (network namespaces)"]
fn prefix_delegation_on_an_m5_large() {
    require_lab();
    let _serial = serial();
    let _down = Down;
    let t0 = Instant::now();
    up_with_prefixes();
    let ec2 = Ec2::new();
    let i1 = instance_id("instance1");
    wait_for(
        Duration::from_secs(30),
        "WARM_PREFIX_TARGET's one prefix on instance1",
        || (ec2_prefixes(&ec2, &i1).len() == 1).then_some(()),
        || format!("{:?}", ec2_prefixes(&ec2, &i1)),
    );
    let calls_before = mutating_calls("instance1");

    // 0 → 110 pods at once.
    let names: Vec<String> = (0..MAX_PODS).map(|n| format!("pd/p{n:03}")).collect();
    let (mut pods, took) = burst(&names);
    let calls: BTreeMap<String, u64> = mutating_calls("instance1")
        .into_iter()
        .map(|(api, n)| {
            (
                api.clone(),
                n - calls_before.get(&api).copied().unwrap_or(0),
            )
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    let enis = ec2.attached(&i1).len();
    eprintln!("0 → {MAX_PODS} pods in {took:?}; mutating EC2 calls {calls:?} on {enis} ENIs");
    assert_eq!(pods.len(), MAX_PODS);
    assert_unique_and_in_ec2(&ec2, &i1, &pods);
    assert!(
        ec2.secondary_ips(&i1).is_empty(),
        "pods got prefix addresses, not secondary IPs"
    );
    let mutating: u64 = calls.values().sum();
    assert!(
        mutating <= 4 * enis as u64,
        "at most 4 mutating EC2 calls per ENI: {calls:?} on {enis} ENIs"
    );
    assert_eq!(agent_prefixes(), ec2_prefixes(&ec2, &i1));
    let ips: Vec<Ipv4Addr> = pods.values().copied().collect();
    assert_reachable(&ips);

    // The 111th: code 11 and the reason.
    match pod_add_once("instance1", "pd/one-too-many") {
        Add::Ok(ip) => panic!("pod {} got {ip} beyond max pods", MAX_PODS + 1),
        Add::Failed(code, msg) => {
            assert_eq!(code, 11, "{msg}");
            assert!(
                msg.contains("max pods is 110 (m5.large with prefix delegation)"),
                "the refusal says why: {msg}"
            );
        }
    }

    // And back: every pod goes, the free prefixes go back but WARM_PREFIX_TARGET's one.
    del_all(&mut pods, 0);
    wait_for(
        Duration::from_secs(75),
        "instance1 back to one prefix in EC2",
        || (ec2_prefixes(&ec2, &i1).len() == 1).then_some(()),
        || format!("{:?}", ec2_prefixes(&ec2, &i1)),
    );
    eprintln!("back to one prefix after {:?}", t0.elapsed());

    // kill -9 while prefixes are being assigned (EC2 answers 1.5 s late): nothing leaked,
    // nothing given twice.
    knob("ec2-latency-ms=1500");
    let names: Vec<String> = (0..60).map(|n| format!("pd/k{n:02}")).collect();
    let (killed, more) = std::thread::scope(|s| {
        let adds = s.spawn(|| burst(&names));
        std::thread::sleep(Duration::from_millis(800));
        lab_ok(&["agent", "kill", "instance1"]);
        std::thread::sleep(Duration::from_millis(500));
        knob("ec2-latency-ms=0");
        lab_ok(&["agent", "start", "instance1"]);
        (true, adds.join().expect("the ADDs").0)
    });
    assert!(killed);
    pods.extend(more);
    assert_unique_and_in_ec2(&ec2, &i1, &pods);
    wait_for(
        Duration::from_secs(30),
        "the agent's prefixes to be EC2's",
        || (agent_prefixes() == ec2_prefixes(&ec2, &i1)).then_some(()),
        || {
            format!(
                "agent {:?}, EC2 {:?}",
                agent_prefixes(),
                ec2_prefixes(&ec2, &i1)
            )
        },
    );
    eprintln!(
        "kill -9 during assignment: {} pods, prefixes {:?}",
        pods.len(),
        ec2_prefixes(&ec2, &i1)
    );

    // A fragmented subnet: secondary IPs instead, said in a metric; prefixes again after.
    knob("subnet-fragmented=all");
    let names: Vec<String> = (0..25).map(|n| format!("pd/f{n:02}")).collect();
    let (more, _) = burst(&names);
    pods.extend(more);
    assert_unique_and_in_ec2(&ec2, &i1, &pods);
    assert!(
        !ec2.secondary_ips(&i1).is_empty(),
        "without a free /28, the node got secondary IPs"
    );
    assert!(state_number("prefixFallbacks") >= 1);
    let before = ec2_prefixes(&ec2, &i1).len();
    knob("subnet-fragmented=none");
    std::thread::sleep(Duration::from_secs(6));
    let names: Vec<String> = (0..MAX_PODS - pods.len())
        .map(|n| format!("pd/b{n:02}"))
        .collect();
    let (more, _) = burst(&names);
    pods.extend(more);
    assert_unique_and_in_ec2(&ec2, &i1, &pods);
    wait_for(
        Duration::from_secs(30),
        "a new prefix once the subnet has free /28s again",
        || (ec2_prefixes(&ec2, &i1).len() > before).then_some(()),
        || format!("{:?}", ec2_prefixes(&ec2, &i1)),
    );
    assert_eq!(state_number("prefixFallbackEnis"), 0);

    // Switch to secondary IPs with ten pods running: they keep their addresses; new pods
    // get secondary IPs.
    del_all(&mut pods, 10);
    lab_ok(&[
        "agent",
        "restart",
        "instance1",
        "--agent-env",
        "ENABLE_PREFIX_DELEGATION=false",
    ]);
    for p in pods.keys() {
        let out = lab_quiet(&["pod", "check", "instance1", p]);
        assert!(
            out.status.success(),
            "CHECK {p} after the switch: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let names: Vec<String> = (0..3).map(|n| format!("pd/s{n}")).collect();
    let (more, _) = burst(&names);
    let prefixes = ec2_prefixes(&ec2, &i1);
    for (p, ip) in &more {
        assert!(
            !prefixes.iter().any(|pre| pre.contains(ip)),
            "{p} got {ip} from a prefix in secondary-IP mode"
        );
    }
    pods.extend(more);
    assert_unique_and_in_ec2(&ec2, &i1, &pods);
    let ips: Vec<Ipv4Addr> = pods.values().copied().collect();
    assert_reachable(&ips);
    eprintln!("prefix delegation on the lab: {:?}", t0.elapsed());
}
