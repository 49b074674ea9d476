//! A small synchronous rtnetlink client over `netlink-sys` + `netlink-packet-route`.
//!
//! One [`Netlink`] is one `NETLINK_ROUTE` socket, bound to the network namespace it was
//! created in: [`Netlink::new`] uses the calling thread's namespace, [`Netlink::new_in`]
//! opens the socket on a helper thread inside another namespace and then works from any
//! thread. Requests wait for the kernel's ACK; errors keep the kernel's errno (and the
//! extended-ACK text when the kernel sends one). Dumps are retried when the kernel flags
//! them as interrupted (`NLM_F_DUMP_INTR`).

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use ipnet::Ipv4Net;
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use netns::{NetNs, NetnsError};
use nix::errno::Errno;
use tracing::trace;

use crate::ops::{
    Address, Link, Mac, Neighbour, NetError, NetOps, Route, Rule, Scope, VethRequest,
};

const DUMP_ATTEMPTS: usize = 5;
const NLMSGERR_ATTR_MSG: u16 = 1;

/// A synchronous rtnetlink socket bound to one network namespace.
#[derive(Debug)]
pub struct Netlink {
    socket: Socket,
    seq: u32,
    ns: NetNs,
}

impl Netlink {
    /// A socket in the calling thread's current network namespace.
    pub fn new() -> Result<Netlink, NetError> {
        let ns = NetNs::current().map_err(netns_err)?;
        Self::with_ns(ns)
    }

    /// A socket in namespace `ns` (opened on a helper thread inside `ns`); usable from any
    /// thread afterwards.
    pub fn new_in(ns: &NetNs) -> Result<Netlink, NetError> {
        let own = ns.try_clone().map_err(|source| NetError::Io {
            op: format!("dup netns handle {}", ns.path().display()),
            source,
        })?;
        ns.run(|| Self::with_ns(own)).map_err(netns_err)?
    }

    fn with_ns(ns: NetNs) -> Result<Netlink, NetError> {
        let op = "open rtnetlink socket";
        let io = |source| NetError::Io {
            op: op.into(),
            source,
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(io)?;
        socket.bind_auto().map_err(io)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(io)?;
        // best effort: error strings from the kernel, and short error echoes
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_cap_ack(true);
        Ok(Netlink { socket, seq: 0, ns })
    }

    /// The namespace this socket is bound to.
    pub fn netns(&self) -> &NetNs {
        &self.ns
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16, op: &str) -> Result<u32, NetError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(|source| NetError::Io {
            op: op.into(),
            source,
        })?;
        Ok(self.seq)
    }

    /// Receives the messages answering request `seq`, until the ACK/error or DONE.
    /// Returns the inner messages and whether the dump was interrupted.
    fn receive(
        &mut self,
        seq: u32,
        op: &str,
    ) -> Result<(Vec<RouteNetlinkMessage>, bool), NetError> {
        let mut out = Vec::new();
        let mut interrupted = false;
        loop {
            let (buf, _) = self
                .socket
                .recv_from_full()
                .map_err(|source| NetError::Io {
                    op: op.into(),
                    source,
                })?;
            let mut off = 0usize;
            while off < buf.len() {
                let len = NetlinkBuffer::new_checked(&buf[off..])
                    .map_err(|e| protocol(op, e))?
                    .length() as usize;
                if len == 0 || off + len > buf.len() {
                    return Err(protocol(op, "truncated netlink message"));
                }
                let bytes = &buf[off..off + len];
                off += (len + 3) & !3;
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                    .map_err(|e| protocol(op, e))?;
                if msg.header.sequence_number != seq {
                    trace!(
                        op,
                        got = msg.header.sequence_number,
                        seq,
                        "stale netlink message"
                    );
                    continue;
                }
                if msg.header.flags & NLM_F_DUMP_INTR != 0 {
                    interrupted = true;
                }
                let hdr_flags = msg.header.flags;
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok((out, interrupted)),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok((out, interrupted)),
                            Some(code) => Err(NetError::Kernel {
                                op: op.into(),
                                errno: Errno::from_raw(-code.get()),
                                ext_msg: ext_ack_msg(&e.header, hdr_flags),
                            }),
                        };
                    }
                    // a plain GET answer is followed by the ACK we asked for
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }

