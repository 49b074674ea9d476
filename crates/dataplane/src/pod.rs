//! Pod wiring: ADD (`setup_pod`), CHECK (`check_pod`) and DEL (`teardown_pod`).

use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;
use tracing::{debug, warn};

use crate::netlink::Netlink;
use crate::ops::{
    Address, Link, Mac, NUD_PERMANENT, Neighbour, NetError, NetOps, Route, Rule, Scope, VethRequest,
};
use crate::rules::{eni_rule, ensure_rule, tolerate_missing};
use crate::{
    DataplaneError, MAIN_TABLE, NetNs, POD_GATEWAY, RETIRED_LINK_GROUP, RETIRED_NAME_PREFIX,
    TO_POD_RULE_PRIORITY, TO_POD_TABLE, TeardownError, device_for_route_table, open_ns_opt,
};

/// What `setup_pod` builds for one pod.
#[derive(Debug, Clone, Copy)]
pub struct PodSpec<'a> {
    /// The pod's network namespace (CNI_NETNS).
    pub netns: &'a Path,
    /// Host end of the veth (see [`crate::host_veth_name`]), created in the caller's netns.
    pub host_veth: &'a str,
    /// Pod end of the veth (CNI_IFNAME, normally `eth0`).
    pub ifname: &'a str,
    /// The pod's address (a /32 is configured).
    pub ip: Ipv4Addr,
    /// MTU of both veth ends.
    pub mtu: u32,
    /// Routing table of the ENI owning `ip`: 254 (main) for the primary ENI, else
    /// device number + 1 (the host veth joins the ENI's device group, [`crate::pod_group`], by
    /// which the node marks the pod's packets for the ENI's `fwmark` rule).
    pub route_table: u32,
}

/// The interfaces `setup_pod` created (for the CNI result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLinks {
    pub host_veth: String,
    /// `aa:bb:cc:dd:ee:ff`
    pub host_mac: String,
    pub container_ifname: String,
    /// `aa:bb:cc:dd:ee:ff`
    pub container_mac: String,
}

/// What `teardown_pod` removes. Every field but `ifname` may be unknown.
#[derive(Debug, Clone, Copy)]
pub struct PodTeardown<'a> {
    /// The pod's netns; `None` or a path that no longer exists skips the pod side.
    pub netns: Option<&'a Path>,
    /// The host veth's name; when `None` or gone, it is found via the `<ip>/32` main route.
    pub host_veth: Option<&'a str>,
    pub ifname: &'a str,
    /// The pod's address; `None` skips rules and routes.
    pub ip: Option<Ipv4Addr>,
}

fn host32(ip: Ipv4Addr) -> Ipv4Net {
    Ipv4Net::new(ip, 32).expect("/32 is valid")
}

fn validate(spec: &PodSpec) -> Result<(), DataplaneError> {
    let name_ok = |n: &str| !n.is_empty() && n.len() <= 15 && !n.contains(['/', ' ', '\0']);
    if !name_ok(spec.host_veth) {
        return Err(DataplaneError::Invalid {
            what: "host veth name",
            value: spec.host_veth.into(),
        });
    }
    if !name_ok(spec.ifname) {
        return Err(DataplaneError::Invalid {
            what: "container interface name",
            value: spec.ifname.into(),
        });
    }
    if !(68..=65535).contains(&spec.mtu) {
        return Err(DataplaneError::Invalid {
            what: "MTU",
            value: spec.mtu.to_string(),
        });
    }
    if device_for_route_table(spec.route_table).is_none() {
        return Err(DataplaneError::Invalid {
            what: "route table (254 for the primary ENI, else ENI device number + 1 in 2..=64)",
            value: spec.route_table.to_string(),
        });
    }
    Ok(())
}

/// Things to undo if a later step fails.
enum Undo {
    Link { index: u32, name: String },
    Route(Route),
}

/// Wires a pod: veth (host end in the caller's netns with a pinned random MAC, pod end born
/// in the pod netns), pod addresses/routes/neighbour, host routes (main and table 512),
/// the shared `lookup 512` rule. A secondary-ENI pod's host veth is created in the ENI's
/// device group; no per-pod rule (the ENI's `fwmark` rule and the nftables mark serve all of
/// the ENI's pods).
///
/// Fails if `ifname` already exists in the pod netns; a stale host link named `host_veth`
/// is deleted first. On any failure everything created so far is removed again (the shared
/// rule `from all lookup 512 pref 512` and sysctls stay) and the first error is returned.
pub fn setup_pod(spec: &PodSpec) -> Result<PodLinks, DataplaneError> {
    validate(spec)?;
    let ns = NetNs::open(spec.netns)?;
    let mut host = Netlink::new()?;
    let mut pod = Netlink::new_in(&ns)?;
    setup_pod_with(&mut host, &mut pod, spec)
}

