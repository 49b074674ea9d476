//! The request configuration on stdin (spec section 3, "Deriving request configuration").

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::env::validate_identifier;
use crate::error::{CniError, code};
use crate::result::CniResult;
use crate::version::Version;

/// GC's key for the attachments to keep (libcni ≥1.2 sends both this and the older one).
pub const VALID_ATTACHMENTS_KEY: &str = "cni.dev/valid-attachments";
/// The name the spec-v1.1.0 tag used before it was corrected.
pub const OLD_ATTACHMENTS_KEY: &str = "cni.dev/attachments";

/// One attachment named in GC's valid list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// A parsed request configuration. The plugin reads its own keys from `raw`.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: Version,
    pub name: String,
    pub plugin_type: String,
    /// `prevResult`, parsed in `cni_version`'s shape (absent or null → `None`).
    pub prev_result: Option<CniResult>,
    /// GC's list of attachments to keep (absent → `None`).
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The whole configuration object, including the keys above.
    pub raw: Map<String, Value>,
}

/// The `cniVersion` in `bytes` if it is one we support — for labelling an error reply when
/// the configuration as a whole did not parse.
pub fn peek_version(bytes: &[u8]) -> Option<Version> {
    #[derive(Deserialize)]
    struct V {
        #[serde(rename = "cniVersion")]
        v: String,
    }
    let v: V = serde_json::from_slice(bytes).ok()?;
    Version::parse(&v.v).ok()
}

impl NetConf {
    /// Parse stdin. Malformed JSON → code 6; unsupported or missing `cniVersion` → code 1;
    /// missing, empty or invalid `name`/`type` → code 7 naming the key; undecodable
    /// `prevResult` → code 6; malformed attachment list → code 7 naming the key.
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                code::DECODING_FAILURE,
                "cannot decode the network configuration on stdin",
                e.to_string(),
            )
        })?;
        let Value::Object(raw) = value else {
            return Err(CniError::new(
                code::DECODING_FAILURE,
                "cannot decode the network configuration on stdin",
                format!("expected a JSON object, got {}", kind(&value)),
            ));
        };

        let cni_version = match raw.get("cniVersion") {
            None => Err(CniError::new(
                code::INCOMPATIBLE_CNI_VERSION,
                "incompatible CNI versions",
                format!(
                    "config has no cniVersion (0.1.0), plugin supports [{}]",
                    crate::SUPPORTED_VERSIONS.join(", ")
                ),
            )),
            Some(Value::String(s)) => Version::parse(s),
            Some(other) => Err(invalid("cniVersion", format!("{other} is not a string"))),
        }?;

        let name = required_string(&raw, "name")?;
        validate_identifier(&name).map_err(|why| invalid("name", format!("\"{name}\" {why}")))?;
        let plugin_type = required_string(&raw, "type")?;

        let prev_result = match raw.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v) => Some(CniResult::from_json(v, cni_version)?),
        };

        let valid_attachments = match (raw.get(VALID_ATTACHMENTS_KEY), raw.get(OLD_ATTACHMENTS_KEY))
        {
            (Some(v), _) => Some(attachments(VALID_ATTACHMENTS_KEY, v)?),
            (None, Some(v)) => Some(attachments(OLD_ATTACHMENTS_KEY, v)?),
            (None, None) => None,
        };

        Ok(NetConf {
            cni_version,
            name,
            plugin_type,
            prev_result,
            valid_attachments,
            raw,
        })
    }
}

fn attachments(key: &str, v: &Value) -> Result<Vec<Attachment>, CniError> {
    if v.is_null() {
        return Ok(Vec::new());
    }
    serde_json::from_value(v.clone()).map_err(|e| invalid(key, e.to_string()))
}

fn required_string(raw: &Map<String, Value>, key: &str) -> Result<String, CniError> {
    match raw.get(key) {
        None => Err(invalid(key, "is missing".into())),
        Some(Value::String(s)) if s.is_empty() => Err(invalid(key, "is empty".into())),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(invalid(key, format!("{other} is not a string"))),
    }
}

