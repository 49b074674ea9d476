//! An in-memory [`NetOps`] for unit tests: a "world" of network namespaces with links,
//! addresses, routes, rules and neighbours, modelling the kernel behaviours the dataplane
//! relies on (veth peers die together; routes, addresses and neighbours die with their
//! device; EEXIST / ENOENT / ESRCH / ENODEV as the kernel reports them). Failures can be
//! injected on the N-th mutating call, and every mutating call is logged.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::rc::Rc;

use nix::errno::Errno;

use crate::ops::{Address, Link, Mac, Neighbour, NetError, NetOps, Route, Rule, VethRequest};

/// The state of one fake namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeNs {
    pub links: BTreeMap<u32, Link>,
    pub addresses: Vec<Address>,
    pub routes: Vec<Route>,
    pub rules: Vec<Rule>,
    pub neighbours: Vec<Neighbour>,
    pub sysctls: BTreeMap<String, String>,
    /// Sysctl keys that exist (writes to others fail with ENOENT). `None`: all exist.
    pub known_sysctls: Option<Vec<String>>,
}

impl FakeNs {
    /// Every link but `lo` (index 1).
    pub fn links_but_lo(&self) -> Vec<&Link> {
        self.links.values().filter(|l| l.index != 1).collect()
    }
}

/// All namespaces of the fake world plus failure injection and the call log.
#[derive(Debug, Default)]
pub struct FakeWorld {
    pub namespaces: BTreeMap<String, FakeNs>,
    next_index: u32,
    /// Mutating calls made so far.
    pub mutations: usize,
    /// Fail the mutating call with this 0-based number (with `fail_errno`).
    pub fail_at: Option<usize>,
    pub fail_errno: Option<Errno>,
    /// Fail every mutating call whose log line contains this text.
    pub fail_matching: Vec<(String, Errno)>,
    /// `"<ns>: <op>"` for every mutating call (including failed ones, suffixed `FAILED`).
    pub log: Vec<String>,
    /// (peer ns, peer index) of each veth end, keyed by (ns, index).
    peers: BTreeMap<(String, u32), (String, u32)>,
}

/// A handle on one namespace of a shared [`FakeWorld`].
#[derive(Debug, Clone)]
pub struct FakeNet {
    pub world: Rc<RefCell<FakeWorld>>,
    pub ns: String,
}

impl FakeWorld {
    /// A world with the given namespaces, each with `lo` (index 1).
    pub fn new(names: &[&str]) -> Rc<RefCell<FakeWorld>> {
        let mut w = FakeWorld {
            next_index: 2,
            ..Default::default()
        };
        for n in names {
            let mut ns = FakeNs::default();
            ns.links.insert(
                1,
                Link {
                    index: 1,
                    name: "lo".into(),
                    mac: None,
                    mtu: 65536,
                    up: false,
                    kind: None,
                    peer_index: None,
                    group: 0,
                },
            );
            w.namespaces.insert((*n).to_string(), ns);
        }
        Rc::new(RefCell::new(w))
    }

    /// Adds a plain (non-veth) link, e.g. an ENI, and returns its index.
    pub fn add_link(&mut self, ns: &str, name: &str, mac: Option<Mac>, kind: Option<&str>) -> u32 {
        let index = self.next_index;
        self.next_index += 1;
        self.ns_mut(ns).links.insert(
            index,
            Link {
                index,
                name: name.into(),
                mac,
                mtu: 1500,
                up: false,
                kind: kind.map(str::to_string),
                peer_index: None,
                group: 0,
            },
        );
        index
    }

    pub fn ns(&self, ns: &str) -> &FakeNs {
        &self.namespaces[ns]
    }

    pub fn ns_mut(&mut self, ns: &str) -> &mut FakeNs {
        self.namespaces.get_mut(ns).expect("fake namespace exists")
    }

    /// Removes a whole namespace (like the runtime deleting the pod netns): veths whose
    /// other end lives there die too.
    pub fn delete_namespace(&mut self, ns: &str) {
        let idx: Vec<u32> = self.ns(ns).links.keys().copied().collect();
        for i in idx {
            self.remove_link(ns, i);
        }
        self.namespaces.remove(ns);
    }

