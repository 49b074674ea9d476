//! The connectivity matrix of issue 2 §5 on the running lab, and the negative controls that
//! remove one piece of the data path at a time and show the traffic fail as it would on AWS.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

use lab_aws::world::World;
use lab_net::{fabric, ns};

use crate::pods::{self, PodRecord};
use crate::{control, daemon, store};

/// The seed's pod address: a secondary IP of instance1's eth1.
pub const POD_ON_SECONDARY_ENI: Ipv4Addr = Ipv4Addr::new(172, 31, 13, 130);
/// A secondary IP of instance1's primary ENI.
pub const POD_ON_PRIMARY_ENI: Ipv4Addr = Ipv4Addr::new(172, 31, 5, 50);
const NODE: &str = "instance1";

/// Rows printed and counted.
#[derive(Debug, Default)]
struct Report {
    failed: usize,
    total: usize,
}

impl Report {
    fn row(&mut self, ok: bool, desc: &str, detail: &str) {
        self.total += 1;
        if !ok {
            self.failed += 1;
        }
        let detail = if detail.is_empty() {
            String::new()
        } else {
            format!("  ({detail})")
        };
        println!("{}  {desc}{detail}", if ok { "PASS" } else { "FAIL" });
    }
}

/// One ping from namespace `from` to `to`; `tries` attempts of one echo each.
fn ping(from: &str, to: Ipv4Addr, tries: u32) -> bool {
    for _ in 0..tries {
        let ok = ns::command(from, "ping").is_ok_and(|mut c| {
            c.args(["-c", "1", "-W", "1", "-q", &to.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        if ok {
            return true;
        }
    }
    false
}

/// Connects to the internet host's whoami from namespace `from`; returns the source it saw.
fn whoami(from: &str) -> Result<String> {
    let addr: SocketAddr = (fabric::INTERNET_HOST, daemon::WHOAMI_PORT).into();
    ns::in_ns(from, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out.trim().to_string())
    })
}

fn primary_of(world: &World, instance: &str) -> Result<Ipv4Addr> {
    world
        .instance(instance)
        .and_then(|i| i.enis.iter().find(|e| e.device_index == 0))
        .map(|e| e.primary_ip)
        .with_context(|| format!("instance {instance} or its primary ENI is not in the world"))
}

#[derive(Debug, Deserialize, Clone)]
struct Rule {
    priority: u32,
    #[serde(default)]
    src: Option<String>,
    #[serde(default)]
    srclen: Option<u8>,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    fwmark: Option<String>,
    #[serde(default)]
    fwmask: Option<String>,
}

fn rules(instance_ns: &str) -> Result<Vec<Rule>> {
    let out = ns::run(instance_ns, &["ip", "-j", "rule", "show"])?;
    serde_json::from_str(&out).context("parsing `ip -j rule show`")
}

fn rule_args(r: &Rule) -> Vec<String> {
    let mut a = Vec::new();
    match (&r.src, r.srclen) {
        (Some(s), Some(l)) if s != "all" => a.extend(["from".to_string(), format!("{s}/{l}")]),
        (Some(s), None) if s != "all" => a.extend(["from".to_string(), s.clone()]),
        _ => a.extend(["from".to_string(), "all".to_string()]),
    }
    if let Some(m) = &r.fwmark {
        a.push("fwmark".to_string());
        a.push(match &r.fwmask {
            Some(k) => format!("{m}/{k}"),
            None => m.clone(),
        });
    }
    a.extend([
        "lookup".to_string(),
        r.table.clone().unwrap_or_else(|| "main".into()),
        "pref".to_string(),
        r.priority.to_string(),
    ]);
    a
}

fn ip_rule(instance_ns: &str, verb: &str, r: &Rule) -> Result<()> {
    let args = rule_args(r);
    let mut v = vec!["ip", "rule", verb];
    v.extend(args.iter().map(String::as_str));
    ns::run(instance_ns, &v)?;
    Ok(())
}

/// Packets `dev` has sent in namespace `ns_name`.
fn tx_packets(ns_name: &str, dev: &str) -> Result<u64> {
    let out = ns::run(ns_name, &["ip", "-s", "-j", "link", "show", dev])?;
    let v: serde_json::Value =
        serde_json::from_str(&out).context("parsing `ip -s -j link show`")?;
    v[0]["stats64"]["tx"]["packets"]
        .as_u64()
        .with_context(|| format!("no tx packet count for {dev} in {ns_name}: {out}"))
}

fn pod_desc(p: &PodRecord, ip: Ipv4Addr) -> String {
    format!("pod {} ({ip})", p.display())
}

/// Runs the matrix; returns whether every row was as expected.
pub fn run(negative: bool) -> Result<bool> {
    let world = store::load_world()?;
    let i1 = ns::instance_ns(NODE);
    let i2 = ns::instance_ns("instance2");
    let vh = ns::instance_ns("vpc-host");
    let i2_ip = primary_of(&world, "instance2")?;
    let vh_ip = primary_of(&world, "vpc-host")?;
    let i1_ip = primary_of(&world, NODE)?;
    let x = pods::by_ip(POD_ON_SECONDARY_ENI)?;
    let y = pods::by_ip(POD_ON_PRIMARY_ENI)?;
    let xs = x.ns_name();
    let ys = y.ns_name();
    let xd = pod_desc(&x, POD_ON_SECONDARY_ENI);
    let yd = pod_desc(&y, POD_ON_PRIMARY_ENI);
    let z = pods::all_records()?
        .into_iter()
        .find(|r| r.instance == "instance2" && !r.ips().is_empty())
        .context("no pod on instance2: add one with `vpc-lab pod add instance2 default/pod-d`")?;
    let z_ip = z.ips()[0];
    let zd = pod_desc(&z, z_ip);
    let mut rep = Report::default();

    println!("== connectivity matrix");
    rep.row(
        ping(&i2, POD_ON_SECONDARY_ENI, 3),
        &format!("instance2 -> {xd}"),
        "",
    );
    rep.row(
        ping(&xs, i2_ip, 3),
        &format!("{xd} -> instance2 ({i2_ip})"),
        "",
    );
    rep.row(
        ping(&xs, POD_ON_PRIMARY_ENI, 3),
        &format!("{xd} -> {yd} (same node)"),
        "",
    );
    rep.row(
        ping(&ys, POD_ON_SECONDARY_ENI, 3),
        &format!("{yd} -> {xd} (same node)"),
        "",
    );
    rep.row(
        ping(&xs, z_ip, 3),
        &format!("{xd} -> {zd} on instance2 (across nodes)"),
        "",
    );
    rep.row(
        ping(&z.ns_name(), POD_ON_SECONDARY_ENI, 3),
        &format!("{zd} on instance2 -> {xd} (across nodes)"),
        "",
    );
    rep.row(
        ping(&xs, vh_ip, 3),
        &format!("{xd} -> vpc-host ({vh_ip}, other subnet)"),
        "",
    );
    rep.row(
        ping(&vh, POD_ON_SECONDARY_ENI, 3),
        &format!("vpc-host -> {xd}"),
        "",
    );
    for (p, d) in [(&xs, &xd), (&ys, &yd)] {
        match whoami(p) {
            Ok(seen) => rep.row(
                seen == i1_ip.to_string(),
                &format!(
                    "{d} -> internet {}:{} sees source {i1_ip}",
                    fabric::INTERNET_HOST,
                    daemon::WHOAMI_PORT
                ),
                &format!("it saw {seen}"),
            ),
            Err(e) => rep.row(
                false,
                &format!(
                    "{d} -> internet {}:{} sees source {i1_ip}",
                    fabric::INTERNET_HOST,
                    daemon::WHOAMI_PORT
                ),
                &format!("{e:#}"),
            ),
        }
    }

    if negative {
        println!("== negative controls (one piece removed at a time, then restored)");
        let port0 = fabric::port_name(NODE, 0);
        // 1. The secondary ENI's pod rule (`fwmark <eni mark> lookup <eni table> pref 1536`):
        //    without it the pod's traffic leaves eth0 with eth1's address.
        let from_rules: Vec<Rule> = rules(&i1)?
            .into_iter()
            .filter(|r| r.priority == 1536 && r.fwmark.is_some())
            .collect();
        if from_rules.is_empty() {
            rep.row(
                false,
                &format!("the secondary ENI's pod rule `fwmark … pref 1536` exists in {NODE}"),
                "not found",
            );
        } else {
            let shown: Vec<String> = from_rules.iter().map(|r| rule_args(r).join(" ")).collect();
            for r in &from_rules {
                ip_rule(&i1, "del", r)?;
            }
            let before = fabric::src_check_drops(Some(&port0))?;
            let ok = ping(&xs, i2_ip, 1);
            let after = fabric::src_check_drops(Some(&port0))?;
            let mut restore_err = None;
            for r in &from_rules {
                if let Err(e) = ip_rule(&i1, "add", r) {
                    restore_err = Some(e);
                }
            }
            rep.row(
                !ok && after > before,
                &format!("without `{}`: {xd} -> instance2 fails, dropped by the fabric's source check on {port0}", shown.join("; ")),
                &format!("ping {}, src-check drops on {port0} {before} -> {after}", if ok { "succeeded" } else { "failed" }),
            );
            if let Some(e) = restore_err {
                return Err(e.context("restoring the ENI's pod rule"));
            }
            rep.row(
                ping(&xs, i2_ip, 3),
                &format!("restored: {xd} -> instance2"),
                "",
            );
        }
        // 2. The to-pod rule: without it, pod-to-pod on the node follows the secondary-ENI
        //    pod's ENI table out of eth1 and comes back through the fabric (a hairpin via the
        //    VPC, as EC2 would deliver it), instead of staying on the node.
        let to_rules: Vec<Rule> = rules(&i1)?
            .into_iter()
            .filter(|r| r.priority == 512 && r.table.as_deref() == Some("512"))
            .collect();
        if to_rules.is_empty() {
            rep.row(
                false,
                &format!("to-pod rule `lookup 512 pref 512` exists in {NODE}"),
                "not found",
            );
        } else {
            const PINGS: u64 = 3;
            let pings = |n: u64| -> Result<(bool, u64)> {
                let before = tx_packets(&i1, "eth1")?;
                let ok = (0..n).all(|_| ping(&xs, POD_ON_PRIMARY_ENI, 2));
                Ok((ok, tx_packets(&i1, "eth1")? - before))
            };
            for r in &to_rules {
                ip_rule(&i1, "del", r)?;
            }
            let without = pings(PINGS);
            let mut restore_err = None;
            for r in &to_rules {
                if let Err(e) = ip_rule(&i1, "add", r) {
                    restore_err = Some(e);
                }
            }
            let (ok, tx) = without?;
            rep.row(
                tx >= PINGS,
                &format!("without `from all lookup 512 pref 512`: {xd} -> {yd} leaves {NODE} through eth1 (hairpin via the fabric)"),
                &format!("ping {}, eth1 sent {tx} packets for {PINGS} pings", if ok { "succeeded" } else { "failed" }),
            );
            if let Some(e) = restore_err {
                return Err(e.context("restoring the to-pod rule"));
            }
            let (ok, tx) = pings(PINGS)?;
            rep.row(
                ok && tx < PINGS,
                &format!("restored: {xd} -> {yd} stays on {NODE}"),
                &format!("eth1 sent {tx} packets for {PINGS} pings"),
            );
        }
        // 3. The SNAT: the internet gateway has no mapping for a pod address.
        match save_nft_table(&i1) {
            Err(e) => rep.row(
                false,
                &format!("nft table `ip vpc-cni` exists in {NODE}"),
                &format!("{e:#}"),
            ),
            Ok(saved) => {
                // the SNAT and its connmark; the ENI marks (chain from-pod) stay
                for chain in ["prerouting", "postrouting"] {
                    ns::run(&i1, &["nft", "flush", "chain", "ip", "vpc-cni", chain])?;
                }
                let before = fabric::igw_drops()?;
                let r = whoami(&xs);
                let after = fabric::igw_drops()?;
                let restored = restore_nft_table(&i1, &saved);
                rep.row(
                    r.is_err() && after > before,
                    &format!("without the SNAT (chains prerouting, postrouting of table ip vpc-cni): {xd} -> internet fails, the IGW has no mapping for {POD_ON_SECONDARY_ENI}"),
                    &format!(
                        "{}, IGW drops {before} -> {after}",
                        match &r {
                            Ok(s) => format!("connected, seen as {s}"),
                            Err(e) => format!("{:#}", e).replace('\n', " "),
                        }
                    ),
                );
                restored?;
                match whoami(&xs) {
                    Ok(seen) => rep.row(
                        seen == i1_ip.to_string(),
                        &format!("restored: {xd} -> internet sees source {i1_ip}"),
                        &format!("it saw {seen}"),
                    ),
                    Err(e) => rep.row(
                        false,
                        &format!("restored: {xd} -> internet sees source {i1_ip}"),
                        &format!("{e:#}"),
                    ),
                }
            }
        }
    }
    let drops = fabric::src_check_drops(None).unwrap_or(0);
    println!(
        "== {} of {} rows as expected; fabric src-check drops so far: {drops}",
        rep.total - rep.failed,
        rep.total
    );
    Ok(rep.failed == 0)
}

/// `vpc-lab demo`: three pods on instance1, one on instance2, state, matrix with negatives.
pub fn demo() -> Result<bool> {
    let world = store::load_world()?;
    let pods_wanted = [
        (NODE, "default/pod-a"),
        (NODE, "default/pod-b"),
        (NODE, "default/pod-c"),
        ("instance2", "default/pod-d"),
    ];
    let mut added = Vec::new();
    let mut result = Ok(true);
    for (inst, pod) in pods_wanted {
        println!("== vpc-lab pod add {inst} {pod}");
        match pods::add(inst, pod, pods::Print::Compact) {
            Ok(_) => added.push((inst, pod)),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if result.is_ok() {
        let i1 = ns::instance_ns(NODE);
        println!("== routing state of {NODE}");
        let mut cmds: Vec<Vec<String>> = vec![
            vec!["ip".into(), "rule".into()],
            vec![
                "ip".into(),
                "route".into(),
                "show".into(),
                "table".into(),
                "main".into(),
            ],
            vec![
                "ip".into(),
                "route".into(),
                "show".into(),
                "table".into(),
                "512".into(),
            ],
        ];
        if let Some(inst) = world.instance(NODE) {
            for e in inst.enis.iter().filter(|e| e.device_index >= 1) {
                cmds.push(vec![
                    "ip".into(),
                    "route".into(),
                    "show".into(),
                    "table".into(),
                    (e.device_index + 1).to_string(),
                ]);
            }
        }
        cmds.push(vec![
            "nft".into(),
            "list".into(),
            "table".into(),
            "ip".into(),
            "vpc-cni".into(),
        ]);
        for c in cmds {
            let args: Vec<&str> = c.iter().map(String::as_str).collect();
            println!("# {}", c.join(" "));
            match ns::run(&i1, &args) {
                Ok(out) => print!("{out}"),
                Err(e) => println!("(failed: {e:#})"),
            }
        }
        println!("== vpc-lab status");
        control::status()?;
        result = run(true);
    }
    if std::env::var("KEEP").is_ok_and(|k| !k.is_empty()) {
        println!("== KEEP is set: the demo pods stay (`vpc-lab pod del <instance> <ns>/<name>`)");
        return result;
    }
    println!("== deleting the demo pods");
    for (inst, pod) in added.iter().rev() {
        if let Err(e) = pods::del(inst, pod, pods::Print::Pretty) {
            eprintln!("pod del {inst} {pod}: {e:#}");
            if result.is_ok() {
                result = Ok(false);
            }
        }
    }
    result
}

/// vpc-cni's nftables table `ip vpc-cni` in a namespace, as `nft list` prints it.
pub fn save_nft_table(ns_name: &str) -> Result<String> {
    ns::run(ns_name, &["nft", "list", "table", "ip", "vpc-cni"])
}

/// Deletes vpc-cni's nftables table in a namespace.
pub fn delete_nft_table(ns_name: &str) -> Result<()> {
    ns::run(ns_name, &["nft", "delete", "table", "ip", "vpc-cni"]).map(drop)
}

/// Puts back a table [`save_nft_table`] printed, replacing whatever is there now.
pub fn restore_nft_table(ns_name: &str, saved: &str) -> Result<()> {
    let _ = delete_nft_table(ns_name);
    ns::run_stdin(ns_name, &["nft", "-f", "-"], Some(saved))
        .with_context(|| format!("restoring table ip vpc-cni in {ns_name}"))?;
    Ok(())
}
