//! Readiness: install the plugin binary and the plugins chained after it, and write the CNI
//! network configuration. The agent installs the binaries at start and `vpc-cni-agent init`
//! (the DaemonSet's init container) before it, both with [`install_binaries`].
//!
//! Writing the conflist is what tells the container runtime that the node's network is ready,
//! so it happens last, after the socket is listening. Every file is replaced atomically
//! (temporary file in the same directory, then rename), so a runtime never reads half a file.
//!
//! As the reference's `10-aws.conflist`, the list chains `portmap` (hostPort) after our plugin,
//! and `bandwidth` when `ENABLE_BANDWIDTH_PLUGIN=true`. Their binaries come from
//! `VPC_CNI_CHAINED_PLUGINS_DIR` when it is set (the lab: Debian's `/usr/lib/cni`), else from
//! beside the agent's executable, else they must already be in the CNI bin dir (installed by the
//! DaemonSet's init container, or left by aws-node). A missing one is an error and no conflist
//! is written: a list naming an absent plugin would fail every pod's ADD.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::config::Config;

pub const NETWORK_NAME: &str = "vpc-cni";
pub const CONFLIST_NAME: &str = "10-vpc-cni.conflist";
pub const PLUGIN_NAME: &str = "vpc-cni";
/// The hostPort plugin, always chained after ours (as the reference does).
pub const PORTMAP: &str = "portmap";
/// The traffic-shaping plugin, chained last when `ENABLE_BANDWIDTH_PLUGIN=true`.
pub const BANDWIDTH: &str = "bandwidth";
/// Where the chained plugins' binaries are copied from (vpc-cni extension).
pub const CHAINED_PLUGINS_DIR_VAR: &str = "VPC_CNI_CHAINED_PLUGINS_DIR";
/// The CNI versions our plugin speaks; the list offers those every chained plugin speaks too.
pub const PLUGIN_CNI_VERSIONS: [&str; 2] = ["1.0.0", "1.1.0"];
/// The list's `cniVersion`: what a runtime whose libcni predates `cniVersions` uses.
pub const CNI_VERSION: &str = "1.0.0";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The I/O error is part of the message (and not a `source`, which `{:#}` would repeat).
    #[error("cannot {what} {path}: {cause}")]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "the chained CNI plugin {name:?} is not installed: looked in {looked}; set \
         {CHAINED_PLUGINS_DIR_VAR} to a directory holding it (Debian's containernetworking-plugins: \
         /usr/lib/cni) or install it into the CNI bin dir; no network configuration written"
    )]
    ChainedMissing { name: &'static str, looked: String },
    #[error(
        "the chained CNI plugin {path} does not answer VERSION: {why}; no network configuration written"
    )]
    ChainedVersion { path: PathBuf, why: String },
    #[error(
        "the chained CNI plugin {path} speaks CNI {supported:?}, not {CNI_VERSION}; install a \
         newer one (containernetworking-plugins 1.0 or later); no network configuration written"
    )]
    ChainedTooOld {
        path: PathBuf,
        supported: Vec<String>,
    },
}

/// Replaces `path` with `bytes` atomically and durably: a temporary file in the same directory,
/// fsync, closed, renamed over `path`, then the directory fsynced.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let err = |what, cause| InstallError::Io {
        what,
        path: path.into(),
        cause,
    };
    let dir = path.parent().expect("absolute path has a parent");
    fs::create_dir_all(dir).map_err(|e| err("create the directory of", e))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("vpc-cni")
    ));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        // Closed before the rename: once the name points at the new file, no process holds it
        // open for writing, so a runtime that executes it at once never gets ETXTBSY.
        drop(f);
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| err("write", e))
}

/// What [`install_binaries`] installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Our plugin in the CNI bin dir.
    pub plugin: PathBuf,
    /// Where it was copied from.
    pub plugin_from: PathBuf,
    pub chained: Chained,
}

