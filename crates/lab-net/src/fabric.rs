//! The VPC fabric, derived from EC2 state ([`World`]) and re-applied whenever it changes.
//!
//! - `vpclab-fabric` holds one bridge per subnet whose address is the subnet's router (`.1`),
//!   with `ip_forward=1` and br_netfilter disabled, and a link `up0` 203.0.113.1/24 to
//!   `vpclab-internet` (203.0.113.10/24, routes the VPC CIDRs back via 203.0.113.1).
//! - Every attached ENI is a veth: `eth<device index>` with the ENI's MAC in the instance's
//!   namespace, its peer a port of the subnet's bridge. The primary ENI is configured like EC2's
//!   DHCP would; secondary ENIs are left to the agent.
//! - ARP: the fabric answers every request for an ENI address (primary, secondary, and each of
//!   the 16 addresses of every delegated /28 prefix) with the owning ENI's MAC and each gateway
//!   with its bridge's MAC, and drops all other requests (ebtables nat `arpreply`), so instances
//!   never see each other's requests; the router has permanent neighbours for every ENI address.
//! - Source/destination check: nft table `bridge vpclab` drops frames from an ENI port whose
//!   IPv4 source is not one of the ENI's addresses (prefix addresses included), and frames to an
//!   ENI port whose destination is not one of them, with counters.
//! - Internet gateway: nft table `ip vpclab-igw` forwards to/from the internet only packets of
//!   an instance's primary IP (an IGW has no mapping for any other address).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::ns::{self, FABRIC, INTERNET};
use lab_aws::world::{Subnet, World};

/// The router's side of the internet link.
pub const IGW_ROUTER: &str = "203.0.113.1";
/// The internet host.
pub const INTERNET_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The router's interface towards the internet.
const UPLINK: &str = "up0";
/// MTU of every ENI, like EC2 in a VPC.
const MTU: &str = "9001";
/// The ebtables nat chain holding the ARP responder's `arpreply` rules.
const ARP_CHAIN: &str = "ARP_REQUEST";
/// The source/destination check table (bridge family) in the fabric namespace.
pub const CHECK_TABLE: &str = "vpclab";
/// The internet gateway table (ip family) in the fabric namespace.
pub const IGW_TABLE: &str = "vpclab-igw";

/// A short, stable tag for an instance, used in fabric port names (`i1`, `i2`, `vh`).
fn short(instance: &str) -> String {
    if let Some(rest) = instance.strip_prefix("instance") {
        return format!("i{rest}");
    }
    let initials: String = instance
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter_map(|w| w.chars().next())
        .collect();
    if initials.len() >= 2 {
        initials
    } else {
        instance.chars().take(6).collect()
    }
}

/// The fabric-side name of the port of `instance`'s ENI at `device` (`i1e0`).
pub fn port_name(instance: &str, device: u32) -> String {
    let mut n = format!("{}e{device}", short(instance));
    n.truncate(15);
    n
}

/// The bridge of a subnet (`br-<subnet id without prefix>`, at most 15 characters).
pub fn bridge_name(subnet: &Subnet) -> String {
    let id = subnet.id.strip_prefix("subnet-").unwrap_or(&subnet.id);
    let mut n = format!("br-{id}");
    n.truncate(15);
    n
}

/// A fixed MAC for a subnet's bridge (a bridge's MAC would otherwise follow its ports).
fn bridge_mac(subnet: &Subnet) -> String {
    let o = subnet.cidr.network().octets();
    format!("02:fa:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// One ENI port as the fabric sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub instance: String,
    pub eni_id: String,
    pub device: u32,
    pub mac: String,
    pub port: String,
    pub bridge: String,
    pub subnet: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub primary: Ipv4Addr,
    /// Primary, secondaries and every address of every delegated prefix.
    pub addrs: Vec<Ipv4Addr>,
}

/// Everything the fabric derives from EC2 state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// (bridge name, gateway/prefix, bridge MAC)
    pub bridges: Vec<(String, Ipv4Net, String)>,
    pub ports: Vec<Port>,
    /// Primary IP of every instance (its device-0 ENI): the addresses the IGW maps.
    pub primaries: Vec<Ipv4Addr>,
    pub vpc_cidrs: Vec<Ipv4Net>,
}

