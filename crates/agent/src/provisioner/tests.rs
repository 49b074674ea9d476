//! Provisioner tests against an in-memory EC2 that enforces limits and can "crash" (never
//! answer) at any call, to prove that a restart leaks no ENI; that can be changed behind the
//! agent's back (addresses unassigned, ENIs detached), to prove the reconcile; and that can
//! misbehave (refuse, time out, answer garbage, throttle), to prove the loop survives it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cloud::{
    CloudError, EniAttachment, Filter, InstanceTypeInfo, InstanceTypeLimits, NetworkInterface,
    NewEni,
};
use ipam::planner::{Action, Limits, Targets};
use ipam::{EniInfo, Pool};
use ipnet::Ipv4Net;

use super::*;
use crate::checkpoint;
use crate::cloud_api::{Cloud, TAG_NO_MANAGE};
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
    /// Every call fails this way (as `cloud::Ec2` reports it).
    misbehave: Mutex<Option<Misbehave>>,
    /// The next DescribeNetworkInterfaces by attachment leaves these ENIs out (a stale answer).
    hide_once: Mutex<Vec<String>>,
    /// Addresses EC2 hands out next (free in the subnet again), before new ones.
    reuse: Mutex<Vec<Ipv4Addr>>,
    /// The subnet has no free /28: prefix requests fail with InsufficientCidrBlocks.
    fragmented: std::sync::atomic::AtomicBool,
    next_prefix: AtomicUsize,
    /// DescribeSubnets' answers, by id.
    subnets: Mutex<BTreeMap<String, cloud::Subnet>>,
}

/// How EC2 fails every call, as the SDK client reports it after its timeouts and retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Misbehave {
    /// Connection refused (no answer, no error code).
    Refuse,
    /// The endpoint hangs: the SDK's operation timeout (40 s) ends the call.
    Timeout,
    /// An answer that does not parse.
    Garbage,
    /// Throttled past the SDK's retries.
    Throttle,
}

impl Misbehave {
    const ALL: [Misbehave; 4] = [
        Misbehave::Refuse,
        Misbehave::Timeout,
        Misbehave::Garbage,
        Misbehave::Throttle,
    ];

    fn error(self) -> CloudError {
        let call = "DescribeNetworkInterfaces";
        match self {
            Misbehave::Refuse => CloudError::Ec2 {
                call,
                code: None,
                message: "dispatch failure: io error: Connection refused (os error 111)".into(),
            },
            Misbehave::Timeout => CloudError::Ec2 {
                call,
                code: None,
                message:
                    "timeout: operation timeout (all attempts including retries) occurred after 40s"
                        .into(),
            },
            Misbehave::Garbage => CloudError::Ec2Answer {
                call,
                field: "NetworkInterfaces[0].PrivateIpAddress".into(),
                problem: "is \"10.0.0.x\", not an IPv4 address".into(),
            },
            Misbehave::Throttle => FakeEc2::err(call, "RequestLimitExceeded"),
        }
    }
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

