//! The syscall boundary of the dataplane: a small set of network operations on *one*
//! network namespace ([`NetOps`]), with a real netlink implementation
//! ([`crate::netlink::Netlink`]) and an in-memory fake ([`crate::fake::FakeNet`]).
//!
//! Values are plain IPv4 data (no netlink types), so the sequencing logic
//! (`setup_pod_with`, `teardown_pod_with`, `setup_eni_with`, ...) can be unit-tested without root.

use std::fmt;
use std::io;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use nix::errno::Errno;

/// A failed network operation. `op` names the operation and its arguments (interface,
/// address, table, ...), so the message alone says what went wrong.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The kernel answered with an error code.
    #[error("{op}: {errno}{}", ext_msg.as_ref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        op: String,
        errno: Errno,
        /// The kernel's extended-ACK message, when it sent one.
        ext_msg: Option<String>,
    },
    /// A local I/O error (socket, `/proc/sys` write).
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    /// The kernel sent something we could not decode or did not expect.
    #[error("{op}: {msg}")]
    Protocol { op: String, msg: String },
}

impl NetError {
    /// The kernel's errno, if this is a kernel (or errno-carrying I/O) error.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            NetError::Kernel { errno, .. } => Some(*errno),
            NetError::Io { source, .. } => source.raw_os_error().map(Errno::from_raw),
            NetError::Protocol { .. } => None,
        }
    }

    /// EEXIST: the object already exists.
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(Errno::EEXIST)
    }

    /// The object (or the device it refers to) does not exist:
    /// ENOENT, ESRCH (route/neighbour not found), ENODEV (no such device).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(Errno::ENOENT) | Some(Errno::ESRCH) | Some(Errno::ENODEV)
        )
    }

    pub(crate) fn kernel(op: impl Into<String>, errno: Errno) -> NetError {
        NetError::Kernel {
            op: op.into(),
            errno,
            ext_msg: None,
        }
    }
}

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A random locally administered unicast address (`x2:..`, `x6:..`, `xa:..`, `xe:..`).
    pub fn random_local() -> Mac {
        let mut b: [u8; 6] = rand::random();
        b[0] = (b[0] & 0xfe) | 0x02;
        Mac(b)
    }

    /// Parses `aa:bb:cc:dd:ee:ff` (case-insensitive; `-` also accepted as separator).
    pub fn parse(s: &str) -> Option<Mac> {
        let parts: Vec<&str> = s.trim().split([':', '-']).collect();
        if parts.len() != 6 {
            return None;
        }
        let mut b = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return None;
            }
            b[i] = u8::from_str_radix(p, 16).ok()?;
        }
        Some(Mac(b))
    }

    /// From a raw netlink address attribute (must be 6 bytes).
    pub fn from_slice(b: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(b).ok().map(Mac)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A network interface as seen in one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<Mac>,
    pub mtu: u32,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// `IFLA_INFO_KIND` (e.g. `"veth"`), when the kernel reports one.
    pub kind: Option<String>,
    /// `IFLA_LINK`: for a veth, the peer's index (in the peer's namespace).
    pub peer_index: Option<u32>,
    /// `IFLA_GROUP` (0 unless set; [`crate::RETIRED_LINK_GROUP`] marks a torn-down veth).
    pub group: u32,
}

/// Route scope (the subset we use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Universe,
    Link,
    Host,
    Other(u8),
}

impl Scope {
    pub fn to_raw(self) -> u8 {
        match self {
            Scope::Universe => 0,
            Scope::Link => 253,
            Scope::Host => 254,
            Scope::Other(v) => v,
        }
    }
    pub fn from_raw(v: u8) -> Scope {
        match v {
            0 => Scope::Universe,
            253 => Scope::Link,
            254 => Scope::Host,
            v => Scope::Other(v),
        }
    }
}

/// An IPv4 address on an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Address {
    pub index: u32,
    pub addr: Ipv4Net,
    pub scope: Scope,
}

/// An IPv4 unicast route.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub table: u32,
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
    pub scope: Scope,
    /// `RTPROT_*` (2 = kernel, 3 = boot, 4 = static). Informational on dumps.
    pub protocol: u8,
    /// `RTN_*` (1 = unicast, 2 = local, ...). Only unicast routes are created here.
    pub kind: u8,
}

impl Route {
    /// A unicast route with protocol `boot` (what `ip route add` uses).
    pub fn new(table: u32, dst: Ipv4Net) -> Route {
        Route {
            table,
            dst,
            gateway: None,
            oif: None,
            scope: Scope::Universe,
            protocol: 3,
            kind: 1,
        }
    }
    pub fn dev(mut self, oif: u32) -> Route {
        self.oif = Some(oif);
        self
    }
    pub fn via(mut self, gw: Ipv4Addr) -> Route {
        self.gateway = Some(gw);
        self
    }
    pub fn scope(mut self, s: Scope) -> Route {
        self.scope = s;
        self
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dst)?;
        if let Some(g) = self.gateway {
            write!(f, " via {g}")?;
        }
        if let Some(o) = self.oif {
            write!(f, " dev #{o}")?;
        }
        if self.scope == Scope::Link {
            write!(f, " scope link")?;
        }
        write!(f, " table {}", self.table)
    }
}