/// Code 7 naming `key`.
pub fn invalid(key: &str, why: String) -> CniError {
    CniError::new(
        code::INVALID_NETWORK_CONFIG,
        format!("invalid network configuration: \"{key}\""),
        format!("{key} {why}"),
    )
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"vpc-cni","type":"vpc-cni","mtu":"9001"}"#,
        )
        .unwrap();
        assert_eq!(c.cni_version, Version::V1_0_0);
        assert_eq!(c.name, "vpc-cni");
        assert_eq!(c.plugin_type, "vpc-cni");
        assert_eq!(c.prev_result, None);
        assert_eq!(c.valid_attachments, None);
        assert_eq!(c.raw["mtu"], "9001");
    }

    #[test]
    fn malformed_json_is_code_6() {
        for bad in [&b"{"[..], b"", b"not json", b"[1,2]", b"\"x\""] {
            let e = NetConf::parse(bad).unwrap_err();
            assert_eq!(e.code, 6, "{bad:?}");
        }
    }

    #[test]
    fn versions() {
        let e = NetConf::parse(br#"{"cniVersion":"9.9.9","name":"n","type":"t"}"#).unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.details.contains("9.9.9"));
        let e = NetConf::parse(br#"{"name":"n","type":"t"}"#).unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.details.contains("no cniVersion"));
        let e = NetConf::parse(br#"{"cniVersion":1,"name":"n","type":"t"}"#).unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("cniVersion"));
    }

    #[test]
    fn name_and_type_are_named() {
        for (input, key) in [
            (&br#"{"cniVersion":"1.0.0","type":"t"}"#[..], "name"),
            (br#"{"cniVersion":"1.0.0","name":"","type":"t"}"#, "name"),
            (br#"{"cniVersion":"1.0.0","name":"-x","type":"t"}"#, "name"),
            (br#"{"cniVersion":"1.0.0","name":"a b","type":"t"}"#, "name"),
            (br#"{"cniVersion":"1.0.0","name":"n"}"#, "type"),
            (br#"{"cniVersion":"1.0.0","name":"n","type":""}"#, "type"),
            (br#"{"cniVersion":"1.0.0","name":"n","type":3}"#, "type"),
        ] {
            let e = NetConf::parse(input).unwrap_err();
            assert_eq!(e.code, 7, "{e}");
            assert!(e.msg.contains(&format!("\"{key}\"")), "{e}");
        }
    }

    #[test]
    fn prev_result_in_config_version() {
        let c = NetConf::parse(
            br#"{"cniVersion":"0.4.0","name":"n","type":"t","prevResult":{"cniVersion":"0.4.0",
            "ips":[{"version":"4","address":"10.99.0.2/32","interface":0}],
            "interfaces":[{"name":"eth0","sandbox":"/run/netns/x"}]}}"#,
        )
        .unwrap();
        let p = c.prev_result.unwrap();
        assert_eq!(p.ips[0].address.to_string(), "10.99.0.2/32");
        assert_eq!(p.interfaces[0].sandbox.as_deref(), Some("/run/netns/x"));

        let e = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":{"ips":[{"address":"x"}]}}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, 6);
        let c =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":null}"#)
                .unwrap();
        assert_eq!(c.prev_result, None);
    }

    #[test]
    fn gc_attachments_both_keys() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"t","cni.dev/valid-attachments":[
            {"containerID":"a","ifname":"eth0"},{"containerID":"b","ifname":"eth1"}]}"#,
        )
        .unwrap();
        let a = c.valid_attachments.unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[1].container_id, "b");
        assert_eq!(a[1].ifname, "eth1");
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"t","cni.dev/attachments":[
            {"containerID":"a","ifname":"eth0"}]}"#,
        )
        .unwrap();
        assert_eq!(c.valid_attachments.unwrap().len(), 1);
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"t","cni.dev/valid-attachments":[]}"#,
        )
        .unwrap();
        assert_eq!(c.valid_attachments, Some(vec![]));
        let e = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"t","cni.dev/valid-attachments":[{"ifname":"eth0"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("cni.dev/valid-attachments"));
    }

    #[test]
    fn peek() {
        assert_eq!(
            peek_version(br#"{"cniVersion":"0.3.1"}"#),
            Some(Version::V0_3_1)
        );
        assert_eq!(peek_version(br#"{"cniVersion":"7"}"#), None);
        assert_eq!(peek_version(b"{"), None);
    }
}
