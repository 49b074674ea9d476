//! A container runtime's side of CNI, as containerd and libcni do it: load the first network
//! configuration of a conf dir, exec each plugin of the list with the CNI environment and its
//! configuration (plus `prevResult`, and `runtimeConfig` for the capabilities it declares) on
//! stdin, chain ADD results, DEL in reverse order.
//!
//! The lab's `pod add|del|check` and the benchmarks drive plugins through this one harness;
//! the caller decides how a plugin is spawned (for example inside an instance's namespace).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum CniExecError {
    #[error("reading CNI configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no CNI network configuration (*.conflist, *.conf, *.json) in {0}")]
    NoConfig(PathBuf),
    #[error("{origin}: {why}")]
    BadConfig { origin: String, why: String },
    #[error("plugin {ty:?} not found in {dir} (CNI_PATH)")]
    PluginMissing { ty: String, dir: PathBuf },
    #[error("executing plugin {path}: {source}")]
    Exec {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{ty} {verb} printed a result that is not JSON: {stdout:?}")]
    BadResult {
        ty: String,
        verb: String,
        stdout: String,
    },
}

/// What a runtime passes for the capabilities a plugin may declare (libcni's `CapabilityArgs`),
/// by capability name: `{"portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol":
/// "tcp"}]}`, `{"bandwidth": {...}}`.
pub type CapabilityArgs = Map<String, Value>;

/// A network configuration list as a runtime loads it.
#[derive(Debug, Clone)]
pub struct ConfList {
    pub name: String,
    pub cni_version: String,
    pub plugins: Vec<Map<String, Value>>,
    pub disable_check: bool,
    /// Where it was read from (or what built it), for messages.
    pub origin: String,
}