/// Installs our plugin and the chained plugins the conflist names into the CNI bin dir
/// (`HOST_CNI_BIN_PATH`): ours from `VPC_CNI_PLUGIN_BINARY`, else from beside the running
/// executable; the chained ones as [`install_chained`] says, beside the running executable
/// being the fallback source.
pub fn install_binaries(cfg: &Config) -> Result<Installed, InstallError> {
    match std::env::current_exe() {
        Ok(exe) => install_binaries_from(cfg, Some(&exe)),
        // Only needed when VPC_CNI_PLUGIN_BINARY is unset (then the error says so).
        Err(e) if cfg.plugin_binary.is_none() => Err(InstallError::Io {
            what: "locate the running executable (to find the plugin beside it; or set \
                   VPC_CNI_PLUGIN_BINARY)",
            path: PathBuf::from("/proc/self/exe"),
            cause: e,
        }),
        Err(_) => install_binaries_from(cfg, None),
    }
}

/// [`install_binaries`] with the running executable at `exe`.
pub fn install_binaries_from(cfg: &Config, exe: Option<&Path>) -> Result<Installed, InstallError> {
    let beside = exe.and_then(Path::parent);
    let plugin_from = match (&cfg.plugin_binary, beside) {
        (Some(p), _) => p.clone(),
        (None, Some(dir)) => dir.join(PLUGIN_NAME),
        (None, None) => PathBuf::from(PLUGIN_NAME),
    };
    let plugin = install_plugin(&plugin_from, &cfg.cni_bin_dir)?;
    let chained = install_chained(cfg, cfg.chained_plugins_dir.as_deref(), beside)?;
    Ok(Installed {
        plugin,
        plugin_from,
        chained,
    })
}

/// Copies the plugin binary into the CNI bin directory.
pub fn install_plugin(source: &Path, bin_dir: &Path) -> Result<PathBuf, InstallError> {
    let bytes = fs::read(source).map_err(|e| InstallError::Io {
        what: "read the plugin binary (set VPC_CNI_PLUGIN_BINARY)",
        path: source.into(),
        cause: e,
    })?;
    let dest = bin_dir.join(PLUGIN_NAME);
    atomic_write(&dest, &bytes, 0o755)?;
    Ok(dest)
}

/// The plugins chained after ours, in order, as their conflist entries: the reference's
/// `portmap` entry, and its `bandwidth` entry when `ENABLE_BANDWIDTH_PLUGIN=true`.
pub fn chained_entries(cfg: &Config) -> Vec<(&'static str, Value)> {
    let mut v = vec![(
        PORTMAP,
        json!({"type": PORTMAP, "capabilities": {"portMappings": true}, "snat": true}),
    )];
    if cfg.enable_bandwidth_plugin {
        v.push((
            BANDWIDTH,
            json!({"type": BANDWIDTH, "capabilities": {"bandwidth": true}}),
        ));
    }
    v
}

/// One chained plugin as installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainedPlugin {
    pub name: &'static str,
    /// Its binary in the CNI bin dir.
    pub path: PathBuf,
    /// Where it was copied from; `None` when it was already in the bin dir.
    pub copied_from: Option<PathBuf>,
    /// The CNI versions it answers VERSION with.
    pub versions: Vec<String>,
}

impl ChainedPlugin {
    /// Where its binary came from: a path, or "already in the CNI bin dir".
    pub fn source(&self) -> String {
        self.copied_from.as_ref().map_or_else(
            || "already in the CNI bin dir".to_string(),
            |f| f.display().to_string(),
        )
    }
}

/// The chained plugins, installed and asked for their versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chained {
    pub plugins: Vec<ChainedPlugin>,
    /// `cniVersions` of the list: ours that every chained plugin speaks too.
    pub cni_versions: Vec<String>,
}

impl Chained {
    /// The list with no chained plugin (what the versions are without any).
    pub fn none() -> Chained {
        Chained {
            plugins: Vec::new(),
            cni_versions: PLUGIN_CNI_VERSIONS.iter().map(|v| v.to_string()).collect(),
        }
    }
}