impl Plan {
    pub fn from_world(world: &World) -> Result<Plan> {
        let mut bridges = Vec::new();
        for s in &world.subnets {
            let gw = s.gateway();
            let net = Ipv4Net::new(gw, s.cidr.prefix_len())?;
            bridges.push((bridge_name(s), net, bridge_mac(s)));
        }
        let mut ports = Vec::new();
        let mut primaries = Vec::new();
        for inst in &world.instances {
            for eni in &inst.enis {
                let subnet = world.subnet(&eni.subnet_id).with_context(|| {
                    format!(
                        "ENI {} of {} is in subnet {}, which is not in VPC {}",
                        eni.id, inst.name, eni.subnet_id, world.vpc_id
                    )
                })?;
                let mut addrs = vec![eni.primary_ip];
                addrs.extend(eni.secondary_ips.iter().copied());
                for p in &eni.prefixes {
                    addrs.extend(p.hosts());
                    addrs.push(p.network());
                    addrs.push(p.broadcast());
                }
                addrs.sort();
                addrs.dedup();
                if eni.device_index == 0 {
                    primaries.push(eni.primary_ip);
                }
                ports.push(Port {
                    instance: inst.name.clone(),
                    eni_id: eni.id.clone(),
                    device: eni.device_index,
                    mac: eni.mac.to_lowercase(),
                    port: port_name(&inst.name, eni.device_index),
                    bridge: bridge_name(subnet),
                    subnet: subnet.cidr,
                    gateway: subnet.gateway(),
                    primary: eni.primary_ip,
                    addrs,
                });
            }
        }
        primaries.sort();
        Ok(Plan {
            bridges,
            ports,
            primaries,
            vpc_cidrs: world.vpc_cidrs.clone(),
        })
    }

    /// The `ebtables-restore` input of the fabric's ARP responder. The `arpreply` rules (one
    /// per address) live in their own chain that only ARP requests enter, so every other frame
    /// passes one rule, however many addresses the VPC holds.
    pub fn ebtables(&self) -> String {
        let mut s = format!(
            "*nat\n:PREROUTING ACCEPT\n:OUTPUT ACCEPT\n:POSTROUTING ACCEPT\n:{ARP_CHAIN} RETURN\n\
             -A PREROUTING -p ARP --arp-op Request -j {ARP_CHAIN}\n"
        );
        let answers = self
            .bridges
            .iter()
            .map(|(_, gw, mac)| (gw.addr(), mac))
            .chain(
                self.ports
                    .iter()
                    .flat_map(|p| p.addrs.iter().map(move |a| (*a, &p.mac))),
            );
        for (addr, mac) in answers {
            let _ = writeln!(
                s,
                "-A {ARP_CHAIN} -p ARP --arp-op Request --arp-ip-dst {addr} -j arpreply --arpreply-mac {mac}"
            );
        }
        // Instances never see each other's ARP requests, nor the router's.
        let _ = writeln!(s, "-A {ARP_CHAIN} -j DROP");
        s.push_str("-A OUTPUT -p ARP --arp-op Request -j DROP\n");
        s.push_str("COMMIT\n");
        s
    }

    /// What the nft rules depend on: the ENI ports (not their addresses, which live in sets).
    pub fn nft_shape(&self) -> String {
        let mut s = String::new();
        for p in &self.ports {
            let _ = writeln!(s, "{} {} {} eth{}", p.port, p.eni_id, p.instance, p.device);
        }
        s
    }