    /// Sends a request with NLM_F_ACK and waits for the ACK.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16, op: &str) -> Result<(), NetError> {
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_ACK | flags, op)?;
        self.receive(seq, op).map(|_| ())
    }

    /// A GET returning exactly the kernel's answer messages.
    fn get(
        &mut self,
        msg: RouteNetlinkMessage,
        op: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, NetError> {
        let seq = self.send(msg, NLM_F_REQUEST | NLM_F_ACK, op)?;
        self.receive(seq, op).map(|(m, _)| m)
    }

    /// A dump, retried when interrupted.
    fn dump(
        &mut self,
        mk: impl Fn() -> RouteNetlinkMessage,
        op: &str,
    ) -> Result<Vec<RouteNetlinkMessage>, NetError> {
        for _ in 0..DUMP_ATTEMPTS {
            let seq = self.send(mk(), NLM_F_REQUEST | NLM_F_DUMP, op)?;
            let (msgs, interrupted) = self.receive(seq, op)?;
            if !interrupted {
                return Ok(msgs);
            }
            trace!(op, "dump interrupted, retrying");
        }
        Err(NetError::kernel(
            format!("{op}: dump interrupted {DUMP_ATTEMPTS} times"),
            Errno::EINTR,
        ))
    }
}

fn netns_err(e: NetnsError) -> NetError {
    NetError::Io {
        op: e.to_string(),
        source: io::Error::other(e.to_string()),
    }
}

fn protocol(op: &str, e: impl std::fmt::Display) -> NetError {
    NetError::Protocol {
        op: op.into(),
        msg: e.to_string(),
    }
}

/// Extracts NLMSGERR_ATTR_MSG from an error payload (original header, capped, then TLVs).
fn ext_ack_msg(payload: &[u8], flags: u16) -> Option<String> {
    // NLM_F_ACK_TLVS = 0x200, NLM_F_CAPPED = 0x100 on error messages
    if flags & 0x200 == 0 {
        return None;
    }
    let orig_len = if flags & 0x100 != 0 {
        16
    } else {
        u32::from_ne_bytes(payload.get(0..4)?.try_into().ok()?) as usize
    };
    let mut off = (orig_len + 3) & !3;
    while off + 4 <= payload.len() {
        let len = u16::from_ne_bytes(payload[off..off + 2].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(payload[off + 2..off + 4].try_into().ok()?) & 0x3fff;
        if len < 4 || off + len > payload.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let s = &payload[off + 4..off + len];
            let s = s.split(|b| *b == 0).next().unwrap_or(s);
            return Some(String::from_utf8_lossy(s).into_owned());
        }
        off += (len + 3) & !3;
    }
    None
}

fn parse_link(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        kind: None,
        peer_index: None,
        group: 0,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Address(b) => l.mac = Mac::from_slice(b),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::Link(v) => l.peer_index = Some(*v),
            LinkAttribute::Group(g) => l.group = *g,
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = Some(k.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    l
}

fn table_header(table: u32) -> u8 {
    if table < 256 { table as u8 } else { 0 }
}

fn route_msg(r: &Route, for_delete: bool) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    m.header.destination_prefix_length = r.dst.prefix_len();
    m.header.table = table_header(r.table);
    if for_delete {
        m.header.scope = RouteScope::NoWhere;
        m.header.kind = RouteType::Unspec;
        m.header.protocol = RouteProtocol::Unspec;
    } else {
        m.header.scope = RouteScope::from(r.scope.to_raw());
        m.header.kind = RouteType::from(r.kind);
        m.header.protocol = RouteProtocol::from(r.protocol);
    }
    m.attributes.push(RouteAttribute::Table(r.table));
    if r.dst.prefix_len() > 0 {
        m.attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(
                r.dst.network(),
            )));
    }
    if let Some(g) = r.gateway {
        m.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(g)));
    }
    if let Some(o) = r.oif {
        m.attributes.push(RouteAttribute::Oif(o));
    }
    m
}

fn parse_route(m: &RouteMessage) -> Option<Route> {
    if m.header.address_family != AddressFamily::Inet {
        return None;
    }
    let mut table = u32::from(m.header.table);
    let mut dst = Ipv4Addr::UNSPECIFIED;
    let mut gateway = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
            RouteAttribute::Oif(o) => oif = Some(*o),
            _ => {}
        }
    }
    Some(Route {
        table,
        dst: Ipv4Net::new(dst, m.header.destination_prefix_length).ok()?,
        gateway,
        oif,
        scope: Scope::from_raw(m.header.scope.into()),
        protocol: m.header.protocol.into(),
        kind: m.header.kind.into(),
    })
}

