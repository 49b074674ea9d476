//! Moving a node between aws-node's data path (aws/amazon-vpc-cni-k8s v1.23) and ours, in
//! place, without a moment in which a running pod's packets have no path.
//!
//! aws-node wires a pod with its `/32` route in `main`, a rule `to <ip> lookup main pref 512`
//! and, for a pod on a secondary ENI, `from <ip> lookup <device + 1> pref 1536`; its host veth
//! stays in device group 0; egress SNAT is iptables rules in chain `AWS-SNAT-CHAIN-0` and
//! `mangle PREROUTING` (comments starting with "AWS"), and the connmark of pod connections is
//! either the nftables table `ip aws-cni` (hosts whose iptables is nf_tables, such as Debian's)
//! or the iptables chain `AWS-CONNMARK-CHAIN-0` (iptables-legacy hosts). Ours: the `/32` in `main` and in [`TO_POD_TABLE`] (one rule for every pod), the host
//! veth in the ENI's device group, which our nftables table turns into the ENI's `fwmark`
//! (one rule per ENI), and SNAT in our table `ip vpc-cni`.
//!
//! Each move adds the new layout's pieces first and removes the old layout's after, so both
//! route a packet the same way in between. ENI tables (`device + 1`), the ENI primary-IP rules
//! (32765) and the connmark rule (1024) are the same in both layouts and stay.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

use crate::netlink::Netlink;
use crate::ops::{NetOps, Route, Rule, Scope};
use crate::rules::{ensure_rule, reference_pod_rule, tolerate_missing};
use crate::snat::{Randomize, SnatConfig};
use crate::{
    DataplaneError, ENI_MARK_MASK, FROM_POD_RULE_PRIORITY, MAIN_TABLE, TO_POD_RULE_PRIORITY,
    TO_POD_TABLE,
};

fn host32(ip: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::new(ip, 32).expect("/32 is valid")
}

/// The host veth of the pod at `ip`: the device of its `/32` link route in `main` (both
/// layouts have it), else in the to-pod table.
fn pod_veth<N: NetOps>(n: &mut N, ip: Ipv4Addr) -> Result<u32, DataplaneError> {
    for table in [MAIN_TABLE, TO_POD_TABLE] {
        if let Some(idx) = n
            .routes(Some(table))?
            .into_iter()
            .find(|r| r.dst == host32(ip) && r.oif.is_some())
            .and_then(|r| r.oif)
        {
            return Ok(idx);
        }
    }
    Err(DataplaneError::LinkNotFound {
        what: format!("no route {ip}/32 to a host veth in table main or {TO_POD_TABLE}"),
    })
}

/// The device group of the host veth of a pod routed through `route_table` in our layout.
fn our_group(route_table: u32) -> Result<u32, DataplaneError> {
    crate::group_for_route_table(route_table).ok_or_else(|| DataplaneError::Invalid {
        what: "route table (254 for the primary ENI, else ENI device number + 1 in 2..=64)",
        value: route_table.to_string(),
    })
}

/// aws-node's per-pod rules of `ip`, as they are on the node (the `from` rule may exist in
/// several copies from older versions).
fn legacy_rules<N: NetOps>(n: &mut N, ip: Ipv4Addr) -> Result<Vec<Rule>, DataplaneError> {
    Ok(n.rules()?
        .into_iter()
        .filter(|r| reference_pod_rule(r) == Some(ip))
        .collect())
}

/// Takes the pod at `ip` (on the ENI whose table is `route_table`) from aws-node's layout into
/// ours: its `/32` into the to-pod table and its host veth into the ENI's device group first,
/// then aws-node's per-pod rules go. A pod already in our layout is left as it is. Returns
/// whether anything changed.
pub fn adopt_pod_with<N: NetOps>(
    n: &mut N,
    ip: Ipv4Addr,
    route_table: u32,
) -> Result<bool, DataplaneError> {
    let group = our_group(route_table)?;
    let veth = pod_veth(n, ip)?;
    let mut changed = false;
    let in_table = n
        .routes(Some(TO_POD_TABLE))?
        .iter()
        .any(|r| r.dst == host32(ip) && r.oif == Some(veth));
    if !in_table {
        n.replace_route(
            &Route::new(TO_POD_TABLE, host32(ip))
                .dev(veth)
                .scope(Scope::Link),
        )?;
        changed = true;
    }
    changed |= ensure_rule(n, &Rule::new(TO_POD_RULE_PRIORITY, TO_POD_TABLE))?;
    let link = n.links()?.into_iter().find(|l| l.index == veth);
    if link.is_some_and(|l| l.group != group) {
        n.set_link_group(veth, group)?;
        changed = true;
    }
    for r in legacy_rules(n, ip)? {
        tolerate_missing(n.del_rule(&r))?;
        changed = true;
    }
    Ok(changed)
}

