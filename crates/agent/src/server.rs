//! The plugin socket: a unix stream socket, mode 0600, one request and one response per
//! connection (framing in the `proto` crate).
//!
//! A client that is broken or hostile costs a bounded amount of memory and time, and never
//! holds up another client's request ([`Limits`], defaults in brackets):
//! - the whole request frame must arrive within the read deadline [2 s], however it is sliced;
//! - the length prefix is checked against the frame limit [256 KiB: a GC listing ~2 000
//!   attachments] before anything is allocated, and the payload buffer grows only as bytes
//!   arrive; a longer frame is answered with code 6;
//! - at most `max_connections` [64] connections are open. At the limit a new connection makes
//!   room by closing the open one that has waited longest on its client (still sending its
//!   request, or not reading its answer); if every open connection is being answered, the new
//!   one is refused at once with code 11 (try again later). Nothing waits in a queue of ours,
//!   and no lock is held while a client is read or written;
//! - the answer must be taken within the write deadline [2 s];
//! - accept(2) failing for want of descriptors or memory pauses accepting for 100 ms; it does
//!   not stop the agent.
//!
//! Memory: at most `max_connections` × (`max_frame` + a task and a socket) — 64 × 256 KiB =
//! 16 MiB in the worst case, a few KiB per connection when clients send real requests.
//! Every refusal is counted in `vpccni_rejected_client_requests_total{reason}` and logged,
//! at most once per 10 s per reason with the number of refusals not logged.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::{ProtoError, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tracing::{debug, warn};

use crate::http::{Counters, Rejection};
use crate::state::State;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create socket directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: String },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
}

/// Binds the socket, replacing a stale socket file left by an earlier run.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let shown = path.display().to_string();
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|source| ServerError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            let _ = fs::remove_file(path);
        }
        Ok(_) => return Err(ServerError::NotASocket { path: shown }),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
        path: shown.clone(),
        source,
    })?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
        ServerError::Bind {
            path: shown,
            source,
        }
    })?;
    Ok(listener)
}

/// What one client may cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest request payload accepted (bytes, without the 4-byte prefix).
    pub max_frame: usize,
    /// Time for the whole request frame to arrive, from the accept.
    pub read_deadline: Duration,
    /// Time for the client to take the answer.
    pub write_deadline: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: proto::MAX_FRAME,
            read_deadline: Duration::from_secs(2),
            write_deadline: Duration::from_secs(2),
            max_connections: 64,
        }
    }
}

/// How often each kind of refusal is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Pause after accept(2) failed for want of resources.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves connections with the default [`Limits`] until the listener fails for good.
pub async fn serve(
    listener: UnixListener,
    state: Arc<Mutex<State>>,
    counters: Arc<Counters>,
) -> std::io::Result<()> {
    serve_with(listener, state, counters, Limits::default()).await
}

/// Serves connections until accept(2) fails with an error that is not transient.
pub async fn serve_with(
    listener: UnixListener,
    state: Arc<Mutex<State>>,
    counters: Arc<Counters>,
    limits: Limits,
) -> std::io::Result<()> {
    let log = Arc::new(RateLimitedLog::new(LOG_EVERY));
    let conns = Arc::new(Conns {
        open: Mutex::new(BTreeMap::new()),
        next: Mutex::new(0),
        counters: counters.clone(),
    });
    let busy = proto::encode(&Response::Error {
        code: crate::state::code::TRY_AGAIN_LATER,
        message: format!(
            "the vpc-cni agent has {} plugin connections open, all being answered; try again",
            limits.max_connections
        ),
    })
    .map_err(std::io::Error::other)?;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) if accept_error_is_transient(&e) => {
                counters.reject(Rejection::Accept);
                log.warn(Rejection::Accept, || {
                    format!("accepting a plugin connection failed: {e}; retrying")
                });
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        let ticket = match conns.admit(limits.max_connections) {
            Admitted::Yes { ticket, evicted } => {
                if let Some(waited) = evicted {
                    counters.reject(Rejection::Evicted);
                    log.warn(Rejection::Evicted, || {
                        format!(
                            "{} plugin connections open: closed the one that had waited {} ms on its client",
                            limits.max_connections,
                            waited.as_millis()
                        )
                    });
                }
                ticket
            }
            Admitted::Busy => {
                counters.reject(Rejection::Busy);
                log.warn(Rejection::Busy, || {
                    format!(
                        "{} plugin connections open, all being answered: refused a new one",
                        limits.max_connections
                    )
                });
                // Never blocks: a fresh connection's send buffer takes a short frame.
                let _ = stream.try_write(&busy);
                continue;
            }
        };
        let state = state.clone();
        let counters = counters.clone();
        let log = log.clone();
        tokio::spawn(async move {
            connection(stream, state, &counters, ticket, limits, &log).await;
        });
    }
}

