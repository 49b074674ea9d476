//! Start-up recovery of the allocations, before any ADD is served: from the checkpoint when it
//! is sound, else from the node — and in both cases no address a running pod has is ever
//! free in the pool.
//!
//! What the agent can see of the node is its pod wiring: every `/32` routed to a veth in the
//! pod table (512) or in `main` (as aws-node wires pods), with the veth's name ([`Wired`]).
//! What it can see of EC2 is the pool itself, built from EC2 (provisioning) or IMDS: the
//! addresses this node's ENIs carry. From those:
//!
//! - a sound checkpoint is restored; allocations no pod is wired to are pruned (their DEL ran
//!   while the agent was down), as before; those too young to judge ([`PRUNE_MIN_AGE_MS`]:
//!   their ADD may still be wiring the pod, or was cut off by the restart, and the runtime's
//!   DEL then tore down nothing while the agent was down) are looked at again once that old
//!   and released if still unwired ([`watch_rebuilt`]); so are the checkpoint's allocations on
//!   no ENI (their address was unassigned meanwhile) that no pod is wired to;
//! - a checkpoint that is empty, truncated, corrupt or of another version is renamed aside
//!   (`ipam.json.corrupt-<unix seconds>`), logged as an error and counted in
//!   `vpccni_checkpoint_rebuilds_total{reason}`; the agent starts from an empty pool;
//! - a missing checkpoint on a node with wired pods is the same case (`reason="missing"`);
//! - in every case each wired address the pool has and no allocation holds is held under a
//!   rebuilt key ([`crate::state::rebuilt_key`]: network `vpc-cni:rebuilt`, the host veth,
//!   the address), and the result is written at once;
//! - when the checkpoint was lost (damaged, or missing with pods wired), its cooldowns went
//!   with it: every free address starts a full cooldown (`IP_COOLDOWN_PERIOD`), as any of
//!   them may have been released a moment before. ADDs may then wait up to that period (the
//!   provisioner asks EC2 for more addresses meanwhile, as for any shortage).
//!
//! The container id of a rebuilt pod is unknown, so its DEL cannot name it. The DEL finds no
//! attachment, the plugin tears the pod down from its prevResult and host veth, and the agent,
//! woken by that DEL, looks at the node [`RESCAN_SETTLE`] later and releases (into cooldown)
//! every rebuilt allocation whose address is no longer wired; it also looks every
//! [`RESCAN_PERIOD`] while any remain. The limit: the address is released seconds after the
//! DEL rather than by it, and a pod whose routes someone removed by hand loses its hold.
//! A runtime's GC never releases rebuilt allocations (their network is no CNI network).
//!
//! If the node's pod routes cannot be listed, a sound checkpoint is used as it is (not
//! pruned); with a damaged or missing one the agent refuses to start rather than guess.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dataplane::DataplaneError;
use proto::AttachmentKey;
use tokio::sync::Notify;
use tracing::{error, info, warn};

use crate::checkpoint::{self, CheckpointError, Damage, Loaded};
use crate::clock::CarryKind;
use crate::state::State;

/// Every address routed to a pod's veth on this node, with the veth's name.
pub type Wired = BTreeMap<Ipv4Addr, String>;

/// Allocations younger than this are not pruned at start: their ADD may still be wiring the pod.
pub const PRUNE_MIN_AGE_MS: u64 = 60_000;
/// How long after a DEL that matched nothing the agent looks at the node again (the plugin
/// tears the pod down right after the agent's answer; ~35 ms).
pub const RESCAN_SETTLE: Duration = Duration::from_secs(2);
/// How often the agent looks at the node while rebuilt allocations remain.
pub const RESCAN_PERIOD: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(
        "the checkpoint {path} is {what} and the node's pod routes cannot be listed ({reason}): refusing to serve ADD without knowing which addresses running pods hold",
        path = .path.display()
    )]
    NodeUnknown {
        path: PathBuf,
        what: &'static str,
        #[source]
        reason: DataplaneError,
    },
}

/// What the checkpoint was.
#[derive(Debug)]
pub enum Source {
    Checkpoint { restored: usize, carry: CarryKind },
    Missing,
    Damaged(Damage),
}