    /// Replaces only the contents of the address sets (one atomic transaction): the rules and
    /// their drop counters are kept.
    pub fn nft_sets(&self) -> String {
        let mut s = String::new();
        for p in &self.ports {
            let _ = writeln!(s, "flush set bridge {CHECK_TABLE} a_{}", p.port);
            let _ = writeln!(
                s,
                "add element bridge {CHECK_TABLE} a_{} {}",
                p.port,
                set_elems(&p.addrs)
            );
        }
        let _ = writeln!(s, "flush set ip {IGW_TABLE} mapped");
        if !self.primaries.is_empty() {
            let _ = writeln!(
                s,
                "add element ip {IGW_TABLE} mapped {}",
                set_elems(&self.primaries)
            );
        }
        s
    }

    /// The nft script (one atomic transaction) that rebuilds the src/dst check and the
    /// internet gateway.
    pub fn nft_full(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "table bridge {CHECK_TABLE}\ndelete table bridge {CHECK_TABLE}"
        );
        let _ = writeln!(s, "table bridge {CHECK_TABLE} {{");
        for p in &self.ports {
            let _ = writeln!(s, "  set a_{} {{\n    type ipv4_addr;", p.port);
            let _ = writeln!(s, "    elements = {}\n  }}", set_elems(&p.addrs));
        }
        // This VPC is IPv4-only: no IPv6 (neighbour discovery, multicast) between instances.
        let _ = writeln!(
            s,
            "  chain noipv6 {{\n    type filter hook prerouting priority -1; policy accept;\n    ether type ip6 counter drop comment \"IPv4-only VPC\"\n  }}"
        );
        // One chain per port with its counter; the base chains dispatch on the port with one
        // map lookup, so a frame's cost does not grow with the number of ENIs.
        for p in &self.ports {
            let _ = writeln!(
                s,
                "  chain src_{0} {{\n    ip saddr != @a_{0} counter drop comment \"src-check {1} {2} eth{3}\"\n  }}",
                p.port, p.eni_id, p.instance, p.device
            );
            let _ = writeln!(
                s,
                "  chain dst_{0} {{\n    ip daddr != @a_{0} counter drop comment \"dst-check {1} {2} eth{3}\"\n  }}",
                p.port, p.eni_id, p.instance, p.device
            );
        }
        let dispatch = |dir: &str| -> String {
            self.ports
                .iter()
                .map(|p| format!("\"{0}\" : jump {dir}_{0}", p.port))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for (chain, hook, key, dir) in [
            ("srccheck", "prerouting", "iifname", "src"),
            ("dstcheck", "forward", "oifname", "dst"),
            ("dstcheck_local", "output", "oifname", "dst"),
        ] {
            let _ = writeln!(
                s,
                "  chain {chain} {{\n    type filter hook {hook} priority 0; policy accept;"
            );
            if !self.ports.is_empty() {
                let _ = writeln!(s, "    {key} vmap {{ {} }}", dispatch(dir));
            }
            let _ = writeln!(s, "  }}");
        }
        let _ = writeln!(s, "}}");
        let _ = writeln!(s, "table ip {IGW_TABLE}\ndelete table ip {IGW_TABLE}");
        let _ = writeln!(s, "table ip {IGW_TABLE} {{");
        let _ = writeln!(s, "  set mapped {{\n    type ipv4_addr;");
        if !self.primaries.is_empty() {
            let _ = writeln!(s, "    elements = {}", set_elems(&self.primaries));
        }
        let _ = writeln!(s, "  }}");
        let _ = writeln!(
            s,
            "  chain forward {{\n    type filter hook forward priority 0; policy accept;"
        );
        let _ = writeln!(
            s,
            "    oifname \"{UPLINK}\" ip saddr != @mapped counter drop comment \"igw: no mapping for source\""
        );
        let _ = writeln!(
            s,
            "    iifname \"{UPLINK}\" ip daddr != @mapped counter drop comment \"igw: no mapping for destination\""
        );
        let _ = writeln!(s, "  }}\n}}");
        s
    }

