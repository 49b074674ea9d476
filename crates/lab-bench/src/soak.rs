//! `vpc-lab soak --minutes N`: two provisioning nodes under continuous pod churn with random
//! faults, checked every minute for duplicate addresses and leaks.
//!
//! Each node has a worker that adds and deletes pods through the plugin as a runtime does
//! (one in 25 ADDs is killed mid-call, as a runtime's timeout does, then torn down with DEL). A
//! fault thread injects, one at a time and at random: SIGKILL of instance2's agent (instance1's
//! agent is never restarted, so its RSS, fds and threads over the run mean something), EC2
//! errors, EC2 throttling, IMDS lag, and behind the agents' backs an address unassigned (free
//! or a pod's) or an ENI detached. Every minute churn pauses for a moment and each node is
//! sampled: the agent's pods against the runtime's, veths and pod routes against live pods,
//! addresses in EC2 against the pool, and the agent's process. A pod whose address was taken
//! away must be reported lost by its agent within its reconcile period; it is then deleted.
//! At the end the faults stop, every pod is deleted, and the nodes must be back to no pods,
//! no veths, no pod routes, no lost addresses, EC2 equal to the pool and no detached ENI.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lab::control::{self, UpOptions};
use lab::store::{self, LabState};
use lab::{paths, pods};
use lab_aws::fidelity::Knobs;
use lab_net::ns;
use rand::Rng;
use serde_json::Value;

const NODES: [&str; 2] = ["instance1", "instance2"];
/// The node whose agent the faults kill; the other's runs from start to end.
const KILLED: &str = "instance2";
/// How long after an address is taken away its agent must report the pod lost: the agent's
/// reconcile period (60 s), its loop, and the time a restart of a killed agent takes.
const REPORT_WITHIN: Duration = Duration::from_secs(100);

/// `vpc-lab soak` options.
#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// How long the churn and faults run (minutes; fractions allowed).
    #[arg(long, default_value_t = 60.0)]
    pub minutes: f64,
    /// Seconds between two faults, at most (each gap is random, at least a third of this).
    #[arg(long, default_value_t = 30)]
    pub fault_every: u64,
    /// Do not inject faults (churn only).
    #[arg(long)]
    pub no_faults: bool,
}

/// A pod the worker of `node` runs.
#[derive(Debug, Clone)]
struct Pod {
    node: &'static str,
    name: String,
    ip: Ipv4Addr,
}

/// A pod whose address a fault took away, and since when.
#[derive(Debug, Clone)]
struct Casualty {
    pod: Pod,
    since: Instant,
    reported: bool,
}

#[derive(Debug, Default, Clone)]
struct Counts {
    adds: u64,
    dels: u64,
    killed_adds: u64,
    add_failures: BTreeMap<String, u64>,
    del_failures: BTreeMap<String, u64>,
}

impl Counts {
    fn merge(&mut self, o: &Counts) {
        self.adds += o.adds;
        self.dels += o.dels;
        self.killed_adds += o.killed_adds;
        for (k, v) in &o.add_failures {
            *self.add_failures.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.del_failures {
            *self.del_failures.entry(k.clone()).or_default() += v;
        }
    }
}

/// What the run has seen: live pods by address, casualties, counts, and the problems found.
#[derive(Debug, Default)]
struct Ledger {
    live: BTreeMap<Ipv4Addr, Pod>,
    casualties: BTreeMap<Ipv4Addr, Casualty>,
    /// Pods reported lost that their worker is to delete.
    evict: BTreeSet<String>,
    /// This minute's counts by node, and the run's.
    minute: BTreeMap<&'static str, Counts>,
    total: Counts,
    faults: BTreeMap<&'static str, u64>,
    faults_total: BTreeMap<&'static str, u64>,
    /// Addresses the agent holds for a container the runtime does not run, and since when:
    /// after a kill -9 the agent keeps an allocation whose ADD it cannot judge for a minute
    /// (`recovery::PRUNE_MIN_AGE_MS`) before releasing it, so only one held longer than
    /// [`STRAY_GRACE`] is a leak.
    strays: BTreeMap<(&'static str, Ipv4Addr, String), Instant>,
    problems: Vec<String>,
}

/// Whether `node`'s agent reports `ip` as a pod's lost address (`/v1/state`'s `lost`).
fn reported_lost(node: &str, ip: Ipv4Addr) -> bool {
    control::agent_state(node).is_some_and(|st| {
        st["lost"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|l| l["ip"].as_str() == Some(ip.to_string().as_str()))
    })
}

/// How long the agent may hold an address for a container the runtime does not run: the
/// minute an allocation restored unwired at start is kept, the minute until the agent looks
/// again, and slack.
const STRAY_GRACE: Duration = Duration::from_secs(150);

impl Ledger {
    fn problem(&mut self, p: String) {
        eprintln!("PROBLEM: {p}");
        self.problems.push(p);
    }

