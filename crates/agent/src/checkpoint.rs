//! The agent's checkpoint: who holds which address, and which addresses are cooling down.
//!
//! The file keeps the reference's format (`/var/run/aws-node/ipam.json`,
//! `{"version":"vpc-cni-ipam/1","allocations":[…]}`) so a node can move between aws-vpc-cni and
//! vpc-cni in place; vpc-cni adds a `cooldowns` list, which the reference ignores.
//! Writes are atomic: a temporary file in the same directory, fsync, rename, fsync of the
//! directory. A crash leaves either the old or the new file, never a torn one.

use std::fs::{self, File};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const FORMAT_VERSION: &str = "vpc-cni-ipam/1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub version: String,
    #[serde(default)]
    pub allocations: Vec<AllocationRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cooldowns: Vec<CooldownRecord>,
    /// ENI operations begun but not finished (create/attach, detach/delete): a restart
    /// finishes or undoes each, so a crash at any instant leaks no ENI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub intents: Vec<IntentRecord>,
    /// When each ENI the agent attached was created (the planner keeps young ENIs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub enis: Vec<EniRecord>,
    /// The instance type's limits as DescribeInstanceTypes gave them (asked once per node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_limits: Option<InstanceLimitsRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceLimitsRecord {
    pub instance_type: String,
    pub max_enis: u32,
    pub ipv4_per_eni: u32,
}

impl Default for Checkpoint {
    fn default() -> Self {
        Checkpoint {
            version: FORMAT_VERSION.to_string(),
            allocations: Vec::new(),
            cooldowns: Vec::new(),
            intents: Vec::new(),
            enis: Vec::new(),
            instance_limits: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationRecord {
    pub network_name: String,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub if_name: String,
    pub ipv4: Ipv4Addr,
    /// Unix time in nanoseconds, as the reference writes it.
    pub allocation_timestamp: i64,
    #[serde(default)]
    pub metadata: AllocationMetadata,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationMetadata {
    #[serde(default)]
    pub k8s_pod_namespace: String,
    #[serde(default)]
    pub k8s_pod_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CooldownRecord {
    pub ipv4: Ipv4Addr,
    /// Unix time in milliseconds when the address was released.
    pub released_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IntentOp {
    /// Create an ENI and attach it at `device_index`.
    Create,
    /// Detach and delete `eni_id`.
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IntentRecord {
    /// Also the value of the ENI's intent tag, so a created ENI can be found by it.
    pub id: String,
    pub op: IntentOp,
    #[serde(default)]
    pub eni_id: Option<String>,
    #[serde(default)]
    pub attachment_id: Option<String>,
    #[serde(default)]
    pub device_index: Option<u32>,
    pub started_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EniRecord {
    pub id: String,
    pub created_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read checkpoint {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "checkpoint {path} is not valid JSON ({source}); move it aside to start with no allocations"
    )]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("checkpoint {path} has version {found:?}; this agent reads {FORMAT_VERSION:?}")]
    Version { path: PathBuf, found: String },
    #[error("cannot write checkpoint {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Loads the checkpoint; a missing file is an empty checkpoint.
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Checkpoint::default()),
        Err(source) => {
            return Err(CheckpointError::Read {
                path: path.into(),
                source,
            });
        }
    };
    let cp: Checkpoint =
        serde_json::from_slice(&bytes).map_err(|source| CheckpointError::Parse {
            path: path.into(),
            source,
        })?;
    if cp.version != FORMAT_VERSION {
        return Err(CheckpointError::Version {
            path: path.into(),
            found: cp.version,
        });
    }
    Ok(cp)
}

/// Writes the checkpoint atomically and durably.
pub fn store(path: &Path, cp: &Checkpoint) -> Result<(), CheckpointError> {
    let werr = |source| CheckpointError::Write {
        path: path.into(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(werr)?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("ipam.json")
    ));
    let json = serde_json::to_vec(cp).expect("checkpoint serialises");
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(&json)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            version: FORMAT_VERSION.into(),
            allocations: vec![AllocationRecord {
                network_name: "vpc-cni".into(),
                container_id: "abc".into(),
                if_name: "eth0".into(),
                ipv4: "172.31.13.130".parse().unwrap(),
                allocation_timestamp: 1_700_000_000_000_000_000,
                metadata: AllocationMetadata {
                    k8s_pod_namespace: "default".into(),
                    k8s_pod_name: "web".into(),
                },
            }],
            cooldowns: vec![CooldownRecord {
                ipv4: "172.31.11.77".parse().unwrap(),
                released_ms: 1_700_000_000_000,
            }],
            intents: vec![IntentRecord {
                id: "i1".into(),
                op: IntentOp::Create,
                eni_id: Some("eni-1".into()),
                attachment_id: None,
                device_index: Some(2),
                started_ms: 5,
            }],
            enis: vec![EniRecord {
                id: "eni-1".into(),
                created_ms: 5,
            }],
            instance_limits: Some(InstanceLimitsRecord {
                instance_type: "m5.large".into(),
                max_enis: 3,
                ipv4_per_eni: 10,
            }),
        }
    }

    #[test]
    fn round_trips_and_replaces_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ipam.json");
        assert_eq!(load(&path).unwrap(), Checkpoint::default());
        store(&path, &sample()).unwrap();
        assert_eq!(load(&path).unwrap(), sample());
        store(&path, &Checkpoint::default()).unwrap();
        assert_eq!(load(&path).unwrap().allocations.len(), 0);
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["ipam.json"], "no temporary file left behind");
    }

    #[test]
    fn reads_the_reference_format() {
        // As aws-vpc-cni v1.23 writes it (no cooldowns, extra metadata field).
        let text = r#"{"version":"vpc-cni-ipam/1","allocations":[{"networkName":"aws-cni","containerID":"c1","ifName":"eth0","ipv4":"10.0.1.5","allocationTimestamp":1,"metadata":{"k8sPodNamespace":"kube-system","k8sPodName":"coredns-1","interfacesCount":1}}]}"#;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        fs::write(&path, text).unwrap();
        let cp = load(&path).unwrap();
        assert_eq!(cp.allocations[0].network_name, "aws-cni");
        assert_eq!(cp.allocations[0].metadata.k8s_pod_name, "coredns-1");
        assert!(cp.cooldowns.is_empty());
        // And what we write keeps the reference's field names.
        let ours = serde_json::to_string(&sample()).unwrap();
        for field in [
            "\"networkName\"",
            "\"containerID\"",
            "\"ifName\"",
            "\"ipv4\"",
            "\"allocationTimestamp\"",
            "\"k8sPodNamespace\"",
        ] {
            assert!(ours.contains(field), "{field} missing in {ours}");
        }
    }

    #[test]
    fn corrupt_or_foreign_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        fs::write(&path, "{not json").unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.contains("ipam.json") && e.contains("not valid JSON"),
            "{e}"
        );
        fs::write(&path, r#"{"version":"other/9","allocations":[]}"#).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("other/9"), "{e}");
    }
}
