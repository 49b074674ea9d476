//! What the probes answer, as pure decisions over the agent's state.
//!
//! - Liveness (`/livez`; `/healthz` is its old name): the agent's loops are alive. Each
//!   [`Loop`] beats a heartbeat in [`Health`]; a beat older than [`STALE_AFTER`] fails the
//!   probe with the loop's name ([`liveness`]). A loop that has not beaten yet is not
//!   watched (start-up). The provisioner's EC2 calls are not part of it: a restart does not
//!   cure an EC2 outage, and readiness reports it.
//! - Readiness (`/readyz`): the conflist is written and the pool can serve a new pod, or the
//!   one-line reason why not ([`readiness`]).
//!
//! [`Watched`] is the EC2 seam ([`Cloud`]) with a memory: it keeps why EC2 last refused to give
//! the node addresses (until a call that adds addresses succeeds), for readiness to say.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloud::{CloudError, Filter, InstanceTypeInfo, NetworkInterface, NewEni, Subnet};
use ipnet::Ipv4Net;

use crate::cloud_api::Cloud;

/// How often the agent loop beats ([`heartbeat`]): the provisioner's re-planning period, the
/// reference's `ipPoolMonitorInterval`.
pub const BEAT_PERIOD: Duration = Duration::from_secs(5);

/// A loop whose last beat is older than this is stuck: three of the agent loop's periods
/// (the housekeeping thread beats every second).
pub const STALE_AFTER: Duration = Duration::from_secs(15);

/// A loop whose heartbeat liveness watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Loop {
    /// A tokio task that takes the pool's lock every [`BEAT_PERIOD`]: the runtime schedules
    /// tasks and nothing holds the lock that every plugin request needs.
    Agent,
    /// The housekeeping thread (deletes the veths DEL retired, every second).
    Housekeeping,
}

impl Loop {
    fn name(self) -> &'static str {
        match self {
            Loop::Agent => "agent loop",
            Loop::Housekeeping => "housekeeping thread",
        }
    }

    fn stuck(self) -> &'static str {
        match self {
            Loop::Agent => "the runtime is stalled or the pool's lock is held",
            Loop::Housekeeping => "deleting retired pod veths does not return",
        }
    }
}

/// Where the agent is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Starting: the step under way, and since when.
    Starting { step: &'static str, since: Instant },
    /// The conflist is written: the runtime may send pods.
    Serving,
}

/// The heartbeats, the phase and EC2's last refusal, shared by the agent's tasks and the
/// probe endpoints.
#[derive(Debug)]
pub struct Health {
    beats: Mutex<BTreeMap<Loop, Instant>>,
    phase: Mutex<Phase>,
    refused: Mutex<Option<String>>,
}

impl Health {
    pub fn new() -> Health {
        Health {
            beats: Mutex::default(),
            phase: Mutex::new(Phase::Starting {
                step: "starting",
                since: Instant::now(),
            }),
            refused: Mutex::default(),
        }
    }

    pub fn beat(&self, l: Loop) {
        lock(&self.beats).insert(l, Instant::now());
    }

    /// Start-up is at `step` (shown by readiness until the conflist is written).
    pub fn step(&self, step: &'static str) {
        *lock(&self.phase) = Phase::Starting {
            step,
            since: Instant::now(),
        };
    }

    /// The conflist is written.
    pub fn serving(&self) {
        *lock(&self.phase) = Phase::Serving;
    }

    pub fn phase(&self) -> Phase {
        *lock(&self.phase)
    }

    /// Why EC2 last refused to add addresses, unless a later call that adds them succeeded.
    pub fn refused(&self) -> Option<String> {
        lock(&self.refused).clone()
    }

    /// Notes the outcome of an EC2 call that adds addresses to the node.
    pub fn record_growth(&self, outcome: Result<(), &CloudError>) {
        *lock(&self.refused) = outcome.err().map(refusal);
    }

    /// [`liveness`] of the beats so far, at `now`.
    pub fn liveness(&self, now: Instant) -> Result<(), String> {
        liveness(&lock(&self.beats), now)
    }
}

