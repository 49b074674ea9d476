//! The warm-pool provisioner: keeps the pool at its targets through EC2 (assigns and releases
//! secondary IPs; creates, attaches, detaches and deletes ENIs) as the planner
//! (`ipam::planner`) decides.
//!
//! Crash safety: every ENI operation is recorded as an intent in the checkpoint *before* its
//! first EC2 call, and the ENI carries the intent's id as a tag. A restart finds every intent
//! and finishes (delete) or undoes (create) it, so a kill -9 at any instant leaks no ENI.
//! ENIs tagged with this instance that are detached (leaked by an earlier life or by the
//! reference plugin) are deleted.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloud::{CloudError, Filter, NetworkInterface, NewEni};
use ipam::EniInfo;
use ipam::planner::{self, Action, Ages, Demand, Limits, Targets};
use ipnet::Ipv4Net;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::checkpoint::{IntentOp, IntentRecord};
use crate::cloud_api::{Cloud, TAG_NO_MANAGE};
use crate::node_net::{NodeError, NodeNet};
use crate::state::State;

pub const TAG_INSTANCE: &str = "node.k8s.amazonaws.com/instance_id";
pub const TAG_CREATED: &str = "node.k8s.amazonaws.com/createdAt";
pub const TAG_CLUSTER: &str = "cluster.k8s.amazonaws.com/name";
pub const TAG_OWNER: &str = "eks:eni:owner";
/// vpc-cni's own tag: the id of the intent that created the ENI.
pub const TAG_INTENT: &str = "vpc-cni.k8s.aws/intent";

/// What the provisioner needs to know about the node.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub instance_id: String,
    pub instance_type: String,
    pub subnet_id: String,
    pub subnet: Ipv4Net,
    pub security_groups: Vec<String>,
    pub eni_mtu: u32,
    pub cluster_name: Option<String>,
    pub additional_tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub targets: Targets,
    pub limits: Limits,
    pub min_eni_age: Duration,
    /// Minimum spacing between two releases of surplus addresses (the reference's 30 s).
    pub decrease_interval: Duration,
    /// Back-off after EC2 says the subnet is out of addresses (the reference's 120 s).
    pub subnet_full_backoff: Duration,
    /// How often the pool is re-planned when nothing wakes the provisioner.
    pub interval: Duration,
    /// Device indexes of attached ENIs that are not ours ([`crate::cloud_api::unmanaged_reason`]):
    /// never used for a new ENI (and not counted in `limits.max_enis`).
    pub reserved_devices: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("{0}")]
    Cloud(#[from] CloudError),
    /// The node side of a new ENI (its interface, table, rule) could not be set up.
    #[error("setting up ENI {eni}: {source}")]
    Node { eni: String, source: NodeError },
    /// The blocking task that set up a new ENI died.
    #[error("setting up the ENI: {0}")]
    SetupTask(tokio::task::JoinError),
    /// The pool refused a change (`what` names it).
    #[error("{what}: {source}")]
    Pool {
        what: String,
        source: ipam::PoolError,
    },
    #[error("detaching ENI {eni}: still attached after 40 checks")]
    StillAttached { eni: String },
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
}

/// Maps a pool error to [`ProvisionError::Pool`], naming the change.
fn pool(what: impl Into<String>) -> impl FnOnce(ipam::PoolError) -> ProvisionError {
    let what = what.into();
    move |source| ProvisionError::Pool { what, source }
}

/// RFC 3339 UTC, whole seconds, for the createdAt tag (`None` only past the year 9999).
fn rfc3339(ms: u64) -> Option<String> {
    let secs = i64::try_from(ms / 1000).ok()?;
    OffsetDateTime::from_unix_timestamp(secs)
        .ok()?
        .format(&Rfc3339)
        .ok()
}

fn new_intent_id() -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("{n:016x}")
}

#[derive(Debug)]
pub struct Provisioner<C: Cloud, N: NodeNet> {
    pub cloud: Arc<C>,
    pub net: Arc<N>,
    pub state: Arc<Mutex<State>>,
    pub wake: Arc<Notify>,
    pub node: NodeIdentity,
    pub settings: Settings,
    last_decrease: Mutex<Option<Instant>>,
    subnet_full_until: Mutex<Option<Instant>>,
}

