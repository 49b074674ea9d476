//! `vpc-lab pod add|del|check`: a container runtime's side of CNI, run against an instance.
//!
//! Like containerd/libcni: the pod namespace is created from the root mount namespace; the
//! network config is the first config file (lexicographically) of the instance's conf dir;
//! every plugin of the list is exec'd from `CNI_PATH` with the `CNI_*` variables and its config
//! (plugin object + `cniVersion` + `name`, `prevResult` chained on ADD and the stored ADD result
//! on DEL/CHECK) on stdin; the plugin runs inside the instance's network namespace, so its
//! host side lands there. Capability arguments (`--port-mapping`) go into `runtimeConfig` of the
//! plugins that declare the capability, on ADD and again on DEL and CHECK, as libcni does.
//!
//! The lab's Kubernetes API holds each pod's `Pod`, as with a kubelet: written (scheduled on the
//! instance) before the ADD unless it exists, `Running` with the pod's addresses after it,
//! deleted after a successful DEL or when the failed ADD's pod is forgotten (`crate::kube`; one
//! small request to the daemon each).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lab_net::ns;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use testkit::cni::{CapabilityArgs, ConfList, Outcome, PodRef, Runtime};

use crate::{kube, paths};

/// A pod as the runtime remembers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodRecord {
    pub instance: String,
    pub namespace: String,
    pub name: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub network: String,
    pub cni_version: String,
    /// The final ADD result of the plugin list.
    pub result: Value,
    pub add_ms: f64,
    /// The capability arguments of the ADD (`portMappings`), passed again on DEL and CHECK.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub capability_args: CapabilityArgs,
}

/// A hostPort mapping, `HOST:CONTAINER[/tcp|/udp]` on the command line; the runtime passes it
/// as the `portMappings` capability (Kubernetes' `hostPort` of a container port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub udp: bool,
}

impl std::str::FromStr for PortMapping {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let usage = || {
            anyhow::anyhow!(
                "port mapping {s:?} is not HOST:CONTAINER[/tcp|/udp] (for example 8080:80/tcp)"
            )
        };
        let (ports, proto) = match s.split_once('/') {
            Some((p, proto)) => (p, proto),
            None => (s, "tcp"),
        };
        let udp = match proto {
            "tcp" => false,
            "udp" => true,
            _ => return Err(usage()),
        };
        let (h, c) = ports.split_once(':').ok_or_else(usage)?;
        let port = |x: &str| x.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(usage);
        Ok(PortMapping {
            host_port: port(h)?,
            container_port: port(c)?,
            udp,
        })
    }
}

/// The capability arguments a runtime passes for `mappings` (none when there are none, as
/// containerd omits an empty `portMappings`).
pub fn capability_args(mappings: &[PortMapping]) -> CapabilityArgs {
    let mut caps = CapabilityArgs::new();
    if !mappings.is_empty() {
        let list = mappings
            .iter()
            .map(|m| {
                serde_json::json!({
                    "hostPort": m.host_port,
                    "containerPort": m.container_port,
                    "protocol": if m.udp { "udp" } else { "tcp" },
                })
            })
            .collect();
        caps.insert("portMappings".into(), Value::Array(list));
    }
    caps
}

impl PodRecord {
    /// The IPv4 addresses of the result.
    pub fn ips(&self) -> Vec<Ipv4Addr> {
        let mut v = Vec::new();
        if let Some(ips) = self.result.get("ips").and_then(|x| x.as_array()) {
            for ip in ips {
                if let Some(a) = ip.get("address").and_then(|a| a.as_str())
                    && let Some((addr, _)) = a.split_once('/')
                    && let Ok(addr) = addr.parse()
                {
                    v.push(addr);
                }
            }
        }
        v
    }

    /// The pod's network namespace name.
    pub fn ns_name(&self) -> String {
        ns::pod_ns(&self.instance, &self.namespace, &self.name)
    }

