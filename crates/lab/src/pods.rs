//! `vpc-lab pod add|del|check`: a container runtime's side of CNI, run against an instance.
//!
//! Like containerd/libcni: the pod namespace is created from the root mount namespace; the
//! network config is the first config file (lexicographically) of the instance's conf dir;
//! every plugin of the list is exec'd from `CNI_PATH` with the `CNI_*` variables and its config
//! (plugin object + `cniVersion` + `name`, `prevResult` chained on ADD and the stored ADD result
//! on DEL/CHECK) on stdin; the plugin runs inside the instance's network namespace, so its
//! host side lands there.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::ctl;
use crate::ns;

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
    ctl::inst_dir(instance)
        .join("pods")
        .join(format!("{ns}_{name}.json"))
}

/// Every pod record of every instance.
pub fn all_records() -> Result<Vec<PodRecord>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(ctl::run_dir()) else {
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

/// The network configuration list a runtime would load from the instance's conf dir.
#[derive(Debug)]
struct NetConf {
    name: String,
    cni_version: String,
    plugins: Vec<Map<String, Value>>,
    disable_check: bool,
    file: PathBuf,
}

fn load_netconf(instance: &str) -> Result<NetConf> {
    let dir = ctl::conf_dir(instance);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading CNI conf dir {} — is the lab up?", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .collect();
    files.sort();
    let Some(file) = files.into_iter().next() else {
        bail!(
            "no CNI network config in {}: is the agent of {instance} running and ready? \
             (see {}/agent.log; `vpc-lab agent start {instance}`)",
            dir.display(),
            ctl::inst_dir(instance).display()
        );
    };
    let v: Value = serde_json::from_slice(&std::fs::read(&file)?)
        .with_context(|| format!("parsing {}", file.display()))?;
    let get = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let name = get("name").with_context(|| format!("{}: no \"name\"", file.display()))?;
    let cni_version = get("cniVersion").unwrap_or_else(|| "0.2.0".to_string());
    let plugins = match v.get("plugins") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|p| {
                p.as_object()
                    .cloned()
                    .with_context(|| format!("{}: a plugin is not an object", file.display()))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(_) => bail!("{}: \"plugins\" is not a list", file.display()),
        None => vec![v.as_object().cloned().context("config is not an object")?],
    };
    if plugins.is_empty() {
        bail!("{}: \"plugins\" is empty", file.display());
    }
    Ok(NetConf {
        name,
        cni_version,
        plugins,
        disable_check: v.get("disableCheck").and_then(|x| x.as_bool()) == Some(true),
        file,
    })
}

/// One plugin invocation's outcome.
struct Call {
    ok: bool,
    stdout: String,
    ms: f64,
}

#[allow(clippy::too_many_arguments)]
fn call_plugin(
    instance: &str,
    conf: &NetConf,
    plugin: &Map<String, Value>,
    command: &str,
    container_id: &str,
    netns: &str,
    pod: (&str, &str),
    prev: Option<&Value>,
) -> Result<Call> {
    let ty = plugin
        .get("type")
        .and_then(|t| t.as_str())
        .with_context(|| format!("{}: a plugin has no \"type\"", conf.file.display()))?;
    let bin_dir = ctl::bin_dir(instance);
    let bin = bin_dir.join(ty);
    if !bin.is_file() {
        bail!(
            "plugin {ty:?} not found in {} (CNI_PATH): has the agent of {instance} installed it?",
            bin_dir.display()
        );
    }
    let mut cfg = plugin.clone();
    cfg.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    cfg.insert("name".into(), Value::String(conf.name.clone()));
    if let Some(p) = prev {
        cfg.insert("prevResult".into(), p.clone());
    }
    let stdin = serde_json::to_string(&cfg)?;
    let mut cmd = ns::command(
        &ns::instance_ns(instance),
        bin.to_str().context("plugin path is not UTF-8")?,
    )?;
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &bin_dir)
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={container_id}",
                pod.0, pod.1
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let t = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("executing plugin {}", bin.display()))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "{ty} {command}: {ms:.1} ms (exit {})",
        out.status.code().unwrap_or(-1)
    );
    Ok(Call {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        ms,
    })
}

/// Whether CNI version `v` is at least `min` (both `a.b.c`).
fn version_at_least(v: &str, min: &str) -> bool {
    let parse = |s: &str| -> Vec<u32> { s.split('.').map(|x| x.parse().unwrap_or(0)).collect() };
    parse(v) >= parse(min)
}

