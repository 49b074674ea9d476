//! Provisioner tests against an in-memory EC2 that enforces limits and can "crash" (never
//! answer) at any call, to prove that a restart leaks no ENI.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloud::{CloudError, EniAttachment, Filter, InstanceTypeLimits, NetworkInterface, NewEni};
use ipam::planner::{Action, Limits, Targets};
use ipam::{EniInfo, Pool};

use super::*;
use crate::checkpoint;
use crate::cloud_api::Cloud;
use crate::node_net::{NodeError, NodeNet};
use crate::state::State;

const INSTANCE: &str = "i-node1";

#[derive(Debug, Default)]
struct FakeEc2 {
    enis: Mutex<BTreeMap<String, NetworkInterface>>,
    next: AtomicUsize,
    calls: AtomicUsize,
    /// Calls numbered >= this never answer (the process "dies" there).
    hang_at: Mutex<Option<usize>>,
    /// EC2 answers InsufficientFreeAddressesInSubnet to every request for addresses.
    subnet_full: std::sync::atomic::AtomicBool,
    ips_per_eni: u32,
}

impl FakeEc2 {
    fn new(ips_per_eni: u32) -> Self {
        let f = FakeEc2 {
            ips_per_eni,
            ..Default::default()
        };
        let primary = NetworkInterface {
            interface_type: "interface".into(),
            id: "eni-primary".into(),
            mac: "02:00:00:00:00:01".into(),
            subnet_id: "subnet-a".into(),
            vpc_id: "vpc-1".into(),
            status: "in-use".into(),
            description: String::new(),
            primary_ip: Ipv4Addr::new(10, 0, 0, 10),
            secondary_ips: vec![],
            prefixes: vec![],
            security_groups: vec![],
            tags: BTreeMap::new(),
            attachment: Some(EniAttachment {
                attachment_id: "attach-primary".into(),
                instance_id: INSTANCE.into(),
                device_index: 0,
                status: "attached".into(),
                delete_on_termination: true,
            }),
        };
        f.enis.lock().unwrap().insert(primary.id.clone(), primary);
        f
    }

    async fn gate(&self) {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let hang = self.hang_at.lock().unwrap().is_some_and(|h| n >= h);
        if hang {
            std::future::pending::<()>().await;
        }
    }

    fn new_ip(&self) -> Ipv4Addr {
        let n = self.next.fetch_add(1, Ordering::SeqCst) as u32;
        Ipv4Addr::from(0x0a00_1000 + n)
    }

    fn err(call: &'static str, code: &str) -> CloudError {
        CloudError::Ec2 {
            call,
            code: Some(code.into()),
            message: "fake".into(),
        }
    }

    fn non_primary(&self) -> Vec<NetworkInterface> {
        self.enis
            .lock()
            .unwrap()
            .values()
            .filter(|e| e.id != "eni-primary")
            .cloned()
            .collect()
    }
}

fn matches(e: &NetworkInterface, f: &Filter) -> bool {
    let v = &f.values;
    match f.name.as_str() {
        "network-interface-id" => v.contains(&e.id),
        "status" => v.contains(&e.status),
        "attachment.instance-id" => e
            .attachment
            .as_ref()
            .is_some_and(|a| v.contains(&a.instance_id)),
        n if n.starts_with("tag:") => e.tags.get(&n[4..]).is_some_and(|t| v.contains(t)),
        other => panic!("fake does not know filter {other}"),
    }
}

