//! Node-level setup done by the agent (inside the node's netns): sysctls, the fwmark and
//! to-pod rules, and per-ENI tables and rules.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use tracing::debug;

use crate::netlink::Netlink;
use crate::ops::{Address, Mac, NetOps, Route, Rule, Scope};
use crate::rules::{eni_rule, eni_table, ensure_rule, tolerate_missing};
use crate::{
    DataplaneError, ENI_MARK_MASK, ENI_PRIMARY_RULE_PRIORITY, FWMARK_RULE_PRIORITY, MAIN_TABLE,
    TO_POD_RULE_PRIORITY, TO_POD_TABLE, TeardownError,
};

/// Node-wide settings applied by [`setup_host`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSetup {
    /// The primary ENI's interface (gets `rp_filter=2`).
    pub primary_ifname: String,
    /// Connmark bit used for pod egress / NodePort return traffic (reference default 0x80).
    pub connmark: u32,
    /// MTU of the primary interface (`AWS_VPC_ENI_MTU`, as the reference sets it at start).
    pub mtu: u32,
}

/// Sets the primary interface's MTU, `net.ipv4.ip_forward=1` and
/// `net.ipv4.conf.<primary>.rp_filter=2` (written from the calling thread, i.e. in its
/// netns), ensures the rules
/// `fwmark <m>/<m> lookup main pref 1024` (a 1024 rule with another mark is replaced) and
/// `from all lookup 512 pref 512`. Idempotent.
pub fn setup_host(h: &HostSetup) -> Result<(), DataplaneError> {
    let mut n = Netlink::new()?;
    setup_host_with(&mut n, h)
}

/// [`setup_host`] over an explicit handle.
pub fn setup_host_with<N: NetOps>(n: &mut N, h: &HostSetup) -> Result<(), DataplaneError> {
    if h.connmark == 0 || h.connmark & ENI_MARK_MASK != 0 {
        return Err(DataplaneError::Invalid {
            what: "connmark (non-zero, and clear of the ENI mark bits 0x3f00)",
            value: format!("{:#x}", h.connmark),
        });
    }
    let primary =
        n.link_by_name(&h.primary_ifname)?
            .ok_or_else(|| DataplaneError::LinkNotFound {
                what: format!("primary interface {}", h.primary_ifname),
            })?;
    if primary.mtu != h.mtu {
        n.set_link_mtu(primary.index, h.mtu)?;
    }
    n.write_sysctl("net/ipv4/ip_forward", "1")?;
    n.write_sysctl(
        &format!("net/ipv4/conf/{}/rp_filter", h.primary_ifname),
        "2",
    )?;
    let want = Rule::new(FWMARK_RULE_PRIORITY, MAIN_TABLE).fwmark(h.connmark, h.connmark);
    for r in n.rules()? {
        if r.priority == FWMARK_RULE_PRIORITY && r.fwmark.is_some() && r != want {
            debug!(rule = %r, "replacing fwmark rule");
            tolerate_missing(n.del_rule(&r))?;
        }
    }
    ensure_rule(n, &want)?;
    ensure_rule(n, &Rule::new(TO_POD_RULE_PRIORITY, TO_POD_TABLE))?;
    Ok(())
}

/// A secondary ENI to configure (reference `setupENINetwork`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EniSetup {
    /// The ENI's MAC (`aa:bb:cc:dd:ee:ff`); the interface is found by it.
    pub mac: String,
    /// EC2 device number (≥ 1; the primary ENI is configured by the OS). Table = number + 1.
    pub device_number: u32,
    pub primary_ip: Ipv4Addr,
    /// The ENI's subnet (gateway = network + 1).
    pub subnet: Ipv4Net,
    pub mtu: u32,
}

/// Configures a secondary ENI: finds the link by MAC, sets MTU and up, replaces its IPv4
/// addresses with `primary_ip/<subnet prefix>`, fills table `device_number + 1` with
/// `<gw>/32 dev ethN scope link` and `default via <gw> dev ethN`, deletes the kernel's
/// main-table subnet route for ethN, sets its `rp_filter` to 2 (loose: replies to the ENI's
/// pods are routed by packet mark, which the reverse-path check does not see), and ensures
/// `from <primary_ip>/32 lookup <table> pref 32765` (other tables' rules for that source, and
/// other sources' rules for that table, at 32765 are removed) and the ENI's pod rule ([`eni_rule`]). Idempotent. Returns the
/// interface name. A missing link is an error (the caller retries: hot-plug may lag).
pub fn setup_eni(e: &EniSetup) -> Result<String, DataplaneError> {
    let mut n = Netlink::new()?;
    setup_eni_with(&mut n, e)
}