impl ConfList {
    /// The list (or a single-plugin `.conf`) in `v`.
    pub fn from_value(v: &Value, origin: &str) -> Result<ConfList, CniExecError> {
        let bad = |why: &str| CniExecError::BadConfig {
            origin: origin.to_string(),
            why: why.to_string(),
        };
        let get = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let name = get("name").ok_or_else(|| bad("no \"name\""))?;
        let cni_version = get("cniVersion").unwrap_or_else(|| "0.2.0".to_string());
        let plugins = match v.get("plugins") {
            Some(Value::Array(a)) => a
                .iter()
                .map(|p| {
                    p.as_object()
                        .cloned()
                        .ok_or_else(|| bad("a plugin is not an object"))
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err(bad("\"plugins\" is not a list")),
            None => vec![v.as_object().cloned().ok_or_else(|| bad("not an object"))?],
        };
        if plugins.is_empty() {
            return Err(bad("\"plugins\" is empty"));
        }
        if plugins
            .iter()
            .any(|p| p.get("type").and_then(Value::as_str).is_none())
        {
            return Err(bad("a plugin has no \"type\""));
        }
        Ok(ConfList {
            name,
            cni_version,
            plugins,
            disable_check: v.get("disableCheck").and_then(Value::as_bool) == Some(true),
            origin: origin.to_string(),
        })
    }

    /// The file a runtime would use: the first `*.conflist`, `*.conf` or `*.json` of `dir` in
    /// lexical order.
    pub fn load_dir(dir: &Path) -> Result<ConfList, CniExecError> {
        let read = |source| CniExecError::Read {
            path: dir.to_path_buf(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
            })
            .collect();
        files.sort();
        let file = files
            .into_iter()
            .next()
            .ok_or_else(|| CniExecError::NoConfig(dir.to_path_buf()))?;
        ConfList::load_file(&file)
    }

    pub fn load_file(file: &Path) -> Result<ConfList, CniExecError> {
        let bytes = std::fs::read(file).map_err(|source| CniExecError::Read {
            path: file.to_path_buf(),
            source,
        })?;
        let origin = file.display().to_string();
        let v: Value = serde_json::from_slice(&bytes).map_err(|e| CniExecError::BadConfig {
            origin: origin.clone(),
            why: e.to_string(),
        })?;
        ConfList::from_value(&v, &origin)
    }

    /// Whether the list's version is at least `min` (`a.b.c`): CHECK and DEL's `prevResult`
    /// need 0.4.0.
    pub fn version_at_least(&self, min: &str) -> bool {
        let parse =
            |s: &str| -> Vec<u32> { s.split('.').map(|x| x.parse().unwrap_or(0)).collect() };
        parse(&self.cni_version) >= parse(min)
    }

    /// A cached ADD result in this list's `cniVersion`, as libcni converts the cached result
    /// before passing it as `prevResult` to DEL and CHECK (a pod added under an older network
    /// configuration keeps working with the current one).
    pub fn result_in_my_version(&self, result: &Value) -> Result<Value, CniExecError> {
        let bad = |why: String| CniExecError::BadConfig {
            origin: self.origin.clone(),
            why: format!(
                "converting the cached result to cniVersion {}: {why}",
                self.cni_version
            ),
        };
        let from = result
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or(&self.cni_version);
        if from == self.cni_version {
            return Ok(result.clone());
        }
        let parse = |v: &str| cni::Version::parse(v).map_err(|e| bad(e.to_string()));
        let (from, to) = (parse(from)?, parse(&self.cni_version)?);
        let r = cni::CniResult::from_json(result, from).map_err(|e| bad(e.to_string()))?;
        Ok(r.to_json(to))
    }

    /// The configuration a runtime passes on stdin to one plugin of the list.
    pub fn plugin_stdin(&self, plugin: &Map<String, Value>, prev: Option<&Value>) -> Vec<u8> {
        self.plugin_stdin_with(plugin, prev, &CapabilityArgs::new())
    }

    /// [`plugin_stdin`](Self::plugin_stdin) with the runtime's capability arguments: as libcni's
    /// `injectRuntimeConfig`, each argument whose key the plugin declares in `"capabilities"`
    /// (with `true`) goes into `runtimeConfig`, which replaces any `runtimeConfig` of the plugin
    /// object; nothing is added when the plugin declares none of them.
    pub fn plugin_stdin_with(
        &self,
        plugin: &Map<String, Value>,
        prev: Option<&Value>,
        caps: &CapabilityArgs,
    ) -> Vec<u8> {
        let mut cfg = plugin.clone();
        cfg.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        cfg.insert("name".into(), Value::String(self.name.clone()));
        if let Some(p) = prev {
            cfg.insert("prevResult".into(), p.clone());
        }
        let declared = plugin.get("capabilities").and_then(Value::as_object);
        let runtime_config: Map<String, Value> = caps
            .iter()
            .filter(|(k, _)| {
                declared.is_some_and(|d| d.get(k.as_str()).and_then(Value::as_bool) == Some(true))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !runtime_config.is_empty() {
            cfg.insert("runtimeConfig".into(), Value::Object(runtime_config));
        }
        serde_json::to_vec(&cfg).expect("a JSON map serializes")
    }
}

/// The pod side of a call: what goes into `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME` and
/// `CNI_ARGS`.
#[derive(Debug, Clone)]
pub struct PodRef {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub k8s_namespace: String,
    pub k8s_name: String,
}

impl PodRef {
    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            self.k8s_namespace, self.k8s_name, self.container_id
        )
    }
}

/// One plugin execution.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub ty: String,
    pub verb: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.status.success()
    }

    /// The `code` of the CNI error on stdout (0 when there is none to read).
    pub fn error_code(&self) -> u64 {
        serde_json::from_str::<Value>(&self.stdout)
            .ok()
            .and_then(|v| v["code"].as_u64())
            .unwrap_or(0)
    }

    /// `ty VERB: stdout stderr`, for messages.
    pub fn describe(&self) -> String {
        format!(
            "{} {}: {} {}",
            self.ty,
            self.verb,
            self.stdout.trim(),
            self.stderr.trim()
        )
    }
}

/// Builds the command that runs a plugin binary (for example inside a namespace).
pub type Spawn = Box<dyn Fn(&Path) -> std::io::Result<Command> + Send + Sync>;