impl<C: Cloud, N: NodeNet> Provisioner<C, N> {
    pub fn new(
        cloud: Arc<C>,
        net: Arc<N>,
        state: Arc<Mutex<State>>,
        node: NodeIdentity,
        settings: Settings,
    ) -> Self {
        let wake = Arc::new(Notify::new());
        let p = Provisioner {
            cloud,
            net,
            state,
            wake,
            node,
            settings,
            last_decrease: Mutex::new(None),
            subnet_full_until: Mutex::new(None),
        };
        {
            let mut st = p.lock();
            st.wake = Some(p.wake.clone());
            let l = &p.settings.limits;
            st.capacity = Some((l.max_enis * l.ips_per_eni, p.limit_message()));
        }
        p
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, st: &State) -> Result<(), ProvisionError> {
        st.save().map_err(ProvisionError::from)
    }

    /// Finishes or undoes every recorded intent, then deletes leaked ENIs of this instance.
    pub async fn recover(&self) -> Result<(), ProvisionError> {
        let intents: Vec<IntentRecord> = self.lock().intents.values().cloned().collect();
        for intent in intents {
            info!(intent = %intent.id, op = ?intent.op, eni = ?intent.eni_id, "recovering an unfinished ENI operation");
            for eni in self.intent_enis(&intent).await? {
                let adopted = self.lock().pool().has_eni(&eni.id);
                match (intent.op, adopted) {
                    // Created and attached before the crash, and the node has taken it into
                    // its pool (it is attached, so start-up found it): finish the operation.
                    (IntentOp::Create, true) => {
                        if let Some(att) = &eni.attachment {
                            self.cloud
                                .set_delete_on_termination(&eni.id, &att.attachment_id)
                                .await?;
                        }
                        let mut st = self.lock();
                        let now = st.now();
                        st.eni_created.entry(eni.id.clone()).or_insert(now);
                        info!(eni = %eni.id, "finished creating the ENI");
                    }
                    // Being deleted: it held no pods when the delete began; out of the pool
                    // again (start-up re-adopted it because it was still attached) and gone.
                    (IntentOp::Delete, true) => {
                        let removed = self.lock().pool_mut().remove_eni(&eni.id);
                        match removed {
                            Ok(_) => self.remove_eni_in_ec2(&eni).await?,
                            Err(e) => warn!(eni = %eni.id, "not deleting the ENI: {e}"),
                        }
                    }
                    (_, false) => self.remove_eni_in_ec2(&eni).await?,
                }
            }
            let mut st = self.lock();
            st.intents.remove(&intent.id);
            self.save(&st)?;
        }
        self.delete_leaked().await
    }

