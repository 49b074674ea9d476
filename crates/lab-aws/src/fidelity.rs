//! The EC2 fidelity layer's pure parts: the knobs (`vpc-lab up` flags and `vpc-lab fidelity
//! set`), EC2 Query API parsing, EC2's error format, the token buckets, the limit decisions,
//! the rewrite of moto's AssignPrivateIpAddresses answer, and the IPv4 prefix model moto lacks
//! (aligned free /28s, slots, fragmentation, where the prefixes are kept, the answers). The proxy
//! (`ec2proxy`) uses them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// EC2-like throttling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Throttle {
    /// No throttling (moto's behaviour).
    #[default]
    Off,
    /// EC2's documented default buckets per API category (see [`ec2_bucket`]).
    Ec2,
    /// Every API gets a bucket of `burst` tokens refilled at `per_s` tokens a second.
    Uniform { burst: f64, per_s: f64 },
}

impl std::fmt::Display for Throttle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Throttle::Off => write!(f, "off"),
            Throttle::Ec2 => write!(f, "ec2"),
            Throttle::Uniform { burst, per_s } => write!(f, "{burst}/{per_s}"),
        }
    }
}

impl std::str::FromStr for Throttle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" | "0" | "false" => Ok(Throttle::Off),
            "ec2" | "on" | "true" => Ok(Throttle::Ec2),
            _ => {
                let bad = || {
                    format!(
                        "throttle {s:?} is not off, ec2, or BURST/PER_SECOND (e.g. 5/2): both positive numbers"
                    )
                };
                let (b, r) = s.split_once('/').ok_or_else(bad)?;
                let burst: f64 = b.trim().parse().map_err(|_| bad())?;
                let per_s: f64 = r.trim().parse().map_err(|_| bad())?;
                if !(burst >= 1.0 && per_s > 0.0 && burst.is_finite() && per_s.is_finite()) {
                    return Err(bad());
                }
                Ok(Throttle::Uniform { burst, per_s })
            }
        }
    }
}

/// What the lab does differently from moto. Defaults: nothing injected (moto plus the limits,
/// which are always on because they are how EC2 behaves).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Knobs {
    /// Fraction (0..=1) of EC2 calls answered 503 RequestLimitExceeded or 500 InternalError
    /// (half each), before they reach moto.
    pub ec2_error_rate: f64,
    /// Added to every EC2 call.
    pub ec2_latency_ms: u64,
    pub ec2_throttle: Throttle,
    /// IMDS serves the EC2 state as it was this long ago.
    pub imds_delay_ms: u64,
    /// An attached ENI's interface appears in the instance this long after the attach.
    pub attach_delay_ms: u64,
    /// How many more addresses each subnet can hand out from the moment this is set
    /// (`None`: as many as the subnet has).
    pub subnet_free: Option<u32>,
    /// Subnets (ids, or `all`) where every aligned /28 counts as taken: IPv4 prefix requests get
    /// InsufficientCidrBlocks while single addresses are still handed out.
    pub subnet_fragmented: BTreeSet<String>,
}

pub const KEYS: &[&str] = &[
    "ec2-error-rate",
    "ec2-latency-ms",
    "ec2-throttle",
    "imds-delay-ms",
    "attach-delay-ms",
    "subnet-free",
    "subnet-fragmented",
];

/// The `subnet-fragmented` value meaning every subnet.
pub const ALL_SUBNETS: &str = "all";

impl Knobs {
    /// Sets one knob from `key=value` (keys as in [`KEYS`], `_` accepted for `-`).
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let key = key.replace('_', "-");
        let num = |what: &str| -> Result<u64> {
            value
                .trim()
                .parse::<u64>()
                .with_context(|| format!("{what}={value:?} is not a whole number"))
        };
        match key.as_str() {
            "ec2-error-rate" => {
                let v: f64 = value
                    .trim()
                    .parse()
                    .with_context(|| format!("ec2-error-rate={value:?} is not a number"))?;
                if !(0.0..=1.0).contains(&v) {
                    bail!("ec2-error-rate={value} is not a fraction in 0..=1 (0.3 = 30 %)");
                }
                self.ec2_error_rate = v;
            }
            "ec2-latency-ms" => self.ec2_latency_ms = num("ec2-latency-ms")?,
            "ec2-throttle" => {
                self.ec2_throttle = value
                    .trim()
                    .parse()
                    .map_err(|e: String| anyhow::anyhow!("ec2-throttle: {e}"))?
            }
            "imds-delay-ms" => self.imds_delay_ms = num("imds-delay-ms")?,
            "attach-delay-ms" => self.attach_delay_ms = num("attach-delay-ms")?,
            "subnet-free" => {
                self.subnet_free = match value.trim() {
                    "unlimited" | "none" | "" => None,
                    v => Some(v.parse::<u32>().with_context(|| {
                        format!("subnet-free={v:?} is not a whole number or \"unlimited\"")
                    })?),
                }
            }
            "subnet-fragmented" => self.set_fragmented(value.trim())?,
            _ => bail!("unknown fidelity knob {key:?}; knobs: {}", KEYS.join(", ")),
        }
        Ok(())
    }

    /// `subnet-fragmented=SUBNET|all[=true|false]` adds (or with `=false` removes) a subnet,
    /// `all` stands for every subnet, and `none` (or `off`) clears the list.
    fn set_fragmented(&mut self, value: &str) -> Result<()> {
        let (target, on) = match value.split_once('=') {
            Some((t, flag)) => {
                let on = match flag.trim() {
                    "true" | "on" | "1" => true,
                    "false" | "off" | "0" => false,
                    f => bail!("subnet-fragmented={value:?}: {f:?} is not true or false"),
                };
                (t.trim(), on)
            }
            None => (value, true),
        };
        match target {
            "none" | "off" | "" => self.subnet_fragmented.clear(),
            ALL_SUBNETS if !on => self.subnet_fragmented.clear(),
            t if t == ALL_SUBNETS || t.starts_with("subnet-") => {
                if on {
                    self.subnet_fragmented.insert(t.to_owned());
                } else {
                    self.subnet_fragmented.remove(t);
                }
            }
            t => {
                bail!("subnet-fragmented: {t:?} is not a subnet id (subnet-…), \"all\" or \"none\"")
            }
        }
        Ok(())
    }

    /// Whether `subnet` has no free aligned /28 by the `subnet-fragmented` knob.
    pub fn is_fragmented(&self, subnet: &str) -> bool {
        self.subnet_fragmented.contains(ALL_SUBNETS) || self.subnet_fragmented.contains(subnet)
    }

    /// The knobs in effect, from the knobs file `p` (defaults when the file is missing).
    pub fn load_from(p: &std::path::Path) -> Result<Knobs> {
        match std::fs::read(p) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Knobs::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Writes the knobs atomically; the lab daemon picks them up at its next EC2 call / tick.
    pub fn save_to(&self, p: &std::path::Path) -> Result<()> {
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, p).with_context(|| format!("renaming to {}", p.display()))?;
        Ok(())
    }
}

/// The knobs file re-read whenever its modification time changes.
#[derive(Debug, Default)]
pub struct KnobsFile {
    path: PathBuf,
    seen: Option<std::time::SystemTime>,
    knobs: Knobs,
    /// Bumped on every change (so the proxy can reset what depends on a knob).
    pub generation: u64,
}

impl KnobsFile {
    pub fn new(path: PathBuf) -> KnobsFile {
        KnobsFile {
            path,
            ..KnobsFile::default()
        }
    }

    pub fn current(&mut self) -> &Knobs {
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if mtime != self.seen {
            match Knobs::load_from(&self.path) {
                Ok(k) => {
                    if k != self.knobs {
                        tracing::info!(knobs = ?k, "fidelity knobs changed");
                        self.generation += 1;
                    }
                    self.knobs = k;
                    self.seen = mtime;
                }
                Err(e) => tracing::warn!("keeping the previous fidelity knobs: {e:#}"),
            }
        }
        &self.knobs
    }
}

// ---- EC2 Query API ---------------------------------------------------------------------------

/// A parsed EC2 Query API request (`Action=…&Param=…`, form-encoded).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Query {
    pub params: BTreeMap<String, String>,
}

impl Query {
    /// Parses the form body, falling back to the URL's query string (GET requests).
    pub fn parse(body: &[u8], query_string: Option<&str>) -> Query {
        let mut params = BTreeMap::new();
        for (k, v) in form_urlencoded::parse(body) {
            params.insert(k.into_owned(), v.into_owned());
        }
        if let Some(q) = query_string {
            for (k, v) in form_urlencoded::parse(q.as_bytes()) {
                params
                    .entry(k.into_owned())
                    .or_insert_with(|| v.into_owned());
            }
        }
        Query { params }
    }

    pub fn action(&self) -> &str {
        self.get("Action").unwrap_or("Unknown")
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.params.get(k).map(String::as_str)
    }