/// accept(2) errors after which the listener still works.
fn accept_error_is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EINTR
                | libc::EAGAIN
                | libc::EPROTO
                | libc::EPERM
        )
    )
}

/// The open connections, for the connection limit.
struct Conns {
    open: Mutex<BTreeMap<u64, Slot>>,
    next: Mutex<u64>,
    counters: Arc<Counters>,
}

struct Slot {
    /// When the connection began waiting on its client (accept, or the answer's write).
    since: Instant,
    /// Waiting on its client (reading the request or writing the answer), not being answered.
    waiting: bool,
    evict: Arc<Notify>,
}

enum Admitted {
    /// `evicted`: how long the connection closed to make room had waited.
    Yes {
        ticket: Ticket,
        evicted: Option<Duration>,
    },
    Busy,
}

impl Conns {
    fn admit(self: &Arc<Self>, max: usize) -> Admitted {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let mut evicted = None;
        if open.len() >= max {
            let victim = open
                .iter()
                .filter(|(_, s)| s.waiting)
                .min_by_key(|(_, s)| s.since)
                .map(|(id, _)| *id);
            let Some(id) = victim else {
                return Admitted::Busy;
            };
            let slot = open.remove(&id).expect("found above");
            slot.evict.notify_one();
            evicted = Some(now.saturating_duration_since(slot.since));
        }
        let id = {
            let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
            *next += 1;
            *next
        };
        let evict = Arc::new(Notify::new());
        open.insert(
            id,
            Slot {
                since: now,
                waiting: true,
                evict: evict.clone(),
            },
        );
        self.counters
            .connections
            .store(open.len() as u64, Ordering::Relaxed);
        Admitted::Yes {
            ticket: Ticket {
                id,
                evict,
                conns: self.clone(),
            },
            evicted,
        }
    }
}

/// A connection's place in [`Conns`]; gives it up when dropped.
struct Ticket {
    id: u64,
    evict: Arc<Notify>,
    conns: Arc<Conns>,
}

impl Ticket {
    /// Marks the connection as waiting on its client (evictable) or not. False if it was
    /// evicted already: it must stop.
    fn waiting(&self, waiting: bool) -> bool {
        let mut open = self.conns.open.lock().unwrap_or_else(|p| p.into_inner());
        match open.get_mut(&self.id) {
            Some(s) => {
                s.waiting = waiting;
                s.since = Instant::now();
                true
            }
            None => false,
        }
    }

    /// Runs `f` unless and until the connection is evicted (`None`).
    async fn unless_evicted<T>(&self, f: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            _ = self.evict.notified() => None,
            v = f => Some(v),
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.conns.open.lock().unwrap_or_else(|p| p.into_inner());
        open.remove(&self.id);
        self.conns
            .counters
            .connections
            .store(open.len() as u64, Ordering::Relaxed);
    }
}

/// Why a request frame could not be read.
#[derive(Debug)]
enum ReadError {
    Oversized(usize),
    /// Closed or reset after `got` bytes.
    Incomplete {
        got: usize,
    },
}

/// Reads one request frame, allocating only what arrives (never more than `max`).
async fn read_request(stream: &mut UnixStream, max: usize) -> Result<Vec<u8>, ReadError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match stream.read(&mut len[got..]).await {
            Ok(0) | Err(_) => return Err(ReadError::Incomplete { got }),
            Ok(n) => got += n,
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(ReadError::Oversized(len));
    }
    let mut buf = Vec::with_capacity(len.min(8 << 10));
    let _ = (&mut *stream).take(len as u64).read_to_end(&mut buf).await;
    if buf.len() < len {
        return Err(ReadError::Incomplete { got: 4 + buf.len() });
    }
    Ok(buf)
}