impl Cloud for FakeEc2 {
    async fn create_eni(&self, spec: &NewEni) -> Result<NetworkInterface, CloudError> {
        self.gate().await;
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let eni = NetworkInterface {
            interface_type: "interface".into(),
            id: format!("eni-{n:04}"),
            mac: format!("02:00:00:00:{:02x}:{:02x}", n / 256, n % 256),
            subnet_id: spec.subnet_id.clone(),
            vpc_id: "vpc-1".into(),
            status: "available".into(),
            description: spec.description.clone(),
            primary_ip: self.new_ip(),
            secondary_ips: (0..spec.secondary_ip_count)
                .map(|_| self.new_ip())
                .collect(),
            prefixes: vec![],
            security_groups: spec.security_groups.clone(),
            tags: spec.tags.clone(),
            attachment: None,
        };
        self.enis
            .lock()
            .unwrap()
            .insert(eni.id.clone(), eni.clone());
        Ok(eni)
    }
    async fn attach(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
    ) -> Result<String, CloudError> {
        self.gate().await;
        let mut enis = self.enis.lock().unwrap();
        if enis.values().filter(|e| e.attachment.is_some()).count() >= 3 {
            return Err(Self::err(
                "AttachNetworkInterface",
                "AttachmentLimitExceeded",
            ));
        }
        let e = enis.get_mut(eni_id).ok_or_else(|| {
            Self::err(
                "AttachNetworkInterface",
                "InvalidNetworkInterfaceID.NotFound",
            )
        })?;
        e.status = "in-use".into();
        e.attachment = Some(EniAttachment {
            attachment_id: format!("attach-{eni_id}"),
            instance_id: instance_id.into(),
            device_index,
            status: "attached".into(),
            delete_on_termination: false,
        });
        Ok(format!("attach-{eni_id}"))
    }
    async fn set_delete_on_termination(
        &self,
        eni_id: &str,
        _attachment_id: &str,
    ) -> Result<(), CloudError> {
        self.gate().await;
        if let Some(a) = self
            .enis
            .lock()
            .unwrap()
            .get_mut(eni_id)
            .and_then(|e| e.attachment.as_mut())
        {
            a.delete_on_termination = true;
        }
        Ok(())
    }
    async fn detach(&self, attachment_id: &str) -> Result<(), CloudError> {
        self.gate().await;
        let mut enis = self.enis.lock().unwrap();
        for e in enis.values_mut() {
            if e.attachment
                .as_ref()
                .is_some_and(|a| a.attachment_id == attachment_id)
            {
                e.attachment = None;
                e.status = "available".into();
                return Ok(());
            }
        }
        Err(Self::err(
            "DetachNetworkInterface",
            "InvalidAttachmentID.NotFound",
        ))
    }
    async fn delete_eni(&self, eni_id: &str) -> Result<(), CloudError> {
        self.gate().await;
        let mut enis = self.enis.lock().unwrap();
        match enis.get(eni_id) {
            None => Err(Self::err(
                "DeleteNetworkInterface",
                "InvalidNetworkInterfaceID.NotFound",
            )),
            Some(e) if e.attachment.is_some() => Err(Self::err(
                "DeleteNetworkInterface",
                "InvalidNetworkInterface.InUse",
            )),
            Some(_) => {
                enis.remove(eni_id);
                Ok(())
            }
        }
    }
    async fn assign_ips(&self, eni_id: &str, count: u32) -> Result<Vec<Ipv4Addr>, CloudError> {
        self.gate().await;
        if self.subnet_full.load(Ordering::SeqCst) {
            return Err(Self::err(
                "AssignPrivateIpAddresses",
                "InsufficientFreeAddressesInSubnet",
            ));
        }
        let mut enis = self.enis.lock().unwrap();
        let e = enis.get_mut(eni_id).ok_or_else(|| {
            Self::err(
                "AssignPrivateIpAddresses",
                "InvalidNetworkInterfaceID.NotFound",
            )
        })?;
        if e.secondary_ips.len() as u32 + count > self.ips_per_eni {
            return Err(Self::err(
                "AssignPrivateIpAddresses",
                "PrivateIpAddressLimitExceeded",
            ));
        }
        let new: Vec<_> = (0..count).map(|_| self.new_ip()).collect();
        e.secondary_ips.extend(&new);
        Ok(new)
    }
    async fn unassign_ips(&self, eni_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError> {
        self.gate().await;
        let mut enis = self.enis.lock().unwrap();
        let e = enis.get_mut(eni_id).unwrap();
        e.secondary_ips.retain(|ip| !ips.contains(ip));
        Ok(())
    }
    async fn describe_enis(&self, filters: &[Filter]) -> Result<Vec<NetworkInterface>, CloudError> {
        self.gate().await;
        Ok(self
            .enis
            .lock()
            .unwrap()
            .values()
            .filter(|e| filters.iter().all(|f| matches(e, f)))
            .cloned()
            .collect())
    }
    async fn instance_limits(&self, _t: &str) -> Result<InstanceTypeLimits, CloudError> {
        Ok(InstanceTypeLimits {
            max_enis: 3,
            ipv4_per_eni: self.ips_per_eni + 1,
        })
    }
}

#[derive(Debug, Default)]
struct FakeNode {
    setups: Mutex<Vec<u32>>,
}

impl NodeNet for FakeNode {
    fn setup_eni(&self, e: &dataplane::EniSetup) -> Result<String, NodeError> {
        self.setups.lock().unwrap().push(e.device_number);
        Ok(format!("eth{}", e.device_number))
    }
    fn teardown_eni(&self, _d: u32, _ip: Ipv4Addr) -> Result<(), NodeError> {
        Ok(())
    }
}

fn settings(targets: Targets) -> Settings {
    Settings {
        targets,
        limits: Limits {
            max_enis: 3,
            ips_per_eni: 4,
            max_pods: 14,
        },
        min_eni_age: Duration::ZERO,
        decrease_interval: Duration::ZERO,
        subnet_full_backoff: Duration::from_secs(120),
        interval: Duration::from_secs(5),
        reserved_devices: vec![],
    }
}

fn node() -> NodeIdentity {
    NodeIdentity {
        instance_id: INSTANCE.into(),
        instance_type: "m5.large".into(),
        subnet_id: "subnet-a".into(),
        subnet: "10.0.0.0/16".parse().unwrap(),
        security_groups: vec!["sg-1".into()],
        eni_mtu: 9001,
        cluster_name: Some("lab".into()),
        additional_tags: BTreeMap::new(),
    }
}

/// A node whose pool is built from the fake's attached ENIs and the checkpoint, as at start.
fn boot(
    ec2: &Arc<FakeEc2>,
    dir: &std::path::Path,
    targets: Targets,
) -> Arc<Provisioner<FakeEc2, FakeNode>> {
    boot_with(ec2, dir, settings(targets))
}

fn boot_with(
    ec2: &Arc<FakeEc2>,
    dir: &std::path::Path,
    settings: Settings,
) -> Arc<Provisioner<FakeEc2, FakeNode>> {
    let mut pool = Pool::new(0);
    for e in ec2.enis.lock().unwrap().values() {
        if let Some(a) = &e.attachment {
            pool.add_eni(
                EniInfo {
                    id: e.id.clone(),
                    device_number: a.device_index,
                    subnet: "10.0.0.0/16".parse().unwrap(),
                    primary_ip: e.primary_ip,
                },
                &e.secondary_ips,
            )
            .unwrap();
        }
    }
    let path = dir.join("ipam.json");
    let mut st = State::new(pool, vec![], path.clone(), String::new());
    st.restore(&checkpoint::load(&path).unwrap());
    Arc::new(Provisioner::new(
        ec2.clone(),
        Arc::new(FakeNode::default()),
        Arc::new(Mutex::new(st)),
        node(),
        settings,
    ))
}

async fn converge(p: &Provisioner<FakeEc2, FakeNode>) -> Vec<Action> {
    let mut done = Vec::new();
    while let Some(a) = p.step().await.unwrap() {
        done.push(a);
        assert!(done.len() < 50, "no fixed point: {done:?}");
    }
    done
}

const WARM_ENI: Targets = Targets {
    warm_eni: 1,
    warm_ip: None,
    min_ip: None,
};

#[tokio::test]
async fn scales_up_with_tags_and_reports_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(4));
    let p = boot(&ec2, dir.path(), WARM_ENI);
    converge(&p).await;
    // Primary ENI filled to its 4 secondaries: the warm target (one ENI's worth) is met.
    assert_eq!(p.state.lock().unwrap().pool().stats(0).total, 4);
    // 12 pods: all 3 ENIs get used, and the 13th ADD is told why.
    for i in 0..12 {
        add_pod(&p, i).await;
    }
    let enis = ec2.non_primary();
    assert_eq!(enis.len(), 2);
    for e in &enis {
        assert_eq!(e.tags[TAG_INSTANCE], INSTANCE);
        assert_eq!(e.tags[TAG_CLUSTER], "lab");
        assert!(e.tags[TAG_CREATED].ends_with('Z'));
        assert!(e.attachment.as_ref().unwrap().delete_on_termination);
    }
    let key = proto::AttachmentKey {
        network: "n".into(),
        container_id: "one-too-many".into(),
        ifname: "eth0".into(),
    };
    let add = || {
        p.state.lock().unwrap().handle(proto::Request::Add {
            key: key.clone(),
            pod: Default::default(),
            netns: String::new(),
        })
    };
    // The node is full: the very first refused ADD already says why.
    let r = add();
    assert!(
        matches!(&r, proto::Response::Error { code: 11, message } if message.contains("node at its limit of 12 pod IPs: 3 ENIs × 4 secondary IPs for m5.large")),
        "{r:?}"
    );
}

