//! The EC2 fidelity proxy: an HTTP server in front of moto (on 127.0.0.1:1339 in every instance
//! namespace) that parses each EC2 Query API request and behaves like EC2 where moto does not
//! (see `fidelity`): instance-type limits, InUse on delete of an attached ENI, only the new
//! addresses in the AssignPrivateIpAddresses answer, a subnet address budget, token-bucket
//! throttling, injected latency and errors, EC2's error document, and call counts by action.
//!
//! Custom networking's rules moto skips: a new ENI's security groups must exist and belong to
//! its subnet's VPC (`InvalidSecurityGroupID.NotFound`, `InvalidParameter`), and an ENI
//! attaches only to an instance of its subnet's zone (`InvalidParameterCombination`).
//!
//! IPv4 prefixes, which moto lacks entirely, the proxy does itself: it chooses aligned free
//! /28s (or refuses with InsufficientCidrBlocks, also on a subnet the `subnet-fragmented` knob
//! marks), counts them against the ENI's address slots, checks Nitro, keeps them in moto as a
//! tag of the ENI (`fidelity::PREFIX_TAG`) and answers the prefix calls itself; every answer
//! that lists ENIs shows them as EC2's `ipv4PrefixSet`, never the tag.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use cloud::{Filter, InstanceTypeInfo};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::fidelity::{
    self, Buckets, CallCount, Ec2Error, Knobs, KnobsFile, PrefixAsk, Query, Stats, SubnetUse,
};
use crate::world::World;

/// An HTTP answer: status, headers (lower-case names), body.
pub type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// Shared by the proxies of all instances (EC2 is one account and region).
/// An HTTP/1.1 client (hyper) for plain-HTTP moto.
type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub struct Proxy {
    moto: SocketAddr,
    client: HttpClient,
    /// Direct to moto, for the lookups the checks need.
    ec2: cloud::Ec2,
    /// The EC2 state as the daemon last loaded it (instance types, subnets).
    world: watch::Receiver<World>,
    knobs: Mutex<KnobsFile>,
    buckets: Mutex<Buckets>,
    stats: Mutex<Stats>,
    stats_file: Option<std::path::PathBuf>,
    /// Checks and mutating calls run one at a time, so a check sees the state the call changes.
    mutate: tokio::sync::Mutex<()>,
    type_info: Mutex<HashMap<String, InstanceTypeInfo>>,
    /// ENI id → when its last attach through the proxy succeeded (hot-plug delay).
    attached_at: Mutex<HashMap<String, Instant>>,
    /// Knob generation and each subnet's AvailableIpAddressCount when `subnet-free` was set.
    subnet_base: Mutex<Option<(u64, BTreeMap<String, i64>)>>,
    /// Notified after every successful mutating call (the daemon reloads the world).
    pub kick: Arc<Notify>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("moto", &self.moto).finish()
    }
}

/// What a check learned that the call and its answer need.
#[derive(Default)]
struct Pre {
    /// AssignPrivateIpAddresses: the ENI's addresses before the call.
    before: Option<Vec<Ipv4Addr>>,
    /// The request to send to moto instead (addresses chosen by the proxy).
    body: Option<String>,
    /// A call the proxy answers itself instead of moto (prefixes).
    local: Option<Local>,
}

/// An ENI's prefixes changed by the proxy: what to keep in its tag, and the answer.
struct Local {
    eni: String,
    prefixes: Vec<ipnet::Ipv4Net>,
    answer: String,
}

impl Proxy {
    pub fn new(
        moto: SocketAddr,
        region: &str,
        world: watch::Receiver<World>,
        knobs_file: std::path::PathBuf,
        stats_file: Option<std::path::PathBuf>,
    ) -> Arc<Proxy> {
        Arc::new(Proxy {
            moto,
            client: http_client(),
            ec2: cloud::Ec2::for_endpoint(&format!("http://{moto}"), region),
            world,
            knobs: Mutex::new(KnobsFile::new(knobs_file)),
            buckets: Mutex::default(),
            stats: Mutex::default(),
            stats_file,
            mutate: tokio::sync::Mutex::new(()),
            type_info: Mutex::default(),
            attached_at: Mutex::default(),
            subnet_base: Mutex::new(None),
            kick: Arc::new(Notify::new()),
        })
    }

    /// The knobs in effect now (re-read when the file changes) and their generation.
    pub fn knobs(&self) -> (Knobs, u64) {
        let mut k = self.knobs.lock().unwrap_or_else(|p| p.into_inner());
        let cur = k.current().clone();
        (cur, k.generation)
    }

    /// When each ENI was last attached through the proxy.
    pub fn attach_times(&self) -> HashMap<String, Instant> {
        self.attached_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    #[cfg(test)]
    pub fn stats(&self) -> Stats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// An AttachNetworkInterface of `eni` did not happen: forget when it started.
    fn attach_failed(&self, eni: Option<&str>) {
        if let Some(eni) = eni {
            self.attached_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(eni);
        }
    }

    fn count(&self, instance: &str, action: &str, f: impl FnOnce(&mut CallCount)) {
        let mut s = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        f(s.entry(instance.to_string())
            .or_default()
            .entry(action.to_string())
            .or_default());
        if let Some(p) = &self.stats_file {
            let tmp = p.with_extension("json.tmp");
            let r = serde_json::to_vec_pretty(&*s)
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(std::fs::write(&tmp, b)?))
                .and_then(|()| Ok(std::fs::rename(&tmp, p)?));
            if let Err(e) = r {
                tracing::warn!("writing {}: {e:#}", p.display());
            }
        }
    }