/// What [`recover`] did, for the log.
#[derive(Debug)]
pub struct Recovery {
    pub path: PathBuf,
    pub source: Source,
    /// Checkpoint records the pool could not take.
    pub warnings: Vec<String>,
    /// Checkpoint allocations released because no pod is wired to them.
    pub pruned: Vec<(AttachmentKey, Ipv4Addr)>,
    /// Wired addresses now held under rebuilt keys.
    pub rebuilt: Vec<(AttachmentKey, Ipv4Addr)>,
    /// Wired addresses the pool does not have (not on this node's ENIs), with their veth.
    pub outside: Vec<(Ipv4Addr, String)>,
    /// Free addresses put in cooldown because the checkpoint's cooldowns were lost.
    pub cooled: usize,
    /// The node's wiring could not be listed (only with a sound checkpoint).
    pub node_error: Option<String>,
    /// The write of the recovered state, when one was needed.
    pub saved: Option<Result<(), String>>,
}

/// Restores `state` from the checkpoint at `path`, or rebuilds it from `wired` (see the module
/// documentation). `unix_s` names a damaged file kept aside.
pub fn recover(
    state: &mut State,
    path: &Path,
    wired: Result<Wired, DataplaneError>,
    unix_s: u64,
) -> Result<Recovery, RecoveryError> {
    let mut r = Recovery {
        path: path.to_path_buf(),
        source: Source::Missing,
        warnings: Vec::new(),
        pruned: Vec::new(),
        rebuilt: Vec::new(),
        outside: Vec::new(),
        cooled: 0,
        node_error: None,
        saved: None,
    };
    r.source = match checkpoint::load_for_start(path, unix_s)? {
        Loaded::Found(cp) => {
            let restored = state.restore(&cp);
            r.warnings = restored.warnings;
            Source::Checkpoint {
                restored: cp.allocations.len(),
                carry: restored.carry,
            }
        }
        Loaded::Missing => Source::Missing,
        Loaded::Damaged(d) => {
            state.recovered_from = Some(d.kind.as_str());
            Source::Damaged(d)
        }
    };
    let wired = match wired {
        Ok(w) => w,
        Err(reason) => {
            let what = match &r.source {
                Source::Checkpoint { .. } => {
                    r.node_error = Some(reason.to_string());
                    return Ok(r);
                }
                Source::Missing => "missing",
                Source::Damaged(d) => d.kind.as_str(),
            };
            return Err(RecoveryError::NodeUnknown {
                path: path.to_path_buf(),
                what,
                reason,
            });
        }
    };
    if matches!(r.source, Source::Checkpoint { .. }) {
        let ips: BTreeSet<Ipv4Addr> = wired.keys().copied().collect();
        r.pruned = state.prune_unwired(&ips, PRUNE_MIN_AGE_MS);
    }
    let held = state.hold_wired(&wired);
    r.rebuilt = held.rebuilt;
    r.outside = held.outside;
    if matches!(r.source, Source::Missing) && !r.rebuilt.is_empty() {
        state.recovered_from = Some("missing");
    }
    if state.recovered_from.is_some() {
        r.cooled = state.cool_all_free();
    }
    if matches!(r.source, Source::Damaged(_)) || !r.rebuilt.is_empty() {
        r.saved = Some(state.save().map_err(|e| e.to_string()));
    }
    Ok(r)
}

impl Recovery {
    /// Logs what happened: errors for a damaged or missing checkpoint, one line per held,
    /// pruned or unplaceable address.
    pub fn log(&self) {
        let path = self.path.display();
        match &self.source {
            Source::Checkpoint { restored, carry } => {
                info!(%path, allocations = restored, "checkpoint restored; times carried {carry}");
            }
            Source::Missing if self.rebuilt.is_empty() => {
                info!(%path, "no checkpoint and no pod wired on this node: starting with an empty pool");
            }
            Source::Missing => {
                error!(%path, pods = self.rebuilt.len(), "the checkpoint is missing but pods are wired on this node: rebuilt their allocations from the node's pod routes");
            }
            Source::Damaged(d) => {
                let kept = match &d.kept {
                    Ok(p) => format!("kept at {} for inspection", p.display()),
                    Err(e) => format!("could not be moved aside ({e})"),
                };
                error!(%path, reason = d.kind.as_str(), detail = %d.detail, pods = self.rebuilt.len(), "the checkpoint is unusable and {kept}; rebuilt the allocations from the node's pod routes");
            }
        }
        for w in &self.warnings {
            warn!("{w}");
        }
        for (key, ip) in &self.pruned {
            warn!(%key, %ip, "released: no pod on this node is wired to the address (deleted while the agent was down)");
        }
        for (key, ip) in &self.rebuilt {
            warn!(%key, %ip, veth = %key.container_id, "held for a pod wired on this node that no checkpoint record holds; released once the pod's routes are gone");
        }
        if self.cooled > 0 {
            warn!(
                addresses = self.cooled,
                "the checkpoint's cooldowns were lost: every free address cools down once before it is handed out"
            );
        }
        for (ip, veth) in &self.outside {
            warn!(%ip, %veth, "a pod is wired to an address that is on none of this node's ENIs; it cannot be handed out");
        }
        if let Some(e) = &self.node_error {
            warn!("cannot list the node's pod routes; not pruning: {e}");
        }
        if let Some(Err(e)) = &self.saved {
            error!(
                "writing the recovered checkpoint failed: {e}; ADDs fail until it can be written"
            );
        }
    }
}

