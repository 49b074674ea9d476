//! `vpc-lab perf`: the performance baseline of issue 4, every figure side by side with its peer
//! in the same run. Brings up its own lab (fresh nodes, both agents provisioning, a large
//! instance type), measures, takes the lab down, prints Markdown and writes the raw samples as
//! JSON (for `scripts/bench/plot.py`).
//!
//! The CNI harness is the same for both plugins: each plugin of the list is exec'd inside the
//! instance's namespace with the `CNI_*` variables and its config on stdin, results chained as
//! `prevResult`, the stored ADD result given to DEL — as `vpc-lab pod add|del` does. The peer is
//! Debian's `ptp` + `host-local` (`/usr/lib/cni`) with a conflist of our own whose host-local
//! data dir lives under the instance's lab directory (so `vpc-lab down` removes it).

use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};

use lab::control::{self, UpOptions};
use lab::matrix::{delete_nft_table, restore_nft_table, save_nft_table};
use lab::store::{self, LabState};
use lab::{paths, pods};
use lab_net::ns;
use testkit::cni::{ConfList, Outcome, PodRef, Runtime};
use testkit::procs;
use testkit::stats::Summary;

const NODE: &str = "instance1";
const PEER: &str = "instance2";
const HOST: &str = "vpc-host";
const DEBIAN_CNI: &str = "/usr/lib/cni";
const PTP_SUBNET: &str = "10.99.0.0/16";

/// What `vpc-lab perf` is asked to do.
#[derive(Debug, clap::Args)]
pub struct Opts {
    /// Instance type of the nodes.
    #[arg(long, default_value = "m5.16xlarge")]
    pub instance_type: String,
    /// ADD+DEL cycles per plugin.
    #[arg(long, default_value_t = 200)]
    pub cycles: usize,
    /// Pods added concurrently.
    #[arg(long, default_value_t = 100)]
    pub concurrent: usize,
    /// Pod counts on instance1 for forwarding, memory and agent start (1 is always measured).
    #[arg(long, value_delimiter = ',', default_value = "100,250")]
    pub pods: Vec<usize>,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 3)]
    pub seconds: u32,
    /// Repetitions of each iperf3 run and agent restart.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Where the raw samples go (JSON).
    #[arg(long, default_value = "perf.json")]
    pub out: std::path::PathBuf,
}

/// A CNI network as a runtime sees it, with a label for the report.
struct Net {
    label: &'static str,
    rt: Runtime,
}

impl Net {
    fn vpc_cni() -> Result<Net> {
        Ok(Net {
            label: "vpc-cni",
            rt: pods::runtime(NODE)?,
        })
    }

    fn ptp() -> Result<Net> {
        let data_dir = paths::inst_dir(NODE).join("perf-host-local");
        let v = json!({
            "cniVersion": "1.0.0",
            "name": "perf-ptp",
            // portmap chained as in vpc-cni's own list (and the reference's), so both lists
            // pay the same chained plugin.
            "plugins": [{
                "type": "ptp",
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "subnet": PTP_SUBNET,
                    "dataDir": data_dir.display().to_string(),
                }
            }, {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}]
        });
        let mut rt = pods::runtime_with(NODE, ConfList::from_value(&v, "perf's ptp network")?);
        rt.bin_dir = PathBuf::from(DEBIAN_CNI);
        rt.cni_path = DEBIAN_CNI.to_string();
        Ok(Net {
            label: "ptp+host-local+portmap",
            rt,
        })
    }
}

/// A pod set up by the harness.
struct Pod {
    ns_name: String,
    cid: String,
    result: Value,
}

impl Pod {
    fn netns(&self) -> String {
        ns::path(&self.ns_name).display().to_string()
    }
    fn pod_ref(&self, name: &str) -> PodRef {
        pod_ref(&self.cid, &self.netns(), name)
    }
    fn ip(&self) -> Option<Ipv4Addr> {
        self.result["ips"]
            .as_array()?
            .iter()
            .filter_map(|i| i["address"].as_str()?.split_once('/')?.0.parse().ok())
            .next()
    }
}