/// Installs the binary of every chained plugin into the CNI bin dir and asks each for its CNI
/// versions. Each comes from `source_dir` (`VPC_CNI_CHAINED_PLUGINS_DIR`) when that is set,
/// else from `agent_dir` (beside the agent's executable) when it is there, else it must already
/// be in the bin dir. On any failure our conflist is removed (an earlier run's list would name
/// the same plugins) and nothing is written: readiness is not claimed.
pub fn install_chained(
    cfg: &Config,
    source_dir: Option<&Path>,
    agent_dir: Option<&Path>,
) -> Result<Chained, InstallError> {
    let result = install_chained_inner(cfg, source_dir, agent_dir);
    if result.is_err() {
        let _ = fs::remove_file(cfg.cni_conf_dir.join(CONFLIST_NAME));
    }
    result
}

fn install_chained_inner(
    cfg: &Config,
    source_dir: Option<&Path>,
    agent_dir: Option<&Path>,
) -> Result<Chained, InstallError> {
    let mut chained = Chained::none();
    for (name, _) in chained_entries(cfg) {
        let dest = cfg.cni_bin_dir.join(name);
        let source = match (source_dir, agent_dir) {
            (Some(dir), _) => Some(dir.join(name)),
            (None, Some(dir)) if dir.join(name).is_file() => Some(dir.join(name)),
            _ => None,
        };
        let copied_from = match source {
            Some(src) if src.is_file() => {
                copy_if_changed(&src, &dest)?;
                Some(src)
            }
            Some(src) => {
                return Err(InstallError::ChainedMissing {
                    name,
                    looked: format!("{}={}", CHAINED_PLUGINS_DIR_VAR, src.display()),
                });
            }
            None if dest.is_file() => None,
            None => {
                let mut looked = vec![format!("{} (the CNI bin dir)", cfg.cni_bin_dir.display())];
                if let Some(dir) = agent_dir {
                    looked.push(format!("{} (beside the agent)", dir.display()));
                }
                return Err(InstallError::ChainedMissing {
                    name,
                    looked: looked.join(", "),
                });
            }
        };
        let versions = plugin_versions(&dest)?;
        if !versions.iter().any(|v| v == CNI_VERSION) {
            return Err(InstallError::ChainedTooOld {
                path: dest,
                supported: versions,
            });
        }
        chained.cni_versions.retain(|v| versions.contains(v));
        chained.plugins.push(ChainedPlugin {
            name,
            path: dest,
            copied_from,
            versions,
        });
    }
    Ok(chained)
}

/// Copies `src` to `dest` (mode 0755, atomically) unless `dest` already has its bytes.
fn copy_if_changed(src: &Path, dest: &Path) -> Result<(), InstallError> {
    let bytes = fs::read(src).map_err(|e| InstallError::Io {
        what: "read the chained plugin",
        path: src.into(),
        cause: e,
    })?;
    if fs::read(dest).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    atomic_write(dest, &bytes, 0o755)
}

/// How long a chained plugin may take to answer VERSION.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

/// The CNI versions a plugin binary answers `CNI_COMMAND=VERSION` with.
pub fn plugin_versions(bin: &Path) -> Result<Vec<String>, InstallError> {
    let fail = |why: String| InstallError::ChainedVersion {
        path: bin.into(),
        why,
    };
    let spawn = || {
        Command::new(bin)
            .env_clear()
            .env("CNI_COMMAND", "VERSION")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    // Just written: a fork elsewhere in this process may briefly hold its write descriptor.
    let mut tries = 0;
    let mut child = loop {
        match spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            r => break r.map_err(|e| fail(e.to_string()))?,
        }
    };
    let stdin = json!({"cniVersion": CNI_VERSION}).to_string();
    // A plugin that exits without reading its stdin closes the pipe: its output tells.
    let _ = child
        .stdin
        .take()
        .expect("piped")
        .write_all(stdin.as_bytes());
    let t = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if t.elapsed() < VERSION_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!("no answer in {VERSION_TIMEOUT:?}")));
            }
            Err(e) => return Err(fail(e.to_string())),
        }
    }
    let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(fail(format!(
            "{}: {} {}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_str::<Value>(&stdout)
        .ok()
        .and_then(|v| {
            v["supportedVersions"].as_array().map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect::<Vec<_>>()
            })
        })
        .ok_or_else(|| fail(format!("no supportedVersions in {:?}", stdout.trim())))
}