    /// A successful ADD: the address must not be held by another live pod (a casualty's
    /// address may legitimately come back from EC2).
    ///
    /// An address the other pod lost without a fault of the soak's knowing (its ENI was
    /// detached while the agent was giving out addresses on it, so the soak's list of the ENI's
    /// addresses at the fault missed it) is no duplicate when the other pod's agent reports it
    /// lost: that pod is a casualty, reported.
    fn added(&mut self, pod: Pod) {
        if let Some(other) = self.live.get(&pod.ip).cloned() {
            if reported_lost(other.node, pod.ip) {
                self.live.remove(&pod.ip);
                self.casualties.insert(
                    pod.ip,
                    Casualty {
                        pod: other,
                        since: Instant::now(),
                        reported: true,
                    },
                );
            } else {
                let p = format!(
                    "duplicate address {}: {} on {} got it while {} on {} holds it",
                    pod.ip, pod.name, pod.node, other.name, other.node
                );
                self.problem(p);
            }
        }
        // EC2 may hand a taken address back to the same node; its agent must not give it to
        // a new pod while the pod that lost it still runs there.
        if let Some(c) = self.casualties.get(&pod.ip)
            && c.pod.node == pod.node
        {
            let p = format!(
                "{} on {} got {}, the address {} lost and still runs with",
                pod.name, pod.node, pod.ip, c.pod.name
            );
            self.problem(p);
        }
        self.minute.entry(pod.node).or_default().adds += 1;
        self.live.insert(pod.ip, pod);
    }

    fn deleted(&mut self, pod: &Pod) {
        self.minute.entry(pod.node).or_default().dels += 1;
        if self.live.get(&pod.ip).is_some_and(|p| p.name == pod.name) {
            self.live.remove(&pod.ip);
        }
        if self
            .casualties
            .get(&pod.ip)
            .is_some_and(|c| c.pod.name == pod.name)
        {
            self.casualties.remove(&pod.ip);
        }
        self.evict.remove(&pod.name);
    }

    /// A fault took `ip` away from its pod: no longer the address's holder.
    fn taken(&mut self, ip: Ipv4Addr) {
        if let Some(pod) = self.live.remove(&ip) {
            self.casualties.insert(
                ip,
                Casualty {
                    pod,
                    since: Instant::now(),
                    reported: false,
                },
            );
        }
    }
}

struct Shared {
    /// Churn and faults hold it shared for each operation; sampling and out-of-band changes
    /// take it exclusively (no ADD in flight while an address is taken away or counted).
    gate: RwLock<()>,
    stop: AtomicBool,
    ledger: Mutex<Ledger>,
}

impl Shared {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
    /// Sleeps `d` in small steps; false when the run is stopping.
    fn sleep(&self, d: Duration) -> bool {
        let t = Instant::now();
        while t.elapsed() < d {
            if self.stopped() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100).min(d - t.elapsed()));
        }
        !self.stopped()
    }
}

/// `vpc-lab soak`: brings up its own lab, runs, prints a line per minute and a verdict, takes
/// the lab down. Fails when a duplicate address, a leak or an unreported lost pod was seen.
pub fn run(opts: &Opts) -> Result<()> {
    control::up(&UpOptions {
        agent_env: vec![
            ("VPC_CNI_MIN_ENI_AGE".into(), "2".into()),
            ("IP_COOLDOWN_PERIOD".into(), "5".into()),
        ],
        provisioning: Some(Vec::new()),
        fresh_nodes: true,
        ..UpOptions::default()
    })?;
    let r = soak(opts);
    if r.is_err() {
        let keep = std::env::temp_dir().join("vpc-lab-soak-failed");
        let _ = std::fs::remove_dir_all(&keep);
        let _ = std::process::Command::new("cp")
            .args(["-r", lab::paths::RUN_DIR])
            .arg(&keep)
            .status();
        eprintln!("the lab's files and logs are kept in {}", keep.display());
    }
    let down = control::down();
    r?;
    down
}

