//! `vpc-lab bench-prefixes`: prefix delegation side by side with secondary IPs, in one run on
//! the same lab build. For each mode a fresh lab brings up instance1 (an m5.large, provisioning
//! through the lab's EC2 proxy), then its max pods in that mode (27 with secondary IPs, 110 with
//! prefixes) are ADDed at once from `parallel` threads, each retrying on code 11 as a runtime
//! does. Reported: the wall time until every pod has its address, the ADD call's latency (the
//! successful call) and the time to an address (retries included), code-11 retries, and the
//! EC2 calls by API (as the proxy counts them) from the start of the burst until the pool
//! settles.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use lab::control::{self, UpOptions};
use lab::pods;
use lab_aws::fidelity::CallCount;
use testkit::stats::{Summary, ms};

use crate::bench::{LabNode, NODE, diff, node_stats};

/// One mode's figures.
#[derive(Debug)]
struct Run {
    mode: &'static str,
    pods: usize,
    wall: Duration,
    add_ms: Summary,
    to_address_ms: Summary,
    retries: u32,
    calls: BTreeMap<String, CallCount>,
    enis: usize,
}

/// `vpc-lab bench-prefixes`.
pub fn run(parallel: usize) -> Result<()> {
    let t0 = Instant::now();
    let mut runs = Vec::new();
    for prefixes in [false, true] {
        control::up(&UpOptions {
            agent_env: vec![
                ("VPC_CNI_MIN_ENI_AGE".into(), "2".into()),
                ("IP_COOLDOWN_PERIOD".into(), "1".into()),
                ("ENABLE_PREFIX_DELEGATION".into(), prefixes.to_string()),
            ],
            provisioning: Some(vec![NODE.to_string()]),
            fresh_nodes: true,
            ..UpOptions::default()
        })?;
        let r = measure(prefixes, parallel);
        let down = control::down();
        runs.push(r?);
        down?;
    }
    print_table(&runs, parallel, t0.elapsed());
    Ok(())
}

/// The max pods of the node's type in a mode, as the agent computes it (ENIs × slots ×
/// addresses per slot, capped at 110 below 30 vCPUs, 250 above).
fn max_pods(info: &cloud::InstanceTypeInfo, prefixes: bool) -> usize {
    let per_slot = if prefixes { 16 } else { 1 };
    let by_addresses = info.limits.max_enis * (info.limits.ipv4_per_eni - 1) * per_slot;
    let cap = if info.vcpus.unwrap_or(0) > 30 {
        250
    } else {
        110
    };
    by_addresses.min(cap) as usize
}

fn measure(prefixes: bool, parallel: usize) -> Result<Run> {
    let LabNode { rt, ec2, id, info } = LabNode::load()?;
    let n = max_pods(&info, prefixes);
    // The warm pool of the start is not the burst's.
    std::thread::sleep(Duration::from_secs(3));
    let before = node_stats()?;

    let names: Vec<String> = (0..n).map(|i| format!("pb/p{i:03}")).collect();
    let t = Instant::now();
    let per_pod: Vec<(Duration, Duration, u32)> = std::thread::scope(|s| {
        let handles: Vec<_> = names
            .chunks(n.div_ceil(parallel.max(1)))
            .map(|chunk| s.spawn(move || chunk.iter().map(|p| add(p)).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("an ADD thread panicked"))
            })
            .collect::<Result<Vec<_>>>()
            .map(|v| v.into_iter().flatten().collect::<Result<Vec<_>>>())
    })??;
    let wall = t.elapsed();
    // Let the pool settle (the warm target after the burst) before counting the calls.
    std::thread::sleep(Duration::from_secs(8));
    let calls = diff(&node_stats()?, &before);
    let enis = rt
        .block_on(ec2.describe_network_interfaces(&[], &[cloud::Filter::attached_to(&id)]))?
        .len();
    Ok(Run {
        mode: if prefixes {
            "prefix delegation"
        } else {
            "secondary IPs"
        },
        pods: n,
        wall,
        add_ms: Summary::of(&per_pod.iter().map(|p| ms(p.0)).collect::<Vec<_>>()),
        to_address_ms: Summary::of(&per_pod.iter().map(|p| ms(p.1)).collect::<Vec<_>>()),
        retries: per_pod.iter().map(|p| p.2).sum(),
        calls,
        enis,
    })
}

/// One pod's ADD, retried on failure for up to 120 s: (the successful call's latency, the
/// time to the address, failed attempts).
fn add(pod: &str) -> Result<(Duration, Duration, u32)> {
    let t = Instant::now();
    let mut failed = 0;
    loop {
        let call = Instant::now();
        match pods::add(NODE, pod, pods::Print::Quiet) {
            Ok(_) => return Ok((call.elapsed(), t.elapsed(), failed)),
            Err(e) if t.elapsed() > Duration::from_secs(120) => {
                bail!("ADD {pod} still failing after 120 s: {e:#}")
            }
            Err(_) => {
                failed += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn print_table(runs: &[Run], parallel: usize, total: Duration) {
    println!(
        "instance1 (m5.large, WARM_ENI_TARGET=1 / WARM_PREFIX_TARGET=1, VPC_CNI_MIN_ENI_AGE=2, IP_COOLDOWN_PERIOD=1): its max pods ADDed at once from {parallel} threads, retried on code 11 every 200 ms. Total run {:.0} s.\n",
        total.as_secs_f64()
    );
    print!("| |");
    for r in runs {
        print!(" {} |", r.mode);
    }
    println!();
    print!("|---|");
    for _ in runs {
        print!("---:|");
    }
    println!();
    let row = |name: &str, f: &dyn Fn(&Run) -> String| {
        print!("| {name} |");
        for r in runs {
            print!(" {} |", f(r));
        }
        println!();
    };
    row("pods (the mode's max pods)", &|r| r.pods.to_string());
    row("wall time, 0 → all pods with an address", &|r| {
        format!("{:.2} s", r.wall.as_secs_f64())
    });
    row("ADD call p50 / p99 (the successful call)", &|r| {
        format!("{:.0} / {:.0} ms", r.add_ms.median, r.add_ms.p99)
    });
    row("time to an address p50 / p99 (retries included)", &|r| {
        format!(
            "{:.0} / {:.0} ms",
            r.to_address_ms.median, r.to_address_ms.p99
        )
    });
    row("code-11 retries", &|r| r.retries.to_string());
    row("ENIs attached after", &|r| r.enis.to_string());
    let apis: std::collections::BTreeSet<&String> =
        runs.iter().flat_map(|r| r.calls.keys()).collect();
    for api in apis {
        row(&format!("EC2 `{api}` calls"), &|r| {
            r.calls.get(api).map_or(0, |c| c.calls).to_string()
        });
    }
    row("**mutating EC2 calls**", &|r| {
        let n: u64 = r
            .calls
            .iter()
            .filter(|(api, _)| !api.starts_with("Describe"))
            .map(|(_, c)| c.calls)
            .sum();
        format!("**{n}**")
    });
}