impl Default for Health {
    fn default() -> Self {
        Health::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `Err(reason)` when a loop's last beat is older than [`STALE_AFTER`] at `now`.
pub fn liveness(beats: &BTreeMap<Loop, Instant>, now: Instant) -> Result<(), String> {
    for (l, last) in beats {
        let age = now.saturating_duration_since(*last);
        if age > STALE_AFTER {
            return Err(format!(
                "the {} has not run for {}s (bound {}s): {}",
                l.name(),
                age.as_secs(),
                STALE_AFTER.as_secs(),
                l.stuck()
            ));
        }
    }
    Ok(())
}

/// What readiness needs to know about the pool.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolView {
    pub stats: ipam::Stats,
    /// Whether the agent adds addresses through EC2.
    pub provisioning: bool,
    /// The most addresses the node can hold (known with provisioning).
    pub capacity: Option<u32>,
    /// Why the provisioner cannot add addresses (the state's `blocker`).
    pub blocker: Option<String>,
    /// Why EC2 last refused to add addresses ([`Health::refused`]).
    pub refused: Option<String>,
}

/// Ready (`Ok`) when the conflist is written and a new pod can get an address: one is
/// available, or cooling down (available within `IP_COOLDOWN_PERIOD`), or the provisioner is
/// getting more with nothing in its way. A full node — every address held by a pod, at the
/// node's limit (or with provisioning off) — is ready too: kubelet's max-pods keeps pods
/// off it, and an unready agent there would only stall a rolling update. Otherwise `Err` says
/// why, on one line.
pub fn readiness(phase: Phase, pool: Option<&PoolView>, now: Instant) -> Result<(), String> {
    let p = match (phase, pool) {
        (Phase::Starting { step, since }, _) => {
            return Err(format!(
                "conflist not written yet: {step} (for {}s)",
                now.saturating_duration_since(since).as_secs()
            ));
        }
        (Phase::Serving, None) => return Err("conflist written, pool not known".into()),
        (Phase::Serving, Some(p)) => p,
    };
    let s = &p.stats;
    if s.available > 0 || s.cooling > 0 {
        return Ok(());
    }
    let at_limit = match p.capacity {
        _ if !p.provisioning => true,
        Some(cap) => s.total as u64 >= u64::from(cap),
        None => false,
    };
    if s.total > 0 && s.assigned >= s.total && at_limit {
        return Ok(());
    }
    let why = match (&p.refused, &p.blocker) {
        (Some(r), _) => r.clone(),
        (None, Some(b)) => b.clone(),
        (None, None) if !p.provisioning => "provisioning is off \
            (DISABLE_NETWORK_RESOURCE_PROVISIONING or ENABLE_IMDS_ONLY_MODE) and this node's \
            ENIs have no secondary IP: assign some to them"
            .to_string(),
        // Being requested from EC2, and nothing refused so far.
        (None, None) => return Ok(()),
    };
    Err(one_line(&format!("no address available: {why}")))
}

/// `text` on one line (a probe's answer and a log field).
pub fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// How readiness words an EC2 failure: "EC2 refused AssignPrivateIpAddresses: <code>:
/// <message>" when EC2 answered with an error code, the error itself otherwise.
pub fn refusal(e: &CloudError) -> String {
    match e {
        CloudError::Ec2 {
            call,
            code: Some(code),
            message,
        } => one_line(&format!("EC2 refused {call}: {code}: {message}")),
        other => one_line(&other.to_string()),
    }
}

/// Beats [`Loop::Agent`] every [`BEAT_PERIOD`] (the first at once), each time after `probe`
/// returned on a blocking thread. `probe` takes the pool's lock (once there is a pool): a
/// lock held forever, or a runtime that no longer runs tasks, stops the beat.
pub async fn heartbeat<F>(health: Arc<Health>, probe: F)
where
    F: Fn() + Send + Sync + 'static,
{
    let probe = Arc::new(probe);
    let mut tick = tokio::time::interval(BEAT_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let p = probe.clone();
        if tokio::task::spawn_blocking(move || p()).await.is_ok() {
            health.beat(Loop::Agent);
        }
    }
}

/// The EC2 seam with a memory: every call goes to `inner`; the outcome of those that add
/// addresses (CreateNetworkInterface, AttachNetworkInterface, AssignPrivateIpAddresses) is
/// recorded in [`Health`] ([`Health::record_growth`]).
#[derive(Debug)]
pub struct Watched<C> {
    inner: Arc<C>,
    health: Arc<Health>,
}

impl<C> Watched<C> {
    pub fn new(inner: Arc<C>, health: Arc<Health>) -> Self {
        Watched { inner, health }
    }

