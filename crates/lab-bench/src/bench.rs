//! `vpc-lab bench`: EC2 calls by API (as the lab's EC2 proxy counts them) for one node with a
//! provisioning agent: 0 → max pods, back to 0, and a churn of ADD/DEL with agent kills.
//! Brings up its own lab (fresh nodes) and takes it down at the end.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lab::control::{self, UpOptions};
use lab::store::{self, LabState};
use lab::{paths, pods};
use lab_aws::fidelity::{self, CallCount};

pub(crate) const NODE: &str = "instance1";

/// ADD like a runtime: retried on failure (code 11 while the pool refills, or the agent
/// restarting) for up to 120 s. Returns the failed attempts.
fn add(pod: &str) -> Result<u32> {
    let mut failed = 0;
    crate::retry(&format!("ADD {pod}"), Duration::from_secs(120), || {
        let r = pods::add(NODE, pod, pods::Print::Quiet);
        failed += u32::from(r.is_err());
        r.map(drop)
    })?;
    Ok(failed)
}

fn del(pod: &str) -> Result<()> {
    crate::retry(&format!("DEL {pod}"), Duration::from_secs(120), || {
        pods::del(NODE, pod, pods::Print::Quiet)
    })
}

pub(crate) fn node_stats() -> Result<BTreeMap<String, CallCount>> {
    Ok(fidelity::load_stats_from(&paths::ec2_stats_file())?
        .remove(NODE)
        .unwrap_or_default())
}

pub(crate) fn diff(
    after: &BTreeMap<String, CallCount>,
    before: &BTreeMap<String, CallCount>,
) -> BTreeMap<String, CallCount> {
    after
        .iter()
        .map(|(k, a)| {
            let b = before.get(k).copied().unwrap_or_default();
            (
                k.clone(),
                CallCount {
                    calls: a.calls - b.calls,
                    ok: a.ok - b.ok,
                    throttled: a.throttled - b.throttled,
                    injected: a.injected - b.injected,
                    refused: a.refused - b.refused,
                    failed: a.failed - b.failed,
                },
            )
        })
        .filter(|(_, c)| c.calls > 0)
        .collect()
}

/// Waits until instance1's (ENIs, IPs) in EC2 have not changed for 6 s (longer than the
/// agent's 5 s loop). Returns them.
fn settle(rt: &tokio::runtime::Runtime, ec2: &cloud::Ec2, id: &str) -> Result<(usize, usize)> {
    let count = || -> Result<(usize, usize)> {
        let v = rt.block_on(
            ec2.describe_network_interfaces(&[], &[cloud::Filter::attached_to(id.to_string())]),
        )?;
        Ok((v.len(), v.iter().map(|e| e.secondary_ips.len()).sum()))
    };
    let t = Instant::now();
    let mut last = count()?;
    let mut since = Instant::now();
    while since.elapsed() < Duration::from_secs(6) {
        std::thread::sleep(Duration::from_millis(500));
        let now = count()?;
        if now != last {
            last = now;
            since = Instant::now();
        }
        if t.elapsed() > Duration::from_secs(180) {
            bail!("instance1's pool did not settle within 180 s (last {last:?})");
        }
    }
    Ok(last)
}

struct Phase {
    name: String,
    secs: f64,
    note: String,
    calls: BTreeMap<String, CallCount>,
}

/// `vpc-lab bench`.
pub fn run(churn_ops: usize) -> Result<()> {
    let t0 = Instant::now();
    control::up(&UpOptions {
        agent_env: vec![
            ("VPC_CNI_MIN_ENI_AGE".into(), "2".into()),
            ("IP_COOLDOWN_PERIOD".into(), "1".into()),
        ],
        provisioning: Some(vec![NODE.to_string()]),
        fresh_nodes: true,
        ..UpOptions::default()
    })?;
    let r = measure(churn_ops);
    let down = control::down();
    let phases = r?;
    down?;
    println!(
        "EC2 calls of {NODE} (m5.large, WARM_ENI_TARGET=1, VPC_CNI_MIN_ENI_AGE=2, IP_COOLDOWN_PERIOD=1) as the lab's EC2 proxy counts them; `calls` = every HTTP request the agent made (SDK retries included). Total run {:.0} s.\n",
        t0.elapsed().as_secs_f64()
    );
    let apis: std::collections::BTreeSet<&String> =
        phases.iter().flat_map(|p| p.calls.keys()).collect();
    print!("| API |");
    for p in &phases {
        print!(" {} |", p.name);
    }
    println!();
    print!("|---|");
    for _ in &phases {
        print!("---:|");
    }
    println!();
    for api in &apis {
        print!("| {api} |");
        for p in &phases {
            print!(" {} |", p.calls.get(*api).map_or(0, |c| c.calls));
        }
        println!();
    }
    print!("| **total** |");
    for p in &phases {
        print!(" **{}** |", p.calls.values().map(|c| c.calls).sum::<u64>());
    }
    println!("\n");
    for p in &phases {
        println!("- {}: {:.1} s; {}", p.name, p.secs, p.note);
    }
    Ok(())
}