fn rule_msg(r: &Rule) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.table = table_header(r.table);
    m.header.action = RuleAction::ToTable;
    m.attributes.push(RuleAttribute::Priority(r.priority));
    m.attributes.push(RuleAttribute::Table(r.table));
    if let Some(s) = r.src {
        m.header.src_len = s.prefix_len();
        m.attributes
            .push(RuleAttribute::Source(IpAddr::V4(s.network())));
    }
    if let Some(d) = r.dst {
        m.header.dst_len = d.prefix_len();
        m.attributes
            .push(RuleAttribute::Destination(IpAddr::V4(d.network())));
    }
    if let Some(mark) = r.fwmark {
        m.attributes.push(RuleAttribute::FwMark(mark));
    }
    if let Some(mask) = r.fwmask {
        m.attributes.push(RuleAttribute::FwMask(mask));
    }
    m
}

fn parse_rule(m: &RuleMessage) -> Option<Rule> {
    if m.header.family != AddressFamily::Inet || m.header.action != RuleAction::ToTable {
        return None;
    }
    let mut r = Rule::new(0, u32::from(m.header.table));
    for a in &m.attributes {
        match a {
            RuleAttribute::Priority(p) => r.priority = *p,
            RuleAttribute::Table(t) => r.table = *t,
            RuleAttribute::Source(IpAddr::V4(s)) => {
                r.src = Ipv4Net::new(*s, m.header.src_len).ok();
            }
            RuleAttribute::Destination(IpAddr::V4(d)) => {
                r.dst = Ipv4Net::new(*d, m.header.dst_len).ok();
            }
            RuleAttribute::FwMark(v) => r.fwmark = Some(*v),
            RuleAttribute::FwMask(v) => r.fwmask = Some(*v),
            _ => {}
        }
    }
    Some(r)
}

fn address_msg(a: &Address) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.prefix_len = a.addr.prefix_len();
    m.header.scope = AddressScope::from(a.scope.to_raw());
    m.header.index = a.index;
    m.attributes
        .push(AddressAttribute::Local(IpAddr::V4(a.addr.addr())));
    m.attributes
        .push(AddressAttribute::Address(IpAddr::V4(a.addr.addr())));
    m
}

fn parse_address(m: &AddressMessage) -> Option<Address> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    let mut local = None;
    let mut addr = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(IpAddr::V4(l)) => local = Some(*l),
            AddressAttribute::Address(IpAddr::V4(l)) => addr = Some(*l),
            _ => {}
        }
    }
    let ip = local.or(addr)?;
    Some(Address {
        index: m.header.index,
        addr: Ipv4Net::new(ip, m.header.prefix_len).ok()?,
        scope: Scope::from_raw(m.header.scope.into()),
    })
}

fn parse_neighbour(m: &NeighbourMessage) -> Option<Neighbour> {
    if m.header.family != AddressFamily::Inet {
        return None;
    }
    let mut ip = None;
    let mut mac = None;
    for a in &m.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => ip = Some(*i),
            NeighbourAttribute::LinkLayerAddress(b) => mac = Mac::from_slice(b),
            _ => {}
        }
    }
    Some(Neighbour {
        index: m.header.ifindex,
        ip: ip?,
        mac,
        state: m.header.state.into(),
    })
}

/// Where this process writes sysctls: `/proc/sys` unless [`set_proc_sys`] said otherwise.
static PROC_SYS: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Writes sysctls under `root` instead of `/proc/sys` from now on (once per process): an
/// unprivileged container sees `/proc/sys` read-only, and writes through a mount of the host's
/// `/proc/sys/net` (the files under it belong to the network namespace of the thread that
/// opens them, whichever mount it goes through). Returns `false` when a root was already set.
pub fn set_proc_sys(root: &Path) -> bool {
    PROC_SYS.set(root.to_path_buf()).is_ok()
}