    /// Desired permanent neighbours of the router, per bridge.
    fn neighbours(&self) -> BTreeMap<String, BTreeMap<Ipv4Addr, String>> {
        let mut m: BTreeMap<String, BTreeMap<Ipv4Addr, String>> = BTreeMap::new();
        for (b, _, _) in &self.bridges {
            m.entry(b.clone()).or_default();
        }
        for p in &self.ports {
            let e = m.entry(p.bridge.clone()).or_default();
            for a in &p.addrs {
                e.insert(*a, p.mac.clone());
            }
        }
        m
    }
}

fn set_elems(v: &[Ipv4Addr]) -> String {
    let items: Vec<String> = v.iter().map(|a| a.to_string()).collect();
    format!("{{ {} }}", items.join(", "))
}

/// What was last applied, so unchanged parts are not rebuilt (rebuilding resets counters).
#[derive(Debug, Default)]
pub struct Applied {
    ebtables: String,
    nft_shape: Option<String>,
    nft_sets: String,
}

/// Creates the namespaces and the parts of the fabric that do not depend on ENIs.
pub fn create_base(world: &World) -> Result<()> {
    ns::add(FABRIC)?;
    ns::add(INTERNET)?;
    ns::sysctl(FABRIC, "net.ipv4.ip_forward", "1")?;
    if !link_exists(FABRIC, UPLINK)? {
        ns::run(
            FABRIC,
            &[
                "ip", "link", "add", UPLINK, "mtu", MTU, "type", "veth", "peer", "name", "eth0",
                "netns", INTERNET, "mtu", MTU,
            ],
        )?;
        ns::run(
            FABRIC,
            &[
                "ip",
                "addr",
                "add",
                &format!("{IGW_ROUTER}/24"),
                "dev",
                UPLINK,
            ],
        )?;
        ns::run(FABRIC, &["ip", "link", "set", UPLINK, "up"])?;
        ns::run(
            INTERNET,
            &[
                "ip",
                "addr",
                "add",
                &format!("{INTERNET_HOST}/24"),
                "dev",
                "eth0",
            ],
        )?;
        ns::run(INTERNET, &["ip", "link", "set", "eth0", "up"])?;
    }
    for cidr in &world.vpc_cidrs {
        ns::run(
            INTERNET,
            &[
                "ip",
                "route",
                "replace",
                &cidr.to_string(),
                "via",
                IGW_ROUTER,
            ],
        )?;
    }
    for inst in &world.instances {
        create_instance_ns(&inst.name, inst.node)?;
    }
    Ok(())
}