fn random_id() -> Result<String> {
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

/// A CNI call that the plugin answered with an error; `vpc-lab` exits with its code.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed (CNI error code {code}): {output}")]
pub struct CniFailure {
    pub code: u32,
    pub what: String,
    pub output: String,
}

/// `vpc-lab pod add`. Prints the result (pretty, or on one line when `compact`); fails (after
/// cleaning up) when the plugin fails.
pub fn add(instance: &str, pod: &str, compact: bool) -> Result<PodRecord> {
    check_instance(instance)?;
    let (pns, pname) = parse_pod(pod)?;
    let rec = record_path(instance, &pns, &pname);
    if rec.exists() {
        bail!(
            "pod {pod} already exists on {instance} ({}); `vpc-lab pod del {instance} {pod}` first",
            rec.display()
        );
    }
    let conf = load_netconf(instance)?;
    let netns_name = ns::pod_ns(instance, &pns, &pname);
    ns::add(&netns_name)?;
    let netns = ns::path(&netns_name).display().to_string();
    let cid = random_id()?;
    let mut prev: Option<Value> = None;
    let mut total = 0.0;
    for plugin in &conf.plugins {
        let c = call_plugin(
            instance,
            &conf,
            plugin,
            "ADD",
            &cid,
            &netns,
            (&pns, &pname),
            prev.as_ref(),
        )?;
        total += c.ms;
        if !c.ok {
            // Like a runtime: tear down what may have been set up (retrying a failed DEL for
            // up to 10 s, as kubelet retries a sandbox teardown), then forget the pod.
            for p in conf.plugins.iter().rev() {
                let t = Instant::now();
                loop {
                    match call_plugin(
                        instance,
                        &conf,
                        p,
                        "DEL",
                        &cid,
                        &netns,
                        (&pns, &pname),
                        None,
                    ) {
                        Ok(d) if d.ok => break,
                        Ok(d) => eprintln!(
                            "clean-up DEL after the failed ADD also failed: {}",
                            d.stdout.trim()
                        ),
                        Err(e) => eprintln!("clean-up DEL after the failed ADD: {e:#}"),
                    }
                    if t.elapsed() > Duration::from_secs(10) {
                        eprintln!("giving up the clean-up DEL of {pod} after 10 s");
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
            let _ = ns::del(&netns_name);
            let code = serde_json::from_str::<Value>(&c.stdout)
                .ok()
                .and_then(|v| v["code"].as_u64())
                .unwrap_or(0) as u32;
            return Err(CniFailure {
                code,
                what: format!("CNI ADD of {pod} on {instance}"),
                output: c.stdout.trim().to_string(),
            }
            .into());
        }
        let v: Value = serde_json::from_str(&c.stdout)
            .with_context(|| format!("the plugin's ADD result is not JSON: {:?}", c.stdout))?;
        prev = Some(v);
    }
    let r = PodRecord {
        instance: instance.to_string(),
        namespace: pns,
        name: pname,
        container_id: cid,
        netns,
        ifname: "eth0".into(),
        network: conf.name.clone(),
        cni_version: conf.cni_version.clone(),
        result: prev.unwrap_or(Value::Null),
        add_ms: total,
    };
    write_record(&r)?;
    if compact {
        println!("{}", serde_json::to_string(&r.result)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&r.result)?);
    }
    eprintln!("ADD {pod} on {instance}: {total:.1} ms, {:?}", r.ips());
    Ok(r)
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

/// `vpc-lab pod del`.
pub fn del(instance: &str, pod: &str) -> Result<()> {
    check_instance(instance)?;
    let r = load_record(instance, pod)?;
    let conf = load_netconf(instance)?;
    let mut errors = Vec::new();
    let mut total = 0.0;
    // Like libcni: the cached ADD result is the prevResult of DEL from CNI 0.4.0 on.
    let prev = version_at_least(&conf.cni_version, "0.4.0").then_some(&r.result);
    for plugin in conf.plugins.iter().rev() {
        let c = call_plugin(
            instance,
            &conf,
            plugin,
            "DEL",
            &r.container_id,
            &r.netns,
            (&r.namespace, &r.name),
            prev,
        )?;
        total += c.ms;
        if !c.ok {
            errors.push(c.stdout.trim().to_string());
        }
    }
    if !errors.is_empty() {
        bail!(
            "CNI DEL of {pod} on {instance} failed (pod namespace and record kept; retry `vpc-lab pod del`): {}",
            errors.join("; ")
        );
    }
    ns::del(&r.ns_name())?;
    std::fs::remove_file(record_path(instance, &r.namespace, &r.name))?;
    eprintln!("DEL {pod} on {instance}: {total:.1} ms");
    Ok(())
}

/// `vpc-lab pod check`.
pub fn check(instance: &str, pod: &str) -> Result<()> {
    check_instance(instance)?;
    let r = load_record(instance, pod)?;
    let conf = load_netconf(instance)?;
    if !version_at_least(&conf.cni_version, "0.4.0") {
        bail!(
            "{}: cniVersion {} does not support CHECK (0.4.0 or later does)",
            conf.file.display(),
            conf.cni_version
        );
    }
    if conf.disable_check {
        println!(
            "{}: disableCheck is set; CHECK skipped",
            conf.file.display()
        );
        return Ok(());
    }
    for plugin in &conf.plugins {
        let c = call_plugin(
            instance,
            &conf,
            plugin,
            "CHECK",
            &r.container_id,
            &r.netns,
            (&r.namespace, &r.name),
            Some(&r.result),
        )?;
        if !c.ok {
            bail!(
                "CNI CHECK of {pod} on {instance} failed: {}",
                c.stdout.trim()
            );
        }
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
    fn versions() {
        assert!(version_at_least("1.0.0", "0.4.0"));
        assert!(version_at_least("0.4.0", "0.4.0"));
        assert!(!version_at_least("0.3.1", "0.4.0"));
        assert!(version_at_least("1.1.0", "1.0.0"));
    }

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
        };
        assert_eq!(r.ips(), vec![Ipv4Addr::new(172, 31, 13, 130)]);
    }
}