    fn remove_link(&mut self, ns: &str, index: u32) {
        if let Some(n) = self.namespaces.get_mut(ns) {
            n.links.remove(&index);
            n.addresses.retain(|a| a.index != index);
            n.routes.retain(|r| r.oif != Some(index));
            n.neighbours.retain(|x| x.index != index);
        }
        if let Some((pns, pidx)) = self.peers.remove(&(ns.to_string(), index)) {
            self.peers.remove(&(pns.clone(), pidx));
            if let Some(n) = self.namespaces.get_mut(&pns) {
                n.links.remove(&pidx);
                n.addresses.retain(|a| a.index != pidx);
                n.routes.retain(|r| r.oif != Some(pidx));
                n.neighbours.retain(|x| x.index != pidx);
            }
        }
    }
}

impl FakeNet {
    pub fn new(world: &Rc<RefCell<FakeWorld>>, ns: &str) -> FakeNet {
        FakeNet {
            world: world.clone(),
            ns: ns.to_string(),
        }
    }

    /// Counts a mutating call, logs it, and applies failure injection.
    fn mutate(&self, op: String) -> Result<(), NetError> {
        let mut w = self.world.borrow_mut();
        let n = w.mutations;
        w.mutations += 1;
        let line = format!("{}: {op}", self.ns);
        let mut fail = None;
        if w.fail_at == Some(n) {
            fail = Some(w.fail_errno.unwrap_or(Errno::EIO));
        }
        for (pat, errno) in &w.fail_matching {
            if line.contains(pat.as_str()) {
                fail = Some(*errno);
            }
        }
        if !w.namespaces.contains_key(&self.ns) {
            fail = Some(Errno::EINVAL);
        }
        match fail {
            Some(errno) => {
                w.log.push(format!("{line} FAILED"));
                Err(NetError::kernel(format!("{op} (injected)"), errno))
            }
            None => {
                w.log.push(line);
                Ok(())
            }
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut FakeNs) -> T) -> Result<T, NetError> {
        let mut w = self.world.borrow_mut();
        match w.namespaces.get_mut(&self.ns) {
            Some(n) => Ok(f(n)),
            None => Err(NetError::kernel(
                format!("namespace {} gone", self.ns),
                Errno::EINVAL,
            )),
        }
    }

    fn need_link(&self, index: u32, op: &str) -> Result<(), NetError> {
        if self.with(|n| n.links.contains_key(&index))? {
            Ok(())
        } else {
            Err(NetError::kernel(op.to_string(), Errno::ENODEV))
        }
    }
}

impl NetOps for FakeNet {
    fn link_by_name(&mut self, name: &str) -> Result<Option<Link>, NetError> {
        self.with(|n| n.links.values().find(|l| l.name == name).cloned())
    }

    fn links(&mut self) -> Result<Vec<Link>, NetError> {
        self.with(|n| n.links.values().cloned().collect())
    }

    fn create_veth(&mut self, req: &VethRequest, peer: &Self) -> Result<(), NetError> {
        let op = format!(
            "create veth {} peer {}@{}",
            req.name, req.peer_name, peer.ns
        );
        self.mutate(op.clone())?;
        let mut w = self.world.borrow_mut();
        let exists_here = w.ns(&self.ns).links.values().any(|l| l.name == req.name);
        let exists_there = w
            .namespaces
            .get(&peer.ns)
            .map(|n| n.links.values().any(|l| l.name == req.peer_name));
        match exists_there {
            None => return Err(NetError::kernel(op, Errno::EINVAL)),
            Some(true) => return Err(NetError::kernel(op, Errno::EEXIST)),
            Some(false) if exists_here => return Err(NetError::kernel(op, Errno::EEXIST)),
            _ => {}
        }
        let a = w.next_index;
        let b = a + 1;
        w.next_index += 2;
        let link = |index, name: &str, mac, peer| Link {
            index,
            name: name.to_string(),
            mac: Some(mac),
            mtu: req.mtu,
            up: false,
            kind: Some("veth".into()),
            peer_index: Some(peer),
            group: 0,
        };
        let mut here = link(a, &req.name, req.mac, b);
        here.group = req.group;
        let there = link(b, &req.peer_name, Mac::random_local(), a);
        w.ns_mut(&self.ns).links.insert(a, here);
        w.ns_mut(&peer.ns).links.insert(b, there);
        w.peers.insert((self.ns.clone(), a), (peer.ns.clone(), b));
        w.peers.insert((peer.ns.clone(), b), (self.ns.clone(), a));
        Ok(())
    }