fn pod_ref(cid: &str, netns: &str, name: &str) -> PodRef {
    PodRef {
        container_id: cid.to_string(),
        netns: netns.to_string(),
        ifname: "eth0".into(),
        k8s_namespace: "perf".into(),
        k8s_name: name.to_string(),
    }
}

/// CNI ADD of the whole list; on failure the list is DELeted (like a runtime) and the failed
/// call returned.
fn cni_add(net: &Net, cid: &str, netns: &str, pod: &str) -> Result<Result<Value, Outcome>> {
    let p = pod_ref(cid, netns, pod);
    Ok(match net.rt.add(&p)? {
        Ok((v, _)) => Ok(v),
        Err(failed) => {
            net.rt.del(&p, None)?;
            Err(failed)
        }
    })
}

fn cni_del(net: &Net, pod: &Pod, name: &str) -> Result<()> {
    let (failed, _) = net.rt.del(&pod.pod_ref(name), Some(&pod.result))?;
    if let Some(f) = failed.first() {
        bail!("DEL failed: {}", f.describe());
    }
    Ok(())
}

fn cid(tag: &str) -> String {
    let n: u64 = rand::random();
    format!("{tag}{n:016x}{:08x}", std::process::id())
}

/// Creates the pod's namespace and ADDs it; with `retry`, a failed ADD (code 11 while the pool
/// refills) is retried every 100 ms for up to 120 s. Returns the pod and the failed attempts.
fn add_pod(net: &Net, name: &str, retry: bool) -> Result<(Pod, u32)> {
    let ns_name = ns::pod_ns(NODE, "perf", name);
    ns::add(&ns_name)?;
    let netns = ns::path(&ns_name).display().to_string();
    let t = Instant::now();
    let mut failed = 0;
    loop {
        let c = cid("perf");
        match cni_add(net, &c, &netns, name)? {
            Ok(result) => {
                return Ok((
                    Pod {
                        ns_name,
                        cid: c,
                        result,
                    },
                    failed,
                ));
            }
            Err(e) => {
                failed += 1;
                if !retry || t.elapsed() > Duration::from_secs(120) {
                    bail!(
                        "ADD {name} ({}) failed: code {} {}",
                        net.label,
                        e.error_code(),
                        e.describe()
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn del_pod(net: &Net, pod: &Pod) -> Result<()> {
    cni_del(net, pod, &pod.ns_name)?;
    ns::del(&pod.ns_name)
}

// ---------------------------------------------------------------------------------------------
// Statistics.

fn summary(v: &[f64]) -> Summary {
    Summary::of(v)
}

fn fmt_s(s: &Summary, unit: &str, digits: usize) -> String {
    s.display(unit, digits)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------------
// Lab helpers.

/// Waits until `instance`'s agent has stopped provisioning: its pool statistics unchanged for
/// `quiet` (EC2 calls go to moto, which competes for the same two CPUs as the measurement).
fn wait_settled(instance: &str, quiet: Duration, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    let mut last = None;
    let mut since = Instant::now();
    loop {
        let stats = control::agent_state(instance).map(|s| s["stats"].clone());
        if stats.is_some() && stats == last {
            if since.elapsed() >= quiet {
                return Ok(());
            }
        } else {
            last = stats;
            since = Instant::now();
        }
        if t.elapsed() > timeout {
            bail!("{instance}'s agent was still provisioning after {timeout:?}: {last:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn wait_available(instance: &str, n: u64, timeout: Duration) -> Result<u64> {
    let t = Instant::now();
    loop {
        let a = control::agent_state(instance).and_then(|s| s["stats"]["available"].as_u64());
        if let Some(a) = a
            && a >= n
        {
            return Ok(a);
        }
        if t.elapsed() > timeout {
            bail!(
                "{instance}'s agent reports {a:?} available addresses after {timeout:?}, wanted {n}"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn agent_pid() -> Result<i32> {
    procs::read_pid(&paths::agent_pid(NODE)).context("no agent pid")
}

/// VmRSS of the agent of instance1, in KiB.
/// The agent's (VmRSS, RssAnon) in KiB: all of its resident memory, and the part that is not
/// pages of files (its binary and libraries, shared with every process mapping them).
fn agent_rss_kib() -> Result<(u64, u64)> {
    let pid = agent_pid()?;
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("RssAnon:")?))
}

/// Stops the agent (SIGTERM) and starts it again; the time from the spawn until its socket
/// answers and its conflist has been written again (ms).
fn agent_restart_ms() -> Result<f64> {
    let region = store::load_world()?.region;
    control::agent_stop(NODE, false)?;
    let conf = paths::conf_dir(NODE).join(paths::CONFLIST);
    let sock = paths::agent_socket(NODE);
    // Ready = the socket answers and the conflist has been written again (a newer mtime).
    let before = std::fs::metadata(&conf)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let t = Instant::now();
    control::agent_start(NODE, &[], &region)?;
    loop {
        let written = std::fs::metadata(&conf)
            .and_then(|m| m.modified())
            .is_ok_and(|m| m > before);
        if written && UnixStream::connect(&sock).is_ok() {
            return Ok(ms(t));
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("the agent was not ready 60 s after its start");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// iperf3 servers started by this benchmark, killed (by PID) when dropped.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Servers {
    fn start(&mut self, ns_name: &str) -> Result<()> {
        let c = ns::command(ns_name, "iperf3")?
            .args(["-s", "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?;
        self.0.push(c);
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }
}

fn iperf(client_ns: &str, server: Ipv4Addr, args: &[&str]) -> Result<Value> {
    let ip = server.to_string();
    let mut last = String::new();
    for _ in 0..3 {
        let out = ns::command(client_ns, "timeout")?
            .args(["30", "iperf3", "-c", &ip, "-p", "5201", "-J"])
            .args(args)
            .output()?;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if out.status.success() && v.get("error").is_none() {
            return Ok(v);
        }
        last = format!("{} {}", v["error"], String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!("iperf3 from {client_ns} to {ip} {args:?} failed: {last}")
}

/// 64-byte UDP packets per second received, `-b 0` (as fast as the sender can).
fn udp_pps(client_ns: &str, server: Ipv4Addr, reverse: bool, secs: u32) -> Result<f64> {
    let t = secs.to_string();
    let mut args = vec!["-u", "-b", "0", "-l", "64", "-t", &t];
    if reverse {
        args.push("-R");
    }
    let v = iperf(client_ns, server, &args)?;
    let r = &v["end"]["sum_received"];
    let (bytes, s) = (
        r["bytes"].as_f64().context("no sum_received.bytes")?,
        r["seconds"].as_f64().context("no seconds")?,
    );
    Ok(bytes / 64.0 / s)
}

fn tcp_gbps(client_ns: &str, server: Ipv4Addr, secs: u32) -> Result<f64> {
    let v = iperf(client_ns, server, &["-t", &secs.to_string()])?;
    Ok(v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no sum_received.bits_per_second")?
        / 1e9)
}

fn ip_rules(instance: &str) -> Result<usize> {
    let o = ns::command(&ns::instance_ns(instance), "ip")?
        .args(["-4", "rule", "show"])
        .output()?;
    Ok(String::from_utf8_lossy(&o.stdout).lines().count())
}

// ---------------------------------------------------------------------------------------------
// The benchmark.

#[derive(Debug, Default, Serialize)]
struct Results {
    instance_type: String,
    max_pods: usize,
    cycle: Vec<CycleResult>,
    concurrent: Vec<ConcResult>,
    levels: Vec<Level>,
    throughput: Option<Throughput>,
    throughput_without_nft: Option<Throughput>,
    /// `ip link del` of a fresh veth pair in instance1 (ms), and `ip link show lo` (the exec
    /// cost of `ip` alone).
    veth_del_ms: Vec<f64>,
    ip_exec_ms: Vec<f64>,
    notes: Vec<String>,
}

#[derive(Debug, Serialize)]
struct CycleResult {
    plugin: String,
    /// ADD + DEL of the plugin list (ms), per cycle.
    add_del_ms: Vec<f64>,
    add_ms: Vec<f64>,
    del_ms: Vec<f64>,
    /// Creating the pod namespace (ip netns add + lo up), per cycle, not in add_del_ms.
    netns_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct ConcResult {
    plugin: String,
    pods: usize,
    wall_ms: f64,
    add_ms: Vec<f64>,
    failed_attempts: u32,
}

#[derive(Debug, Serialize)]
struct Level {
    pods: usize,
    ip_rules: usize,
    rss_kib: u64,
    rss_anon_kib: u64,
    /// pod → instance2, forwarded by instance1.
    udp_pps_from_pod: Vec<f64>,
    /// instance2 → pod.
    udp_pps_to_pod: Vec<f64>,
    /// Control: instance2 → vpc-host, through the lab's fabric only (not instance1).
    udp_pps_control: Vec<f64>,
    agent_start_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Throughput {
    pod_to_pod_gbps: Vec<f64>,
    instance_to_instance_gbps: Vec<f64>,
}

/// Pod→pod and instance→instance TCP, alternating, `reps` times each.
fn throughput(
    pod_ns: &str,
    pod_ip: Ipv4Addr,
    instance_ip: Ipv4Addr,
    opts: &Opts,
) -> Result<Throughput> {
    let mut tp = Throughput {
        pod_to_pod_gbps: vec![],
        instance_to_instance_gbps: vec![],
    };
    for _ in 0..opts.reps {
        tp.pod_to_pod_gbps
            .push(tcp_gbps(pod_ns, pod_ip, opts.seconds)?);
        tp.instance_to_instance_gbps.push(tcp_gbps(
            &ns::instance_ns(NODE),
            instance_ip,
            opts.seconds,
        )?);
    }
    Ok(tp)
}

/// Runs `f` with vpc-cni's nftables table taken out of both nodes (so no rule and no connection
/// tracking touches a packet), then puts the very same table back, whatever `f` returned.
fn without_nft_table<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let nodes = [ns::instance_ns(NODE), ns::instance_ns(PEER)];
    let saved = nodes
        .iter()
        .map(|n| save_nft_table(n))
        .collect::<Result<Vec<_>>>()?;
    let r = (|| {
        for n in &nodes {
            delete_nft_table(n)?;
        }
        f()
    })();
    let restored: Vec<Result<()>> = nodes
        .iter()
        .zip(&saved)
        .map(|(n, text)| restore_nft_table(n, text))
        .collect();
    restored.into_iter().collect::<Result<()>>()?;
    r
}

/// `vpc-lab perf`.
pub fn run(opts: &Opts) -> Result<()> {
    let t0 = Instant::now();
    let up = UpOptions {
        agent_env: vec![
            ("WARM_IP_TARGET".into(), "110".into()),
            ("IP_COOLDOWN_PERIOD".into(), "0".into()),
        ],
        provisioning: Some(vec![NODE.to_string(), PEER.to_string()]),
        instance_type: opts.instance_type.clone(),
        fresh_nodes: true,
        ..UpOptions::default()
    };
    eprintln!("perf: vpc-lab up {up:?}");
    control::up(&up)?;
    let mut res = Results {
        instance_type: opts.instance_type.clone(),
        ..Default::default()
    };
    let r = measure(opts, &mut res);
    if let Err(e) = &r {
        res.notes.push(format!("the run stopped early: {e:#}"));
        eprintln!("perf: error: {e:#}");
    }
    let down = control::down();
    std::fs::write(&opts.out, serde_json::to_vec_pretty(&res)?)
        .with_context(|| format!("writing {}", opts.out.display()))?;
    report(&res, t0.elapsed().as_secs_f64());
    down?;
    r
}

/// A failed section is noted and the run goes on.
fn soft<T>(res: &mut Results, what: &str, r: Result<T>) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("perf: {what} failed: {e:#}");
            res.notes
                .push(format!("{what}: NOT MEASURED, it failed: {e:#}"));
            None
        }
    }
}

fn measure(opts: &Opts, res: &mut Results) -> Result<()> {
    let world = store::load_world()?;
    let peer_ip = world
        .instance(PEER)
        .and_then(|i| i.primary_eni())
        .context("no instance2")?
        .primary_ip;
    let node_ip = world
        .instance(NODE)
        .and_then(|i| i.primary_eni())
        .context("no instance1")?
        .primary_ip;
    let host_ip = world
        .instance(HOST)
        .and_then(|i| i.primary_eni())
        .context("no vpc-host")?
        .primary_ip;
    let limits = cloud_api_limits(&world.instance(NODE).unwrap().instance_type)?;
    res.max_pods = limits;
    eprintln!("perf: {} allows {limits} pods", opts.instance_type);

    let vpc = Net::vpc_cni()?;
    let ptp = Net::ptp()?;
    let need = opts.concurrent as u64 + 1;
    eprintln!("perf: waiting for {need} available addresses");
    wait_available(NODE, need, Duration::from_secs(240))?;
    wait_available(PEER, 1, Duration::from_secs(240))?;

    let rss = agent_rss_kib()?;
    let mut level0 = Level {
        pods: 0,
        ip_rules: ip_rules(NODE)?,
        rss_kib: rss.0,
        rss_anon_kib: rss.1,
        udp_pps_from_pod: vec![],
        udp_pps_to_pod: vec![],
        udp_pps_control: vec![],
        agent_start_ms: vec![],
    };
    for _ in 0..opts.reps {
        if let Some(t) = soft(res, "agent start at 0 pods", agent_restart_ms()) {
            level0.agent_start_ms.push(t);
        }
    }
    res.levels.push(level0);
    let v = veth_probe(res);
    soft(res, "veth deletion probe", v);

    // 1. ADD+DEL cycles, the two plugins interleaved (order alternating) after a warm-up.
    eprintln!("perf: {} ADD+DEL cycles each", opts.cycles);
    let c = cycles(opts.cycles, &vpc, &ptp);
    if let Some(c) = soft(res, "ADD+DEL cycles", c) {
        res.cycle = c;
    }
    for k in 0..2 {
        let _ = ns::del(&ns::pod_ns(NODE, "perf", &format!("cycle-{k}")));
    }

    // The forwarding target (the first vpc-cni pod) and the pod on instance2.
    wait_available(NODE, 1, Duration::from_secs(120))?;
    let (target, _) = add_pod(&vpc, "target", true)?;
    let target_ip = target.ip().context("target pod has no IP")?;
    let peer_pod = add_pod_on(PEER, "peer")?;
    let peer_pod_ip = peer_pod.ip().context("instance2's pod has no IP")?;
    let mut servers = Servers(vec![]);
    servers.start(&target.ns_name)?;
    servers.start(&peer_pod.ns_name)?;
    servers.start(&ns::instance_ns(PEER))?;
    servers.start(&ns::instance_ns(HOST))?;
    res.notes.push(format!(
        "target pod {target_ip} on {NODE}, pod {peer_pod_ip} on {PEER}, instances {node_ip} and {peer_ip}"
    ));

    // 6. Throughput, pod↔pod and instance↔instance alternating.
    eprintln!("perf: TCP throughput");
    let tp = throughput(&target.ns_name, peer_pod_ip, peer_ip, opts);
    res.throughput = soft(res, "TCP throughput", tp);
    // The same without any netfilter on either node: what a veth + routing data path can reach
    // on this machine at all (the target pod is on the primary ENI, whose traffic needs no mark).
    eprintln!("perf: TCP throughput without the nftables table");
    let bare = without_nft_table(|| throughput(&target.ns_name, peer_pod_ip, peer_ip, opts));
    res.throughput_without_nft = soft(res, "TCP throughput without nftables", bare);

    let level = |n_pods: usize, res: &mut Results| {
        eprintln!("perf: level {n_pods} pods");
        let l = (|| -> Result<Level> {
            wait_settled(NODE, Duration::from_secs(5), Duration::from_secs(180))?;
            let rss = agent_rss_kib()?;
            let mut l = Level {
                pods: n_pods,
                ip_rules: ip_rules(NODE)?,
                rss_kib: rss.0,
                rss_anon_kib: rss.1,
                udp_pps_from_pod: vec![],
                udp_pps_to_pod: vec![],
                udp_pps_control: vec![],
                agent_start_ms: vec![],
            };
            for _ in 0..opts.reps {
                l.udp_pps_from_pod.push(udp_pps(
                    &ns::instance_ns(PEER),
                    target_ip,
                    true,
                    opts.seconds,
                )?);
                l.udp_pps_to_pod.push(udp_pps(
                    &ns::instance_ns(PEER),
                    target_ip,
                    false,
                    opts.seconds,
                )?);
                l.udp_pps_control.push(udp_pps(
                    &ns::instance_ns(PEER),
                    host_ip,
                    false,
                    opts.seconds,
                )?);
            }
            for _ in 0..opts.reps {
                l.agent_start_ms.push(agent_restart_ms()?);
            }
            Ok(l)
        })();
        if let Some(l) = soft(res, &format!("level {n_pods} pods"), l) {
            res.levels.push(l);
        }
    };
    level(1, res);

    // 2. Concurrent ADDs: vpc-cni (the pods stay, for the next level), then ptp (deleted).
    let mut pods: Vec<Pod> = Vec::new();
    wait_available(NODE, opts.concurrent as u64, Duration::from_secs(240))?;
    eprintln!("perf: {} concurrent ADDs each", opts.concurrent);
    if let Some((c, new)) = soft(
        res,
        "concurrent vpc-cni",
        concurrent(&vpc, opts.concurrent, "cv"),
    ) {
        res.concurrent.push(c);
        pods.extend(new);
    }
    if let Some((c, ptp_pods)) = soft(
        res,
        "concurrent ptp",
        concurrent(&ptp, opts.concurrent, "cp"),
    ) {
        res.concurrent.push(c);
        for p in &ptp_pods {
            del_pod(&ptp, p)?;
        }
    }

    let mut levels: Vec<usize> = opts.pods.iter().copied().filter(|&n| n > 1).collect();
    levels.sort_unstable();
    for want in levels {
        let n = want.min(limits);
        if n < want {
            res.notes.push(format!(
                "{} allows {limits} pods: level {want} measured at {n}",
                opts.instance_type
            ));
        }
        let mut k = 0;
        while pods.len() + 1 < n {
            let (p, _) = add_pod(&vpc, &format!("fill-{n}-{k}"), true)?;
            k += 1;
            pods.push(p);
        }
        level(pods.len() + 1, res);
    }
    drop(servers);
    Ok(())
}

/// What deleting a veth pair costs the kernel, apart from any plugin.
fn veth_probe(res: &mut Results) -> Result<()> {
    let ins = ns::instance_ns(NODE);
    let ip = |args: &[&str]| -> Result<f64> {
        let t = Instant::now();
        let o = ns::command(&ins, "ip")?.args(args).output()?;
        if !o.status.success() {
            bail!("ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(ms(t))
    };
    for _ in 0..20 {
        ip(&[
            "link", "add", "pfv0", "type", "veth", "peer", "name", "pfv1",
        ])?;
        ip(&["link", "set", "pfv0", "up"])?;
        ip(&["link", "set", "pfv1", "up"])?;
        res.veth_del_ms.push(ip(&["link", "del", "pfv0"])?);
        res.ip_exec_ms.push(ip(&["link", "show", "lo"])?);
    }
    Ok(())
}

fn cycles(n: usize, vpc: &Net, ptp: &Net) -> Result<Vec<CycleResult>> {
    let mut cyc: Vec<CycleResult> = [vpc, ptp]
        .iter()
        .map(|n| CycleResult {
            plugin: n.label.into(),
            add_del_ms: vec![],
            add_ms: vec![],
            del_ms: vec![],
            netns_ms: vec![],
        })
        .collect();
    let warmup = 5;
    for i in 0..n + warmup {
        let order: [usize; 2] = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let net = if k == 0 { vpc } else { ptp };
            let name = format!("cycle-{k}");
            let ns_name = ns::pod_ns(NODE, "perf", &name);
            let t = Instant::now();
            ns::add(&ns_name)?;
            let ns_ms = ms(t);
            let netns = ns::path(&ns_name).display().to_string();
            let c = cid("cyc");
            let t = Instant::now();
            let result = match cni_add(net, &c, &netns, &name)? {
                Ok(v) => v,
                Err(e) => bail!("cycle {i}: {} ADD failed: {}", net.label, e.describe()),
            };
            let add = ms(t);
            let pod = Pod {
                ns_name: ns_name.clone(),
                cid: c,
                result,
            };
            let t = Instant::now();
            cni_del(net, &pod, &name)?;
            let del = ms(t);
            ns::del(&ns_name)?;
            if i >= warmup {
                let r = &mut cyc[k];
                r.add_del_ms.push(add + del);
                r.add_ms.push(add);
                r.del_ms.push(del);
                r.netns_ms.push(ns_ms);
            }
        }
    }
    Ok(cyc)
}

/// A pod on another instance, through the lab's own `vpc-lab pod add` (not timed).
fn add_pod_on(instance: &str, name: &str) -> Result<Pod> {
    let rec = pods::add(instance, &format!("perf/{name}"), pods::Print::Quiet)?;
    Ok(Pod {
        ns_name: rec.ns_name(),
        cid: rec.container_id,
        result: rec.result,
    })
}

/// `n` ADDs started at once (each pod's namespace made beforehand): wall time until all are
/// done, and each ADD's time (including retries after a failed attempt).
fn concurrent(net: &Net, n: usize, tag: &str) -> Result<(ConcResult, Vec<Pod>)> {
    let mut names = Vec::new();
    for i in 0..n {
        let name = format!("{tag}-{i:03}");
        ns::add(&ns::pod_ns(NODE, "perf", &name))?;
        names.push(name);
    }
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut t0 = Instant::now();
    let out = std::thread::scope(|s| -> Result<Vec<(Pod, f64, u32)>> {
        let handles: Vec<_> = names
            .iter()
            .map(|name| {
                let barrier = barrier.clone();
                s.spawn(move || -> Result<(Pod, f64, u32)> {
                    let ns_name = ns::pod_ns(NODE, "perf", name);
                    let netns = ns::path(&ns_name).display().to_string();
                    barrier.wait();
                    let t = Instant::now();
                    let mut failed = 0;
                    loop {
                        let c = cid("conc");
                        match cni_add(net, &c, &netns, name)? {
                            Ok(result) => {
                                return Ok((
                                    Pod {
                                        ns_name,
                                        cid: c,
                                        result,
                                    },
                                    ms(t),
                                    failed,
                                ));
                            }
                            Err(e) => {
                                failed += 1;
                                if t.elapsed() > Duration::from_secs(60) {
                                    bail!(
                                        "concurrent ADD {name} failed for 60 s: {}",
                                        e.describe()
                                    );
                                }
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                    }
                })
            })
            .collect();
        barrier.wait();
        t0 = Instant::now();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("an ADD thread panicked"))?
            })
            .collect()
    })?;
    let wall = ms(t0);
    let failed = out.iter().map(|x| x.2).sum();
    let add_ms = out.iter().map(|x| x.1).collect();
    Ok((
        ConcResult {
            plugin: net.label.into(),
            pods: n,
            wall_ms: wall,
            add_ms,
            failed_attempts: failed,
        },
        out.into_iter().map(|x| x.0).collect(),
    ))
}

/// Pods the instance type allows (ENIs × (IPv4 per ENI − 1)), from EC2.
fn cloud_api_limits(instance_type: &str) -> Result<usize> {
    let state = LabState::load()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ec2 = cloud::Ec2::for_endpoint(&format!("http://{}", state.moto), &state.region);
    let l = rt.block_on(ec2.describe_instance_types(instance_type))?;
    Ok((l.max_enis * (l.ipv4_per_eni - 1)) as usize)
}

fn report(res: &Results, secs: f64) {
    println!(
        "vpc-lab perf on {} (max {} pods), total run {secs:.0} s.\n",
        res.instance_type, res.max_pods
    );
    if res.cycle.len() == 2 {
        println!("### ADD+DEL of one pod, warm pool\n");
        println!(
            "| plugin | ADD+DEL (ms) | ADD (ms) | DEL (ms) | netns create (ms, not included) |"
        );
        println!("|---|---|---|---|---|");
        for c in &res.cycle {
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} |",
                c.plugin,
                fmt_s(&summary(&c.add_del_ms), "", 1),
                summary(&c.add_ms).median,
                summary(&c.del_ms).median,
                summary(&c.netns_ms).median
            );
        }
        let (a, b) = (
            summary(&res.cycle[0].add_del_ms).median,
            summary(&res.cycle[1].add_del_ms).median,
        );
        println!(
            "\nratio vpc-cni / ptp+host-local+portmap (medians): **{:.2}×** (goal ≤ 0.25×)\n",
            a / b
        );
    }
    if !res.concurrent.is_empty() {
        println!("### Concurrent ADDs on one instance\n");
        println!(
            "| plugin | pods | wall until all ready (ms) | ADD p50 (ms) | ADD p99 (ms) | ADD max (ms) | failed attempts retried |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for c in &res.concurrent {
            let s = summary(&c.add_ms);
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
                c.plugin, c.pods, c.wall_ms, s.median, s.p99, s.max, c.failed_attempts
            );
        }
        println!();
    }
    if !res.levels.is_empty() {
        println!("### Against the number of pods on instance1\n");
        println!(
            "| pods | ip rules | agent VmRSS (RssAnon) MiB | agent start → ready (ms, median [min–max]) | UDP 64 B pod→instance2 (kpps, median [min–max]) | UDP 64 B instance2→pod (kpps) | control: instance2→vpc-host, fabric only (kpps) |"
        );
        println!("|---:|---:|---:|---|---|---|---|");
        for l in &res.levels {
            let st = summary(&l.agent_start_ms);
            let f = summary(&l.udp_pps_from_pod);
            let t = summary(&l.udp_pps_to_pod);
            let c = summary(&l.udp_pps_control);
            let udp = |s: &Summary| {
                if s.n == 0 {
                    "–".to_string()
                } else {
                    format!(
                        "{:.0} [{:.0}–{:.0}]",
                        s.median / 1e3,
                        s.min / 1e3,
                        s.max / 1e3
                    )
                }
            };
            println!(
                "| {} | {} | {:.1} ({:.1}) | {:.0} [{:.0}–{:.0}] | {} | {} | {} |",
                l.pods,
                l.ip_rules,
                l.rss_kib as f64 / 1024.0,
                l.rss_anon_kib as f64 / 1024.0,
                st.median,
                st.min,
                st.max,
                udp(&f),
                udp(&t),
                udp(&c)
            );
        }
        println!();
    }
    if res.throughput.is_some() || res.throughput_without_nft.is_some() {
        println!("### TCP throughput instance1 → instance2 (iperf3)\n");
        println!(
            "| nodes | pod → pod Gbit/s median [min–max] | instance → instance | ratio of medians |"
        );
        println!("|---|---|---|---|");
    }
    for (label, tp) in [
        ("as installed", &res.throughput),
        (
            "vpc-cni's nftables table removed (no netfilter, no conntrack)",
            &res.throughput_without_nft,
        ),
    ] {
        let Some(tp) = tp else { continue };
        let (p, i) = (
            summary(&tp.pod_to_pod_gbps),
            summary(&tp.instance_to_instance_gbps),
        );
        println!(
            "| {label} | {:.2} [{:.2}–{:.2}] | {:.2} [{:.2}–{:.2}] | **{:.2}×** |",
            p.median,
            p.min,
            p.max,
            i.median,
            i.min,
            i.max,
            p.median / i.median
        );
    }
    if res.throughput.is_some() {
        println!("\ngoal: pod → pod ≥ 0.95× instance → instance, as installed\n");
    }
    if !res.veth_del_ms.is_empty() {
        println!(
            "`ip link del` of an up veth pair in instance1: {}; `ip link show lo` (exec alone): {}\n",
            fmt_s(&summary(&res.veth_del_ms), "ms", 1),
            fmt_s(&summary(&res.ip_exec_ms), "ms", 1)
        );
    }
    for n in &res.notes {
        println!("- {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptp_conflist_stays_in_the_lab() {
        let n = Net::ptp().unwrap();
        let ipam = &n.rt.conf.plugins[0]["ipam"];
        assert!(
            ipam["dataDir"]
                .as_str()
                .unwrap()
                .starts_with(paths::RUN_DIR)
        );
        assert_eq!(ipam["subnet"], PTP_SUBNET);
        assert!(n.rt.conf.version_at_least("0.4.0"));
    }
}