/// The network configuration list the runtime reads: our plugin, then the chained ones.
///
/// `cniVersion` is 1.0.0 so runtimes whose libcni predates 1.1 accept it; `cniVersions` lets a
/// 1.1-aware runtime pick 1.1.0 (and with it STATUS and GC) when every chained plugin speaks it
/// (Debian 12's portmap 1.1.1 stops at 1.0.0: a runtime picking 1.1.0 would fail every ADD).
pub fn conflist(cfg: &Config, chained: &Chained) -> serde_json::Value {
    let mut plugins = vec![json!({
        "name": NETWORK_NAME,
        "type": PLUGIN_NAME,
        "mtu": cfg.pod_mtu.to_string(),
        "vethPrefix": cfg.veth_prefix,
        "agentSocket": cfg.socket,
        "pluginLogFile": cfg.plugin_log_file,
        "pluginLogLevel": cfg.plugin_log_level,
    })];
    plugins.extend(chained_entries(cfg).into_iter().map(|(_, entry)| entry));
    json!({
        "cniVersion": CNI_VERSION,
        "cniVersions": chained.cni_versions,
        "name": NETWORK_NAME,
        "plugins": plugins,
    })
}

pub fn write_conflist(cfg: &Config, chained: &Chained) -> Result<PathBuf, InstallError> {
    let path = cfg.cni_conf_dir.join(CONFLIST_NAME);
    let text = serde_json::to_vec_pretty(&conflist(cfg, chained)).expect("conflist serialises");
    atomic_write(&path, &text, 0o644)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn writes_conflist_and_plugin_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let vars: HashMap<String, String> = [
            ("HOST_CNI_CONFDIR_PATH", dir.path().join("net.d")),
            ("HOST_CNI_BIN_PATH", dir.path().join("bin")),
            ("VPC_CNI_AGENT_SOCKET", dir.path().join("agent.sock")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.display().to_string()))
        .collect();
        let cfg = crate::config::from_env(&vars).unwrap();
        let path = write_conflist(&cfg, &Chained::none()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["name"], "vpc-cni");
        assert_eq!(v["plugins"][0]["type"], "vpc-cni");
        assert_eq!(v["plugins"][0]["mtu"], "9001");
        assert_eq!(
            v["plugins"][0]["agentSocket"],
            dir.path().join("agent.sock").display().to_string()
        );

        let src = dir.path().join("src-plugin");
        fs::write(&src, b"#!/bin/true\n").unwrap();
        let dest = install_plugin(&src, &cfg.cni_bin_dir).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"#!/bin/true\n");
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert_eq!(
            fs::read_dir(&cfg.cni_bin_dir).unwrap().count(),
            1,
            "no temp file left"
        );

        let e = install_plugin(&dir.path().join("missing"), &cfg.cni_bin_dir).unwrap_err();
        assert!(e.to_string().contains("VPC_CNI_PLUGIN_BINARY"), "{e}");
    }

    fn config_in(dir: &Path, extra: &[(&str, &str)]) -> Config {
        let mut vars: HashMap<String, String> = [
            ("HOST_CNI_CONFDIR_PATH", dir.join("net.d")),
            ("HOST_CNI_BIN_PATH", dir.join("bin")),
            ("VPC_CNI_AGENT_SOCKET", dir.join("agent.sock")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.display().to_string()))
        .collect();
        vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        crate::config::from_env(&vars).unwrap()
    }

    /// A fake CNI plugin answering VERSION with `versions`.
    fn fake_plugin(path: &Path, versions: &[&str]) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let answer = json!({"cniVersion": "1.0.0", "supportedVersions": versions});
        fs::write(
            path,
            format!("#!/bin/sh\ncat >/dev/null\n[ \"$CNI_COMMAND\" = VERSION ] || exit 1\necho '{answer}'\n"),
        )
        .unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn binaries_come_from_the_variables_else_from_beside_the_executable() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        fs::create_dir_all(&image).unwrap();
        fs::write(image.join(PLUGIN_NAME), b"#!/bin/true\n").unwrap();
        fake_plugin(&image.join(PORTMAP), &["1.0.0", "1.1.0"]);
        fake_plugin(&image.join(BANDWIDTH), &["1.0.0"]);
        let exe = image.join("vpc-cni-agent");

        // Beside the executable: the plugin, portmap (and bandwidth only when enabled).
        let cfg = config_in(dir.path(), &[]);
        let done = install_binaries_from(&cfg, Some(&exe)).unwrap();
        assert_eq!(done.plugin, cfg.cni_bin_dir.join(PLUGIN_NAME));
        assert_eq!(done.plugin_from, image.join(PLUGIN_NAME));
        assert_eq!(fs::read(&done.plugin).unwrap(), b"#!/bin/true\n");
        let names: Vec<&str> = done.chained.plugins.iter().map(|p| p.name).collect();
        assert_eq!(names, [PORTMAP]);
        assert_eq!(
            done.chained.plugins[0].source(),
            image.join(PORTMAP).display().to_string()
        );
        assert!(!cfg.cni_bin_dir.join(BANDWIDTH).exists());
        let cfg = config_in(dir.path(), &[("ENABLE_BANDWIDTH_PLUGIN", "true")]);
        let done = install_binaries_from(&cfg, Some(&exe)).unwrap();
        assert_eq!(done.chained.plugins.len(), 2);
        assert_eq!(done.chained.cni_versions, ["1.0.0"]);

        // The variables win over the executable's directory.
        let other = dir.path().join("other");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("my-plugin"), b"#!/bin/false\n").unwrap();
        fake_plugin(&other.join(PORTMAP), &["1.0.0"]);
        let plugin_var = other.join("my-plugin").display().to_string();
        let dir_var = other.display().to_string();
        let cfg = config_in(
            dir.path(),
            &[
                ("VPC_CNI_PLUGIN_BINARY", plugin_var.as_str()),
                (CHAINED_PLUGINS_DIR_VAR, dir_var.as_str()),
            ],
        );
        let done = install_binaries_from(&cfg, Some(&exe)).unwrap();
        assert_eq!(fs::read(&done.plugin).unwrap(), b"#!/bin/false\n");
        assert_eq!(
            done.chained.plugins[0].copied_from,
            Some(other.join(PORTMAP))
        );

        // No plugin anywhere: the error names the variable.
        let cfg = config_in(&dir.path().join("x"), &[]);
        let e = install_binaries_from(&cfg, Some(&dir.path().join("empty/agent"))).unwrap_err();
        assert!(e.to_string().contains("VPC_CNI_PLUGIN_BINARY"), "{e}");
    }

    #[test]
    fn conflist_chains_portmap_always_and_bandwidth_only_when_enabled() {
        let dir = tempfile::tempdir().unwrap();
        let types = |v: &Value| -> Vec<String> {
            v["plugins"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["type"].as_str().unwrap().to_string())
                .collect()
        };
        let cfg = config_in(dir.path(), &[]);
        assert!(!cfg.enable_bandwidth_plugin);
        let v = conflist(&cfg, &Chained::none());
        assert_eq!(types(&v), ["vpc-cni", "portmap"]);
        // The reference's portmap entry, as in its 10-aws.conflist.
        assert_eq!(
            v["plugins"][1],
            json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true})
        );
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["cniVersions"], json!(["1.0.0", "1.1.0"]));

        let cfg = config_in(dir.path(), &[("ENABLE_BANDWIDTH_PLUGIN", "true")]);
        let v = conflist(&cfg, &Chained::none());
        assert_eq!(types(&v), ["vpc-cni", "portmap", "bandwidth"]);
        assert_eq!(
            v["plugins"][2],
            json!({"type": "bandwidth", "capabilities": {"bandwidth": true}})
        );
        let cfg = config_in(dir.path(), &[("ENABLE_BANDWIDTH_PLUGIN", "false")]);
        assert_eq!(
            types(&conflist(&cfg, &Chained::none())),
            ["vpc-cni", "portmap"]
        );
    }

    #[test]
    fn chained_plugins_are_installed_and_limit_the_versions() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let cfg = config_in(dir.path(), &[("ENABLE_BANDWIDTH_PLUGIN", "true")]);
        fake_plugin(&src.join("portmap"), &["0.4.0", "1.0.0", "1.1.0"]);
        fake_plugin(&src.join("bandwidth"), &["0.3.0", "0.4.0", "1.0.0"]);
        let chained = install_chained(&cfg, Some(&src), None).unwrap();
        assert_eq!(
            chained
                .plugins
                .iter()
                .map(|p| (p.name, p.copied_from.is_some()))
                .collect::<Vec<_>>(),
            [("portmap", true), ("bandwidth", true)]
        );
        assert_eq!(chained.cni_versions, ["1.0.0"], "bandwidth stops at 1.0.0");
        for name in ["portmap", "bandwidth"] {
            let dest = cfg.cni_bin_dir.join(name);
            assert_eq!(fs::read(&dest).unwrap(), fs::read(src.join(name)).unwrap());
            assert_eq!(
                fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
                0o755
            );
        }
        let path = write_conflist(&cfg, &chained).unwrap();
        let v: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["cniVersions"], json!(["1.0.0"]));

        // Without a source dir: beside the agent, else already in the bin dir.
        let cfg = config_in(dir.path(), &[]);
        let beside = dir.path().join("agent-dir");
        fake_plugin(&beside.join("portmap"), &["1.0.0", "1.1.0"]);
        let chained = install_chained(&cfg, None, Some(&beside)).unwrap();
        assert_eq!(chained.plugins[0].copied_from, Some(beside.join("portmap")));
        assert_eq!(chained.cni_versions, ["1.0.0", "1.1.0"]);
        let chained = install_chained(&cfg, None, Some(&dir.path().join("empty"))).unwrap();
        assert_eq!(chained.plugins[0].copied_from, None, "the bin dir's own");

        // Missing: a clear error naming the plugin and the variable, and no conflist left.
        let cfg = config_in(&dir.path().join("other"), &[]);
        fs::create_dir_all(&cfg.cni_conf_dir).unwrap();
        let stale = cfg.cni_conf_dir.join(CONFLIST_NAME);
        fs::write(&stale, b"{}").unwrap();
        let e = install_chained(&cfg, None, Some(&beside.join("nothing-here")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"portmap\"") && e.contains(CHAINED_PLUGINS_DIR_VAR) && e.contains("bin"),
            "{e}"
        );
        assert!(!stale.exists(), "an earlier conflist is removed: not ready");
        let e = install_chained(&cfg, Some(&dir.path().join("empty")), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("{CHAINED_PLUGINS_DIR_VAR}=")), "{e}");

        // A plugin that does not speak 1.0.0, or does not answer VERSION, is refused.
        let old = dir.path().join("old");
        fake_plugin(&old.join("portmap"), &["0.3.1", "0.4.0"]);
        let e = install_chained(&cfg, Some(&old), None).unwrap_err();
        assert!(matches!(e, InstallError::ChainedTooOld { .. }), "{e}");
        let broken = dir.path().join("broken");
        fs::create_dir_all(&broken).unwrap();
        fs::write(broken.join("portmap"), "#!/bin/sh\nexit 3\n").unwrap();
        fs::set_permissions(broken.join("portmap"), fs::Permissions::from_mode(0o755)).unwrap();
        let e = install_chained(&cfg, Some(&broken), None).unwrap_err();
        assert!(matches!(e, InstallError::ChainedVersion { .. }), "{e}");
    }
}