#[tokio::test]
async fn device_indexes_of_unmanaged_enis_are_never_used() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(4));
    // Device 1 holds an ENI that is not ours (no_manage, trunk, EFA): one slot fewer.
    let mut s = settings(WARM_ENI);
    s.reserved_devices = vec![1];
    s.limits.max_enis = 2;
    s.limits.max_pods = 8;
    let p = boot_with(&ec2, dir.path(), s);
    converge(&p).await;
    for i in 0..8 {
        add_pod(&p, i).await;
    }
    let enis = ec2.non_primary();
    assert_eq!(enis.len(), 1);
    assert_eq!(enis[0].attachment.as_ref().unwrap().device_index, 2);
}

#[test]
fn unmanaged_enis_are_those_aws_node_leaves_alone() {
    use crate::cloud_api::unmanaged_reason;
    let ec2_eni = |_: &str| FakeEc2::new(1).enis.lock().unwrap()["eni-primary"].clone();
    let mut e = ec2_eni("eni-x");
    assert_eq!(unmanaged_reason(&e), None);
    e.tags.insert(TAG_NO_MANAGE.into(), "false".into());
    assert_eq!(unmanaged_reason(&e), None);
    e.tags.insert(TAG_NO_MANAGE.into(), "true".into());
    assert!(unmanaged_reason(&e).unwrap().contains("no_manage"));
    for t in ["trunk", "efa", "efa-only"] {
        let mut e = ec2_eni("eni-y");
        e.interface_type = t.into();
        assert!(unmanaged_reason(&e).unwrap().contains(t), "{t}");
    }
}