/// How plugins are found and spawned.
pub struct Runtime {
    pub conf: ConfList,
    /// Where the plugin binaries are (the first `CNI_PATH` entry).
    pub bin_dir: PathBuf,
    /// `CNI_PATH` as passed to the plugins.
    pub cni_path: String,
    pub spawn: Spawn,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("conf", &self.conf.origin)
            .field("bin_dir", &self.bin_dir)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Plugins run as children of this process, in its namespaces.
    pub fn local(conf: ConfList, bin_dir: PathBuf) -> Runtime {
        Runtime {
            cni_path: bin_dir.display().to_string(),
            conf,
            bin_dir,
            spawn: Box::new(|p| Ok(Command::new(p))),
        }
    }

    /// Executes one plugin of the list.
    pub fn call(
        &self,
        plugin: &Map<String, Value>,
        verb: &str,
        pod: &PodRef,
        prev: Option<&Value>,
    ) -> Result<Outcome, CniExecError> {
        self.call_with(plugin, verb, pod, prev, &CapabilityArgs::new())
    }

    /// [`call`](Self::call) with the runtime's capability arguments (see
    /// [`ConfList::plugin_stdin_with`]).
    pub fn call_with(
        &self,
        plugin: &Map<String, Value>,
        verb: &str,
        pod: &PodRef,
        prev: Option<&Value>,
        caps: &CapabilityArgs,
    ) -> Result<Outcome, CniExecError> {
        self.call_until(plugin, verb, pod, prev, caps, None)
    }

