//! A node as aws-node (aws/amazon-vpc-cni-k8s v1.23, "the reference") leaves it, in the lab,
//! and the judge of whether a node is in that state.
//!
//! aws-node cannot be built here, so [`wire`] reproduces its node state from the reference's
//! source: the checkpoint `/var/run/aws-node/ipam.json` in its format, `10-aws.conflist` with
//! the plugins it chains, the ENI tables and rules, its iptables rules and its nftables connmark
//! table, and for every pod the veth pair, the route in `main` and the per-pod rules at 512 and
//! 1536. Which reference file each piece comes from is listed in docs/architecture.md
//! ("aws-node node fixture") and next to each piece below.
//!
//! [`check`] says whether aws-node v1.23, started now, would accept the node and keep every
//! running pod working (the rollback's judge). Facts are gathered from the instance's namespace
//! ([`gather`]) and judged by pure functions ([`judge`]), which the unit tests drive.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use lab_aws::world::{Instance, World};
use lab_net::ns;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};
use testkit::procs;

use crate::pods::{self, PodRecord};
use crate::{paths, store};

/// The network name of the reference's conflist, and of its checkpoint entries
/// (`misc/10-aws.conflist`; ipamd keys allocations by the network name the plugin sends).
pub const NETWORK: &str = "aws-cni";
/// `cniVersion` of `misc/10-aws.conflist`.
pub const CNI_VERSION: &str = "0.4.0";
/// The conflist aws-node's entrypoint writes into the CNI conf dir (`cmd/aws-vpc-cni/main.go`).
pub const CONFLIST: &str = "10-aws.conflist";
/// `CheckpointFormatVersion` (`pkg/ipamd/datastore/data_store.go`).
pub const CHECKPOINT_VERSION: &str = "vpc-cni-ipam/1";
/// Default `AWS_VPC_K8S_CNI_VETHPREFIX` (`pkg/networkutils/network.go`, `cmd/aws-vpc-cni/main.go`).
pub const VETH_PREFIX: &str = "eni";
/// Prefix of the CNI result's bookkeeping interface (`cmd/routed-eni-cni-plugin/cni.go`).
pub const DUMMY_PREFIX: &str = "dummy";
/// Default `AWS_VPC_ENI_MTU` (= pod MTU): ENIs, host veths, pod `eth0`.
pub const MTU: u32 = 9001;
/// Default `AWS_VPC_K8S_CNI_CONNMARK`.
pub const CONNMARK: u32 = 0x80;
/// `ToContainerRulePriority`: `to <pod ip> lookup main`.
pub const TO_CONTAINER_PRIORITY: u32 = 512;
/// `hostRulePriority`: `fwmark 0x80/0x80 lookup main`.
pub const HOST_RULE_PRIORITY: u32 = 1024;
/// `FromPodRulePriority`: `from <pod ip> lookup <eni table>` (secondary-ENI pods only).
pub const FROM_POD_PRIORITY: u32 = 1536;
/// `FromPrimaryIPofENIRulePriority`: `from <eni primary ip> lookup <eni table>`.
pub const ENI_PRIMARY_PRIORITY: u32 = 32765;
/// The pod's gateway (`CalculatePodIPv4GatewayIP(0)`, `pkg/networkutils/helper.go`).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The SNAT chain in table nat (`pkg/networkutils/network.go`).
pub const SNAT_CHAIN: &str = "AWS-SNAT-CHAIN-0";
/// The nftables connmark table (`pkg/networkutils/nftables_connmark.go`): the backend aws-node
/// v1.23 picks when `iptables --version` does not say `legacy` (Debian's says `nf_tables`).
pub const NFT_TABLE: &str = "aws-cni";
/// The iptables-legacy connmark chain (`pkg/networkutils/iptables_connmark.go`), which the
/// nftables backend deletes at start: not part of the node aws-node leaves on such a host.
pub const LEGACY_CONNMARK_CHAIN: &str = "AWS-CONNMARK-CHAIN-0";

const MAIN_TABLE: u32 = 254;

/// The routing table of the ENI at `device` on network card 0 (`CalculateRouteTableId`,
/// `pkg/networkutils/helper.go`): main for the primary ENI, `device + 1` otherwise.
pub fn eni_table(device: u32) -> u32 {
    dataplane::route_table_for_device(device)
}

/// The pod's host veth: `eni` + the first 11 hex characters of SHA-1(`<ns>.<name>`)
/// (`pkg/networkutils/names.go`).
pub fn host_veth(namespace: &str, name: &str) -> String {
    dataplane::host_veth_name(VETH_PREFIX, namespace, name)
}

/// The 11-hex suffix ipamd looks for among the host's links when it restores an allocation
/// (`validateAllocationByPodVethExistence`, `pkg/ipamd/datastore/data_store.go`).
pub fn veth_suffix(namespace: &str, name: &str) -> String {
    dataplane::host_veth_name("", namespace, name)
}

// ---------------------------------------------------------------------------------------------
// The checkpoint (`pkg/ipamd/datastore/data_store.go`: CheckpointData, CheckpointEntry,
// IPAMKey, IPAMMetadata; written by `checkpoint.go` as one JSON document and a newline).

/// `/var/run/aws-node/ipam.json` as aws-node reads and writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    #[serde(default)]
    pub version: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub allocations: Vec<Allocation>,
}

/// One assigned address (only assigned addresses are stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    #[serde(default, rename = "networkName")]
    pub network_name: String,
    #[serde(default, rename = "containerID")]
    pub container_id: String,
    #[serde(default, rename = "ifName")]
    pub if_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ipv4: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ipv6: String,
    /// Unix nanoseconds.
    #[serde(default, rename = "allocationTimestamp")]
    pub allocation_timestamp: i64,
    #[serde(default)]
    pub metadata: AllocationMetadata,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationMetadata {
    #[serde(
        default,
        rename = "k8sPodNamespace",
        skip_serializing_if = "String::is_empty"
    )]
    pub k8s_pod_namespace: String,
    #[serde(
        default,
        rename = "k8sPodName",
        skip_serializing_if = "String::is_empty"
    )]
    pub k8s_pod_name: String,
    #[serde(default, rename = "interfacesCount", skip_serializing_if = "is_zero")]
    pub interfaces_count: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn null_as_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

impl Checkpoint {
    /// Parses a checkpoint as aws-node would (unknown fields are ignored, as Go's decoder does).
    pub fn parse(text: &str) -> Result<Checkpoint> {
        serde_json::from_str(text).context("the checkpoint is not the reference's JSON")
    }

    /// The file's text: one JSON document and a newline (Go's `json.Encoder`).
    pub fn to_text(&self) -> String {
        let mut s = serde_json::to_string(self).expect("a checkpoint serialises");
        s.push('\n');
        s
    }
}

/// The allocation aws-node's ipamd records for a pod of the reference's plugin.
pub fn allocation(r: &PodRecord, ip: Ipv4Addr, timestamp_ns: i64) -> Allocation {
    Allocation {
        network_name: NETWORK.to_string(),
        container_id: r.container_id.clone(),
        if_name: r.ifname.clone(),
        ipv4: ip.to_string(),
        ipv6: String::new(),
        allocation_timestamp: timestamp_ns,
        metadata: AllocationMetadata {
            k8s_pod_namespace: r.namespace.clone(),
            k8s_pod_name: r.name.clone(),
            interfaces_count: 1,
        },
    }
}

// ---------------------------------------------------------------------------------------------
// The conflist (`misc/10-aws.conflist`, rendered by `cmd/aws-vpc-cni/main.go` with the
// defaults of an IPv4 cluster: egress-cni for IPv6 egress, disabled).

/// `10-aws.conflist` as aws-node's entrypoint renders it with default settings.
pub fn conflist() -> Value {
    let mtu = MTU.to_string();
    json!({
        "cniVersion": CNI_VERSION,
        "name": NETWORK,
        "disableCheck": true,
        "plugins": [
            {
                "name": "aws-cni",
                "type": "aws-cni",
                "vethPrefix": VETH_PREFIX,
                "mtu": mtu,
                "podSGEnforcingMode": "strict",
                "pluginLogFile": "/var/log/aws-routed-eni/plugin.log",
                "pluginLogLevel": "Debug",
                "capabilities": {"io.kubernetes.cri.pod-annotations": true}
            },
            {
                "name": "egress-cni",
                "type": "egress-cni",
                "mtu": mtu,
                "enabled": "false",
                "randomizeSNAT": "prng",
                "nodeIP": "",
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "fd00::ac:00/118"}]],
                    "routes": [{"dst": "::/0"}],
                    "dataDir": "/run/cni/v4pd/egress-v6-ipam"
                },
                "pluginLogFile": "/var/log/aws-routed-eni/egress-v6-plugin.log",
                "pluginLogLevel": "Debug"
            },
            {
                "type": "portmap",
                "capabilities": {"portMappings": true},
                "snat": true
            }
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// The CNI result of the chain (aws-cni's, passed through by egress-cni when disabled and by
// portmap): `cmd/routed-eni-cni-plugin/cni.go` builds host veth, container interface (its
// `mac` holds the route table id), and the dummy interface (`mac` = VLAN id 0, `sandbox` =
// device number); printed as CNI 0.4.0 (`version` per IP, no gateway for a regular pod).

/// The final ADD result of the reference's chain for a pod on the ENI at `device`.
pub fn pod_result(namespace: &str, name: &str, netns: &str, ip: Ipv4Addr, device: u32) -> Value {
    json!({
        "cniVersion": CNI_VERSION,
        "interfaces": [
            {"name": host_veth(namespace, name)},
            {"name": "eth0", "mac": eni_table(device).to_string(), "sandbox": netns},
            {
                "name": dataplane::host_veth_name(DUMMY_PREFIX, namespace, name),
                "mac": "0",
                "sandbox": device.to_string()
            }
        ],
        "ips": [{"version": "4", "interface": 1, "address": format!("{ip}/32")}],
        "dns": {}
    })
}

// ---------------------------------------------------------------------------------------------
// iptables (`pkg/networkutils/network.go`: `buildIptablesSNATRules`, `updateIptablesRules`).

/// One iptables rule of aws-node, in `iptables` argument form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptRule {
    pub table: &'static str,
    pub chain: String,
    pub spec: Vec<String>,
    /// Inserted at position 1 (the CIDR RETURN rules) instead of appended.
    pub insert_first: bool,
}

impl IptRule {
    /// `-t <table> -A <chain> <spec…>` as a shell-like line (for messages).
    pub fn display(&self) -> String {
        let quoted: Vec<String> = self
            .spec
            .iter()
            .map(|a| {
                if a.contains(' ') || a.contains(',') {
                    format!("\"{a}\"")
                } else {
                    a.clone()
                }
            })
            .collect();
        format!("-t {} -A {} {}", self.table, self.chain, quoted.join(" "))
    }
}

