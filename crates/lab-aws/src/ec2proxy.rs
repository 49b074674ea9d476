//! The EC2 fidelity proxy: an HTTP server in front of moto (on 127.0.0.1:1339 in every instance
//! namespace) that parses each EC2 Query API request and behaves like EC2 where moto does not
//! (see `fidelity`): instance-type limits, InUse on delete of an attached ENI, only the new
//! addresses in the AssignPrivateIpAddresses answer, a subnet address budget, token-bucket
//! throttling, injected latency and errors, EC2's error document, and call counts by action.

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
use cloud::{Filter, InstanceTypeLimits};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use crate::fidelity::{self, Buckets, CallCount, Ec2Error, Knobs, KnobsFile, Query, Stats};
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
    type_limits: Mutex<HashMap<String, InstanceTypeLimits>>,
    /// ENI id → when its last attach through the proxy succeeded (hot-plug delay).
    attached_at: Mutex<HashMap<String, Instant>>,
    /// Knob generation and each subnet's AvailableIpAddressCount when `subnet-free` was set.
    subnet_base: Mutex<Option<(u64, BTreeMap<String, u32>)>>,
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
            type_limits: Mutex::default(),
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

    async fn instance_type_limits(
        &self,
        instance_type: &str,
    ) -> Result<InstanceTypeLimits, Ec2Error> {
        if let Some(l) = self
            .type_limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(instance_type)
        {
            return Ok(*l);
        }
        let l = self
            .ec2
            .describe_instance_types(instance_type)
            .await
            .map_err(|e| lookup_failed(format!("DescribeInstanceTypes {instance_type}: {e}")))?;
        self.type_limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(instance_type.to_string(), l);
        Ok(l)
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

    async fn eni(&self, eni_id: &str) -> Result<Option<cloud::NetworkInterface>, Ec2Error> {
        match self.ec2.describe_network_interface(eni_id).await {
            Ok(e) => Ok(Some(e)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(lookup_failed(format!(
                "DescribeNetworkInterfaces {eni_id}: {e}"
            ))),
        }
    }

    /// Every address in use in a subnet (all ENIs' addresses) and the subnet's CIDR.
    async fn used_in_subnet(
        &self,
        subnet: &str,
    ) -> Result<(ipnet::Ipv4Net, std::collections::BTreeSet<Ipv4Addr>), Ec2Error> {
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
        let enis = self
            .ec2
            .describe_network_interfaces(&[], &[Filter::eq("subnet-id", subnet)])
            .await
            .map_err(|e| lookup_failed(format!("DescribeNetworkInterfaces in {subnet}: {e}")))?;
        let used = enis.iter().flat_map(|e| e.all_ips()).collect();
        Ok((cidr, used))
    }

    /// Chooses `n` free addresses of the subnet as EC2 does (never one in use, never one of
    /// the 4 AWS-reserved addresses or the broadcast address). moto picks random addresses of
    /// the whole CIDR, checked only against the same ENI, so it hands out duplicates and
    /// reserved addresses; the proxy asks moto for these exact addresses instead.
    async fn allocate(&self, subnet: &str, n: u32) -> Result<Vec<Ipv4Addr>, Ec2Error> {
        let (cidr, used) = self.used_in_subnet(subnet).await?;
        fidelity::pick_free(cidr, &used, n as usize).ok_or_else(|| {
            Ec2Error::bad_request(
                "InsufficientFreeAddressesInSubnet",
                format!("Insufficient free IP addresses in subnet {subnet}: asked for {n}"),
            )
        })
    }

    /// EC2's InvalidIPAddress.InUse for explicitly requested addresses.
    async fn check_free(&self, subnet: &str, ips: &[&str]) -> Result<(), Ec2Error> {
        if ips.is_empty() {
            return Ok(());
        }
        let (_, used) = self.used_in_subnet(subnet).await?;
        for ip in ips {
            if ip.parse::<Ipv4Addr>().is_ok_and(|a| used.contains(&a)) {
                return Err(Ec2Error::bad_request(
                    "InvalidIPAddress.InUse",
                    format!("Address {ip} is in use."),
                ));
            }
        }
        Ok(())
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
        let now: BTreeMap<String, u32> = self
            .ec2
            .describe_subnets(&vpc)
            .await
            .map_err(|e| lookup_failed(format!("DescribeSubnets {vpc}: {e}")))?
            .into_iter()
            .map(|s| (s.id, s.available_ip_address_count))
            .collect();
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
        let used_since = i64::from(*b) - i64::from(*n);
        Ok(Some(i64::from(free) - used_since))
    }

    /// EC2's rules moto lacks, checked before the call reaches moto.
    async fn check(&self, q: &Query, knobs: &Knobs, generation: u64) -> Result<Pre, Ec2Error> {
        let param = |k: &str| {
            q.get(k).map(str::to_string).ok_or_else(|| {
                Ec2Error::bad_request(
                    "MissingParameter",
                    format!("The request must contain the parameter {k}"),
                )
            })
        };
        match q.action() {
            "AttachNetworkInterface" => {
                let instance = param("InstanceId")?;
                let device = q.number("DeviceIndex")?.unwrap_or(0);
                let ty = self.instance_type(&instance).await?;
                let limits = self.instance_type_limits(&ty).await?;
                let attached = self
                    .ec2
                    .describe_network_interfaces(&[], &[Filter::attached_to(instance.clone())])
                    .await
                    .map_err(|e| {
                        lookup_failed(format!("DescribeNetworkInterfaces of {instance}: {e}"))
                    })?;
                let devices: Vec<u32> = attached
                    .iter()
                    .filter_map(|e| e.attachment.as_ref().map(|a| a.device_index))
                    .collect();
                fidelity::check_attach(&instance, &ty, limits.max_enis, &devices, device)?;
                Ok(Pre::default())
            }
            "DeleteNetworkInterface" => {
                let id = param("NetworkInterfaceId")?;
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
            "AssignPrivateIpAddresses" => {
                let id = param("NetworkInterfaceId")?;
                let more = q.assign_count()?;
                let Some(e) = self.eni(&id).await? else {
                    return Ok(Pre::default()); // moto answers NotFound
                };
                let before: Vec<Ipv4Addr> = e.all_ips().collect();
                if let Some(att) = &e.attachment {
                    let ty = self.instance_type(&att.instance_id).await?;
                    let limits = self.instance_type_limits(&ty).await?;
                    fidelity::check_ip_limit(
                        &id,
                        &ty,
                        limits.ipv4_per_eni,
                        before.len() as u32,
                        more,
                    )?;
                }
                if let Some(left) = self.subnet_left(knobs, generation, &e.subnet_id).await? {
                    fidelity::check_subnet_budget(&e.subnet_id, left, more)?;
                }
                let explicit = q.list("PrivateIpAddress");
                let body = if explicit.is_empty() && more > 0 {
                    let ips = self.allocate(&e.subnet_id, more).await?;
                    Some(fidelity::assign_exact_body(q, &ips))
                } else {
                    self.check_free(&e.subnet_id, &explicit).await?;
                    None
                };
                Ok(Pre {
                    before: Some(before),
                    body,
                })
            }
            "CreateNetworkInterface" => {
                let subnet = param("SubnetId")?;
                let n = q.create_count()?;
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
                    let l = self.instance_type_limits(&t).await?;
                    if best.as_ref().is_none_or(|(_, b)| l.ipv4_per_eni > *b) {
                        best = Some((t, l.ipv4_per_eni));
                    }
                }
                if let Some((ty, per)) = best {
                    fidelity::check_ip_limit("the new interface", &ty, per, 0, n)?;
                }
                if let Some(left) = self.subnet_left(knobs, generation, &subnet).await? {
                    fidelity::check_subnet_budget(&subnet, left, n)?;
                }
                let listed = q.list_field("PrivateIpAddresses", "PrivateIpAddress");
                if !listed.is_empty() {
                    self.check_free(&subnet, &listed).await?;
                    return Ok(Pre::default());
                }
                let primary = q.get("PrivateIpAddress");
                if let Some(p) = primary {
                    self.check_free(&subnet, &[p]).await?;
                }
                let secondaries = q.number("SecondaryPrivateIpAddressCount")?.unwrap_or(0);
                let fresh = self
                    .allocate(&subnet, secondaries + u32::from(primary.is_none()))
                    .await?;
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
                Ok(Pre {
                    before: None,
                    body: Some(fidelity::create_exact_body(q, &ips)),
                })
            }
            _ => Ok(Pre::default()),
        }
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

    /// The proxy in front of a real moto, driven with the real SDK (no root needed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proxy_behaves_like_ec2_in_front_of_moto() {
        let moto = testkit::moto::Moto::for_test();
        let direct = cloud::Ec2::for_endpoint(&moto.endpoint(), "us-west-2");
        let vpc = crate::seed::provision_seed(&direct, crate::seed::INSTANCE_TYPE, false)
            .await
            .unwrap();
        let world = World::load(&direct, &vpc).await.unwrap();
        let (_tx, rx) = watch::channel(world.clone());
        let dir = std::env::temp_dir().join(format!("vpclab-proxy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let knobs_file = dir.join("fidelity.json");
        let proxy = Proxy::new(moto.addr, "us-west-2", rx, knobs_file.clone(), None);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(proxy.clone().serve(l, "instance1".into()));
        let ec2 = cloud::Ec2::for_endpoint(&format!("http://{addr}"), "us-west-2");

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
        let mut k = Knobs::default();
        k.set("ec2-throttle", "2/0.001").unwrap();
        k.save_to(&knobs_file).unwrap();
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
        let mut k = Knobs::default();
        k.set("ec2-error-rate", "1").unwrap();
        std::thread::sleep(Duration::from_millis(20)); // a new mtime
        k.save_to(&knobs_file).unwrap();
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
        let mut k = Knobs::default();
        k.set("subnet-free", "1").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        k.save_to(&knobs_file).unwrap();
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
        let _ = std::fs::remove_dir_all(&dir);
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
