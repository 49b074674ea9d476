//! The CNI error object (spec section 5, "Error") and the well-known codes.

use serde_json::{Value, json};

/// Error codes defined by the CNI specification (0–99 are reserved for it) and by libcni.
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_CNI_VERSION: u32 = 1;
    /// Unsupported field in network configuration (the message must name key and value).
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables (the message must name them).
    pub const INVALID_ENVIRONMENT_VARIABLES: u32 = 4;
    /// I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Failed to decode content.
    pub const DECODING_FAILURE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// Invalid network namespace (libcni, not in SPEC.md).
    pub const INVALID_NETNS: u32 = 8;
    /// Try again later: a transient condition.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin is not available (cannot serve ADD).
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// STATUS: not available, and existing containers may have limited connectivity.
    pub const PLUGIN_NOT_AVAILABLE_LIMITED_CONNECTIVITY: u32 = 51;
    /// Internal error (libcni, not in SPEC.md).
    pub const INTERNAL: u32 = 999;
    /// First code a plugin may use for its own errors.
    pub const FIRST_PLUGIN_SPECIFIC: u32 = 100;
}

/// A CNI error: what the plugin prints (as JSON, on stdout) before exiting non-zero.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error object in the spec's shape. `cni_version` is the version the runtime asked
    /// for (or the newest we support when that could not be determined).
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let e = CniError::new(code::INVALID_ENVIRONMENT_VARIABLES, "bad env", "CNI_NETNS");
        assert_eq!(
            e.to_json("1.0.0"),
            json!({"cniVersion":"1.0.0","code":4,"msg":"bad env","details":"CNI_NETNS"})
        );
        let e = CniError::new(code::TRY_AGAIN_LATER, "later", "");
        assert_eq!(
            e.to_json("1.1.0"),
            json!({"cniVersion":"1.1.0","code":11,"msg":"later"})
        );
    }

    #[test]
    fn display_includes_details() {
        let e = CniError::new(7, "invalid mtu", "mtu 10 is outside 576-9001");
        assert_eq!(e.to_string(), "invalid mtu: mtu 10 is outside 576-9001");
        assert_eq!(CniError::new(7, "x", "").to_string(), "x");
    }
}
