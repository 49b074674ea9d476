//! The EC2 fidelity layer's pure parts: the knobs (`vpc-lab up` flags and `vpc-lab fidelity
//! set`), EC2 Query API parsing, EC2's error format, the token buckets, the limit decisions and
//! the rewrite of moto's AssignPrivateIpAddresses answer. The proxy (`ec2proxy`) uses them.

use std::collections::BTreeMap;
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
}

pub const KEYS: &[&str] = &[
    "ec2-error-rate",
    "ec2-latency-ms",
    "ec2-throttle",
    "imds-delay-ms",
    "attach-delay-ms",
    "subnet-free",
];

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
            _ => bail!("unknown fidelity knob {key:?}; knobs: {}", KEYS.join(", ")),
        }
        Ok(())
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
        let explicit = self.list("PrivateIpAddresses").len() as u32;
        let secondaries = self.number("SecondaryPrivateIpAddressCount")?.unwrap_or(0);
        // `PrivateIpAddresses.N.PrivateIpAddress` entries include the primary when given.
        Ok((1 + secondaries).max(explicit))
    }
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
    let mut rest = inner;
    while let Some(s) = rest.find("<item>") {
        let Some(e) = rest[s..].find("</item>") else {
            break;
        };
        let item = &rest[s..s + e + "</item>".len()];
        let ip = between(item, "<privateIpAddress>", "</privateIpAddress>")
            .and_then(|v| v.trim().parse::<Ipv4Addr>().ok());
        if !ip.is_some_and(|ip| before.contains(&ip)) {
            kept.push_str(item);
        }
        rest = &rest[s + e + "</item>".len()..];
    }
    format!(
        "{}{OPEN}{kept}{CLOSE}{}",
        &xml[..a],
        &xml[b + CLOSE.len()..]
    )
}

fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let a = s.find(open)? + open.len();
    let b = s[a..].find(close)? + a;
    Some(&s[a..b])
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
    /// Answered 2xx by moto.
    pub ok: u64,
    /// Answered 503 RequestLimitExceeded by the token buckets.
    pub throttled: u64,
    /// Answered 503/500 by error injection.
    pub injected: u64,
    /// Refused by an EC2 rule moto lacks (limits, InUse, subnet full).
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