    /// The ENIs an intent may have produced: by its recorded id, or by its tag.
    async fn intent_enis(
        &self,
        intent: &IntentRecord,
    ) -> Result<Vec<NetworkInterface>, ProvisionError> {
        let mut out = self
            .cloud
            .describe_enis(&[Filter::tag(TAG_INTENT, &intent.id)])
            .await?;
        if let Some(id) = &intent.eni_id
            && !out.iter().any(|e| &e.id == id)
        {
            match self
                .cloud
                .describe_enis(&[Filter::eq("network-interface-id", id)])
                .await
            {
                Ok(v) => out.extend(v),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Detaches (if attached) and deletes an ENI that holds no pods.
    async fn remove_eni_in_ec2(&self, eni: &NetworkInterface) -> Result<(), ProvisionError> {
        if let Some(att) = &eni.attachment {
            if att.instance_id == self.node.instance_id
                && let Err(e) = self.net.teardown_eni(att.device_index, eni.primary_ip)
            {
                warn!(eni = %eni.id, "removing the ENI's table and rule: {e}");
            }
            match self.cloud.detach(&att.attachment_id).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
            self.wait_detached(&eni.id).await?;
        }
        match self.cloud.delete_eni(&eni.id).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        info!(eni = %eni.id, "ENI deleted");
        Ok(())
    }

    async fn wait_detached(&self, eni_id: &str) -> Result<(), ProvisionError> {
        let mut delay = Duration::from_millis(100);
        for _ in 0..40 {
            let v = match self
                .cloud
                .describe_enis(&[Filter::eq("network-interface-id", eni_id)])
                .await
            {
                Ok(v) => v,
                Err(e) if e.is_not_found() => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            match v.first() {
                None => return Ok(()),
                Some(e) if e.attachment.is_none() || e.status == "available" => return Ok(()),
                Some(_) => {}
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        Err(ProvisionError::StillAttached {
            eni: eni_id.to_owned(),
        })
    }

    /// Deletes ENIs tagged with this instance that are not attached (status `available`).
    pub async fn delete_leaked(&self) -> Result<(), ProvisionError> {
        let leaked = self
            .cloud
            .describe_enis(&[
                Filter::tag(TAG_INSTANCE, &self.node.instance_id),
                Filter::eq("status", "available"),
            ])
            .await?;
        for eni in leaked {
            if eni.tags.get(TAG_NO_MANAGE).map(String::as_str) == Some("true")
                || eni.attachment.is_some()
            {
                continue;
            }
            warn!(eni = %eni.id, "deleting a leaked ENI (tagged with this instance, not attached)");
            self.remove_eni_in_ec2(&eni).await?;
        }
        Ok(())
    }

    /// Plans and executes one action. `Ok(None)`: the pool is where the targets want it (or
    /// as close as limits allow).
    pub async fn step(&self) -> Result<Option<Action>, ProvisionError> {
        let action = {
            let mut st = self.lock();
            let now = st.now();
            let usage = st.pool().usage(now);
            let created = st.eni_created.clone();
            let age = move |id: &str| {
                created
                    .get(id)
                    .map(|c| now.saturating_sub(*c))
                    .unwrap_or(u64::MAX)
            };
            let ages = Ages {
                age_ms: &age,
                min_eni_age_ms: self.settings.min_eni_age.as_millis() as u64,
            };
            let demand = Demand {
                pending: st.pending,
            };
            let action = planner::plan(
                &usage,
                &self.settings.targets,
                &self.settings.limits,
                demand,
                &ages,
            );
            if action.is_none() {
                st.blocker = self.blocker(&usage, st.pending);
                st.pending = 0;
            }
            action
        };
        let Some(action) = action else {
            return Ok(None);
        };
        if matches!(action, Action::Assign { .. } | Action::CreateEni { .. })
            && let Some(until) = *self
                .subnet_full_until
                .lock()
                .unwrap_or_else(|p| p.into_inner())
            && Instant::now() < until
        {
            return Ok(None);
        }
        if matches!(action, Action::Unassign { .. })
            && let Some(last) = *self.last_decrease.lock().unwrap_or_else(|p| p.into_inner())
            && last.elapsed() < self.settings.decrease_interval
        {
            return Ok(None);
        }
        debug!(?action, "pool action");
        let result = match &action {
            Action::Assign { eni_id, count } => self.assign(eni_id, *count).await,
            Action::CreateEni { ips } => self.create_eni(*ips).await,
            Action::Unassign { eni_id, ips } => self.unassign(eni_id, ips).await,
            Action::DeleteEni { eni_id } => self.delete_eni(eni_id).await,
        };
        if let Err(ProvisionError::Cloud(e)) = &result
            && matches!(
                e.code(),
                Some("InsufficientFreeAddressesInSubnet" | "InsufficientCidrBlocks")
            )
        {
            *self
                .subnet_full_until
                .lock()
                .unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + self.settings.subnet_full_backoff);
            self.lock().blocker = Some(format!(
                "subnet {} has no free addresses (EC2: {}); free addresses in the subnet or add a subnet",
                self.node.subnet_id,
                e.code().unwrap_or_default()
            ));
        }
        result.map(|()| Some(action))
    }

    /// Why no action helps the pending ADDs (None when nothing is pending).
    fn blocker(&self, usage: &[ipam::EniUsage], pending: u32) -> Option<String> {
        if pending == 0 {
            return None;
        }
        let t = planner::totals(usage);
        let l = &self.settings.limits;
        if t.total >= l.max_enis * l.ips_per_eni {
            return Some(self.limit_message());
        }
        if t.total >= l.max_pods {
            return Some(format!(
                "node at its max-pods ceiling of {} addresses ({} ENIs × {} secondary IPs for {}, capped at max pods)",
                l.max_pods, l.max_enis, l.ips_per_eni, self.node.instance_type
            ));
        }
        None
    }

    /// "node at its limit of 27 pod IPs: 3 ENIs × 9 secondary IPs for m5.large"
    pub fn limit_message(&self) -> String {
        let l = &self.settings.limits;
        format!(
            "node at its limit of {} pod IPs: {} ENIs × {} secondary IPs for {}",
            l.max_enis * l.ips_per_eni,
            l.max_enis,
            l.ips_per_eni,
            self.node.instance_type
        )
    }

    async fn assign(&self, eni_id: &str, count: u32) -> Result<(), ProvisionError> {
        let ips = match self.cloud.assign_ips(eni_id, count).await {
            Ok(ips) => ips,
            Err(e) if e.code() == Some("PrivateIpAddressLimitExceeded") => {
                // EC2 holds more addresses on this ENI than the pool knows (an earlier answer
                // was lost): take EC2's list, so the planner stops asking for the same room.
                self.sync_eni_from_ec2(eni_id).await?;
                return Err(e.into());
            }
            Err(e) => return Err(e.into()),
        };
        let mut st = self.lock();
        let known = st.pool().ips_of(eni_id);
        let new: Vec<Ipv4Addr> = ips.into_iter().filter(|ip| !known.contains(ip)).collect();
        st.pool_mut()
            .add_ips(eni_id, &new)
            .map_err(pool(format!("adding addresses to ENI {eni_id}")))?;
        st.pending = st.pending.saturating_sub(new.len() as u32);
        st.blocker = None;
        info!(eni = %eni_id, count = new.len(), "assigned secondary IPs");
        Ok(())
    }

    /// Adds to the pool the secondary addresses EC2 lists for `eni_id` that the pool lacks.
    async fn sync_eni_from_ec2(&self, eni_id: &str) -> Result<(), ProvisionError> {
        let enis = self
            .cloud
            .describe_enis(&[Filter::eq("network-interface-id", eni_id)])
            .await?;
        let Some(eni) = enis.first() else {
            return Ok(());
        };
        let mut st = self.lock();
        let known = st.pool().ips_of(eni_id);
        let missing: Vec<Ipv4Addr> = eni
            .secondary_ips
            .iter()
            .copied()
            .filter(|ip| !known.contains(ip))
            .collect();
        if !missing.is_empty() {
            warn!(eni = %eni_id, ?missing, "EC2 lists addresses the pool did not know; adding them");
            st.pool_mut()
                .add_ips(eni_id, &missing)
                .map_err(pool(format!("syncing ENI {eni_id} with EC2")))?;
        }
        Ok(())
    }

    fn next_device_index(&self, st: &State) -> u32 {
        let mut used: Vec<u32> = st.pool().enis().iter().map(|e| e.device_number).collect();
        used.extend(&self.settings.reserved_devices);
        used.extend(st.intents.values().filter_map(|i| i.device_index));
        (1..)
            .find(|d| !used.contains(d))
            .expect("a free device index")
    }

    async fn create_eni(&self, ips: u32) -> Result<(), ProvisionError> {
        let intent = {
            let mut st = self.lock();
            let intent = IntentRecord {
                id: new_intent_id(),
                op: IntentOp::Create,
                eni_id: None,
                attachment_id: None,
                device_index: Some(self.next_device_index(&st)),
                started_ms: st.now(),
            };
            st.intents.insert(intent.id.clone(), intent.clone());
            self.save(&st)?;
            intent
        };
        match self.create_eni_steps(&intent, ips).await {
            Ok(()) => Ok(()),
            Err(e) => {
                warn!(intent = %intent.id, "creating an ENI failed: {e}; undoing");
                // Undo now; if that fails too, the intent stays and the next round retries.
                let undo = async {
                    for eni in self.intent_enis(&intent).await? {
                        if !self.lock().pool().has_eni(&eni.id) {
                            self.remove_eni_in_ec2(&eni).await?;
                        }
                    }
                    let mut st = self.lock();
                    st.intents.remove(&intent.id);
                    self.save(&st)
                };
                if let Err(u) = undo.await {
                    warn!(intent = %intent.id, "undoing failed, will retry: {u}");
                }
                Err(e)
            }
        }
    }

    async fn create_eni_steps(
        &self,
        intent: &IntentRecord,
        ips: u32,
    ) -> Result<(), ProvisionError> {
        let device_index = intent
            .device_index
            .expect("create intents carry a device index");
        let now = self.lock().now();
        let mut tags = self.node.additional_tags.clone();
        tags.insert(TAG_INSTANCE.into(), self.node.instance_id.clone());
        if let Some(created) = rfc3339(now) {
            tags.insert(TAG_CREATED.into(), created);
        }
        tags.insert(TAG_INTENT.into(), intent.id.clone());
        if let Some(cluster) = &self.node.cluster_name {
            tags.insert(TAG_CLUSTER.into(), cluster.clone());
            tags.insert(TAG_OWNER.into(), "amazon-vpc-cni".into());
        }
        let eni = self
            .cloud
            .create_eni(&NewEni {
                subnet_id: self.node.subnet_id.clone(),
                private_ip: None,
                security_groups: self.node.security_groups.clone(),
                description: format!("aws-K8S-{}", self.node.instance_id),
                tags,
                secondary_ip_count: ips,
            })
            .await?;
        self.record(intent, |i| i.eni_id = Some(eni.id.clone()))?;
        let attachment = self
            .cloud
            .attach(&eni.id, &self.node.instance_id, device_index)
            .await?;
        self.record(intent, |i| i.attachment_id = Some(attachment.clone()))?;
        self.cloud
            .set_delete_on_termination(&eni.id, &attachment)
            .await?;

        let setup = dataplane::EniSetup {
            mac: eni.mac.clone(),
            device_number: device_index,
            primary_ip: eni.primary_ip,
            subnet: self.node.subnet,
            mtu: self.node.eni_mtu,
        };
        let net = self.net.clone();
        let ifname = tokio::task::spawn_blocking(move || net.setup_eni(&setup))
            .await
            .map_err(ProvisionError::SetupTask)?
            .map_err(|source| ProvisionError::Node {
                eni: eni.id.clone(),
                source,
            })?;

        let mut st = self.lock();
        let now = st.now();
        st.pool_mut()
            .add_eni(
                EniInfo {
                    id: eni.id.clone(),
                    device_number: device_index,
                    subnet: self.node.subnet,
                    primary_ip: eni.primary_ip,
                },
                &eni.secondary_ips,
            )
            .map_err(pool(format!("adding ENI {} to the pool", eni.id)))?;
        st.eni_created.insert(eni.id.clone(), now);
        st.intents.remove(&intent.id);
        st.pending = st.pending.saturating_sub(eni.secondary_ips.len() as u32);
        st.blocker = None;
        self.save(&st)?;
        info!(eni = %eni.id, %ifname, device = device_index, ips = eni.secondary_ips.len(), "ENI created and attached");
        Ok(())
    }

    fn record(
        &self,
        intent: &IntentRecord,
        f: impl FnOnce(&mut IntentRecord),
    ) -> Result<(), ProvisionError> {
        let mut st = self.lock();
        if let Some(i) = st.intents.get_mut(&intent.id) {
            f(i);
        }
        self.save(&st)
    }

    async fn unassign(&self, eni_id: &str, ips: &[Ipv4Addr]) -> Result<(), ProvisionError> {
        {
            // Out of the pool first, so no ADD can take them while EC2 releases them.
            let mut st = self.lock();
            let now = st.now();
            st.pool_mut()
                .remove_ips(eni_id, ips, now)
                .map_err(pool(format!("releasing addresses of ENI {eni_id}")))?;
        }
        *self.last_decrease.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        if let Err(e) = self.cloud.unassign_ips(eni_id, ips).await {
            let mut st = self.lock();
            let _ = st.pool_mut().add_ips(eni_id, ips);
            return Err(e.into());
        }
        info!(eni = %eni_id, count = ips.len(), "released surplus secondary IPs");
        Ok(())
    }

    async fn delete_eni(&self, eni_id: &str) -> Result<(), ProvisionError> {
        let intent = {
            let mut st = self.lock();
            let info = st
                .pool_mut()
                .remove_eni(eni_id)
                .map_err(pool(format!("removing ENI {eni_id} from the pool")))?;
            let intent = IntentRecord {
                id: new_intent_id(),
                op: IntentOp::Delete,
                eni_id: Some(eni_id.to_string()),
                attachment_id: None,
                device_index: Some(info.device_number),
                started_ms: st.now(),
            };
            st.intents.insert(intent.id.clone(), intent.clone());
            st.eni_created.remove(eni_id);
            self.save(&st)?;
            intent
        };
        for eni in self.intent_enis(&intent).await? {
            self.remove_eni_in_ec2(&eni).await?;
        }
        let mut st = self.lock();
        st.intents.remove(&intent.id);
        self.save(&st)?;
        Ok(())
    }

    /// Runs until the process ends: re-plans on every wake-up (an ADD found no address) and
    /// every `interval`, executing actions until the pool is at its targets.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let pending_intents = !self.lock().intents.is_empty();
            let outcome = async {
                if pending_intents {
                    self.recover().await?;
                }
                for _ in 0..32 {
                    if self.step().await?.is_none() {
                        break;
                    }
                }
                Ok::<(), ProvisionError>(())
            }
            .await;
            match outcome {
                Ok(()) => {
                    backoff = Duration::from_millis(500);
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(self.settings.interval) => {}
                    }
                }
                Err(e) => {
                    // Back off whatever wakes us: EC2 may be throttling.
                    warn!("pool provisioning: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