/// The lab's EC2 (moto) and instance1 in it: what a benchmark measures against.
pub(crate) struct LabNode {
    pub rt: tokio::runtime::Runtime,
    pub ec2: cloud::Ec2,
    /// instance1's instance id and type.
    pub id: String,
    pub info: cloud::InstanceTypeInfo,
}

impl LabNode {
    pub fn load() -> Result<LabNode> {
        let state = LabState::load()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let ec2 = state.ec2();
        let world = store::load_world()?;
        let node = world.instance(NODE).context("no instance1 in the lab")?;
        let info = rt.block_on(ec2.describe_instance_type_info(&node.instance_type))?;
        Ok(LabNode {
            id: node.id.clone(),
            rt,
            ec2,
            info,
        })
    }
}

fn measure(churn_ops: usize) -> Result<Vec<Phase>> {
    let LabNode { rt, ec2, id, info } = LabNode::load()?;
    let limits = info.limits;
    let max_pods = (limits.max_enis * (limits.ipv4_per_eni - 1)) as usize;
    let mut phases = Vec::new();

    let start = settle(&rt, &ec2, &id)?;
    let s0 = node_stats()?;
    phases.push(Phase {
        name: "start-up (warm pool)".into(),
        secs: 0.0,
        note: format!("pool at start (ENIs, IPs) = {start:?}"),
        calls: diff(&s0, &BTreeMap::new()),
    });

    let t = Instant::now();
    let mut retries = 0;
    for n in 0..max_pods {
        retries += add(&format!("bench/p{n:03}"))?;
    }
    let up_secs = t.elapsed().as_secs_f64();
    let full = settle(&rt, &ec2, &id)?;
    let s1 = node_stats()?;
    phases.push(Phase {
        name: format!("0 → {max_pods} pods"),
        secs: up_secs,
        note: format!(
            "{max_pods} ADDs, {retries} code-11 retries; pool then (ENIs, IPs) = {full:?}"
        ),
        calls: diff(&s1, &s0),
    });

    let t = Instant::now();
    for n in 0..max_pods {
        del(&format!("bench/p{n:03}"))?;
    }
    let down_secs = t.elapsed().as_secs_f64();
    let back = settle(&rt, &ec2, &id)?;
    let s2 = node_stats()?;
    phases.push(Phase {
        name: format!("{max_pods} → 0 pods"),
        secs: down_secs,
        note: format!("{max_pods} DELs; pool then (ENIs, IPs) = {back:?}"),
        calls: diff(&s2, &s1),
    });

    // Churn: pods swing between 2 and 2 ENIs' worth + 2, newest deleted first (mostly), the
    // agent SIGKILLed and restarted every 1-3 s.
    let t = Instant::now();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<u32> {
            let mut kills = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1000 + rand::random::<u64>() % 2000));
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                if control::agent_stop(NODE, true).is_ok() {
                    kills += 1;
                }
                control::agent_start_ready(NODE, &[])?;
            }
            Ok(kills)
        })
    };
    let per = (limits.ipv4_per_eni - 1) as usize;
    let high = (2 * per + 2).min(max_pods);
    let mut live: Vec<String> = Vec::new();
    let (mut growing, mut next, mut retries) = (true, 0, 0);
    let churn = (|| -> Result<()> {
        for _ in 0..churn_ops {
            if growing && live.len() >= high {
                growing = false;
            } else if !growing && live.len() <= 2 {
                growing = true;
            }
            if growing {
                let p = format!("churn/p{next:04}");
                next += 1;
                retries += add(&p)?;
                live.push(p);
            } else {
                let i = if rand::random::<u8>().is_multiple_of(4) {
                    rand::random::<u64>() as usize % live.len()
                } else {
                    live.len() - 1
                };
                let p = live.remove(i);
                del(&p)?;
            }
        }
        Ok(())
    })();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let kills = killer
        .join()
        .map_err(|_| anyhow::anyhow!("the killer thread panicked"))??;
    churn?;
    let churn_secs = t.elapsed().as_secs_f64();
    let end = settle(&rt, &ec2, &id)?;
    let s3 = node_stats()?;
    phases.push(Phase {
        name: format!("churn {churn_ops} ADD/DEL"),
        secs: churn_secs,
        note: format!(
            "{churn_ops} ADD/DEL between 2 and {high} pods, {kills} agent kills (-9) and restarts, {retries} failed ADD attempts retried; pool then (ENIs, IPs) = {end:?}"
        ),
        calls: diff(&s3, &s2),
    });
    Ok(phases)
}