/// [`adopt_pod_with`] in the caller's network namespace.
pub fn adopt_pod(ip: Ipv4Addr, route_table: u32) -> Result<bool, DataplaneError> {
    adopt_pod_with(&mut Netlink::new()?, ip, route_table)
}

/// The reverse of [`adopt_pod_with`], for a rollback to aws-node: aws-node's per-pod rules
/// first, then the pod's `/32` leaves the to-pod table and its host veth the ENI's group. The
/// ENI (and so aws-node's table for the `from` rule) is read from the veth's device group, so
/// no IMDS or checkpoint detail is needed. Returns the route table of the pod.
pub fn release_pod_with<N: NetOps>(n: &mut N, ip: Ipv4Addr) -> Result<u32, DataplaneError> {
    let veth = pod_veth(n, ip)?;
    let group = n
        .links()?
        .into_iter()
        .find(|l| l.index == veth)
        .map(|l| l.group)
        .unwrap_or(0);
    let route_table =
        crate::route_table_for_group(group).ok_or_else(|| DataplaneError::Invalid {
            what: "host veth device group (0 or an ENI's group)",
            value: format!("{group:#x} (pod {ip})"),
        })?;
    // The main route is what aws-node routes by; ours has it too, but make sure.
    n.replace_route(
        &Route::new(MAIN_TABLE, host32(ip))
            .dev(veth)
            .scope(Scope::Link),
    )?;
    ensure_rule(
        n,
        &Rule::new(TO_POD_RULE_PRIORITY, MAIN_TABLE).to(host32(ip)),
    )?;
    if route_table != MAIN_TABLE {
        ensure_rule(
            n,
            &Rule::new(FROM_POD_RULE_PRIORITY, route_table).from(host32(ip)),
        )?;
    }
    n.set_link_group(veth, 0)?;
    tolerate_missing(n.del_route(&Route::new(TO_POD_TABLE, host32(ip)).dev(veth)))?;
    Ok(route_table)
}

/// [`release_pod_with`] in the caller's network namespace.
pub fn release_pod(ip: Ipv4Addr) -> Result<u32, DataplaneError> {
    release_pod_with(&mut Netlink::new()?, ip)
}

/// Addresses of pods wired aws-node's way (a per-pod rule at 512 or 1536, or a `/32` through a
/// veth in `main` but not in the to-pod table): the pods [`adopt_pod_with`] has work for.
pub fn legacy_pods_with<N: NetOps>(
    n: &mut N,
) -> Result<std::collections::BTreeSet<Ipv4Addr>, DataplaneError> {
    let mut out: std::collections::BTreeSet<Ipv4Addr> =
        n.rules()?.iter().filter_map(reference_pod_rule).collect();
    let ours: std::collections::BTreeSet<Ipv4Addr> = n
        .routes(Some(TO_POD_TABLE))?
        .into_iter()
        .map(|r| r.dst.addr())
        .collect();
    for ip in crate::wired_pods_with(n)?.into_keys() {
        if !ours.contains(&ip) {
            out.insert(ip);
        }
    }
    Ok(out)
}

/// [`legacy_pods_with`] in the caller's network namespace.
pub fn legacy_pods() -> Result<std::collections::BTreeSet<Ipv4Addr>, DataplaneError> {
    legacy_pods_with(&mut Netlink::new()?)
}