    /// A numeric parameter; `Err` names the parameter and the bad value.
    pub fn number(&self, k: &str) -> Result<Option<u32>, Ec2Error> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                Ec2Error::bad_request(
                    "InvalidParameterValue",
                    format!("Value ({v}) for parameter {k} is invalid. Expected a whole number."),
                )
            }),
        }
    }

    /// Values of a list parameter `Prefix.1`, `Prefix.2`, … (in index order).
    pub fn list(&self, prefix: &str) -> Vec<&str> {
        let mut v: Vec<(u32, &str)> = self
            .params
            .iter()
            .filter_map(|(k, val)| {
                let n = k.strip_prefix(prefix)?.strip_prefix('.')?;
                Some((n.parse().ok()?, val.as_str()))
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, s)| s).collect()
    }

    /// How many addresses an AssignPrivateIpAddresses asks for.
    pub fn assign_count(&self) -> Result<u32, Ec2Error> {
        let explicit = self.list("PrivateIpAddress").len() as u32;
        Ok(self
            .number("SecondaryPrivateIpAddressCount")?
            .unwrap_or(0)
            .max(explicit))
    }

    /// How many addresses a CreateNetworkInterface takes: the primary plus the secondaries.
    pub fn create_count(&self) -> Result<u32, Ec2Error> {
        let explicit = self
            .list_field("PrivateIpAddresses", "PrivateIpAddress")
            .len() as u32;
        let secondaries = self.number("SecondaryPrivateIpAddressCount")?.unwrap_or(0);
        // `PrivateIpAddresses.N.PrivateIpAddress` entries include the primary when given.
        Ok((1 + secondaries).max(explicit))
    }

    /// The IPv4 prefixes an AssignPrivateIpAddresses or CreateNetworkInterface asks for
    /// (`None`: none), refusing what EC2 refuses: a prefix count with explicit prefixes, and
    /// prefixes with secondary addresses (a count or a list).
    pub fn prefix_ask(&self) -> Result<Option<PrefixAsk>, Ec2Error> {
        let create = self.action() == "CreateNetworkInterface";
        let explicit: Vec<String> = if create {
            self.list_field("Ipv4Prefix", "Ipv4Prefix")
        } else {
            self.list("Ipv4Prefix")
        }
        .into_iter()
        .map(str::to_owned)
        .collect();
        let count = self.number("Ipv4PrefixCount")?.filter(|n| *n > 0);
        let ask = match (count, explicit.is_empty()) {
            (None, true) => return Ok(None),
            (Some(_), false) => {
                return Err(combination("Ipv4PrefixCount and Ipv4Prefixes"));
            }
            (Some(n), true) => PrefixAsk::Count(n),
            (None, false) => PrefixAsk::Explicit(explicit),
        };
        let addresses = if create {
            !self
                .list_field("PrivateIpAddresses", "PrivateIpAddress")
                .is_empty()
        } else {
            !self.list("PrivateIpAddress").is_empty()
        };
        if addresses || self.number("SecondaryPrivateIpAddressCount")?.unwrap_or(0) > 0 {
            return Err(combination(
                "IPv4 prefixes and secondary private IPv4 addresses",
            ));
        }
        Ok(Some(ask))
    }

    /// The prefixes an UnassignPrivateIpAddresses releases (empty: it releases addresses);
    /// EC2 takes addresses or prefixes, not both.
    pub fn unassign_prefixes(&self) -> Result<Vec<&str>, Ec2Error> {
        let prefixes = self.list("Ipv4Prefix");
        if !prefixes.is_empty() && !self.list("PrivateIpAddress").is_empty() {
            return Err(combination("PrivateIpAddresses and Ipv4Prefixes"));
        }
        Ok(prefixes)
    }
}

/// What an assign or create asks for in IPv4 prefixes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrefixAsk {
    /// This many, chosen by EC2.
    Count(u32),
    /// These, as written in the request.
    Explicit(Vec<String>),
}

impl PrefixAsk {
    pub fn count(&self) -> u32 {
        match self {
            PrefixAsk::Count(n) => *n,
            PrefixAsk::Explicit(v) => v.len() as u32,
        }
    }
}

fn combination(what: &str) -> Ec2Error {
    Ec2Error::bad_request(
        "InvalidParameterCombination",
        format!("{what} cannot be specified in the same request."),
    )
}

impl Query {
    /// Values of `Prefix.N.Field` (in index order).
    pub fn list_field(&self, prefix: &str, field: &str) -> Vec<&str> {
        let mut v: Vec<(u32, &str)> = self
            .params
            .iter()
            .filter_map(|(k, val)| {
                let rest = k.strip_prefix(prefix)?.strip_prefix('.')?;
                let (n, f) = rest.split_once('.')?;
                (f == field).then_some(())?;
                Some((n.parse().ok()?, val.as_str()))
            })
            .collect();
        v.sort();
        v.into_iter().map(|(_, s)| s).collect()
    }

    /// The request form-encoded again.
    pub fn encode(&self) -> String {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.params {
            ser.append_pair(k, v);
        }
        ser.finish()
    }
}

/// AssignPrivateIpAddresses asking for these exact addresses instead of a count.
pub fn assign_exact_body(q: &Query, ips: &[Ipv4Addr]) -> String {
    let mut q = q.clone();
    q.params.remove("SecondaryPrivateIpAddressCount");
    q.params.retain(|k, _| !k.starts_with("PrivateIpAddress."));
    for (i, ip) in ips.iter().enumerate() {
        q.params
            .insert(format!("PrivateIpAddress.{}", i + 1), ip.to_string());
    }
    q.encode()
}

/// CreateNetworkInterface with these exact addresses: the first is the primary.
pub fn create_exact_body(q: &Query, ips: &[Ipv4Addr]) -> String {
    let mut q = q.clone();
    q.params.remove("SecondaryPrivateIpAddressCount");
    q.params.remove("PrivateIpAddress");
    q.params
        .retain(|k, _| !k.starts_with("PrivateIpAddresses."));
    for (i, ip) in ips.iter().enumerate() {
        q.params.insert(
            format!("PrivateIpAddresses.{}.PrivateIpAddress", i + 1),
            ip.to_string(),
        );
        q.params.insert(
            format!("PrivateIpAddresses.{}.Primary", i + 1),
            (i == 0).to_string(),
        );
    }
    q.encode()
}

/// `n` random addresses of `cidr` that are not in `used`, not one of the 4 AWS-reserved
/// addresses at the start and not the broadcast address; `None` when fewer are free.
pub fn pick_free(
    cidr: ipnet::Ipv4Net,
    used: &std::collections::BTreeSet<Ipv4Addr>,
    n: usize,
) -> Option<Vec<Ipv4Addr>> {
    let first = u32::from(cidr.network()) + 4;
    let last = u32::from(cidr.broadcast()).checked_sub(1)?;
    if last < first {
        return None;
    }
    let mut free: Vec<u32> = (first..=last)
        .filter(|a| !used.contains(&Ipv4Addr::from(*a)))
        .collect();
    if free.len() < n {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let i = (rand::random::<u64>() % free.len() as u64) as usize;
        out.push(Ipv4Addr::from(free.swap_remove(i)));
    }
    Some(out)
}

/// Mutating actions the proxy serialises (checks and call under one lock, as EC2 is consistent
/// per resource).
pub fn is_mutating(action: &str) -> bool {
    matches!(
        action,
        "CreateNetworkInterface"
            | "AttachNetworkInterface"
            | "DetachNetworkInterface"
            | "DeleteNetworkInterface"
            | "AssignPrivateIpAddresses"
            | "UnassignPrivateIpAddresses"
    )
}

// ---- Errors ---------------------------------------------------------------------------------

/// An EC2 error answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ec2Error {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl Ec2Error {
    pub fn bad_request(code: &str, message: impl Into<String>) -> Self {
        Ec2Error {
            status: 400,
            code: code.into(),
            message: message.into(),
        }
    }
    pub fn throttled() -> Self {
        Ec2Error {
            status: 503,
            code: "RequestLimitExceeded".into(),
            message: "Request limit exceeded.".into(),
        }
    }
    pub fn internal() -> Self {
        Ec2Error {
            status: 500,
            code: "InternalError".into(),
            message: "An internal error has occurred.".into(),
        }
    }

    /// EC2's error document.
    pub fn xml(&self, request_id: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code><Message>{}</Message></Error></Errors><RequestID>{}</RequestID></Response>",
            xml_escape(&self.code),
            xml_escape(&self.message),
            xml_escape(request_id)
        )
    }
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

