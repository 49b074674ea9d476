//! Messages between the `vpc-cni` plugin and `vpc-cni-agent`, and the framing that carries them.
//!
//! One request and one response per unix-socket connection. A frame is a 4-byte big-endian
//! length followed by that many bytes of JSON. The plugin side ([`call`]) is synchronous std
//! I/O so that the plugin links no async runtime; the agent reads and writes the same frames
//! with [`encode`] and [`decode`].
//!
//! [`call`] has one deadline for the whole conversation: the connect (which blocks while the
//! agent's listen backlog is full), every write and every read each wait at most for the
//! time left, so an agent that never accepts, never answers or answers one byte at a time
//! costs the caller no more than the deadline (give or take a millisecond: the waits are
//! poll(2)'s and short socket timeouts, not long socket timeouts, which the kernel rounds up
//! by as much as a quarter second).

use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, poll};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr, sockopt};
use nix::sys::time::TimeVal;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Bumped whenever a message changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 1;

/// Frames larger than this are refused, by the plugin before it sends and by the agent before
/// it allocates: a request is a few hundred bytes, but a GC lists every attachment of the node
/// (~110 bytes each; 256 KiB holds ~2 000).
pub const MAX_FRAME: usize = 256 << 10;

/// A poll(2) timeout for `left`: whole milliseconds rounded up, so a wait never wakes early and
/// never spins on a sub-millisecond remainder.
pub fn poll_timeout(left: std::time::Duration) -> nix::poll::PollTimeout {
    let ms = left.as_nanos().div_ceil(1_000_000);
    nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX)
}

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

/// The part of a [`call`] in which its deadline ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The deadline had passed before the call began: the agent was not contacted.
    Start,
    /// The agent did not accept the connection (its listen backlog is full).
    Connect,
    /// The agent did not read the request.
    Send,
    /// The agent did not answer (or not all of its answer arrived).
    Receive,
}