    async fn gate(&self) -> Result<(), CloudError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let hang = self.hang_at.lock().unwrap().is_some_and(|h| n >= h);
        if hang {
            std::future::pending::<()>().await;
        }
        match *self.misbehave.lock().unwrap() {
            Some(m) => Err(m.error()),
            None => Ok(()),
        }
    }

    /// Someone unassigns `ip` from its ENI (console, another tool).
    fn unassign_behind(&self, ip: Ipv4Addr) {
        for e in self.enis.lock().unwrap().values_mut() {
            e.secondary_ips.retain(|i| *i != ip);
        }
    }

    /// Someone assigns `ip` to `eni`.
    fn assign_behind(&self, eni: &str, ip: Ipv4Addr) {
        self.enis
            .lock()
            .unwrap()
            .get_mut(eni)
            .unwrap()
            .secondary_ips
            .push(ip);
    }

    /// Someone detaches `eni` from the instance.
    fn detach_behind(&self, eni: &str) {
        let mut enis = self.enis.lock().unwrap();
        let e = enis.get_mut(eni).unwrap();
        e.attachment = None;
        e.status = "available".into();
    }

    fn attached_device(&self, eni: &str) -> Option<u32> {
        self.enis.lock().unwrap()[eni]
            .attachment
            .as_ref()
            .map(|a| a.device_index)
    }

    fn new_ip(&self) -> Ipv4Addr {
        if let Some(ip) = self.reuse.lock().unwrap().pop() {
            return ip;
        }
        let n = self.next.fetch_add(1, Ordering::SeqCst) as u32;
        Ipv4Addr::from(0x0a00_1000 + n)
    }

    /// AssignPrivateIpAddresses of `count` more slots on `eni_id`, as EC2 refuses it (unknown
    /// ENI, no room); `f` adds them.
    fn with_room<T>(
        &self,
        eni_id: &str,
        count: u32,
        f: impl FnOnce(&mut NetworkInterface) -> Vec<T>,
    ) -> Result<Vec<T>, CloudError> {
        const CALL: &str = "AssignPrivateIpAddresses";
        let mut enis = self.enis.lock().unwrap();
        let e = enis
            .get_mut(eni_id)
            .ok_or_else(|| Self::err(CALL, "InvalidNetworkInterfaceID.NotFound"))?;
        if (e.secondary_ips.len() + e.prefixes.len()) as u32 + count > self.ips_per_eni {
            return Err(Self::err(CALL, "PrivateIpAddressLimitExceeded"));
        }
        Ok(f(e))
    }

    /// UnassignPrivateIpAddresses of `these` from the list `list` picks of `eni_id`, as EC2
    /// refuses it (unknown ENI, an item it does not hold).
    fn unassign_from<T: PartialEq>(
        enis: &mut BTreeMap<String, NetworkInterface>,
        eni_id: &str,
        list: impl FnOnce(&mut NetworkInterface) -> &mut Vec<T>,
        these: &[T],
    ) -> Result<(), CloudError> {
        const CALL: &str = "UnassignPrivateIpAddresses";
        let e = enis
            .get_mut(eni_id)
            .ok_or_else(|| Self::err(CALL, "InvalidNetworkInterfaceID.NotFound"))?;
        let held = list(e);
        if these.iter().any(|x| !held.contains(x)) {
            return Err(Self::err(CALL, "InvalidParameterValue"));
        }
        held.retain(|x| !these.contains(x));
        Ok(())
    }

    fn new_prefix(&self) -> Ipv4Net {
        let n = self.next_prefix.fetch_add(1, Ordering::SeqCst) as u32;
        Ipv4Net::new(Ipv4Addr::from(0x0a00_8000 + 16 * n), 28).expect("a /28")
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
    async fn create_eni(
        &self,
        spec: &NewEni,
        prefixes: u32,
    ) -> Result<NetworkInterface, CloudError> {
        self.gate().await?;
        if prefixes > 0 && self.fragmented.load(Ordering::SeqCst) {
            return Err(Self::err(
                "CreateNetworkInterface",
                "InsufficientCidrBlocks",
            ));
        }
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
            prefixes: (0..prefixes).map(|_| self.new_prefix()).collect(),
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
        self.gate().await?;
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
        self.gate().await?;
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
        self.gate().await?;
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
        self.gate().await?;
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
        self.gate().await?;
        if self.subnet_full.load(Ordering::SeqCst) {
            return Err(Self::err(
                "AssignPrivateIpAddresses",
                "InsufficientFreeAddressesInSubnet",
            ));
        }
        self.with_room(eni_id, count, |e| {
            let new: Vec<_> = (0..count).map(|_| self.new_ip()).collect();
            e.secondary_ips.extend(&new);
            new
        })
    }
    async fn unassign_ips(&self, eni_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError> {
        self.gate().await?;
        Self::unassign_from(
            &mut self.enis.lock().unwrap(),
            eni_id,
            |e| &mut e.secondary_ips,
            ips,
        )
    }
    async fn describe_enis(&self, filters: &[Filter]) -> Result<Vec<NetworkInterface>, CloudError> {
        self.gate().await?;
        let hide: Vec<String> = if filters.iter().any(|f| f.name == "attachment.instance-id") {
            std::mem::take(&mut *self.hide_once.lock().unwrap())
        } else {
            Vec::new()
        };
        Ok(self
            .enis
            .lock()
            .unwrap()
            .values()
            .filter(|e| filters.iter().all(|f| matches(e, f)) && !hide.contains(&e.id))
            .cloned()
            .collect())
    }
    async fn assign_prefixes(&self, eni_id: &str, count: u32) -> Result<Vec<Ipv4Net>, CloudError> {
        self.gate().await?;
        if self.fragmented.load(Ordering::SeqCst) {
            return Err(Self::err(
                "AssignPrivateIpAddresses",
                "InsufficientCidrBlocks",
            ));
        }
        self.with_room(eni_id, count, |e| {
            let new: Vec<_> = (0..count).map(|_| self.new_prefix()).collect();
            e.prefixes.extend(&new);
            new
        })
    }
    async fn unassign_prefixes(
        &self,
        eni_id: &str,
        prefixes: &[Ipv4Net],
    ) -> Result<(), CloudError> {
        self.gate().await?;
        Self::unassign_from(
            &mut self.enis.lock().unwrap(),
            eni_id,
            |e| &mut e.prefixes,
            prefixes,
        )
    }
    async fn describe_subnet(&self, subnet_id: &str) -> Result<cloud::Subnet, CloudError> {
        self.gate().await?;
        self.subnets
            .lock()
            .unwrap()
            .get(subnet_id)
            .cloned()
            .ok_or_else(|| Self::err("DescribeSubnets", "InvalidSubnetID.NotFound"))
    }
    async fn instance_type_info(&self, _t: &str) -> Result<InstanceTypeInfo, CloudError> {
        Ok(InstanceTypeInfo {
            limits: InstanceTypeLimits {
                max_enis: 3,
                ipv4_per_eni: self.ips_per_eni + 1,
            },
            hypervisor: Some("nitro".into()),
            vcpus: Some(2),
        })
    }
}

#[derive(Debug, Default)]
struct FakeNode {
    setups: Mutex<Vec<u32>>,
    teardowns: Mutex<Vec<u32>>,
}

impl NodeNet for FakeNode {
    fn setup_eni(&self, e: &dataplane::EniSetup) -> Result<String, NodeError> {
        self.setups.lock().unwrap().push(e.device_number);
        Ok(format!("eth{}", e.device_number))
    }
    fn teardown_eni(&self, d: u32, _ip: Ipv4Addr) -> Result<(), NodeError> {
        self.teardowns.lock().unwrap().push(d);
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
        reconcile_interval: Duration::from_secs(60),
        reconcile_grace: Duration::ZERO,
        prefix_retry: Duration::from_secs(60),
    }
}

fn node() -> NodeIdentity {
    NodeIdentity {
        instance_id: INSTANCE.into(),
        instance_type: "m5.large".into(),
        subnet_id: "subnet-a".into(),
        subnet: "10.0.0.0/16".parse().unwrap(),
        security_groups: vec!["sg-1".into()],
        availability_zone: "us-west-2a".into(),
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
            for prefix in &e.prefixes {
                pool.add_prefix(&e.id, *prefix, &ipam::prefix_addresses(*prefix))
                    .unwrap();
            }
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

/// Converges again after each decrease interval (prefix_settings' 300 ms) until nothing
/// changes: releases come one call per interval.
async fn settle(p: &Provisioner<FakeEc2, FakeNode>) {
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(350)).await;
        if converge(p).await.is_empty() {
            return;
        }
    }
    panic!("the pool does not settle");
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
    prefixes: false,
    warm_prefix: 0,
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
        .create_eni(
            &NewEni {
                subnet_id: "subnet-a".into(),
                tags: [(TAG_INSTANCE.to_string(), INSTANCE.to_string())].into(),
                ..Default::default()
            },
            0,
        )
        .await
        .unwrap();
    let other = ec2
        .create_eni(
            &NewEni {
                subnet_id: "subnet-a".into(),
                tags: [(TAG_INSTANCE.to_string(), "i-other".to_string())].into(),
                ..Default::default()
            },
            0,
        )
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

/// The id of the ENI holding pod `i`'s address.
fn eni_of(p: &Provisioner<FakeEc2, FakeNode>, i: usize) -> String {
    p.state
        .lock()
        .unwrap()
        .pool()
        .lookup(&key(i))
        .unwrap()
        .eni
        .id
}

/// A node with five pods: four on the primary ENI, the fifth on the ENI at device 1.
async fn five_pods() -> (
    tempfile::TempDir,
    Arc<FakeEc2>,
    Arc<Provisioner<FakeEc2, FakeNode>>,
) {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(4));
    let p = boot(&ec2, dir.path(), WARM_ENI);
    for i in 0..5 {
        add_pod(&p, i).await;
    }
    (dir, ec2, p)
}

#[tokio::test]
async fn warm_ip_mode_releases_surplus_and_deletes_empty_enis() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(4));
    let t = Targets {
        warm_ip: Some(2),
        ..WARM_ENI
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

// ---- the world changing under the agent --------------------------------------------------

fn ip_of(p: &Provisioner<FakeEc2, FakeNode>, i: usize) -> Ipv4Addr {
    p.state.lock().unwrap().pool().lookup(&key(i)).unwrap().ip
}

fn handle(p: &Provisioner<FakeEc2, FakeNode>, req: proto::Request) -> proto::Response {
    p.state.lock().unwrap().handle(req)
}

fn add_req(i: usize) -> proto::Request {
    proto::Request::Add {
        key: key(i),
        pod: proto::PodRef {
            namespace: "default".into(),
            name: format!("pod{i}"),
            infra_container_id: None,
        },
        netns: String::new(),
    }
}

fn metrics(p: &Provisioner<FakeEc2, FakeNode>) -> (String, serde_json::Value) {
    let shared = crate::http::Shared {
        state: p.state.clone(),
        counters: Arc::new(crate::http::Counters::default()),
        ec2: None,
        limits: None,
    };
    (
        crate::http::render_metrics(&shared),
        crate::http::introspection(&shared),
    )
}

fn has_line(text: &str, line: &str) {
    assert!(
        text.lines().any(|l| l == line),
        "missing {line:?} in\n{text}"
    );
}

/// Every address the pool could hand out or has handed out, and the lost ones.
fn pool_ips(p: &Provisioner<FakeEc2, FakeNode>) -> Vec<Ipv4Addr> {
    let st = p.state.lock().unwrap();
    st.pool()
        .enis()
        .iter()
        .flat_map(|e| st.pool().ips_of(&e.id))
        .collect()
}

#[tokio::test]
async fn an_address_unassigned_outside_the_agent_is_lost_until_its_pod_goes() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(4));
    let p = boot(&ec2, dir.path(), WARM_ENI);
    converge(&p).await;
    for i in 0..2 {
        assert!(matches!(
            handle(&p, add_req(i)),
            proto::Response::Added { .. }
        ));
    }
    let (lost_ip, kept_ip) = (ip_of(&p, 0), ip_of(&p, 1));
    let free_ip = pool_ips(&p)
        .into_iter()
        .find(|ip| ![lost_ip, kept_ip].contains(ip))
        .unwrap();
    // Someone unassigns pod 0's address and a free one.
    ec2.unassign_behind(lost_ip);
    ec2.unassign_behind(free_ip);
    let r = p.reconcile().await.unwrap();
    assert_eq!(
        r.lost,
        vec![(key(0), lost_ip, ipam::LostReason::Unassigned)]
    );
    assert_eq!(r.removed, vec![free_ip]);
    assert!(r.enis_detached.is_empty());
    let s = p.state.lock().unwrap().pool().stats(0);
    assert_eq!((s.total, s.assigned, s.available, s.lost), (2, 1, 1, 1));

    // Reported: metrics, introspection, STATUS; CHECK and a repeated ADD say what happened.
    let (text, state) = metrics(&p);
    has_line(
        &text,
        "vpccni_lost_addresses_total{reason=\"unassigned\"} 1",
    );
    has_line(
        &text,
        "vpccni_lost_addresses_total{reason=\"eni_detached\"} 0",
    );
    has_line(&text, "vpccni_lost_ip_addresses 1");
    has_line(&text, "awscni_force_removed_ips 1");
    assert_eq!(state["lost"][0]["ip"], lost_ip.to_string());
    assert_eq!(state["lost"][0]["reason"], "unassigned");
    assert_eq!(state["lost"][0]["pod"], "pod0");
    assert_eq!(state["lost"][0]["eni"], "eni-primary");
    assert_eq!(state["drift"]["removedFree"], 1);
    let r = handle(&p, proto::Request::Check { key: key(0) });
    assert!(
        matches!(&r, proto::Response::Error { code: 999, message } if message.contains(&lost_ip.to_string()) && message.contains("unassigned outside the agent")),
        "{r:?}"
    );
    let r = handle(&p, add_req(0));
    assert!(
        matches!(&r, proto::Response::Error { code: 11, message } if message.contains("until the pod is deleted")),
        "{r:?}"
    );
    let r = handle(&p, proto::Request::Status);
    assert!(
        matches!(&r, proto::Response::Status(s) if s.message.contains("1 lost")),
        "{r:?}"
    );

    // The pool recovers: the planner asks EC2 for more, and no pod ever gets the lost address.
    converge(&p).await;
    assert!(p.state.lock().unwrap().pool().stats(0).available >= 4);
    for i in 2..12 {
        add_pod(&p, i).await;
        assert_ne!(ip_of(&p, i), lost_ip, "pod {i} got the lost address");
    }
    assert!(!pool_ips(&p).contains(&lost_ip));

    // Pod 0's DEL releases it without returning it to the pool; the checkpoint agrees.
    match handle(&p, proto::Request::Del { key: key(0) }) {
        proto::Response::Deleted { released: Some(a) } => assert_eq!(a.ip, lost_ip),
        other => panic!("{other:?}"),
    }
    assert!(!pool_ips(&p).contains(&lost_ip));
    assert_eq!(p.state.lock().unwrap().pool().stats(0).lost, 0);
    let saved = checkpoint::load(&dir.path().join("ipam.json")).unwrap();
    assert!(saved.allocations.iter().all(|a| a.ipv4 != lost_ip));
    // No pod holds it now: once EC2 lists it again, the reconcile takes it (cooling down).
    ec2.assign_behind("eni-primary", lost_ip);
    let r = p.reconcile().await.unwrap();
    assert_eq!(r.adopted, vec![lost_ip]);
    assert!(pool_ips(&p).contains(&lost_ip));
}