/// aws-node's iptables rules in the order it applies them, with default settings
/// (`AWS_VPC_K8S_CNI_EXTERNALSNAT=false`, `AWS_VPC_CNI_NODE_PORT_SUPPORT=true`,
/// `AWS_VPC_K8S_CNI_RANDOMIZESNAT=prng` → `--random-fully`, no excluded CIDRs).
pub fn iptables_rules(
    primary_if: &str,
    primary_ip: Ipv4Addr,
    vpc_cidrs: &[Ipv4Net],
) -> Vec<IptRule> {
    let rule = |table, chain: &str, spec: String, insert_first| IptRule {
        table,
        chain: chain.to_string(),
        spec: words(&spec),
        insert_first,
    };
    let mark = format!("{CONNMARK:#x}");
    let mut v = vec![rule(
        "nat",
        "POSTROUTING",
        format!("-m comment --comment 'AWS SNAT CHAIN' -j {SNAT_CHAIN}"),
        false,
    )];
    for c in vpc_cidrs {
        let spec = format!(
            "-d {} -m comment --comment 'AWS SNAT CHAIN' -j RETURN",
            c.trunc()
        );
        v.push(rule("nat", SNAT_CHAIN, spec, true));
    }
    v.push(rule(
        "nat",
        SNAT_CHAIN,
        format!(
            "! -o vlan+ -m comment --comment 'AWS, SNAT' -m addrtype ! --dst-type LOCAL \
             -j SNAT --to-source {primary_ip} --random-fully"
        ),
        false,
    ));
    let comment = "-m comment --comment 'AWS, primary ENI'";
    v.push(rule(
        "mangle",
        "PREROUTING",
        format!(
            "{comment} -i {primary_if} -m addrtype --dst-type LOCAL --limit-iface-in \
             -j CONNMARK --set-mark {mark}/{mark}"
        ),
        false,
    ));
    for iface in [format!("{VETH_PREFIX}+"), "vlan+".to_string()] {
        let spec = format!("{comment} -i {iface} -j CONNMARK --restore-mark --mask {mark}");
        v.push(rule("mangle", "PREROUTING", spec, false));
    }
    v
}

/// The iptables-legacy connmark backend's rules (`pkg/networkutils/iptables_connmark.go`),
/// which aws-node v1.23 uses only when `iptables --version` says `legacy`. Not wired here; the
/// judge accepts them in place of `table ip aws-cni`, which aws-node would swap in at start.
pub fn legacy_connmark_rules(exempt: &[Ipv4Net]) -> Vec<IptRule> {
    let rule = |chain: &str, spec: String, insert_first| IptRule {
        table: "nat",
        chain: chain.to_string(),
        spec: words(&spec),
        insert_first,
    };
    let mark = format!("{CONNMARK:#x}");
    let mut v = vec![rule(
        "PREROUTING",
        format!(
            "-i {VETH_PREFIX}+ -m comment --comment 'AWS, outbound connections' \
             -j {LEGACY_CONNMARK_CHAIN}"
        ),
        false,
    )];
    for c in exempt {
        let spec = format!(
            "-d {} -m comment --comment 'AWS CONNMARK CHAIN' -j RETURN",
            c.trunc()
        );
        v.push(rule(LEGACY_CONNMARK_CHAIN, spec, true));
    }
    v.push(rule(
        LEGACY_CONNMARK_CHAIN,
        format!("-m comment --comment 'AWS, CONNMARK' -j CONNMARK --set-xmark {mark}/{mark}"),
        false,
    ));
    v.push(rule(
        "PREROUTING",
        format!("-m comment --comment 'AWS, CONNMARK' -j CONNMARK --restore-mark --mask {mark}"),
        false,
    ));
    v
}