    fn set_link_up(&mut self, index: u32) -> Result<(), NetError> {
        let op = format!("set link #{index} up");
        self.mutate(op.clone())?;
        self.need_link(index, &op)?;
        self.with(|n| n.links.get_mut(&index).map(|l| l.up = true))?;
        Ok(())
    }

    fn set_link_mtu(&mut self, index: u32, mtu: u32) -> Result<(), NetError> {
        let op = format!("set link #{index} mtu {mtu}");
        self.mutate(op.clone())?;
        self.need_link(index, &op)?;
        self.with(|n| n.links.get_mut(&index).map(|l| l.mtu = mtu))?;
        Ok(())
    }

    fn delete_link(&mut self, index: u32) -> Result<(), NetError> {
        let op = format!("delete link #{index}");
        self.mutate(op.clone())?;
        self.need_link(index, &op)?;
        self.world.borrow_mut().remove_link(&self.ns, index);
        Ok(())
    }

    fn retire_link(&mut self, index: u32, group: u32) -> Result<(), NetError> {
        let op = format!("set link #{index} down, group {group}");
        self.mutate(op.clone())?;
        self.need_link(index, &op)?;
        self.with(|n| {
            n.links.get_mut(&index).map(|l| {
                l.up = false;
                l.group = group;
            })
        })?;
        Ok(())
    }

    fn set_link_group(&mut self, index: u32, group: u32) -> Result<(), NetError> {
        let op = format!("set link #{index} group {group}");
        self.mutate(op.clone())?;
        self.need_link(index, &op)?;
        self.with(|n| n.links.get_mut(&index).map(|l| l.group = group))?;
        Ok(())
    }

    fn rename_link(&mut self, index: u32, name: &str) -> Result<(), NetError> {
        let op = format!("rename link #{index} to {name}");
        self.mutate(op.clone())?;
        self.need_link(index, &op)?;
        let (taken, up) = self.with(|n| {
            (
                n.links.values().any(|l| l.name == name && l.index != index),
                n.links.get(&index).is_some_and(|l| l.up),
            )
        })?;
        if taken {
            return Err(NetError::kernel(op, Errno::EEXIST));
        }
        if up {
            return Err(NetError::kernel(op, Errno::EBUSY));
        }
        self.with(|n| n.links.get_mut(&index).map(|l| l.name = name.to_string()))?;
        Ok(())
    }

    fn delete_link_group(&mut self, group: u32) -> Result<bool, NetError> {
        let op = format!("delete link group {group}");
        self.mutate(op)?;
        let idx: Vec<u32> = self.with(|n| {
            n.links
                .values()
                .filter(|l| l.group == group)
                .map(|l| l.index)
                .collect()
        })?;
        let mut w = self.world.borrow_mut();
        for i in &idx {
            w.remove_link(&self.ns, *i);
        }
        Ok(!idx.is_empty())
    }

    fn add_address(&mut self, a: &Address) -> Result<(), NetError> {
        let op = format!("add address {} dev #{}", a.addr, a.index);
        self.mutate(op.clone())?;
        self.need_link(a.index, &op)?;
        let dup = self.with(|n| {
            n.addresses
                .iter()
                .any(|x| x.index == a.index && x.addr.addr() == a.addr.addr())
        })?;
        if dup {
            return Err(NetError::kernel(op, Errno::EEXIST));
        }
        self.with(|n| {
            n.addresses.push(*a);
            // the kernel adds the prefix route for non-/32 addresses
            if a.addr.prefix_len() < 32 {
                let mut r = Route::new(crate::MAIN_TABLE, a.addr.trunc())
                    .dev(a.index)
                    .scope(crate::ops::Scope::Link);
                r.protocol = 2;
                n.routes.push(r);
            }
        })
    }

    fn del_address(&mut self, a: &Address) -> Result<(), NetError> {
        let op = format!("delete address {} dev #{}", a.addr, a.index);
        self.mutate(op.clone())?;
        let found = self.with(|n| {
            let before = n.addresses.len();
            n.addresses
                .retain(|x| !(x.index == a.index && x.addr == a.addr));
            let removed = before != n.addresses.len();
            if removed {
                n.routes.retain(|r| {
                    !(r.protocol == 2 && r.oif == Some(a.index) && r.dst == a.addr.trunc())
                });
            }
            removed
        })?;
        if found {
            Ok(())
        } else {
            Err(NetError::kernel(op, Errno::EADDRNOTAVAIL))
        }
    }