#[tokio::test]
async fn a_lost_address_survives_a_restart_still_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(4));
    let ip = {
        let p = boot(&ec2, dir.path(), WARM_ENI);
        converge(&p).await;
        handle(&p, add_req(0));
        let ip = ip_of(&p, 0);
        ec2.unassign_behind(ip);
        assert_eq!(p.reconcile().await.unwrap().lost.len(), 1);
        ip
    };
    // A restart: the checkpoint's allocation is on no ENI of the new pool.
    let p = boot(&ec2, dir.path(), WARM_ENI);
    assert!(!pool_ips(&p).contains(&ip));
    let (text, _) = metrics(&p);
    has_line(&text, "vpccni_lost_ip_addresses 1");
    // EC2 lists it again: the pod holds it again (as a start finding it would), not free.
    ec2.assign_behind("eni-primary", ip);
    let r = p.reconcile().await.unwrap();
    assert_eq!(r.relisted, vec![(key(0), ip)]);
    assert!(r.adopted.is_empty(), "{r:?}");
    assert_eq!(ip_of(&p, 0), ip);
    let (text, _) = metrics(&p);
    has_line(&text, "vpccni_lost_ip_addresses 0");
    // Its DEL then releases it as usual (into cooldown, in the pool).
    assert!(matches!(
        handle(&p, proto::Request::Del { key: key(0) }),
        proto::Response::Deleted { released: Some(_) }
    ));
    assert!(pool_ips(&p).contains(&ip));
}