/// Creates an instance's namespace with AMI-like defaults.
fn create_instance_ns(instance: &str, node: bool) -> Result<()> {
    let n = ns::instance_ns(instance);
    if ns::exists(&n) {
        return Ok(());
    }
    ns::add(&n)?;
    if node {
        // Like an Amazon Linux AMI: strict reverse-path filtering.
        ns::sysctl(&n, "net.ipv4.conf.all.rp_filter", "1")?;
        ns::sysctl(&n, "net.ipv4.conf.default.rp_filter", "1")?;
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
struct LinkJson {
    ifname: String,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    master: Option<String>,
}

fn links(ns_name: &str) -> Result<Vec<LinkJson>> {
    let out = ns::run(ns_name, &["ip", "-j", "link", "show"])?;
    serde_json::from_str(&out).with_context(|| format!("parsing `ip -j link show` in {ns_name}"))
}

fn link_exists(ns_name: &str, name: &str) -> Result<bool> {
    Ok(links(ns_name)?.iter().any(|l| l.ifname == name))
}

/// Brings the fabric and every instance's interfaces in line with `plan`.
pub fn apply(world: &World, applied: &mut Applied) -> Result<()> {
    let plan = Plan::from_world(world)?;
    for inst in &world.instances {
        create_instance_ns(&inst.name, inst.node)?;
    }
    // Bridges.
    let fabric_links = links(FABRIC)?;
    for (b, gw, mac) in &plan.bridges {
        if !fabric_links.iter().any(|l| &l.ifname == b) {
            ns::run(
                FABRIC,
                &["ip", "link", "add", b, "address", mac, "type", "bridge"],
            )?;
            ns::run(FABRIC, &["ip", "addr", "add", &gw.to_string(), "dev", b])?;
            ns::run(FABRIC, &["ip", "link", "set", b, "up"])?;
        }
    }
    for k in [
        "net.bridge.bridge-nf-call-iptables",
        "net.bridge.bridge-nf-call-ip6tables",
        "net.bridge.bridge-nf-call-arptables",
    ] {
        ns::sysctl(FABRIC, k, "0")?;
    }
    // ENI veths, instance by instance.
    for inst in &world.instances {
        let ins = ns::instance_ns(&inst.name);
        let have = links(&ins)?;
        let want: Vec<&Port> = plan
            .ports
            .iter()
            .filter(|p| p.instance == inst.name)
            .collect();
        for l in &have {
            let Some(dev) = l
                .ifname
                .strip_prefix("eth")
                .and_then(|d| d.parse::<u32>().ok())
            else {
                continue;
            };
            let keep = want.iter().any(|p| {
                p.device == dev
                    && l.address.as_deref().map(str::to_lowercase) == Some(p.mac.clone())
            });
            if !keep {
                tracing::info!(instance = %inst.name, ifname = %l.ifname, "ENI detached: removing interface");
                ns::run(&ins, &["ip", "link", "del", &l.ifname])?;
            }
        }
        let have = links(&ins)?;
        for p in want {
            let ifname = format!("eth{}", p.device);
            if have.iter().any(|l| l.ifname == ifname) {
                continue;
            }
            tracing::info!(instance = %inst.name, %ifname, eni = %p.eni_id, mac = %p.mac, "ENI attached: adding interface");
            if link_exists(FABRIC, &p.port)? {
                ns::run(FABRIC, &["ip", "link", "del", &p.port])?;
            }
            // Created from the fabric namespace: neither end ever exists in the root namespace.
            ns::run(
                FABRIC,
                &[
                    "ip", "link", "add", &ifname, "netns", &ins, "address", &p.mac, "mtu", MTU,
                    "type", "veth", "peer", "name", &p.port, "mtu", MTU,
                ],
            )?;
            ns::run(
                FABRIC,
                &["ip", "link", "set", &p.port, "master", &p.bridge, "up"],
            )?;
            if p.device == 0 {
                // What EC2's DHCP gives the primary ENI.
                let addr = Ipv4Net::new(p.primary, p.subnet.prefix_len())?;
                ns::run(
                    &ins,
                    &["ip", "addr", "add", &addr.to_string(), "dev", &ifname],
                )?;
                ns::run(&ins, &["ip", "link", "set", &ifname, "up"])?;
                ns::run(
                    &ins,
                    &[
                        "ip",
                        "route",
                        "replace",
                        "default",
                        "via",
                        &p.gateway.to_string(),
                        "dev",
                        &ifname,
                    ],
                )?;
            }
        }
    }
    // Ports left over from instances that no longer exist.
    for l in links(FABRIC)? {
        if l.master.is_some()
            && !plan.ports.iter().any(|p| p.port == l.ifname)
            && !plan.bridges.iter().any(|(b, _, _)| b == &l.ifname)
        {
            tracing::info!(port = %l.ifname, "removing stale fabric port");
            ns::run(FABRIC, &["ip", "link", "del", &l.ifname])?;
        }
    }
    // Router neighbours.
    let mut batch = String::new();
    for (bridge, want) in plan.neighbours() {
        let out = ns::run(
            FABRIC,
            &[
                "ip",
                "-j",
                "neigh",
                "show",
                "dev",
                &bridge,
                "nud",
                "permanent",
            ],
        )?;
        #[derive(Deserialize)]
        struct N {
            dst: String,
        }
        let have: Vec<N> = serde_json::from_str(&out).unwrap_or_default();
        let have: BTreeSet<String> = have.into_iter().map(|n| n.dst).collect();
        for d in &have {
            if !d.parse::<Ipv4Addr>().is_ok_and(|a| want.contains_key(&a)) {
                let _ = writeln!(batch, "neigh del {d} dev {bridge}");
            }
        }
        for (a, mac) in &want {
            let _ = writeln!(
                batch,
                "neigh replace {a} lladdr {mac} dev {bridge} nud permanent"
            );
        }
    }
    if !batch.is_empty() {
        ns::run_stdin(FABRIC, &["ip", "-batch", "-"], Some(&batch))?;
    }
    // ARP responder.
    let eb = plan.ebtables();
    if eb != applied.ebtables {
        ns::run_stdin(FABRIC, &["ebtables-restore"], Some(&eb))
            .context("loading the fabric's ARP responder (ebtables nat arpreply)")?;
        applied.ebtables = eb;
    }
    // Source/destination check and internet gateway.
    let shape = plan.nft_shape();
    let sets = plan.nft_sets();
    if applied.nft_shape.as_deref() != Some(shape.as_str()) {
        ns::run_stdin(FABRIC, &["nft", "-f", "-"], Some(&plan.nft_full()))
            .context("loading the fabric's source/destination check (nft)")?;
        applied.nft_shape = Some(shape);
        applied.nft_sets = sets;
    } else if sets != applied.nft_sets {
        ns::run_stdin(FABRIC, &["nft", "-f", "-"], Some(&sets))
            .context("updating the fabric's address sets (nft)")?;
        applied.nft_sets = sets;
    }
    for cidr in &plan.vpc_cidrs {
        ns::run(
            INTERNET,
            &[
                "ip",
                "route",
                "replace",
                &cidr.to_string(),
                "via",
                IGW_ROUTER,
            ],
        )?;
    }
    Ok(())
}

/// Sum of the packets dropped by the source check (optionally only on one ENI port).
pub fn src_check_drops(port: Option<&str>) -> Result<u64> {
    counter_sum("bridge", CHECK_TABLE, |chain| match port {
        Some(p) => chain == format!("src_{p}"),
        None => chain.starts_with("src_"),
    })
}

/// Packets the internet gateway dropped (no mapping).
pub fn igw_drops() -> Result<u64> {
    counter_sum("ip", IGW_TABLE, |chain| chain == "forward")
}

/// The sum of the packet counters of the rules in the chains of `table` that `chains` selects.
fn counter_sum(family: &str, table: &str, chains: impl Fn(&str) -> bool) -> Result<u64> {
    let out = ns::run(FABRIC, &["nft", "-j", "list", "table", family, table])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let Some(items) = v.get("nftables").and_then(|x| x.as_array()) else {
        bail!("unexpected `nft -j` output: {out}");
    };
    let mut sum = 0;
    for rule in items.iter().filter_map(|it| it.get("rule")) {
        if !rule
            .get("chain")
            .and_then(|c| c.as_str())
            .is_some_and(&chains)
        {
            continue;
        }
        for e in rule
            .get("expr")
            .and_then(|x| x.as_array())
            .into_iter()
            .flatten()
        {
            if let Some(p) = e
                .get("counter")
                .and_then(|c| c.get("packets"))
                .and_then(|p| p.as_u64())
            {
                sum += p;
            }
        }
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lab_aws::world::sample;

    #[test]
    fn port_names_are_short_and_stable() {
        assert_eq!(port_name("instance1", 0), "i1e0");
        assert_eq!(port_name("instance2", 3), "i2e3");
        assert_eq!(port_name("vpc-host", 0), "vhe0");
        assert!(port_name("a-very-long-instance-name-here", 12).len() <= 15);
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn plan_covers_every_eni_address() {
        let plan = Plan::from_world(&sample()).unwrap();
        assert_eq!(plan.ports.len(), 2);
        let eth1 = plan.ports.iter().find(|p| p.device == 1).unwrap();
        assert_eq!(eth1.port, "i1e1");
        assert_eq!(eth1.bridge, "br-a");
        assert_eq!(eth1.gateway, ip("172.31.0.1"));
        for a in [
            "172.31.3.173",
            "172.31.13.130",
            "172.31.11.77",
            "172.31.8.0",
            "172.31.8.15",
        ] {
            assert!(eth1.addrs.contains(&ip(a)), "{a} on eth1");
        }
        assert_eq!(eth1.addrs.len(), 3 + 16);
        assert_eq!(
            plan.primaries,
            vec![ip("172.31.15.228")],
            "only device-0 primaries are mapped"
        );
        assert_eq!(plan.bridges[0].1.to_string(), "172.31.0.1/20");
    }

    #[test]
    fn arp_responder_answers_with_the_owning_eni_and_drops_the_rest() {
        let eb = Plan::from_world(&sample()).unwrap().ebtables();
        assert!(
            eb.contains("--arp-ip-dst 172.31.13.130 -j arpreply --arpreply-mac 02:00:00:00:00:02")
        );
        assert!(
            eb.contains("--arp-ip-dst 172.31.5.50 -j arpreply --arpreply-mac 02:00:00:00:00:01")
        );
        assert!(
            eb.contains("--arp-ip-dst 172.31.0.1 -j arpreply --arpreply-mac 02:fa:ac:1f:00:00")
        );
        let lines: Vec<&str> = eb.lines().collect();
        // frames other than ARP requests pass one rule
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.starts_with("-A PREROUTING"))
                .collect::<Vec<_>>(),
            vec![&"-A PREROUTING -p ARP --arp-op Request -j ARP_REQUEST"]
        );
        let drop = lines
            .iter()
            .position(|l| *l == "-A ARP_REQUEST -j DROP")
            .expect("catch-all drop");
        assert!(
            lines[..drop]
                .iter()
                .filter(|l| l.contains("arpreply"))
                .count()
                == 1 + 2 + 3 + 16,
            "every arpreply comes before the drop"
        );
        assert!(!lines[drop..].iter().any(|l| l.contains("arpreply")));
        assert_eq!(lines.last(), Some(&"COMMIT"));
    }

    #[test]
    fn address_changes_only_touch_the_sets() {
        let w = sample();
        let a = Plan::from_world(&w).unwrap();
        let mut w2 = w.clone();
        w2.instances[0].enis[1].secondary_ips.push(ip("172.31.9.9"));
        let b = Plan::from_world(&w2).unwrap();
        assert_eq!(a.nft_shape(), b.nft_shape(), "same ports, same rules");
        assert_ne!(a.nft_sets(), b.nft_sets());
        assert!(b.nft_sets().contains("172.31.9.9"));
        let full = b.nft_full();
        assert!(full.contains("chain src_i1e1 {\n    ip saddr != @a_i1e1 counter drop"));
        assert!(full.contains("chain dst_i1e0 {\n    ip daddr != @a_i1e0 counter drop"));
        // one map lookup per frame and hook, whatever the number of ports
        assert!(full.contains("iifname vmap { \"i1e0\" : jump src_i1e0, \"i1e1\" : jump src_i1e1"));
        assert_eq!(full.matches("oifname vmap {").count(), 2, "{full}");
        assert!(full.contains("oifname \"up0\" ip saddr != @mapped counter drop"));
        // Detaching an ENI changes the shape: the rules are rebuilt.
        let mut w3 = w.clone();
        w3.instances[0].enis.pop();
        assert_ne!(Plan::from_world(&w3).unwrap().nft_shape(), a.nft_shape());
    }

    /// Every address of a delegated /28 (network and broadcast included: EC2 routes all 16
    /// to the ENI) is answered by ARP, passes the src/dst check and has a router neighbour;
    /// assigning or releasing a prefix changes only the address sets, not the rules.
    #[test]
    fn every_address_of_a_prefix_reaches_its_eni() {
        let mut w = sample();
        let p: Ipv4Net = "172.31.9.16/28".parse().unwrap();
        w.instances[0].enis[0].prefixes.push(p);
        let plan = Plan::from_world(&w).unwrap();
        let eth0 = plan.ports.iter().find(|p| p.device == 0).unwrap();
        let eb = plan.ebtables();
        let sets = plan.nft_sets();
        let neigh = plan.neighbours();
        for a in (u32::from(p.network())..=u32::from(p.broadcast())).map(Ipv4Addr::from) {
            assert!(eth0.addrs.contains(&a), "{a}");
            assert!(
                eb.contains(&format!(
                    "--arp-ip-dst {a} -j arpreply --arpreply-mac 02:00:00:00:00:01"
                )),
                "{a}"
            );
            assert_eq!(
                neigh["br-a"].get(&a).map(String::as_str),
                Some("02:00:00:00:00:01")
            );
        }
        let eth0_set = sets
            .lines()
            .find(|l| l.starts_with("add element bridge vpclab a_i1e0 "))
            .unwrap();
        assert!(
            eth0_set.contains("172.31.9.16,") && eth0_set.contains("172.31.9.31"),
            "{eth0_set}"
        );
        // Not the neighbouring addresses, and not on the other ENI.
        let eth1 = plan.ports.iter().find(|p| p.device == 1).unwrap();
        assert!(!eth0.addrs.contains(&ip("172.31.9.32")));
        assert!(!eth1.addrs.contains(&ip("172.31.9.20")));
        let before = Plan::from_world(&sample()).unwrap();
        assert_eq!(before.nft_shape(), plan.nft_shape());
        assert_ne!(before.nft_sets(), sets);
    }

    /// Custom networking: an ENI in a subnet of the VPC's secondary CIDR (100.64.0.0/19) is a
    /// port of that subnet's bridge (the router's address 100.64.0.1), its addresses are
    /// answered and checked like any other, and the internet routes the CIDR back to the VPC.
    #[test]
    fn an_eni_in_the_secondary_cidr_is_delivered_like_any_other() {
        let mut w = sample();
        w.vpc_cidrs.push("100.64.0.0/16".parse().unwrap());
        w.subnets.push(Subnet {
            id: "subnet-pods".into(),
            cidr: "100.64.0.0/19".parse().unwrap(),
            az: "us-west-2a".into(),
            name: "vpc-lab-pods-a".into(),
        });
        let eni = &mut w.instances[0].enis[1];
        eni.subnet_id = "subnet-pods".into();
        eni.primary_ip = ip("100.64.7.9");
        eni.secondary_ips = vec![ip("100.64.7.10")];
        eni.prefixes = vec!["100.64.8.16/28".parse().unwrap()];
        let plan = Plan::from_world(&w).unwrap();
        let bridge = plan
            .bridges
            .iter()
            .find(|(b, _, _)| b == "br-pods")
            .expect("a bridge for the pod subnet");
        assert_eq!(bridge.1.to_string(), "100.64.0.1/19");
        let eth1 = plan.ports.iter().find(|p| p.device == 1).unwrap();
        assert_eq!(
            (eth1.bridge.as_str(), eth1.gateway),
            ("br-pods", ip("100.64.0.1"))
        );
        for a in ["100.64.7.9", "100.64.7.10", "100.64.8.16", "100.64.8.31"] {
            assert!(eth1.addrs.contains(&ip(a)), "{a}");
            assert!(
                plan.ebtables().contains(&format!(
                    "--arp-ip-dst {a} -j arpreply --arpreply-mac 02:00:00:00:00:02"
                )),
                "{a}"
            );
            assert_eq!(
                plan.neighbours()["br-pods"].get(&ip(a)).map(String::as_str),
                Some("02:00:00:00:00:02")
            );
        }
        assert!(plan.nft_sets().contains("100.64.7.10"));
        assert!(
            plan.vpc_cidrs
                .contains(&"100.64.0.0/16".parse::<Ipv4Net>().unwrap())
        );
    }

    #[test]
    fn an_eni_in_an_unknown_subnet_is_an_error_naming_it() {
        let mut w = sample();
        w.instances[0].enis[0].subnet_id = "subnet-zzz".into();
        let e = Plan::from_world(&w).unwrap_err().to_string();
        assert!(e.contains("subnet-zzz") && e.contains("eni-0"), "{e}");
    }
}