/// Splits a command line on blanks; `'…'` groups words (no escapes: the lab's names have
/// none).
pub fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for ch in line.chars() {
        match ch {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// nftables connmark (`pkg/networkutils/nftables_connmark.go`). The CIDR rules are written
// `ip daddr & <mask> == <net>` so that nft emits the same expressions as aws-node's netlink
// (4-byte payload load, bitwise, cmp), which its reconciler recognises.

/// The `nft -f` script that (re)creates `table ip aws-cni` as aws-node leaves it.
pub fn nft_script(exempt: &[Ipv4Net]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "table ip {NFT_TABLE} {{}}");
    let _ = writeln!(s, "delete table ip {NFT_TABLE}");
    let _ = writeln!(s, "table ip {NFT_TABLE} {{");
    let _ = writeln!(s, "  chain nat-prerouting {{");
    let _ = writeln!(
        s,
        "    type nat hook prerouting priority -90; policy accept;"
    );
    let _ = writeln!(s, "    fib daddr type local return");
    let _ = writeln!(s, "    iifname \"{VETH_PREFIX}*\" counter jump snat-mark");
    let _ = writeln!(s, "    counter meta mark set ct mark & {CONNMARK:#x}");
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  chain snat-mark {{");
    // aws-node inserts each CIDR rule at the head: the last one ends up first.
    for c in exempt.iter().rev() {
        let c = c.trunc();
        let _ = writeln!(
            s,
            "    counter ip daddr & {} == {} return",
            c.netmask(),
            c.network()
        );
    }
    let _ = writeln!(s, "    counter ct mark set ct mark | {CONNMARK:#x}");
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");
    s
}

// ---------------------------------------------------------------------------------------------
// Choosing the pods' addresses.

/// Picks `n` free secondary IPs of `inst`'s ENIs (`taken` are held already), spreading the pods
/// over the ENIs: each pod goes to the ENI with free addresses that holds the fewest pods so
/// far (the lowest device index on a tie), so with two pods or more both the primary and a
/// secondary ENI are covered. Returns (address, device index) per pod.
pub fn plan_addresses(
    inst: &Instance,
    taken: &BTreeSet<Ipv4Addr>,
    n: usize,
) -> Result<Vec<(Ipv4Addr, u32)>> {
    let mut free: BTreeMap<u32, Vec<Ipv4Addr>> = BTreeMap::new();
    let mut held: BTreeMap<u32, usize> = BTreeMap::new();
    for e in &inst.enis {
        let mut f: Vec<Ipv4Addr> = e
            .secondary_ips
            .iter()
            .filter(|ip| !taken.contains(ip))
            .copied()
            .collect();
        f.sort();
        f.reverse(); // pop() hands out the lowest first
        held.insert(
            e.device_index,
            e.secondary_ips
                .iter()
                .filter(|ip| taken.contains(ip))
                .count(),
        );
        free.insert(e.device_index, f);
    }
    let available: usize = free.values().map(Vec::len).sum();
    if available < n {
        let per_eni: Vec<String> = free
            .iter()
            .map(|(d, f)| format!("eth{d}: {}", f.len()))
            .collect();
        bail!(
            "{} has {available} free secondary IPs ({}) and {n} pods were asked for; aws-node would fail their ADD (no available IP address)",
            inst.name,
            per_eni.join(", ")
        );
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let device = *free
            .iter()
            .filter(|(_, f)| !f.is_empty())
            .min_by_key(|(d, _)| (held[*d], **d))
            .map(|(d, _)| d)
            .expect("enough addresses were counted");
        let ip = free.get_mut(&device).and_then(Vec::pop).expect("non-empty");
        *held.get_mut(&device).expect("known ENI") += 1;
        out.push((ip, device));
    }
    Ok(out)
}

/// The device index of the ENI of `inst` holding secondary IP `ip`.
pub fn device_of(inst: &Instance, ip: Ipv4Addr) -> Option<u32> {
    inst.enis
        .iter()
        .find(|e| e.secondary_ips.contains(&ip))
        .map(|e| e.device_index)
}

// ---------------------------------------------------------------------------------------------
// Running commands in the lab's namespaces.

/// Runs `args` in `ns_name`: (success, stdout, stderr).
fn try_run(ns_name: &str, args: &[&str]) -> Result<(bool, String, String)> {
    let out = ns::command(ns_name, args[0])?
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{}` in {ns_name}", args.join(" ")))?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn json_of<T: DeserializeOwned>(ns_name: &str, args: &[&str]) -> Result<T> {
    let out = ns::run(ns_name, args)?;
    let text = if out.trim().is_empty() { "[]" } else { &out };
    serde_json::from_str(text)
        .with_context(|| format!("parsing the output of `{}` in {ns_name}", args.join(" ")))
}

/// Runs a command line ([`words`]) in `ns_name`; fails with its stderr when it fails.
fn run_line(ns_name: &str, line: &str) -> Result<String> {
    let w = words(line);
    let args: Vec<&str> = w.iter().map(String::as_str).collect();
    ns::run(ns_name, &args)
}

/// Runs a command line in `ns_name`: whether it succeeded.
fn try_line(ns_name: &str, line: &str) -> Result<bool> {
    let w = words(line);
    let args: Vec<&str> = w.iter().map(String::as_str).collect();
    Ok(try_run(ns_name, &args)?.0)
}

/// `ip -j rule show` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct IpRule {
    pub priority: u32,
    #[serde(default)]
    pub src: Option<String>,
    #[serde(default)]
    pub srclen: Option<u8>,
    #[serde(default)]
    pub dst: Option<String>,
    #[serde(default)]
    pub dstlen: Option<u8>,
    #[serde(default)]
    pub table: Option<String>,
    #[serde(default)]
    pub fwmark: Option<String>,
    #[serde(default)]
    pub fwmask: Option<String>,
}

fn net_of(addr: &Option<String>, len: Option<u8>) -> Option<Ipv4Net> {
    let a = addr.as_deref()?;
    if a == "all" {
        return None;
    }
    Ipv4Net::new(a.parse().ok()?, len.unwrap_or(32)).ok()
}

fn table_number(t: &str) -> Option<u32> {
    match t {
        "main" => Some(MAIN_TABLE),
        "local" => Some(255),
        "default" => Some(253),
        n => n.parse().ok(),
    }
}

fn hex(s: &str) -> Option<u32> {
    u32::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

impl IpRule {
    pub fn src_net(&self) -> Option<Ipv4Net> {
        net_of(&self.src, self.srclen)
    }
    pub fn dst_net(&self) -> Option<Ipv4Net> {
        net_of(&self.dst, self.dstlen)
    }
    pub fn table_id(&self) -> Option<u32> {
        table_number(self.table.as_deref().unwrap_or("main"))
    }
    fn mark(&self) -> Option<(u32, u32)> {
        let m = hex(self.fwmark.as_deref()?)?;
        let k = self.fwmask.as_deref().and_then(hex).unwrap_or(u32::MAX);
        Some((m, k))
    }
    /// The rule as `ip rule` arguments (for messages and deletion).
    pub fn args(&self) -> Vec<String> {
        let mut a = Vec::new();
        match self.src_net() {
            Some(n) => a.extend(["from".into(), n.to_string()]),
            None => a.extend(["from".into(), "all".into()]),
        }
        if let Some(n) = self.dst_net() {
            a.extend(["to".into(), n.to_string()]);
        }
        if let Some(m) = &self.fwmark {
            a.push("fwmark".into());
            a.push(match &self.fwmask {
                Some(k) => format!("{m}/{k}"),
                None => m.clone(),
            });
        }
        a.extend([
            "lookup".into(),
            self.table.clone().unwrap_or_else(|| "main".into()),
            "pref".into(),
            self.priority.to_string(),
        ]);
        a
    }
}

/// `ip -j route show` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct IpRoute {
    pub dst: String,
    #[serde(default)]
    pub dev: Option<String>,
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
}

impl IpRoute {
    /// The destination as a network (`default` is 0.0.0.0/0, a bare address a /32).
    pub fn dst_net(&self) -> Option<Ipv4Net> {
        if self.dst == "default" {
            return Some(Ipv4Net::default());
        }
        match self.dst.split_once('/') {
            Some((a, l)) => Ipv4Net::new(a.parse().ok()?, l.parse().ok()?).ok(),
            None => Ipv4Net::new(self.dst.parse().ok()?, 32).ok(),
        }
    }
}

/// `ip -j link show` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct IpLink {
    pub ifname: String,
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
}

impl IpLink {
    /// The device group (0 = default).
    pub fn group_id(&self) -> u32 {
        match self.group.as_deref() {
            None | Some("default") => 0,
            Some(g) => g.parse().unwrap_or(u32::MAX),
        }
    }
    pub fn up(&self) -> bool {
        self.flags.iter().any(|f| f == "UP")
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
struct IpAddrLink {
    #[serde(default)]
    addr_info: Vec<IpAddrInfo>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct IpAddrInfo {
    #[serde(default)]
    family: String,
    #[serde(default)]
    local: String,
    #[serde(default)]
    prefixlen: u8,
    #[serde(default)]
    scope: String,
}

/// `ip -j neigh show` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct IpNeigh {
    pub dst: String,
    #[serde(default)]
    pub dev: Option<String>,
    #[serde(default)]
    pub lladdr: Option<String>,
    #[serde(default)]
    pub state: Vec<String>,
}

fn routes_in(ns_name: &str, table: &str) -> Result<Vec<IpRoute>> {
    let (ok, out, err) = try_run(ns_name, &["ip", "-j", "route", "show", "table", table])?;
    if !ok {
        if err.contains("does not exist") {
            return Ok(Vec::new());
        }
        bail!(
            "`ip -j route show table {table}` in {ns_name} failed: {}",
            err.trim()
        );
    }
    let text = if out.trim().is_empty() { "[]" } else { &out };
    serde_json::from_str(text).with_context(|| format!("parsing the routes of table {table}"))
}

fn read_sysctl(ns_name: &str, key: &str) -> Result<String> {
    let p = format!("/proc/sys/{}", key.replace('.', "/"));
    ns::in_ns(ns_name, move || {
        Ok(std::fs::read_to_string(&p)
            .with_context(|| format!("reading {p}"))?
            .trim()
            .to_string())
    })
}

fn random_bytes(n: usize) -> Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .context("reading /dev/urandom")?;
    Ok(b)
}

/// A random locally administered unicast MAC (the reference sets one on the host veth).
fn random_mac() -> Result<String> {
    let mut b = random_bytes(6)?;
    b[0] = (b[0] & 0xfe) | 0x02;
    Ok(b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn link_by_mac<'a>(links: &'a [IpLink], mac: &str) -> Option<&'a IpLink> {
    links.iter().find(|l| {
        l.address
            .as_deref()
            .is_some_and(|a| a.eq_ignore_ascii_case(mac))
    })
}

/// The running vpc-cni agent of `instance`, if any (its pid).
pub fn agent_pid(instance: &str) -> Option<i32> {
    procs::read_pid(&paths::agent_pid(instance)).filter(|p| procs::is_ours(*p, paths::AGENT_MARKER))
}

// ---------------------------------------------------------------------------------------------
// wire

/// `vpc-lab aws-node wire <instance> <ns/name>...`: makes `instance` look exactly as aws-node
/// v1.23 leaves it with these pods running (and the pods wired by an earlier `wire`), and
/// writes a lab pod record per pod (network `aws-cni`, CNI 0.4.0, the aws-cni chain's result).
///
/// Needs the lab up and the instance's vpc-cni agent stopped; refuses when the instance runs
/// vpc-cni pods or addresses run out. Removes what vpc-cni left on the node (its nftables
/// table, table 512 and its rule, its fwmark rules at 1536, its conflist, its veth groups): the
/// result is a node that ran aws-node only.
pub fn wire(instance: &str, pods: &[&str]) -> Result<Vec<PodRecord>> {
    let world = store::load_world()?;
    let inst = world
        .instance(instance)
        .with_context(|| {
            format!(
                "no instance {instance:?} in the lab (instances: {})",
                world
                    .instances
                    .iter()
                    .map(|i| i.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?
        .clone();
    let ins = ns::instance_ns(instance);
    if !ns::exists(&ins) {
        bail!("no namespace {ins}: is the lab up? run `vpc-lab up`");
    }
    if let Some(p) = agent_pid(instance) {
        bail!(
            "the vpc-cni agent of {instance} is running (pid {p}); aws-node and vpc-cni cannot both own the node: stop it with `vpc-lab agent stop {instance}`"
        );
    }
    if pods.is_empty() {
        bail!("name at least one pod (<namespace>/<name>)");
    }
    let mut wanted = Vec::new();
    for p in pods {
        let (pns, pname) = pods::parse_pod(p)?;
        if wanted.contains(&(pns.clone(), pname.clone())) {
            bail!("pod {p} is named twice");
        }
        wanted.push((pns, pname));
    }
    let existing: Vec<PodRecord> = pods::all_records()?
        .into_iter()
        .filter(|r| r.instance == instance)
        .collect();
    if let Some(r) = existing.iter().find(|r| r.network != NETWORK) {
        bail!(
            "{instance} runs pod {} of network {:?} (wired by vpc-cni); aws-node would not know it: delete it first (`vpc-lab pod del {instance} {}`)",
            r.display(),
            r.network,
            r.display()
        );
    }
    for (pns, pname) in &wanted {
        if existing
            .iter()
            .any(|r| &r.namespace == pns && &r.name == pname)
        {
            bail!("pod {pns}/{pname} already exists on {instance}");
        }
        let pn = ns::pod_ns(instance, pns, pname);
        if ns::exists(&pn) {
            bail!(
                "namespace {pn} exists but no pod record does: a leftover; `vpc-lab down` and `vpc-lab up` start afresh"
            );
        }
    }
    let taken: BTreeSet<Ipv4Addr> = existing.iter().flat_map(|r| r.ips()).collect();
    let plan = plan_addresses(&inst, &taken, wanted.len())?;

    remove_vpc_cni_state(instance, &inst)?;
    setup_node(instance, &inst, &world)?;

    let mut cp = std::fs::read_to_string(paths::agent_checkpoint(instance))
        .ok()
        .and_then(|t| Checkpoint::parse(&t).ok());
    let mut records = existing;
    let mut out = Vec::new();
    for ((pns, pname), (ip, device)) in wanted.iter().zip(plan) {
        let r = wire_pod(instance, pns, pname, ip, device)
            .with_context(|| format!("wiring pod {pns}/{pname} ({ip}, eth{device})"))?;
        pods::save_record(&r)?;
        records.push(r.clone());
        // ipamd writes the checkpoint on every assignment.
        cp = Some(write_checkpoint(instance, &records, cp.as_ref())?);
        out.push(r);
    }
    Ok(out)
}

/// Writes (and returns) the checkpoint aws-node's ipamd keeps for `records` (their
/// allocation timestamps kept from `old` when it has them).
fn write_checkpoint(
    instance: &str,
    records: &[PodRecord],
    old: Option<&Checkpoint>,
) -> Result<Checkpoint> {
    let now = now_ns();
    let mut allocations = Vec::new();
    for r in records {
        for ip in r.ips() {
            let ts = old
                .and_then(|c| {
                    c.allocations
                        .iter()
                        .find(|a| a.container_id == r.container_id && a.ipv4 == ip.to_string())
                })
                .map(|a| a.allocation_timestamp)
                .unwrap_or(now);
            allocations.push(allocation(r, ip, ts));
        }
    }
    let cp = Checkpoint {
        version: CHECKPOINT_VERSION.to_string(),
        allocations,
    };
    let p = paths::agent_checkpoint(instance);
    std::fs::create_dir_all(p.parent().expect("has a parent"))?;
    let tmp = p.with_extension("json.tmp");
    std::fs::write(&tmp, cp.to_text()).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &p).with_context(|| format!("renaming to {}", p.display()))?;
    Ok(cp)
}

/// Removes what the vpc-cni agent leaves on a node (it keeps its state when stopped): its
/// nftables table, the to-pod table 512 and its rule, its per-ENI fwmark rules at 1536, its
/// conflist, veths in its device groups, and the loose `rp_filter` of secondary ENIs.
fn remove_vpc_cni_state(instance: &str, inst: &Instance) -> Result<()> {
    let ins = ns::instance_ns(instance);
    let (_, tables, _) = try_run(&ins, &["nft", "list", "tables"])?;
    let ours = format!("table ip {}", dataplane::NFT_TABLE);
    if tables.lines().any(|l| l.trim() == ours) {
        run_line(&ins, &format!("nft delete {ours}"))?;
    }
    let rules: Vec<IpRule> = json_of(&ins, &["ip", "-j", "rule", "show"])?;
    for r in rules.iter().filter(|r| is_vpc_cni_rule(r)) {
        run_line(&ins, &format!("ip rule del {}", r.args().join(" ")))?;
    }
    let t512 = dataplane::TO_POD_TABLE.to_string();
    if !routes_in(&ins, &t512)?.is_empty() {
        run_line(&ins, &format!("ip route flush table {t512}"))?;
    }
    let links: Vec<IpLink> = json_of(&ins, &["ip", "-j", "link", "show"])?;
    for l in links.iter().filter(|l| is_vpc_cni_group(l.group_id())) {
        run_line(&ins, &format!("ip link del {}", l.ifname))?;
    }
    let conf = paths::conf_dir(instance).join(paths::CONFLIST);
    if let Err(e) = std::fs::remove_file(&conf)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(e).with_context(|| format!("removing {}", conf.display()));
    }
    let default_rp = read_sysctl(&ins, "net.ipv4.conf.default.rp_filter")?;
    for e in inst.enis.iter().filter(|e| e.device_index >= 1) {
        if let Some(l) = link_by_mac(&links, &e.mac) {
            let key = format!("net.ipv4.conf.{}.rp_filter", l.ifname);
            ns::sysctl(&ins, &key, &default_rp)?;
        }
    }
    Ok(())
}

/// A rule only vpc-cni installs: `from all lookup 512 pref 512`, or a per-ENI
/// `fwmark <d<<8>/0x3f00 lookup <d+1> pref 1536`.
fn is_vpc_cni_rule(r: &IpRule) -> bool {
    (r.priority == dataplane::TO_POD_RULE_PRIORITY && r.table_id() == Some(dataplane::TO_POD_TABLE))
        || (r.priority == dataplane::FROM_POD_RULE_PRIORITY
            && r.mark().is_some_and(|(_, k)| k == dataplane::ENI_MARK_MASK))
}

/// vpc-cni's device groups: secondary-ENI pod veths and retired veths.
fn is_vpc_cni_group(g: u32) -> bool {
    g == dataplane::RETIRED_LINK_GROUP
        || (dataplane::POD_GROUP_BASE + 1..=dataplane::POD_GROUP_BASE + dataplane::MAX_ENI_DEVICE)
            .contains(&g)
}

/// Node-wide state: `cmd/aws-vpc-cni-init/main.go` (rp_filter), `SetupHostNetwork` and
/// `UpdateHostSNATRules` (`pkg/networkutils/network.go`), `setupENINetwork` per secondary ENI,
/// the nftables connmark backend, and the conflist.
fn setup_node(instance: &str, inst: &Instance, world: &World) -> Result<()> {
    let ins = ns::instance_ns(instance);
    let primary = inst
        .primary_eni()
        .with_context(|| format!("{instance} has no primary ENI"))?;
    let links: Vec<IpLink> = json_of(&ins, &["ip", "-j", "link", "show"])?;
    let primary_if = link_by_mac(&links, &primary.mac)
        .with_context(|| format!("no interface with the primary ENI's MAC {}", primary.mac))?
        .ifname
        .clone();
    // The node (AMI, kube-proxy) forwards; the init container loosens the primary's
    // rp_filter; ipamd sets the primary ENI's MTU.
    ns::sysctl(&ins, "net.ipv4.ip_forward", "1")?;
    ns::sysctl(&ins, &format!("net.ipv4.conf.{primary_if}.rp_filter"), "2")?;
    run_line(&ins, &format!("ip link set {primary_if} mtu {MTU}"))?;
    // hostRulePriority: deleted, then added.
    let host_rule =
        format!("fwmark {CONNMARK:#x}/{CONNMARK:#x} lookup main pref {HOST_RULE_PRIORITY}");
    try_line(&ins, &format!("ip rule del {host_rule}"))?;
    run_line(&ins, &format!("ip rule add {host_rule}"))?;
    // Secondary ENIs (`setupENINetwork`).
    for e in inst.enis.iter().filter(|e| e.device_index >= 1) {
        let subnet = world
            .subnet(&e.subnet_id)
            .with_context(|| format!("ENI {} is in unknown subnet {}", e.id, e.subnet_id))?;
        let name = &link_by_mac(&links, &e.mac)
            .with_context(|| {
                format!(
                    "no interface with ENI {}'s MAC {} in {ins} (hot-plug pending?)",
                    e.id, e.mac
                )
            })?
            .ifname;
        let table = eni_table(e.device_index);
        let gw = subnet.gateway();
        let want = Ipv4Net::new(e.primary_ip, subnet.cidr.prefix_len())?.to_string();
        run_line(&ins, &format!("ip link set {name} mtu {MTU} up"))?;
        let addrs: Vec<IpAddrLink> =
            json_of(&ins, &["ip", "-j", "-4", "addr", "show", "dev", name])?;
        let mut have = false;
        for a in addrs.iter().flat_map(|l| &l.addr_info) {
            let addr = format!("{}/{}", a.local, a.prefixlen);
            if a.family != "inet" || a.scope != "global" {
                continue;
            } else if addr == want {
                have = true;
            } else {
                run_line(&ins, &format!("ip addr del {addr} dev {name}"))?;
            }
        }
        if !have {
            run_line(&ins, &format!("ip addr add {want} dev {name}"))?;
        }
        run_line(
            &ins,
            &format!("ip route replace {gw}/32 dev {name} scope link table {table}"),
        )?;
        run_line(
            &ins,
            &format!("ip route replace default via {gw} dev {name} table {table}"),
        )?;
        let subnet_net = subnet.cidr.trunc().to_string();
        let kernel_route = routes_in(&ins, "main")?
            .iter()
            .any(|r| r.dst == subnet_net && r.dev.as_deref() == Some(name) && r.gateway.is_none());
        if kernel_route {
            run_line(
                &ins,
                &format!("ip route del {subnet_net} dev {name} table main"),
            )?;
        }
        let src = Ipv4Net::new(e.primary_ip, 32)?;
        let rules: Vec<IpRule> = json_of(&ins, &["ip", "-j", "rule", "show"])?;
        if !rules
            .iter()
            .any(|r| r.priority == ENI_PRIMARY_PRIORITY && r.src_net() == Some(src))
        {
            let rule = format!("from {src} lookup {table} pref {ENI_PRIMARY_PRIORITY}");
            run_line(&ins, &format!("ip rule add {rule}"))?;
        }
    }
    // iptables (the node's `iptables`: nf_tables in the lab, as on Debian).
    if !try_line(&ins, &format!("iptables -w -t nat -S {SNAT_CHAIN}"))? {
        run_line(&ins, &format!("iptables -w -t nat -N {SNAT_CHAIN}"))?;
    }
    for r in iptables_rules(&primary_if, primary.primary_ip, &world.vpc_cidrs) {
        let mut check = vec!["iptables", "-w", "-t", r.table, "-C", &r.chain];
        check.extend(r.spec.iter().map(String::as_str));
        if try_run(&ins, &check)?.0 {
            continue;
        }
        let mut add = vec!["iptables", "-w", "-t", r.table];
        if r.insert_first {
            add.extend(["-I", &r.chain, "1"]);
        } else {
            add.extend(["-A", &r.chain]);
        }
        add.extend(r.spec.iter().map(String::as_str));
        ns::run(&ins, &add)?;
    }
    // The nftables connmark backend (which also removes the iptables-legacy variant's rules).
    ns::run_stdin(
        &ins,
        &["nft", "-f", "-"],
        Some(&nft_script(&world.vpc_cidrs)),
    )?;
    // The conflist.
    let dir = paths::conf_dir(instance);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{CONFLIST}.tmp"));
    std::fs::write(&tmp, serde_json::to_string_pretty(&conflist())? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(CONFLIST))?;
    Ok(())
}

/// One pod, as the aws-cni plugin's ADD wires it (`cmd/routed-eni-cni-plugin/driver/driver.go`:
/// `SetupPodNetwork`, `createVethPairContext.run`, `setupIPBasedContainerRouteRules`).
fn wire_pod(
    instance: &str,
    pns: &str,
    pname: &str,
    ip: Ipv4Addr,
    device: u32,
) -> Result<PodRecord> {
    let t0 = Instant::now();
    let ins = ns::instance_ns(instance);
    let podns = ns::pod_ns(instance, pns, pname);
    let veth = host_veth(pns, pname);
    let mac = random_mac()?;
    ns::add(&podns)?;
    let wired = (|| -> Result<()> {
        // A host link of that name is deleted first; the peer is created in the pod.
        if try_line(&ins, &format!("ip link show {veth}"))? {
            run_line(&ins, &format!("ip link del {veth}"))?;
        }
        run_line(
            &ins,
            &format!(
                "ip link add {veth} address {mac} mtu {MTU} type veth \
                 peer name eth0 mtu {MTU} netns {podns}"
            ),
        )?;
        for (k, v) in [
            ("accept_ra", "0"),
            ("accept_redirects", "1"),
            ("forwarding", "0"),
        ] {
            // No IPv6 on the node is not an error (the reference ignores ENOENT).
            let _ = ns::sysctl(&ins, &format!("net.ipv6.conf.{veth}.{k}"), v);
        }
        run_line(&ins, &format!("ip link set {veth} up"))?;
        let gw = POD_GATEWAY;
        let pod_side = format!(
            "link set eth0 up\n\
             route replace {gw}/32 dev eth0 scope link\n\
             route add default via {gw} dev eth0\n\
             addr add {ip}/32 dev eth0\n\
             neigh add {gw} lladdr {mac} dev eth0 nud permanent\n"
        );
        ns::run_stdin(&podns, &["ip", "-batch", "-"], Some(&pod_side))?;
        run_line(
            &ins,
            &format!("ip route replace {ip}/32 dev {veth} scope link table main"),
        )?;
        let rules: Vec<IpRule> = json_of(&ins, &["ip", "-j", "rule", "show"])?;
        let net = Ipv4Net::new(ip, 32)?;
        let has = |prio: u32, table: u32, to: bool| {
            rules.iter().any(|r| {
                r.priority == prio
                    && r.table_id() == Some(table)
                    && if to { r.dst_net() } else { r.src_net() } == Some(net)
            })
        };
        if !has(TO_CONTAINER_PRIORITY, MAIN_TABLE, true) {
            let rule = format!("to {net} lookup main pref {TO_CONTAINER_PRIORITY}");
            run_line(&ins, &format!("ip rule add {rule}"))?;
        }
        let table = eni_table(device);
        if device >= 1 && !has(FROM_POD_PRIORITY, table, false) {
            let rule = format!("from {net} lookup {table} pref {FROM_POD_PRIORITY}");
            run_line(&ins, &format!("ip rule add {rule}"))?;
        }
        Ok(())
    })();
    if let Err(e) = wired {
        let _ = ns::del(&podns);
        let _ = try_line(&ins, &format!("ip link del {veth}"));
        return Err(e);
    }
    let netns = ns::path(&podns).display().to_string();
    // Through serde, so fields the record gains (with their defaults) need no change here.
    let record = json!({
        "instance": instance,
        "namespace": pns,
        "name": pname,
        "container_id": random_container_id()?,
        "netns": netns,
        "ifname": "eth0",
        "network": NETWORK,
        "cni_version": CNI_VERSION,
        "result": pod_result(pns, pname, &netns, ip, device),
        "add_ms": t0.elapsed().as_secs_f64() * 1000.0,
    });
    serde_json::from_value(record).context("building the pod record")
}

fn random_container_id() -> Result<String> {
    Ok(random_bytes(32)?
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// check

/// An ENI of the instance, as EC2 has it and as the node shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniFact {
    pub device: u32,
    pub mac: String,
    pub primary_ip: Ipv4Addr,
    pub subnet: Ipv4Net,
    pub secondary_ips: Vec<Ipv4Addr>,
}

/// A running pod of the instance, from the lab's pod records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFact {
    pub namespace: String,
    pub name: String,
    pub container_id: String,
    pub ifname: String,
    pub ips: Vec<Ipv4Addr>,
}

impl PodFact {
    fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the pod's namespace shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSide {
    /// `eth0`'s IPv4 addresses, `a.b.c.d/len`.
    pub addrs: Vec<String>,
    pub routes: Vec<IpRoute>,
    pub neighbours: Vec<IpNeigh>,
    /// Why the namespace could not be read.
    pub error: Option<String>,
}

/// Everything [`judge`] looks at, gathered from the instance by [`gather`].
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    pub instance: String,
    pub enis: Vec<EniFact>,
    pub vpc_cidrs: Vec<Ipv4Net>,
    pub pods: Vec<PodFact>,
    /// The running vpc-cni agent's pid.
    pub agent_pid: Option<i32>,
    /// The checkpoint's text; `None` when there is no file.
    pub checkpoint: Option<String>,
    /// The conf dir's files (name, text if readable).
    pub conf_files: Vec<(String, Option<String>)>,
    pub rules: Vec<IpRule>,
    pub main_routes: Vec<IpRoute>,
    /// Routes of the secondary ENIs' tables and of table 512.
    pub tables: BTreeMap<u32, Vec<IpRoute>>,
    pub links: Vec<IpLink>,
    /// `nft list tables` lines, like `table ip vpc-cni`.
    pub nft_tables: Vec<String>,
    /// `nft -j list table ip aws-cni`.
    pub aws_nft: Option<Value>,
    /// aws-node's iptables rules that `iptables -C` did not find (their display form).
    pub iptables_missing: Vec<String>,
    /// The iptables-legacy connmark rules `iptables -C` did not find (all of them when that
    /// backend is not in use).
    pub legacy_connmark_missing: Vec<String>,
    pub ip_forward: Option<String>,
    /// By `ns/name`.
    pub pod_sides: BTreeMap<String, PodSide>,
}

/// `vpc-lab aws-node check <instance>`: the problems that would keep aws-node v1.23, started
/// now, from accepting the node or from keeping a running pod working; empty when it would.
pub fn check(instance: &str) -> Result<Vec<String>> {
    Ok(judge(&gather(instance)?))
}

/// Reads the node's state (the lab must be up).
pub fn gather(instance: &str) -> Result<NodeFacts> {
    let world = store::load_world()?;
    let inst = world
        .instance(instance)
        .with_context(|| format!("no instance {instance:?} in the lab"))?;
    let ins = ns::instance_ns(instance);
    if !ns::exists(&ins) {
        bail!("no namespace {ins}: is the lab up? run `vpc-lab up`");
    }
    let mut f = NodeFacts {
        instance: instance.to_string(),
        vpc_cidrs: world.vpc_cidrs.clone(),
        agent_pid: agent_pid(instance),
        ..NodeFacts::default()
    };
    for e in &inst.enis {
        let subnet = world
            .subnet(&e.subnet_id)
            .with_context(|| format!("ENI {} is in unknown subnet {}", e.id, e.subnet_id))?;
        f.enis.push(EniFact {
            device: e.device_index,
            mac: e.mac.clone(),
            primary_ip: e.primary_ip,
            subnet: subnet.cidr,
            secondary_ips: e.secondary_ips.clone(),
        });
    }
    let records: Vec<PodRecord> = pods::all_records()?
        .into_iter()
        .filter(|r| r.instance == instance)
        .collect();
    for r in &records {
        f.pods.push(PodFact {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            container_id: r.container_id.clone(),
            ifname: r.ifname.clone(),
            ips: r.ips(),
        });
    }
    f.checkpoint = match std::fs::read_to_string(paths::agent_checkpoint(instance)) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).context("reading the checkpoint"),
    };
    f.conf_files = conf_files(&paths::conf_dir(instance))?;
    f.rules = json_of(&ins, &["ip", "-j", "rule", "show"])?;
    f.main_routes = routes_in(&ins, "main")?;
    for e in inst.enis.iter().filter(|e| e.device_index >= 1) {
        let t = eni_table(e.device_index);
        f.tables.insert(t, routes_in(&ins, &t.to_string())?);
    }
    f.tables.insert(
        dataplane::TO_POD_TABLE,
        routes_in(&ins, &dataplane::TO_POD_TABLE.to_string())?,
    );
    f.links = json_of(&ins, &["ip", "-j", "link", "show"])?;
    let (_, tables, _) = try_run(&ins, &["nft", "list", "tables"])?;
    f.nft_tables = tables.lines().map(|l| l.trim().to_string()).collect();
    let (ok, out, _) = try_run(&ins, &["nft", "-j", "list", "table", "ip", NFT_TABLE])?;
    if ok {
        f.aws_nft = serde_json::from_str(&out).ok();
    }
    if let Some(primary) = inst.primary_eni() {
        let primary_if = link_by_mac(&f.links, &primary.mac)
            .map(|l| l.ifname.clone())
            .unwrap_or_else(|| "eth0".into());
        for r in iptables_rules(&primary_if, primary.primary_ip, &world.vpc_cidrs) {
            let mut c = vec!["iptables", "-w", "-t", r.table, "-C", &r.chain];
            c.extend(r.spec.iter().map(String::as_str));
            let (ok, _, _) = try_run(&ins, &c)?;
            if !ok {
                f.iptables_missing.push(r.display());
            }
        }
    }
    for r in legacy_connmark_rules(&world.vpc_cidrs) {
        let mut c = vec!["iptables", "-w", "-t", r.table, "-C", &r.chain];
        c.extend(r.spec.iter().map(String::as_str));
        if !try_run(&ins, &c)?.0 {
            f.legacy_connmark_missing.push(r.display());
        }
    }
    f.ip_forward = read_sysctl(&ins, "net.ipv4.ip_forward").ok();
    for p in &f.pods {
        let pn = ns::pod_ns(instance, &p.namespace, &p.name);
        f.pod_sides.insert(p.display(), pod_side(&pn));
    }
    Ok(f)
}

fn conf_files(dir: &Path) -> Result<Vec<(String, Option<String>)>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Ok(out);
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        out.push((name, std::fs::read_to_string(e.path()).ok()));
    }
    out.sort();
    Ok(out)
}

fn pod_side(pn: &str) -> PodSide {
    if !ns::exists(pn) {
        return PodSide {
            error: Some(format!("its network namespace {pn} does not exist")),
            ..PodSide::default()
        };
    }
    let read = || -> Result<PodSide> {
        let addrs: Vec<IpAddrLink> =
            json_of(pn, &["ip", "-j", "-4", "addr", "show", "dev", "eth0"])?;
        Ok(PodSide {
            addrs: addrs
                .iter()
                .flat_map(|l| &l.addr_info)
                .filter(|a| a.family == "inet")
                .map(|a| format!("{}/{}", a.local, a.prefixlen))
                .collect(),
            routes: routes_in(pn, "main")?,
            neighbours: json_of(pn, &["ip", "-j", "neigh", "show", "dev", "eth0"])?,
            error: None,
        })
    };
    read().unwrap_or_else(|e| PodSide {
        error: Some(format!("{e:#}")),
        ..PodSide::default()
    })
}

/// The problems of a node (pure: the unit tests drive it). Empty: aws-node v1.23 started now
/// would accept the node and keep every running pod working.
pub fn judge(f: &NodeFacts) -> Vec<String> {
    let mut p = Vec::new();
    if let Some(pid) = f.agent_pid {
        p.push(format!(
            "the vpc-cni agent is running (pid {pid}): aws-node and vpc-cni would both own the node"
        ));
    }
    p.extend(judge_checkpoint(f));
    p.extend(judge_pods(f));
    p.extend(judge_leftovers(f));
    p.extend(judge_conf_dir(&f.conf_files));
    p.extend(judge_node(f));
    p
}

/// The checkpoint as `ReadBackingStore` restores it (`pkg/ipamd/datastore/data_store.go`), and
/// against the running pods.
pub fn judge_checkpoint(f: &NodeFacts) -> Vec<String> {
    let mut p = Vec::new();
    let Some(text) = &f.checkpoint else {
        if !f.pods.is_empty() {
            p.push(format!(
                "no checkpoint (var/run/aws-node/ipam.json): aws-node would start with an empty pool and hand out the addresses of the {} running pods again",
                f.pods.len()
            ));
        }
        return p;
    };
    let cp = match Checkpoint::parse(text) {
        Ok(c) => c,
        Err(e) => {
            p.push(format!(
                "checkpoint: {e:#}: aws-node would fail to start (ipam state recovery)"
            ));
            return p;
        }
    };
    if cp.version != CHECKPOINT_VERSION {
        p.push(format!(
            "checkpoint version {:?}, not {CHECKPOINT_VERSION:?}: aws-node would fail to start (unexpected checkpointVersion)",
            cp.version
        ));
        return p;
    }
    let eni_ips: BTreeSet<Ipv4Addr> = f
        .enis
        .iter()
        .flat_map(|e| e.secondary_ips.iter().copied())
        .collect();
    let mut seen = BTreeSet::new();
    for a in &cp.allocations {
        let who = format!(
            "checkpoint allocation {}/{}/{} ({}{})",
            a.network_name,
            short(&a.container_id),
            a.if_name,
            if a.ipv4.is_empty() {
                "no IPv4"
            } else {
                &a.ipv4
            },
            if a.metadata.k8s_pod_name.is_empty() {
                String::new()
            } else {
                format!(
                    ", pod {}/{}",
                    a.metadata.k8s_pod_namespace, a.metadata.k8s_pod_name
                )
            }
        );
        let Ok(ip) = a.ipv4.parse::<Ipv4Addr>() else {
            p.push(format!("{who}: no IPv4 address aws-node could restore"));
            continue;
        };
        if !seen.insert(ip) {
            p.push(format!(
                "{who}: {ip} is allocated twice: aws-node would fail to start (IP already in datastore)"
            ));
        }
        if a.network_name != NETWORK {
            p.push(format!(
                "{who}: network name {:?}, not {NETWORK:?}: the runtime's DEL through 10-aws.conflist would not release it",
                a.network_name
            ));
        }
        if a.container_id.is_empty() || a.if_name.is_empty() {
            p.push(format!(
                "{who}: no container ID or interface name: no DEL could release it"
            ));
        }
        if !eni_ips.contains(&ip) {
            p.push(format!(
                "{who}: {ip} is not a secondary IP of an ENI of {}: aws-node would drop it as stale",
                f.instance
            ));
        }
        let (mns, mname) = (&a.metadata.k8s_pod_namespace, &a.metadata.k8s_pod_name);
        if !mns.is_empty() && !mname.is_empty() {
            let suffix = veth_suffix(mns, mname);
            if !f.links.iter().any(|l| l.ifname.ends_with(&suffix)) {
                p.push(format!(
                    "{who}: no host link ends with {suffix} (the veth of {mns}/{mname}): aws-node would prune the allocation and its rules"
                ));
            }
        }
        let pod = f.pods.iter().find(|r| {
            r.container_id == a.container_id && r.ifname == a.if_name && r.ips.contains(&ip)
        });
        match pod {
            None => p.push(format!(
                "{who}: no running pod has this container ID, interface and address: the address would stay allocated (leaked)"
            )),
            Some(r) if (mns, mname) != (&r.namespace, &r.name) => p.push(format!(
                "{who}: names pod {mns}/{mname} but belongs to pod {}",
                r.display()
            )),
            Some(_) => {}
        }
    }
    for r in &f.pods {
        for ip in &r.ips {
            let found = cp.allocations.iter().any(|a| {
                a.container_id == r.container_id
                    && a.if_name == r.ifname
                    && a.ipv4 == ip.to_string()
            });
            if !found {
                p.push(format!(
                    "pod {} ({ip}, container {}, {}): no checkpoint allocation: aws-node would hand {ip} out again and not release it on the pod's DEL",
                    r.display(),
                    short(&r.container_id),
                    r.ifname
                ));
            }
        }
    }
    p
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Each pod's data path as the aws-cni plugin wired it.
pub fn judge_pods(f: &NodeFacts) -> Vec<String> {
    let mut p = Vec::new();
    for pod in &f.pods {
        let d = pod.display();
        let veth = host_veth(&pod.namespace, &pod.name);
        let link = f.links.iter().find(|l| l.ifname == veth);
        match link {
            None => p.push(format!("pod {d}: no host veth {veth}")),
            Some(l) => {
                if !l.up() {
                    p.push(format!("pod {d}: host veth {veth} is down"));
                }
                if l.group_id() != 0 {
                    p.push(format!(
                        "pod {d}: host veth {veth} is in device group {:#x} (vpc-cni's), not the default group",
                        l.group_id()
                    ));
                }
            }
        }
        for &ip in &pod.ips {
            let net = Ipv4Net::new(ip, 32).expect("/32");
            let in_main = f.main_routes.iter().any(|r| {
                r.dst_net() == Some(net)
                    && r.dev.as_deref() == Some(&veth)
                    && r.scope.as_deref() == Some("link")
                    && r.gateway.is_none()
            });
            if !in_main {
                p.push(format!(
                    "pod {d}: no route `{ip} dev {veth} scope link` in table main"
                ));
            }
            let to_rules: Vec<&IpRule> = f
                .rules
                .iter()
                .filter(|r| r.priority == TO_CONTAINER_PRIORITY && r.dst_net() == Some(net))
                .collect();
            if !to_rules.iter().any(|r| {
                r.table_id() == Some(MAIN_TABLE) && r.src_net().is_none() && r.fwmark.is_none()
            }) {
                p.push(format!(
                    "pod {d}: no rule `to {ip} lookup main pref {TO_CONTAINER_PRIORITY}`"
                ));
            }
            let from_tables: BTreeSet<u32> = f
                .rules
                .iter()
                .filter(|r| r.priority == FROM_POD_PRIORITY && r.src_net() == Some(net))
                .filter_map(IpRule::table_id)
                .collect();
            let device = f
                .enis
                .iter()
                .find(|e| e.secondary_ips.contains(&ip))
                .map(|e| e.device);
            match device {
                None => p.push(format!(
                    "pod {d}: {ip} is not a secondary IP of any ENI of {}",
                    f.instance
                )),
                Some(0) => {
                    if !from_tables.is_empty() {
                        p.push(format!(
                            "pod {d}: {ip} is on the primary ENI but has rule(s) `from {ip} pref {FROM_POD_PRIORITY}` to table(s) {from_tables:?}"
                        ));
                    }
                }
                Some(dev) => {
                    let t = eni_table(dev);
                    if !from_tables.contains(&t) {
                        p.push(format!(
                            "pod {d}: no rule `from {ip} lookup {t} pref {FROM_POD_PRIORITY}` (its ENI eth{dev}): its traffic would leave through the primary ENI with eth{dev}'s address"
                        ));
                    }
                    let other: Vec<&u32> = from_tables.iter().filter(|x| **x != t).collect();
                    if !other.is_empty() {
                        p.push(format!(
                            "pod {d}: rule(s) `from {ip} pref {FROM_POD_PRIORITY}` to the wrong table(s) {other:?} (its ENI's is {t})"
                        ));
                    }
                }
            }
        }
        let Some(side) = f.pod_sides.get(&d) else {
            continue;
        };
        if let Some(e) = &side.error {
            p.push(format!("pod {d}: {e}"));
            continue;
        }
        for ip in &pod.ips {
            if !side.addrs.contains(&format!("{ip}/32")) {
                p.push(format!(
                    "pod {d}: eth0 in the pod does not have {ip}/32 (has {:?})",
                    side.addrs
                ));
            }
        }
        let gw = POD_GATEWAY.to_string();
        if !side.routes.iter().any(|r| {
            r.dst == "default"
                && r.gateway.as_deref() == Some(&gw)
                && r.dev.as_deref() == Some("eth0")
        }) {
            p.push(format!(
                "pod {d}: no `default via {gw} dev eth0` in the pod"
            ));
        }
        let host_mac = link.and_then(|l| l.address.clone()).unwrap_or_default();
        let neigh = side.neighbours.iter().find(|n| n.dst == gw);
        match neigh {
            Some(n)
                if n.state.iter().any(|s| s == "PERMANENT")
                    && n.lladdr
                        .as_deref()
                        .is_some_and(|m| m.eq_ignore_ascii_case(&host_mac)) => {}
            _ => p.push(format!(
                "pod {d}: no permanent neighbour {gw} lladdr {host_mac} (the host veth's MAC) in the pod"
            )),
        }
    }
    p
}

/// What vpc-cni leaves that would disturb aws-node.
pub fn judge_leftovers(f: &NodeFacts) -> Vec<String> {
    let mut p = Vec::new();
    if f.conf_files.iter().any(|(n, _)| n == paths::CONFLIST) {
        p.push(format!("vpc-cni's {} is in the conf dir", paths::CONFLIST));
    }
    let ours = format!("table ip {}", dataplane::NFT_TABLE);
    if f.nft_tables.contains(&ours) {
        p.push(format!(
            "vpc-cni's nftables {ours} is present: it would mark and SNAT pod traffic a second time"
        ));
    }
    if let Some(routes) = f.tables.get(&dataplane::TO_POD_TABLE)
        && !routes.is_empty()
    {
        p.push(format!(
            "vpc-cni's table {} holds {} route(s): {}",
            dataplane::TO_POD_TABLE,
            routes.len(),
            routes
                .iter()
                .map(|r| r.dst.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    for r in f.rules.iter().filter(|r| is_vpc_cni_rule(r)) {
        p.push(format!("vpc-cni's rule `{}`", r.args().join(" ")));
    }
    for l in f.links.iter().filter(|l| l.group_id() != 0) {
        p.push(format!(
            "link {} is in device group {:#x}{}",
            l.ifname,
            l.group_id(),
            if is_vpc_cni_group(l.group_id()) {
                " (vpc-cni's)"
            } else {
                ""
            }
        ));
    }
    p
}

/// `10-aws.conflist` must be what a runtime loads: the first configuration file of the conf
/// dir in libcni's order (file names sorted; `.conf`, `.conflist`, `.json`).
pub fn judge_conf_dir(files: &[(String, Option<String>)]) -> Vec<String> {
    let mut p = Vec::new();
    let mut confs: Vec<&(String, Option<String>)> = files
        .iter()
        .filter(|(n, _)| {
            Path::new(n)
                .extension()
                .is_some_and(|e| e == "conf" || e == "conflist" || e == "json")
        })
        .collect();
    confs.sort_by(|a, b| a.0.cmp(&b.0));
    match confs.first() {
        None => p.push(format!(
            "no network configuration in the conf dir (want {CONFLIST})"
        )),
        Some((n, _)) if n != CONFLIST => p.push(format!(
            "{n} is the conf dir's first configuration: a runtime would use it, not {CONFLIST}"
        )),
        Some(_) => {}
    }
    match files.iter().find(|(n, _)| n == CONFLIST) {
        None => p.push(format!("no {CONFLIST} in the conf dir")),
        Some((_, None)) => p.push(format!("{CONFLIST} cannot be read")),
        Some((_, Some(text))) => match serde_json::from_str::<Value>(text) {
            Err(e) => p.push(format!("{CONFLIST} is not JSON: {e}")),
            Ok(v) => {
                if v["name"] != NETWORK {
                    p.push(format!(
                        "{CONFLIST}: network name {}, not {NETWORK:?}",
                        v["name"]
                    ));
                }
                let types: Vec<&str> = v["plugins"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x["type"].as_str()).collect())
                    .unwrap_or_default();
                if types.first() != Some(&"aws-cni") {
                    p.push(format!(
                        "{CONFLIST}: plugins {types:?}; the first must be aws-cni"
                    ));
                }
                let prefix = v["plugins"][0]["vethPrefix"]
                    .as_str()
                    .unwrap_or(VETH_PREFIX);
                if prefix != VETH_PREFIX {
                    p.push(format!(
                        "{CONFLIST}: vethPrefix {prefix:?}, but the pods' host veths are named {VETH_PREFIX}…"
                    ));
                }
            }
        },
    }
    p
}

/// aws-node's node-wide state (its own start would redo it, but pods need it meanwhile).
pub fn judge_node(f: &NodeFacts) -> Vec<String> {
    let mut p = Vec::new();
    if f.ip_forward.as_deref() != Some("1") {
        p.push(format!(
            "net.ipv4.ip_forward is {}, not 1: no pod traffic is forwarded",
            f.ip_forward.as_deref().unwrap_or("unreadable")
        ));
    }
    let has_host_rule = f.rules.iter().any(|r| {
        r.priority == HOST_RULE_PRIORITY
            && r.mark() == Some((CONNMARK, CONNMARK))
            && r.table_id() == Some(MAIN_TABLE)
    });
    if !has_host_rule {
        p.push(format!(
            "no rule `fwmark {CONNMARK:#x}/{CONNMARK:#x} lookup main pref {HOST_RULE_PRIORITY}`"
        ));
    }
    for e in f.enis.iter().filter(|e| e.device >= 1) {
        let t = eni_table(e.device);
        let ifname = link_by_mac(&f.links, &e.mac).map(|l| l.ifname.clone());
        let Some(ifname) = ifname else {
            p.push(format!(
                "no interface for ENI eth{} (MAC {})",
                e.device, e.mac
            ));
            continue;
        };
        let src = Ipv4Net::new(e.primary_ip, 32).expect("/32");
        if !f.rules.iter().any(|r| {
            r.priority == ENI_PRIMARY_PRIORITY
                && r.src_net() == Some(src)
                && r.table_id() == Some(t)
        }) {
            p.push(format!(
                "no rule `from {} lookup {t} pref {ENI_PRIMARY_PRIORITY}` ({ifname})",
                e.primary_ip
            ));
        }
        let gw = Ipv4Addr::from(u32::from(e.subnet.network()) + 1).to_string();
        let routes = f.tables.get(&t).cloned().unwrap_or_default();
        if !routes.iter().any(|r| {
            r.dst == gw && r.dev.as_deref() == Some(&ifname) && r.scope.as_deref() == Some("link")
        }) {
            p.push(format!("table {t}: no `{gw} dev {ifname} scope link`"));
        }
        if !routes.iter().any(|r| {
            r.dst == "default"
                && r.gateway.as_deref() == Some(&gw)
                && r.dev.as_deref() == Some(&ifname)
        }) {
            p.push(format!("table {t}: no `default via {gw} dev {ifname}`"));
        }
        let subnet = e.subnet.trunc().to_string();
        if f.main_routes
            .iter()
            .any(|r| r.dst == subnet && r.dev.as_deref() == Some(&ifname))
        {
            p.push(format!(
                "table main still routes {subnet} through {ifname} (aws-node removes it)"
            ));
        }
    }
    for m in &f.iptables_missing {
        p.push(format!("iptables: no `{m}`"));
    }
    // The connmark of SNATed pod egress: v1.23's nftables backend, or the iptables-legacy
    // one complete (aws-node would replace it with the table at start; pods keep working).
    let nft = match &f.aws_nft {
        None => vec![format!(
            "no nftables table ip {NFT_TABLE} (aws-node's connmark for SNATed pod traffic) and no complete {LEGACY_CONNMARK_CHAIN} either (missing: {})",
            f.legacy_connmark_missing.join("; ")
        )],
        Some(v) => judge_aws_nft(v, f.vpc_cidrs.len()),
    };
    if !nft.is_empty() && !f.legacy_connmark_missing.is_empty() {
        p.extend(nft);
    }
    p
}

/// `table ip aws-cni`: base chain `nat-prerouting` (nat, prerouting, priority -90) with its
/// three rules, chain `snat-mark` with one rule per exempt CIDR and the mark.
pub fn judge_aws_nft(v: &Value, exempt: usize) -> Vec<String> {
    let mut p = Vec::new();
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    let chain = |name: &str| {
        items
            .iter()
            .find(|i| i["chain"]["name"] == name)
            .map(|i| i["chain"].clone())
    };
    let rules = |name: &str| items.iter().filter(|i| i["rule"]["chain"] == name).count();
    match chain("nat-prerouting") {
        None => p.push(format!(
            "nftables table ip {NFT_TABLE}: no chain nat-prerouting"
        )),
        Some(c) => {
            if c["type"] != "nat" || c["hook"] != "prerouting" || c["prio"] != -90 {
                p.push(format!(
                    "nftables table ip {NFT_TABLE}: chain nat-prerouting is not `type nat hook prerouting priority -90` ({c})"
                ));
            }
            if rules("nat-prerouting") != 3 {
                p.push(format!(
                    "nftables table ip {NFT_TABLE}: chain nat-prerouting has {} rules, not 3",
                    rules("nat-prerouting")
                ));
            }
        }
    }
    match chain("snat-mark") {
        None => p.push(format!("nftables table ip {NFT_TABLE}: no chain snat-mark")),
        Some(_) => {
            if rules("snat-mark") != exempt + 1 {
                p.push(format!(
                    "nftables table ip {NFT_TABLE}: chain snat-mark has {} rules, not {}",
                    rules("snat-mark"),
                    exempt + 1
                ));
            }
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn instance() -> Instance {
        lab_aws::world::sample().instances[0].clone()
    }

    #[test]
    fn names_follow_the_reference() {
        // SHA-1("default.a") = acd53aa4120be322…; the plugin takes 11 hex characters.
        let v = host_veth("default", "a");
        assert_eq!(v, "eniacd53aa4120");
        assert_eq!(veth_suffix("default", "a"), v["eni".len()..]);
        assert_eq!(eni_table(0), 254);
        assert_eq!(eni_table(1), 2);
    }

    #[test]
    fn checkpoint_round_trips_in_the_reference_format() {
        let r: PodRecord = serde_json::from_value(json!({
            "instance": "instance1", "namespace": "default", "name": "a",
            "container_id": "c1", "netns": "/run/netns/x", "ifname": "eth0",
            "network": "aws-cni", "cni_version": "0.4.0",
            "result": {"ips": [{"address": "172.31.5.50/32"}]}, "add_ms": 1.0
        }))
        .unwrap();
        let cp = Checkpoint {
            version: CHECKPOINT_VERSION.into(),
            allocations: vec![allocation(&r, ip("172.31.5.50"), 1_700_000_000_000_000_000)],
        };
        let text = cp.to_text();
        assert_eq!(
            text,
            "{\"version\":\"vpc-cni-ipam/1\",\"allocations\":[{\"networkName\":\"aws-cni\",\"containerID\":\"c1\",\"ifName\":\"eth0\",\"ipv4\":\"172.31.5.50\",\"allocationTimestamp\":1700000000000000000,\"metadata\":{\"k8sPodNamespace\":\"default\",\"k8sPodName\":\"a\",\"interfacesCount\":1}}]}\n"
        );
        assert_eq!(Checkpoint::parse(&text).unwrap(), cp);
        // Go's decoder ignores unknown fields and takes null as no allocations.
        let c = Checkpoint::parse(r#"{"version":"vpc-cni-ipam/1","allocations":null,"enis":[]}"#)
            .unwrap();
        assert!(c.allocations.is_empty());
        assert!(Checkpoint::parse("{").is_err());
    }

    #[test]
    fn conflist_is_the_reference_chain() {
        let c = conflist();
        assert_eq!(c["name"], "aws-cni");
        assert_eq!(c["cniVersion"], "0.4.0");
        assert_eq!(c["disableCheck"], true);
        let types: Vec<&str> = c["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["aws-cni", "egress-cni", "portmap"]);
        assert_eq!(c["plugins"][0]["mtu"], "9001");
        assert_eq!(c["plugins"][0]["vethPrefix"], "eni");
        assert_eq!(c["plugins"][1]["enabled"], "false");
        assert_eq!(c["plugins"][2]["capabilities"]["portMappings"], true);
    }

    #[test]
    fn result_carries_the_table_and_the_dummy_interface() {
        let r = pod_result("default", "a", "/run/netns/p", ip("172.31.13.130"), 1);
        assert_eq!(r["interfaces"][0]["name"], host_veth("default", "a"));
        assert_eq!(r["interfaces"][1]["mac"], "2");
        assert_eq!(r["interfaces"][1]["sandbox"], "/run/netns/p");
        let dummy = r["interfaces"][2]["name"].as_str().unwrap();
        assert!(dummy.starts_with("dummy") && dummy.ends_with(&veth_suffix("default", "a")));
        assert_eq!(r["interfaces"][2]["mac"], "0");
        assert_eq!(r["interfaces"][2]["sandbox"], "1");
        assert_eq!(r["ips"][0]["address"], "172.31.13.130/32");
        assert_eq!(r["ips"][0]["interface"], 1);
        assert_eq!(r["ips"][0]["version"], "4");
        assert!(r["ips"][0].get("gateway").is_none());
        let p = pod_result("default", "b", "/run/netns/q", ip("172.31.5.50"), 0);
        assert_eq!(p["interfaces"][1]["mac"], "254");
    }

    #[test]
    fn iptables_rules_are_the_reference_ones() {
        let cidrs: Vec<Ipv4Net> = vec!["172.31.0.0/16".parse().unwrap()];
        let r = iptables_rules("eth0", ip("172.31.15.228"), &cidrs);
        let shown: Vec<String> = r.iter().map(IptRule::display).collect();
        assert_eq!(
            shown,
            [
                "-t nat -A POSTROUTING -m comment --comment \"AWS SNAT CHAIN\" -j AWS-SNAT-CHAIN-0",
                "-t nat -A AWS-SNAT-CHAIN-0 -d 172.31.0.0/16 -m comment --comment \"AWS SNAT CHAIN\" -j RETURN",
                "-t nat -A AWS-SNAT-CHAIN-0 ! -o vlan+ -m comment --comment \"AWS, SNAT\" -m addrtype ! --dst-type LOCAL -j SNAT --to-source 172.31.15.228 --random-fully",
                "-t mangle -A PREROUTING -m comment --comment \"AWS, primary ENI\" -i eth0 -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-mark 0x80/0x80",
                "-t mangle -A PREROUTING -m comment --comment \"AWS, primary ENI\" -i eni+ -j CONNMARK --restore-mark --mask 0x80",
                "-t mangle -A PREROUTING -m comment --comment \"AWS, primary ENI\" -i vlan+ -j CONNMARK --restore-mark --mask 0x80",
            ]
        );
        assert!(r[1].insert_first && !r[2].insert_first);
    }

    #[test]
    fn nft_script_matches_the_connmark_backend() {
        let s = nft_script(&[
            "172.31.0.0/16".parse().unwrap(),
            "10.0.0.0/8".parse().unwrap(),
        ]);
        assert!(s.contains("type nat hook prerouting priority -90; policy accept;"));
        assert!(s.contains("iifname \"eni*\" counter jump snat-mark"));
        assert!(s.contains("counter meta mark set ct mark & 0x80"));
        let a = s.find("10.0.0.0 return").unwrap();
        let b = s.find("172.31.0.0 return").unwrap();
        assert!(a < b, "the last CIDR inserted comes first:\n{s}");
        assert!(s.contains("ip daddr & 255.255.0.0 == 172.31.0.0 return"));
        assert!(s.contains("counter ct mark set ct mark | 0x80"));
    }

    #[test]
    fn addresses_spread_over_both_enis_and_run_out_clearly() {
        let inst = instance();
        let eth1: Vec<Ipv4Addr> = inst.enis[1].secondary_ips.clone();
        let all: usize = inst.enis.iter().map(|e| e.secondary_ips.len()).sum();
        let plan = plan_addresses(&inst, &BTreeSet::new(), 2).unwrap();
        let devices: BTreeSet<u32> = plan.iter().map(|(_, d)| *d).collect();
        assert_eq!(devices, BTreeSet::from([0, 1]));
        for (a, d) in &plan {
            assert_eq!(device_of(&inst, *a), Some(*d));
        }
        // Taken addresses are skipped; the ENI with fewer pods goes first.
        let taken: BTreeSet<Ipv4Addr> = BTreeSet::from([eth1[0]]);
        let plan = plan_addresses(&inst, &taken, 1).unwrap();
        assert_eq!(plan[0].1, 0);
        let plan = plan_addresses(&inst, &BTreeSet::new(), all).unwrap();
        let distinct: BTreeSet<Ipv4Addr> = plan.iter().map(|(a, _)| *a).collect();
        assert_eq!(distinct.len(), all);
        let e = plan_addresses(&inst, &BTreeSet::new(), all + 1).unwrap_err();
        assert!(format!("{e}").contains("free secondary IPs"), "{e}");
    }

    /// A node as `wire` leaves it with pod a on eth0 and pod b on eth1 of the sample world.
    fn good() -> NodeFacts {
        let inst = instance();
        let a_ip = inst.enis[0].secondary_ips[0];
        let b_ip = inst.enis[1].secondary_ips[0];
        let mut f = NodeFacts {
            instance: "instance1".into(),
            vpc_cidrs: vec!["172.31.0.0/16".parse().unwrap()],
            ..NodeFacts::default()
        };
        for e in &inst.enis {
            f.enis.push(EniFact {
                device: e.device_index,
                mac: e.mac.clone(),
                primary_ip: e.primary_ip,
                subnet: "172.31.0.0/20".parse().unwrap(),
                secondary_ips: e.secondary_ips.clone(),
            });
        }
        let mut cp = Checkpoint {
            version: CHECKPOINT_VERSION.into(),
            allocations: vec![],
        };
        let mut links = vec![
            IpLink {
                ifname: "eth0".into(),
                address: Some(inst.enis[0].mac.clone()),
                flags: vec!["UP".into()],
                ..IpLink::default()
            },
            IpLink {
                ifname: "eth1".into(),
                address: Some(inst.enis[1].mac.clone()),
                flags: vec!["UP".into()],
                ..IpLink::default()
            },
        ];
        let mut rules = vec![
            IpRule {
                priority: 0,
                src: Some("all".into()),
                table: Some("local".into()),
                ..IpRule::default()
            },
            IpRule {
                priority: 1024,
                src: Some("all".into()),
                fwmark: Some("0x80".into()),
                fwmask: Some("0x80".into()),
                table: Some("main".into()),
                ..IpRule::default()
            },
            IpRule {
                priority: 32765,
                src: Some(inst.enis[1].primary_ip.to_string()),
                table: Some("2".into()),
                ..IpRule::default()
            },
        ];
        for (name, pip, mac) in [
            ("a", a_ip, "02:00:00:00:00:0a"),
            ("b", b_ip, "02:00:00:00:00:0b"),
        ] {
            let veth = host_veth("default", name);
            let pod = PodFact {
                namespace: "default".into(),
                name: name.into(),
                container_id: format!("c-{name}"),
                ifname: "eth0".into(),
                ips: vec![pip],
            };
            cp.allocations.push(Allocation {
                network_name: NETWORK.into(),
                container_id: pod.container_id.clone(),
                if_name: "eth0".into(),
                ipv4: pip.to_string(),
                ipv6: String::new(),
                allocation_timestamp: 1,
                metadata: AllocationMetadata {
                    k8s_pod_namespace: "default".into(),
                    k8s_pod_name: name.into(),
                    interfaces_count: 1,
                },
            });
            links.push(IpLink {
                ifname: veth.clone(),
                group: Some("default".into()),
                address: Some(mac.into()),
                flags: vec!["UP".into()],
                ..IpLink::default()
            });
            f.main_routes.push(IpRoute {
                dst: pip.to_string(),
                dev: Some(veth.clone()),
                scope: Some("link".into()),
                ..IpRoute::default()
            });
            rules.push(IpRule {
                priority: 512,
                src: Some("all".into()),
                dst: Some(pip.to_string()),
                table: Some("main".into()),
                ..IpRule::default()
            });
            if name == "b" {
                rules.push(IpRule {
                    priority: 1536,
                    src: Some(pip.to_string()),
                    table: Some("2".into()),
                    ..IpRule::default()
                });
            }
            f.pod_sides.insert(
                pod.display(),
                PodSide {
                    addrs: vec![format!("{pip}/32")],
                    routes: vec![IpRoute {
                        dst: "default".into(),
                        gateway: Some("169.254.1.1".into()),
                        dev: Some("eth0".into()),
                        ..IpRoute::default()
                    }],
                    neighbours: vec![IpNeigh {
                        dst: "169.254.1.1".into(),
                        dev: Some("eth0".into()),
                        lladdr: Some(mac.into()),
                        state: vec!["PERMANENT".into()],
                    }],
                    error: None,
                },
            );
            f.pods.push(pod);
        }
        f.main_routes.push(IpRoute {
            dst: "default".into(),
            gateway: Some("172.31.0.1".into()),
            dev: Some("eth0".into()),
            ..IpRoute::default()
        });
        f.tables.insert(
            2,
            vec![
                IpRoute {
                    dst: "172.31.0.1".into(),
                    dev: Some("eth1".into()),
                    scope: Some("link".into()),
                    ..IpRoute::default()
                },
                IpRoute {
                    dst: "default".into(),
                    gateway: Some("172.31.0.1".into()),
                    dev: Some("eth1".into()),
                    ..IpRoute::default()
                },
            ],
        );
        f.tables.insert(512, vec![]);
        f.links = links;
        f.rules = rules;
        f.checkpoint = Some(cp.to_text());
        f.conf_files = vec![(
            CONFLIST.into(),
            Some(serde_json::to_string_pretty(&conflist()).unwrap()),
        )];
        f.nft_tables = vec![format!("table ip {NFT_TABLE}"), "table ip nat".into()];
        f.aws_nft = Some(json!({"nftables": [
            {"metainfo": {}},
            {"table": {"family": "ip", "name": "aws-cni"}},
            {"chain": {"name": "nat-prerouting", "type": "nat", "hook": "prerouting", "prio": -90}},
            {"chain": {"name": "snat-mark"}},
            {"rule": {"chain": "nat-prerouting"}},
            {"rule": {"chain": "nat-prerouting"}},
            {"rule": {"chain": "nat-prerouting"}},
            {"rule": {"chain": "snat-mark"}},
            {"rule": {"chain": "snat-mark"}},
        ]}));
        f.ip_forward = Some("1".into());
        f.legacy_connmark_missing = legacy_connmark_rules(&f.vpc_cidrs)
            .iter()
            .map(IptRule::display)
            .collect();
        f
    }

    fn has(problems: &[String], needle: &str) -> bool {
        problems.iter().any(|p| p.contains(needle))
    }

    #[test]
    fn a_wired_node_is_accepted() {
        assert_eq!(judge(&good()), Vec::<String>::new());
    }

    #[test]
    fn rule_problems_are_named() {
        let f = good();
        let b_ip = f.pods[1].ips[0];
        // The secondary-ENI pod's 1536 rule gone.
        let mut g = f.clone();
        g.rules.retain(|r| r.priority != 1536);
        let p = judge(&g);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            has(&p, &format!("no rule `from {b_ip} lookup 2 pref 1536`")),
            "{p:?}"
        );
        // A 1536 rule for the primary-ENI pod is wrong too.
        let mut g = f.clone();
        let a_ip = f.pods[0].ips[0];
        g.rules.push(IpRule {
            priority: 1536,
            src: Some(a_ip.to_string()),
            table: Some("2".into()),
            ..IpRule::default()
        });
        assert!(has(&judge(&g), "is on the primary ENI"));
        // The to-pod rule and the route in main.
        let mut g = f.clone();
        g.rules
            .retain(|r| !(r.priority == 512 && r.dst.as_deref() == Some(&b_ip.to_string())));
        g.main_routes.retain(|r| r.dst != a_ip.to_string());
        let p = judge(&g);
        assert!(
            has(&p, &format!("no rule `to {b_ip} lookup main pref 512`")),
            "{p:?}"
        );
        assert!(has(&p, &format!("no route `{a_ip} dev")), "{p:?}");
        // vpc-cni's rules are leftovers.
        let mut g = f.clone();
        g.rules.push(IpRule {
            priority: 512,
            src: Some("all".into()),
            table: Some("512".into()),
            ..IpRule::default()
        });
        g.rules.push(IpRule {
            priority: 1536,
            src: Some("all".into()),
            fwmark: Some("0x100".into()),
            fwmask: Some("0x3f00".into()),
            table: Some("2".into()),
            ..IpRule::default()
        });
        let p = judge(&g);
        assert!(
            has(&p, "vpc-cni's rule `from all lookup 512 pref 512`"),
            "{p:?}"
        );
        assert!(has(&p, "fwmark 0x100/0x3f00 lookup 2 pref 1536"), "{p:?}");
        // The fwmark rule of aws-node.
        let mut g = f.clone();
        g.rules.retain(|r| r.priority != 1024);
        assert!(has(&judge(&g), "fwmark 0x80/0x80 lookup main pref 1024"));
    }

    #[test]
    fn checkpoint_problems_are_named() {
        let f = good();
        let mut g = f.clone();
        g.checkpoint = None;
        assert!(has(&judge(&g), "no checkpoint"));
        g.checkpoint = Some("not json".into());
        assert!(has(&judge(&g), "would fail to start"));
        g.checkpoint = Some(r#"{"version":"vpc-cni-ipam/2","allocations":[]}"#.into());
        assert!(has(&judge(&g), "checkpoint version"));
        // vpc-cni's network name, a missing allocation, a duplicate, an unknown address.
        let mut cp = Checkpoint::parse(f.checkpoint.as_deref().unwrap()).unwrap();
        cp.allocations[0].network_name = "vpc-cni".into();
        cp.allocations.pop();
        let dup = cp.allocations[0].clone();
        cp.allocations.push(dup);
        let mut stale = cp.allocations[0].clone();
        stale.ipv4 = "172.31.9.9".into();
        stale.container_id = "gone".into();
        cp.allocations.push(stale);
        g.checkpoint = Some(cp.to_text());
        let p = judge(&g);
        assert!(has(&p, "network name \"vpc-cni\""), "{p:?}");
        assert!(has(&p, "pod default/b"), "{p:?}");
        assert!(has(&p, "allocated twice"), "{p:?}");
        assert!(has(&p, "would drop it as stale"), "{p:?}");
        assert!(has(&p, "leaked"), "{p:?}");
        // An allocation whose pod has no veth would be pruned.
        let mut g = f.clone();
        let veth = host_veth("default", "a");
        g.links.retain(|l| l.ifname != veth);
        let p = judge(&g);
        assert!(has(&p, "would prune the allocation"), "{p:?}");
        assert!(has(&p, &format!("no host veth {veth}")), "{p:?}");
    }

    #[test]
    fn conf_dir_and_leftovers_are_judged() {
        let f = good();
        let mut g = f.clone();
        g.conf_files
            .insert(0, ("05-other.conf".into(), Some("{}".into())));
        assert!(has(&judge(&g), "05-other.conf is the conf dir's first"));
        let mut g = f.clone();
        g.conf_files
            .push((paths::CONFLIST.into(), Some("{}".into())));
        // 10-aws sorts first, but vpc-cni's conflist is still a leftover.
        let p = judge(&g);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(has(&p, "vpc-cni's 10-vpc-cni.conflist"));
        let mut g = f.clone();
        g.conf_files.clear();
        assert!(has(&judge(&g), "no network configuration"));
        let mut g = f.clone();
        g.nft_tables.push("table ip vpc-cni".into());
        g.tables.insert(
            512,
            vec![IpRoute {
                dst: "172.31.5.50".into(),
                dev: Some("enix".into()),
                ..IpRoute::default()
            }],
        );
        g.links[2].group = Some(dataplane::pod_group(1).to_string());
        let p = judge(&g);
        assert!(has(&p, "table ip vpc-cni"), "{p:?}");
        assert!(has(&p, "table 512 holds 1 route"), "{p:?}");
        assert!(has(&p, "(vpc-cni's)"), "{p:?}");
        let mut g = f.clone();
        g.agent_pid = Some(42);
        assert!(has(&judge(&g), "vpc-cni agent is running"));
    }

    #[test]
    fn node_wide_problems_are_named() {
        let f = good();
        let mut g = f.clone();
        g.iptables_missing.push("-t nat -A POSTROUTING …".into());
        g.aws_nft = None;
        g.ip_forward = Some("0".into());
        g.tables.insert(2, vec![]);
        let p = judge(&g);
        assert!(has(&p, "iptables: no `-t nat -A POSTROUTING"), "{p:?}");
        assert!(has(&p, "no nftables table ip aws-cni"), "{p:?}");
        assert!(has(&p, "ip_forward is 0"), "{p:?}");
        assert!(
            has(&p, "table 2: no `default via 172.31.0.1 dev eth1`"),
            "{p:?}"
        );
        // A pod whose neighbour entry lost the host veth's MAC.
        let mut g = f.clone();
        g.pod_sides.get_mut("default/a").unwrap().neighbours.clear();
        assert!(has(&judge(&g), "pod default/a: no permanent neighbour"));
    }

    #[test]
    fn either_connmark_backend_is_accepted() {
        let mut g = good();
        g.aws_nft = None;
        let p = judge(&g);
        assert!(has(&p, "no nftables table ip aws-cni"), "{p:?}");
        assert!(has(&p, "no complete AWS-CONNMARK-CHAIN-0"), "{p:?}");
        // The iptables-legacy backend, complete, is accepted instead.
        g.legacy_connmark_missing.clear();
        assert_eq!(judge(&g), Vec::<String>::new());
        let shown: Vec<String> = legacy_connmark_rules(&g.vpc_cidrs)
            .iter()
            .map(IptRule::display)
            .collect();
        assert_eq!(
            shown,
            [
                "-t nat -A PREROUTING -i eni+ -m comment --comment \"AWS, outbound connections\" -j AWS-CONNMARK-CHAIN-0",
                "-t nat -A AWS-CONNMARK-CHAIN-0 -d 172.31.0.0/16 -m comment --comment \"AWS CONNMARK CHAIN\" -j RETURN",
                "-t nat -A AWS-CONNMARK-CHAIN-0 -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --set-xmark 0x80/0x80",
                "-t nat -A PREROUTING -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --restore-mark --mask 0x80",
            ]
        );
    }

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(
            words("-m comment --comment 'AWS, SNAT'  -j  X"),
            ["-m", "comment", "--comment", "AWS, SNAT", "-j", "X"]
        );
        assert_eq!(words("''"), [""]);
    }

    #[test]
    fn ip_json_shapes_parse() {
        let rules: Vec<IpRule> = serde_json::from_str(
            r#"[{"priority":512,"src":"all","dst":"10.1.1.1","table":"main"},
                {"priority":1536,"src":"10.1.1.1","table":"2"},
                {"priority":1536,"src":"all","fwmark":"0x100","fwmask":"0x3f00","table":"2"}]"#,
        )
        .unwrap();
        assert_eq!(rules[0].dst_net(), Some("10.1.1.1/32".parse().unwrap()));
        assert_eq!(rules[0].table_id(), Some(254));
        assert_eq!(rules[1].src_net(), Some("10.1.1.1/32".parse().unwrap()));
        assert!(is_vpc_cni_rule(&rules[2]) && !is_vpc_cni_rule(&rules[1]));
        assert_eq!(
            rules[2].args().join(" "),
            "from all fwmark 0x100/0x3f00 lookup 2 pref 1536"
        );
        let l: Vec<IpLink> = serde_json::from_str(
            r#"[{"ifname":"enia","group":"1986199553","flags":["UP"]},{"ifname":"lo","group":"default"}]"#,
        )
        .unwrap();
        assert_eq!(l[0].group_id(), dataplane::pod_group(1));
        assert!(is_vpc_cni_group(l[0].group_id()));
        assert_eq!(l[1].group_id(), 0);
    }
}