#[tokio::test]
async fn a_lost_address_ec2_lists_again_is_its_pods_again_or_parked() {
    let (_dir, ec2, p) = five_pods().await;
    // Pods 0-3 on the primary ENI, pod 4 on the ENI at device 1 (three free there).
    let eni1 = eni_of(&p, 4);
    let (ip0, ip1) = (ip_of(&p, 0), ip_of(&p, 1));
    ec2.unassign_behind(ip0);
    ec2.unassign_behind(ip1);
    assert_eq!(p.reconcile().await.unwrap().lost.len(), 2);
    // Someone assigns pod 0's address to its ENI again: pod 0's again, working as before.
    ec2.assign_behind("eni-primary", ip0);
    let r = p.reconcile().await.unwrap();
    assert_eq!(r.relisted, vec![(key(0), ip0)]);
    assert!(matches!(
        handle(&p, proto::Request::Check { key: key(0) }),
        proto::Response::Checked { .. }
    ));
    // Pod 1's address on another ENI: it takes a slot there, still lost, never handed out.
    ec2.assign_behind(&eni1, ip1);
    let r = p.reconcile().await.unwrap();
    assert_eq!(r.relisted, vec![(key(1), ip1)]);
    {
        let st = p.state.lock().unwrap();
        let l = st.pool().lost_of(&key(1)).unwrap();
        assert_eq!(l.parked_on.as_deref(), Some(eni1.as_str()));
        assert_eq!(st.pool().stats(0).lost, 1);
        assert_eq!(st.drift.relisted, 2);
    }
    let (_, state) = metrics(&p);
    assert_eq!(state["lost"][0]["parkedOn"], eni1.as_str());
    for i in 5..12 {
        add_pod(&p, i).await;
        assert_ne!(ip_of(&p, i), ip1, "pod {i}");
    }
    // Pod 1 goes: its address cools down where EC2 has it, and serves the next pod.
    match handle(&p, proto::Request::Del { key: key(1) }) {
        proto::Response::Deleted { released: Some(a) } => assert_eq!(a.ip, ip1),
        other => panic!("{other:?}"),
    }
    assert_eq!(p.state.lock().unwrap().pool().stats(0).lost, 0);
    add_pod(&p, 12).await;
    assert_eq!(ip_of(&p, 12), ip1);
}

#[tokio::test]
async fn an_eni_detached_outside_the_agent_is_dropped_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(4));
    let p = boot(&ec2, dir.path(), WARM_ENI);
    for i in 0..6 {
        add_pod(&p, i).await;
    }
    converge(&p).await;
    // The primary ENI holds pods 0-3; pods 4 and 5 are on the ENI at device 1.
    let eni1 = p.state.lock().unwrap().pool().lookup(&key(4)).unwrap().eni;
    assert_eq!(eni1.device_number, 1);
    let lost: Vec<Ipv4Addr> = (4..6).map(|i| ip_of(&p, i)).collect();
    let eni1_ips = p.state.lock().unwrap().pool().ips_of(&eni1.id);

    ec2.detach_behind(&eni1.id);
    let r = p.reconcile().await.unwrap();
    assert_eq!(r.enis_detached, vec![eni1.id.clone()]);
    assert_eq!(
        r.lost,
        vec![
            (key(4), lost[0], ipam::LostReason::EniDetached),
            (key(5), lost[1], ipam::LostReason::EniDetached)
        ]
    );
    assert_eq!(r.removed.len(), 2, "its two free addresses");
    assert!(!p.state.lock().unwrap().pool().has_eni(&eni1.id));
    assert!(
        !ec2.enis.lock().unwrap().contains_key(&eni1.id),
        "the detached ENI, tagged with this instance, is deleted (a leak otherwise)"
    );
    assert_eq!(*p.net.teardowns.lock().unwrap(), vec![1]);
    let (text, state) = metrics(&p);
    has_line(
        &text,
        "vpccni_lost_addresses_total{reason=\"eni_detached\"} 2",
    );
    has_line(&text, "vpccni_lost_ip_addresses 2");
    has_line(&text, "awscni_force_removed_enis 1");
    assert_eq!(state["lost"][1]["reason"], "eni_detached");

    // The pool recovers: new pods fill the node again, a new ENI takes device index 1, and
    // none of the ENI's old addresses is handed out.
    for i in 6..14 {
        add_pod(&p, i).await;
        assert!(!eni1_ips.contains(&ip_of(&p, i)), "pod {i}");
    }
    let new_eni = ec2
        .non_primary()
        .into_iter()
        .filter(|e| e.id != eni1.id && e.attachment.is_some())
        .map(|e| e.id)
        .find(|id| ec2.attached_device(id) == Some(1));
    assert!(
        new_eni.is_some(),
        "device 1 reused: {:?}",
        ec2.non_primary()
    );

    // The lost pods' DELs release their addresses; they do not come back.
    for i in 4..6 {
        assert!(matches!(
            handle(&p, proto::Request::Del { key: key(i) }),
            proto::Response::Deleted { released: Some(_) }
        ));
    }
    let s = p.state.lock().unwrap().pool().stats(0);
    assert_eq!(s.lost, 0);
    for ip in &lost {
        assert!(!pool_ips(&p).contains(ip));
    }
}