#[tokio::test]
async fn a_crash_at_any_ec2_call_of_an_eni_create_or_delete_leaks_nothing() {
    // Calls while creating an ENI: CreateNetworkInterface, AttachNetworkInterface,
    // ModifyNetworkInterfaceAttribute. Crash at each, restart, recover.
    for hang in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let ec2 = Arc::new(FakeEc2::new(4));
        {
            let p = boot(&ec2, dir.path(), WARM_ENI);
            converge(&p).await; // fills the primary ENI
            p.state.lock().unwrap().pending = 8; // demand that needs a second ENI
            *ec2.hang_at.lock().unwrap() = Some(ec2.calls.load(Ordering::SeqCst) + hang);
            let r = tokio::time::timeout(Duration::from_millis(200), p.step()).await;
            assert!(r.is_err(), "the step should hang at call +{hang}");
        }
        *ec2.hang_at.lock().unwrap() = None;
        let p = boot(&ec2, dir.path(), WARM_ENI);
        p.recover().await.unwrap();
        // Either undone (gone from EC2) or finished (attached, in the pool, deleted with the
        // instance): never an ENI the node does not track.
        for e in ec2.non_primary() {
            let att = e
                .attachment
                .as_ref()
                .unwrap_or_else(|| panic!("crash at call +{hang} leaked {e:?}"));
            assert!(att.delete_on_termination, "crash at call +{hang}: {e:?}");
            assert!(
                p.state.lock().unwrap().pool().has_eni(&e.id),
                "crash at call +{hang}: untracked {e:?}"
            );
        }
        assert!(p.state.lock().unwrap().intents.is_empty());
        assert!(
            checkpoint::load(&dir.path().join("ipam.json"))
                .unwrap()
                .intents
                .is_empty()
        );
    }

    // Calls while deleting: DescribeNetworkInterfaces, DetachNetworkInterface,
    // DescribeNetworkInterfaces (wait), DeleteNetworkInterface.
    for hang in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let ec2 = Arc::new(FakeEc2::new(4));
        {
            let p = boot(&ec2, dir.path(), WARM_ENI);
            for i in 0..4 {
                add_pod(&p, i).await;
            }
            converge(&p).await;
            assert_eq!(ec2.non_primary().len(), 1);
            for i in 0..4 {
                p.state
                    .lock()
                    .unwrap()
                    .handle(proto::Request::Del { key: key(i) });
            }
            *ec2.hang_at.lock().unwrap() = Some(ec2.calls.load(Ordering::SeqCst) + hang);
            let r = tokio::time::timeout(Duration::from_millis(200), p.step()).await;
            assert!(r.is_err(), "the delete should hang at call +{hang}");
        }
        *ec2.hang_at.lock().unwrap() = None;
        let p = boot(&ec2, dir.path(), WARM_ENI);
        p.recover().await.unwrap();
        // The delete was decided before the crash: recovery finishes it.
        assert!(
            ec2.non_primary().is_empty(),
            "crash at delete call +{hang} left {:?}",
            ec2.non_primary()
        );
    }
}