/// [`setup_pod`] over explicit handles: `host` is the node side, `pod` the pod netns.
pub fn setup_pod_with<N: NetOps>(
    host: &mut N,
    pod: &mut N,
    spec: &PodSpec,
) -> Result<PodLinks, DataplaneError> {
    validate(spec)?;
    if let Some(l) = pod.link_by_name(spec.ifname)? {
        if l.group != RETIRED_LINK_GROUP {
            return Err(DataplaneError::InterfaceExists {
                ifname: spec.ifname.into(),
                netns: spec.netns.display().to_string(),
            });
        }
        // A previous DEL in this same netns retired it; not reaped yet.
        debug!(
            ifname = spec.ifname,
            "deleting the retired interface of an earlier DEL"
        );
        tolerate_missing(pod.delete_link(l.index))?;
    }
    if let Some(stale) = host.link_by_name(spec.host_veth)? {
        debug!(veth = spec.host_veth, "deleting stale host link");
        tolerate_missing(host.delete_link(stale.index))?;
    }
    let mac = Mac::random_local();
    host.create_veth(
        &VethRequest {
            name: spec.host_veth.into(),
            mac,
            peer_name: spec.ifname.into(),
            mtu: spec.mtu,
            group: crate::group_for_route_table(spec.route_table).unwrap_or(0),
        },
        pod,
    )?;
    let mut undo = Vec::new();
    let res = setup_after_veth(host, pod, spec, mac, &mut undo);
    match res {
        Ok(links) => Ok(links),
        Err(e) => {
            warn!(error = %e, veth = spec.host_veth, ip = %spec.ip, "pod setup failed, rolling back");
            for u in undo.into_iter().rev() {
                let r = match &u {
                    Undo::Link { index, .. } => host.delete_link(*index),
                    Undo::Route(r) => host.del_route(r),
                };
                if let Err(ue) = tolerate_missing(r) {
                    let what = match &u {
                        Undo::Link { name, .. } => format!("link {name}"),
                        Undo::Route(r) => format!("route {r}"),
                    };
                    warn!(error = %ue, "rollback of {what} failed");
                }
            }
            // if the veth was created but its index never learned, delete by name
            if let Ok(Some(l)) = host.link_by_name(spec.host_veth)
                && l.mac == Some(mac)
            {
                let _ = host.delete_link(l.index);
            }
            Err(e)
        }
    }
}