#[tokio::test]
async fn a_gc_releases_lost_addresses_too() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(4));
    let p = boot(&ec2, dir.path(), WARM_ENI);
    converge(&p).await;
    handle(&p, add_req(0));
    handle(&p, add_req(1));
    let ip = ip_of(&p, 0);
    ec2.unassign_behind(ip);
    p.reconcile().await.unwrap();
    let r = handle(
        &p,
        proto::Request::Gc {
            network: "n".into(),
            valid: vec![key(1)],
        },
    );
    assert_eq!(
        r,
        proto::Response::Collected {
            released: vec![(key(0), ip)]
        }
    );
    assert_eq!(p.state.lock().unwrap().pool().stats(0).lost, 0);
    assert!(!pool_ips(&p).contains(&ip));
}

#[tokio::test]
async fn a_stale_or_implausible_answer_changes_nothing() {
    let (_dir, ec2, p) = five_pods().await;
    let eni1 = eni_of(&p, 4);
    let before = p.state.lock().unwrap().pool().stats(0);
    // The list by attachment leaves the ENI out once; asked by id, EC2 shows it attached.
    ec2.hide_once.lock().unwrap().push(eni1.clone());
    let r = p.reconcile().await.unwrap();
    assert!(!r.changed(), "{r:?}");
    assert_eq!(r.deferred, 1);
    assert_eq!(p.state.lock().unwrap().pool().stats(0), before);
    // An answer without the primary ENI (which cannot be detached) is not believed.
    ec2.hide_once.lock().unwrap().push("eni-primary".into());
    let err = p.reconcile().await.unwrap_err();
    assert!(
        matches!(err, ProvisionError::ImplausibleAnswer { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("eni-primary"), "{err}");
    assert_eq!(p.state.lock().unwrap().pool().stats(0), before);
    let (_, state) = metrics(&p);
    assert!(
        state["drift"]["lastReconcileError"]
            .as_str()
            .unwrap()
            .contains("not reconciling")
    );
}

#[tokio::test]
async fn the_agents_own_changes_get_a_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(4));
    let mut s = settings(WARM_ENI);
    s.reconcile_grace = Duration::from_millis(300);
    let p = boot_with(&ec2, dir.path(), s);
    converge(&p).await; // assigns 4 addresses: recent
    let ip = pool_ips(&p)[0];
    // EC2's describe lags behind its own assign (eventual consistency).
    ec2.unassign_behind(ip);
    let r = p.reconcile().await.unwrap();
    assert!(!r.changed() && r.deferred == 1, "{r:?}");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let r = p.reconcile().await.unwrap();
    assert_eq!(r.removed, vec![ip]);
}

#[tokio::test]
async fn an_unknown_eni_in_an_ec2_answer_triggers_a_reconcile() {
    let (_dir, ec2, p) = five_pods().await;
    let eni1 = eni_of(&p, 4);
    // The pool thinks the ENI has room (so the planner assigns there); the ENI is deleted.
    let spare = p
        .state
        .lock()
        .unwrap()
        .pool()
        .usage(0)
        .into_iter()
        .find(|u| u.info.id == eni1)
        .unwrap()
        .available;
    p.state
        .lock()
        .unwrap()
        .pool_mut()
        .remove_ips(&eni1, &spare, 0)
        .unwrap();
    ec2.detach_behind(&eni1);
    ec2.enis.lock().unwrap().remove(&eni1);
    assert!(!p.reconcile_due());
    let err = p.step().await.unwrap_err();
    assert!(err.to_string().contains("NotFound"), "{err}");
    assert!(p.reconcile_due(), "a NotFound asks for a reconcile");
    let r = p.reconcile().await.unwrap();
    assert_eq!(r.enis_detached, vec![eni1]);
    assert!(!p.reconcile_due());
    converge(&p).await;
}

#[tokio::test]
async fn the_loop_reconciles_on_its_period_and_recovers_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(4));
    // Periods scaled down: the loop's 5 s to 50 ms, the reconcile's 60 s to 600 ms.
    let mut s = settings(WARM_ENI);
    s.interval = Duration::from_millis(50);
    s.reconcile_interval = Duration::from_millis(600);
    let p = boot_with(&ec2, dir.path(), s);
    for i in 0..5 {
        add_pod(&p, i).await;
    }
    converge(&p).await;
    let eni1 = eni_of(&p, 4);
    let task = tokio::spawn(p.clone().run());
    tokio::time::sleep(Duration::from_millis(100)).await;
    ec2.detach_behind(&eni1);
    // Within one reconcile period plus the loop's own period (polled: a loaded machine).
    let t = std::time::Instant::now();
    loop {
        let (detached, lost, available) = {
            let st = p.state.lock().unwrap();
            let s = st.pool().stats(0);
            (st.drift.enis_detached, s.lost, s.available)
        };
        if detached == 1 && lost == 1 && available >= 4 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "not reconciled: {detached} ENIs detached, {lost} lost, {available} available"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!task.is_finished());
    task.abort();
}