    fn note<T>(&self, r: Result<T, CloudError>) -> Result<T, CloudError> {
        self.health.record_growth(r.as_ref().map(|_| ()));
        r
    }
}

impl<C: Cloud> Cloud for Watched<C> {
    async fn create_eni(
        &self,
        spec: &NewEni,
        prefixes: u32,
    ) -> Result<NetworkInterface, CloudError> {
        let r = self.inner.create_eni(spec, prefixes).await;
        // A created ENI adds nothing until attached: only a failure is news.
        if let Err(e) = &r {
            self.health.record_growth(Err(e));
        }
        r
    }
    async fn attach(
        &self,
        eni_id: &str,
        instance_id: &str,
        device_index: u32,
    ) -> Result<String, CloudError> {
        let r = self.inner.attach(eni_id, instance_id, device_index).await;
        self.note(r)
    }
    async fn set_delete_on_termination(
        &self,
        eni_id: &str,
        attachment_id: &str,
    ) -> Result<(), CloudError> {
        self.inner
            .set_delete_on_termination(eni_id, attachment_id)
            .await
    }
    async fn detach(&self, attachment_id: &str) -> Result<(), CloudError> {
        self.inner.detach(attachment_id).await
    }
    async fn delete_eni(&self, eni_id: &str) -> Result<(), CloudError> {
        self.inner.delete_eni(eni_id).await
    }
    async fn assign_ips(&self, eni_id: &str, count: u32) -> Result<Vec<Ipv4Addr>, CloudError> {
        let r = self.inner.assign_ips(eni_id, count).await;
        self.note(r)
    }
    async fn unassign_ips(&self, eni_id: &str, ips: &[Ipv4Addr]) -> Result<(), CloudError> {
        self.inner.unassign_ips(eni_id, ips).await
    }
    async fn assign_prefixes(&self, eni_id: &str, count: u32) -> Result<Vec<Ipv4Net>, CloudError> {
        let r = self.inner.assign_prefixes(eni_id, count).await;
        self.note(r)
    }
    async fn unassign_prefixes(
        &self,
        eni_id: &str,
        prefixes: &[Ipv4Net],
    ) -> Result<(), CloudError> {
        self.inner.unassign_prefixes(eni_id, prefixes).await
    }
    async fn describe_enis(&self, filters: &[Filter]) -> Result<Vec<NetworkInterface>, CloudError> {
        self.inner.describe_enis(filters).await
    }
    async fn instance_type_info(
        &self,
        instance_type: &str,
    ) -> Result<InstanceTypeInfo, CloudError> {
        self.inner.instance_type_info(instance_type).await
    }
    async fn describe_subnet(&self, subnet_id: &str) -> Result<Subnet, CloudError> {
        self.inner.describe_subnet(subnet_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(total: usize, assigned: usize, cooling: usize) -> ipam::Stats {
        ipam::Stats {
            enis: 1,
            total,
            assigned,
            cooling,
            available: total - assigned - cooling,
            lost: 0,
            prefixes: 0,
        }
    }

    fn pool(s: ipam::Stats) -> PoolView {
        PoolView {
            stats: s,
            provisioning: true,
            capacity: Some(27),
            ..PoolView::default()
        }
    }

    #[test]
    fn liveness_fails_on_a_stale_beat_only() {
        let t0 = Instant::now();
        let mut beats = BTreeMap::new();
        assert_eq!(liveness(&beats, t0 + Duration::from_secs(3600)), Ok(()));
        beats.insert(Loop::Agent, t0);
        beats.insert(Loop::Housekeeping, t0 + Duration::from_secs(10));
        assert_eq!(liveness(&beats, t0 + STALE_AFTER), Ok(()));
        let e = liveness(&beats, t0 + Duration::from_secs(20)).unwrap_err();
        assert_eq!(
            e,
            "the agent loop has not run for 20s (bound 15s): the runtime is stalled or the \
             pool's lock is held"
        );
        beats.insert(Loop::Agent, t0 + Duration::from_secs(20));
        let e = liveness(&beats, t0 + Duration::from_secs(26)).unwrap_err();
        assert!(
            e.starts_with("the housekeeping thread has not run for 16s"),
            "{e}"
        );
        // A clock read before the beat (another thread beat in between) is not stale.
        assert_eq!(liveness(&beats, t0), Ok(()));
    }

    #[test]
    fn readiness_waits_for_the_conflist() {
        let t0 = Instant::now();
        let starting = Phase::Starting {
            step: "setting up the host network",
            since: t0,
        };
        let p = pool(stats(10, 0, 0));
        assert_eq!(
            readiness(starting, Some(&p), t0 + Duration::from_secs(4)),
            Err("conflist not written yet: setting up the host network (for 4s)".into())
        );
        assert_eq!(readiness(Phase::Serving, Some(&p), t0), Ok(()));
        assert!(readiness(Phase::Serving, None, t0).is_err());
    }

    #[test]
    fn readiness_follows_what_the_pool_can_serve() {
        let now = Instant::now();
        let ready = |p: &PoolView| readiness(Phase::Serving, Some(p), now);
        let refused = "EC2 refused AssignPrivateIpAddresses: UnauthorizedOperation: not allowed";
        // Free, or cooling down: ready whatever EC2 said.
        for s in [stats(10, 9, 0), stats(10, 9, 1)] {
            let mut p = pool(s);
            p.refused = Some(refused.into());
            assert_eq!(ready(&p), Ok(()), "{s:?}");
        }
        // Nothing free, below the limit: ready while nothing stands in the way …
        let mut p = pool(stats(10, 10, 0));
        assert_eq!(ready(&p), Ok(()));
        // … not when EC2 refused, or the provisioner is blocked.
        p.refused = Some(refused.into());
        assert_eq!(ready(&p), Err(format!("no address available: {refused}")));
        p.refused = None;
        p.blocker = Some("subnet subnet-1 has no free addresses\n(EC2: x)".into());
        assert_eq!(
            ready(&p),
            Err("no address available: subnet subnet-1 has no free addresses (EC2: x)".into())
        );
        // An empty pool with nothing refused yet is being filled.
        assert_eq!(ready(&pool(stats(0, 0, 0))), Ok(()));
        // Full at the node's limit: ready (max-pods keeps pods away).
        let mut p = pool(stats(27, 27, 0));
        p.blocker = Some("node at its limit of 27 pod IPs".into());
        assert_eq!(ready(&p), Ok(()));
        // Provisioning off: full is ready, no address at all is not.
        let mut p = pool(stats(3, 3, 0));
        (p.provisioning, p.capacity) = (false, None);
        assert_eq!(ready(&p), Ok(()));
        p.stats = stats(0, 0, 0);
        let e = ready(&p).unwrap_err();
        assert!(
            e.starts_with("no address available: provisioning is off") && !e.contains('\n'),
            "{e}"
        );
    }

    /// An EC2 that refuses every call (`code`) or answers them (`None`).
    struct FakeEc2(Option<&'static str>);

    impl FakeEc2 {
        fn answer<T>(&self, call: &'static str, ok: T) -> Result<T, CloudError> {
            match self.0 {
                None => Ok(ok),
                Some(code) => Err(CloudError::Ec2 {
                    call,
                    code: Some(code.into()),
                    message: "refused".into(),
                }),
            }
        }
    }

    impl Cloud for FakeEc2 {
        async fn create_eni(&self, _: &NewEni, _: u32) -> Result<NetworkInterface, CloudError> {
            Err(CloudError::NoRegion)
        }
        async fn attach(&self, _: &str, _: &str, _: u32) -> Result<String, CloudError> {
            self.answer("AttachNetworkInterface", "eni-attach-1".into())
        }
        async fn set_delete_on_termination(&self, _: &str, _: &str) -> Result<(), CloudError> {
            self.answer("ModifyNetworkInterfaceAttribute", ())
        }
        async fn detach(&self, _: &str) -> Result<(), CloudError> {
            self.answer("DetachNetworkInterface", ())
        }
        async fn delete_eni(&self, _: &str) -> Result<(), CloudError> {
            self.answer("DeleteNetworkInterface", ())
        }
        async fn assign_ips(&self, _: &str, n: u32) -> Result<Vec<Ipv4Addr>, CloudError> {
            self.answer(
                "AssignPrivateIpAddresses",
                vec![Ipv4Addr::new(10, 0, 0, 1); n as usize],
            )
        }
        async fn unassign_ips(&self, _: &str, _: &[Ipv4Addr]) -> Result<(), CloudError> {
            self.answer("UnassignPrivateIpAddresses", ())
        }
        async fn assign_prefixes(&self, _: &str, n: u32) -> Result<Vec<Ipv4Net>, CloudError> {
            self.answer(
                "AssignPrivateIpAddresses",
                vec!["10.0.1.0/28".parse().expect("a prefix"); n as usize],
            )
        }
        async fn unassign_prefixes(&self, _: &str, _: &[Ipv4Net]) -> Result<(), CloudError> {
            self.answer("UnassignPrivateIpAddresses", ())
        }
        async fn describe_enis(&self, _: &[Filter]) -> Result<Vec<NetworkInterface>, CloudError> {
            self.answer("DescribeNetworkInterfaces", Vec::new())
        }
        async fn describe_subnet(&self, _: &str) -> Result<Subnet, CloudError> {
            Err(CloudError::NoRegion)
        }
        async fn instance_type_info(&self, _: &str) -> Result<InstanceTypeInfo, CloudError> {
            self.answer(
                "DescribeInstanceTypes",
                InstanceTypeInfo {
                    limits: cloud::InstanceTypeLimits {
                        max_enis: 3,
                        ipv4_per_eni: 10,
                    },
                    hypervisor: Some("nitro".into()),
                    vcpus: Some(2),
                },
            )
        }
    }

    #[tokio::test]
    async fn watched_remembers_refusals_until_addresses_come() {
        let health = Arc::new(Health::new());
        let refusing = Watched::new(
            Arc::new(FakeEc2(Some("InsufficientFreeAddressesInSubnet"))),
            health.clone(),
        );
        // Calls that add nothing are not recorded.
        refusing.unassign_ips("eni-1", &[]).await.unwrap_err();
        refusing.describe_enis(&[]).await.unwrap_err();
        assert_eq!(health.refused(), None);
        refusing.assign_ips("eni-1", 2).await.unwrap_err();
        assert_eq!(
            health.refused().as_deref(),
            Some(
                "EC2 refused AssignPrivateIpAddresses: InsufficientFreeAddressesInSubnet: refused"
            )
        );
        // A failure without an EC2 code is shown as it is.
        refusing
            .create_eni(&NewEni::default(), 0)
            .await
            .unwrap_err();
        assert_eq!(
            health.refused(),
            Some(CloudError::NoRegion.to_string()),
            "create_eni's failure"
        );
        let answering = Watched::new(Arc::new(FakeEc2(None)), health.clone());
        answering.attach("eni-2", "i-1", 1).await.unwrap();
        assert_eq!(health.refused(), None, "an attached ENI brings addresses");
        refusing.attach("eni-2", "i-1", 1).await.unwrap_err();
        assert!(health.refused().is_some());
        answering.assign_ips("eni-1", 1).await.unwrap();
        assert_eq!(health.refused(), None);
    }

    #[tokio::test]
    async fn the_heartbeat_beats_after_the_probe() {
        let health = Arc::new(Health::new());
        let probed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let p = probed.clone();
        let task = tokio::spawn(heartbeat(health.clone(), move || {
            p.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        for _ in 0..200 {
            if lock(&health.beats).contains_key(&Loop::Agent) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        assert!(lock(&health.beats).contains_key(&Loop::Agent));
        assert_eq!(probed.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(health.liveness(Instant::now()), Ok(()));
    }
}