#[tokio::test]
async fn leaked_enis_of_this_instance_are_deleted_and_others_kept() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(4));
    let mine = ec2
        .create_eni(&NewEni {
            subnet_id: "subnet-a".into(),
            tags: [(TAG_INSTANCE.to_string(), INSTANCE.to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let other = ec2
        .create_eni(&NewEni {
            subnet_id: "subnet-a".into(),
            tags: [(TAG_INSTANCE.to_string(), "i-other".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let p = boot(&ec2, dir.path(), WARM_ENI);
    p.recover().await.unwrap();
    let left: Vec<String> = ec2.non_primary().into_iter().map(|e| e.id).collect();
    assert_eq!(left, vec![other.id], "{} should be gone", mine.id);
}

fn key(i: usize) -> proto::AttachmentKey {
    proto::AttachmentKey {
        network: "n".into(),
        container_id: format!("c{i}"),
        ifname: "eth0".into(),
    }
}

/// Adds pod `i`, provisioning whenever the pool is empty, as the agent's loop would.
async fn add_pod(p: &Provisioner<FakeEc2, FakeNode>, i: usize) {
    for _ in 0..10 {
        let r = p.state.lock().unwrap().handle(proto::Request::Add {
            key: key(i),
            pod: Default::default(),
            netns: String::new(),
        });
        if matches!(r, proto::Response::Added { .. }) {
            return;
        }
        converge(p).await;
    }
    panic!("pod {i} never got an address");
}

#[tokio::test]
async fn warm_ip_mode_releases_surplus_and_deletes_empty_enis() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(4));
    let t = Targets {
        warm_eni: 1,
        warm_ip: Some(2),
        min_ip: None,
    };
    let p = boot(&ec2, dir.path(), t);
    for i in 0..7 {
        add_pod(&p, i).await;
    }
    converge(&p).await;
    assert_eq!(
        ec2.non_primary().len(),
        2,
        "7 pods + 2 warm need 3 ENIs of 4"
    );
    for i in 0..7 {
        p.state
            .lock()
            .unwrap()
            .handle(proto::Request::Del { key: key(i) });
    }
    // Cooldown is 0 here: back to 2 warm addresses on the primary ENI, the others deleted.
    converge(&p).await;
    assert!(ec2.non_primary().is_empty(), "{:?}", ec2.non_primary());
    assert_eq!(p.state.lock().unwrap().pool().stats(0).total, 2);
    let primary = &ec2.enis.lock().unwrap()["eni-primary"];
    assert_eq!(primary.secondary_ips.len(), 2, "EC2 agrees");
}

#[tokio::test]
async fn a_lost_assign_answer_is_recovered_from_ec2() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(4));
    // EC2 already holds 3 addresses on the primary ENI that the node never heard about.
    ec2.assign_ips("eni-primary", 3).await.unwrap();
    let p = boot(&ec2, dir.path(), WARM_ENI);
    p.state
        .lock()
        .unwrap()
        .pool_mut()
        .remove_ips(
            "eni-primary",
            &ec2.enis.lock().unwrap()["eni-primary"]
                .secondary_ips
                .clone(),
            0,
        )
        .unwrap();
    // The planner asks for 4; EC2 refuses (limit); the pool then takes EC2's 3 and asks for 1.
    assert!(p.step().await.is_err());
    assert_eq!(p.state.lock().unwrap().pool().stats(0).total, 3);
    converge(&p).await;
    assert_eq!(p.state.lock().unwrap().pool().stats(0).total, 4);
}

#[tokio::test]
async fn a_full_subnet_is_named_in_add_errors_and_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(4));
    ec2.subnet_full.store(true, Ordering::SeqCst);
    let p = boot(&ec2, dir.path(), WARM_ENI);
    let err = p.step().await.unwrap_err();
    assert!(
        err.to_string()
            .contains("InsufficientFreeAddressesInSubnet"),
        "{err}"
    );
    let r = p.state.lock().unwrap().handle(proto::Request::Add {
        key: key(0),
        pod: Default::default(),
        netns: String::new(),
    });
    assert!(
        matches!(&r, proto::Response::Error { code: 11, message } if message.contains("subnet subnet-a has no free addresses")),
        "{r:?}"
    );
    // Within the back-off, no more requests for addresses are sent.
    let calls = ec2.calls.load(Ordering::SeqCst);
    assert!(p.step().await.unwrap().is_none());
    assert_eq!(ec2.calls.load(Ordering::SeqCst), calls);
}

#[test]
fn created_at_tag_is_rfc3339() {
    assert_eq!(rfc3339(0).as_deref(), Some("1970-01-01T00:00:00Z"));
    assert_eq!(
        rfc3339(1_764_070_000_000).as_deref(),
        Some("2025-11-25T11:26:40Z")
    );
    // Whole seconds: milliseconds are dropped, not rounded.
    assert_eq!(
        rfc3339(1_764_070_000_999).as_deref(),
        Some("2025-11-25T11:26:40Z")
    );
}
