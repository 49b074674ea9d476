//! The agent's checkpoint: who holds which address, and which addresses are cooling down.
//!
//! The file keeps the reference's format (`/var/run/aws-node/ipam.json`,
//! `{"version":"vpc-cni-ipam/1","allocations":[…]}`) so a node can move between aws-vpc-cni and
//! vpc-cni in place; vpc-cni adds a `cooldowns` list, which the reference ignores.
//! Writes are atomic: a temporary file in the same directory, fsync, rename, fsync of the
//! directory. A crash leaves either the old or the new file, never a torn one.
//!
//! At start the agent reads it with [`load_for_start`]: a file that is empty, truncated, not
//! JSON or of another format version is renamed aside (`ipam.json.corrupt-<unix seconds>`)
//! for inspection, and the agent rebuilds its allocations from the node instead
//! (`crate::recovery`).

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
    /// The agent's clock when this file was written (`crate::clock`): lets the next process
    /// of the same boot carry every time above across the restart exactly, whatever the wall
    /// clock did meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<ClockRecord>,
}

/// A reading of the agent's clock together with the kernel's boot clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClockRecord {
    /// The agent's time (milliseconds, Unix epoch based) the file was written at.
    pub agent_ms: u64,
    /// `CLOCK_BOOTTIME` at the same instant, in milliseconds.
    pub boot_ms: u64,
    /// The kernel's boot id (`/proc/sys/kernel/random/boot_id`): `boot_ms` compares only
    /// within one boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceLimitsRecord {
    pub instance_type: String,
    pub max_enis: u32,
    pub ipv4_per_eni: u32,
    /// Nitro (prefixes possible); `None` in records of earlier versions (asked again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_capable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
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
            clock: None,
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllocationMetadata {
    #[serde(default)]
    pub k8s_pod_namespace: String,
    #[serde(default)]
    pub k8s_pod_name: String,
    /// The reference's count of the pod's interfaces (addresses) its DEL releases: always 1
    /// here (no multi-NIC pods), written so a node handed back to aws-node releases on DEL.
    #[serde(default = "one")]
    pub interfaces_count: u32,
}

fn one() -> u32 {
    1
}

impl Default for AllocationMetadata {
    fn default() -> Self {
        AllocationMetadata {
            k8s_pod_namespace: String::new(),
            k8s_pod_name: String::new(),
            interfaces_count: one(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CooldownRecord {
    pub ipv4: Ipv4Addr,
    /// When the address was released: the agent's clock, milliseconds (Unix epoch based).
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
    #[error("checkpoint {path} is not valid JSON ({source})")]
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

/// What [`load_for_start`] found.
#[derive(Debug)]
pub enum Loaded {
    /// A sound checkpoint.
    Found(Checkpoint),
    /// No file: a new node, or one whose state was removed.
    Missing,
    /// A file that cannot be used; it has been moved aside (or could not be).
    Damaged(Damage),
}

/// Why a checkpoint file was unusable, and where it went.
#[derive(Debug)]
pub struct Damage {
    pub kind: DamageKind,
    /// The parser's words.
    pub detail: String,
    /// Where the file was kept for inspection, or why it could not be moved.
    pub kept: Result<PathBuf, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DamageKind {
    /// Zero bytes, or only white space.
    Empty,
    /// Valid JSON up to a premature end.
    Truncated,
    /// Not JSON, or JSON of another shape.
    Corrupt,
    /// Another format version (e.g. written by a newer agent).
    Version,
}

impl DamageKind {
    pub const ALL: [DamageKind; 4] = [
        DamageKind::Empty,
        DamageKind::Truncated,
        DamageKind::Corrupt,
        DamageKind::Version,
    ];

    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DamageKind::Empty => "empty",
            DamageKind::Truncated => "truncated",
            DamageKind::Corrupt => "corrupt",
            DamageKind::Version => "version",
        }
    }
}

/// Loads the checkpoint at start-up. A file that is empty, truncated, corrupt or of another
/// version is renamed to `<name>.corrupt-<unix_s>` (never overwritten: `-1`, `-2`… on a
/// clash) and reported as [`Loaded::Damaged`]. Only a file that exists and cannot be read
/// (permissions, I/O error) is an error: the agent cannot tell what it holds.
pub fn load_for_start(path: &Path, unix_s: u64) -> Result<Loaded, CheckpointError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::Missing),
        Err(source) => {
            return Err(CheckpointError::Read {
                path: path.into(),
                source,
            });
        }
    };
    let (kind, detail) = match parse_for_start(&bytes) {
        Ok(cp) => return Ok(Loaded::Found(cp)),
        Err(damage) => damage,
    };
    let kept = keep_aside(path, unix_s).map_err(|e| e.to_string());
    Ok(Loaded::Damaged(Damage { kind, detail, kept }))
}

/// The checkpoint in `bytes`, or why it cannot be used (the kind, and the parser's words).
pub fn parse_for_start(bytes: &[u8]) -> Result<Checkpoint, (DamageKind, String)> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err((DamageKind::Empty, format!("{} bytes, no JSON", bytes.len())));
    }
    match serde_json::from_slice::<Checkpoint>(bytes) {
        Ok(cp) if cp.version == FORMAT_VERSION => Ok(cp),
        Ok(cp) => Err((
            DamageKind::Version,
            format!(
                "format version {:?}; this agent reads {FORMAT_VERSION:?}",
                cp.version
            ),
        )),
        Err(e) if e.is_eof() => Err((
            DamageKind::Truncated,
            format!("ends early after {} bytes: {e}", bytes.len()),
        )),
        Err(e) => Err((DamageKind::Corrupt, e.to_string())),
    }
}

