//! Spec versions we speak, and which verbs each allows.

use std::fmt;

use serde_json::{Value, json};

use crate::env::Command;
use crate::error::{CniError, code};

/// Every `cniVersion` this plugin accepts, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest spec version we implement.
pub const LATEST: Version = Version::V1_1_0;

/// A supported spec version. Ordered oldest to newest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    pub const ALL: [Version; 5] = [
        Version::V0_3_0,
        Version::V0_3_1,
        Version::V0_4_0,
        Version::V1_0_0,
        Version::V1_1_0,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }

    /// Parse a `cniVersion`. Anything we do not support is code 1 naming the version and the
    /// supported list.
    pub fn parse(s: &str) -> Result<Version, CniError> {
        Version::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                CniError::new(
                    code::INCOMPATIBLE_CNI_VERSION,
                    "incompatible CNI versions",
                    format!(
                        "config is \"{s}\", plugin supports [{}]",
                        quoted_list(&SUPPORTED_VERSIONS)
                    ),
                )
            })
    }

    /// Results in this version carry `ips[].version` ("4"/"6") — the 0.3.x/0.4.0 shape.
    pub fn has_ip_version_field(self) -> bool {
        self < Version::V1_0_0
    }

    /// Results in this version may carry the 1.1 additions (interface mtu, socketPath, pciID,
    /// route mtu/advmss/priority/table/scope).
    pub fn has_1_1_fields(self) -> bool {
        self >= Version::V1_1_0
    }

    /// Is `command` allowed with a configuration of this version? CHECK needs ≥0.4.0,
    /// STATUS and GC need ≥1.1.0 (code 1 otherwise).
    pub fn allows(self, command: Command) -> Result<(), CniError> {
        let min = match command {
            Command::Check => Version::V0_4_0,
            Command::Status | Command::Gc => Version::V1_1_0,
            Command::Add | Command::Del | Command::Version => Version::V0_3_0,
        };
        if self < min {
            return Err(CniError::new(
                code::INCOMPATIBLE_CNI_VERSION,
                format!("config version does not allow {command}"),
                format!(
                    "{command} requires cniVersion {} or later, config is \"{}\"",
                    min.as_str(),
                    self.as_str()
                ),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn quoted_list(items: &[&str]) -> String {
    items
        .iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The VERSION verb's output.
pub fn version_info() -> Value {
    json!({
        "cniVersion": LATEST.as_str(),
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_known_and_unknown() {
        for s in SUPPORTED_VERSIONS {
            assert_eq!(Version::parse(s).unwrap().as_str(), s);
        }
        let e = Version::parse("0.2.0").unwrap_err();
        assert_eq!(e.code, 1);
        assert!(e.details.contains("\"0.2.0\""), "{e}");
        for s in SUPPORTED_VERSIONS {
            assert!(e.details.contains(s), "{e}");
        }
        assert_eq!(Version::parse("1.1").unwrap_err().code, 1);
        assert_eq!(Version::parse("").unwrap_err().code, 1);
    }

    #[test]
    fn ordering_and_shapes() {
        assert!(Version::V0_3_0 < Version::V0_3_1);
        assert!(Version::V0_4_0 < Version::V1_0_0);
        assert!(Version::V0_4_0.has_ip_version_field());
        assert!(!Version::V1_0_0.has_ip_version_field());
        assert!(!Version::V1_0_0.has_1_1_fields());
        assert!(Version::V1_1_0.has_1_1_fields());
    }

    #[test]
    fn verb_minimums() {
        assert_eq!(Version::V0_3_1.allows(Command::Check).unwrap_err().code, 1);
        assert!(Version::V0_4_0.allows(Command::Check).is_ok());
        for v in [Version::V0_3_0, Version::V0_4_0, Version::V1_0_0] {
            let e = v.allows(Command::Status).unwrap_err();
            assert_eq!(e.code, 1);
            assert!(e.details.contains("STATUS"), "{e}");
            assert!(e.details.contains(v.as_str()), "{e}");
            assert_eq!(v.allows(Command::Gc).unwrap_err().code, 1);
        }
        assert!(Version::V1_1_0.allows(Command::Status).is_ok());
        assert!(Version::V1_1_0.allows(Command::Gc).is_ok());
        for v in Version::ALL {
            assert!(v.allows(Command::Add).is_ok());
            assert!(v.allows(Command::Del).is_ok());
        }
    }

    #[test]
    fn version_output() {
        let v = version_info();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }
}