/// Removes what our layout adds to a node beyond aws-node's (after every pod was released):
/// the rule into the to-pod table, the ENIs' `fwmark` rules, the to-pod table's routes.
/// Collects every error.
pub fn remove_our_rules_with<N: NetOps>(n: &mut N) -> Result<(), Vec<DataplaneError>> {
    let mut errors = Vec::new();
    match n.rules() {
        Ok(rules) => {
            for r in rules.iter().filter(|r| {
                (r.priority == TO_POD_RULE_PRIORITY && r.table == TO_POD_TABLE)
                    || (r.priority == FROM_POD_RULE_PRIORITY && r.fwmask == Some(ENI_MARK_MASK))
            }) {
                if let Err(e) = tolerate_missing(n.del_rule(r)) {
                    errors.push(e.into());
                }
            }
        }
        Err(e) => errors.push(e.into()),
    }
    match n.routes(Some(TO_POD_TABLE)) {
        Ok(routes) => {
            for r in routes {
                if let Err(e) = tolerate_missing(n.del_route(&r)) {
                    errors.push(e.into());
                }
            }
        }
        Err(e) => errors.push(e.into()),
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// [`remove_our_rules_with`] in the caller's network namespace.
pub fn remove_our_rules() -> Result<(), Vec<DataplaneError>> {
    let mut n = Netlink::new().map_err(|e| vec![e.into()])?;
    remove_our_rules_with(&mut n)
}

// ---- aws-node's iptables rules --------------------------------------------------------------

/// The tables aws-node programs.
const IPTABLES_TABLES: [&str; 2] = ["nat", "mangle"];

/// Whether a line of `iptables-save` belongs to aws-node: a rule in one of its `AWS-*` chains
/// or one carrying its comment (`"AWS …"`).
fn is_aws_rule(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("-A ") else {
        return false;
    };
    rest.starts_with("AWS-") || rest.contains("--comment \"AWS") || rest.contains("--comment AWS")
}

/// The `iptables-restore --noflush` script that removes aws-node's rules and chains from one
/// table, given its `iptables-save -t <table>` output; `None` when there is nothing of
/// aws-node's. Rules in other chains are deleted one by one; its own chains are flushed and
/// deleted after the jumps into them are gone.
pub fn aws_removal_script(table: &str, saved: &str) -> Option<String> {
    let mut deletes = Vec::new();
    let mut chains = Vec::new();
    for line in saved.lines() {
        if let Some(name) = line
            .strip_prefix(':')
            .and_then(|c| c.split_whitespace().next())
            && name.starts_with("AWS-")
        {
            chains.push(name.to_string());
        } else if is_aws_rule(line) && !line["-A ".len()..].starts_with("AWS-") {
            deletes.push(format!("-D {}", &line["-A ".len()..]));
        }
    }
    if deletes.is_empty() && chains.is_empty() {
        return None;
    }
    let mut s = format!("*{table}\n");
    for d in deletes {
        s.push_str(&d);
        s.push('\n');
    }
    for c in &chains {
        s.push_str(&format!("-F {c}\n"));
    }
    for c in &chains {
        s.push_str(&format!("-X {c}\n"));
    }
    s.push_str("COMMIT\n");
    Some(s)
}

/// aws-node's IPv4 SNAT and connmark rules for `c` as an `iptables-restore --noflush` script:
/// what its ipamd programs at start (`pkg/networkutils/network.go`), with the connmark in the
/// iptables-legacy form `AWS-CONNMARK-CHAIN-0` (its `--restore-mark --mask` keeps the other
/// mark bits), so a node rolled back to aws-node keeps SNATing from the first packet; aws-node
/// replaces that chain with its nftables table at its own start on nf_tables hosts.
pub fn aws_iptables_script(c: &SnatConfig) -> String {
    let mark = format!("{:#x}/{:#x}", c.connmark, c.connmark);
    let mut nat = String::from("*nat\n");
    let mut mangle = String::from("*mangle\n");
    let exempt: Vec<&Ipv4Net> = c.vpc_cidrs.iter().chain(&c.exclude_cidrs).collect();
    if !c.external_snat {
        nat.push_str(":AWS-SNAT-CHAIN-0 - [0:0]\n:AWS-CONNMARK-CHAIN-0 - [0:0]\n");
        nat.push_str(
            "-A POSTROUTING -m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0\n",
        );
        for cidr in &c.vpc_cidrs {
            nat.push_str(&format!(
                "-A AWS-SNAT-CHAIN-0 -d {cidr} -m comment --comment \"AWS SNAT CHAIN\" -j RETURN\n"
            ));
        }
        for cidr in &c.exclude_cidrs {
            nat.push_str(&format!(
                "-A AWS-SNAT-CHAIN-0 -d {cidr} -m comment --comment \"AWS SNAT CHAIN EXCLUSION\" -j RETURN\n"
            ));
        }
        let random = match c.randomize {
            Randomize::Prng => " --random-fully",
            Randomize::HashRandom => " --random",
            Randomize::None => "",
        };
        nat.push_str(&format!(
            "-A AWS-SNAT-CHAIN-0 ! -o vlan+ -m comment --comment \"AWS, SNAT\" -m addrtype ! --dst-type LOCAL -j SNAT --to-source {}{random}\n",
            c.primary_ip
        ));
        nat.push_str(&format!(
            "-A PREROUTING -i {}+ -m comment --comment \"AWS, outbound connections\" -j AWS-CONNMARK-CHAIN-0\n",
            c.veth_prefix
        ));
        for cidr in &exempt {
            nat.push_str(&format!(
                "-A AWS-CONNMARK-CHAIN-0 -d {cidr} -m comment --comment \"AWS CONNMARK CHAIN\" -j RETURN\n"
            ));
        }
        nat.push_str(&format!(
            "-A AWS-CONNMARK-CHAIN-0 -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --set-xmark {mark}\n"
        ));
        nat.push_str(&format!(
            "-A PREROUTING -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --restore-mark --nfmask {m:#x} --ctmask {m:#x}\n",
            m = c.connmark
        ));
    }
    if c.node_port_support {
        mangle.push_str(&format!(
            "-A PREROUTING -i {} -m comment --comment \"AWS, primary ENI\" -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-xmark {mark}\n",
            c.primary_ifname
        ));
    }
    if c.node_port_support || !c.external_snat {
        mangle.push_str(&format!(
            "-A PREROUTING -i {}+ -m comment --comment \"AWS, primary ENI\" -j CONNMARK --restore-mark --nfmask {m:#x} --ctmask {m:#x}\n",
            c.veth_prefix,
            m = c.connmark
        ));
    }
    if c.node_port_support {
        // Branch ENIs (security groups for pods) are VLAN links `vlan.eth.<id>`.
        mangle.push_str(&format!(
            "-A PREROUTING -i vlan+ -m comment --comment \"AWS, primary ENI\" -j CONNMARK --restore-mark --nfmask {m:#x} --ctmask {m:#x}\n",
            m = c.connmark
        ));
    }
    nat.push_str("COMMIT\n");
    mangle.push_str("COMMIT\n");
    nat + &mangle
}

fn run_iptables(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, DataplaneError> {
    let fail = |msg: String| DataplaneError::Iptables {
        command: format!("{program} {}", args.join(" ")),
        msg,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot run it ({e}); is iptables installed?")))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(format!(
            "{}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdin.map(|s| format!("\ninput:\n{s}")).unwrap_or_default()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// aws-node's nftables connmark table (`pkg/networkutils/nftables_connmark.go`, used on hosts
/// whose iptables is nf_tables): its `nat-prerouting` chain sets the whole packet mark from the
/// connmark bit on a connection's first packet, which would wipe the ENI bits our table sets
/// for an adopted pod. The agent removes it before it moves any pod.
pub const AWS_NFT_TABLE: &str = "aws-cni";

/// Deletes aws-node's nftables table `ip aws-cni` if it exists. Returns whether it did.
pub fn remove_aws_nft_table() -> Result<bool, DataplaneError> {
    let nft = |args: &[&str]| -> Result<String, DataplaneError> {
        let fail = |msg: String| DataplaneError::Nft {
            table: AWS_NFT_TABLE.to_string(),
            msg,
        };
        let out = Command::new("nft")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| fail(format!("cannot run nft {}: {e}", args.join(" "))))?;
        if !out.status.success() {
            return Err(fail(format!(
                "nft {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let listed = nft(&["list", "tables", "ip"])?;
    if !listed
        .lines()
        .any(|l| l.trim() == format!("table ip {AWS_NFT_TABLE}"))
    {
        return Ok(false);
    }
    nft(&["delete", "table", "ip", AWS_NFT_TABLE])?;
    Ok(true)
}

/// Removes aws-node's iptables rules and chains (nat, mangle) and its nftables connmark table
/// `ip aws-cni`, if any. Returns how many tables held something of aws-node's.
pub fn remove_aws_iptables() -> Result<usize, DataplaneError> {
    let mut changed = 0;
    for table in IPTABLES_TABLES {
        let saved = run_iptables("iptables-save", &["-t", table], None)?;
        if let Some(script) = aws_removal_script(table, &saved) {
            run_iptables("iptables-restore", &["--noflush"], Some(&script))?;
            changed += 1;
        }
    }
    if remove_aws_nft_table()? {
        changed += 1;
    }
    Ok(changed)
}

/// Programs aws-node's SNAT and connmark rules ([`aws_iptables_script`]), after removing any
/// it already has (so the result is exactly one set).
pub fn install_aws_iptables(c: &SnatConfig) -> Result<(), DataplaneError> {
    remove_aws_iptables()?;
    run_iptables(
        "iptables-restore",
        &["--noflush"],
        Some(&aws_iptables_script(c)),
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeNet, FakeWorld};
    use crate::ops::Mac;

    const IP: Ipv4Addr = Ipv4Addr::new(172, 31, 13, 130);

    /// A node with one host veth wired aws-node's way for `IP` on ENI 1 (table 2).
    fn legacy_node() -> (FakeNet, u32) {
        let w = FakeWorld::new(&["host"]);
        let veth = w.borrow_mut().add_link(
            "host",
            "eni0123456789a",
            Some(Mac([2, 0, 0, 0, 0, 1])),
            Some("veth"),
        );
        let mut n = FakeNet::new(&w, "host");
        n.add_route(
            &Route::new(MAIN_TABLE, host32(IP))
                .dev(veth)
                .scope(Scope::Link),
        )
        .unwrap();
        n.add_rule(&Rule::new(512, MAIN_TABLE).to(host32(IP)))
            .unwrap();
        n.add_rule(&Rule::new(1536, 2).from(host32(IP))).unwrap();
        (n, veth)
    }

    #[test]
    fn adopt_moves_a_pod_into_our_layout_and_is_idempotent() {
        let (mut n, veth) = legacy_node();
        assert!(
            crate::wired_pods_with(&mut n).unwrap().contains_key(&IP),
            "a pod routed from main through a veth counts as wired"
        );
        assert!(adopt_pod_with(&mut n, IP, 2).unwrap());
        let rules = n.rules().unwrap();
        assert!(
            rules
                .iter()
                .all(|r| r.src != Some(host32(IP)) && r.dst != Some(host32(IP)))
        );
        assert!(rules.contains(&Rule::new(512, TO_POD_TABLE)));
        assert!(
            n.routes(Some(TO_POD_TABLE))
                .unwrap()
                .iter()
                .any(|r| r.dst == host32(IP) && r.oif == Some(veth))
        );
        let l = n
            .links()
            .unwrap()
            .into_iter()
            .find(|l| l.index == veth)
            .unwrap();
        assert_eq!(l.group, crate::pod_group(1));
        assert!(
            !adopt_pod_with(&mut n, IP, 2).unwrap(),
            "second run changes nothing"
        );
    }

    #[test]
    fn release_gives_the_pod_back_to_aws_node() {
        let (mut n, veth) = legacy_node();
        assert_eq!(legacy_pods_with(&mut n).unwrap(), [IP].into());
        adopt_pod_with(&mut n, IP, 2).unwrap();
        assert!(legacy_pods_with(&mut n).unwrap().is_empty());
        assert_eq!(release_pod_with(&mut n, IP).unwrap(), 2);
        let rules = n.rules().unwrap();
        assert!(rules.contains(&Rule::new(512, MAIN_TABLE).to(host32(IP))));
        assert!(rules.contains(&Rule::new(1536, 2).from(host32(IP))));
        assert!(n.routes(Some(TO_POD_TABLE)).unwrap().is_empty());
        let l = n
            .links()
            .unwrap()
            .into_iter()
            .find(|l| l.index == veth)
            .unwrap();
        assert_eq!(l.group, 0);
        remove_our_rules_with(&mut n).unwrap();
        assert!(!n.rules().unwrap().contains(&Rule::new(512, TO_POD_TABLE)));
    }

    #[test]
    fn a_pod_without_a_route_is_an_error_naming_it() {
        let w = FakeWorld::new(&["host"]);
        let mut n = FakeNet::new(&w, "host");
        let e = adopt_pod_with(&mut n, IP, 2).unwrap_err().to_string();
        assert!(e.contains("172.31.13.130/32"), "{e}");
        assert!(adopt_pod_with(&mut n, IP, 99).is_err(), "bad table refused");
    }

    const SAVED_NAT: &str = "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:AWS-CONNMARK-CHAIN-0 - [0:0]\n:AWS-SNAT-CHAIN-0 - [0:0]\n:KUBE-SERVICES - [0:0]\n-A PREROUTING -i eni+ -m comment --comment \"AWS, outbound connections\" -j AWS-CONNMARK-CHAIN-0\n-A PREROUTING -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80\n-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A POSTROUTING -m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0\n-A AWS-CONNMARK-CHAIN-0 -d 172.31.0.0/16 -m comment --comment \"AWS CONNMARK CHAIN\" -j RETURN\n-A AWS-SNAT-CHAIN-0 -d 172.31.0.0/16 -m comment --comment \"AWS SNAT CHAIN\" -j RETURN\nCOMMIT\n";

    #[test]
    fn removal_deletes_only_aws_rules_then_its_chains() {
        let s = aws_removal_script("nat", SAVED_NAT).unwrap();
        assert_eq!(
            s,
            "*nat\n\
             -D PREROUTING -i eni+ -m comment --comment \"AWS, outbound connections\" -j AWS-CONNMARK-CHAIN-0\n\
             -D PREROUTING -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --restore-mark --nfmask 0x80 --ctmask 0x80\n\
             -D POSTROUTING -m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0\n\
             -F AWS-CONNMARK-CHAIN-0\n-F AWS-SNAT-CHAIN-0\n\
             -X AWS-CONNMARK-CHAIN-0\n-X AWS-SNAT-CHAIN-0\nCOMMIT\n"
        );
        assert!(!s.contains("KUBE"), "kube-proxy's rules are not touched");
        assert!(
            aws_removal_script("mangle", "*mangle\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n").is_none()
        );
    }

    #[test]
    fn the_installed_rules_are_exactly_what_removal_finds() {
        let c = SnatConfig {
            primary_ifname: "eth0".into(),
            primary_ip: Ipv4Addr::new(172, 31, 15, 228),
            vpc_cidrs: vec!["172.31.0.0/16".parse().unwrap()],
            exclude_cidrs: vec![],
            external_snat: false,
            randomize: Randomize::Prng,
            connmark: 0x80,
            veth_prefix: "eni".into(),
            node_port_support: true,
        };
        let script = aws_iptables_script(&c);
        assert!(script.contains("-j SNAT --to-source 172.31.15.228 --random-fully"));
        // What iptables-save would print back: every rule is found again by the removal.
        for table in IPTABLES_TABLES {
            let body = script
                .split("COMMIT\n")
                .find(|b| b.starts_with(&format!("*{table}")))
                .unwrap();
            let n_rules = body.lines().filter(|l| l.starts_with("-A ")).count();
            let removal = aws_removal_script(table, body).unwrap();
            let deleted = removal.lines().filter(|l| l.starts_with("-D ")).count();
            let in_own_chains = body.lines().filter(|l| l.starts_with("-A AWS-")).count();
            assert_eq!(deleted + in_own_chains, n_rules, "{table}: {removal}");
        }
        let ext = SnatConfig {
            external_snat: true,
            node_port_support: false,
            ..c
        };
        assert!(!aws_iptables_script(&ext).contains("-A "));
    }
}
