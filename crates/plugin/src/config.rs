//! The plugin's own keys in the network configuration (written by the agent into the
//! conflist): `mtu`, `vethPrefix`, `agentSocket`, `pluginLogFile`, `pluginLogLevel`, `dns`.

use std::path::PathBuf;

use cni::config::invalid;
use cni::{CniError, Dns};
use serde_json::{Map, Value};
use tracing::level_filters::LevelFilter;

pub const DEFAULT_MTU: u32 = 9001;
pub const MIN_MTU: u32 = 576;
pub const MAX_MTU: u32 = 9001;
pub const DEFAULT_VETH_PREFIX: &str = "eni";
/// Level of the log file when `pluginLogLevel` is not set.
pub const DEFAULT_FILE_LOG_LEVEL: LevelFilter = LevelFilter::INFO;
/// Level of stderr when `pluginLogLevel` is not set (the runtime's log gets stderr).
pub const DEFAULT_STDERR_LOG_LEVEL: LevelFilter = LevelFilter::WARN;

#[derive(Debug, Clone, PartialEq)]
pub struct PluginConfig {
    pub mtu: u32,
    pub veth_prefix: String,
    pub agent_socket: PathBuf,
    /// `pluginLogFile`: an absolute path (opened as a regular file by `logging`); `None`:
    /// stderr (the key absent, empty or `stderr`).
    pub log_file: Option<PathBuf>,
    /// `pluginLogLevel`, if set.
    pub log_level: Option<LevelFilter>,
    pub dns: Dns,
}

impl Default for PluginConfig {
    fn default() -> Self {
        PluginConfig {
            mtu: DEFAULT_MTU,
            veth_prefix: DEFAULT_VETH_PREFIX.into(),
            agent_socket: PathBuf::from(proto::DEFAULT_SOCKET),
            log_file: None,
            log_level: None,
            dns: Dns::default(),
        }
    }
}

impl PluginConfig {
    /// Read our keys from the configuration object. Bad values are code 7 naming the key.
    pub fn from_raw(raw: &Map<String, Value>) -> Result<PluginConfig, CniError> {
        let mut c = PluginConfig::default();
        if let Some(v) = present(raw, "mtu") {
            c.mtu = parse_mtu(v)?;
        }
        if let Some(v) = present(raw, "vethPrefix") {
            c.veth_prefix = parse_veth_prefix(v)?;
        }
        if let Some(v) = present(raw, "agentSocket") {
            c.agent_socket = PathBuf::from(string("agentSocket", v)?);
        }
        if let Some(v) = present(raw, "pluginLogFile") {
            c.log_file = parse_log_file(v)?;
        }
        if let Some(v) = present(raw, "pluginLogLevel") {
            let s = string("pluginLogLevel", v)?;
            c.log_level = Some(s.to_ascii_lowercase().parse().map_err(|_| {
                invalid(
                    "pluginLogLevel",
                    format!("\"{s}\" is not one of off, error, warn, info, debug, trace"),
                )
            })?);
        }
        if let Some(v) = present(raw, "dns") {
            c.dns = serde_json::from_value(v.clone())
                .map_err(|e| invalid("dns", format!("{v} is not a DNS object: {e}")))?;
        }
        Ok(c)
    }
}

/// The key's value, treating null and "" as absent.
fn present<'a>(raw: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    match raw.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(v) => Some(v),
    }
}

fn string(key: &str, v: &Value) -> Result<String, CniError> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| invalid(key, format!("{v} is not a string")))
}

/// Values of `pluginLogFile` that mean stderr (besides an empty string or no key), compared
/// ignoring ASCII case: the agent writes an empty value for `AWS_VPC_K8S_PLUGIN_LOG_FILE`
/// `stderr`, a hand-written conflist may say `stderr`.
pub const LOG_TO_STDERR: &str = "stderr";

/// Names of the plugin's stdout, which carries the CNI result and is never a log.
const STDOUT_NAMES: &[&str] = &["stdout", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"];

/// `pluginLogFile`: `stderr` → `None` (stderr); an absolute path → that file; stdout, a
/// relative path (it would land wherever the runtime happens to run the plugin) or a path
/// with a NUL → code 7 naming the value. Whether the file is a regular one is checked when
/// it is opened (`logging::open_log_file`).
pub fn parse_log_file(v: &Value) -> Result<Option<PathBuf>, CniError> {
    let s = string("pluginLogFile", v)?;
    if s.is_empty() || s.eq_ignore_ascii_case(LOG_TO_STDERR) {
        return Ok(None);
    }
    if STDOUT_NAMES.iter().any(|n| s.eq_ignore_ascii_case(n)) {
        return Err(invalid(
            "pluginLogFile",
            format!(
                "\"{s}\" is the plugin's stdout, which carries the CNI result; use \"stderr\" or the absolute path of a regular file"
            ),
        ));
    }
    if s.contains('\0') {
        return Err(invalid(
            "pluginLogFile",
            format!("{s:?} contains a NUL character"),
        ));
    }
    if !s.starts_with('/') {
        return Err(invalid(
            "pluginLogFile",
            format!(
                "\"{s}\" is a relative path (it would be created wherever the runtime runs the plugin); use \"stderr\" or the absolute path of a regular file"
            ),
        ));
    }
    Ok(Some(PathBuf::from(s)))
}

/// A number or a numeric string (the reference writes `"mtu": "9001"`), 576–9001.
fn parse_mtu(v: &Value) -> Result<u32, CniError> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    }
    .ok_or_else(|| invalid("mtu", format!("{v} is not a whole number")))?;
    if !(u64::from(MIN_MTU)..=u64::from(MAX_MTU)).contains(&n) {
        return Err(invalid(
            "mtu",
            format!("{n} is outside the range {MIN_MTU}-{MAX_MTU}"),
        ));
    }
    Ok(n as u32)
}