fn soak(opts: &Opts) -> Result<()> {
    let state = LabState::load()?;
    let world = store::load_world()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ec2 = state.ec2();
    let node_ids: BTreeMap<&'static str, String> = NODES
        .iter()
        .map(|n| Ok((*n, world.instance(n).context("node missing")?.id.clone())))
        .collect::<Result<_>>()?;
    let limits =
        rt.block_on(ec2.describe_instance_types(&world.instance(NODES[0]).unwrap().instance_type))?;
    let max_pods = (limits.max_enis * (limits.ipv4_per_eni - 1)) as usize;
    let shared = Arc::new(Shared {
        gate: RwLock::new(()),
        stop: AtomicBool::new(false),
        ledger: Mutex::new(Ledger::default()),
    });
    let t0 = Instant::now();
    let run_for = Duration::from_secs_f64(opts.minutes * 60.0);
    println!(
        "soak: {} nodes ({}, max pods {max_pods}), {:.1} min, faults {}; instance1's agent runs throughout, {KILLED}'s is killed by the faults",
        NODES.len(),
        world.instance(NODES[0]).unwrap().instance_type,
        opts.minutes,
        if opts.no_faults {
            "off".to_string()
        } else {
            format!("every {}-{} s", opts.fault_every / 3, opts.fault_every)
        }
    );
    println!(
        "{:>4} {:>9} | {:>5} {:>5} {:>6} | {:<26} | per node: pods agent/veth/route lost | ec2-only pool-only detached | conntrack | agent fds thr rss(MiB)",
        "min", "node", "adds", "dels", "killed", "failures"
    );
    let workers: Vec<_> = NODES
        .iter()
        .map(|node| {
            let s = shared.clone();
            std::thread::spawn(move || churn(&s, node, max_pods))
        })
        .collect();
    let faults = (!opts.no_faults).then(|| {
        let s = shared.clone();
        let ids = node_ids.clone();
        let every = opts.fault_every.max(3);
        std::thread::spawn(move || inject(&s, &ids, every))
    });
    let mut first: BTreeMap<&str, AgentProc> = BTreeMap::new();
    let mut last: BTreeMap<&str, AgentProc> = BTreeMap::new();
    let mut minute = 0;
    let mut sampled = Ok(());
    while t0.elapsed() < run_for && sampled.is_ok() {
        let next = Duration::from_secs(60 * (minute + 1)).min(run_for);
        shared.sleep(next.saturating_sub(t0.elapsed()));
        minute += 1;
        sampled = sample(&rt, &ec2, &shared, &node_ids, minute, false).map(|procs| {
            for (n, p) in procs {
                first.entry(n).or_insert(p);
                last.insert(n, p);
            }
        });
    }
    shared.stop.store(true, Ordering::SeqCst);
    let mut thread_errors = Vec::new();
    for w in workers {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => thread_errors.push(format!("churn: {e:#}")),
            Err(_) => thread_errors.push("a churn thread panicked".into()),
        }
    }
    if let Some(f) = faults {
        match f.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => thread_errors.push(format!("faults: {e:#}")),
            Err(_) => thread_errors.push("the fault thread panicked".into()),
        }
    }
    sampled?;
    for e in thread_errors {
        shared.ledger().problem(e);
    }

    // The end: faults off, every pod deleted, the agents given a reconcile period.
    set_knobs(&[
        ("ec2-error-rate", "0"),
        ("ec2-throttle", "off"),
        ("imds-delay-ms", "0"),
    ])?;
    if control::agent_state(KILLED).is_none() {
        let _ = control::agent_start_ready(KILLED, &[]);
    }
    let left: Vec<Pod> = {
        let l = shared.ledger();
        l.live
            .values()
            .chain(l.casualties.values().map(|c| &c.pod))
            .cloned()
            .collect()
    };
    for p in &left {
        let t = Instant::now();
        loop {
            match pods::del(p.node, &p.name, pods::Print::Quiet) {
                Ok(()) => {
                    shared.ledger().deleted(p);
                    break;
                }
                Err(e) if t.elapsed() > Duration::from_secs(60) => {
                    shared
                        .ledger()
                        .problem(format!("final DEL of {} on {}: {e:#}", p.name, p.node));
                    break;
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }
    println!("all pods deleted; waiting 75 s (a reconcile period) for the agents to settle");
    std::thread::sleep(Duration::from_secs(75));
    let procs = sample(&rt, &ec2, &shared, &node_ids, minute + 1, true)?;
    for (n, p) in procs {
        last.insert(n, p);
    }

    let l = shared.ledger();
    let t = &l.total;
    println!(
        "\ntotal: {:.1} min, {} ADDs served, {} DELs, {} ADDs killed mid-call and torn down; ADD failures {:?}; DEL failures {:?}; faults {:?}",
        t0.elapsed().as_secs_f64() / 60.0,
        t.adds,
        t.dels,
        t.killed_adds,
        t.add_failures,
        t.del_failures,
        l.faults_total
    );
    for n in NODES {
        if let (Some(a), Some(b)) = (first.get(n), last.get(n)) {
            println!(
                "{n}'s agent: fds {} → {}, threads {} → {}, RSS {:.1} → {:.1} MiB (pid {} → {})",
                a.fds,
                b.fds,
                a.threads,
                b.threads,
                a.rss_kib as f64 / 1024.0,
                b.rss_kib as f64 / 1024.0,
                a.pid,
                b.pid
            );
        }
    }
    if l.problems.is_empty() {
        println!("verdict: no duplicate address, no leak, every lost pod reported");
        Ok(())
    } else {
        println!("verdict: {} problems:", l.problems.len());
        for p in &l.problems {
            println!("  - {p}");
        }
        bail!("the soak found {} problems", l.problems.len())
    }
}

/// The churn of one node: pods swing between a low and a high mark (the high mark sometimes
/// above what the node can hold, so the agent's refusal is exercised too).
fn churn(s: &Shared, node: &'static str, max_pods: usize) -> Result<()> {
    let mut rng = rand::rng();
    let mut mine: Vec<Pod> = Vec::new();
    let mut growing = true;
    let mut high = max_pods / 2;
    let mut next = 0u64;
    let mut refused = 0;
    let tag = &node[node.len() - 1..];
    while !s.stopped() {
        let _g = s.gate.read().unwrap_or_else(|p| p.into_inner());
        // Pods whose loss their agent reported are deleted first.
        let evict: Option<usize> = {
            let l = s.ledger();
            mine.iter().position(|p| l.evict.contains(&p.name))
        };
        if let Some(i) = evict {
            let p = mine[i].clone();
            if del(s, &p) {
                mine.remove(i);
            }
            continue;
        }
        if growing && mine.len() >= high {
            growing = false;
        } else if !growing && mine.len() <= max_pods / 10 {
            growing = true;
            high = rng.random_range(max_pods / 3..=max_pods + 2);
        }
        if growing {
            let name = format!("soak/n{tag}-{next:05}");
            next += 1;
            let deadline = rng
                .random_ratio(1, 25)
                .then(|| Instant::now() + Duration::from_millis(rng.random_range(5..400)));
            match pods::add_until(node, &name, pods::Print::Quiet, &[], deadline) {
                Ok(rec) => {
                    let Some(ip) = rec.ips().first().copied() else {
                        bail!("ADD of {name} on {node} returned no address");
                    };
                    refused = 0;
                    let pod = Pod { node, name, ip };
                    s.ledger().added(pod.clone());
                    mine.push(pod);
                }
                Err(e) => {
                    let what = match e.downcast_ref::<pods::CniFailure>() {
                        Some(f) if f.signal.is_some() => {
                            s.ledger().minute.entry(node).or_default().killed_adds += 1;
                            continue;
                        }
                        Some(f) => {
                            // A runtime backs off before it tries the pod again.
                            std::thread::sleep(Duration::from_millis(100));
                            format!("code {}", f.code)
                        }
                        // No conflist while the lab restarts the agent (it removes the
                        // last run's to know when the new one is ready): a runtime waits.
                        None if format!("{e:#}").contains("no CNI network configuration") => {
                            std::thread::sleep(Duration::from_millis(300));
                            "no conflist (agent restarting)".to_string()
                        }
                        None => {
                            eprintln!("ADD {name} on {node}: {e:#}");
                            std::thread::sleep(Duration::from_millis(300));
                            "harness".to_string()
                        }
                    };
                    *s.ledger()
                        .minute
                        .entry(node)
                        .or_default()
                        .add_failures
                        .entry(what)
                        .or_default() += 1;
                    // Refused for 3 s in a row (a full node, or a pool EC2 cannot refill
                    // now): shrink for a while.
                    refused += 1;
                    if refused >= 30 {
                        growing = false;
                        refused = 0;
                    }
                }
            }
        } else {
            let i = if rng.random_ratio(1, 3) {
                mine.len() - 1
            } else {
                rng.random_range(0..mine.len())
            };
            let p = mine[i].clone();
            if del(s, &p) {
                mine.remove(i);
            }
        }
    }
    Ok(())
}

/// DEL of a pod; a failure is counted and the pod kept for a later try.
fn del(s: &Shared, p: &Pod) -> bool {
    match pods::del(p.node, &p.name, pods::Print::Quiet) {
        Ok(()) => {
            s.ledger().deleted(p);
            true
        }
        Err(e) => {
            eprintln!("DEL {} on {}: {e:#}", p.name, p.node);
            let code = e
                .downcast_ref::<pods::CniFailure>()
                .map_or("harness".to_string(), |f| format!("code {}", f.code));
            *s.ledger()
                .minute
                .entry(p.node)
                .or_default()
                .del_failures
                .entry(code)
                .or_default() += 1;
            std::thread::sleep(Duration::from_millis(200));
            false
        }
    }
}

fn set_knobs(kv: &[(&str, &str)]) -> Result<()> {
    let f = paths::knobs_file();
    let mut k = Knobs::load_from(&f)?;
    for (key, v) in kv {
        k.set(key, v)?;
    }
    k.save_to(&f)
}

/// One fault at a time, at random, until the run stops.
fn inject(s: &Shared, ids: &BTreeMap<&'static str, String>, every: u64) -> Result<()> {
    let mut rng = rand::rng();
    let ec2 = LabState::load()?.ec2();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    while s.sleep(Duration::from_secs(rng.random_range(every / 3..=every))) {
        let fault = match rng.random_range(0..8) {
            0 | 1 => "agent kill -9",
            2 => "EC2 errors 30% for 20 s",
            3 => "EC2 throttled 4/0.5 for 20 s",
            4 => "IMDS 3 s behind for 30 s",
            5 => "free address unassigned",
            6 => "pod address unassigned",
            _ => "ENI detached",
        };
        *s.ledger().faults.entry(fault).or_default() += 1;
        let window = |kv: &[(&str, &str)], off: &[(&str, &str)], d: u64| -> Result<()> {
            set_knobs(kv)?;
            s.sleep(Duration::from_secs(d));
            set_knobs(off)
        };
        match fault {
            "agent kill -9" => {
                let _g = s.gate.read().unwrap_or_else(|p| p.into_inner());
                let _ = control::agent_stop(KILLED, true);
                std::thread::sleep(Duration::from_millis(rng.random_range(0..2000)));
                control::agent_start_ready(KILLED, &[])?;
            }
            "EC2 errors 30% for 20 s" => {
                window(&[("ec2-error-rate", "0.3")], &[("ec2-error-rate", "0")], 20)?
            }
            "EC2 throttled 4/0.5 for 20 s" => {
                window(&[("ec2-throttle", "4/0.5")], &[("ec2-throttle", "off")], 20)?
            }
            "IMDS 3 s behind for 30 s" => {
                window(&[("imds-delay-ms", "3000")], &[("imds-delay-ms", "0")], 30)?
            }
            _ => {
                let _g = s.gate.write().unwrap_or_else(|p| p.into_inner());
                let node = NODES[rng.random_range(0..NODES.len())];
                let enis = rt.block_on(ec2.describe_network_interfaces(
                    &[],
                    &[cloud::Filter::attached_to(ids[node].clone())],
                ))?;
                let held: BTreeSet<Ipv4Addr> = s.ledger().live.keys().copied().collect();
                let done = match fault {
                    "free address unassigned" => {
                        let free: Vec<(String, Ipv4Addr)> = enis
                            .iter()
                            .flat_map(|e| e.secondary_ips.iter().map(|ip| (e.id.clone(), *ip)))
                            .filter(|(_, ip)| !held.contains(ip))
                            .collect();
                        match free.get(rng.random_range(0..free.len().max(1))) {
                            Some((eni, ip)) => {
                                rt.block_on(ec2.unassign_private_ip_addresses(eni, &[*ip]))?;
                                format!("{ip} of {eni} on {node}")
                            }
                            None => "no free address".into(),
                        }
                    }
                    "pod address unassigned" => {
                        let mine: Vec<(String, Ipv4Addr)> = enis
                            .iter()
                            .flat_map(|e| e.secondary_ips.iter().map(|ip| (e.id.clone(), *ip)))
                            .filter(|(_, ip)| held.contains(ip))
                            .collect();
                        match mine.get(rng.random_range(0..mine.len().max(1))) {
                            Some((eni, ip)) => {
                                rt.block_on(ec2.unassign_private_ip_addresses(eni, &[*ip]))?;
                                s.ledger().taken(*ip);
                                format!("{ip} of {eni} on {node}")
                            }
                            None => "no pod".into(),
                        }
                    }
                    _ => {
                        let secondary: Vec<&cloud::NetworkInterface> = enis
                            .iter()
                            .filter(|e| e.attachment.as_ref().is_some_and(|a| a.device_index > 0))
                            .collect();
                        match secondary.get(rng.random_range(0..secondary.len().max(1))) {
                            Some(e) => {
                                let att = e.attachment.as_ref().unwrap().attachment_id.clone();
                                rt.block_on(ec2.detach_network_interface(&att, false))?;
                                let mut l = s.ledger();
                                for ip in &e.secondary_ips {
                                    l.taken(*ip);
                                }
                                format!("{} on {node} ({} addresses)", e.id, e.secondary_ips.len())
                            }
                            None => "no secondary ENI".into(),
                        }
                    }
                };
                eprintln!("fault: {fault}: {done}");
            }
        }
    }
    Ok(())
}

/// The agent's process as /proc shows it.
#[derive(Debug, Clone, Copy, Default)]
struct AgentProc {
    pid: i32,
    fds: usize,
    threads: u64,
    rss_kib: u64,
}

fn agent_proc(node: &str) -> Option<AgentProc> {
    let pid = testkit::procs::read_pid(&paths::agent_pid(node))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Some(AgentProc {
        pid,
        fds: std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count(),
        threads: field("Threads:"),
        rss_kib: field("VmRSS:"),
    })
}

/// What a node shows at a sample.
#[derive(Debug, Default)]
struct NodeSample {
    agent_pods: BTreeMap<Ipv4Addr, String>,
    lost: BTreeSet<Ipv4Addr>,
    veths: usize,
    /// Retired veths waiting for the agent's reaper (a second at most).
    retired: usize,
    routes: usize,
    ec2_only: usize,
    pool_only: usize,
    detached: Vec<String>,
    /// Addresses that an ip rule selects alone (from or to one address), ENI primaries aside:
    /// each must be a running pod's.
    rule_hosts: BTreeSet<Ipv4Addr>,
    conntrack: usize,
}

/// A running pod's host-side veth: `eni…` (the reference's prefix, which vpc-cni keeps); the
/// lab's own links are `ethN` and `lab…`.
fn is_pod_veth(name: &str) -> bool {
    name.starts_with("eni")
}

/// A veth DEL retired (`vcr…`, down, deleted by the agent's reaper within a second).
fn is_retired_veth(name: &str) -> bool {
    name.starts_with("vcr")
}

fn json_lines(node: &str, args: &[&str]) -> Result<Vec<Value>> {
    let out = ns::run(&ns::instance_ns(node), args)?;
    Ok(serde_json::from_str(&out).unwrap_or_default())
}

fn node_sample(
    rt: &tokio::runtime::Runtime,
    ec2: &cloud::Ec2,
    node: &str,
    id: &str,
) -> Result<NodeSample> {
    let mut s = NodeSample::default();
    let state = control::agent_state(node)
        .with_context(|| format!("{node}'s agent does not answer /v1/state"))?;
    for p in state["pods"].as_array().into_iter().flatten() {
        if let Some(ip) = p["ip"].as_str().and_then(|i| i.parse().ok()) {
            s.agent_pods
                .insert(ip, p["containerID"].as_str().unwrap_or("").to_string());
        }
    }
    for p in state["lost"].as_array().into_iter().flatten() {
        if let Some(ip) = p["ip"].as_str().and_then(|i| i.parse().ok()) {
            s.lost.insert(ip);
        }
    }
    let pool: BTreeMap<String, u64> = state["enis"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| Some((u["info"]["id"].as_str()?.to_string(), u["total"].as_u64()?)))
        .collect();
    // The agent's ENIs (an ENI detached behind its back stays until its reconcile).
    let pool_primaries: Vec<Ipv4Addr> = state["enis"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u["info"]["primary_ip"].as_str()?.parse().ok())
        .collect();
    let links = json_lines(node, &["ip", "-j", "link", "show", "type", "veth"])?;
    let named = |f: fn(&str) -> bool| {
        links
            .iter()
            .filter(|l| l["ifname"].as_str().is_some_and(f))
            .count()
    };
    s.veths = named(is_pod_veth);
    s.retired = named(is_retired_veth);
    s.routes = json_lines(node, &["ip", "-j", "route", "show", "table", "main"])?
        .iter()
        .filter(|r| {
            r["dev"].as_str().is_some_and(is_pod_veth)
                && r["dst"].as_str().is_some_and(|d| !d.contains('/'))
        })
        .count();
    for r in json_lines(node, &["ip", "-j", "rule", "show"])? {
        for (a, len) in [("src", "srclen"), ("dst", "dstlen")] {
            if let Some(ip) = r[a].as_str().and_then(|i| i.parse::<Ipv4Addr>().ok())
                && r[len].as_u64().is_none_or(|l| l == 32)
            {
                s.rule_hosts.insert(ip);
            }
        }
    }
    for ip in &pool_primaries {
        s.rule_hosts.remove(ip);
    }
    s.conntrack = ns::run(&ns::instance_ns(node), &["cat", "/proc/net/nf_conntrack"])
        .map(|t| t.lines().count())
        .unwrap_or(0);
    let attached = rt.block_on(
        ec2.describe_network_interfaces(&[], &[cloud::Filter::attached_to(id.to_string())]),
    )?;
    for e in &attached {
        s.rule_hosts.remove(&e.primary_ip);
        let in_ec2 = e.secondary_ips.len() as u64;
        let in_pool = pool.get(&e.id).copied().unwrap_or(0);
        s.ec2_only += in_ec2.saturating_sub(in_pool) as usize;
        s.pool_only += in_pool.saturating_sub(in_ec2) as usize;
    }
    for (eni, n) in &pool {
        if !attached.iter().any(|e| &e.id == eni) {
            s.pool_only += *n as usize;
        }
    }
    s.detached = rt
        .block_on(ec2.describe_network_interfaces(
            &[],
            &[
                cloud::Filter::tag("node.k8s.amazonaws.com/instance_id", id.to_string()),
                cloud::Filter::eq("status", "available"),
            ],
        ))?
        .into_iter()
        .map(|e| e.id)
        .collect();
    Ok(s)
}

/// Pauses churn, samples both nodes, prints a line per node, and records what is wrong.
/// `fin`: the end of the run, when nothing may be left at all.
fn sample(
    rt: &tokio::runtime::Runtime,
    ec2: &cloud::Ec2,
    shared: &Shared,
    ids: &BTreeMap<&'static str, String>,
    minute: u64,
    fin: bool,
) -> Result<BTreeMap<&'static str, AgentProc>> {
    let g = shared.gate.write().unwrap_or_else(|p| p.into_inner());
    let mut samples = BTreeMap::new();
    for node in NODES {
        // A killed agent may be restarting: give it a few seconds.
        let t = Instant::now();
        let s = loop {
            match node_sample(rt, ec2, node, &ids[node]) {
                Ok(s) => break s,
                Err(e) if t.elapsed() > Duration::from_secs(30) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        };
        samples.insert(node, (s, agent_proc(node).unwrap_or_default()));
    }
    let mut l = shared.ledger();
    drop(g);
    let minute_counts = std::mem::take(&mut l.minute);
    for c in minute_counts.values() {
        l.total.merge(c);
    }
    let faults = std::mem::take(&mut l.faults);
    for (k, v) in &faults {
        *l.faults_total.entry(k).or_default() += v;
    }
    let mut procs = BTreeMap::new();
    let mut problems = Vec::new();
    for (node, (s, p)) in &samples {
        procs.insert(*node, *p);
        let live: BTreeSet<Ipv4Addr> = l
            .live
            .values()
            .filter(|p| p.node == *node)
            .map(|p| p.ip)
            .collect();
        let casualties: Vec<Casualty> = l
            .casualties
            .values()
            .filter(|c| c.pod.node == *node)
            .cloned()
            .collect();
        let agent: BTreeSet<Ipv4Addr> = s.agent_pods.keys().copied().collect();
        let running_ips: BTreeSet<Ipv4Addr> = live
            .iter()
            .copied()
            .chain(casualties.iter().map(|c| c.pod.ip))
            .collect();
        let strays: BTreeSet<(&'static str, Ipv4Addr, String)> = agent
            .difference(&running_ips)
            .map(|ip| (*node, *ip, s.agent_pods[ip].clone()))
            .collect();
        l.strays.retain(|k, _| k.0 != *node || strays.contains(k));
        for k in strays {
            let since = *l.strays.entry(k.clone()).or_insert_with(Instant::now);
            if fin || since.elapsed() > STRAY_GRACE {
                problems.push(format!(
                    "{node}: the agent holds {} for a pod the runtime does not run (container {}, for {:.0} s)",
                    k.1,
                    k.2,
                    since.elapsed().as_secs_f64()
                ));
            }
        }
        for ip in live.difference(&agent) {
            if !s.lost.contains(ip) {
                problems.push(format!(
                    "{node}: pod address {ip} is not in the agent's state (it could be handed out again)"
                ));
            }
        }
        let running = running_ips.len();
        let stray: Vec<&Ipv4Addr> = s.rule_hosts.difference(&running_ips).collect();
        if !stray.is_empty() {
            problems.push(format!(
                "{node}: ip rules for addresses no running pod has: {stray:?}"
            ));
        }
        if s.veths != running {
            problems.push(format!(
                "{node}: {} veths for {running} running pods",
                s.veths
            ));
        }
        if s.routes != running {
            problems.push(format!(
                "{node}: {} pod routes for {running} running pods",
                s.routes
            ));
        }
        for c in casualties {
            if s.lost.contains(&c.pod.ip) {
                if !c.reported {
                    l.evict.insert(c.pod.name.clone());
                    if let Some(c) = l.casualties.get_mut(&c.pod.ip) {
                        c.reported = true;
                    }
                }
            } else if c.since.elapsed() > REPORT_WITHIN && !c.reported {
                problems.push(format!(
                    "{node}: pod {} lost {} {:.0} s ago and its agent has not reported it",
                    c.pod.name,
                    c.pod.ip,
                    c.since.elapsed().as_secs_f64()
                ));
                if let Some(c) = l.casualties.get_mut(&c.pod.ip) {
                    c.reported = true;
                }
            }
        }
        if fin {
            if !s.lost.is_empty() {
                problems.push(format!(
                    "{node}: lost addresses left after every pod was deleted: {:?}",
                    s.lost
                ));
            }
            if s.ec2_only + s.pool_only > 0 {
                problems.push(format!(
                    "{node}: EC2 and the pool disagree at rest: {} addresses only in EC2, {} only in the pool",
                    s.ec2_only, s.pool_only
                ));
            }
            if s.retired > 0 {
                problems.push(format!(
                    "{node}: {} retired veths left (the agent's reaper deletes them within a second)",
                    s.retired
                ));
            }
            if !s.detached.is_empty() {
                problems.push(format!(
                    "{node}: detached ENIs tagged with the node left: {:?}",
                    s.detached
                ));
            }
        }
        let counts = minute_counts.get(node).cloned().unwrap_or_default();
        let failures: Vec<String> = counts
            .add_failures
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .chain(
                counts
                    .del_failures
                    .iter()
                    .map(|(k, v)| format!("del {k}:{v}")),
            )
            .collect();
        println!(
            "{:>4} {:>9} | {:>5} {:>5} {:>6} | {:<26} | {:>3} {:>3}/{:>3}/{:>3} {:>3} | {:>3} {:>3} {:>2} | {:>5} | {:>4} {:>3} {:>6.1}",
            if fin {
                "end".to_string()
            } else {
                minute.to_string()
            },
            node,
            counts.adds,
            counts.dels,
            counts.killed_adds,
            failures.join(" "),
            running,
            s.agent_pods.len(),
            s.veths,
            s.routes,
            s.lost.len(),
            s.ec2_only,
            s.pool_only,
            s.detached.len(),
            s.conntrack,
            p.fds,
            p.threads,
            p.rss_kib as f64 / 1024.0
        );
    }
    if !faults.is_empty() {
        println!("     faults this minute: {faults:?}");
    }
    for p in problems {
        l.problem(p);
    }
    Ok(procs)
}