    /// [`call_with`](Self::call_with), killing the plugin (SIGKILL) if it is still running at
    /// `deadline`, as a runtime whose request timed out does. A killed plugin's outcome has
    /// the signal in its status.
    fn call_until(
        &self,
        plugin: &Map<String, Value>,
        verb: &str,
        pod: &PodRef,
        prev: Option<&Value>,
        caps: &CapabilityArgs,
        deadline: Option<Instant>,
    ) -> Result<Outcome, CniExecError> {
        let ty = plugin
            .get("type")
            .and_then(Value::as_str)
            .expect("ConfList checks every plugin's type")
            .to_string();
        let bin = self.bin_dir.join(&ty);
        if !bin.is_file() {
            return Err(CniExecError::PluginMissing {
                ty,
                dir: self.bin_dir.clone(),
            });
        }
        let exec = |source| CniExecError::Exec {
            path: bin.clone(),
            source,
        };
        let mut cmd = (self.spawn)(&bin).map_err(exec)?;
        cmd.env("CNI_COMMAND", verb)
            .env("CNI_CONTAINERID", &pod.container_id)
            .env("CNI_NETNS", &pod.netns)
            .env("CNI_IFNAME", &pod.ifname)
            .env("CNI_PATH", &self.cni_path)
            .env("CNI_ARGS", pod.cni_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let stdin = self.conf.plugin_stdin_with(plugin, prev, caps);
        let t = Instant::now();
        let mut child = cmd.spawn().map_err(exec)?;
        // A plugin that exits without reading its stdin closes the pipe: that is its answer.
        let _ = child.stdin.take().expect("piped").write_all(&stdin);
        let out = match deadline {
            None => child.wait_with_output().map_err(exec)?,
            Some(deadline) => {
                let read = |mut r: Box<dyn std::io::Read + Send>| {
                    std::thread::spawn(move || {
                        let mut b = Vec::new();
                        let _ = r.read_to_end(&mut b);
                        b
                    })
                };
                let stdout = read(Box::new(child.stdout.take().expect("piped")));
                let stderr = read(Box::new(child.stderr.take().expect("piped")));
                let status = loop {
                    if let Some(s) = child.try_wait().map_err(exec)? {
                        break s;
                    }
                    if Instant::now() >= deadline {
                        // Not reaped yet, so the pid is still this child's.
                        let _ = child.kill();
                        break child.wait().map_err(exec)?;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                };
                std::process::Output {
                    status,
                    stdout: stdout.join().unwrap_or_default(),
                    stderr: stderr.join().unwrap_or_default(),
                }
            }
        };
        Ok(Outcome {
            ty,
            verb: verb.to_string(),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            elapsed: t.elapsed(),
        })
    }

    /// ADD through the whole list, each plugin getting the previous one's result. Returns the
    /// last result and the total time, or the failed call (the caller tears down, as a runtime
    /// decides how hard to retry).
    pub fn add(&self, pod: &PodRef) -> Result<Result<(Value, Duration), Outcome>, CniExecError> {
        self.add_with(pod, &CapabilityArgs::new())
    }

    /// [`add`](Self::add) with the runtime's capability arguments (for example a pod's
    /// `portMappings`), passed as `runtimeConfig` to the plugins that declare them.
    pub fn add_with(
        &self,
        pod: &PodRef,
        caps: &CapabilityArgs,
    ) -> Result<Result<(Value, Duration), Outcome>, CniExecError> {
        self.add_until(pod, caps, None)
    }

    /// [`add_with`](Self::add_with) that kills the running plugin at `deadline`, as a runtime
    /// does when its sandbox request times out (the caller then tears down with DEL, as
    /// kubelet does). The killed plugin's outcome is the failed call.
    pub fn add_until(
        &self,
        pod: &PodRef,
        caps: &CapabilityArgs,
        deadline: Option<Instant>,
    ) -> Result<Result<(Value, Duration), Outcome>, CniExecError> {
        let mut prev: Option<Value> = None;
        let mut total = Duration::ZERO;
        for plugin in &self.conf.plugins {
            let o = self.call_until(plugin, "ADD", pod, prev.as_ref(), caps, deadline)?;
            total += o.elapsed;
            if !o.ok() {
                return Ok(Err(o));
            }
            prev = Some(
                serde_json::from_str(&o.stdout).map_err(|_| CniExecError::BadResult {
                    ty: o.ty.clone(),
                    verb: o.verb.clone(),
                    stdout: o.stdout.clone(),
                })?,
            );
        }
        Ok(Ok((prev.unwrap_or(Value::Null), total)))
    }

    /// DEL through the list in reverse order; `result` (the cached ADD result) is passed as
    /// `prevResult` from CNI 0.4.0 on, as libcni does. Every plugin is called whatever the
    /// others answer; returns the failed calls and the total time.
    pub fn del(
        &self,
        pod: &PodRef,
        result: Option<&Value>,
    ) -> Result<(Vec<Outcome>, Duration), CniExecError> {
        self.del_with(pod, result, &CapabilityArgs::new())
    }

    /// [`del`](Self::del) with the capability arguments of the ADD (libcni passes
    /// `runtimeConfig` on DEL too: portmap needs it to find the rules to remove).
    pub fn del_with(
        &self,
        pod: &PodRef,
        result: Option<&Value>,
        caps: &CapabilityArgs,
    ) -> Result<(Vec<Outcome>, Duration), CniExecError> {
        let prev = match result.filter(|_| self.conf.version_at_least("0.4.0")) {
            Some(r) => Some(self.conf.result_in_my_version(r)?),
            None => None,
        };
        let prev = prev.as_ref();
        let mut failed = Vec::new();
        let mut total = Duration::ZERO;
        for plugin in self.conf.plugins.iter().rev() {
            let o = self.call_with(plugin, "DEL", pod, prev, caps)?;
            total += o.elapsed;
            if !o.ok() {
                failed.push(o);
            }
        }
        Ok((failed, total))
    }

    /// CHECK through the list with the cached ADD result; the first failed call, if any.
    pub fn check(&self, pod: &PodRef, result: &Value) -> Result<Option<Outcome>, CniExecError> {
        self.check_with(pod, result, &CapabilityArgs::new())
    }

    /// [`check`](Self::check) with the capability arguments of the ADD.
    pub fn check_with(
        &self,
        pod: &PodRef,
        result: &Value,
        caps: &CapabilityArgs,
    ) -> Result<Option<Outcome>, CniExecError> {
        let result = self.conf.result_in_my_version(result)?;
        for plugin in &self.conf.plugins {
            let o = self.call_with(plugin, "CHECK", pod, Some(&result), caps)?;
            if !o.ok() {
                return Ok(Some(o));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_conflist_and_a_single_conf_load() {
        let l = ConfList::from_value(
            &json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "a"}, {"type": "b"}]}),
            "t",
        )
        .unwrap();
        assert_eq!((l.name.as_str(), l.plugins.len()), ("n", 2));
        assert!(l.version_at_least("0.4.0"));
        let c = ConfList::from_value(&json!({"name": "n", "type": "a"}), "t").unwrap();
        assert_eq!((c.cni_version.as_str(), c.plugins.len()), ("0.2.0", 1));
        assert!(!c.version_at_least("0.4.0"));
    }

    #[test]
    fn versions_compare_numerically() {
        let at = |v: &str, min: &str| {
            ConfList::from_value(&json!({"cniVersion": v, "name": "n", "type": "a"}), "t")
                .unwrap()
                .version_at_least(min)
        };
        assert!(at("1.0.0", "0.4.0"));
        assert!(at("0.4.0", "0.4.0"));
        assert!(!at("0.3.1", "0.4.0"));
        assert!(at("1.1.0", "1.0.0"));
        assert!(at("0.10.0", "0.4.0"));
    }

    #[test]
    fn a_cached_result_is_converted_to_the_lists_version() {
        let l = ConfList::from_value(
            &json!({"cniVersion": "1.0.0", "name": "n", "type": "a"}),
            "t",
        )
        .unwrap();
        let old = json!({"cniVersion": "0.4.0", "interfaces": [{"name": "eth0", "sandbox": "/x"}],
            "ips": [{"version": "4", "address": "10.0.0.2/32", "interface": 0}]});
        let v = l.result_in_my_version(&old).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert!(v["ips"][0].get("version").is_none(), "{v}");
        assert_eq!(v["ips"][0]["address"], "10.0.0.2/32");
        let same = json!({"cniVersion": "1.0.0", "ips": []});
        assert_eq!(l.result_in_my_version(&same).unwrap(), same);
    }

    #[test]
    fn bad_lists_are_refused_with_the_reason() {
        for (v, why) in [
            (json!({"plugins": []}), "no \"name\""),
            (json!({"name": "n", "plugins": []}), "empty"),
            (json!({"name": "n", "plugins": {}}), "not a list"),
            (json!({"name": "n", "plugins": [{}]}), "no \"type\""),
        ] {
            let e = ConfList::from_value(&v, "f.conflist")
                .unwrap_err()
                .to_string();
            assert!(e.contains(why) && e.contains("f.conflist"), "{e}");
        }
    }

    #[test]
    fn stdin_carries_name_version_and_prev_result() {
        let l = ConfList::from_value(
            &json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "a", "x": 1}]}),
            "t",
        )
        .unwrap();
        let s: Value =
            serde_json::from_slice(&l.plugin_stdin(&l.plugins[0], Some(&json!({"ips": []}))))
                .unwrap();
        assert_eq!(
            s,
            json!({"type": "a", "x": 1, "cniVersion": "1.0.0", "name": "n", "prevResult": {"ips": []}})
        );
    }

    #[test]
    fn runtime_config_goes_only_to_plugins_declaring_the_capability() {
        let l = ConfList::from_value(
            &json!({"cniVersion": "1.0.0", "name": "n", "plugins": [
                {"type": "main"},
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
                {"type": "bandwidth", "capabilities": {"bandwidth": true},
                 "runtimeConfig": {"stale": 1}},
                {"type": "off", "capabilities": {"portMappings": false}},
            ]}),
            "t",
        )
        .unwrap();
        let pm = json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]);
        let caps: CapabilityArgs = [("portMappings".to_string(), pm.clone())]
            .into_iter()
            .collect();
        let stdin = |i: usize, caps: &CapabilityArgs| -> Value {
            serde_json::from_slice(&l.plugin_stdin_with(&l.plugins[i], None, caps)).unwrap()
        };
        assert!(stdin(0, &caps).get("runtimeConfig").is_none());
        assert_eq!(
            stdin(1, &caps)["runtimeConfig"],
            json!({"portMappings": pm})
        );
        assert_eq!(stdin(1, &caps)["snat"], true);
        // Nothing declared is passed: the plugin's own runtimeConfig stays as it is.
        assert_eq!(stdin(2, &caps)["runtimeConfig"], json!({"stale": 1}));
        assert!(stdin(3, &caps).get("runtimeConfig").is_none());
        // Without capability arguments nothing is injected (as plugin_stdin).
        assert!(
            stdin(1, &CapabilityArgs::new())
                .get("runtimeConfig")
                .is_none()
        );
        let both: CapabilityArgs = [
            ("portMappings".to_string(), pm.clone()),
            ("bandwidth".to_string(), json!({"ingressRate": 1000})),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            stdin(2, &both)["runtimeConfig"],
            json!({"bandwidth": {"ingressRate": 1000}}),
            "a declared capability replaces the plugin's runtimeConfig, as libcni's InjectConf"
        );
    }

    #[test]
    fn a_plugin_runs_with_the_cni_environment() {
        let dir = std::env::temp_dir().join(format!("testkit-cni-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plugin = dir.join("echoenv");
        std::fs::write(
            &plugin,
            "#!/bin/sh\ncat >/dev/null\nprintf '{\"cniVersion\":\"1.0.0\",\"cmd\":\"%s\",\"args\":\"%s\"}' \"$CNI_COMMAND\" \"$CNI_ARGS\"\n[ \"$CNI_COMMAND\" != DEL ]\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let conf = ConfList::from_value(
            &json!({"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "echoenv"}]}),
            "t",
        )
        .unwrap();
        let rt = Runtime::local(conf, dir.clone());
        let pod = PodRef {
            container_id: "c1".into(),
            netns: "/proc/self/ns/net".into(),
            ifname: "eth0".into(),
            k8s_namespace: "ns".into(),
            k8s_name: "p".into(),
        };
        let (v, _) = rt.add(&pod).unwrap().unwrap();
        assert_eq!(v["cmd"], "ADD");
        assert!(v["args"].as_str().unwrap().contains("K8S_POD_NAME=p"));
        let (failed, _) = rt.del(&pod, Some(&v)).unwrap();
        assert_eq!(failed.len(), 1, "the fake plugin fails DEL");
        // Capability arguments reach a declaring plugin on ADD and DEL (as libcni passes them).
        let tee = dir.join("tee");
        std::fs::write(&tee, "#!/bin/sh\ntee \"$0.$CNI_COMMAND\"\n").unwrap();
        std::fs::set_permissions(&tee, std::fs::Permissions::from_mode(0o755)).unwrap();
        let conf = ConfList::from_value(
            &json!({"cniVersion": "1.0.0", "name": "n",
                    "plugins": [{"type": "tee", "capabilities": {"portMappings": true}}]}),
            "t",
        )
        .unwrap();
        let caps: CapabilityArgs = [("portMappings".to_string(), json!([{"hostPort": 1}]))]
            .into_iter()
            .collect();
        let rt = Runtime::local(conf, dir.clone());
        let (v, _) = rt.add_with(&pod, &caps).unwrap().unwrap();
        assert_eq!(v["runtimeConfig"]["portMappings"][0]["hostPort"], 1);
        let (failed, _) = rt.del_with(&pod, Some(&v), &caps).unwrap();
        assert!(failed.is_empty());
        let del: Value =
            serde_json::from_slice(&std::fs::read(dir.join("tee.DEL")).unwrap()).unwrap();
        assert_eq!(del["runtimeConfig"]["portMappings"][0]["hostPort"], 1);
        assert!(del["prevResult"].is_object());
        let missing = ConfList::from_value(&json!({"name": "n", "type": "nope"}), "t").unwrap();
        let e = Runtime::local(missing, dir.clone()).add(&pod).unwrap_err();
        assert!(matches!(e, CniExecError::PluginMissing { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