fn setup_after_veth<N: NetOps>(
    host: &mut N,
    pod: &mut N,
    spec: &PodSpec,
    mac: Mac,
    undo: &mut Vec<Undo>,
) -> Result<PodLinks, DataplaneError> {
    let hlink = host
        .link_by_name(spec.host_veth)?
        .ok_or_else(|| DataplaneError::LinkNotFound {
            what: format!("host veth {} vanished right after creation", spec.host_veth),
        })?;
    undo.push(Undo::Link {
        index: hlink.index,
        name: hlink.name.clone(),
    });
    // IPv6 off on the host veth (reference): missing keys (no IPv6) are fine
    for (k, v) in [
        ("accept_ra", "0"),
        ("accept_redirects", "1"),
        ("forwarding", "0"),
    ] {
        let key = format!("net/ipv6/conf/{}/{k}", spec.host_veth);
        match host.write_sysctl(&key, v) {
            Ok(()) => {}
            Err(e) if e.errno() == Some(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(e.into()),
        }
    }
    host.set_link_up(hlink.index)?;

    // pod side
    if let Some(lo) = pod.link_by_name("lo")?
        && !lo.up
    {
        pod.set_link_up(lo.index)?;
    }
    let clink = pod
        .link_by_name(spec.ifname)?
        .ok_or_else(|| DataplaneError::LinkNotFound {
            what: format!(
                "container interface {} not found in {} after veth creation",
                spec.ifname,
                spec.netns.display()
            ),
        })?;
    pod.set_link_up(clink.index)?;
    pod.add_address(&Address {
        index: clink.index,
        addr: host32(spec.ip),
        scope: Scope::Universe,
    })?;
    pod.replace_route(
        &Route::new(MAIN_TABLE, host32(POD_GATEWAY))
            .dev(clink.index)
            .scope(Scope::Link),
    )?;
    pod.replace_route(
        &Route::new(MAIN_TABLE, Ipv4Net::default())
            .via(POD_GATEWAY)
            .dev(clink.index),
    )?;
    pod.replace_neighbour(&Neighbour {
        index: clink.index,
        ip: POD_GATEWAY,
        mac: Some(mac),
        state: NUD_PERMANENT,
    })?;

    // host side
    for table in [MAIN_TABLE, TO_POD_TABLE] {
        let r = Route::new(table, host32(spec.ip))
            .dev(hlink.index)
            .scope(Scope::Link);
        host.replace_route(&r)?;
        undo.push(Undo::Route(r));
    }
    ensure_rule(host, &Rule::new(TO_POD_RULE_PRIORITY, TO_POD_TABLE))?;
    Ok(PodLinks {
        host_veth: spec.host_veth.into(),
        host_mac: mac.to_string(),
        container_ifname: spec.ifname.into(),
        container_mac: clink.mac.map(|m| m.to_string()).unwrap_or_default(),
    })
}

/// Verifies everything [`setup_pod`] builds. The error lists every missing or wrong item.
pub fn check_pod(spec: &PodSpec) -> Result<(), DataplaneError> {
    validate(spec)?;
    let ns = NetNs::open(spec.netns)?;
    let mut host = Netlink::new()?;
    let mut pod = Netlink::new_in(&ns)?;
    check_pod_with(&mut host, &mut pod, spec)
}

/// [`check_pod`] over explicit handles.
pub fn check_pod_with<N: NetOps>(
    host: &mut N,
    pod: &mut N,
    spec: &PodSpec,
) -> Result<(), DataplaneError> {
    let mut p: Vec<String> = Vec::new();
    let hlink = host.link_by_name(spec.host_veth)?;
    let clink = pod.link_by_name(spec.ifname)?;
    let ns = spec.netns.display();
    let ip32 = host32(spec.ip);
    check_link(
        &mut p,
        hlink.as_ref(),
        &format!("host veth {}", spec.host_veth),
        spec.mtu,
    );
    check_link(
        &mut p,
        clink.as_ref(),
        &format!("container interface {} in {ns}", spec.ifname),
        spec.mtu,
    );
    if let (Some(h), Some(c)) = (&hlink, &clink)
        && (h.peer_index != Some(c.index) || c.peer_index != Some(h.index))
    {
        p.push(format!(
            "host veth {} and container interface {} are not peers",
            spec.host_veth, spec.ifname
        ));
    }
    if let Some(c) = &clink {
        let addrs = pod.addresses(Some(c.index))?;
        if !addrs.iter().any(|a| a.addr == ip32) {
            p.push(format!("address {ip32} missing on {} in {ns}", spec.ifname));
        }
        let routes = pod.routes(Some(MAIN_TABLE))?;
        let gw32 = host32(POD_GATEWAY);
        if !routes
            .iter()
            .any(|r| r.dst == gw32 && r.oif == Some(c.index) && r.scope == Scope::Link)
        {
            p.push(format!(
                "route {gw32} dev {} scope link missing in {ns}",
                spec.ifname
            ));
        }
        if !routes.iter().any(|r| {
            r.dst.prefix_len() == 0 && r.gateway == Some(POD_GATEWAY) && r.oif == Some(c.index)
        }) {
            p.push(format!(
                "default route via {POD_GATEWAY} dev {} missing in {ns}",
                spec.ifname
            ));
        }
        let neigh = pod.neighbours(c.index)?;
        let want_mac = hlink.as_ref().and_then(|h| h.mac);
        match neigh.iter().find(|n| n.ip == POD_GATEWAY) {
            None => p.push(format!(
                "neighbour {POD_GATEWAY} missing on {} in {ns}",
                spec.ifname
            )),
            Some(n) => {
                if n.state & NUD_PERMANENT == 0 {
                    p.push(format!("neighbour {POD_GATEWAY} is not permanent"));
                }
                if want_mac.is_some() && n.mac != want_mac {
                    p.push(format!(
                        "neighbour {POD_GATEWAY} has lladdr {} instead of the host veth MAC {}",
                        n.mac.map(|m| m.to_string()).unwrap_or_default(),
                        want_mac.map(|m| m.to_string()).unwrap_or_default()
                    ));
                }
            }
        }
    }
    if let Some(h) = &hlink {
        let routes = host.routes(None)?;
        for table in [MAIN_TABLE, TO_POD_TABLE] {
            if !routes.iter().any(|r| {
                r.table == table
                    && r.dst == ip32
                    && r.oif == Some(h.index)
                    && r.scope == Scope::Link
            }) {
                p.push(format!(
                    "host route {ip32} dev {} scope link missing in table {table}",
                    spec.host_veth
                ));
            }
        }
    }
    let rules = host.rules()?;
    let to_pod = Rule::new(TO_POD_RULE_PRIORITY, TO_POD_TABLE);
    if !rules.contains(&to_pod) {
        p.push(format!("rule {to_pod} missing"));
    }
    if let Some(h) = &hlink {
        let group = crate::group_for_route_table(spec.route_table).unwrap_or(0);
        if h.group != group {
            p.push(format!(
                "host veth {} is in device group {} instead of {group} (route table {})",
                spec.host_veth, h.group, spec.route_table
            ));
        }
    }
    if let Some(device @ 1..) = device_for_route_table(spec.route_table) {
        let eni = eni_rule(device);
        if !rules.contains(&eni) {
            p.push(format!("rule {eni} missing"));
        }
    }
    if p.is_empty() {
        Ok(())
    } else {
        Err(DataplaneError::CheckFailed { problems: p })
    }
}

fn check_link(p: &mut Vec<String>, l: Option<&Link>, what: &str, mtu: u32) {
    match l {
        None => p.push(format!("{what} missing")),
        Some(l) => {
            if !l.up {
                p.push(format!("{what} is down"));
            }
            if l.mtu != mtu {
                p.push(format!("{what} has MTU {} instead of {mtu}", l.mtu));
            }
            if l.kind.as_deref().is_some_and(|k| k != "veth") {
                p.push(format!(
                    "{what} is a {} link, not a veth",
                    l.kind.as_deref().unwrap_or("?")
                ));
            }
        }
    }
}

/// Removes a pod's wiring, in reverse order of setup: from-pod rules of the IP at 1536 (all
/// tables), the reference's per-pod `to <ip>/32 lookup main pref 512` rule, the `<ip>/32`
/// routes in tables 512 and main, the host veth (by name, or found via the main-table
/// route when the name is unknown or gone; only veth links are deleted), and the container
/// interface if the pod netns still exists. Missing things are not errors; every step runs
/// even when an earlier one failed, and all errors are returned. The shared
/// `from all lookup 512` rule is left alone.
pub fn teardown_pod(t: &PodTeardown) -> Result<(), TeardownError> {
    let mut errors = Vec::new();
    let mut host = match Netlink::new() {
        Ok(h) => h,
        Err(e) => return TeardownError::from_vec(vec![e.into()]),
    };
    let mut pod = None;
    if let Some(path) = t.netns {
        match open_ns_opt(path) {
            Ok(Some(ns)) => match Netlink::new_in(&ns) {
                Ok(n) => pod = Some(n),
                Err(e) => errors.push(e.into()),
            },
            Ok(None) => debug!(netns = %path.display(), "pod netns gone; skipping pod side"),
            Err(e) => errors.push(e.into()),
        }
    }
    let res = teardown_pod_with(&mut host, pod.as_mut(), t);
    if let Err(e) = res {
        errors.extend(e.errors);
    }
    TeardownError::from_vec(errors)
}

/// [`teardown_pod`] over explicit handles (`pod` = `None` when the pod netns is gone).
pub fn teardown_pod_with<N: NetOps>(
    host: &mut N,
    pod: Option<&mut N>,
    t: &PodTeardown,
) -> Result<(), TeardownError> {
    let mut errors: Vec<DataplaneError> = Vec::new();
    let mut push = |r: Result<(), NetError>| {
        if let Err(e) = tolerate_missing(r) {
            errors.push(e.into());
        }
    };

    // 1. rules
    if let Some(ip) = t.ip {
        match host.rules() {
            Ok(rules) => {
                for r in rules
                    .iter()
                    .filter(|r| crate::rules::reference_pod_rule(r) == Some(ip))
                {
                    push(host.del_rule(r));
                }
            }
            Err(e) => push(Err(e)),
        }
    }

    // 2. find the host veth
    let mut veth: Option<Link> = None;
    if let Some(name) = t.host_veth {
        match host.link_by_name(name) {
            Ok(l) => veth = l.filter(|l| l.kind.as_deref() == Some("veth")),
            Err(e) => push(Err(e)),
        }
    }
    let mut routes = Vec::new();
    if let Some(ip) = t.ip {
        let ip32 = host32(ip);
        match host.routes(None) {
            Ok(all) => {
                routes = all
                    .into_iter()
                    .filter(|r| r.dst == ip32 && (r.table == MAIN_TABLE || r.table == TO_POD_TABLE))
                    .collect::<Vec<_>>()
            }
            Err(e) => push(Err(e)),
        }
        if veth.is_none() {
            let oif = routes
                .iter()
                .find(|r| r.table == MAIN_TABLE && r.oif.is_some())
                .and_then(|r| r.oif);
            if let Some(oif) = oif {
                match host.links() {
                    Ok(links) => {
                        veth = links
                            .into_iter()
                            .find(|l| l.index == oif && l.kind.as_deref() == Some("veth"));
                        if let Some(v) = &veth {
                            debug!(veth = %v.name, %ip, "found host veth via main-table route");
                        }
                    }
                    Err(e) => push(Err(e)),
                }
            }
        }
    }

    // 3. routes (table 512 first, then main)
    routes.sort_by_key(|r| if r.table == TO_POD_TABLE { 0 } else { 1 });
    for r in &routes {
        let mut del = Route::new(r.table, r.dst);
        del.oif = r.oif;
        del.gateway = r.gateway;
        push(host.del_route(&del));
    }

    // 4. host veth: down and into the retired group; [`reap_retired_links`] deletes it (and
    //    its peer) later. Deleting it here would cost this DEL a kernel RCU grace period.
    if let Some(v) = &veth
        && !is_retired(v)
    {
        push(retire(host, v));
    }

    // 5. container interface, if the pod netns still exists: the retired veth's peer is
    //    retired too (so an ADD into this netns may replace it); anything else is deleted.
    if let Some(pod) = pod {
        match pod.link_by_name(t.ifname) {
            Ok(Some(l)) => {
                let peer_retired = veth.as_ref().is_some_and(|v| {
                    l.kind.as_deref() == Some("veth") && l.peer_index == Some(v.index)
                });
                if peer_retired {
                    if !is_retired(&l) {
                        push(retire(pod, &l));
                    }
                } else {
                    push(pod.delete_link(l.index));
                }
            }
            Ok(None) => {}
            Err(e) => push(Err(e)),
        }
    }
    TeardownError::from_vec(errors)
}

fn is_retired(l: &Link) -> bool {
    l.group == RETIRED_LINK_GROUP && !l.up
}

/// Down, into [`RETIRED_LINK_GROUP`], and renamed `vcr<index>` so that an ADD of the same pod
/// (same host veth name) or into the same netns (same ifname) finds its name free. A failed
/// rename is only logged: ADD deletes a retired link that is in its way.
fn retire<N: NetOps>(n: &mut N, l: &Link) -> Result<(), NetError> {
    n.retire_link(l.index, RETIRED_LINK_GROUP)?;
    let name = format!("{RETIRED_NAME_PREFIX}{}", l.index);
    if let Err(e) = n.rename_link(l.index, &name) {
        warn!(link = %l.name, error = %e, "retired link keeps its name");
    }
    Ok(())
}

/// Deletes the veths that DEL retired ([`RETIRED_LINK_GROUP`]) in this namespace, in one
/// kernel batch; returns whether there were any.
pub fn reap_retired_links() -> Result<bool, DataplaneError> {
    reap_retired_links_with(&mut Netlink::new()?)
}

pub fn reap_retired_links_with<N: NetOps>(n: &mut N) -> Result<bool, DataplaneError> {
    Ok(n.delete_link_group(RETIRED_LINK_GROUP)?)
}

#[cfg(test)]
mod tests;

/// The pods this node's data path serves: every `<ip>/32` routed to a veth in the to-pod
/// table or in `main` (aws-node routes pods from `main` only), with the veth's name. An
/// allocation whose address is not here has no pod wired on the node.
pub fn wired_pods() -> Result<std::collections::BTreeMap<Ipv4Addr, String>, DataplaneError> {
    wired_pods_with(&mut crate::netlink::Netlink::new()?)
}

pub fn wired_pods_with<N: NetOps>(
    n: &mut N,
) -> Result<std::collections::BTreeMap<Ipv4Addr, String>, DataplaneError> {
    let veths: std::collections::BTreeMap<u32, String> = n
        .links()?
        .into_iter()
        .filter(|l| l.kind.as_deref() == Some("veth"))
        .map(|l| (l.index, l.name))
        .collect();
    let mut out = std::collections::BTreeMap::new();
    for table in [TO_POD_TABLE, MAIN_TABLE] {
        for r in n.routes(Some(table))? {
            if r.dst.prefix_len() != 32 {
                continue;
            }
            if let Some(name) = r.oif.and_then(|i| veths.get(&i)) {
                out.entry(r.dst.addr()).or_insert_with(|| name.clone());
            }
        }
    }
    Ok(out)
}