    pub fn display(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The pod as the CNI harness addresses it.
    pub fn pod_ref(&self) -> PodRef {
        PodRef {
            container_id: self.container_id.clone(),
            netns: self.netns.clone(),
            ifname: self.ifname.clone(),
            k8s_namespace: self.namespace.clone(),
            k8s_name: self.name.clone(),
        }
    }
}

/// `<ns>/<name>` → (ns, name), validated.
pub fn parse_pod(s: &str) -> Result<(String, String)> {
    let Some((ns, name)) = s.split_once('/') else {
        bail!("pod {s:?} is not <namespace>/<name> (for example default/pod-a)");
    };
    let ok = |x: &str| {
        !x.is_empty()
            && x.len() <= 63
            && x.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    };
    if !ok(ns) || !ok(name) {
        bail!("pod {s:?}: namespace and name must be 1-63 characters of a-z, 0-9, '-' or '.'");
    }
    Ok((ns.to_string(), name.to_string()))
}

fn record_path(instance: &str, ns: &str, name: &str) -> PathBuf {
    paths::inst_dir(instance)
        .join("pods")
        .join(format!("{ns}_{name}.json"))
}

/// Every pod record of every instance.
pub fn all_records() -> Result<Vec<PodRecord>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(paths::run_dir()) else {
        return Ok(out);
    };
    for inst in rd.flatten() {
        let pods = inst.path().join("pods");
        let Ok(rd) = std::fs::read_dir(&pods) else {
            continue;
        };
        for f in rd.flatten() {
            let p = f.path();
            if p.extension().is_some_and(|e| e == "json") {
                let r: PodRecord = serde_json::from_slice(&std::fs::read(&p)?)
                    .with_context(|| format!("parsing pod record {}", p.display()))?;
                out.push(r);
            }
        }
    }
    out.sort_by(|a, b| {
        (&a.instance, &a.namespace, &a.name).cmp(&(&b.instance, &b.namespace, &b.name))
    });
    Ok(out)
}

/// (instance, IP) → `ns/name` of the pod holding it.
pub fn ip_holders() -> Result<BTreeMap<(String, Ipv4Addr), String>> {
    let mut m = BTreeMap::new();
    for r in all_records()? {
        for ip in r.ips() {
            m.insert((r.instance.clone(), ip), r.display());
        }
    }
    Ok(m)
}