#[tokio::test]
async fn ec2_misbehaving_never_stops_the_provisioner() {
    // Every kind at once, each against its own EC2 and node.
    let runs = Misbehave::ALL.map(|m| async move {
        let dir = tempfile::tempdir().unwrap();
        let ec2 = Arc::new(FakeEc2::new(4));
        let mut s = settings(WARM_ENI);
        s.reconcile_interval = Duration::from_millis(500);
        let p = boot_with(&ec2, dir.path(), s);
        *ec2.misbehave.lock().unwrap() = Some(m);
        let task = tokio::spawn(p.clone().run());
        tokio::time::sleep(Duration::from_millis(2_200)).await;
        assert!(!task.is_finished(), "{m:?}: the provisioner stopped");
        // Backed off: steps at 0, 0.5 and 1.5 s (then 3.5 s), reconciles every 0.5 s here
        // (15 s with the agent's 60 s period). Not a busy loop.
        let calls = ec2.calls.load(Ordering::SeqCst);
        assert!((4..=12).contains(&calls), "{m:?}: {calls} calls in 2.2 s");
        let err = p
            .state
            .lock()
            .unwrap()
            .drift
            .last_reconcile_error
            .clone()
            .unwrap();
        assert!(err.contains("DescribeNetworkInterfaces"), "{m:?}: {err}");
        assert_eq!(p.state.lock().unwrap().pool().stats(0).total, 0);
        // EC2 answers again: the pool fills at the next try (3.5 s).
        *ec2.misbehave.lock().unwrap() = None;
        tokio::time::sleep(Duration::from_millis(3_000)).await;
        assert_eq!(
            p.state.lock().unwrap().pool().stats(0).total,
            4,
            "{m:?}: the pool did not recover"
        );
        assert!(!task.is_finished());
        task.abort();
    });
    futures_join_all(runs).await;
}

/// Awaits every future (concurrently, on this task).
async fn futures_join_all<F: std::future::Future<Output = ()>>(fs: [F; 4]) {
    let [a, b, c, d] = fs;
    tokio::join!(a, b, c, d);
}

#[tokio::test]
async fn imds_that_never_answers_fails_start_up_clearly_and_in_bounded_time() {
    #[derive(Debug)]
    struct DeadImds(AtomicUsize);
    impl cloud::Metadata for DeadImds {
        async fn instance(&self) -> Result<cloud::InstanceMetadata, CloudError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            // What the SDK's IMDS client reports when its 1 s read timeout fires.
            Err(CloudError::Imds {
                path: "/latest/meta-data/instance-id".into(),
                message: "timeout: HTTP read timeout occurred after 1s".into(),
            })
        }
    }
    let imds = DeadImds(AtomicUsize::new(0));
    let t0 = std::time::Instant::now();
    let err = crate::startup::learn(&imds, 3).await.unwrap_err();
    assert_eq!(imds.0.load(Ordering::SeqCst), 3);
    // Waits of 0.2 and 0.4 s between the attempts (doubling to 3 s: ten attempts, 18 s).
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let msg = err.to_string();
    assert!(
        msg.contains("IMDS did not answer after 3 attempts") && msg.contains("instance-id"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_lost_address_ec2_hands_this_node_again_is_never_another_pods() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(4));
    let p = boot(&ec2, dir.path(), WARM_ENI);
    converge(&p).await;
    for i in 0..4 {
        handle(&p, add_req(i));
    }
    let ip = ip_of(&p, 0);
    ec2.unassign_behind(ip);
    assert_eq!(p.reconcile().await.unwrap().lost.len(), 1);
    // Free in the subnet, EC2 picks it for this node's next request (an assign to the
    // primary ENI, where it was): pod 0 holds it again, no other pod gets it.
    ec2.reuse.lock().unwrap().push(ip);
    converge(&p).await;
    assert!(
        ec2.enis.lock().unwrap()["eni-primary"]
            .secondary_ips
            .contains(&ip)
    );
    assert_eq!(ip_of(&p, 0), ip);
    assert_eq!(p.state.lock().unwrap().pool().stats(0).lost, 0);
    for i in 4..12 {
        add_pod(&p, i).await;
        assert_ne!(ip_of(&p, i), ip, "pod {i}");
    }
}

const PREFIXES: Targets = Targets {
    warm_eni: 1,
    warm_ip: None,
    min_ip: None,
    prefixes: true,
    warm_prefix: 1,
};

/// An m5.large with prefix delegation: 3 ENIs × 9 slots, max pods 110.
fn prefix_settings() -> Settings {
    Settings {
        limits: Limits {
            max_enis: 3,
            ips_per_eni: 9,
            max_pods: 110,
        },
        prefix_retry: Duration::from_millis(300),
        decrease_interval: Duration::from_millis(300),
        ..settings(PREFIXES)
    }
}

fn add(p: &Provisioner<FakeEc2, FakeNode>, i: usize) -> proto::Response {
    p.state.lock().unwrap().handle(proto::Request::Add {
        key: key(i),
        pod: Default::default(),
        netns: String::new(),
    })
}