/// Releases rebuilt allocations whose pod is gone: [`RESCAN_SETTLE`] after each wake-up (a DEL
/// or GC that may concern one), and every [`RESCAN_PERIOD`]; only while any remain. Also
/// releases the allocations restored unwired at start once they are [`PRUNE_MIN_AGE_MS`] old
/// and still unwired ([`State::release_unconfirmed`]). `scan` lists the addresses wired on
/// the node (blocking).
pub async fn watch_rebuilt<F>(
    state: Arc<Mutex<State>>,
    wake: Arc<Notify>,
    scan: F,
    settle: Duration,
    period: Duration,
) where
    F: Fn() -> Result<BTreeSet<Ipv4Addr>, DataplaneError> + Clone + Send + 'static,
{
    let any_rebuilt = |s: &Arc<Mutex<State>>| {
        let s = s.lock().unwrap_or_else(|p| p.into_inner());
        !s.rebuilt().is_empty() || !s.unconfirmed.is_empty()
    };
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = wake.notified() => tokio::time::sleep(settle).await,
            _ = tokio::time::sleep(period) => {}
        }
        if !any_rebuilt(&state) {
            continue;
        }
        let wired = match tokio::task::spawn_blocking(scan.clone()).await {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => {
                let e = e.to_string();
                if last_error.as_ref() != Some(&e) {
                    warn!("listing the node's pod routes for rebuilt allocations: {e}");
                }
                last_error = Some(e);
                continue;
            }
            Err(e) => {
                warn!("listing the node's pod routes for rebuilt allocations: {e}");
                continue;
            }
        };
        last_error = None;
        let (released, unfinished) = {
            let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
            (
                s.release_unwired_rebuilt(&wired),
                s.release_unconfirmed(&wired, PRUNE_MIN_AGE_MS),
            )
        };
        for (key, ip) in released {
            info!(%key, %ip, "released: the pod held under a rebuilt key is gone from the node");
        }
        for (key, ip) in unfinished {
            warn!(%key, %ip, "released: allocated just before the agent restarted and never wired to a pod (its ADD was cut off)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::fake::FakeTime;
    use crate::state::REBUILT_NETWORK;
    use dataplane::NetOps;
    use dataplane::fake::{FakeNet, FakeWorld};
    use ipam::{EniInfo, Pool};
    use proto::{PodRef, Request, Response};
    use std::fs;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    /// A pool of four addresses on one ENI.
    fn state(path: &Path, time: &Arc<FakeTime>) -> State {
        let mut p = Pool::new(30_000);
        p.add_eni(
            EniInfo {
                id: "eni-1".into(),
                device_number: 1,
                subnet: "10.0.0.0/24".parse().unwrap(),
                primary_ip: ip("10.0.0.4"),
            },
            &[
                ip("10.0.0.10"),
                ip("10.0.0.11"),
                ip("10.0.0.12"),
                ip("10.0.0.13"),
            ],
        )
        .unwrap();
        State::new(p, vec![], path.to_path_buf(), "hint".into()).with_clock(time.clock())
    }

    fn key(c: &str) -> AttachmentKey {
        AttachmentKey {
            network: "vpc-cni".into(),
            container_id: c.into(),
            ifname: "eth0".into(),
        }
    }

    fn add(s: &mut State, c: &str) -> Ipv4Addr {
        match s.handle(Request::Add {
            key: key(c),
            pod: PodRef::default(),
            netns: "/x".into(),
        }) {
            Response::Added { allocation, .. } => allocation.ip,
            other => panic!("{other:?}"),
        }
    }

    fn wired(pairs: &[(&str, &str)]) -> Wired {
        pairs.iter().map(|(i, v)| (ip(i), v.to_string())).collect()
    }

    fn eperm() -> DataplaneError {
        DataplaneError::LinkNotFound {
            what: "EPERM".into(),
        }
    }

    #[test]
    fn the_node_view_lists_veth_routes_of_both_tables() {
        let w = FakeWorld::new(&["host"]);
        let mut n = FakeNet::new(&w, "host");
        let (a, b, eth) = {
            let mut w = w.borrow_mut();
            (
                w.add_link("host", "enia", None, Some("veth")),
                w.add_link("host", "enib", None, Some("veth")),
                w.add_link("host", "eth1", None, None),
            )
        };
        let r = |table, dst: &str, oif| {
            dataplane::ops::Route::new(table, dst.parse().unwrap()).dev(oif)
        };
        n.add_route(&r(512, "10.0.0.10/32", a)).unwrap();
        n.add_route(&r(254, "10.0.0.10/32", a)).unwrap();
        n.add_route(&r(254, "10.0.0.11/32", b)).unwrap(); // aws-node's way: main only
        n.add_route(&r(254, "10.0.0.0/24", eth)).unwrap();
        n.add_route(&r(254, "10.0.0.99/32", eth)).unwrap(); // not a veth
        assert_eq!(
            dataplane::wired_pods_with(&mut n).unwrap(),
            wired(&[("10.0.0.10", "enia"), ("10.0.0.11", "enib")])
        );
    }

    #[test]
    fn a_torn_checkpoint_is_kept_aside_and_rebuilt_from_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let t = FakeTime::new(1_700_000_000_000, 1_000, "b1");
        // A first life: three pods, then the file is torn (truncated by hand, a bad disk…).
        let mut first = state(&path, &t);
        let ips: Vec<Ipv4Addr> = ["a", "b", "c"].iter().map(|c| add(&mut first, c)).collect();
        let good = fs::read(&path).unwrap();
        fs::write(&path, &good[..good.len() - 7]).unwrap();

        // The node: a and b still run; c was deleted while the agent was down.
        let node = wired(&[
            (&ips[0].to_string(), "eni0000000000a"),
            (&ips[1].to_string(), "eni0000000000b"),
            ("10.9.9.9", "eni000000000zz"), // on no ENI of ours
        ]);
        let mut s = state(&path, &t);
        let r = recover(&mut s, &path, Ok(node.clone()), 1_700_000_000).unwrap();
        r.log();
        let Source::Damaged(d) = &r.source else {
            panic!("{:?}", r.source)
        };
        assert_eq!(d.kind.as_str(), "truncated");
        let kept = d.kept.as_ref().unwrap();
        assert_eq!(kept, &dir.path().join("ipam.json.corrupt-1700000000"));
        assert_eq!(fs::read(kept).unwrap(), good[..good.len() - 7]);
        assert_eq!(s.recovered_from, Some("truncated"));
        assert_eq!(r.outside, vec![(ip("10.9.9.9"), "eni000000000zz".into())]);
        assert!(matches!(r.saved, Some(Ok(()))));

        // Both running pods' addresses are held; no ADD gets them.
        let held: Vec<Ipv4Addr> = r.rebuilt.iter().map(|(_, i)| *i).collect();
        assert_eq!(held, vec![ips[0], ips[1]]);
        assert!(r.rebuilt.iter().all(|(k, _)| k.network == REBUILT_NETWORK));
        // The lost cooldowns: the two free addresses (c's among them) cool down once.
        assert_eq!(r.cooled, 2);
        let refused = s.handle(Request::Add {
            key: key("d"),
            pod: PodRef::default(),
            netns: "/x".into(),
        });
        assert!(
            matches!(&refused, Response::Error { code: 11, message } if message.contains("2 in cooldown")),
            "{refused:?}"
        );
        t.advance(30_000);
        let new: Vec<Ipv4Addr> = ["d", "e"].iter().map(|c| add(&mut s, c)).collect();
        assert!(!new.contains(&ips[0]) && !new.contains(&ips[1]), "{new:?}");
        let r = s.handle(Request::Add {
            key: key("f"),
            pod: PodRef::default(),
            netns: "/x".into(),
        });
        assert!(matches!(r, Response::Error { code: 11, .. }), "{r:?}");

        // The rebuilt state is on disk: a restart restores it as it is.
        let mut again = state(&path, &t);
        let r2 = recover(&mut again, &path, Ok(node), 1_700_000_001).unwrap();
        assert!(matches!(r2.source, Source::Checkpoint { restored: 4, .. }));
        assert!(r2.rebuilt.is_empty());
        assert_eq!(again.rebuilt().len(), 2);
        assert_eq!(again.recovered_from, None);
    }

    #[test]
    fn a_missing_checkpoint_on_a_node_with_pods_is_rebuilt_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let t = FakeTime::new(1_700_000_000_000, 1_000, "b1");
        let mut s = state(&path, &t);
        let r = recover(&mut s, &path, Ok(wired(&[("10.0.0.12", "enix")])), 5).unwrap();
        assert!(matches!(r.source, Source::Missing));
        assert_eq!(s.recovered_from, Some("missing"));
        assert_eq!(
            s.rebuilt(),
            vec![(
                crate::state::rebuilt_key(ip("10.0.0.12"), "enix"),
                ip("10.0.0.12")
            )]
        );
        assert!(path.exists(), "written at once");
        // A new node: nothing wired, nothing to recover, nothing written.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let mut s = state(&path, &t);
        let r = recover(&mut s, &path, Ok(Wired::new()), 5).unwrap();
        assert!(r.saved.is_none() && s.recovered_from.is_none());
    }

    #[test]
    fn without_a_node_view_only_a_sound_checkpoint_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let t = FakeTime::new(1_700_000_000_000, 1_000, "b1");
        let e = recover(&mut state(&path, &t), &path, Err(eperm()), 5).unwrap_err();
        assert!(
            e.to_string().contains("missing") && e.to_string().contains("EPERM"),
            "{e}"
        );
        fs::write(&path, "{").unwrap();
        let e = recover(&mut state(&path, &t), &path, Err(eperm()), 5).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
        let mut s = state(&path, &t);
        add(&mut s, "a");
        let r = recover(&mut state(&path, &t), &path, Err(eperm()), 5).unwrap();
        assert_eq!(r.node_error.as_deref(), Some("EPERM"));
    }

    #[test]
    fn a_sound_checkpoint_is_pruned_and_completed_from_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let t = FakeTime::new(1_700_000_000_000, 1_000, "b1");
        let mut s = state(&path, &t);
        let a = add(&mut s, "a");
        let b = add(&mut s, "b");
        t.advance(PRUNE_MIN_AGE_MS);
        // b's pod is gone; a runs; a pod nobody recorded is wired to 10.0.0.13.
        let mut s = state(&path, &t);
        let r = recover(
            &mut s,
            &path,
            Ok(wired(&[(&a.to_string(), "enia"), ("10.0.0.13", "eniq")])),
            5,
        )
        .unwrap();
        assert_eq!(r.pruned, vec![(key("b"), b)]);
        assert_eq!(r.rebuilt.len(), 1);
        assert_eq!(s.recovered_from, None, "the checkpoint was sound");
    }

    #[tokio::test]
    async fn a_runtime_del_of_a_rebuilt_pod_releases_it_once_the_pod_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        let t = FakeTime::new(1_700_000_000_000, 1_000, "b1");
        let mut s = state(&path, &t);
        let node = Arc::new(Mutex::new(
            [ip("10.0.0.10"), ip("10.0.0.11")]
                .into_iter()
                .collect::<BTreeSet<_>>(),
        ));
        recover(
            &mut s,
            &path,
            Ok(wired(&[("10.0.0.10", "enia"), ("10.0.0.11", "enib")])),
            5,
        )
        .unwrap();
        let wake = Arc::new(Notify::new());
        s.rescan = Some(wake.clone());
        let state = Arc::new(Mutex::new(s));
        let scan = {
            let node = node.clone();
            move || Ok(node.lock().unwrap().clone())
        };
        let watcher = tokio::spawn(watch_rebuilt(
            state.clone(),
            wake,
            scan,
            Duration::from_millis(50),
            Duration::from_secs(3600),
        ));
        // A runtime GC of the real network leaves the rebuilt allocations alone.
        let r = state.lock().unwrap().handle(Request::Gc {
            network: "vpc-cni".into(),
            valid: vec![],
        });
        assert_eq!(r, Response::Collected { released: vec![] });
        // The runtime deletes the pod on 10.0.0.10: the agent does not know its container id…
        let r = state
            .lock()
            .unwrap()
            .handle(Request::Del { key: key("c1") });
        assert_eq!(r, Response::Deleted { released: None });
        // …the plugin tears it down from prevResult…
        node.lock().unwrap().remove(&ip("10.0.0.10"));
        // …and the agent notices.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = state.lock().unwrap().rebuilt();
            if left.len() == 1 {
                assert_eq!(left[0].1, ip("10.0.0.11"));
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{left:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let st = state.lock().unwrap();
        assert!(
            st.pool()
                .cooldowns(st.now())
                .iter()
                .any(|(i, _)| *i == ip("10.0.0.10")),
            "released into cooldown"
        );
        watcher.abort();
    }
}