    /// Serves the proxy on `listener` for `instance` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, instance: String) {
        let app = Router::new()
            .fallback(handle)
            .with_state((self, Arc::<str>::from(instance.as_str())));
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(instance, "EC2 proxy failed: {e}");
        }
    }

    async fn instance_type_info(&self, instance_type: &str) -> Result<InstanceTypeInfo, Ec2Error> {
        if let Some(i) = self
            .type_info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(instance_type)
        {
            return Ok(i.clone());
        }
        let i = self
            .ec2
            .describe_instance_type_info(instance_type)
            .await
            .map_err(|e| lookup_failed(format!("DescribeInstanceTypes {instance_type}: {e}")))?;
        self.type_info
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(instance_type.to_string(), i.clone());
        Ok(i)
    }

    async fn instance_type(&self, instance_id: &str) -> Result<String, Ec2Error> {
        if let Some(i) = self.world.borrow().instance_by_id(instance_id) {
            return Ok(i.instance_type.clone());
        }
        let v = self
            .ec2
            .describe_instances(&[instance_id.to_string()], &[])
            .await
            .map_err(|e| lookup_failed(format!("DescribeInstances {instance_id}: {e}")))?;
        v.first().map(|i| i.instance_type.clone()).ok_or_else(|| {
            Ec2Error::bad_request(
                "InvalidInstanceID.NotFound",
                format!("The instance ID '{instance_id}' does not exist"),
            )
        })
    }

    /// An ENI as EC2 would describe it (its prefixes included), `None` if it does not exist.
    async fn eni(&self, eni_id: &str) -> Result<Option<cloud::NetworkInterface>, Ec2Error> {
        match self.ec2.describe_network_interface(eni_id).await {
            Ok(e) => Ok(Some(fidelity::with_lab_prefixes(e))),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(lookup_failed(format!(
                "DescribeNetworkInterfaces {eni_id}: {e}"
            ))),
        }
    }

    /// ENIs matching `filter`, as EC2 would describe them.
    async fn enis(&self, filter: Filter) -> Result<Vec<cloud::NetworkInterface>, Ec2Error> {
        let what = format!(
            "DescribeNetworkInterfaces {}={:?}",
            filter.name, filter.values
        );
        Ok(self
            .ec2
            .describe_network_interfaces(&[], &[filter])
            .await
            .map_err(|e| lookup_failed(format!("{what}: {e}")))?
            .into_iter()
            .map(fidelity::with_lab_prefixes)
            .collect())
    }

    /// Every address and prefix in use in a subnet (all its ENIs), and its CIDR.
    async fn used_in_subnet(&self, subnet: &str) -> Result<SubnetUse, Ec2Error> {
        let cidr = self
            .world
            .borrow()
            .subnet(subnet)
            .map(|s| s.cidr)
            .ok_or_else(|| {
                Ec2Error::bad_request(
                    "InvalidSubnetID.NotFound",
                    format!("The subnet ID '{subnet}' does not exist in the lab's VPC"),
                )
            })?;
        let enis = self.enis(Filter::eq("subnet-id", subnet)).await?;
        Ok(SubnetUse::new(cidr, &enis))
    }

    /// Chooses `n` free addresses of the subnet as EC2 does (never one in use or inside a
    /// prefix, never one of the 4 AWS-reserved addresses or the broadcast address). moto picks
    /// random addresses of the whole CIDR, checked only against the same ENI, so it hands out
    /// duplicates and reserved addresses; the proxy asks moto for these exact addresses instead.
    fn allocate(used: &SubnetUse, subnet: &str, n: u32) -> Result<Vec<Ipv4Addr>, Ec2Error> {
        fidelity::pick_free(used.cidr, &used.taken(), n as usize).ok_or_else(|| {
            Ec2Error::bad_request(
                "InsufficientFreeAddressesInSubnet",
                format!("Insufficient free IP addresses in subnet {subnet}: asked for {n}"),
            )
        })
    }

    /// EC2's InvalidIPAddress.InUse for explicitly requested addresses (in use, or inside a
    /// prefix).
    fn check_free(used: &SubnetUse, ips: &[&str]) -> Result<(), Ec2Error> {
        let taken = used.taken();
        for ip in ips {
            if ip.parse::<Ipv4Addr>().is_ok_and(|a| taken.contains(&a)) {
                return Err(Ec2Error::bad_request(
                    "InvalidIPAddress.InUse",
                    format!("Address {ip} is in use."),
                ));
            }
        }
        Ok(())
    }

    /// The instance type of the instance an ENI is attached to, and what EC2 says of it.
    async fn attached_type(
        &self,
        e: &cloud::NetworkInterface,
    ) -> Result<Option<(String, String, InstanceTypeInfo)>, Ec2Error> {
        let Some(att) = &e.attachment else {
            return Ok(None);
        };
        let ty = self.instance_type(&att.instance_id).await?;
        let info = self.instance_type_info(&ty).await?;
        Ok(Some((att.instance_id.clone(), ty, info)))
    }

    /// Applies a [`Local`] call: the ENI's prefixes are kept in its tag in moto.
    async fn apply_local(&self, l: &Local) -> Result<(), cloud::CloudError> {
        let ids = [l.eni.clone()];
        if l.prefixes.is_empty() {
            self.ec2.delete_tags(&ids, &[fidelity::PREFIX_TAG]).await
        } else {
            let tags = [(
                fidelity::PREFIX_TAG.to_owned(),
                fidelity::prefix_tag_value(&l.prefixes),
            )]
            .into();
            self.ec2.create_tags(&ids, &tags).await
        }
    }

    /// What is left of the subnet's budget (`None`: unlimited).
    async fn subnet_left(
        &self,
        knobs: &Knobs,
        generation: u64,
        subnet: &str,
    ) -> Result<Option<i64>, Ec2Error> {
        let Some(free) = knobs.subnet_free else {
            return Ok(None);
        };
        let vpc = self.world.borrow().vpc_id.clone();
        // moto counts only addresses: a prefix takes its 16 addresses too.
        let mut now: BTreeMap<String, i64> = self
            .ec2
            .describe_subnets(&vpc)
            .await
            .map_err(|e| lookup_failed(format!("DescribeSubnets {vpc}: {e}")))?
            .into_iter()
            .map(|s| (s.id, i64::from(s.available_ip_address_count)))
            .collect();
        for e in self.enis(Filter::vpc(vpc)).await? {
            if let Some(n) = now.get_mut(&e.subnet_id) {
                *n -= i64::from(fidelity::PREFIX_SIZE) * e.prefixes.len() as i64;
            }
        }
        let base = {
            let mut b = self.subnet_base.lock().unwrap_or_else(|p| p.into_inner());
            match &*b {
                Some((g, m)) if *g == generation => m.clone(),
                _ => {
                    tracing::info!(free, "subnet budget set: counting from now");
                    *b = Some((generation, now.clone()));
                    now.clone()
                }
            }
        };
        let (Some(b), Some(n)) = (base.get(subnet), now.get(subnet)) else {
            return Ok(None);
        };
        let used_since = b - n;
        Ok(Some(i64::from(free) - used_since))
    }

    /// EC2's rules moto lacks, checked before the call reaches moto.
    async fn check(&self, q: &Query, knobs: &Knobs, generation: u64) -> Result<Pre, Ec2Error> {
        match q.action() {
            "AttachNetworkInterface" => self.check_attach(q).await,
            "DeleteNetworkInterface" => {
                let id = param(q, "NetworkInterfaceId")?;
                if let Some(e) = self.eni(&id).await? {
                    let att = e
                        .attachment
                        .as_ref()
                        .filter(|a| a.status != "detached")
                        .map(|a| a.instance_id.as_str());
                    fidelity::check_delete(&id, att)?;
                }
                Ok(Pre::default())
            }
            "AssignPrivateIpAddresses" => self.check_assign(q, knobs, generation).await,
            "UnassignPrivateIpAddresses" => self.check_unassign(q).await,
            "CreateNetworkInterface" => self.check_create(q, knobs, generation).await,
            "DescribeNetworkInterfaces" => Ok(Pre {
                body: fidelity::translate_prefix_filter(q),
                ..Pre::default()
            }),
            _ => Ok(Pre::default()),
        }
    }

    async fn check_attach(&self, q: &Query) -> Result<Pre, Ec2Error> {
        let instance = param(q, "InstanceId")?;
        let device = q.number("DeviceIndex")?.unwrap_or(0);
        let ty = self.instance_type(&instance).await?;
        let info = self.instance_type_info(&ty).await?;
        let attached = self.enis(Filter::attached_to(instance.clone())).await?;
        let devices: Vec<u32> = attached
            .iter()
            .filter_map(|e| e.attachment.as_ref().map(|a| a.device_index))
            .collect();
        fidelity::check_attach(&instance, &ty, info.limits.max_enis, &devices, device)?;
        if let Some(eni) = q.get("NetworkInterfaceId")
            && let Some(e) = self.eni(eni).await?
        {
            if !e.prefixes.is_empty() {
                fidelity::check_nitro(&instance, &ty, info.is_nitro())?;
            }
            let zones = {
                let w = self.world.borrow();
                let eni_zone = w.subnet(&e.subnet_id).map(|s| s.az.clone());
                let instance_zone = w.instance_by_id(&instance).map(|i| i.az.clone());
                eni_zone.zip(instance_zone)
            };
            if let Some((eni_zone, instance_zone)) = zones {
                fidelity::check_same_zone(eni, &eni_zone, &instance, &instance_zone)?;
            }
        }
        Ok(Pre::default())
    }

    /// The VPC of each security group a request names (`None`: no such group), from the
    /// world for the lab VPC's groups, else from moto.
    async fn group_vpcs(&self, groups: &[&str]) -> Result<Vec<Option<String>>, Ec2Error> {
        let mut out = Vec::with_capacity(groups.len());
        for g in groups {
            let known = {
                let w = self.world.borrow();
                w.security_groups
                    .iter()
                    .any(|sg| sg.id == *g)
                    .then(|| w.vpc_id.clone())
            };
            if known.is_some() {
                out.push(known);
                continue;
            }
            match self
                .ec2
                .describe_security_groups(&[g.to_string()], &[])
                .await
            {
                Ok(found) => out.push(found.into_iter().next().map(|sg| sg.vpc_id)),
                Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidGroup")) => out.push(None),
                Err(e) => return Err(lookup_failed(format!("DescribeSecurityGroups {g}: {e}"))),
            }
        }
        Ok(out)
    }

    /// AssignPrivateIpAddresses: addresses go to moto (as exact addresses the proxy chose),
    /// prefixes the proxy assigns itself.
    async fn check_assign(
        &self,
        q: &Query,
        knobs: &Knobs,
        generation: u64,
    ) -> Result<Pre, Ec2Error> {
        let id = param(q, "NetworkInterfaceId")?;
        let prefixes = q.prefix_ask()?;
        let more = q.assign_count()?;
        let Some(e) = self.eni(&id).await? else {
            return match prefixes {
                Some(_) => Err(eni_not_found(&id)),
                None => Ok(Pre::default()), // moto answers NotFound
            };
        };
        let before: Vec<Ipv4Addr> = e.all_ips().collect();
        let slots = before.len() as u32 + e.prefixes.len() as u32;
        let wanted = prefixes.as_ref().map_or(more, PrefixAsk::count);
        if let Some((instance, ty, info)) = self.attached_type(&e).await? {
            if prefixes.is_some() {
                fidelity::check_nitro(&instance, &ty, info.is_nitro())?;
            }
            // EC2 counts addresses and prefixes against the same per-interface limit.
            fidelity::check_ip_limit(&id, &ty, info.limits.ipv4_per_eni, slots, wanted)?;
        }
        let addresses = match prefixes {
            Some(_) => wanted.saturating_mul(fidelity::PREFIX_SIZE),
            None => more,
        };
        if let Some(left) = self.subnet_left(knobs, generation, &e.subnet_id).await? {
            fidelity::check_subnet_budget(&e.subnet_id, left, addresses)?;
        }
        let used = self.used_in_subnet(&e.subnet_id).await?;
        if let Some(ask) = prefixes {
            let new = used.grant(&e.subnet_id, &ask, knobs.is_fragmented(&e.subnet_id))?;
            let mut all = e.prefixes.clone();
            all.extend(&new);
            return Ok(Pre {
                local: Some(Local {
                    answer: fidelity::assign_prefixes_answer(&id, &new, &fidelity::request_id()),
                    eni: id,
                    prefixes: all,
                }),
                ..Pre::default()
            });
        }
        let explicit = q.list("PrivateIpAddress");
        let body = if explicit.is_empty() && more > 0 {
            let ips = Self::allocate(&used, &e.subnet_id, more)?;
            Some(fidelity::assign_exact_body(q, &ips))
        } else {
            Self::check_free(&used, &explicit)?;
            None
        };
        Ok(Pre {
            before: Some(before),
            body,
            local: None,
        })
    }

    /// UnassignPrivateIpAddresses: addresses go to moto, prefixes the proxy releases itself.
    async fn check_unassign(&self, q: &Query) -> Result<Pre, Ec2Error> {
        let asked = q.unassign_prefixes()?;
        if asked.is_empty() {
            return Ok(Pre::default());
        }
        let id = param(q, "NetworkInterfaceId")?;
        let e = self.eni(&id).await?.ok_or_else(|| eni_not_found(&id))?;
        let left = fidelity::release_prefixes(&id, &e.prefixes, &asked)?;
        Ok(Pre {
            local: Some(Local {
                eni: id,
                prefixes: left,
                answer: fidelity::unassign_answer(&fidelity::request_id()),
            }),
            ..Pre::default()
        })
    }

    /// CreateNetworkInterface: the proxy chooses the addresses (and prefixes, which moto gets
    /// as the ENI's prefix tag).
    async fn check_create(
        &self,
        q: &Query,
        knobs: &Knobs,
        generation: u64,
    ) -> Result<Pre, Ec2Error> {
        let subnet = param(q, "SubnetId")?;
        let prefixes = q.prefix_ask()?;
        let n_prefixes = prefixes.as_ref().map_or(0, PrefixAsk::count);
        let n = q.create_count()?;
        let groups = q.list("SecurityGroupId");
        let (subnet_vpc, default_group) = {
            let w = self.world.borrow();
            (
                w.subnet(&subnet).map(|_| w.vpc_id.clone()),
                w.security_group_named("default").map(|g| g.id.clone()),
            )
        };
        if let Some(vpc) = subnet_vpc
            && !groups.is_empty()
        {
            let vpcs = self.group_vpcs(&groups).await?;
            let found: Vec<(&str, Option<&str>)> = groups
                .iter()
                .zip(&vpcs)
                .map(|(g, v)| (*g, v.as_deref()))
                .collect();
            fidelity::check_groups(&subnet, &vpc, &found)?;
        }
        // The ENI's own groups (EC2: the VPC's default group when none is given), kept in a
        // tag: moto describes an attached ENI with its instance's groups too.
        let own = if groups.is_empty() {
            default_group
        } else {
            Some(groups.join(","))
        };
        let tagged = own.map(|g| fidelity::create_with_tag(q, fidelity::GROUPS_TAG, &g));
        let q = tagged.as_ref().unwrap_or(q);
        // Not attached yet: the most any instance type of the lab allows.
        let types: Vec<String> = {
            let w = self.world.borrow();
            let mut t: Vec<String> = w
                .instances
                .iter()
                .map(|i| i.instance_type.clone())
                .collect();
            t.sort();
            t.dedup();
            t
        };
        let mut best: Option<(String, u32)> = None;
        for t in types {
            let l = self.instance_type_info(&t).await?.limits;
            if best.as_ref().is_none_or(|(_, b)| l.ipv4_per_eni > *b) {
                best = Some((t, l.ipv4_per_eni));
            }
        }
        if let Some((ty, per)) = best {
            fidelity::check_ip_limit("the new interface", &ty, per, 0, n + n_prefixes)?;
        }
        if let Some(left) = self.subnet_left(knobs, generation, &subnet).await? {
            let addresses = n + n_prefixes.saturating_mul(fidelity::PREFIX_SIZE);
            fidelity::check_subnet_budget(&subnet, left, addresses)?;
        }
        let mut used = self.used_in_subnet(&subnet).await?;
        let listed = q.list_field("PrivateIpAddresses", "PrivateIpAddress");
        if !listed.is_empty() {
            // (with prefixes, `prefix_ask` has refused this)
            Self::check_free(&used, &listed)?;
            return Ok(Pre {
                body: Some(q.encode()),
                ..Pre::default()
            });
        }
        let primary = q.get("PrivateIpAddress");
        if let Some(p) = primary {
            Self::check_free(&used, &[p])?;
        }
        let secondaries = q.number("SecondaryPrivateIpAddressCount")?.unwrap_or(0);
        let fresh = Self::allocate(&used, &subnet, secondaries + u32::from(primary.is_none()))?;
        let mut ips: Vec<Ipv4Addr> = Vec::new();
        if let Some(p) = primary {
            ips.push(p.parse().map_err(|_| {
                Ec2Error::bad_request(
                    "InvalidParameterValue",
                    format!("Value ({p}) for parameter PrivateIpAddress is invalid."),
                )
            })?);
        }
        ips.extend(fresh);
        let body = match prefixes {
            None => fidelity::create_exact_body(q, &ips),
            Some(ask) => {
                used.addrs.extend(&ips);
                let chosen = used.grant(&subnet, &ask, knobs.is_fragmented(&subnet))?;
                fidelity::create_exact_body(&fidelity::create_with_prefix_tag(q, &chosen), &ips)
            }
        };
        Ok(Pre {
            body: Some(body),
            ..Pre::default()
        })
    }

    /// Sends the request to moto (hyper's HTTP/1.1 client) and returns its answer.
    async fn forward(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<Answer> {
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let mut req = axum::http::Request::builder()
            .method(method.clone())
            .uri(format!("http://{}{path}", self.moto));
        for (k, v) in headers {
            if !is_hop(k.as_str()) && k != "host" {
                req = req.header(k, v);
            }
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body)))
            .context("building the request to moto")?;
        let exchange = async {
            let resp = self.client.request(req).await?;
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect();
            let body = resp.into_body().collect().await?.to_bytes().to_vec();
            Ok::<Answer, Box<dyn std::error::Error + Send + Sync>>((status, headers, body))
        };
        tokio::time::timeout(Duration::from_secs(60), exchange)
            .await
            .context("moto did not answer within 60 s")?
            .map_err(|e| anyhow::anyhow!("talking to moto at {}: {e}", self.moto))
    }
}