async fn connection(
    mut stream: UnixStream,
    state: Arc<Mutex<State>>,
    counters: &Counters,
    ticket: Ticket,
    limits: Limits,
    log: &RateLimitedLog,
) {
    let refuse = |why: Rejection, msg: String| {
        counters.reject(why);
        log.warn(why, || msg);
    };
    let read = ticket
        .unless_evicted(tokio::time::timeout(
            limits.read_deadline,
            read_request(&mut stream, limits.max_frame),
        ))
        .await;
    let response = match read {
        None => return, // evicted: counted and logged by the accept loop
        Some(Err(_)) => {
            refuse(
                Rejection::Deadline,
                format!(
                    "a plugin client did not send its request within {} ms; closed",
                    limits.read_deadline.as_millis()
                ),
            );
            // Best effort, never blocking: a slow client may still read why.
            if let Ok(frame) = proto::encode(&Response::Error {
                code: crate::state::code::TRY_AGAIN_LATER,
                message: format!(
                    "request not received whole within {} ms",
                    limits.read_deadline.as_millis()
                ),
            }) {
                let _ = stream.try_write(&frame);
            }
            return;
        }
        Some(Ok(Err(ReadError::Incomplete { got }))) => {
            refuse(
                Rejection::Incomplete,
                format!("a plugin client closed the connection after {got} bytes of its request"),
            );
            return;
        }
        Some(Ok(Err(ReadError::Oversized(len)))) => {
            refuse(
                Rejection::Oversized,
                format!(
                    "a plugin client announced a request of {len} bytes (limit {}); refused unread",
                    limits.max_frame
                ),
            );
            Response::Error {
                code: 6,
                message: format!(
                    "request of {len} bytes exceeds the limit of {}",
                    limits.max_frame
                ),
            }
        }
        Some(Ok(Ok(payload))) => match proto::decode::<Request>(&payload) {
            Ok(req) => {
                if !ticket.waiting(false) {
                    return; // evicted just before being answered
                }
                answer(req, state, counters).await
            }
            Err(e @ ProtoError::Version { .. }) => {
                refuse(Rejection::Version, format!("plugin request refused: {e}"));
                Response::Error {
                    code: 1,
                    message: format!("{e}; install the vpc-cni plugin that ships with this agent"),
                }
            }
            Err(e) => {
                refuse(
                    Rejection::Malformed,
                    format!("undecodable plugin request ({} bytes): {e}", payload.len()),
                );
                Response::Error {
                    code: 6,
                    message: format!("cannot decode request: {e}"),
                }
            }
        },
    };
    let frame = match proto::encode(&response) {
        Ok(f) => f,
        Err(e) => {
            warn!("cannot encode the answer to a plugin: {e}");
            return;
        }
    };
    if !ticket.waiting(true) {
        return;
    }
    let write = async {
        stream.write_all(&frame).await?;
        stream.shutdown().await
    };
    match ticket
        .unless_evicted(tokio::time::timeout(limits.write_deadline, write))
        .await
    {
        None => {}
        Some(Err(_)) => refuse(
            Rejection::WriteDeadline,
            format!(
                "a plugin client did not take its answer within {} ms; closed",
                limits.write_deadline.as_millis()
            ),
        ),
        Some(Ok(Err(e))) => debug!("plugin connection ended before its answer was sent: {e}"),
        Some(Ok(Ok(()))) => {}
    }
}

/// Runs a decoded request against the state (on a blocking thread: the state's lock).
async fn answer(req: Request, state: Arc<Mutex<State>>, counters: &Counters) -> Response {
    match &req {
        Request::Add { .. } => counters.add.fetch_add(1, Ordering::Relaxed),
        Request::Del { .. } => counters.del.fetch_add(1, Ordering::Relaxed),
        _ => 0,
    };
    let is_add = matches!(req, Request::Add { .. });
    let resp = tokio::task::spawn_blocking(move || {
        state.lock().unwrap_or_else(|p| p.into_inner()).handle(req)
    })
    .await
    .unwrap_or_else(|e| Response::Error {
        code: 999,
        message: format!("agent request handler failed: {e}"),
    });
    if is_add && matches!(&resp, Response::Error { code: 11, .. }) {
        counters.no_address.fetch_add(1, Ordering::Relaxed);
    }
    resp
}

/// One warning per reason per period; the ones in between are counted and reported with the
/// next.
#[derive(Debug)]
struct RateLimitedLog {
    every: Duration,
    last: Mutex<BTreeMap<Rejection, (Instant, u64)>>,
}

impl RateLimitedLog {
    fn new(every: Duration) -> Self {
        RateLimitedLog {
            every,
            last: Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether to log a `why` now; if so, how many were suppressed since the last one.
    fn admit(&self, why: Rejection, now: Instant) -> Option<u64> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.get_mut(&why) {
            Some((at, suppressed)) if now.saturating_duration_since(*at) < self.every => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                last.insert(why, (now, 0));
                Some(0)
            }
        }
    }

    fn warn(&self, why: Rejection, msg: impl FnOnce() -> String) {
        if let Some(suppressed) = self.admit(why, Instant::now()) {
            let msg = msg();
            if suppressed > 0 {
                warn!(
                    reason = why.label(),
                    "{msg} ({suppressed} more like it in the last {} s not logged)",
                    self.every.as_secs()
                );
            } else {
                warn!(reason = why.label(), "{msg}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