#[tokio::test]
async fn prefix_delegation_serves_max_pods_from_few_calls_and_refuses_the_next_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(9));
    let p = boot_with(&ec2, dir.path(), prefix_settings());
    assert_eq!(
        converge(&p).await,
        [Action::AssignPrefixes {
            eni_id: "eni-primary".into(),
            count: 1
        }]
    );
    let before = ec2.calls.load(Ordering::SeqCst);
    // 110 ADDs at once: they wait, and the provisioner serves them in one call.
    for i in 0..110 {
        add(&p, i);
    }
    converge(&p).await;
    for i in 0..110 {
        assert!(
            matches!(add(&p, i), proto::Response::Added { .. }),
            "pod {i}"
        );
    }
    assert_eq!(ec2.calls.load(Ordering::SeqCst) - before, 1);
    let primary = ec2.enis.lock().unwrap()["eni-primary"].clone();
    assert_eq!(
        (primary.prefixes.len(), primary.secondary_ips.len()),
        (7, 0)
    );
    assert!(ec2.non_primary().is_empty());
    // Pods on a prefix get a /32 of it, no two the same.
    let ips: BTreeSet<Ipv4Addr> = (0..110)
        .map(|i| p.state.lock().unwrap().pool().lookup(&key(i)).unwrap().ip)
        .collect();
    assert_eq!(ips.len(), 110);
    assert!(
        ips.iter()
            .all(|ip| primary.prefixes.iter().any(|pre| pre.contains(ip)))
    );

    // The 111th: code 11, and why.
    converge(&p).await;
    let r = add(&p, 110);
    let proto::Response::Error { code, message } = r else {
        panic!("{r:?}")
    };
    assert_eq!(code, crate::state::code::TRY_AGAIN_LATER);
    assert!(
        message.contains("110 pods hold addresses")
            && message.contains("max pods is 110 (m5.large with prefix delegation)"),
        "{message}"
    );

    // All go: the prefixes go back but WARM_PREFIX_TARGET's one (a call per decrease
    // interval).
    for i in 0..110 {
        p.state
            .lock()
            .unwrap()
            .handle(proto::Request::Del { key: key(i) });
    }
    settle(&p).await;
    assert_eq!(ec2.enis.lock().unwrap()["eni-primary"].prefixes.len(), 1);
}

#[tokio::test]
async fn without_a_free_prefix_an_eni_falls_back_to_secondary_ips_says_so_once_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(9));
    ec2.fragmented.store(true, Ordering::SeqCst);
    let p = boot_with(&ec2, dir.path(), prefix_settings());
    for i in 0..12 {
        add_pod(&p, i).await;
    }
    {
        let st = p.state.lock().unwrap();
        assert_eq!(
            (st.prefix_fallbacks, st.prefix_fallback_active),
            (2, 2),
            "the primary ENI, then new ENIs"
        );
    }
    let primary = ec2.enis.lock().unwrap()["eni-primary"].clone();
    assert_eq!(
        (primary.prefixes.len(), primary.secondary_ips.len()),
        (0, 9)
    );
    let second = ec2.non_primary();
    assert_eq!(second.len(), 1);
    assert!(second[0].prefixes.is_empty() && !second[0].secondary_ips.is_empty());

    // Prefixes can be had again: after the retry time the next addresses come as prefixes,
    // and the free secondary addresses go back.
    ec2.fragmented.store(false, Ordering::SeqCst);
    for i in 0..12 {
        p.state
            .lock()
            .unwrap()
            .handle(proto::Request::Del { key: key(i) });
    }
    settle(&p).await;
    let st = p.state.lock().unwrap();
    assert_eq!((st.prefix_fallbacks, st.prefix_fallback_active), (2, 0));
    let u = st.pool().usage(st.now());
    assert_eq!(
        u.iter().map(|u| u.prefixes.len()).sum::<usize>(),
        1,
        "{u:?}"
    );
    assert_eq!(
        u.iter().map(|u| u.available_secondary.len()).sum::<usize>(),
        0,
        "{u:?}"
    );
}

#[tokio::test]
async fn switching_modes_keeps_every_pods_address() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(9));
    let p = boot_with(
        &ec2,
        dir.path(),
        Settings {
            limits: Limits {
                max_enis: 3,
                ips_per_eni: 9,
                max_pods: 27,
            },
            ..settings(WARM_ENI)
        },
    );
    for i in 0..5 {
        add_pod(&p, i).await;
    }
    converge(&p).await;
    let held: Vec<Ipv4Addr> = (0..5)
        .map(|i| p.state.lock().unwrap().pool().lookup(&key(i)).unwrap().ip)
        .collect();
    drop(p);

    // Restarted with prefix delegation: the pods keep their secondary IPs, new pods get
    // prefix addresses, the free secondary IPs go back.
    let p = boot_with(&ec2, dir.path(), prefix_settings());
    settle(&p).await;
    for (i, ip) in held.iter().enumerate() {
        assert_eq!(
            p.state.lock().unwrap().pool().lookup(&key(i)).unwrap().ip,
            *ip
        );
    }
    add_pod(&p, 5).await;
    settle(&p).await;
    let new = p.state.lock().unwrap().pool().lookup(&key(5)).unwrap().ip;
    let enis = ec2.enis.lock().unwrap().clone();
    assert!(
        enis.values()
            .any(|e| e.prefixes.iter().any(|pre| pre.contains(&new))),
        "{new}"
    );
    let secondary: usize = enis.values().map(|e| e.secondary_ips.len()).sum();
    assert_eq!(
        secondary, 5,
        "only the pods' secondary IPs are left: {enis:?}"
    );

    // And back to secondary IPs: the pod on a prefix keeps it.
    drop(p);
    let p = boot_with(
        &ec2,
        dir.path(),
        Settings {
            limits: Limits {
                max_enis: 3,
                ips_per_eni: 9,
                max_pods: 27,
            },
            ..settings(WARM_ENI)
        },
    );
    converge(&p).await;
    for (i, ip) in held.iter().chain([&new]).enumerate() {
        assert_eq!(
            p.state.lock().unwrap().pool().lookup(&key(i)).unwrap().ip,
            *ip
        );
    }
}