/// The text of [`ProtoError::Timeout`].
fn timeout_text(stage: &Stage, waited: &Duration) -> String {
    match stage {
        Stage::Start => {
            "the vpc-cni agent was not called: the call's deadline had already passed".into()
        }
        Stage::Connect => format!(
            "the vpc-cni agent did not accept the connection within {waited:.1?} (its listen \
             backlog is full: the agent is not accepting connections)"
        ),
        Stage::Send => format!("the vpc-cni agent did not read the request within {waited:.1?}"),
        Stage::Receive => format!("the vpc-cni agent did not answer within {waited:.1?}"),
    }
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
    /// The call's deadline ran out; `waited` is how long the call had been running.
    #[error("{}", timeout_text(stage, waited))]
    Timeout { stage: Stage, waited: Duration },
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

    /// The call's deadline ran out (the agent may or may not have acted on the request).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ProtoError::Timeout { .. })
    }

    /// The peer sent something the protocol does not allow: an oversized frame, malformed
    /// JSON, another protocol version.
    pub fn is_protocol_violation(&self) -> bool {
        matches!(
            self,
            ProtoError::TooLarge(_) | ProtoError::Json(_) | ProtoError::Version { .. }
        )
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

/// Send `req` to the agent at `socket` and wait for its response (plugin side), all of it
/// by `deadline`: the connect, each write and each read wait at most for the time left, so
/// the call returns by `deadline` (plus scheduling slack) whatever the peer does.
pub fn call(socket: &Path, req: &Request, deadline: Instant) -> Result<Response, ProtoError> {
    let clock = Clock {
        started: Instant::now(),
        deadline,
    };
    let frame = encode(req)?;
    clock.left(Stage::Start)?;
    let mut stream = connect(socket, &clock)?;
    write_all(&mut stream, &frame, &clock)?;
    let mut len = [0u8; 4];
    read_exact(&mut stream, &mut len, &clock)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    read_exact(&mut stream, &mut payload, &clock)?;
    decode(&payload)
}

/// When a [`call`] started and by when it must end.
#[derive(Debug, Clone, Copy)]
struct Clock {
    started: Instant,
    deadline: Instant,
}

impl Clock {
    /// The time left (never zero), or the timeout error of `stage`.
    fn left(&self, stage: Stage) -> Result<Duration, ProtoError> {
        let now = Instant::now();
        match self.deadline.checked_duration_since(now) {
            Some(left) if !left.is_zero() => Ok(left),
            _ => Err(ProtoError::Timeout {
                stage,
                waited: now.saturating_duration_since(self.started),
            }),
        }
    }
}

/// The longest single wait of a connect: the kernel rounds a long socket timeout up to a
/// coarse timer-wheel granule (a quarter second at 8 s), a short one only to a tick.
const CONNECT_SLICE: Duration = Duration::from_millis(50);

/// A connect bounded by the deadline. A unix stream connect blocks while the listener's
/// backlog is full, for at most the socket's send timeout (`SO_SNDTIMEO`), then fails with
/// `EAGAIN` (a non-blocking connect fails at once, and poll(2) cannot wait for room in the
/// backlog): so it waits in slices of [`CONNECT_SLICE`] until the deadline. The stream is
/// non-blocking afterwards: reads and writes wait in poll(2).
fn connect(path: &Path, clock: &Clock) -> Result<UnixStream, ProtoError> {
    let unreachable = |source: io::Error| ProtoError::Connect {
        path: path.display().to_string(),
        source,
    };
    let addr = UnixAddr::new(path).map_err(|e| unreachable(e.into()))?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io::Error::from)?;
    loop {
        let slice = clock.left(Stage::Connect)?.min(CONNECT_SLICE);
        socket::setsockopt(&fd, sockopt::SendTimeout, &timeval(slice)).map_err(io::Error::from)?;
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            // the backlog stayed full for the slice (or a signal came): look at the clock
            Err(Errno::EAGAIN | Errno::EINTR) => continue,
            Err(e) => return Err(unreachable(e.into())),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// `d` as a socket timeout; zero would mean "no timeout", so never less than 1 µs.
fn timeval(d: Duration) -> TimeVal {
    let d = d.max(Duration::from_micros(1));
    TimeVal::new(
        d.as_secs().try_into().unwrap_or(i64::MAX as _),
        d.subsec_micros() as _,
    )
}

/// Waits (poll(2), which keeps time precisely) until `stream` is ready for `events`, at most
/// until the deadline. Readiness includes hang-up and error: the next read or write says.
fn wait(
    stream: &UnixStream,
    events: PollFlags,
    clock: &Clock,
    stage: Stage,
) -> Result<(), ProtoError> {
    loop {
        let left = clock.left(stage)?;
        let mut fds = [PollFd::new(stream.as_fd(), events)];
        match poll(&mut fds, poll_timeout(left)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => return Ok(()),
            Err(e) => return Err(io::Error::from(e).into()),
        }
    }
}

/// Is this the end of a wait on a non-blocking socket (or a signal): wait again?
fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

fn write_all(stream: &mut UnixStream, mut buf: &[u8], clock: &Clock) -> Result<(), ProtoError> {
    while !buf.is_empty() {
        wait(stream, PollFlags::POLLOUT, clock, Stage::Send)?;
        match stream.write(buf) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if is_retry(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn read_exact(stream: &mut UnixStream, buf: &mut [u8], clock: &Clock) -> Result<(), ProtoError> {
    let mut got = 0;
    while got < buf.len() {
        wait(stream, PollFlags::POLLIN, clock, Stage::Receive)?;
        match stream.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the agent closed the connection after {got} of {} bytes",
                        buf.len()
                    ),
                )
                .into());
            }
            Ok(n) => got += n,
            Err(e) if is_retry(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
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

    /// A fresh temporary directory, removed on drop.
    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A socket path in a fresh temporary directory (kept while the guard lives).
    fn sock() -> (TempDir, std::path::PathBuf) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("proto-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("agent.sock");
        (TempDir(dir), path)
    }

    fn soon(ms: u64) -> Instant {
        Instant::now() + Duration::from_millis(ms)
    }

    /// Runs `call` with a deadline of `ms` and checks it returned within the deadline plus
    /// a generous margin (a bound, not a performance figure).
    fn timed_call(path: &Path, ms: u64) -> Result<Response, ProtoError> {
        let t = Instant::now();
        let r = call(path, &Request::Status, soon(ms));
        let took = t.elapsed();
        assert!(
            took < Duration::from_millis(ms + 1500),
            "call took {took:?} with a deadline of {ms} ms"
        );
        r
    }

    fn answer(conn: &mut UnixStream, resp: &Response) {
        let _ = read_frame(conn).unwrap();
        conn.write_all(&encode(resp).unwrap()).unwrap();
    }

    #[test]
    fn call_gets_the_answer() {
        let (_dir, path) = sock();
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let resp = Response::Error {
                code: 11,
                message: "later".into(),
            };
            answer(&mut c, &resp);
        });
        let r = timed_call(&path, 5000).unwrap();
        assert!(matches!(r, Response::Error { code: 11, .. }), "{r:?}");
        t.join().unwrap();
    }

    #[test]
    fn no_listener_is_unreachable() {
        let (_dir, path) = sock();
        let e = timed_call(&path, 1000).unwrap_err();
        assert!(e.is_unreachable(), "{e}");
        assert!(e.to_string().contains("agent.sock"), "{e}");
    }

    #[test]
    fn a_full_backlog_times_out_in_connect() {
        let (_dir, path) = sock();
        let l = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        socket::bind(l.as_fd().as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        socket::listen(&l, socket::Backlog::new(0).unwrap()).unwrap();
        // fill the backlog with connections nobody accepts
        let mut queued = Vec::new();
        for _ in 0..64 {
            let c = socket::socket(
                AddressFamily::Unix,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            match socket::connect(c.as_raw_fd(), &UnixAddr::new(&path).unwrap()) {
                Ok(()) => queued.push(c),
                Err(Errno::EAGAIN) => break,
                Err(e) => panic!("connect: {e}"),
            }
        }
        assert!(!queued.is_empty() && queued.len() < 64);
        let e = timed_call(&path, 400).unwrap_err();
        assert!(
            matches!(
                e,
                ProtoError::Timeout {
                    stage: Stage::Connect,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("backlog"), "{e}");
    }

    #[test]
    fn a_silent_agent_times_out() {
        let (_dir, path) = sock();
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (c, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_millis(700));
            drop(c);
        });
        let e = timed_call(&path, 300).unwrap_err();
        assert!(
            matches!(
                e,
                ProtoError::Timeout {
                    stage: Stage::Receive,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.is_timeout());
        t.join().unwrap();
    }

    #[test]
    fn a_trickling_agent_cannot_stretch_the_deadline() {
        // one byte every 50 ms of a valid answer: each read gets a byte, so only an overall
        // deadline (not a per-read timeout) ends the call
        let (_dir, path) = sock();
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let _ = read_frame(&mut c).unwrap();
            let frame = encode(&Response::Error {
                code: 11,
                message: "x".repeat(100),
            })
            .unwrap();
            for b in frame {
                if c.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let e = timed_call(&path, 500).unwrap_err();
        assert!(
            matches!(
                e,
                ProtoError::Timeout {
                    stage: Stage::Receive,
                    ..
                }
            ),
            "{e}"
        );
        t.join().unwrap();
    }

    #[test]
    fn a_hang_up_and_an_oversized_answer_are_named() {
        let (_dir, path) = sock();
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let _ = read_frame(&mut c).unwrap();
            drop(c);
            let (mut c, _) = l.accept().unwrap();
            let _ = read_frame(&mut c).unwrap();
            c.write_all(&u32::MAX.to_be_bytes()).unwrap();
        });
        let e = timed_call(&path, 5000).unwrap_err();
        assert!(e.to_string().contains("closed the connection"), "{e}");
        let e = timed_call(&path, 5000).unwrap_err();
        assert!(matches!(e, ProtoError::TooLarge(_)), "{e}");
        assert!(e.is_protocol_violation());
        t.join().unwrap();
    }

    #[test]
    fn a_passed_deadline_fails_without_waiting() {
        let (_dir, path) = sock();
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let e = call(&path, &Request::Status, Instant::now()).unwrap_err();
        assert!(
            matches!(
                e,
                ProtoError::Timeout {
                    stage: Stage::Start,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("not called"), "{e}");
    }

    #[test]
    fn timevals_are_never_zero() {
        assert_eq!(timeval(Duration::ZERO), TimeVal::new(0, 1));
        assert_eq!(timeval(Duration::from_nanos(10)), TimeVal::new(0, 1));
        assert_eq!(
            timeval(Duration::from_millis(2500)),
            TimeVal::new(2, 500_000)
        );
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