/// Renames `path` to `<name>.corrupt-<unix_s>[-n]` in the same directory (durably).
fn keep_aside(path: &Path, unix_s: u64) -> std::io::Result<PathBuf> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("ipam.json");
    let mut target = dir.join(format!("{name}.corrupt-{unix_s}"));
    let mut n = 0;
    while fs::symlink_metadata(&target).is_ok() {
        n += 1;
        target = dir.join(format!("{name}.corrupt-{unix_s}-{n}"));
    }
    fs::rename(path, &target)?;
    File::open(dir)?.sync_all()?;
    Ok(target)
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
                    interfaces_count: 1,
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
                prefix_capable: Some(true),
                hypervisor: Some("nitro".into()),
                vcpus: Some(2),
            }),
            clock: Some(ClockRecord {
                agent_ms: 1_700_000_000_500,
                boot_ms: 86_400_000,
                boot_id: Some("b1".into()),
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

    fn names_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn start_keeps_damaged_files_aside_and_classifies_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        assert!(matches!(load_for_start(&path, 7).unwrap(), Loaded::Missing));
        store(&path, &sample()).unwrap();
        match load_for_start(&path, 7).unwrap() {
            Loaded::Found(cp) => assert_eq!(cp, sample()),
            other => panic!("{other:?}"),
        }
        let good = serde_json::to_vec(&sample()).unwrap();
        let cases: Vec<(Vec<u8>, DamageKind)> = vec![
            (Vec::new(), DamageKind::Empty),
            (b"  \n".to_vec(), DamageKind::Empty),
            (good[..good.len() / 2].to_vec(), DamageKind::Truncated),
            (b"\x00\x00\x00garbage".to_vec(), DamageKind::Corrupt),
            (
                br#"{"version":"vpc-cni-ipam/1","allocations":{}}"#.to_vec(),
                DamageKind::Corrupt,
            ),
            (
                br#"{"version":"vpc-cni-ipam/9"}"#.to_vec(),
                DamageKind::Version,
            ),
        ];
        for (i, (bytes, kind)) in cases.iter().enumerate() {
            fs::write(&path, bytes).unwrap();
            let Loaded::Damaged(d) = load_for_start(&path, 7).unwrap() else {
                panic!("case {i} not damaged")
            };
            assert_eq!(d.kind, *kind, "case {i}: {}", d.detail);
            let kept = d.kept.unwrap();
            assert_eq!(fs::read(&kept).unwrap(), *bytes, "case {i}: kept as it was");
            assert!(!path.exists(), "case {i}: moved, not copied");
        }
        // Six damaged files, none overwritten.
        assert_eq!(
            names_in(dir.path()),
            vec![
                "ipam.json.corrupt-7",
                "ipam.json.corrupt-7-1",
                "ipam.json.corrupt-7-2",
                "ipam.json.corrupt-7-3",
                "ipam.json.corrupt-7-4",
                "ipam.json.corrupt-7-5",
            ]
        );
    }

    #[test]
    fn an_unreadable_checkpoint_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading fails with EISDIR.
        let path = dir.path().join("ipam.json");
        fs::create_dir(&path).unwrap();
        let e = load_for_start(&path, 1).unwrap_err().to_string();
        assert!(e.contains("cannot read checkpoint"), "{e}");
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam.json");
        store(&path, &sample()).unwrap();
        // A full disk: the temporary file is /dev/full, whose writes fail with ENOSPC.
        let tmp = dir.path().join(".ipam.json.tmp");
        std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
        let e = store(&path, &Checkpoint::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ipam.json") && e.contains("No space left"),
            "{e}"
        );
        assert_eq!(load(&path).unwrap(), sample(), "the old file is intact");
        assert_eq!(names_in(dir.path()), vec!["ipam.json"]);
    }
}