/// [`setup_eni`] over an explicit handle.
pub fn setup_eni_with<N: NetOps>(n: &mut N, e: &EniSetup) -> Result<String, DataplaneError> {
    let table = eni_table(e.device_number)?;
    let mac = Mac::parse(&e.mac).ok_or_else(|| DataplaneError::Invalid {
        what: "ENI MAC",
        value: e.mac.clone(),
    })?;
    if !e.subnet.contains(&e.primary_ip) || e.subnet.prefix_len() >= 31 {
        return Err(DataplaneError::Invalid {
            what: "ENI subnet",
            value: format!("{} (primary IP {})", e.subnet, e.primary_ip),
        });
    }
    let link = n
        .link_by_mac(mac)?
        .ok_or_else(|| DataplaneError::LinkNotFound {
            what: format!(
                "no interface with MAC {mac} (ENI device {})",
                e.device_number
            ),
        })?;
    let name = link.name.clone();
    if link.mtu != e.mtu {
        n.set_link_mtu(link.index, e.mtu)?;
    }
    if !link.up {
        n.set_link_up(link.index)?;
    }
    let want = Ipv4Net::new(e.primary_ip, e.subnet.prefix_len()).expect("valid prefix");
    let mut have = false;
    for a in n.addresses(Some(link.index))? {
        if a.addr == want {
            have = true;
        } else if a.scope == Scope::Universe {
            debug!(ifname = %name, addr = %a.addr, "removing foreign address from ENI");
            tolerate_missing(n.del_address(&a))?;
        }
    }
    if !have {
        match n.add_address(&Address {
            index: link.index,
            addr: want,
            scope: Scope::Universe,
        }) {
            Err(e) if e.is_exists() => {}
            r => r?,
        }
    }
    let gw = Ipv4Addr::from(u32::from(e.subnet.network()) + 1);
    let gw32 = Ipv4Net::new(gw, 32).expect("/32");
    n.replace_route(&Route::new(table, gw32).dev(link.index).scope(Scope::Link))?;
    n.replace_route(
        &Route::new(table, Ipv4Net::default())
            .via(gw)
            .dev(link.index),
    )?;
    let subnet = e.subnet.trunc();
    for r in n.routes(Some(MAIN_TABLE))? {
        if r.dst == subnet && r.oif == Some(link.index) && r.gateway.is_none() {
            let mut del = Route::new(MAIN_TABLE, r.dst).dev(link.index);
            del.gateway = None;
            tolerate_missing(n.del_route(&del))?;
        }
    }
    let src = Ipv4Net::new(e.primary_ip, 32).expect("/32");
    let rule = Rule::new(ENI_PRIMARY_RULE_PRIORITY, table).from(src);
    for r in n.rules()? {
        // This source to another table, or another source (an earlier ENI at this device
        // index, detached while the agent was down) to this table.
        if r.priority == ENI_PRIMARY_RULE_PRIORITY
            && (r.src == Some(src) || r.table == table)
            && r != rule
        {
            tolerate_missing(n.del_rule(&r))?;
        }
    }
    ensure_rule(n, &rule)?;
    n.write_sysctl(&format!("net/ipv4/conf/{name}/rp_filter"), "2")?;
    ensure_rule(n, &eni_rule(e.device_number))?;
    Ok(name)
}

/// Undoes [`setup_eni`]: deletes every rule with source `primary_ip/32`, the ENI's pod rule
/// and every route in table `device_number + 1`. Missing things are not errors; all errors are collected.
pub fn teardown_eni(device_number: u32, primary_ip: Ipv4Addr) -> Result<(), TeardownError> {
    let mut n = match Netlink::new() {
        Ok(n) => n,
        Err(e) => return TeardownError::from_vec(vec![e.into()]),
    };
    teardown_eni_with(&mut n, device_number, primary_ip)
}

/// [`teardown_eni`] over an explicit handle.
pub fn teardown_eni_with<N: NetOps>(
    n: &mut N,
    device_number: u32,
    primary_ip: Ipv4Addr,
) -> Result<(), TeardownError> {
    let mut errors: Vec<DataplaneError> = Vec::new();
    let table = match eni_table(device_number) {
        Ok(t) => t,
        Err(e) => return TeardownError::from_vec(vec![e]),
    };
    let src = Ipv4Net::new(primary_ip, 32).expect("/32");
    match n.rules() {
        Ok(rules) => {
            let pods = eni_rule(device_number);
            for r in rules.iter().filter(|r| r.src == Some(src) || **r == pods) {
                if let Err(e) = tolerate_missing(n.del_rule(r)) {
                    errors.push(e.into());
                }
            }
        }
        Err(e) => errors.push(e.into()),
    }
    match n.routes(Some(table)) {
        Ok(routes) => {
            // default route first (it depends on the gateway's link route)
            let mut routes = routes;
            routes.sort_by_key(|r| r.dst.prefix_len());
            for r in routes {
                let mut del = Route::new(table, r.dst);
                del.oif = r.oif;
                del.gateway = r.gateway;
                if let Err(e) = tolerate_missing(n.del_route(&del)) {
                    errors.push(e.into());
                }
            }
        }
        Err(e) => errors.push(e.into()),
    }
    TeardownError::from_vec(errors)
}

/// The name of the interface (in the calling thread's netns) with this MAC, if any.
pub fn link_name_by_mac(mac: &str) -> Result<Option<String>, DataplaneError> {
    let m = Mac::parse(mac).ok_or_else(|| DataplaneError::Invalid {
        what: "MAC",
        value: mac.into(),
    })?;
    let mut n = Netlink::new()?;
    Ok(n.link_by_mac(m)?.map(|l| l.name))
}