/// Writes `<proc sys>/<key>` from the calling thread (whose netns the write applies to).
pub(crate) fn write_proc_sys(key: &str, value: &str) -> Result<(), NetError> {
    let root = PROC_SYS
        .get()
        .map_or(Path::new("/proc/sys"), |p| p.as_path());
    let path = root.join(key);
    let op = format!("write {value} to {}", path.display());
    let mut f = OpenOptions::new()
        .write(true)
        .open(&path)
        .map_err(|source| {
            let op = if source.raw_os_error() == Some(libc::EROFS) {
                format!(
                    "{op} (read-only: in an unprivileged container, mount the host's /proc/sys/net at /host/proc/sys/net and set VPC_CNI_PROC_SYS=/host/proc/sys)"
                )
            } else {
                op.clone()
            };
            NetError::Io { op, source }
        })?;
    f.write_all(value.as_bytes())
        .map_err(|source| NetError::Io { op, source })
}

impl NetOps for Netlink {
    fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, NetError> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.get(RouteNetlinkMessage::GetLink(m), &format!("get link {name}")) {
            Ok(msgs) => Ok(msgs.iter().find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link(l)),
                _ => None,
            })),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn links(&mut self) -> Result<Vec<Link>, NetError> {
        let msgs = self.dump(
            || RouteNetlinkMessage::GetLink(LinkMessage::default()),
            "list links",
        )?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link(l)),
                _ => None,
            })
            .collect())
    }

    fn create_veth(&mut self, req: &VethRequest, peer: &Self) -> Result<(), NetError> {
        let mut peer_msg = LinkMessage::default();
        peer_msg
            .attributes
            .push(LinkAttribute::IfName(req.peer_name.clone()));
        peer_msg.attributes.push(LinkAttribute::Mtu(req.mtu));
        peer_msg
            .attributes
            .push(LinkAttribute::NetNsFd(peer.ns.as_raw_fd()));
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(req.name.clone()));
        m.attributes
            .push(LinkAttribute::Address(req.mac.0.to_vec()));
        m.attributes.push(LinkAttribute::Mtu(req.mtu));
        if req.group != 0 {
            m.attributes.push(LinkAttribute::Group(req.group));
        }
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        let op = format!(
            "create veth {} (mac {}, mtu {}, group {}) with peer {} in {}",
            req.name,
            req.mac,
            req.mtu,
            req.group,
            req.peer_name,
            peer.ns.path().display()
        );
        self.request(
            RouteNetlinkMessage::NewLink(m),
            NLM_F_CREATE | NLM_F_EXCL,
            &op,
        )
    }

    fn set_link_up(&mut self, index: u32) -> Result<(), NetError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::Up;
        m.header.change_mask = LinkFlags::Up;
        self.request(
            RouteNetlinkMessage::SetLink(m),
            0,
            &format!("set link #{index} up"),
        )
    }

    fn set_link_mtu(&mut self, index: u32, mtu: u32) -> Result<(), NetError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(
            RouteNetlinkMessage::SetLink(m),
            0,
            &format!("set link #{index} mtu {mtu}"),
        )
    }

    fn delete_link(&mut self, index: u32) -> Result<(), NetError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.request(
            RouteNetlinkMessage::DelLink(m),
            0,
            &format!("delete link #{index}"),
        )
    }

    fn retire_link(&mut self, index: u32, group: u32) -> Result<(), NetError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.flags = LinkFlags::empty();
        m.header.change_mask = LinkFlags::Up;
        m.attributes.push(LinkAttribute::Group(group));
        self.request(
            RouteNetlinkMessage::SetLink(m),
            0,
            &format!("set link #{index} down, group {group}"),
        )
    }

    fn set_link_group(&mut self, index: u32, group: u32) -> Result<(), NetError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::Group(group));
        self.request(
            RouteNetlinkMessage::SetLink(m),
            0,
            &format!("set link #{index} group {group}"),
        )
    }

    fn rename_link(&mut self, index: u32, name: &str) -> Result<(), NetError> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.request(
            RouteNetlinkMessage::SetLink(m),
            0,
            &format!("rename link #{index} to {name}"),
        )
    }

    fn delete_link_group(&mut self, group: u32) -> Result<bool, NetError> {
        // One request: the kernel deletes the group's links in one unregister batch (one RCU
        // grace period for all of them) and answers ENODEV when the group is empty.
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::Group(group));
        match self.request(
            RouteNetlinkMessage::DelLink(m),
            0,
            &format!("delete link group {group}"),
        ) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(nix::errno::Errno::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn add_address(&mut self, a: &Address) -> Result<(), NetError> {
        self.request(
            RouteNetlinkMessage::NewAddress(address_msg(a)),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add address {} to link #{}", a.addr, a.index),
        )
    }

    fn del_address(&mut self, a: &Address) -> Result<(), NetError> {
        self.request(
            RouteNetlinkMessage::DelAddress(address_msg(a)),
            0,
            &format!("delete address {} from link #{}", a.addr, a.index),
        )
    }

    fn addresses(&mut self, index: Option<u32>) -> Result<Vec<Address>, NetError> {
        let msgs = self.dump(
            || {
                let mut m = AddressMessage::default();
                m.header.family = AddressFamily::Inet;
                RouteNetlinkMessage::GetAddress(m)
            },
            "list addresses",
        )?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => parse_address(a),
                _ => None,
            })
            .filter(|a| index.is_none_or(|i| a.index == i))
            .collect())
    }

    fn add_route(&mut self, r: &Route) -> Result<(), NetError> {
        self.request(
            RouteNetlinkMessage::NewRoute(route_msg(r, false)),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add route {r}"),
        )
    }

    fn replace_route(&mut self, r: &Route) -> Result<(), NetError> {
        self.request(
            RouteNetlinkMessage::NewRoute(route_msg(r, false)),
            NLM_F_CREATE | NLM_F_REPLACE,
            &format!("replace route {r}"),
        )
    }

    fn del_route(&mut self, r: &Route) -> Result<(), NetError> {
        self.request(
            RouteNetlinkMessage::DelRoute(route_msg(r, true)),
            0,
            &format!("delete route {r}"),
        )
    }

    fn routes(&mut self, table: Option<u32>) -> Result<Vec<Route>, NetError> {
        let msgs = self.dump(
            || {
                let mut m = RouteMessage::default();
                m.header.address_family = AddressFamily::Inet;
                RouteNetlinkMessage::GetRoute(m)
            },
            "list routes",
        )?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => parse_route(r),
                _ => None,
            })
            .filter(|r| table.is_none_or(|t| r.table == t))
            .collect())
    }

    fn add_rule(&mut self, r: &Rule) -> Result<(), NetError> {
        self.request(
            RouteNetlinkMessage::NewRule(rule_msg(r)),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add rule {r}"),
        )
    }

    fn del_rule(&mut self, r: &Rule) -> Result<(), NetError> {
        self.request(
            RouteNetlinkMessage::DelRule(rule_msg(r)),
            0,
            &format!("delete rule {r}"),
        )
    }

    fn rules(&mut self) -> Result<Vec<Rule>, NetError> {
        let msgs = self.dump(
            || {
                let mut m = RuleMessage::default();
                m.header.family = AddressFamily::Inet;
                RouteNetlinkMessage::GetRule(m)
            },
            "list rules",
        )?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => parse_rule(r),
                _ => None,
            })
            .collect())
    }

    fn replace_neighbour(&mut self, n: &Neighbour) -> Result<(), NetError> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = n.index;
        m.header.state = NeighbourState::from(n.state);
        m.header.kind = RouteType::Unicast;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                n.ip,
            )));
        if let Some(mac) = n.mac {
            m.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        }
        let mac = n.mac.map(|m| m.to_string()).unwrap_or_default();
        self.request(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_CREATE | NLM_F_REPLACE,
            &format!("replace neighbour {} lladdr {mac} dev #{}", n.ip, n.index),
        )
    }

    fn neighbours(&mut self, index: u32) -> Result<Vec<Neighbour>, NetError> {
        let msgs = self.dump(
            || {
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Inet;
                RouteNetlinkMessage::GetNeighbour(m)
            },
            "list neighbours",
        )?;
        Ok(msgs
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) => parse_neighbour(n),
                _ => None,
            })
            .filter(|n| n.index == index)
            .collect())
    }

    fn write_sysctl(&mut self, key: &str, value: &str) -> Result<(), NetError> {
        let here = self.ns.is_current().map_err(netns_err)?;
        if here {
            write_proc_sys(key, value)
        } else {
            self.ns
                .run(|| write_proc_sys(key, value))
                .map_err(netns_err)?
        }
    }
}