/// The pod holding `ip`.
pub fn by_ip(ip: Ipv4Addr) -> Result<PodRecord> {
    let all = all_records()?;
    all.iter()
        .find(|r| r.ips().contains(&ip))
        .cloned()
        .with_context(|| {
            format!(
                "no pod holds {ip} (pods: {}); add pods with `vpc-lab pod add instance1 default/pod-a` until one gets it",
                all.iter()
                    .map(|r| format!("{} {:?}", r.display(), r.ips()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// Finds a pod by `<ns>/<name>` or `<instance>:<ns>/<name>`.
pub fn find(target: &str) -> Result<PodRecord> {
    let (inst, pod) = match target.split_once(':') {
        Some((i, p)) => (Some(i), p),
        None => (None, target),
    };
    let (ns, name) = parse_pod(pod)?;
    let found: Vec<PodRecord> = all_records()?
        .into_iter()
        .filter(|r| r.namespace == ns && r.name == name && inst.is_none_or(|i| i == r.instance))
        .collect();
    match found.len() {
        0 => bail!("no pod {target:?} in the lab (see `vpc-lab status`)"),
        1 => Ok(found.into_iter().next().expect("one")),
        _ => bail!(
            "pod {pod:?} exists on several instances ({}); say which: <instance>:{pod}",
            found
                .iter()
                .map(|r| r.instance.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The runtime of an instance: its first network configuration, its CNI bin dir, and plugins
/// exec'd inside the instance's namespace.
pub fn runtime(instance: &str) -> Result<Runtime> {
    let dir = paths::conf_dir(instance);
    let conf = ConfList::load_dir(&dir).with_context(|| {
        format!(
            "is the agent of {instance} running and ready? (see {}/agent.log; `vpc-lab agent start {instance}`)",
            paths::inst_dir(instance).display()
        )
    })?;
    Ok(runtime_with(instance, conf))
}

/// A runtime on `instance` for the network `conf` (plugins from the instance's CNI bin dir,
/// exec'd inside its namespace).
pub fn runtime_with(instance: &str, conf: ConfList) -> Runtime {
    let bin_dir = paths::cni_bin_dir(instance);
    let ins = ns::instance_ns(instance);
    Runtime {
        conf,
        cni_path: bin_dir.display().to_string(),
        bin_dir,
        spawn: Box::new(move |bin| {
            let program = bin.to_str().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "plugin path is not UTF-8")
            })?;
            ns::command(&ins, program).map_err(std::io::Error::other)
        }),
    }
}

/// Prints a plugin's stderr (its logs) and timing, as a runtime's log would.
fn echo(o: &Outcome) {
    if !o.stderr.trim().is_empty() {
        eprint!("{}", o.stderr);
    }
    eprintln!(
        "{} {}: {:.1} ms (exit {})",
        o.ty,
        o.verb,
        o.elapsed.as_secs_f64() * 1000.0,
        o.status.code().unwrap_or(-1)
    );
}

/// 64 random hex digits (a container ID; the lab's kubelet's pod UIDs and probe delays).
pub(crate) fn random_id() -> Result<String> {
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .context("reading /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn write_record(r: &PodRecord) -> Result<()> {
    let p = record_path(&r.instance, &r.namespace, &r.name);
    std::fs::create_dir_all(p.parent().expect("has parent"))?;
    let tmp = p.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(r)?)?;
    std::fs::rename(&tmp, &p)?;
    Ok(())
}

/// Records a pod wired by something other than [`add`] (`aws_node::wire`), so that
/// `vpc-lab pod del|check`, `status` and the matrix see it like any runtime pod.
pub fn save_record(r: &PodRecord) -> Result<()> {
    write_record(r)
}

fn check_instance(instance: &str) -> Result<()> {
    if !ns::exists(&ns::instance_ns(instance)) {
        bail!(
            "no instance {instance:?} in the lab (namespace {} missing); instances: {}",
            ns::instance_ns(instance),
            ns::list_lab()
                .iter()
                .filter_map(|n| n.strip_prefix("vpclab-"))
                .filter(|n| !n.starts_with("pod-") && *n != "fabric" && *n != "internet")
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// A CNI call that the plugin answered with an error (or that was killed at its deadline, with
/// no answer); `vpc-lab` exits with its code.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed (CNI error code {code}): {output}")]
pub struct CniFailure {
    pub code: u32,
    pub what: String,
    pub output: String,
    /// The signal that ended the plugin (a runtime's timeout kill).
    pub signal: Option<i32>,
}

/// What `add` prints: the result (pretty or on one line) and each plugin call's stderr and time
/// on stderr, as `vpc-lab pod add` does; or nothing (the benchmarks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Print {
    Pretty,
    Compact,
    Quiet,
}

/// `vpc-lab pod add`. Prints as `print` says; fails (after
/// cleaning up) when the plugin fails.
pub fn add(instance: &str, pod: &str, print: Print) -> Result<PodRecord> {
    add_with(instance, pod, print, &[])
}

/// [`add`] with hostPort mappings (`vpc-lab pod add --port-mapping`), passed to the plugins
/// that declare the `portMappings` capability (portmap) and recorded for DEL and CHECK.
pub fn add_with(
    instance: &str,
    pod: &str,
    print: Print,
    port_mappings: &[PortMapping],
) -> Result<PodRecord> {
    add_until(instance, pod, print, port_mappings, None)
}

/// [`add_with`] as a runtime whose sandbox request times out at `deadline`: a plugin still
/// running then is killed (SIGKILL), and the pod is torn down with DEL as after any failed
/// ADD (the failure's `signal` says it was killed).
pub fn add_until(
    instance: &str,
    pod: &str,
    print: Print,
    port_mappings: &[PortMapping],
    deadline: Option<Instant>,
) -> Result<PodRecord> {
    check_instance(instance)?;
    let (pns, pname) = parse_pod(pod)?;
    let rec = record_path(instance, &pns, &pname);
    if rec.exists() {
        bail!(
            "pod {pod} already exists on {instance} ({}); `vpc-lab pod del {instance} {pod}` first",
            rec.display()
        );
    }
    let rt = runtime(instance)?;
    // As the API server would hold it before a kubelet creates the sandbox; forgotten again
    // unless the ADD succeeds.
    let wrote_pod = if kube::available() {
        kube::pod_scheduled(&pns, &pname, instance)
            .with_context(|| format!("writing the Pod {pod} to the lab's Kubernetes API"))?
    } else {
        tracing::warn!("the lab runs no Kubernetes API (no control socket): no Pod for {pod}");
        false
    };
    let mut pod_guard = PodGuard {
        armed: wrote_pod,
        instance,
        namespace: &pns,
        name: &pname,
    };
    let netns_name = ns::pod_ns(instance, &pns, &pname);
    ns::add(&netns_name)?;
    let netns = ns::path(&netns_name).display().to_string();
    let pod_ref = PodRef {
        container_id: random_id()?,
        netns: netns.clone(),
        ifname: "eth0".into(),
        k8s_namespace: pns.clone(),
        k8s_name: pname.clone(),
    };
    let caps = capability_args(port_mappings);
    let (result, total) = match rt.add_until(&pod_ref, &caps, deadline)? {
        Ok(ok) => ok,
        Err(failed) => {
            if print != Print::Quiet {
                echo(&failed);
            }
            // Like a runtime: tear down what may have been set up (retrying a failed DEL for
            // up to 10 s, as kubelet retries a sandbox teardown), then forget the pod.
            let t = Instant::now();
            loop {
                match rt.del_with(&pod_ref, None, &caps) {
                    Ok((left, _)) if left.is_empty() => break,
                    Ok((left, _)) => eprintln!(
                        "clean-up DEL after the failed ADD also failed: {}",
                        left.iter()
                            .map(Outcome::describe)
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                    Err(e) => eprintln!("clean-up DEL after the failed ADD: {e}"),
                }
                if t.elapsed() > Duration::from_secs(10) {
                    eprintln!("giving up the clean-up DEL of {pod} after 10 s");
                    break;
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            let _ = ns::del(&netns_name);
            return Err(CniFailure {
                code: u32::try_from(failed.error_code()).unwrap_or(0),
                what: format!("CNI ADD of {pod} on {instance}"),
                output: failed.stdout.trim().to_string(),
                signal: std::os::unix::process::ExitStatusExt::signal(&failed.status),
            }
            .into());
        }
    };
    pod_guard.armed = false;
    drop(pod_guard);
    let total = total.as_secs_f64() * 1000.0;
    let r = PodRecord {
        instance: instance.to_string(),
        namespace: pns,
        name: pname,
        container_id: pod_ref.container_id,
        netns,
        ifname: pod_ref.ifname,
        network: rt.conf.name.clone(),
        cni_version: rt.conf.cni_version.clone(),
        result,
        add_ms: total,
        capability_args: caps,
    };
    write_record(&r)?;
    if kube::available()
        && let Err(e) = kube::pod_running(&r.namespace, &r.name, instance, &r.ips())
    {
        tracing::warn!("marking the Pod {pod} running in the lab's Kubernetes API: {e:#}");
    }
    match print {
        Print::Pretty => println!("{}", serde_json::to_string_pretty(&r.result)?),
        Print::Compact => println!("{}", serde_json::to_string(&r.result)?),
        Print::Quiet => return Ok(r),
    }
    eprintln!("ADD {pod} on {instance}: {total:.1} ms, {:?}", r.ips());
    Ok(r)
}

/// While armed, deletes the `Pod` an ADD wrote when it is dropped (the ADD failed or returned
/// early: the runtime forgets the pod).
struct PodGuard<'a> {
    armed: bool,
    instance: &'a str,
    namespace: &'a str,
    name: &'a str,
}

impl Drop for PodGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            forget_pod(self.instance, self.namespace, self.name);
        }
    }
}

/// Deletes the pod's `Pod` from the lab's Kubernetes API (if it is on `instance`); a failure is
/// logged, not returned (the runtime's side is done).
fn forget_pod(instance: &str, namespace: &str, name: &str) {
    if !kube::available() {
        return;
    }
    if let Err(e) = kube::pod_deleted(namespace, name, instance) {
        tracing::warn!("deleting the Pod {namespace}/{name} from the lab's Kubernetes API: {e:#}");
    }
}

fn load_record(instance: &str, pod: &str) -> Result<PodRecord> {
    let (pns, pname) = parse_pod(pod)?;
    let p = record_path(instance, &pns, &pname);
    let b = std::fs::read(&p).with_context(|| {
        format!(
            "no pod {pod} on {instance} (no record {}); see `vpc-lab status`",
            p.display()
        )
    })?;
    serde_json::from_slice(&b).with_context(|| format!("parsing {}", p.display()))
}

/// `vpc-lab pod del`: prints each failed plugin call and (unless `print` is `Quiet`) the time.
pub fn del(instance: &str, pod: &str, print: Print) -> Result<()> {
    check_instance(instance)?;
    let r = load_record(instance, pod)?;
    let rt = runtime(instance)?;
    // Like libcni: the cached ADD result is the prevResult of DEL from CNI 0.4.0 on.
    let (failed, total) = rt.del_with(&r.pod_ref(), Some(&r.result), &r.capability_args)?;
    failed.iter().for_each(echo);
    let total = total.as_secs_f64() * 1000.0;
    if let Some(first) = failed.first() {
        let errors: Vec<String> = failed.iter().map(|o| o.stdout.trim().to_string()).collect();
        return Err(CniFailure {
            code: u32::try_from(first.error_code()).unwrap_or(0),
            what: format!(
                "CNI DEL of {pod} on {instance} (pod namespace and record kept; retry `vpc-lab pod del`)"
            ),
            output: errors.join("; "),
            signal: std::os::unix::process::ExitStatusExt::signal(&first.status),
        }
        .into());
    }
    ns::del(&r.ns_name())?;
    std::fs::remove_file(record_path(instance, &r.namespace, &r.name))?;
    forget_pod(instance, &r.namespace, &r.name);
    if print != Print::Quiet {
        eprintln!("DEL {pod} on {instance}: {total:.1} ms");
    }
    Ok(())
}

/// `vpc-lab pod check`.
pub fn check(instance: &str, pod: &str) -> Result<()> {
    check_instance(instance)?;
    let r = load_record(instance, pod)?;
    let rt = runtime(instance)?;
    if !rt.conf.version_at_least("0.4.0") {
        bail!(
            "{}: cniVersion {} does not support CHECK (0.4.0 or later does)",
            rt.conf.origin,
            rt.conf.cni_version
        );
    }
    if rt.conf.disable_check {
        println!("{}: disableCheck is set; CHECK skipped", rt.conf.origin);
        return Ok(());
    }
    if let Some(failed) = rt.check_with(&r.pod_ref(), &r.result, &r.capability_args)? {
        echo(&failed);
        bail!(
            "CNI CHECK of {pod} on {instance} failed: {}",
            failed.stdout.trim()
        );
    }
    println!("CHECK {pod} on {instance}: ok");
    Ok(())
}

/// Resolves an exec target to a namespace name.
pub fn exec_target(target: &str) -> Result<String> {
    match target {
        "internet" => return Ok(ns::INTERNET.to_string()),
        "fabric" => return Ok(ns::FABRIC.to_string()),
        t if t.starts_with(ns::PREFIX) && ns::exists(t) => return Ok(t.to_string()),
        _ => {}
    }
    if target.contains('/') {
        return Ok(find(target)?.ns_name());
    }
    let n = ns::instance_ns(target);
    if ns::exists(&n) {
        return Ok(n);
    }
    bail!(
        "unknown exec target {target:?}: use an instance (instance1, instance2, vpc-host), internet, fabric, a pod <ns>/<name> or <instance>:<ns>/<name>, or a vpclab-* namespace"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names() {
        assert_eq!(
            parse_pod("default/pod-a").unwrap(),
            ("default".into(), "pod-a".into())
        );
        assert!(parse_pod("nopod").is_err());
        assert!(parse_pod("Default/x").is_err());
        assert!(parse_pod("a/").is_err());
    }

    #[test]
    fn ips_from_result() {
        let r = PodRecord {
            instance: "instance1".into(),
            namespace: "default".into(),
            name: "a".into(),
            container_id: "x".into(),
            netns: "/run/netns/x".into(),
            ifname: "eth0".into(),
            network: "vpc-cni".into(),
            cni_version: "1.0.0".into(),
            result: serde_json::json!({"cniVersion":"1.0.0","ips":[{"address":"172.31.13.130/32"}]}),
            add_ms: 1.0,
            capability_args: CapabilityArgs::new(),
        };
        assert_eq!(r.ips(), vec![Ipv4Addr::new(172, 31, 13, 130)]);
        // A record without capability arguments reads as before (and older records still read).
        let v = serde_json::to_value(&r).unwrap();
        assert!(v.get("capability_args").is_none());
        let back: PodRecord = serde_json::from_value(v).unwrap();
        assert!(back.capability_args.is_empty());
    }

    #[test]
    fn port_mappings_parse_and_become_capability_args() {
        let m: PortMapping = "8080:80".parse().unwrap();
        assert_eq!(
            m,
            PortMapping {
                host_port: 8080,
                container_port: 80,
                udp: false
            }
        );
        let u: PortMapping = "53:5353/udp".parse().unwrap();
        assert!(u.udp);
        for bad in ["8080", "0:80", "8080:80/sctp", "a:b", "70000:80", ":80"] {
            assert!(bad.parse::<PortMapping>().is_err(), "{bad}");
        }
        assert!(capability_args(&[]).is_empty());
        assert_eq!(
            Value::Object(capability_args(&[m, u])),
            serde_json::json!({"portMappings": [
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                {"hostPort": 53, "containerPort": 5353, "protocol": "udp"},
            ]})
        );
    }
}