/// Property ("fuzz") tests of reading a checkpoint file: 256 cases each in `cargo test`,
/// `PROPTEST_CASES=<n> cargo test -p agent fuzz_` for more (docs/testing.md).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use testkit::fuzz::{config, mutate};

    fn ipv4() -> impl Strategy<Value = Ipv4Addr> {
        any::<u32>().prop_map(Ipv4Addr::from)
    }

    fn allocation() -> impl Strategy<Value = AllocationRecord> {
        (
            ".{0,12}",
            ".{0,64}",
            ".{0,15}",
            ipv4(),
            any::<i64>(),
            ".{0,12}",
            ".{0,20}",
        )
            .prop_map(
                |(network_name, container_id, if_name, ipv4, ts, ns, name)| AllocationRecord {
                    network_name,
                    container_id,
                    if_name,
                    ipv4,
                    allocation_timestamp: ts,
                    metadata: AllocationMetadata {
                        k8s_pod_namespace: ns,
                        k8s_pod_name: name,
                        interfaces_count: 1,
                    },
                },
            )
    }

    fn intent() -> impl Strategy<Value = IntentRecord> {
        (
            ".{0,12}",
            prop_oneof![Just(IntentOp::Create), Just(IntentOp::Delete)],
            prop::option::of(".{0,21}"),
            prop::option::of(".{0,21}"),
            prop::option::of(any::<u32>()),
            any::<u64>(),
        )
            .prop_map(
                |(id, op, eni_id, attachment_id, device_index, started_ms)| IntentRecord {
                    id,
                    op,
                    eni_id,
                    attachment_id,
                    device_index,
                    started_ms,
                },
            )
    }

    fn checkpoint() -> impl Strategy<Value = Checkpoint> {
        (
            prop::collection::vec(allocation(), 0..6),
            prop::collection::vec(
                (ipv4(), any::<u64>())
                    .prop_map(|(ipv4, released_ms)| CooldownRecord { ipv4, released_ms }),
                0..4,
            ),
            prop::collection::vec(intent(), 0..3),
            prop::collection::vec(
                (".{0,21}", any::<u64>()).prop_map(|(id, created_ms)| EniRecord { id, created_ms }),
                0..3,
            ),
            prop::option::of(
                (
                    ".{0,12}",
                    any::<u32>(),
                    any::<u32>(),
                    any::<Option<bool>>(),
                    any::<Option<u32>>(),
                )
                    .prop_map(
                        |(instance_type, max_enis, ipv4_per_eni, prefix_capable, vcpus)| {
                            InstanceLimitsRecord {
                                instance_type,
                                max_enis,
                                ipv4_per_eni,
                                prefix_capable,
                                hypervisor: prefix_capable
                                    .map(|n| if n { "nitro" } else { "xen" }.into()),
                                vcpus,
                            }
                        },
                    ),
            ),
            prop::option::of(
                (any::<u64>(), any::<u64>(), prop::option::of(".{0,36}")).prop_map(
                    |(agent_ms, boot_ms, boot_id)| ClockRecord {
                        agent_ms,
                        boot_ms,
                        boot_id,
                    },
                ),
            ),
        )
            .prop_map(
                |(allocations, cooldowns, intents, enis, instance_limits, clock)| Checkpoint {
                    version: FORMAT_VERSION.into(),
                    allocations,
                    cooldowns,
                    intents,
                    enis,
                    instance_limits,
                    clock,
                },
            )
    }

    /// File contents: arbitrary bytes, white space, a real checkpoint with a few bytes
    /// changed, or nesting deeper than serde_json's recursion limit.
    fn contents() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            "[ \t\r\n]{0,8}".prop_map(String::into_bytes),
            (
                checkpoint(),
                prop::collection::vec((any::<usize>(), 0u8..3, any::<u8>()), 1..6)
            )
                .prop_map(|(cp, m)| mutate(serde_json::to_vec(&cp).unwrap(), &m)),
            (1usize..100_000, any::<bool>()).prop_map(|(depth, arrays)| {
                let open = if arrays { "[" } else { "{\"a\":" };
                format!(
                    r#"{{"version":"vpc-cni-ipam/1","allocations":[{{"metadata":{}"#,
                    open.repeat(depth)
                )
                .into_bytes()
            }),
        ]
    }

    proptest! {
        #![proptest_config(config(256))]

        /// Any file contents: a checkpoint of our format version, or damage of the right
        /// kind (never a panic, never a stack overflow).
        #[test]
        fn fuzz_checkpoint_any_bytes(bytes in contents()) {
            match parse_for_start(&bytes) {
                Ok(cp) => prop_assert_eq!(cp.version, FORMAT_VERSION),
                Err((kind, detail)) => {
                    prop_assert_eq!(
                        kind == DamageKind::Empty,
                        bytes.iter().all(u8::is_ascii_whitespace),
                        "{:?}: {}", kind, detail
                    );
                    prop_assert!(!detail.is_empty());
                }
            }
        }

        /// Every checkpoint reads back as it was written (compact, as `store` writes it, and
        /// pretty-printed as a person might leave it).
        #[test]
        fn fuzz_checkpoint_round_trips(cp in checkpoint()) {
            let compact = serde_json::to_vec(&cp).unwrap();
            prop_assert_eq!(parse_for_start(&compact).unwrap(), cp.clone());
            let pretty = serde_json::to_vec_pretty(&cp).unwrap();
            prop_assert_eq!(parse_for_start(&pretty).unwrap(), cp);
        }

        /// Every strict prefix of a checkpoint (a torn write) is empty or truncated, never
        /// taken for a checkpoint; another format version is refused naming it.
        #[test]
        fn fuzz_checkpoint_torn_or_foreign(
            cp in checkpoint(),
            cut in any::<usize>(),
            other in ".{0,16}",
        ) {
            let bytes = serde_json::to_vec(&cp).unwrap();
            let n = cut % bytes.len();
            let (kind, detail) = parse_for_start(&bytes[..n]).unwrap_err();
            let want = if n == 0 { DamageKind::Empty } else { DamageKind::Truncated };
            prop_assert_eq!(kind, want, "{} of {} bytes: {}", n, bytes.len(), detail);

            prop_assume!(other != FORMAT_VERSION);
            let foreign = Checkpoint { version: other.clone(), ..cp };
            let bytes = serde_json::to_vec(&foreign).unwrap();
            let (kind, detail) = parse_for_start(&bytes).unwrap_err();
            prop_assert_eq!(kind, DamageKind::Version);
            prop_assert!(detail.contains(&format!("{other:?}")), "{}", detail);
        }
    }
}
