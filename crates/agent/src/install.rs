//! Readiness: install the plugin binary and write the CNI network configuration.
//!
//! Writing the conflist is what tells the container runtime that the node's network is ready,
//! so it happens last, after the socket is listening. Both files are replaced atomically
//! (temporary file in the same directory, then rename), so a runtime never reads half a file.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::config::Config;

pub const NETWORK_NAME: &str = "vpc-cni";
pub const CONFLIST_NAME: &str = "10-vpc-cni.conflist";
pub const PLUGIN_NAME: &str = "vpc-cni";

#[derive(Debug, thiserror::Error)]
#[error("cannot {what} {path}: {source}")]
pub struct InstallError {
    what: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

fn atomic_write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let err = |what, source| InstallError {
        what,
        path: path.into(),
        source,
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
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| err("write", e))
}

/// Copies the plugin binary into the CNI bin directory.
pub fn install_plugin(source: &Path, bin_dir: &Path) -> Result<PathBuf, InstallError> {
    let bytes = fs::read(source).map_err(|e| InstallError {
        what: "read the plugin binary (set VPC_CNI_PLUGIN_BINARY)",
        path: source.into(),
        source: e,
    })?;
    let dest = bin_dir.join(PLUGIN_NAME);
    atomic_write(&dest, &bytes, 0o755)?;
    Ok(dest)
}

/// The network configuration list the runtime reads.
///
/// `cniVersion` is 1.0.0 so runtimes whose libcni predates 1.1 accept it; `cniVersions` lets a
/// 1.1-aware runtime pick 1.1.0 (and with it STATUS and GC).
pub fn conflist(cfg: &Config) -> serde_json::Value {
    json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["1.0.0", "1.1.0"],
        "name": NETWORK_NAME,
        "plugins": [{
            "name": NETWORK_NAME,
            "type": PLUGIN_NAME,
            "mtu": cfg.pod_mtu.to_string(),
            "vethPrefix": cfg.veth_prefix,
            "agentSocket": cfg.socket,
            "pluginLogFile": cfg.plugin_log_file,
            "pluginLogLevel": cfg.plugin_log_level,
        }]
    })
}

pub fn write_conflist(cfg: &Config) -> Result<PathBuf, InstallError> {
    let path = cfg.cni_conf_dir.join(CONFLIST_NAME);
    let text = serde_json::to_vec_pretty(&conflist(cfg)).expect("conflist serialises");
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
        let path = write_conflist(&cfg).unwrap();
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
}