pub fn request_id() -> String {
    let a: u128 = rand::random();
    let h = format!("{a:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

// ---- Limits ---------------------------------------------------------------------------------

/// EC2's AttachmentLimitExceeded / device-index check for AttachNetworkInterface.
pub fn check_attach(
    instance_id: &str,
    instance_type: &str,
    max_enis: u32,
    attached_devices: &[u32],
    device_index: u32,
) -> Result<(), Ec2Error> {
    if attached_devices.len() as u32 >= max_enis {
        return Err(Ec2Error::bad_request(
            "AttachmentLimitExceeded",
            format!(
                "Interface count {} exceeds the limit for {instance_type} (instance {instance_id} allows {max_enis} network interfaces)",
                attached_devices.len() + 1
            ),
        ));
    }
    if attached_devices.contains(&device_index) {
        return Err(Ec2Error::bad_request(
            "InvalidParameterValue",
            format!(
                "Instance '{instance_id}' already has an interface attached at device index '{device_index}'."
            ),
        ));
    }
    Ok(())
}

/// EC2 attaches an ENI only to an instance in the ENI's availability zone (moto attaches
/// across zones).
pub fn check_same_zone(
    eni: &str,
    eni_zone: &str,
    instance: &str,
    instance_zone: &str,
) -> Result<(), Ec2Error> {
    if eni_zone == instance_zone {
        return Ok(());
    }
    Err(Ec2Error::bad_request(
        "InvalidParameterCombination",
        format!(
            "You may not attach a network interface to an instance if they are not in the same availability zone (network interface {eni} is in {eni_zone}, instance {instance} in {instance_zone})."
        ),
    ))
}

/// EC2's checks of the security groups a new ENI names: each exists (`vpc` `None`: it does
/// not) and lies in the VPC of the ENI's subnet. moto accepts another VPC's group and creates
/// an unknown one silently.
pub fn check_groups(
    subnet: &str,
    subnet_vpc: &str,
    groups: &[(&str, Option<&str>)],
) -> Result<(), Ec2Error> {
    for (g, vpc) in groups {
        match vpc {
            None => {
                return Err(Ec2Error::bad_request(
                    "InvalidSecurityGroupID.NotFound",
                    format!("The securityGroup ID '{g}' does not exist"),
                ));
            }
            Some(v) if *v != subnet_vpc => {
                return Err(Ec2Error::bad_request(
                    "InvalidParameter",
                    format!("Security group {g} and subnet {subnet} belong to different networks."),
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// EC2's PrivateIpAddressLimitExceeded: `have` addresses on the ENI (primary included) plus
/// `more` would exceed `per_eni`.
pub fn check_ip_limit(
    eni: &str,
    instance_type: &str,
    per_eni: u32,
    have: u32,
    more: u32,
) -> Result<(), Ec2Error> {
    if have + more > per_eni {
        return Err(Ec2Error::bad_request(
            "PrivateIpAddressLimitExceeded",
            format!(
                "Number of private addresses will exceed limit: {eni} would have {} addresses ({have} + {more}), {instance_type} allows {per_eni} per interface",
                have + more
            ),
        ));
    }
    Ok(())
}

/// InvalidNetworkInterface.InUse for DeleteNetworkInterface of an attached ENI.
pub fn check_delete(eni: &str, attached_to: Option<&str>) -> Result<(), Ec2Error> {
    match attached_to {
        Some(i) => Err(Ec2Error::bad_request(
            "InvalidNetworkInterface.InUse",
            format!("The network interface '{eni}' is currently in use (attached to {i})."),
        )),
        None => Ok(()),
    }
}

/// InsufficientFreeAddressesInSubnet when `more` exceeds what is left of the budget.
pub fn check_subnet_budget(subnet: &str, left: i64, more: u32) -> Result<(), Ec2Error> {
    if i64::from(more) > left {
        return Err(Ec2Error::bad_request(
            "InsufficientFreeAddressesInSubnet",
            format!(
                "Insufficient free IP addresses in subnet {subnet}: asked for {more}, {} free",
                left.max(0)
            ),
        ));
    }
    Ok(())
}

/// Keeps only the `<item>`s of `assignedPrivateIpAddressesSet` whose address is not in `before`
/// (moto lists every address of the ENI; EC2 lists only the new ones).
pub fn rewrite_assign(xml: &str, before: &[Ipv4Addr]) -> String {
    const OPEN: &str = "<assignedPrivateIpAddressesSet>";
    const CLOSE: &str = "</assignedPrivateIpAddressesSet>";
    let (Some(a), Some(b)) = (xml.find(OPEN), xml.find(CLOSE)) else {
        return xml.to_string();
    };
    if b < a {
        return xml.to_string();
    }
    let inner = &xml[a + OPEN.len()..b];
    let mut kept = String::new();
    for item in items(inner) {
        let ip = between(item, "<privateIpAddress>", "</privateIpAddress>")
            .and_then(|v| v.trim().parse::<Ipv4Addr>().ok());
        if !ip.is_some_and(|ip| before.contains(&ip)) {
            kept.push_str(item);
        }
    }
    format!(
        "{}{OPEN}{kept}{CLOSE}{}",
        &xml[..a],
        &xml[b + CLOSE.len()..]
    )
}

/// The `<item>…</item>` elements of a list whose items hold no nested items (in order).
fn items(list: &str) -> impl Iterator<Item = &str> {
    const OPEN: &str = "<item>";
    const CLOSE: &str = "</item>";
    let mut rest = list;
    std::iter::from_fn(move || {
        let s = rest.find(OPEN)?;
        let e = rest[s..].find(CLOSE)? + s + CLOSE.len();
        let item = &rest[s..e];
        rest = &rest[e..];
        Some(item)
    })
}

fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let a = s.find(open)? + open.len();
    let b = s[a..].find(close)? + a;
    Some(&s[a..b])
}

// ---- IPv4 prefixes --------------------------------------------------------------------------

/// EC2's IPv4 prefix delegation hands out /28s (16 addresses, all usable on the instance).
pub const PREFIX_LEN: u8 = 28;
/// Addresses in one prefix.
pub const PREFIX_SIZE: u32 = 1 << (32 - PREFIX_LEN);

/// The tag in which the proxy keeps an ENI's prefixes in moto (comma-separated CIDRs in
/// assignment order). moto has no prefixes; a tag lives and dies with its ENI in moto's state
/// (deleting the ENI frees its prefixes, a restarted daemon finds them), and the world is
/// loaded from moto. The proxy never shows the tag: answers carry EC2's `ipv4PrefixSet`.
pub const PREFIX_TAG: &str = "vpc-lab:ipv4-prefixes";

/// The prefixes kept in a [`PREFIX_TAG`] value (anything unreadable is skipped).
pub fn prefixes_from_tag(value: &str) -> Vec<ipnet::Ipv4Net> {
    value
        .split(',')
        .filter_map(|p| p.trim().parse::<ipnet::Ipv4Net>().ok())
        .collect()
}

/// The [`PREFIX_TAG`] value for these prefixes.
pub fn prefix_tag_value(prefixes: &[ipnet::Ipv4Net]) -> String {
    prefixes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The tag in which the proxy keeps the security groups an ENI it created was given
/// (comma-separated ids). moto describes an attached ENI with its own groups and its instance's
/// (EC2: its own only), so the proxy's answers and the world take the groups from the tag. Like
/// [`PREFIX_TAG`], never shown.
pub const GROUPS_TAG: &str = "vpc-lab:security-groups";

/// The group ids in a [`GROUPS_TAG`] value.
pub fn groups_from_tag(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect()
}

/// An ENI as read from moto, made what EC2 would describe: the prefixes kept in its tag become
/// its `prefixes`, the groups kept in its tag its `security_groups`, and the tags go.
pub fn with_lab_prefixes(mut e: cloud::NetworkInterface) -> cloud::NetworkInterface {
    if let Some(v) = e.tags.remove(PREFIX_TAG) {
        for p in prefixes_from_tag(&v) {
            if !e.prefixes.contains(&p) {
                e.prefixes.push(p);
            }
        }
    }
    if let Some(v) = e.tags.remove(GROUPS_TAG) {
        e.security_groups = groups_from_tag(&v);
    }
    e
}

/// Every address and prefix in use in a subnet (all its ENIs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubnetUse {
    pub cidr: ipnet::Ipv4Net,
    /// Primary and secondary addresses.
    pub addrs: BTreeSet<Ipv4Addr>,
    pub prefixes: Vec<ipnet::Ipv4Net>,
}

impl SubnetUse {
    /// From the subnet's ENIs, as [`with_lab_prefixes`] made them.
    pub fn new(cidr: ipnet::Ipv4Net, enis: &[cloud::NetworkInterface]) -> SubnetUse {
        SubnetUse {
            cidr,
            addrs: enis.iter().flat_map(|e| e.all_ips()).collect(),
            prefixes: enis.iter().flat_map(|e| e.prefixes.clone()).collect(),
        }
    }

    /// Addresses no new address or prefix may take: the ENIs' addresses and every address of
    /// every prefix.
    pub fn taken(&self) -> BTreeSet<Ipv4Addr> {
        let mut t = self.addrs.clone();
        for p in &self.prefixes {
            t.extend((u32::from(p.network())..=u32::from(p.broadcast())).map(Ipv4Addr::from));
        }
        t
    }

    /// Whether `p` could be assigned: a /28, aligned, inside the subnet, clear of the 4
    /// AWS-reserved addresses and the broadcast address, and of every address and prefix in
    /// use (`taken` is [`Self::taken`]).
    fn fits(&self, p: ipnet::Ipv4Net, taken: &BTreeSet<Ipv4Addr>) -> bool {
        let first = u32::from(self.cidr.network()) + 4;
        let last = u32::from(self.cidr.broadcast()).saturating_sub(1);
        let (a, b) = (u32::from(p.network()), u32::from(p.broadcast()));
        p.prefix_len() == PREFIX_LEN
            && p.trunc() == p
            && self.cidr.contains(&p)
            && a >= first
            && b <= last
            && taken
                .range(Ipv4Addr::from(a)..=Ipv4Addr::from(b))
                .next()
                .is_none()
    }

    /// Every aligned /28 that could be assigned now; none in a fragmented subnet.
    pub fn free_prefixes(&self, fragmented: bool) -> Vec<ipnet::Ipv4Net> {
        if fragmented || self.cidr.prefix_len() > PREFIX_LEN {
            return Vec::new();
        }
        let taken = self.taken();
        self.cidr
            .subnets(PREFIX_LEN)
            .into_iter()
            .flatten()
            .filter(|p| self.fits(*p, &taken))
            .collect()
    }

    /// `n` free /28s chosen at random, as EC2 chooses (InsufficientCidrBlocks when fewer are
    /// free).
    pub fn pick_prefixes(
        &self,
        subnet: &str,
        n: u32,
        fragmented: bool,
    ) -> Result<Vec<ipnet::Ipv4Net>, Ec2Error> {
        let mut free = self.free_prefixes(fragmented);
        if (free.len() as u64) < u64::from(n) {
            return Err(insufficient_cidr_blocks(subnet, n, free.len()));
        }
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let i = (rand::random::<u64>() % free.len() as u64) as usize;
            out.push(free.swap_remove(i));
        }
        Ok(out)
    }

    /// The prefixes an assign or create gets: `n` chosen ones, or the explicit ones checked.
    pub fn grant(
        &self,
        subnet: &str,
        ask: &PrefixAsk,
        fragmented: bool,
    ) -> Result<Vec<ipnet::Ipv4Net>, Ec2Error> {
        match ask {
            PrefixAsk::Count(n) => self.pick_prefixes(subnet, *n, fragmented),
            PrefixAsk::Explicit(v) => self.check_explicit(subnet, v),
        }
    }

    /// Explicitly requested prefixes, checked as EC2 checks them.
    pub fn check_explicit(
        &self,
        subnet: &str,
        asked: &[String],
    ) -> Result<Vec<ipnet::Ipv4Net>, Ec2Error> {
        let mut taken = self.taken();
        let mut out = Vec::new();
        for s in asked {
            let bad = |why: &str| {
                Ec2Error::bad_request(
                    "InvalidParameterValue",
                    format!("Invalid value '{s}' for Ipv4Prefix: {why}"),
                )
            };
            let p: ipnet::Ipv4Net = s.trim().parse().map_err(|_| bad("not an IPv4 CIDR"))?;
            if p.prefix_len() != PREFIX_LEN {
                return Err(bad("only /28 prefixes can be assigned"));
            }
            if p.trunc() != p {
                return Err(bad("the prefix is not aligned (host bits set)"));
            }
            if !self.cidr.contains(&p) {
                return Err(bad(&format!("not within subnet {subnet} ({})", self.cidr)));
            }
            if !self.fits(p, &taken) {
                return Err(Ec2Error::bad_request(
                    "InvalidParameterValue",
                    format!(
                        "The prefix {p} is already in use in subnet {subnet} or overlaps a reserved address."
                    ),
                ));
            }
            taken.extend((u32::from(p.network())..=u32::from(p.broadcast())).map(Ipv4Addr::from));
            out.push(p);
        }
        Ok(out)
    }
}

/// EC2's answer when no aligned /28 is free.
pub fn insufficient_cidr_blocks(subnet: &str, asked: u32, free: usize) -> Ec2Error {
    Ec2Error::bad_request(
        "InsufficientCidrBlocks",
        format!(
            "The specified subnet does not have enough free cidr blocks to satisfy the request ({subnet}: asked for {asked} /28, {free} free)."
        ),
    )
}

/// Prefixes go only to network interfaces of Nitro-based instances.
pub fn check_nitro(instance: &str, instance_type: &str, nitro: bool) -> Result<(), Ec2Error> {
    if nitro {
        return Ok(());
    }
    Err(Ec2Error::bad_request(
        "InvalidParameterValue",
        format!(
            "IPv4 prefixes are not supported for instance type {instance_type} (instance {instance}): prefixes can be assigned only to network interfaces of Nitro-based instances."
        ),
    ))
}

/// The ENI's prefixes once `asked` are released; InvalidParameterValue when one of them is
/// not assigned to it.
pub fn release_prefixes(
    eni: &str,
    have: &[ipnet::Ipv4Net],
    asked: &[&str],
) -> Result<Vec<ipnet::Ipv4Net>, Ec2Error> {
    let mut gone = Vec::new();
    for s in asked {
        match s.trim().parse::<ipnet::Ipv4Net>() {
            Ok(p) if have.contains(&p) => gone.push(p),
            _ => {
                return Err(Ec2Error::bad_request(
                    "InvalidParameterValue",
                    format!(
                        "Some of the specified prefixes are not assigned to interface {eni}: {s}"
                    ),
                ));
            }
        }
    }
    Ok(have.iter().filter(|p| !gone.contains(p)).copied().collect())
}

/// EC2's AssignPrivateIpAddresses answer for prefixes: only the new ones.
pub fn assign_prefixes_answer(eni: &str, new: &[ipnet::Ipv4Net], request_id: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<AssignPrivateIpAddressesResponse xmlns=\"{EC2_XMLNS}\"><requestId>{}</requestId><networkInterfaceId>{}</networkInterfaceId><assignedPrivateIpAddressesSet/>{}<return>true</return></AssignPrivateIpAddressesResponse>",
        xml_escape(request_id),
        xml_escape(eni),
        prefix_set("assignedIpv4PrefixSet", new)
    )
}

/// EC2's UnassignPrivateIpAddresses answer.
pub fn unassign_answer(request_id: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<UnassignPrivateIpAddressesResponse xmlns=\"{EC2_XMLNS}\"><requestId>{}</requestId><return>true</return></UnassignPrivateIpAddressesResponse>",
        xml_escape(request_id)
    )
}

const EC2_XMLNS: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

fn prefix_set(element: &str, prefixes: &[ipnet::Ipv4Net]) -> String {
    let items: String = prefixes
        .iter()
        .map(|p| format!("<item><ipv4Prefix>{p}</ipv4Prefix></item>"))
        .collect();
    format!("<{element}>{items}</{element}>")
}

/// Hides [`PREFIX_TAG`] from an answer of moto's: drops it from every `tagSet`, and, with
/// `add_sets` (answers that describe ENIs), puts the prefixes it held into the ENI's
/// `ipv4PrefixSet` as EC2 lists them. (DescribeTags lists tags of many resources: strip only.)
pub fn rewrite_prefix_tags(xml: &str, add_sets: bool) -> String {
    rewrite_lab_tags(xml, add_sets, &|_| None)
}

/// The `groupSet` EC2 would list for these groups (`group_name` names them).
fn group_set(groups: &[String], group_name: &dyn Fn(&str) -> Option<String>) -> String {
    let items: String = groups
        .iter()
        .map(|g| {
            format!(
                "<item><groupId>{}</groupId><groupName>{}</groupName></item>",
                xml_escape(g),
                xml_escape(&group_name(g).unwrap_or_default())
            )
        })
        .collect();
    format!("<groupSet>{items}</groupSet>")
}

/// `text` with its last `groupSet` element replaced by `with`.
fn replace_last_group_set(text: &str, with: &str) -> String {
    let Some(a) = text.rfind("<groupSet") else {
        return text.to_owned();
    };
    let tail = &text[a..];
    let end = if tail.starts_with("<groupSet/>") {
        Some("<groupSet/>".len())
    } else {
        tail.find("</groupSet>").map(|e| e + "</groupSet>".len())
    };
    match end {
        Some(e) => format!("{}{with}{}", &text[..a], &tail[e..]),
        None => text.to_owned(),
    }
}

/// [`rewrite_prefix_tags`] for both of the proxy's tags: with `add_sets`, an ENI whose tags
/// hold [`GROUPS_TAG`] gets exactly those groups as its `groupSet` (named by `group_name`), in
/// place of moto's (which, for an attached ENI, adds its instance's groups). moto writes an
/// ENI's `groupSet` before its `tagSet`, and nothing between one ENI's `tagSet` and the next
/// ENI's `groupSet` is a `groupSet`.
pub fn rewrite_lab_tags(
    xml: &str,
    add_sets: bool,
    group_name: &dyn Fn(&str) -> Option<String>,
) -> String {
    const OPEN: &str = "<tagSet>";
    const CLOSE: &str = "</tagSet>";
    let mut out = String::with_capacity(xml.len());
    let mut rest = xml;
    while let Some(a) = rest.find(OPEN) {
        let Some(len) = rest[a..].find(CLOSE) else {
            break;
        };
        let inner = &rest[a + OPEN.len()..a + len];
        let mut kept = String::new();
        let mut prefixes = Vec::new();
        let mut groups: Option<Vec<String>> = None;
        for item in items(inner) {
            let key = between(item, "<key>", "</key>");
            if key == Some(PREFIX_TAG) {
                prefixes.extend(prefixes_from_tag(
                    between(item, "<value>", "</value>").unwrap_or_default(),
                ));
            } else if key == Some(GROUPS_TAG) {
                groups = Some(groups_from_tag(
                    between(item, "<value>", "</value>").unwrap_or_default(),
                ));
            } else {
                kept.push_str(item);
            }
        }
        match groups.filter(|_| add_sets) {
            Some(g) => out.push_str(&replace_last_group_set(
                &rest[..a],
                &group_set(&g, group_name),
            )),
            None => out.push_str(&rest[..a]),
        }
        if kept.is_empty() {
            out.push_str("<tagSet/>");
        } else {
            out.push_str(OPEN);
            out.push_str(&kept);
            out.push_str(CLOSE);
        }
        if add_sets && !prefixes.is_empty() {
            out.push_str(&prefix_set("ipv4PrefixSet", &prefixes));
        }
        rest = &rest[a + len + CLOSE.len()..];
    }
    out.push_str(rest);
    out
}

/// A CreateNetworkInterface as moto can take it: the prefix parameters (which moto ignores)
/// replaced by [`PREFIX_TAG`] holding the prefixes the proxy chose, added to the request's
/// network-interface tag specification (moto reads only one).
pub fn create_with_prefix_tag(q: &Query, prefixes: &[ipnet::Ipv4Net]) -> Query {
    let mut q = q.clone();
    q.params
        .retain(|k, _| k != "Ipv4PrefixCount" && !k.starts_with("Ipv4Prefix."));
    create_with_tag(&q, PREFIX_TAG, &prefix_tag_value(prefixes))
}

/// A CreateNetworkInterface that also tags the new ENI `key=value` (added to the request's
/// network-interface tag specification, which moto reads only one of).
pub fn create_with_tag(q: &Query, key: &str, value: &str) -> Query {
    let mut q = q.clone();
    let spec = (1..)
        .take_while(|n| {
            q.params
                .contains_key(&format!("TagSpecification.{n}.ResourceType"))
        })
        .find(|n| q.get(&format!("TagSpecification.{n}.ResourceType")) == Some("network-interface"))
        .unwrap_or_else(|| {
            let n = (1..)
                .find(|n| {
                    !q.params
                        .contains_key(&format!("TagSpecification.{n}.ResourceType"))
                })
                .unwrap_or(1);
            q.params.insert(
                format!("TagSpecification.{n}.ResourceType"),
                "network-interface".into(),
            );
            n
        });
    let next = q
        .list_field(&format!("TagSpecification.{spec}.Tag"), "Key")
        .len()
        + 1;
    let base = format!("TagSpecification.{spec}.Tag.{next}");
    q.params.insert(format!("{base}.Key"), key.into());
    q.params.insert(format!("{base}.Value"), value.into());
    q
}

/// DescribeNetworkInterfaces with EC2's `ipv4-prefix.ipv4-prefix` filter (moto answers 500)
/// turned into a filter on [`PREFIX_TAG`] that matches exactly the ENIs holding the prefix;
/// `None` when the request has no such filter.
pub fn translate_prefix_filter(q: &Query) -> Option<String> {
    let names: Vec<String> = q
        .params
        .iter()
        .filter(|(k, v)| {
            k.starts_with("Filter.") && k.ends_with(".Name") && *v == "ipv4-prefix.ipv4-prefix"
        })
        .map(|(k, _)| k.trim_end_matches(".Name").to_owned())
        .collect();
    if names.is_empty() {
        return None;
    }
    let mut q = q.clone();
    for f in names {
        let values: Vec<String> = q
            .list(&format!("{f}.Value"))
            .into_iter()
            .map(str::to_owned)
            .collect();
        let value_prefix = format!("{f}.Value.");
        q.params.retain(|k, _| !k.starts_with(&value_prefix));
        q.params
            .insert(format!("{f}.Name"), format!("tag:{PREFIX_TAG}"));
        let patterns = values.iter().flat_map(|v| {
            [
                v.clone(),
                format!("{v},*"),
                format!("*,{v}"),
                format!("*,{v},*"),
            ]
        });
        for (i, p) in patterns.enumerate() {
            q.params.insert(format!("{value_prefix}{}", i + 1), p);
        }
    }
    Some(q.encode())
}

// ---- Throttling -----------------------------------------------------------------------------

/// EC2's default token bucket (burst, refill per second) for an action's category, from
/// "Request throttling for the Amazon EC2 API": non-mutating (Describe*) 100/20, mutating
/// 200/5 — with the ENI and address actions, which EC2 lists as their own buckets, at 100/5.
pub fn ec2_bucket(action: &str) -> (f64, f64) {
    if action.starts_with("Describe") {
        (100.0, 20.0)
    } else if is_mutating(action) {
        (100.0, 5.0)
    } else {
        (200.0, 5.0)
    }
}

/// A token bucket.
#[derive(Clone, Debug)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    pub fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    /// Takes a token if there is one (after refilling up to `burst`).
    pub fn take(&mut self, burst: f64, per_s: f64, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * per_s).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Per-action buckets for a [`Throttle`] setting.
#[derive(Debug, Default)]
pub struct Buckets {
    setting: Throttle,
    by_action: BTreeMap<String, Bucket>,
}

impl Buckets {
    /// Whether a call of `action` may go through now.
    pub fn admit(&mut self, setting: Throttle, action: &str, now: Instant) -> bool {
        if setting != self.setting {
            self.setting = setting;
            self.by_action.clear();
        }
        let (burst, per_s) = match setting {
            Throttle::Off => return true,
            Throttle::Ec2 => ec2_bucket(action),
            Throttle::Uniform { burst, per_s } => (burst, per_s),
        };
        self.by_action
            .entry(action.to_string())
            .or_insert_with(|| Bucket::full(burst, now))
            .take(burst, per_s, now)
    }
}

// ---- Call counts ----------------------------------------------------------------------------

/// Calls of one action as the proxy saw them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallCount {
    /// Every request.
    pub calls: u64,
    /// Answered 2xx: by moto, or by the proxy for what moto lacks (IPv4 prefixes).
    pub ok: u64,
    /// Answered 503 RequestLimitExceeded by the token buckets.
    pub throttled: u64,
    /// Answered 503/500 by error injection.
    pub injected: u64,
    /// Refused by an EC2 rule moto lacks (limits, InUse, subnet full, no free /28).
    pub refused: u64,
    /// Answered an error by moto (or moto unreachable).
    pub failed: u64,
}

/// instance name → action → counts.
pub type Stats = BTreeMap<String, BTreeMap<String, CallCount>>;

/// The counts the proxy last wrote to `p` (none when the file is missing).
pub fn load_stats_from(p: &std::path::Path) -> Result<Stats> {
    match std::fs::read(p) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Stats::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// A fraction drawn uniformly from [0, 1).
pub fn chance() -> f64 {
    rand::random::<f64>()
}

pub fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knobs_parse_and_name_bad_values() {
        let mut k = Knobs::default();
        k.set("ec2-error-rate", "0.3").unwrap();
        k.set("ec2_latency_ms", "20").unwrap();
        k.set("ec2-throttle", "5/2").unwrap();
        k.set("imds-delay-ms", "10000").unwrap();
        k.set("attach-delay-ms", "500").unwrap();
        k.set("subnet-free", "12").unwrap();
        assert_eq!(k.ec2_error_rate, 0.3);
        assert_eq!(k.ec2_latency_ms, 20);
        assert_eq!(
            k.ec2_throttle,
            Throttle::Uniform {
                burst: 5.0,
                per_s: 2.0
            }
        );
        assert_eq!((k.imds_delay_ms, k.attach_delay_ms), (10_000, 500));
        assert_eq!(k.subnet_free, Some(12));
        k.set("subnet-free", "unlimited").unwrap();
        assert_eq!(k.subnet_free, None);
        k.set("ec2-throttle", "ec2").unwrap();
        assert_eq!(k.ec2_throttle, Throttle::Ec2);

        let e = k.set("ec2-error-rate", "30").unwrap_err().to_string();
        assert!(e.contains("30") && e.contains("0..=1"), "{e}");
        let e = format!("{:#}", k.set("ec2-latency-ms", "fast").unwrap_err());
        assert!(e.contains("\"fast\""), "{e}");
        let e = format!("{:#}", k.set("ec2-throttle", "5/0").unwrap_err());
        assert!(e.contains("5/0"), "{e}");
        let e = k.set("warp", "1").unwrap_err().to_string();
        assert!(e.contains("warp") && e.contains("ec2-throttle"), "{e}");
        // Round trip through the file format.
        let back: Knobs = serde_json::from_str(&serde_json::to_string(&k).unwrap()).unwrap();
        assert_eq!(back, k);
        let partial: Knobs = serde_json::from_str(r#"{"ec2_latency_ms": 7}"#).unwrap();
        assert_eq!(partial.ec2_latency_ms, 7);
        assert_eq!(partial.ec2_throttle, Throttle::Off);
    }

    #[test]
    fn query_parsing() {
        let body = b"Action=AssignPrivateIpAddresses&Version=2016-11-15&NetworkInterfaceId=eni-1&SecondaryPrivateIpAddressCount=3";
        let q = Query::parse(body, None);
        assert_eq!(q.action(), "AssignPrivateIpAddresses");
        assert_eq!(q.get("NetworkInterfaceId"), Some("eni-1"));
        assert_eq!(q.assign_count().unwrap(), 3);

        let q = Query::parse(
            b"Action=AssignPrivateIpAddresses&PrivateIpAddress.2=10.0.0.6&PrivateIpAddress.1=10.0.0.5&PrivateIpAddress.10=10.0.0.7",
            None,
        );
        assert_eq!(
            q.list("PrivateIpAddress"),
            ["10.0.0.5", "10.0.0.6", "10.0.0.7"]
        );
        assert_eq!(q.assign_count().unwrap(), 3);

        let q = Query::parse(
            b"Action=CreateNetworkInterface&SubnetId=subnet-1&SecondaryPrivateIpAddressCount=9&TagSpecification.1.Tag.1.Key=a%3Db",
            None,
        );
        assert_eq!(q.create_count().unwrap(), 10);
        assert_eq!(q.get("TagSpecification.1.Tag.1.Key"), Some("a=b"));

        let q = Query::parse(b"", Some("Action=DescribeVpcs&Version=x"));
        assert_eq!(q.action(), "DescribeVpcs");
        assert_eq!(Query::parse(b"junk", None).action(), "Unknown");

        let q = Query::parse(
            b"Action=AssignPrivateIpAddresses&SecondaryPrivateIpAddressCount=lots",
            None,
        );
        let e = q.assign_count().unwrap_err();
        assert_eq!(e.code, "InvalidParameterValue");
        assert!(e.message.contains("lots") && e.message.contains("SecondaryPrivateIpAddressCount"));
    }

    #[test]
    fn error_document_is_ec2s() {
        let e = Ec2Error::bad_request("InvalidNetworkInterface.InUse", "eni <x> & co");
        let x = e.xml("req-1");
        assert_eq!(
            x,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>InvalidNetworkInterface.InUse</Code><Message>eni &lt;x&gt; &amp; co</Message></Error></Errors><RequestID>req-1</RequestID></Response>"
        );
        assert_eq!(Ec2Error::throttled().status, 503);
        assert_eq!(Ec2Error::throttled().code, "RequestLimitExceeded");
        assert_eq!(Ec2Error::internal().status, 500);
        let id = request_id();
        assert_eq!(id.len(), 36);
        assert_ne!(id, request_id());
    }

    #[test]
    fn zones_and_security_groups_as_ec2_checks_them() {
        assert!(check_same_zone("eni-1", "us-west-2a", "i-1", "us-west-2a").is_ok());
        let e = check_same_zone("eni-1", "us-west-2b", "i-1", "us-west-2a").unwrap_err();
        assert_eq!(e.code, "InvalidParameterCombination");
        assert!(
            e.message.contains("same availability zone")
                && e.message.contains("eni-1")
                && e.message.contains("us-west-2b"),
            "{}",
            e.message
        );
        assert!(check_groups("subnet-1", "vpc-1", &[]).is_ok());
        assert!(check_groups("subnet-1", "vpc-1", &[("sg-1", Some("vpc-1"))]).is_ok());
        let e = check_groups(
            "subnet-1",
            "vpc-1",
            &[("sg-1", Some("vpc-1")), ("sg-9", None)],
        )
        .unwrap_err();
        assert_eq!(e.code, "InvalidSecurityGroupID.NotFound");
        assert!(e.message.contains("'sg-9'"), "{}", e.message);
        let e = check_groups("subnet-1", "vpc-1", &[("sg-2", Some("vpc-2"))]).unwrap_err();
        assert_eq!(e.code, "InvalidParameter");
        assert!(
            e.message.contains("sg-2") && e.message.contains("subnet-1"),
            "{}",
            e.message
        );
        let q = Query::parse(
            b"Action=CreateNetworkInterface&SubnetId=subnet-1&SecurityGroupId.2=sg-b&SecurityGroupId.1=sg-a",
            None,
        );
        assert_eq!(q.list("SecurityGroupId"), ["sg-a", "sg-b"]);
    }

    #[test]
    fn limit_decisions() {
        // m5.large: 3 ENIs, 10 addresses per ENI.
        assert!(check_attach("i-1", "m5.large", 3, &[0, 1], 2).is_ok());
        let e = check_attach("i-1", "m5.large", 3, &[0, 1, 2], 3).unwrap_err();
        assert_eq!(e.code, "AttachmentLimitExceeded");
        assert!(
            e.message.contains("m5.large") && e.message.contains('4'),
            "{}",
            e.message
        );
        let e = check_attach("i-1", "m5.large", 3, &[0, 1], 1).unwrap_err();
        assert_eq!(e.code, "InvalidParameterValue");

        assert!(check_ip_limit("eni-1", "m5.large", 10, 1, 9).is_ok());
        let e = check_ip_limit("eni-1", "m5.large", 10, 10, 1).unwrap_err();
        assert_eq!(e.code, "PrivateIpAddressLimitExceeded");
        assert!(
            e.message.contains("eni-1") && e.message.contains("11"),
            "{}",
            e.message
        );
        assert!(check_ip_limit("eni-1", "m5.large", 10, 2, 9).is_err());

        assert!(check_delete("eni-1", None).is_ok());
        let e = check_delete("eni-1", Some("i-1")).unwrap_err();
        assert_eq!(e.code, "InvalidNetworkInterface.InUse");

        assert!(check_subnet_budget("subnet-1", 3, 3).is_ok());
        let e = check_subnet_budget("subnet-1", 2, 3).unwrap_err();
        assert_eq!(e.code, "InsufficientFreeAddressesInSubnet");
        assert!(e.message.contains("subnet-1") && e.message.contains("2 free"));
        assert!(
            check_subnet_budget("s", -4, 1)
                .unwrap_err()
                .message
                .contains("0 free")
        );
    }

    #[test]
    fn assign_answer_lists_only_new_addresses() {
        // moto's answer shape: every address of the ENI, primary included.
        let moto = "<AssignPrivateIpAddressesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"><requestId>r</requestId><networkInterfaceId>eni-1</networkInterfaceId><assignedPrivateIpAddressesSet><item><privateIpAddress>10.0.0.4</privateIpAddress></item><item><privateIpAddress>10.0.0.5</privateIpAddress></item><item><privateIpAddress>10.0.0.9</privateIpAddress></item></assignedPrivateIpAddressesSet><return>true</return></AssignPrivateIpAddressesResponse>";
        let before = ["10.0.0.4".parse().unwrap(), "10.0.0.5".parse().unwrap()];
        let out = rewrite_assign(moto, &before);
        assert!(out.contains("<item><privateIpAddress>10.0.0.9</privateIpAddress></item>"));
        assert!(
            !out.contains("10.0.0.4") && !out.contains("10.0.0.5"),
            "{out}"
        );
        assert!(
            out.starts_with("<AssignPrivateIpAddressesResponse")
                && out.ends_with("</AssignPrivateIpAddressesResponse>")
        );
        assert!(out.contains("<networkInterfaceId>eni-1</networkInterfaceId>"));
        // Nothing to rewrite: unchanged.
        assert_eq!(rewrite_assign("<x/>", &before), "<x/>");
    }

    #[test]
    fn addresses_are_free_and_not_reserved() {
        let cidr: ipnet::Ipv4Net = "10.0.0.0/28".parse().unwrap();
        let used: std::collections::BTreeSet<Ipv4Addr> = ["10.0.0.5", "10.0.0.9"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        // .0-.3 reserved, .15 broadcast, .5 and .9 used: 9 free.
        for _ in 0..20 {
            let got = pick_free(cidr, &used, 9).unwrap();
            let set: std::collections::BTreeSet<_> = got.iter().collect();
            assert_eq!(set.len(), 9, "no duplicates: {got:?}");
            for a in &got {
                let o = a.octets()[3];
                assert!((4..15).contains(&o) && o != 5 && o != 9, "{a}");
            }
        }
        assert!(pick_free(cidr, &used, 10).is_none());
    }

    #[test]
    fn count_requests_become_exact_address_requests() {
        let q = Query::parse(
            b"Action=AssignPrivateIpAddresses&NetworkInterfaceId=eni-1&SecondaryPrivateIpAddressCount=2",
            None,
        );
        let ips = ["10.0.0.7".parse().unwrap(), "10.0.0.8".parse().unwrap()];
        let b = Query::parse(assign_exact_body(&q, &ips).as_bytes(), None);
        assert_eq!(b.get("SecondaryPrivateIpAddressCount"), None);
        assert_eq!(b.list("PrivateIpAddress"), ["10.0.0.7", "10.0.0.8"]);
        assert_eq!(b.get("NetworkInterfaceId"), Some("eni-1"));

        let q = Query::parse(
            b"Action=CreateNetworkInterface&SubnetId=s&SecondaryPrivateIpAddressCount=1&TagSpecification.1.Tag.1.Key=k%20x",
            None,
        );
        let b = Query::parse(create_exact_body(&q, &ips).as_bytes(), None);
        assert_eq!(b.get("SecondaryPrivateIpAddressCount"), None);
        assert_eq!(
            b.list_field("PrivateIpAddresses", "PrivateIpAddress"),
            ["10.0.0.7", "10.0.0.8"]
        );
        assert_eq!(
            b.list_field("PrivateIpAddresses", "Primary"),
            ["true", "false"]
        );
        assert_eq!(b.get("TagSpecification.1.Tag.1.Key"), Some("k x"));
    }

    fn net(s: &str) -> ipnet::Ipv4Net {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn fragmented_subnets_knob() {
        let mut k = Knobs::default();
        assert!(!k.is_fragmented("subnet-a"));
        k.set("subnet-fragmented", "subnet-a").unwrap();
        k.set("subnet_fragmented", "subnet-b=true").unwrap();
        assert!(k.is_fragmented("subnet-a") && k.is_fragmented("subnet-b"));
        assert!(!k.is_fragmented("subnet-c"));
        k.set("subnet-fragmented", "subnet-a=false").unwrap();
        assert!(!k.is_fragmented("subnet-a") && k.is_fragmented("subnet-b"));
        k.set("subnet-fragmented", "all").unwrap();
        assert!(k.is_fragmented("subnet-zzz"));
        let back: Knobs = serde_json::from_str(&serde_json::to_string(&k).unwrap()).unwrap();
        assert_eq!(back, k);
        k.set("subnet-fragmented", "all=false").unwrap();
        assert!(k.subnet_fragmented.is_empty());
        k.set("subnet-fragmented", "subnet-a").unwrap();
        k.set("subnet-fragmented", "none").unwrap();
        assert!(k.subnet_fragmented.is_empty());
        for bad in ["eni-1", "subnet-a=maybe"] {
            let e = format!("{:#}", k.set("subnet-fragmented", bad).unwrap_err());
            assert!(e.contains("subnet-fragmented"), "{bad}: {e}");
        }
        assert!(KEYS.contains(&"subnet-fragmented"));
        // An older knobs file without the field still loads.
        let old: Knobs = serde_json::from_str(r#"{"subnet_free": 3}"#).unwrap();
        assert!(old.subnet_fragmented.is_empty());
    }

    #[test]
    fn prefix_requests_and_ec2s_combination_rules() {
        let q = |b: &str| Query::parse(b.as_bytes(), None);
        let ask = q("Action=AssignPrivateIpAddresses&NetworkInterfaceId=eni-1&Ipv4PrefixCount=2")
            .prefix_ask()
            .unwrap();
        assert_eq!(ask, Some(PrefixAsk::Count(2)));
        assert_eq!(ask.unwrap().count(), 2);
        let ask = q("Action=AssignPrivateIpAddresses&Ipv4Prefix.2=10.0.0.32%2F28&Ipv4Prefix.1=10.0.0.16%2F28")
            .prefix_ask()
            .unwrap();
        assert_eq!(
            ask,
            Some(PrefixAsk::Explicit(vec![
                "10.0.0.16/28".into(),
                "10.0.0.32/28".into()
            ]))
        );
        // CreateNetworkInterface nests the prefix: Ipv4Prefix.N.Ipv4Prefix.
        let ask = q("Action=CreateNetworkInterface&SubnetId=s&Ipv4Prefix.1.Ipv4Prefix=10.0.0.16%2F28&PrivateIpAddress=10.0.0.5")
            .prefix_ask()
            .unwrap();
        assert_eq!(ask, Some(PrefixAsk::Explicit(vec!["10.0.0.16/28".into()])));
        for none in [
            "Action=AssignPrivateIpAddresses&SecondaryPrivateIpAddressCount=2",
            "Action=AssignPrivateIpAddresses&Ipv4PrefixCount=0&SecondaryPrivateIpAddressCount=1",
        ] {
            assert_eq!(q(none).prefix_ask().unwrap(), None, "{none}");
        }
        for bad in [
            "Action=AssignPrivateIpAddresses&Ipv4PrefixCount=1&SecondaryPrivateIpAddressCount=1",
            "Action=AssignPrivateIpAddresses&Ipv4PrefixCount=1&PrivateIpAddress.1=10.0.0.9",
            "Action=AssignPrivateIpAddresses&Ipv4PrefixCount=1&Ipv4Prefix.1=10.0.0.16%2F28",
            "Action=CreateNetworkInterface&Ipv4PrefixCount=1&SecondaryPrivateIpAddressCount=2",
            "Action=CreateNetworkInterface&Ipv4PrefixCount=1&PrivateIpAddresses.1.PrivateIpAddress=10.0.0.9",
        ] {
            let e = q(bad).prefix_ask().unwrap_err();
            assert_eq!(e.code, "InvalidParameterCombination", "{bad}");
        }
        let e = q("Action=AssignPrivateIpAddresses&Ipv4PrefixCount=two")
            .prefix_ask()
            .unwrap_err();
        assert_eq!(e.code, "InvalidParameterValue");

        let u = q("Action=UnassignPrivateIpAddresses&Ipv4Prefix.1=10.0.0.16%2F28");
        assert_eq!(u.unassign_prefixes().unwrap(), ["10.0.0.16/28"]);
        assert!(
            q("Action=UnassignPrivateIpAddresses&PrivateIpAddress.1=10.0.0.9")
                .unassign_prefixes()
                .unwrap()
                .is_empty()
        );
        let e = q("Action=UnassignPrivateIpAddresses&PrivateIpAddress.1=10.0.0.9&Ipv4Prefix.1=10.0.0.16%2F28")
            .unassign_prefixes()
            .unwrap_err();
        assert_eq!(e.code, "InvalidParameterCombination");
        // The explicit address list of a create is counted (it was not).
        assert_eq!(
            q("Action=CreateNetworkInterface&PrivateIpAddresses.1.PrivateIpAddress=10.0.0.9&PrivateIpAddresses.2.PrivateIpAddress=10.0.0.10")
                .create_count()
                .unwrap(),
            2
        );
    }

    /// A /24 with the primary .10 (first /28), a secondary .40 (third /28) and a prefix .64/28.
    fn subnet_use() -> SubnetUse {
        SubnetUse {
            cidr: net("10.0.0.0/24"),
            addrs: [ip("10.0.0.10"), ip("10.0.0.40")].into(),
            prefixes: vec![net("10.0.0.64/28")],
        }
    }

    #[test]
    fn free_prefixes_are_aligned_inside_and_clear_of_everything_in_use() {
        let u = subnet_use();
        let taken = u.taken();
        assert_eq!(taken.len(), 2 + 16);
        assert!(taken.contains(&ip("10.0.0.64")) && taken.contains(&ip("10.0.0.79")));
        let free = u.free_prefixes(false);
        // 16 /28s: the first (reserved .0-.3, and .10), the last (broadcast), .32/28 (.40)
        // and .64/28 (a prefix) are not free.
        assert_eq!(free.len(), 12, "{free:?}");
        for p in &free {
            assert_eq!(p.prefix_len(), PREFIX_LEN);
            assert_eq!(p.trunc(), *p);
            assert!(u.cidr.contains(p));
            assert!(!taken.iter().any(|a| p.contains(a)), "{p}");
        }
        for not in [
            "10.0.0.0/28",
            "10.0.0.32/28",
            "10.0.0.64/28",
            "10.0.0.240/28",
        ] {
            assert!(!free.contains(&net(not)), "{not}");
        }
        assert!(free.contains(&net("10.0.0.16/28")) && free.contains(&net("10.0.0.224/28")));
        assert!(u.free_prefixes(true).is_empty(), "fragmented: none free");
        // A subnet smaller than /28 has none; a /27 neither (reserved at both ends).
        for tiny in ["10.0.0.0/29", "10.0.0.0/28", "10.0.0.0/27"] {
            let t = SubnetUse {
                cidr: net(tiny),
                ..SubnetUse::default()
            };
            assert!(t.free_prefixes(false).is_empty(), "{tiny}");
        }
        let t = SubnetUse {
            cidr: net("10.0.0.0/26"),
            ..SubnetUse::default()
        };
        assert_eq!(
            t.free_prefixes(false),
            [net("10.0.0.16/28"), net("10.0.0.32/28")]
        );
    }

    #[test]
    fn picking_prefixes_is_unique_or_insufficient_cidr_blocks() {
        let u = subnet_use();
        for _ in 0..20 {
            let got = u.pick_prefixes("subnet-a", 12, false).unwrap();
            let set: BTreeSet<_> = got.iter().collect();
            assert_eq!(set.len(), 12, "no duplicates: {got:?}");
            assert!(got.iter().all(|p| u.free_prefixes(false).contains(p)));
        }
        let e = u.pick_prefixes("subnet-a", 13, false).unwrap_err();
        assert_eq!((e.status, e.code.as_str()), (400, "InsufficientCidrBlocks"));
        assert!(
            e.message.contains("subnet-a") && e.message.contains("12 free"),
            "{}",
            e.message
        );
        let e = u.pick_prefixes("subnet-a", 1, true).unwrap_err();
        assert_eq!(e.code, "InsufficientCidrBlocks");
        // Single addresses are not affected by fragmentation: they come from `taken`.
        assert!(pick_free(u.cidr, &u.taken(), 200).is_some());
        let all = pick_free(u.cidr, &u.taken(), 256 - 5 - 18).unwrap();
        assert!(!all.iter().any(|a| net("10.0.0.64/28").contains(a)));
    }

    #[test]
    fn explicit_prefixes_are_checked_like_ec2() {
        let u = subnet_use();
        let ok = u
            .check_explicit("subnet-a", &["10.0.0.16/28".into(), "10.0.0.48/28".into()])
            .unwrap();
        assert_eq!(ok, [net("10.0.0.16/28"), net("10.0.0.48/28")]);
        for (bad, why) in [
            ("10.0.0.16/27", "/28"),
            ("10.0.0.17/28", "aligned"),
            ("10.0.1.16/28", "not within"),
            ("nonsense", "CIDR"),
            ("10.0.0.64/28", "in use"),
            ("10.0.0.32/28", "in use"),
            ("10.0.0.0/28", "reserved"),
        ] {
            let e = u.check_explicit("subnet-a", &[bad.into()]).unwrap_err();
            assert_eq!(e.code, "InvalidParameterValue", "{bad}");
            assert!(e.message.contains(why), "{bad}: {}", e.message);
        }
        // The same prefix twice in one request.
        let e = u
            .check_explicit("subnet-a", &["10.0.0.16/28".into(), "10.0.0.16/28".into()])
            .unwrap_err();
        assert!(e.message.contains("in use"), "{}", e.message);
    }

    #[test]
    fn nitro_and_release_rules() {
        assert!(check_nitro("i-1", "m5.large", true).is_ok());
        let e = check_nitro("i-1", "t2.micro", false).unwrap_err();
        assert_eq!(e.code, "InvalidParameterValue");
        assert!(e.message.contains("t2.micro") && e.message.contains("Nitro"));

        let have = [net("10.0.0.16/28"), net("10.0.0.32/28")];
        assert_eq!(
            release_prefixes("eni-1", &have, &["10.0.0.16/28"]).unwrap(),
            [net("10.0.0.32/28")]
        );
        assert!(
            release_prefixes("eni-1", &have, &["10.0.0.16/28", "10.0.0.32/28"])
                .unwrap()
                .is_empty()
        );
        for bad in ["10.0.0.48/28", "junk"] {
            let e = release_prefixes("eni-1", &have, &["10.0.0.16/28", bad]).unwrap_err();
            assert_eq!(e.code, "InvalidParameterValue");
            assert!(e.message.contains("eni-1") && e.message.contains(bad));
        }
        // Addresses and prefixes share the per-interface limit: 1 primary + 2 secondaries +
        // 6 prefixes on an m5.large (10) leave room for one more of either.
        assert!(check_ip_limit("eni-1", "m5.large", 10, 3 + 6, 1).is_ok());
        assert!(check_ip_limit("eni-1", "m5.large", 10, 3 + 6, 2).is_err());
    }

    #[test]
    fn prefixes_live_in_a_tag_that_answers_never_show() {
        let ps = [net("10.0.0.16/28"), net("10.0.0.48/28")];
        assert_eq!(prefix_tag_value(&ps), "10.0.0.16/28,10.0.0.48/28");
        assert_eq!(prefixes_from_tag(&prefix_tag_value(&ps)), ps);
        assert_eq!(prefixes_from_tag("10.0.0.16/28, junk,"), [ps[0]]);
        assert!(prefixes_from_tag("").is_empty());

        let mut e = cloud::NetworkInterface {
            id: "eni-1".into(),
            mac: "02:00:00:00:00:01".into(),
            subnet_id: "subnet-a".into(),
            vpc_id: "vpc-1".into(),
            status: "in-use".into(),
            description: String::new(),
            primary_ip: ip("10.0.0.10"),
            secondary_ips: vec![],
            prefixes: vec![],
            security_groups: vec![],
            tags: [
                ("Name".to_string(), "x".to_string()),
                (PREFIX_TAG.to_string(), prefix_tag_value(&ps)),
            ]
            .into(),
            attachment: None,
            interface_type: "interface".into(),
        };
        e = with_lab_prefixes(e);
        assert_eq!(e.prefixes, ps);
        assert_eq!(e.tags.keys().collect::<Vec<_>>(), ["Name"]);
        let u = SubnetUse::new(net("10.0.0.0/24"), &[e]);
        assert_eq!(u.prefixes, ps);
        assert_eq!(u.addrs, [ip("10.0.0.10")].into());

        // moto's DescribeNetworkInterfaces answer: the tag becomes EC2's ipv4PrefixSet.
        let moto = format!(
            "<DescribeNetworkInterfacesResponse><networkInterfaceSet><item><networkInterfaceId>eni-1</networkInterfaceId><groupSet><item><groupId>sg-1</groupId></item></groupSet><tagSet><item><key>Name</key><value>x</value></item><item><key>{PREFIX_TAG}</key><value>10.0.0.16/28,10.0.0.48/28</value></item></tagSet><vpcId>vpc-1</vpcId></item><item><networkInterfaceId>eni-2</networkInterfaceId><tagSet/></item><item><networkInterfaceId>eni-3</networkInterfaceId><tagSet><item><key>{PREFIX_TAG}</key><value>10.0.0.96/28</value></item></tagSet></item></networkInterfaceSet></DescribeNetworkInterfacesResponse>"
        );
        let out = rewrite_prefix_tags(&moto, true);
        assert!(!out.contains(PREFIX_TAG), "{out}");
        assert!(out.contains("<tagSet><item><key>Name</key><value>x</value></item></tagSet><ipv4PrefixSet><item><ipv4Prefix>10.0.0.16/28</ipv4Prefix></item><item><ipv4Prefix>10.0.0.48/28</ipv4Prefix></item></ipv4PrefixSet><vpcId>vpc-1</vpcId>"), "{out}");
        assert!(
            out.contains("<networkInterfaceId>eni-2</networkInterfaceId><tagSet/></item>"),
            "{out}"
        );
        assert!(out.contains("<networkInterfaceId>eni-3</networkInterfaceId><tagSet/><ipv4PrefixSet><item><ipv4Prefix>10.0.0.96/28</ipv4Prefix></item></ipv4PrefixSet></item>"), "{out}");
        assert!(out.contains("<groupSet><item><groupId>sg-1</groupId></item></groupSet>"));
        // DescribeTags: the tag is dropped, nothing added.
        let tags = format!(
            "<DescribeTagsResponse><tagSet><item><resourceId>eni-1</resourceId><key>{PREFIX_TAG}</key><value>10.0.0.16/28</value></item><item><resourceId>eni-1</resourceId><key>Name</key><value>x</value></item></tagSet></DescribeTagsResponse>"
        );
        let out = rewrite_prefix_tags(&tags, false);
        assert_eq!(
            out,
            "<DescribeTagsResponse><tagSet><item><resourceId>eni-1</resourceId><key>Name</key><value>x</value></item></tagSet></DescribeTagsResponse>"
        );
        assert_eq!(rewrite_prefix_tags("<x/>", true), "<x/>");

        let a = assign_prefixes_answer("eni-1", &ps, "r-1");
        assert!(a.contains("<networkInterfaceId>eni-1</networkInterfaceId>"));
        assert!(a.contains("<assignedIpv4PrefixSet><item><ipv4Prefix>10.0.0.16/28</ipv4Prefix></item><item><ipv4Prefix>10.0.0.48/28</ipv4Prefix></item></assignedIpv4PrefixSet>"), "{a}");
        assert!(unassign_answer("r-2").contains("<return>true</return>"));
    }

    /// moto describes an attached ENI with its instance's groups added; the proxy's tag keeps
    /// the ENI's own, and answers and the world show only those.
    #[test]
    fn an_enis_own_groups_live_in_a_tag_that_answers_never_show() {
        assert_eq!(groups_from_tag("sg-a, sg-b,"), ["sg-a", "sg-b"]);
        let e = cloud::NetworkInterface {
            id: "eni-1".into(),
            mac: "02:00:00:00:00:01".into(),
            subnet_id: "subnet-p".into(),
            vpc_id: "vpc-1".into(),
            status: "in-use".into(),
            description: String::new(),
            primary_ip: ip("100.64.0.10"),
            secondary_ips: vec![],
            prefixes: vec![],
            security_groups: vec!["sg-inst".into(), "sg-pods".into()],
            tags: [(GROUPS_TAG.to_string(), "sg-pods".to_string())].into(),
            attachment: None,
            interface_type: "interface".into(),
        };
        let e = with_lab_prefixes(e);
        assert_eq!(e.security_groups, ["sg-pods"]);
        assert!(e.tags.is_empty());

        let moto = format!(
            "<DescribeNetworkInterfacesResponse><networkInterfaceSet><item><networkInterfaceId>eni-1</networkInterfaceId><groupSet><item><groupId>sg-inst</groupId><groupName>vpc-lab</groupName></item><item><groupId>sg-pods</groupId><groupName>vpc-lab-pods</groupName></item></groupSet><privateIpAddressesSet><item><privateIpAddress>100.64.0.10</privateIpAddress></item></privateIpAddressesSet><tagSet><item><key>{GROUPS_TAG}</key><value>sg-pods</value></item></tagSet><vpcId>vpc-1</vpcId></item><item><networkInterfaceId>eni-2</networkInterfaceId><groupSet><item><groupId>sg-inst</groupId></item></groupSet><tagSet/></item><item><networkInterfaceId>eni-3</networkInterfaceId><groupSet/><tagSet><item><key>{GROUPS_TAG}</key><value>sg-a,sg-b</value></item><item><key>{PREFIX_TAG}</key><value>100.64.1.0/28</value></item></tagSet></item></networkInterfaceSet></DescribeNetworkInterfacesResponse>"
        );
        let name = |g: &str| (g == "sg-pods").then(|| "vpc-lab-pods".to_string());
        let out = rewrite_lab_tags(&moto, true, &name);
        assert!(
            !out.contains(GROUPS_TAG) && !out.contains(PREFIX_TAG),
            "{out}"
        );
        assert!(out.contains("<networkInterfaceId>eni-1</networkInterfaceId><groupSet><item><groupId>sg-pods</groupId><groupName>vpc-lab-pods</groupName></item></groupSet><privateIpAddressesSet>"), "{out}");
        assert!(
            out.contains("<networkInterfaceId>eni-2</networkInterfaceId><groupSet><item><groupId>sg-inst</groupId></item></groupSet><tagSet/>"),
            "an ENI without the tag keeps moto's groups: {out}"
        );
        assert!(out.contains("<networkInterfaceId>eni-3</networkInterfaceId><groupSet><item><groupId>sg-a</groupId><groupName></groupName></item><item><groupId>sg-b</groupId><groupName></groupName></item></groupSet><tagSet/><ipv4PrefixSet><item><ipv4Prefix>100.64.1.0/28</ipv4Prefix></item></ipv4PrefixSet>"), "{out}");
        // DescribeTags: only stripped.
        let tags = format!(
            "<DescribeTagsResponse><tagSet><item><resourceId>eni-1</resourceId><key>{GROUPS_TAG}</key><value>sg-pods</value></item></tagSet></DescribeTagsResponse>"
        );
        assert_eq!(
            rewrite_lab_tags(&tags, false, &name),
            "<DescribeTagsResponse><tagSet/></DescribeTagsResponse>"
        );
        // A create carries the tag.
        let q = Query::parse(
            b"Action=CreateNetworkInterface&SubnetId=s&SecurityGroupId.1=sg-pods",
            None,
        );
        let c = create_with_tag(&q, GROUPS_TAG, "sg-pods");
        assert_eq!(
            c.get("TagSpecification.1.ResourceType"),
            Some("network-interface")
        );
        assert_eq!(c.get("TagSpecification.1.Tag.1.Key"), Some(GROUPS_TAG));
        assert_eq!(c.get("TagSpecification.1.Tag.1.Value"), Some("sg-pods"));
    }

    #[test]
    fn a_create_with_prefixes_carries_the_tag_instead() {
        let q = Query::parse(
            b"Action=CreateNetworkInterface&SubnetId=s&Ipv4PrefixCount=2&TagSpecification.1.ResourceType=network-interface&TagSpecification.1.Tag.1.Key=a&TagSpecification.1.Tag.1.Value=b",
            None,
        );
        let ps = [net("10.0.0.16/28"), net("10.0.0.48/28")];
        let c = create_with_prefix_tag(&q, &ps);
        assert_eq!(c.get("Ipv4PrefixCount"), None);
        assert_eq!(
            c.list_field("TagSpecification.1.Tag", "Key"),
            ["a", PREFIX_TAG]
        );
        assert_eq!(
            c.list_field("TagSpecification.1.Tag", "Value"),
            ["b", "10.0.0.16/28,10.0.0.48/28"]
        );
        assert_eq!(c.get("TagSpecification.2.ResourceType"), None);
        // Without tags of its own: a specification is added.
        let q = Query::parse(
            b"Action=CreateNetworkInterface&SubnetId=s&Ipv4Prefix.1.Ipv4Prefix=10.0.0.16%2F28",
            None,
        );
        let c = create_with_prefix_tag(&q, &ps[..1]);
        assert!(
            !c.params.keys().any(|k| k.starts_with("Ipv4Prefix")),
            "{c:?}"
        );
        assert_eq!(
            c.get("TagSpecification.1.ResourceType"),
            Some("network-interface")
        );
        assert_eq!(c.get("TagSpecification.1.Tag.1.Key"), Some(PREFIX_TAG));
        assert_eq!(
            c.get("TagSpecification.1.Tag.1.Value"),
            Some("10.0.0.16/28")
        );
    }

    #[test]
    fn the_prefix_filter_becomes_an_exact_tag_filter() {
        let q = Query::parse(
            b"Action=DescribeNetworkInterfaces&Filter.1.Name=subnet-id&Filter.1.Value.1=subnet-a&Filter.2.Name=ipv4-prefix.ipv4-prefix&Filter.2.Value.1=10.0.0.16%2F28",
            None,
        );
        let t = Query::parse(translate_prefix_filter(&q).unwrap().as_bytes(), None);
        assert_eq!(t.get("Filter.1.Name"), Some("subnet-id"));
        assert_eq!(t.get("Filter.2.Name"), Some("tag:vpc-lab:ipv4-prefixes"));
        let patterns = t.list("Filter.2.Value");
        assert_eq!(
            patterns,
            [
                "10.0.0.16/28",
                "10.0.0.16/28,*",
                "*,10.0.0.16/28",
                "*,10.0.0.16/28,*"
            ]
        );
        // fnmatch semantics (moto's): the patterns match the tag only where it holds the prefix.
        let matches = |v: &str| {
            patterns.iter().any(|p| {
                let (pre, post) = (p.starts_with('*'), p.ends_with('*'));
                let core = p.trim_matches('*');
                match (pre, post) {
                    (false, false) => v == core,
                    (false, true) => v.starts_with(core),
                    (true, false) => v.ends_with(core),
                    (true, true) => v.contains(core),
                }
            })
        };
        for yes in [
            "10.0.0.16/28",
            "10.0.0.16/28,10.0.0.32/28",
            "10.0.0.32/28,10.0.0.16/28",
        ] {
            assert!(matches(yes), "{yes}");
        }
        for no in [
            "110.0.0.16/28",
            "10.0.0.160/28",
            "10.0.0.32/28,110.0.0.16/28",
        ] {
            assert!(!matches(no), "{no}");
        }
        assert!(
            translate_prefix_filter(&Query::parse(b"Action=DescribeNetworkInterfaces", None))
                .is_none()
        );
    }

    #[test]
    fn token_buckets_throttle_and_refill() {
        let t0 = Instant::now();
        let mut b = Buckets::default();
        let s = Throttle::Uniform {
            burst: 3.0,
            per_s: 2.0,
        };
        let admitted = (0..5)
            .filter(|_| b.admit(s, "AssignPrivateIpAddresses", t0))
            .count();
        assert_eq!(admitted, 3, "a burst of 3");
        assert!(
            b.admit(s, "DescribeNetworkInterfaces", t0),
            "buckets are per API"
        );
        assert!(!b.admit(
            s,
            "AssignPrivateIpAddresses",
            t0 + Duration::from_millis(400)
        ));
        assert!(b.admit(
            s,
            "AssignPrivateIpAddresses",
            t0 + Duration::from_millis(600)
        ));
        assert!(b.admit(Throttle::Off, "AssignPrivateIpAddresses", t0));
        // EC2's defaults: a burst of 100 mutating calls, then 5 a second.
        let mut b = Buckets::default();
        let n = (0..150)
            .filter(|_| b.admit(Throttle::Ec2, "AttachNetworkInterface", t0))
            .count();
        assert_eq!(n, 100);
        assert_eq!(ec2_bucket("DescribeInstances"), (100.0, 20.0));
    }
}