/// At most 4 characters (the hash adds 11, and interface names hold 15); not one of the
/// names the node's own interfaces use.
fn parse_veth_prefix(v: &Value) -> Result<String, CniError> {
    let s = string("vethPrefix", v)?;
    if s.len() > 4 {
        return Err(invalid(
            "vethPrefix",
            format!("\"{s}\" is longer than 4 characters"),
        ));
    }
    if matches!(s.as_str(), "eth" | "lo" | "vlan") {
        return Err(invalid(
            "vethPrefix",
            format!("\"{s}\" is reserved for the node's own interfaces"),
        ));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid(
            "vethPrefix",
            format!("\"{s}\" may contain only ASCII letters, digits, '-' and '_'"),
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<PluginConfig, CniError> {
        PluginConfig::from_raw(v.as_object().unwrap())
    }

    #[test]
    fn defaults() {
        let c = parse(json!({"cniVersion": "1.0.0", "name": "n", "type": "vpc-cni"})).unwrap();
        assert_eq!(c, PluginConfig::default());
        assert_eq!(c.agent_socket, PathBuf::from("/run/vpc-cni/agent.sock"));
        assert_eq!(c.veth_prefix, "eni");
        assert_eq!(c.mtu, 9001);
    }

    #[test]
    fn all_keys() {
        let c = parse(json!({
            "mtu": "1500", "vethPrefix": "pod", "agentSocket": "/tmp/a.sock",
            "pluginLogFile": "/var/log/p.log", "pluginLogLevel": "Debug",
            "dns": {"nameservers": ["10.0.0.10"]}
        }))
        .unwrap();
        assert_eq!(c.mtu, 1500);
        assert_eq!(c.veth_prefix, "pod");
        assert_eq!(c.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.log_file, Some(PathBuf::from("/var/log/p.log")));
        assert_eq!(c.log_level, Some(LevelFilter::DEBUG));
        assert_eq!(c.dns.nameservers, vec!["10.0.0.10"]);
        assert_eq!(parse(json!({"mtu": 576})).unwrap().mtu, 576);
        assert_eq!(parse(json!({"mtu": " 9001 "})).unwrap().mtu, 9001);
    }

    #[test]
    fn bad_mtu_is_named() {
        for bad in [
            json!(575),
            json!("9002"),
            json!(-1),
            json!("abc"),
            json!(1500.5),
            json!(true),
        ] {
            let e = parse(json!({ "mtu": bad })).unwrap_err();
            assert_eq!(e.code, 7, "{bad}");
            assert!(e.msg.contains("mtu"), "{e}");
            assert!(e.details.starts_with("mtu "), "{e}");
        }
        let e = parse(json!({"mtu": 10000})).unwrap_err();
        assert!(e.details.contains("10000"), "{e}");
    }

    #[test]
    fn bad_veth_prefix() {
        for bad in ["abcde", "eth", "lo", "vlan", "a/b", "a b"] {
            let e = parse(json!({ "vethPrefix": bad })).unwrap_err();
            assert_eq!(e.code, 7);
            assert!(e.msg.contains("vethPrefix"), "{e}");
            assert!(e.details.contains(bad), "{e}");
        }
    }

    #[test]
    fn log_file_values() {
        let file = |v: Value| parse(json!({ "pluginLogFile": v })).map(|c| c.log_file);
        assert_eq!(file(json!("")).unwrap(), None);
        assert_eq!(file(Value::Null).unwrap(), None);
        assert_eq!(file(json!("stderr")).unwrap(), None);
        assert_eq!(file(json!("STDERR")).unwrap(), None);
        assert_eq!(
            file(json!("/var/log/aws-routed-eni/plugin.log")).unwrap(),
            Some(PathBuf::from("/var/log/aws-routed-eni/plugin.log"))
        );
        for bad in [
            "stdout",
            "/dev/stdout",
            "/proc/self/fd/1",
            "plugin.log",
            "./stderr",
            "log/plugin.log",
            "~/plugin.log",
            "/var/log/a\0b",
        ] {
            let e = file(json!(bad)).unwrap_err();
            assert_eq!(e.code, 7, "{bad}");
            assert!(e.msg.contains("pluginLogFile"), "{e}");
            assert!(
                e.details.contains(bad) || e.details.contains("NUL"),
                "{bad}: {e}"
            );
        }
        assert!(
            file(json!("stdout"))
                .unwrap_err()
                .details
                .contains("carries the CNI result")
        );
        assert!(
            file(json!("plugin.log"))
                .unwrap_err()
                .details
                .contains("relative")
        );
    }

    #[test]
    fn other_bad_keys() {
        for (k, v) in [
            ("agentSocket", json!(3)),
            ("pluginLogFile", json!([])),
            ("pluginLogLevel", json!("loud")),
            ("dns", json!("8.8.8.8")),
        ] {
            let e = parse(json!({ k: v })).unwrap_err();
            assert_eq!(e.code, 7);
            assert!(e.msg.contains(k), "{e}");
        }
    }
}
