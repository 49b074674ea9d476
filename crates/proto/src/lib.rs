//! Messages between the `vpc-cni` plugin and `vpc-cni-agent`, and the framing that carries them.
//!
//! One request and one response per unix-socket connection. A frame is a 4-byte big-endian
//! length followed by that many bytes of JSON. The plugin side ([`call`]) is synchronous std
//! I/O so that the plugin links no async runtime; the agent reads and writes the same frames
//! with [`encode`] and [`decode`].

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Bumped whenever a message changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 1;

/// Frames larger than this are refused (a request is a few hundred bytes).
pub const MAX_FRAME: usize = 4 << 20;

/// The default socket path on a node.
pub const DEFAULT_SOCKET: &str = "/run/vpc-cni/agent.sock";

/// What a pod attachment is known by: the CNI spec's (network name, container id, ifname).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttachmentKey {
    pub network: String,
    pub container_id: String,
    pub ifname: String,
}

impl std::fmt::Display for AttachmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.network, self.container_id, self.ifname)
    }
}

/// Kubernetes identity of the pod, from `CNI_ARGS`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infra_container_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Allocate (or return the existing) address for an attachment.
    Add {
        key: AttachmentKey,
        pod: PodRef,
        netns: String,
    },
    /// Release the attachment's address. Unknown attachments are not an error.
    Del { key: AttachmentKey },
    /// Is this attachment allocated, and to which address?
    Check { key: AttachmentKey },
    /// Is the agent ready to serve ADD?
    Status,
    /// Release every attachment of `network` that is not listed in `valid`.
    Gc {
        network: String,
        valid: Vec<AttachmentKey>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub version: u32,
    #[serde(flatten)]
    pub body: T,
}

/// Where an address lives and how the plugin must route it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    pub eni_id: String,
    /// Device number (index) of the owning ENI; 0 is the primary ENI.
    pub device_number: u32,
    /// Route table that pod-originated traffic must use, as the agent computed it from
    /// `device_number` with `dataplane::route_table_for_device` (the one home of that
    /// numbering: 254, main, for the primary ENI, device number + 1 otherwise).
    pub route_table: u32,
    /// The owning ENI's subnet.
    pub subnet: Ipv4Net,
    /// The VPC CIDRs (for the CNI result and for SNAT decisions).
    pub vpc_cidrs: Vec<Ipv4Net>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    pub ready: bool,
    pub message: String,
    pub free_ips: u32,
    pub assigned_ips: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// `existing` is true when the attachment already held this address before the request
    /// (a repeated ADD): a failed ADD must then not release it.
    Added {
        allocation: Allocation,
        #[serde(default)]
        existing: bool,
    },
    /// `released` is the address that was freed, if the attachment was known.
    Deleted {
        released: Option<Allocation>,
    },
    Checked {
        allocation: Allocation,
    },
    Status(StatusReply),
    Collected {
        released: Vec<(AttachmentKey, Ipv4Addr)>,
    },
    /// `code` uses the CNI spec's error codes (e.g. 3 unknown container, 11 try again later).
    Error {
        code: u32,
        message: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error(
        "cannot connect to the vpc-cni agent at {path}: {source} (is vpc-cni-agent running on this node?)"
    )]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("i/o with the vpc-cni agent failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("protocol version mismatch: peer speaks {peer}, we speak {PROTOCOL_VERSION}")]
    Version { peer: u32 },
}

impl ProtoError {
    /// The agent could not be reached at all (as opposed to failing mid-conversation).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ProtoError::Connect { .. })
    }
}

/// Serialise one message as a frame.
pub fn encode<T: Serialize>(body: &T) -> Result<Vec<u8>, ProtoError> {
    let env = Envelope {
        version: PROTOCOL_VERSION,
        body,
    };
    let json = serde_json::to_vec(&env)?;
    if json.len() > MAX_FRAME {
        return Err(ProtoError::TooLarge(json.len()));
    }
    let mut out = Vec::with_capacity(json.len() + 4);
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Parse the JSON payload of a frame (without its length prefix), checking the version.
pub fn decode<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, ProtoError> {
    #[derive(Deserialize)]
    struct VersionOnly {
        version: u32,
    }
    let v: VersionOnly = serde_json::from_slice(payload)?;
    if v.version != PROTOCOL_VERSION {
        return Err(ProtoError::Version { peer: v.version });
    }
    let env: Envelope<T> = serde_json::from_slice(payload)?;
    Ok(env.body)
}

/// Read one frame's payload from a blocking reader.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Vec<u8>, ProtoError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// Send `req` to the agent at `socket` and wait for its response (plugin side).
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response, ProtoError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ProtoError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(&encode(req)?)?;
    let payload = read_frame(&mut stream)?;
    decode(&payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AttachmentKey {
        AttachmentKey {
            network: "vpc-cni".into(),
            container_id: "abc".into(),
            ifname: "eth0".into(),
        }
    }

    #[test]
    fn request_round_trips_through_a_frame() {
        let req = Request::Add {
            key: key(),
            pod: PodRef {
                namespace: "default".into(),
                name: "web".into(),
                infra_container_id: None,
            },
            netns: "/run/netns/x".into(),
        };
        let frame = encode(&req).unwrap();
        let payload = read_frame(&mut &frame[..]).unwrap();
        let back: Request = decode(&payload).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn wrong_version_is_named() {
        let payload = br#"{"version":99,"op":"status"}"#;
        let err = decode::<Request>(payload).unwrap_err();
        assert!(err.to_string().contains("99"), "{err}");
    }

    #[test]
    fn oversized_frame_is_refused() {
        let mut frame = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(b"{}");
        assert!(matches!(
            read_frame(&mut &frame[..]),
            Err(ProtoError::TooLarge(_))
        ));
    }

    #[test]
    fn response_json_shape_is_stable() {
        let r = Response::Error {
            code: 11,
            message: "no free address".into(),
        };
        let frame = encode(&r).unwrap();
        let text = std::str::from_utf8(&frame[4..]).unwrap();
        assert_eq!(
            text,
            r#"{"version":1,"result":"error","code":11,"message":"no free address"}"#
        );
    }
}