    fn addresses(&mut self, index: Option<u32>) -> Result<Vec<Address>, NetError> {
        self.with(|n| {
            n.addresses
                .iter()
                .filter(|a| index.is_none_or(|i| a.index == i))
                .copied()
                .collect()
        })
    }

    fn add_route(&mut self, r: &Route) -> Result<(), NetError> {
        let op = format!("add route {r}");
        self.mutate(op.clone())?;
        if let Some(o) = r.oif {
            self.need_link(o, &op)?;
        }
        let dup = self.with(|n| {
            n.routes
                .iter()
                .any(|x| x.table == r.table && x.dst == r.dst)
        })?;
        if dup {
            return Err(NetError::kernel(op, Errno::EEXIST));
        }
        self.with(|n| n.routes.push(r.clone()))
    }

    fn replace_route(&mut self, r: &Route) -> Result<(), NetError> {
        let op = format!("replace route {r}");
        self.mutate(op.clone())?;
        if let Some(o) = r.oif {
            self.need_link(o, &op)?;
        }
        self.with(|n| {
            n.routes.retain(|x| !(x.table == r.table && x.dst == r.dst));
            n.routes.push(r.clone());
        })
    }

    fn del_route(&mut self, r: &Route) -> Result<(), NetError> {
        let op = format!("delete route {r}");
        self.mutate(op.clone())?;
        let found = self.with(|n| {
            let pos = n.routes.iter().position(|x| {
                x.table == r.table
                    && x.dst == r.dst
                    && r.oif.is_none_or(|o| x.oif == Some(o))
                    && r.gateway.is_none_or(|g| x.gateway == Some(g))
            });
            pos.map(|p| n.routes.remove(p)).is_some()
        })?;
        if found {
            Ok(())
        } else {
            Err(NetError::kernel(op, Errno::ESRCH))
        }
    }

    fn routes(&mut self, table: Option<u32>) -> Result<Vec<Route>, NetError> {
        self.with(|n| {
            n.routes
                .iter()
                .filter(|r| table.is_none_or(|t| r.table == t))
                .cloned()
                .collect()
        })
    }

    fn add_rule(&mut self, r: &Rule) -> Result<(), NetError> {
        let op = format!("add rule {r}");
        self.mutate(op.clone())?;
        let dup = self.with(|n| n.rules.contains(r))?;
        if dup {
            return Err(NetError::kernel(op, Errno::EEXIST));
        }
        self.with(|n| n.rules.push(*r))
    }

    fn del_rule(&mut self, r: &Rule) -> Result<(), NetError> {
        let op = format!("delete rule {r}");
        self.mutate(op.clone())?;
        let found = self.with(|n| {
            let pos = n.rules.iter().position(|x| x == r);
            pos.map(|p| n.rules.remove(p)).is_some()
        })?;
        if found {
            Ok(())
        } else {
            Err(NetError::kernel(op, Errno::ENOENT))
        }
    }

    fn rules(&mut self) -> Result<Vec<Rule>, NetError> {
        self.with(|n| n.rules.clone())
    }

    fn replace_neighbour(&mut self, nb: &Neighbour) -> Result<(), NetError> {
        let op = format!("replace neighbour {} dev #{}", nb.ip, nb.index);
        self.mutate(op.clone())?;
        self.need_link(nb.index, &op)?;
        self.with(|n| {
            n.neighbours
                .retain(|x| !(x.index == nb.index && x.ip == nb.ip));
            n.neighbours.push(*nb);
        })
    }

    fn neighbours(&mut self, index: u32) -> Result<Vec<Neighbour>, NetError> {
        self.with(|n| {
            n.neighbours
                .iter()
                .filter(|x| x.index == index)
                .copied()
                .collect()
        })
    }

    fn write_sysctl(&mut self, key: &str, value: &str) -> Result<(), NetError> {
        let op = format!("sysctl {key}={value}");
        self.mutate(op.clone())?;
        let ok = self.with(|n| match &n.known_sysctls {
            Some(known) if !known.iter().any(|k| k == key) => false,
            _ => {
                n.sysctls.insert(key.to_string(), value.to_string());
                true
            }
        })?;
        if ok {
            Ok(())
        } else {
            Err(NetError::Io {
                op,
                source: io::Error::from_raw_os_error(libc::ENOENT),
            })
        }
    }
}