/// An IPv4 policy routing rule with action "lookup table".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rule {
    pub priority: u32,
    pub table: u32,
    pub src: Option<Ipv4Net>,
    pub dst: Option<Ipv4Net>,
    pub fwmark: Option<u32>,
    pub fwmask: Option<u32>,
}

impl Rule {
    pub fn new(priority: u32, table: u32) -> Rule {
        Rule {
            priority,
            table,
            src: None,
            dst: None,
            fwmark: None,
            fwmask: None,
        }
    }
    pub fn from(mut self, src: Ipv4Net) -> Rule {
        self.src = Some(src);
        self
    }
    pub fn to(mut self, dst: Ipv4Net) -> Rule {
        self.dst = Some(dst);
        self
    }
    pub fn fwmark(mut self, mark: u32, mask: u32) -> Rule {
        self.fwmark = Some(mark);
        self.fwmask = Some(mask);
        self
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.src {
            Some(s) => write!(f, "from {s}")?,
            None => write!(f, "from all")?,
        }
        if let Some(d) = self.dst {
            write!(f, " to {d}")?;
        }
        if let Some(m) = self.fwmark {
            write!(f, " fwmark {m:#x}/{:#x}", self.fwmask.unwrap_or(u32::MAX))?;
        }
        write!(f, " lookup {} pref {}", self.table, self.priority)
    }
}

/// A neighbour (ARP) entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Neighbour {
    pub index: u32,
    pub ip: Ipv4Addr,
    pub mac: Option<Mac>,
    /// `NUD_*` state bits (0x80 = permanent).
    pub state: u16,
}

/// `NUD_PERMANENT`.
pub const NUD_PERMANENT: u16 = 0x80;

/// A veth to create: `name` (with `mac`) in the namespace of the handle `create_veth` is
/// called on, `peer_name` created directly in the peer handle's namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VethRequest {
    pub name: String,
    pub mac: Mac,
    pub peer_name: String,
    pub mtu: u32,
    /// Device group of the named (host) end; 0 is the default group.
    pub group: u32,
}

/// Network operations on one network namespace. Creating operations fail with EEXIST when
/// the object exists (except `replace_*`); deleting operations fail with a not-found errno
/// (see [`NetError::is_not_found`]) when it does not.
pub trait NetOps {
    fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, NetError>;
    fn links(&mut self) -> Result<Vec<Link>, NetError>;
    fn link_by_mac(&mut self, mac: Mac) -> Result<Option<Link>, NetError> {
        Ok(self.links()?.into_iter().find(|l| l.mac == Some(mac)))
    }
    /// Creates a veth pair; the peer end is born in `peer`'s namespace.
    fn create_veth(&mut self, req: &VethRequest, peer: &Self) -> Result<(), NetError>
    where
        Self: Sized;
    fn set_link_up(&mut self, index: u32) -> Result<(), NetError>;
    fn set_link_mtu(&mut self, index: u32, mtu: u32) -> Result<(), NetError>;
    fn delete_link(&mut self, index: u32) -> Result<(), NetError>;
    /// Sets the link down and moves it into device group `group`; cheap, unlike deleting it.
    fn retire_link(&mut self, index: u32, group: u32) -> Result<(), NetError>;
    /// Moves a link into device group `group` (its state otherwise unchanged).
    fn set_link_group(&mut self, index: u32, group: u32) -> Result<(), NetError>;
    /// Renames a link (the kernel refuses while it is up).
    fn rename_link(&mut self, index: u32, name: &str) -> Result<(), NetError>;
    /// Deletes every link of device group `group` in one kernel batch. Returns whether there
    /// were any (none is not an error).
    fn delete_link_group(&mut self, group: u32) -> Result<bool, NetError>;

    fn add_address(&mut self, addr: &Address) -> Result<(), NetError>;
    fn del_address(&mut self, addr: &Address) -> Result<(), NetError>;
    /// IPv4 addresses, of one interface or of all.
    fn addresses(&mut self, index: Option<u32>) -> Result<Vec<Address>, NetError>;

    fn add_route(&mut self, r: &Route) -> Result<(), NetError>;
    fn replace_route(&mut self, r: &Route) -> Result<(), NetError>;
    /// Deletes a route: `dst` and `table` must match; `oif`/`gateway` when given.
    fn del_route(&mut self, r: &Route) -> Result<(), NetError>;
    /// IPv4 routes of one table, or of all tables.
    fn routes(&mut self, table: Option<u32>) -> Result<Vec<Route>, NetError>;

    fn add_rule(&mut self, r: &Rule) -> Result<(), NetError>;
    fn del_rule(&mut self, r: &Rule) -> Result<(), NetError>;
    /// IPv4 rules with action "lookup".
    fn rules(&mut self) -> Result<Vec<Rule>, NetError>;

    fn replace_neighbour(&mut self, n: &Neighbour) -> Result<(), NetError>;
    fn neighbours(&mut self, index: u32) -> Result<Vec<Neighbour>, NetError>;

    /// Writes `value` to `/proc/sys/<key>` (key like `net/ipv4/ip_forward`) *of this
    /// handle's namespace*. A missing key is reported as an `Io` error with ENOENT.
    fn write_sysctl(&mut self, key: &str, value: &str) -> Result<(), NetError>;
}