/// A required request parameter (EC2's MissingParameter).
fn param(q: &Query, k: &str) -> Result<String, Ec2Error> {
    q.get(k).map(str::to_string).ok_or_else(|| {
        Ec2Error::bad_request(
            "MissingParameter",
            format!("The request must contain the parameter {k}"),
        )
    })
}

fn eni_not_found(eni: &str) -> Ec2Error {
    Ec2Error::bad_request(
        "InvalidNetworkInterfaceID.NotFound",
        format!("The networkInterface ID '{eni}' does not exist"),
    )
}

fn lookup_failed(detail: String) -> Ec2Error {
    tracing::warn!("EC2 proxy lookup failed: {detail}");
    Ec2Error::internal()
}

fn is_hop(name: &str) -> bool {
    matches!(
        name,
        "connection"
            | "keep-alive"
            | "transfer-encoding"
            | "content-length"
            | "expect"
            | "upgrade"
            | "proxy-connection"
            | "te"
            | "trailer"
    )
}

fn error_response(e: &Ec2Error) -> Response {
    let id = fidelity::request_id();
    (
        StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [("content-type", "text/xml;charset=UTF-8")],
        e.xml(&id),
    )
        .into_response()
}

async fn handle(
    State((proxy, instance)): State<(Arc<Proxy>, Arc<str>)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let q = Query::parse(&body, uri.query());
    let action = q.action().to_string();
    let (knobs, generation) = proxy.knobs();
    proxy.count(&instance, &action, |c| c.calls += 1);
    if knobs.ec2_latency_ms > 0 {
        tokio::time::sleep(fidelity::ms(knobs.ec2_latency_ms)).await;
    }
    let admitted = proxy
        .buckets
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .admit(knobs.ec2_throttle, &action, Instant::now());
    if !admitted {
        tracing::debug!(%instance, %action, "throttled (token bucket empty)");
        proxy.count(&instance, &action, |c| c.throttled += 1);
        return error_response(&Ec2Error::throttled());
    }
    if knobs.ec2_error_rate > 0.0 && fidelity::chance() < knobs.ec2_error_rate {
        let e = if fidelity::chance() < 0.5 {
            Ec2Error::throttled()
        } else {
            Ec2Error::internal()
        };
        tracing::debug!(%instance, %action, code = %e.code, "injected error");
        proxy.count(&instance, &action, |c| c.injected += 1);
        return error_response(&e);
    }
    let mutating = fidelity::is_mutating(&action);
    let _guard = if mutating {
        Some(proxy.mutate.lock().await)
    } else {
        None
    };
    let pre = match proxy.check(&q, &knobs, generation).await {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(%instance, %action, code = %e.code, "refused like EC2: {}", e.message);
            proxy.count(&instance, &action, |c| c.refused += 1);
            return error_response(&e);
        }
    };
    if let Some(local) = &pre.local {
        return match proxy.apply_local(local).await {
            Ok(()) => {
                proxy.count(&instance, &action, |c| c.ok += 1);
                proxy.kick.notify_one();
                tracing::info!(%instance, %action, eni = %local.eni, prefixes = ?local.prefixes, "IPv4 prefixes changed");
                (
                    StatusCode::OK,
                    [("content-type", "text/xml;charset=UTF-8")],
                    local.answer.clone(),
                )
                    .into_response()
            }
            Err(e) => {
                tracing::warn!(%instance, %action, "keeping the prefixes of {} in moto: {e}", local.eni);
                proxy.count(&instance, &action, |c| c.failed += 1);
                error_response(&Ec2Error::internal())
            }
        };
    }
    // The attach time is recorded before moto attaches, so the daemon never sees the ENI
    // attached without its hot-plug delay (it would plug it in at once, then unplug it).
    let attaching = (action == "AttachNetworkInterface")
        .then(|| q.get("NetworkInterfaceId").map(str::to_string))
        .flatten();
    if let Some(eni) = &attaching {
        proxy
            .attached_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(eni.clone(), Instant::now());
    }
    let send: &[u8] = pre.body.as_deref().map(str::as_bytes).unwrap_or(&body);
    let (status, hdrs, mut out) = match proxy.forward(&method, &uri, &headers, send).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%instance, %action, "forwarding to moto: {e:#}");
            proxy.count(&instance, &action, |c| c.failed += 1);
            proxy.attach_failed(attaching.as_deref());
            return error_response(&Ec2Error::internal());
        }
    };
    if (200..300).contains(&status) {
        proxy.count(&instance, &action, |c| c.ok += 1);
        if let Some(before) = &pre.before {
            out = fidelity::rewrite_assign(&String::from_utf8_lossy(&out), before).into_bytes();
        }
        let text = String::from_utf8_lossy(&out);
        if text.contains(fidelity::PREFIX_TAG) || text.contains(fidelity::GROUPS_TAG) {
            let w = proxy.world.borrow();
            let name = |g: &str| {
                w.security_groups
                    .iter()
                    .find(|sg| sg.id == g)
                    .map(|sg| sg.name.clone())
            };
            out = fidelity::rewrite_lab_tags(&text, action != "DescribeTags", &name).into_bytes();
        }
        if action == "ModifyNetworkInterfaceAttribute"
            && let Some(eni) = q.get("NetworkInterfaceId")
            && !q.list("SecurityGroupId").is_empty()
        {
            // The ENI's own groups changed: so does the tag that keeps them.
            let tags = [(
                fidelity::GROUPS_TAG.to_owned(),
                q.list("SecurityGroupId").join(","),
            )]
            .into();
            if let Err(e) = proxy.ec2.create_tags(&[eni.to_owned()], &tags).await {
                tracing::warn!(%instance, eni, "keeping the groups of {eni} in moto: {e}");
            }
        }
        if mutating {
            proxy.kick.notify_one();
        }
    } else {
        proxy.count(&instance, &action, |c| c.failed += 1);
        proxy.attach_failed(attaching.as_deref());
    }
    let mut resp = Response::new(axum::body::Body::from(out));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    for (k, v) in hdrs {
        if is_hop(&k) {
            continue;
        }
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
            resp.headers_mut().append(k, v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::PathBuf;

    /// moto with the seed provisioned, and the proxy in front of it on a loopback port.
    struct Rig {
        moto: testkit::moto::Moto,
        /// Straight to moto.
        direct: cloud::Ec2,
        vpc: String,
        world: World,
        tx: watch::Sender<World>,
        dir: PathBuf,
        knobs_file: PathBuf,
        proxy: Arc<Proxy>,
        addr: SocketAddr,
        /// Through the proxy.
        ec2: cloud::Ec2,
    }

    impl Rig {
        async fn new(name: &str) -> Rig {
            let moto = testkit::moto::Moto::for_test();
            let direct = cloud::Ec2::for_endpoint(&moto.endpoint(), "us-west-2");
            let vpc = crate::seed::provision_seed(&direct, crate::seed::INSTANCE_TYPE, false)
                .await
                .unwrap();
            let world = World::load(&direct, &vpc).await.unwrap();
            let (tx, _) = watch::channel(world.clone());
            let dir = std::env::temp_dir()
                .join(format!("vpclab-proxy-test-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let knobs_file = dir.join("fidelity.json");
            let (proxy, addr) = start_proxy(moto.addr, tx.subscribe(), &knobs_file).await;
            Rig {
                ec2: cloud::Ec2::for_endpoint(&format!("http://{addr}"), "us-west-2"),
                moto,
                direct,
                vpc,
                world,
                tx,
                dir,
                knobs_file,
                proxy,
                addr,
            }
        }

        /// Another proxy over the same moto and knobs (a restarted lab daemon).
        async fn restart_proxy(&self) -> (Arc<Proxy>, SocketAddr) {
            start_proxy(self.moto.addr, self.tx.subscribe(), &self.knobs_file).await
        }

        /// Replaces the knobs by defaults plus `key=value`.
        fn set_knob(&self, key: &str, value: &str) {
            let mut k = Knobs::default();
            k.set(key, value).unwrap();
            std::thread::sleep(Duration::from_millis(20)); // a new mtime
            k.save_to(&self.knobs_file).unwrap();
        }

        /// Reloads the world from moto, as the daemon does after a change.
        async fn reload(&mut self) {
            self.world = World::load(&self.direct, &self.vpc).await.unwrap();
            self.tx.send_replace(self.world.clone());
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn start_proxy(
        moto: SocketAddr,
        world: watch::Receiver<World>,
        knobs_file: &std::path::Path,
    ) -> (Arc<Proxy>, SocketAddr) {
        let proxy = Proxy::new(moto, "us-west-2", world, knobs_file.to_owned(), None);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(proxy.clone().serve(l, "instance1".into()));
        (proxy, addr)
    }

    /// Custom networking's EC2 side: an ENI in the pod subnet (the VPC's secondary CIDR) with
    /// the pods' security group is created and attached like any other; EC2's rules moto lacks
    /// hold: the groups must exist and be the VPC's, and an ENI of another zone's subnet does
    /// not attach.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pod_subnet_enis_follow_ec2s_zone_and_group_rules() {
        let r = Rig::new("pods").await;
        let (direct, world, ec2) = (&r.direct, &r.world, &r.ec2);
        let pods = crate::seed::pod_network(world).unwrap();
        let i1 = world.instance("instance1").unwrap();
        let mk = |subnet: &str, groups: &[&str]| cloud::NewEni {
            subnet_id: subnet.to_string(),
            security_groups: groups.iter().map(|g| g.to_string()).collect(),
            secondary_ip_count: 2,
            ..Default::default()
        };
        let sg = pods.security_group.as_str();
        let e = ec2
            .create_network_interface(&mk(&pods.subnet.id, &[sg]))
            .await
            .unwrap();
        assert!(pods.subnet.cidr.contains(&e.primary_ip), "{e:?}");
        assert!(e.secondary_ips.iter().all(|a| pods.subnet.cidr.contains(a)));
        assert_eq!(e.security_groups, [sg]);
        ec2.attach_network_interface(&e.id, &i1.id, 2)
            .await
            .unwrap();
        // Attached, it still has only its own group (moto alone adds the instance's), in the
        // proxy's answers and in the world.
        let seen = ec2.describe_network_interface(&e.id).await.unwrap();
        assert_eq!(seen.security_groups, [sg]);
        assert!(seen.tags.is_empty(), "{:?}", seen.tags);
        let raw = direct.describe_network_interface(&e.id).await.unwrap();
        assert_eq!(
            raw.security_groups.len(),
            2,
            "moto adds the instance's group"
        );
        let w = World::load(direct, &r.vpc).await.unwrap();
        let in_world = w
            .instance("instance1")
            .unwrap()
            .enis
            .iter()
            .find(|x| x.id == e.id);
        assert_eq!(in_world.unwrap().security_groups, [sg]);
        // An ENI made without groups has the VPC's default group, as on EC2.
        let plain = ec2
            .create_network_interface(&mk(&pods.subnet.id, &[]))
            .await
            .unwrap();
        let default = world.security_group_named("default").unwrap().id.clone();
        assert_eq!(plain.security_groups, [default]);
        ec2.delete_network_interface(&plain.id).await.unwrap();

        // An unknown group (moto would create it) and another VPC's group are refused.
        let err = ec2
            .create_network_interface(&mk(&pods.subnet.id, &[sg, "sg-0123456789abcdef0"]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("InvalidSecurityGroupID.NotFound"), "{err}");
        let default_vpc = direct
            .describe_vpcs(&[], &[Filter::eq("is-default", "true")])
            .await
            .unwrap();
        if let Some(v) = default_vpc.first() {
            let other = direct
                .describe_security_groups(&[], &[Filter::vpc(v.id.clone())])
                .await
                .unwrap();
            let g = &other.first().expect("the default VPC's default group").id;
            let err = ec2
                .create_network_interface(&mk(&pods.subnet.id, &[g]))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Some("InvalidParameter"), "{err}");
        }

        // The other zone's pod subnet: the ENI is made, but not attached to instance1.
        let far = ec2
            .create_network_interface(&mk(&pods.other_zone_subnet.id, &[sg]))
            .await
            .unwrap();
        let err = ec2
            .attach_network_interface(&far.id, &world.instance("instance2").unwrap().id, 1)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("InvalidParameterCombination"), "{err}");
        assert!(err.to_string().contains("availability zone"), "{err}");
    }

    /// The proxy in front of a real moto, driven with the real SDK (no root needed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proxy_behaves_like_ec2_in_front_of_moto() {
        let r = Rig::new("ec2").await;
        let (direct, world, proxy, addr, ec2) = (&r.direct, &r.world, &r.proxy, r.addr, &r.ec2);

        let i1 = world.instance("instance1").unwrap();
        let eth1 = i1.enis.iter().find(|e| e.device_index == 1).unwrap();
        // eth1 holds 1 + 2 addresses; m5.large allows 10 per ENI.
        let new = ec2
            .assign_private_ip_addresses(&eth1.id, &cloud::IpRequest::Count(2))
            .await
            .unwrap();
        assert_eq!(new.len(), 2);
        let err = ec2
            .assign_private_ip_addresses(&eth1.id, &cloud::IpRequest::Count(6))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("PrivateIpAddressLimitExceeded"), "{err}");
        // The raw answer lists only the new addresses (the SDK wrapper diffs anyway).
        let body = format!(
            "Action=AssignPrivateIpAddresses&Version=2016-11-15&NetworkInterfaceId={}&SecondaryPrivateIpAddressCount=1",
            eth1.id
        );
        let (status, xml) = raw_post(addr, &body).await;
        assert_eq!(status, 200, "{xml}");
        assert_eq!(xml.matches("<privateIpAddress>").count(), 1, "{xml}");
        assert!(!xml.contains(&eth1.primary_ip.to_string()), "{xml}");

        // Deleting an attached ENI: InUse, and the ENI is still there.
        let err = ec2.delete_network_interface(&eth1.id).await.unwrap_err();
        assert_eq!(err.code(), Some("InvalidNetworkInterface.InUse"), "{err}");
        assert!(direct.describe_network_interface(&eth1.id).await.is_ok());

        // A third ENI fits on an m5.large, a fourth does not.
        let subnet = i1.enis[0].subnet_id.clone();
        let mk = || cloud::NewEni {
            subnet_id: subnet.clone(),
            secondary_ip_count: 1,
            ..Default::default()
        };
        let e2 = ec2.create_network_interface(&mk()).await.unwrap();
        ec2.attach_network_interface(&e2.id, &i1.id, 2)
            .await
            .unwrap();
        let e3 = ec2.create_network_interface(&mk()).await.unwrap();
        let err = ec2
            .attach_network_interface(&e3.id, &i1.id, 3)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("AttachmentLimitExceeded"), "{err}");
        assert!(proxy.attach_times().contains_key(&e2.id));
        assert!(!proxy.attach_times().contains_key(&e3.id));
        let err = ec2
            .create_network_interface(&cloud::NewEni {
                secondary_ip_count: 10,
                ..mk()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("PrivateIpAddressLimitExceeded"), "{err}");
        // Detached, it can go.
        ec2.delete_network_interface(&e3.id).await.unwrap();

        // Addresses are unique in the subnet and never AWS-reserved (moto alone draws random
        // addresses of the whole CIDR and hands out duplicates).
        for _ in 0..6 {
            ec2.create_network_interface(&cloud::NewEni {
                secondary_ip_count: 9,
                ..mk()
            })
            .await
            .unwrap();
        }
        let all: Vec<Ipv4Addr> = direct
            .describe_network_interfaces(&[], &[Filter::eq("subnet-id", subnet.as_str())])
            .await
            .unwrap()
            .iter()
            .flat_map(|e| e.all_ips().collect::<Vec<_>>())
            .collect();
        let uniq: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(uniq.len(), all.len(), "duplicate addresses: {all:?}");
        assert!(all.len() > 60);
        let cidr = world.subnet(&subnet).unwrap().cidr;
        for a in &all {
            let off = u32::from(*a) - u32::from(cidr.network());
            assert!(off >= 4 && *a != cidr.broadcast(), "reserved address {a}");
        }
        // An address in use cannot be asked for again.
        let err = ec2
            .assign_private_ip_addresses(
                &e2.id,
                &cloud::IpRequest::Addresses(vec![eth1.primary_ip]),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("InvalidIPAddress.InUse"), "{err}");

        let s = proxy.stats();
        let c = s["instance1"]["AssignPrivateIpAddresses"];
        assert_eq!((c.calls, c.ok, c.refused), (4, 2, 2), "{c:?}");
        assert_eq!(s["instance1"]["AttachNetworkInterface"].refused, 1);
        assert_eq!(s["instance1"]["DeleteNetworkInterface"].ok, 1);

        // Throttling: a bucket of 2 with (almost) no refill; EC2's 503 document.
        r.set_knob("ec2-throttle", "2/0.001");
        let describe = "Action=DescribeVpcs&Version=2016-11-15";
        assert_eq!(raw_post(addr, describe).await.0, 200);
        assert_eq!(raw_post(addr, describe).await.0, 200);
        let (st, xml) = raw_post(addr, describe).await;
        assert_eq!(st, 503);
        assert!(
            xml.contains("<Code>RequestLimitExceeded</Code>") && xml.contains("<RequestID>"),
            "{xml}"
        );
        assert_eq!(proxy.stats()["instance1"]["DescribeVpcs"].throttled, 1);
        // Injected errors: every call fails with 503 or 500 and never reaches moto.
        r.set_knob("ec2-error-rate", "1");
        for _ in 0..6 {
            let (st, xml) = raw_post(addr, describe).await;
            assert!(
                (st == 503 && xml.contains("RequestLimitExceeded"))
                    || (st == 500 && xml.contains("InternalError")),
                "{st} {xml}"
            );
        }
        assert_eq!(proxy.stats()["instance1"]["DescribeVpcs"].injected, 6);
        // Subnet budget: 1 more address, then InsufficientFreeAddressesInSubnet.
        r.set_knob("subnet-free", "1");
        let eth0 = &i1.enis[0].id;
        ec2.assign_private_ip_addresses(eth0, &cloud::IpRequest::Count(1))
            .await
            .unwrap();
        let err = ec2
            .assign_private_ip_addresses(eth0, &cloud::IpRequest::Count(1))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Some("InsufficientFreeAddressesInSubnet"),
            "{err}"
        );
    }

    /// IPv4 prefixes, which moto lacks, with EC2's rules: through the proxy with the SDK
    /// (`cloud`'s prefix calls) and raw requests, checked against moto's state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prefixes_behave_like_ec2_in_front_of_moto() {
        let mut r = Rig::new("prefixes").await;
        let ec2 = r.ec2.clone();
        let i1 = r.world.instance("instance1").unwrap().clone();
        let eth1 = i1
            .enis
            .iter()
            .find(|e| e.device_index == 1)
            .unwrap()
            .clone();
        let subnet = eth1.subnet_id.clone();
        let cidr = r.world.subnet(&subnet).unwrap().cidr;
        let in_subnet = |direct: cloud::Ec2, subnet: String| async move {
            let enis: Vec<_> = direct
                .describe_network_interfaces(&[], &[Filter::eq("subnet-id", subnet)])
                .await
                .unwrap()
                .into_iter()
                .map(fidelity::with_lab_prefixes)
                .collect();
            SubnetUse::new(cidr, &enis)
        };
        let prefixes_of = |id: &str| {
            let (ec2, id) = (ec2.clone(), id.to_owned());
            async move {
                let e = ec2.describe_network_interfaces(&[id], &[]).await.unwrap();
                assert!(!e[0].tags.contains_key(fidelity::PREFIX_TAG), "{e:?}");
                e[0].prefixes.clone()
            }
        };

        // Two /28s, aligned, in the subnet, clear of every address in use.
        let got = ec2.assign_ipv4_prefixes(&eth1.id, 2).await.unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        let used = in_subnet(r.direct.clone(), subnet.clone()).await;
        for p in &got {
            assert_eq!((p.prefix_len(), p.trunc()), (28, *p));
            assert!(cidr.contains(p));
            assert!(
                !used.addrs.iter().any(|a| p.contains(a)),
                "{p} holds an address"
            );
        }
        assert_ne!(got[0], got[1]);
        assert_eq!(prefixes_of(&eth1.id).await, got);
        r.reload().await;
        let in_world = |w: &World| w.instance("instance1").unwrap().enis[1].prefixes.clone();
        assert_eq!(
            in_world(&r.world),
            got,
            "the world (fabric, IMDS, status) sees them"
        );

        // One slot each: 3 addresses + 2 prefixes of an m5.large's 10 leave 5 of either.
        for err in [
            ec2.assign_ipv4_prefixes(&eth1.id, 6).await.unwrap_err(),
            ec2.assign_private_ip_addresses(&eth1.id, &cloud::IpRequest::Count(6))
                .await
                .unwrap_err(),
        ] {
            assert_eq!(err.code(), Some("PrivateIpAddressLimitExceeded"), "{err}");
        }
        // An address inside a prefix is in use.
        let inside = Ipv4Addr::from(u32::from(got[0].network()) + 5);
        let err = ec2
            .assign_private_ip_addresses(&eth1.id, &cloud::IpRequest::Addresses(vec![inside]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("InvalidIPAddress.InUse"), "{err}");
        let assign = |extra: &str| {
            format!(
                "Action=AssignPrivateIpAddresses&Version=2016-11-15&NetworkInterfaceId={}&{extra}",
                eth1.id
            )
        };
        let (st, xml) = raw_post(
            r.addr,
            &assign("Ipv4PrefixCount=1&SecondaryPrivateIpAddressCount=1"),
        )
        .await;
        assert_eq!(st, 400, "{xml}");
        assert!(
            xml.contains("<Code>InvalidParameterCombination</Code>"),
            "{xml}"
        );
        // Explicit prefixes: one in use, one not aligned, then a free one.
        for bad in [got[0].to_string(), format!("{}/28", inside)] {
            let (st, xml) = raw_post(r.addr, &assign(&format!("Ipv4Prefix.1={bad}"))).await;
            assert_eq!(st, 400, "{xml}");
            assert!(
                xml.contains("<Code>InvalidParameterValue</Code>"),
                "{bad}: {xml}"
            );
        }
        let free = in_subnet(r.direct.clone(), subnet.clone())
            .await
            .free_prefixes(false)[0];
        let (st, xml) = raw_post(r.addr, &assign(&format!("Ipv4Prefix.1={free}"))).await;
        assert_eq!(st, 200, "{xml}");
        assert!(
            xml.contains(&format!("<assignedIpv4PrefixSet><item><ipv4Prefix>{free}</ipv4Prefix></item></assignedIpv4PrefixSet>")),
            "{xml}"
        );
        // EC2's filter (moto answers it with a 500).
        let by = ec2
            .describe_network_interfaces(
                &[],
                &[Filter::eq("ipv4-prefix.ipv4-prefix", free.to_string())],
            )
            .await
            .unwrap();
        assert_eq!(
            by.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            [eth1.id.as_str()]
        );

        // Unassign one; twice is an error; prefixes and addresses not together.
        ec2.unassign_ipv4_prefixes(&eth1.id, &[got[0]])
            .await
            .unwrap();
        assert_eq!(prefixes_of(&eth1.id).await, [got[1], free]);
        let err = ec2
            .unassign_ipv4_prefixes(&eth1.id, &[got[0]])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("InvalidParameterValue"), "{err}");
        let (st, xml) = raw_post(
            r.addr,
            &format!(
                "Action=UnassignPrivateIpAddresses&Version=2016-11-15&NetworkInterfaceId={}&Ipv4Prefix.1={free}&PrivateIpAddress.1={}",
                eth1.id, eth1.secondary_ips[0]
            ),
        )
        .await;
        assert_eq!(st, 400, "{xml}");
        assert!(xml.contains("InvalidParameterCombination"), "{xml}");

        // A fragmented subnet: no /28, single addresses still.
        r.set_knob("subnet-fragmented", "all");
        let err = ec2.assign_ipv4_prefixes(&eth1.id, 1).await.unwrap_err();
        assert!(err.is_insufficient_cidr_blocks(), "{err}");
        let (st, xml) = raw_post(r.addr, &assign("Ipv4PrefixCount=1")).await;
        assert_eq!(st, 400, "{xml}");
        assert!(xml.contains("<Code>InsufficientCidrBlocks</Code>"), "{xml}");
        let spec = cloud::NewEni {
            subnet_id: subnet.clone(),
            ..Default::default()
        };
        let err = ec2
            .create_network_interface_with_prefixes(&spec, 1)
            .await
            .unwrap_err();
        assert!(err.is_insufficient_cidr_blocks(), "{err}");
        let one = ec2
            .assign_private_ip_addresses(&eth1.id, &cloud::IpRequest::Count(1))
            .await
            .unwrap();
        assert_eq!(one.len(), 1);
        r.set_knob("subnet-fragmented", "none");

        // Prefixes at creation, in the create answer and in moto; they go with the ENI.
        let e = ec2
            .create_network_interface_with_prefixes(&spec, 2)
            .await
            .unwrap();
        assert_eq!(e.prefixes.len(), 2, "{e:?}");
        assert!(!e.tags.contains_key(fidelity::PREFIX_TAG));
        assert_eq!(prefixes_of(&e.id).await, e.prefixes);
        let taken = in_subnet(r.direct.clone(), subnet.clone()).await.prefixes;
        assert!(e.prefixes.iter().all(|p| taken.contains(p)));
        ec2.delete_network_interface(&e.id).await.unwrap();
        let taken = in_subnet(r.direct.clone(), subnet.clone()).await.prefixes;
        assert!(
            !e.prefixes.iter().any(|p| taken.contains(p)),
            "freed with the ENI"
        );

        // A /26 has two free /28s (reserved addresses at both ends): a third is refused,
        // while single addresses are still there.
        let small = r
            .direct
            .create_subnet(
                &r.vpc,
                "172.31.64.0/26".parse().unwrap(),
                "us-west-2a",
                &Default::default(),
            )
            .await
            .unwrap();
        r.reload().await;
        let e = ec2
            .create_network_interface(&cloud::NewEni {
                subnet_id: small.clone(),
                private_ip: Some("172.31.64.5".parse().unwrap()),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut two = ec2.assign_ipv4_prefixes(&e.id, 2).await.unwrap();
        two.sort();
        assert_eq!(
            two,
            [
                "172.31.64.16/28".parse::<ipnet::Ipv4Net>().unwrap(),
                "172.31.64.32/28".parse().unwrap()
            ]
        );
        let err = ec2.assign_ipv4_prefixes(&e.id, 1).await.unwrap_err();
        assert!(err.is_insufficient_cidr_blocks(), "{err}");
        let ip = ec2
            .assign_private_ip_addresses(&e.id, &cloud::IpRequest::Count(1))
            .await
            .unwrap();
        assert!(!two.iter().any(|p| p.contains(&ip[0])), "{ip:?}");

        // Nitro only: a t2.micro (Xen) gets none, nor an ENI that holds some.
        let t2 = r
            .direct
            .run_instance(
                crate::seed::IMAGE_ID,
                &subnet,
                "t2.micro",
                None,
                &[],
                &[("Name".to_string(), "xen".to_string())].into(),
            )
            .await
            .unwrap();
        r.reload().await;
        let t2_eni = t2.primary_eni().unwrap().id.clone();
        let err = ec2.assign_ipv4_prefixes(&t2_eni, 1).await.unwrap_err();
        assert_eq!(err.code(), Some("InvalidParameterValue"), "{err}");
        assert!(err.to_string().contains("Nitro"), "{err}");
        let err = ec2
            .attach_network_interface(&e.id, &t2.id, 1)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("InvalidParameterValue"), "{err}");

        // A restarted proxy (lab daemon) finds them in moto.
        let (_p2, addr2) = r.restart_proxy().await;
        let again = cloud::Ec2::for_endpoint(&format!("http://{addr2}"), "us-west-2");
        let e1 = again
            .describe_network_interfaces(std::slice::from_ref(&eth1.id), &[])
            .await
            .unwrap();
        assert_eq!(e1[0].prefixes, [got[1], free]);
        r.reload().await;
        assert_eq!(in_world(&r.world), [got[1], free]);
        // IMDS (built from the world) lists them under the ENI's MAC, as the agent reads it.
        use cloud::Metadata;
        let (_imds_tx, imds_rx) = watch::channel(r.world.clone());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let imds = l.local_addr().unwrap();
        let server =
            tokio::spawn(axum::serve(l, crate::imds::router(imds_rx, i1.id.clone())).into_future());
        let md = cloud::ImdsMetadata::with_endpoint(&format!("http://{imds}"))
            .unwrap()
            .instance()
            .await
            .unwrap();
        server.abort();
        let m = md.enis.iter().find(|m| m.interface_id == eth1.id).unwrap();
        assert_eq!(m.prefixes, [got[1], free]);
        assert!(
            md.enis
                .iter()
                .find(|m| m.device_number == 0)
                .unwrap()
                .prefixes
                .is_empty()
        );

        let s = r.proxy.stats();
        let c = s["instance1"]["AssignPrivateIpAddresses"];
        assert!(c.ok >= 5 && c.refused >= 6, "{c:?}");
        assert_eq!(s["instance1"]["UnassignPrivateIpAddresses"].ok, 1);
    }

    async fn raw_post(addr: SocketAddr, body: &str) -> (u16, String) {
        let req = axum::http::Request::post(format!("http://{addr}/"))
            .header(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=vpc-lab/20260101/us-west-2/ec2/aws4_request, SignedHeaders=host, Signature=0",
            )
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let resp = http_client().request(req).await.unwrap();
        let st = resp.status().as_u16();
        let b = resp.into_body().collect().await.unwrap().to_bytes();
        (st, String::from_utf8_lossy(&b).into_owned())
    }
}