#[tokio::test]
async fn a_prefix_unassigned_or_assigned_behind_the_agents_back_is_reconciled() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(9));
    let p = boot_with(&ec2, dir.path(), prefix_settings());
    add_pod(&p, 0).await;
    let ip = p.state.lock().unwrap().pool().lookup(&key(0)).unwrap().ip;
    let prefix = ec2.enis.lock().unwrap()["eni-primary"].prefixes[0];
    let extra: Ipv4Net = "10.0.200.0/28".parse().unwrap();
    {
        let mut enis = ec2.enis.lock().unwrap();
        let e = enis.get_mut("eni-primary").unwrap();
        e.prefixes = vec![extra];
    }
    let r = p.reconcile().await.unwrap();
    assert_eq!(r.lost, vec![(key(0), ip, LostReason::Unassigned)]);
    assert_eq!(r.removed.len(), 15);
    assert_eq!(r.adopted.len(), 16);
    let st = p.state.lock().unwrap();
    assert_eq!(st.pool().prefixes_of("eni-primary"), vec![extra]);
    assert!(
        !st.pool()
            .ips_of("eni-primary")
            .iter()
            .any(|a| prefix.contains(a))
    );
}

#[tokio::test]
async fn the_nodes_capacity_in_pods_caps_the_pool_and_the_adds() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(9));
    let p = boot_with(&ec2, dir.path(), prefix_settings());
    p.set_node_max_pods(Some(20));
    assert_eq!(p.limits().max_pods, 20);
    for i in 0..20 {
        add_pod(&p, i).await;
    }
    converge(&p).await;
    // 20 pods: 2 prefixes (32 addresses) are enough, however short the warm target is.
    assert_eq!(ec2.enis.lock().unwrap()["eni-primary"].prefixes.len(), 2);
    let r = add(&p, 20);
    let proto::Response::Error { code, message } = r else {
        panic!("{r:?}")
    };
    assert_eq!(code, crate::state::code::TRY_AGAIN_LATER);
    assert!(
        message.contains("max pods is 20 (its capacity.pods in the Kubernetes API; m5.large with prefix delegation allows 110)"),
        "{message}"
    );
    // The capacity gone (the node object lost it): back to the type's.
    p.set_node_max_pods(None);
    assert_eq!(p.limits().max_pods, 110);
    add_pod(&p, 20).await;
}

fn subnet(id: &str, cidr: &str, az: &str) -> cloud::Subnet {
    cloud::Subnet {
        id: id.into(),
        vpc_id: "vpc-1".into(),
        cidr: cidr.parse().unwrap(),
        availability_zone: az.into(),
        available_ip_address_count: 8000,
        tags: BTreeMap::new(),
    }
}

#[tokio::test]
async fn custom_networking_creates_enis_where_the_eniconfig_says_and_nowhere_else() {
    let dir = tempfile::tempdir().unwrap();
    let ec2 = Arc::new(FakeEc2::new(4));
    for s in [
        subnet("subnet-pods", "100.64.0.0/19", "us-west-2a"),
        subnet("subnet-pods-b", "100.64.32.0/19", "us-west-2b"),
        subnet("subnet-pods-2", "100.64.64.0/19", "us-west-2a"),
    ] {
        ec2.subnets.lock().unwrap().insert(s.id.clone(), s);
    }
    let p = boot(&ec2, dir.path(), WARM_ENI);
    let p = Arc::new(
        Arc::try_unwrap(p)
            .expect("one owner")
            .with_custom_networking(),
    );
    // The primary ENI carries no pods (the start-up leaves it out of the pool).
    p.state
        .lock()
        .unwrap()
        .pool_mut()
        .remove_eni("eni-primary")
        .unwrap();
    let refused = |why: &str| {
        let st = p.state.lock().unwrap();
        assert_eq!(st.blocker_reason, Some(why), "{:?}", st.blocker);
        st.blocker.clone().unwrap()
    };

    // Not known yet, missing, in another zone: an error and the reason, no ENI.
    assert!(p.step().await.is_err());
    refused("ENIConfigUnknown");
    p.set_eni_config(EniConfigState::Missing {
        name: "us-west-2a".into(),
    });
    assert!(p.step().await.is_err());
    assert!(refused("ENIConfigMissing").contains("\"us-west-2a\", and there is none"));
    p.set_eni_config(EniConfigState::Found {
        name: "other-zone".into(),
        subnet: "subnet-pods-b".into(),
        security_groups: vec!["sg-pods".into()],
    });
    assert!(p.step().await.is_err());
    assert!(
        refused("ENIConfigWrongZone")
            .contains("subnet-pods-b in zone us-west-2b, but this node is in us-west-2a")
    );
    assert!(ec2.non_primary().is_empty(), "no ENI in the wrong place");

    // In the node's zone: the ENI is in the ENIConfig's subnet, with its groups.
    p.set_eni_config(EniConfigState::Found {
        name: "us-west-2a".into(),
        subnet: "subnet-pods".into(),
        security_groups: vec!["sg-pods".into()],
    });
    add_pod(&p, 0).await;
    let enis = ec2.non_primary();
    assert_eq!(enis.len(), 1);
    assert_eq!(
        (enis[0].subnet_id.as_str(), enis[0].security_groups.clone()),
        ("subnet-pods", vec!["sg-pods".to_string()])
    );
    let a = p.state.lock().unwrap().pool().lookup(&key(0)).unwrap();
    assert_eq!(
        (a.eni.id.as_str(), a.eni.subnet.to_string()),
        (enis[0].id.as_str(), "100.64.0.0/19".to_string())
    );
    assert!(
        ec2.enis.lock().unwrap()["eni-primary"]
            .secondary_ips
            .is_empty()
    );

    // A changed ENIConfig: new ENIs only.
    p.set_eni_config(EniConfigState::Found {
        name: "us-west-2a".into(),
        subnet: "subnet-pods-2".into(),
        security_groups: vec![],
    });
    for i in 1..6 {
        add_pod(&p, i).await;
    }
    let mut subnets: Vec<(String, Vec<String>)> = ec2
        .non_primary()
        .into_iter()
        .map(|e| (e.subnet_id, e.security_groups))
        .collect();
    subnets.sort();
    assert_eq!(
        subnets,
        [
            ("subnet-pods".to_string(), vec!["sg-pods".to_string()]),
            ("subnet-pods-2".to_string(), vec!["sg-1".to_string()])
        ]
    );
}
