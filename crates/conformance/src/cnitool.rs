//! `cnitool add|check|del <net> <netns>` (libcni's own command-line runtime, built by
//! `scripts/setup-clients.sh` from Debian's source package) run inside a given network
//! namespace, with `NETCONFPATH`, `CNI_PATH`, `CNI_IFNAME` and `CNI_ARGS`.
//!
//! cnitool names the attachment `cnitool-<hex of the first 10 bytes of SHA-512(netns path)>`
//! and libcni caches the ADD result in `/var/lib/cni/results/<net>-<id>-<ifname>`; DEL reads it
//! back as prevResult and removes it. [`cache_file`] names that file so callers can check and
//! clean it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use sha2::{Digest, Sha512};
use testkit::stats::ms;

use crate::util::CNI_RESULTS_DIR;

/// The three verbs cnitool has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    Add,
    Check,
    Del,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Add => "add",
            Verb::Check => "check",
            Verb::Del => "del",
        }
    }
}

/// One cnitool invocation.
#[derive(Debug, Clone)]
pub struct Run {
    pub cnitool: PathBuf,
    /// The namespace cnitool (and so the plugins) runs in: the node.
    pub node_netns: PathBuf,
    /// The network name (`name` of a conflist in `conf_dir`).
    pub net: String,
    /// The pod's network namespace path handed to the plugins as CNI_NETNS.
    pub pod_netns: PathBuf,
    /// NETCONFPATH.
    pub conf_dir: PathBuf,
    /// CNI_PATH (one directory or a `:` list).
    pub cni_path: String,
    pub ifname: String,
    /// CNI_ARGS passed through (`K=V;K=V`), e.g. `K8S_POD_NAMESPACE=default;K8S_POD_NAME=p`.
    pub cni_args: Option<String>,
}

/// What one invocation did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub verb: Verb,
    pub net: String,
    pub container_id: String,
    pub ifname: String,
    pub exit_code: i32,
    pub elapsed_ms: f64,
    /// ADD: the result JSON cnitool printed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// ADD: the addresses in the result (`ips[].address`).
    pub ips: Vec<String>,
    /// The libcni cache file of this attachment, and whether it exists afterwards.
    pub cache_file: PathBuf,
    pub cache_file_exists: bool,
    pub stderr: String,
}

/// cnitool's container id for a netns path (it hashes the absolute path).
pub fn container_id(netns: &Path) -> String {
    let digest = Sha512::digest(netns.as_os_str().as_encoded_bytes());
    let mut s = String::from("cnitool-");
    for b in &digest[..10] {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// libcni's result cache file for (net, container id, ifname).
pub fn cache_file(net: &str, container_id: &str, ifname: &str) -> PathBuf {
    Path::new(CNI_RESULTS_DIR).join(format!("{net}-{container_id}-{ifname}"))
}

/// The `ips[].address` values of a CNI result.
pub fn result_ips(result: &serde_json::Value) -> Vec<String> {
    result
        .get("ips")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|ip| ip.get("address")?.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

impl Run {
    /// Runs the verb; an error when cnitool exits non-zero (naming the verb, network, netns,
    /// exit code and what cnitool said) or prints something that is not a result.
    pub fn run(&self, verb: Verb, timeout: Duration) -> Result<Outcome> {
        if !self.cnitool.is_file() {
            bail!(
                "cnitool {} does not exist; run `bash scripts/setup-clients.sh` to build .cache/bin/cnitool",
                self.cnitool.display()
            );
        }
        if !self.conf_dir.is_dir() {
            bail!("--conf-dir {} is not a directory", self.conf_dir.display());
        }
        let pod = std::path::absolute(&self.pod_netns)
            .with_context(|| format!("bad pod netns path {}", self.pod_netns.display()))?;
        let ns = netns::NetNs::open(&self.node_netns)
            .map_err(|e| anyhow!("{e}; create it first (ip netns add NAME)"))?;
        let mut cmd = Command::new(&self.cnitool);
        cmd.arg(verb.as_str())
            .arg(&self.net)
            .arg(&pod)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("NETCONFPATH", &self.conf_dir)
            .env("CNI_PATH", &self.cni_path)
            .env("CNI_IFNAME", &self.ifname)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(a) = &self.cni_args {
            cmd.env("CNI_ARGS", a);
        }
        let t = Instant::now();
        let child = ns
            .run(move || cmd.spawn())
            .map_err(|e| anyhow!("{e}"))?
            .with_context(|| format!("cannot run {}", self.cnitool.display()))?;
        let out = wait_with_timeout(child, timeout).with_context(|| {
            format!(
                "cnitool {} {} {} did not finish within {timeout:?}",
                verb.as_str(),
                self.net,
                pod.display()
            )
        })?;
        let elapsed = t.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let code = out.status.code().unwrap_or(-1);
        if !out.status.success() {
            bail!(
                "cnitool {} {} {} (in {}) failed with exit code {code}: {}{}",
                verb.as_str(),
                self.net,
                pod.display(),
                self.node_netns.display(),
                if stderr.is_empty() {
                    "(no stderr)"
                } else {
                    &stderr
                },
                if stdout.is_empty() {
                    String::new()
                } else {
                    format!("; stdout: {stdout}")
                }
            );
        }
        let result = if verb == Verb::Add {
            let v: serde_json::Value = serde_json::from_str(&stdout).with_context(|| {
                format!("cnitool add printed something that is not a CNI result: {stdout:?}")
            })?;
            if v.get("cniVersion").is_none() {
                bail!("cnitool add printed JSON without cniVersion: {stdout}");
            }
            Some(v)
        } else {
            None
        };
        let id = container_id(&pod);
        let cf = cache_file(&self.net, &id, &self.ifname);
        Ok(Outcome {
            verb,
            net: self.net.clone(),
            ips: result.as_ref().map(result_ips).unwrap_or_default(),
            result,
            container_id: id,
            ifname: self.ifname.clone(),
            exit_code: code,
            elapsed_ms: ms(elapsed),
            cache_file_exists: cf.exists(),
            cache_file: cf,
            stderr,
        })
    }
}

fn wait_with_timeout(
    mut child: std::process::Child,
    timeout: Duration,
) -> Result<std::process::Output> {
    use std::io::Read;
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let ho = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = so.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let he = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = se.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("timed out after {timeout:?} (killed pid {})", child.id());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(std::process::Output {
        status,
        stdout: ho.join().unwrap_or_default(),
        stderr: he.join().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_id_matches_cnitool() {
        // cnitool: fmt.Sprintf("cnitool-%x", sha512.Sum512([]byte(netns))[:10])
        let id = container_id(Path::new("/var/run/netns/x"));
        assert!(id.starts_with("cnitool-"));
        assert_eq!(id.len(), "cnitool-".len() + 20);
        assert_ne!(id, container_id(Path::new("/var/run/netns/y")));
        assert_eq!(
            cache_file("n", &id, "eth0"),
            PathBuf::from(format!("/var/lib/cni/results/n-{id}-eth0"))
        );
    }

    #[test]
    fn ips_are_read_from_a_result() {
        let r: serde_json::Value = serde_json::from_str(
            r#"{"cniVersion":"1.0.0","ips":[{"address":"10.77.0.2/24","interface":1}]}"#,
        )
        .unwrap();
        assert_eq!(result_ips(&r), vec!["10.77.0.2/24".to_string()]);
    }
}
