//! The plugin socket against broken and hostile clients: the real server on a unix socket in a
//! temporary directory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ipam::{EniInfo, Pool};
use proto::{AttachmentKey, PodRef, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::*;

struct Harness {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    state: Arc<Mutex<State>>,
    counters: Arc<Counters>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn start(limits: Limits) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut pool = Pool::new(30_000);
    pool.add_eni(
        EniInfo {
            id: "eni-1".into(),
            device_number: 0,
            subnet: "10.0.0.0/24".parse().unwrap(),
            primary_ip: "10.0.0.4".parse().unwrap(),
        },
        &["10.0.0.10".parse().unwrap(), "10.0.0.11".parse().unwrap()],
    )
    .unwrap();
    let state = Arc::new(Mutex::new(State::new(
        pool,
        vec![],
        dir.path().join("ipam.json"),
        "hint".into(),
    )));
    let sock = dir.path().join("agent.sock");
    let listener = bind(&sock).unwrap();
    let counters = Arc::new(Counters::default());
    let server = tokio::spawn(serve_with(
        listener,
        state.clone(),
        counters.clone(),
        limits,
    ));
    Harness {
        _dir: dir,
        sock,
        state,
        counters,
        server,
    }
}

fn frame(req: &Request) -> Vec<u8> {
    proto::encode(req).unwrap()
}

/// Reads one response frame; `None` if the connection ends first.
async fn read_response(s: &mut UnixStream) -> Option<Response> {
    let len = s.read_u32().await.ok()? as usize;
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.ok()?;
    Some(proto::decode(&buf).expect("the agent's answer decodes"))
}

/// Sends `bytes` on a new connection and reads the answer (within 5 s). The write may fail:
/// the agent may answer and close before reading (a refusal).
async fn exchange(sock: &Path, bytes: &[u8]) -> Option<Response> {
    let mut s = UnixStream::connect(sock).await.unwrap();
    let _ = s.write_all(bytes).await;
    tokio::time::timeout(Duration::from_secs(5), read_response(&mut s))
        .await
        .expect("answered or closed within 5 s")
}

/// Sends `bytes` and hangs up its side; the answer, if any.
async fn hang_up(sock: &Path, bytes: &[u8]) -> Option<Response> {
    let mut s = UnixStream::connect(sock).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s.shutdown().await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), read_response(&mut s))
        .await
        .expect("closed at once, not at the deadline")
}

fn error_code(r: &Option<Response>) -> u32 {
    match r {
        Some(Response::Error { code, .. }) => *code,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A plugin's STATUS through the plugin's own (blocking) client; its latency.
async fn good_client(sock: &Path) -> (Response, Duration) {
    let sock = sock.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let r = proto::call(&sock, &Request::Status, t + Duration::from_secs(10)).unwrap();
        (r, t.elapsed())
    })
    .await
    .unwrap()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn garbage_and_oversized_frames_are_answered_and_counted() {
    let h = start(Limits::default());
    // Ten bytes of garbage in a well-formed frame.
    let mut g = 10u32.to_be_bytes().to_vec();
    g.extend_from_slice(b"\x00\xffnot json");
    assert_eq!(error_code(&exchange(&h.sock, &g).await), 6);
    // JSON, but no request.
    let mut j = br#"{"version":1,"op":"launch"}"#.to_vec();
    j.splice(0..0, (j.len() as u32).to_be_bytes());
    assert_eq!(error_code(&exchange(&h.sock, &j).await), 6);
    // Another protocol version.
    let mut v = br#"{"version":7,"op":"status"}"#.to_vec();
    v.splice(0..0, (v.len() as u32).to_be_bytes());
    assert_eq!(error_code(&exchange(&h.sock, &v).await), 1);
    // An HTTP client: "GET " is a length of 1.2 GB, refused from the prefix alone.
    let r = exchange(&h.sock, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(error_code(&r), 6);
    // A length of 4 GiB and no payload: answered at once, nothing allocated or awaited.
    let t = Instant::now();
    let r = exchange(&h.sock, &u32::MAX.to_be_bytes()).await;
    assert!(
        matches!(&r, Some(Response::Error { code: 6, message }) if message.contains("4294967295 bytes exceeds the limit of 262144")),
        "{r:?}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // Connect and hang up, or hang up mid-prefix / mid-payload.
    for bytes in [&b""[..], &b"\x00\x00"[..], &b"\x00\x00\x00\x20{\"ver"[..]] {
        assert_eq!(hang_up(&h.sock, bytes).await, None);
    }
    let c = &h.counters;
    wait_for("the hang-ups to be counted", || {
        c.rejected(Rejection::Incomplete) == 3
    })
    .await;
    assert_eq!(
        [
            c.rejected(Rejection::Malformed),
            c.rejected(Rejection::Version),
            c.rejected(Rejection::Oversized),
        ],
        [2, 1, 2]
    );
    // The agent serves as before.
    let (r, _) = good_client(&h.sock).await;
    assert!(matches!(r, Response::Status(_)), "{r:?}");
    let text = crate::http::render_metrics(&crate::http::Shared {
        state: h.state.clone(),
        counters: h.counters.clone(),
        ec2: None,
        limits: None,
    });
    assert!(
        text.lines()
            .any(|l| l == "vpccni_rejected_client_requests_total{reason=\"oversized\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn a_request_sent_one_byte_at_a_time_is_cut_at_the_deadline() {
    let limits = Limits {
        read_deadline: Duration::from_millis(800),
        ..Limits::default()
    };
    let h = start(limits);
    let bytes = frame(&Request::Status);
    // The trickle: one byte every 60 ms (the 31-byte frame would take 1.9 s).
    let sock = h.sock.clone();
    let trickle = tokio::spawn(async move {
        let t = Instant::now();
        let mut s = UnixStream::connect(&sock).await.unwrap();
        for b in &bytes {
            if s.write_all(std::slice::from_ref(b)).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        // Whatever the server said (its deadline error, or nothing), it has closed by now.
        let r = tokio::time::timeout(Duration::from_secs(2), read_response(&mut s)).await;
        (t.elapsed(), r)
    });
    // Meanwhile a good client is served at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (r, latency) = good_client(&h.sock).await;
    assert!(matches!(r, Response::Status(_)), "{r:?}");
    // Well inside the trickle's deadline: the good client did not wait for it.
    assert!(latency < Duration::from_millis(500), "{latency:?}");
    let (elapsed, r) = trickle.await.unwrap();
    assert!(r.is_ok(), "the slow client's connection was closed");
    if let Ok(Some(r)) = r {
        assert_eq!(error_code(&Some(r)), 11);
    }
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
    assert_eq!(h.counters.rejected(Rejection::Deadline), 1);
    // Slicing is no fault in itself: a frame in three pieces within the deadline is served.
    let bytes = frame(&Request::Status);
    let mut s = UnixStream::connect(&h.sock).await.unwrap();
    for part in [&bytes[..2], &bytes[2..9], &bytes[9..]] {
        s.write_all(part).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(
        read_response(&mut s).await,
        Some(Response::Status(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_stalled_connections_do_not_delay_a_good_client() {
    let h = start(Limits::default());
    let t = Instant::now();
    let mut idle = Vec::new();
    for i in 0..200 {
        let mut s = UnixStream::connect(&h.sock).await.unwrap();
        if i % 2 == 1 {
            // Half of them send two bytes of a length prefix and stall.
            s.write_all(&[0, 0]).await.unwrap();
        }
        idle.push(s);
    }
    let opened = t.elapsed();
    wait_for("the connection limit", || {
        h.counters.rejected(Rejection::Evicted) == 136
    })
    .await;
    assert!(h.counters.connections.load(Ordering::Relaxed) <= 64);
    // Ten plugins now, one after another: each is answered at once, every time.
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        let (r, latency) = good_client(&h.sock).await;
        assert!(matches!(r, Response::Status(_)), "{r:?}");
        worst = worst.max(latency);
    }
    eprintln!("200 stalled connections opened in {opened:?}; worst good-client latency {worst:?}");
    assert!(worst < Duration::from_millis(500), "{worst:?}");
    // The stalled ones that were never evicted run into the 2-s deadline; none lingers.
    wait_for("the stalled connections to be closed", || {
        h.counters.connections.load(Ordering::Relaxed) == 0
    })
    .await;
    let c = &h.counters;
    assert_eq!(
        c.rejected(Rejection::Evicted) + c.rejected(Rejection::Deadline),
        200,
        "each stalled connection was closed exactly once (evicted {}, deadline {})",
        c.rejected(Rejection::Evicted),
        c.rejected(Rejection::Deadline)
    );
    assert_eq!(c.rejected(Rejection::Busy), 0);
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_connection_is_being_answered_a_new_one_is_refused_at_once() {
    let limits = Limits {
        max_connections: 4,
        ..Limits::default()
    };
    let h = start(limits);
    // Something holds the state's lock (a slow request): the four requests wait on it.
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (locked_tx, locked) = std::sync::mpsc::channel::<()>();
    let state = h.state.clone();
    let holder = std::thread::spawn(move || {
        let _g = state.lock().unwrap();
        locked_tx.send(()).unwrap();
        held.recv().unwrap();
    });
    locked.recv().unwrap();
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let mut s = UnixStream::connect(&h.sock).await.unwrap();
        s.write_all(&frame(&Request::Status)).await.unwrap();
        waiting.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The fifth is refused with "try again later" at once, not queued.
    let t = Instant::now();
    let r = exchange(&h.sock, &frame(&Request::Status)).await;
    assert!(
        matches!(&r, Some(Response::Error { code: 11, message }) if message.contains("4 plugin connections open")),
        "{r:?}"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(h.counters.rejected(Rejection::Busy), 1);
    assert_eq!(
        h.counters.rejected(Rejection::Evicted),
        0,
        "none was evicted"
    );
    // The lock is free again: the four are answered.
    release.send(()).unwrap();
    holder.join().unwrap();
    for mut s in waiting {
        assert!(matches!(
            read_response(&mut s).await,
            Some(Response::Status(_))
        ));
    }
}

#[tokio::test]
async fn requests_still_change_the_state() {
    let h = start(Limits::default());
    let key = AttachmentKey {
        network: "vpc-cni".into(),
        container_id: "c1".into(),
        ifname: "eth0".into(),
    };
    let r = exchange(
        &h.sock,
        &frame(&Request::Add {
            key: key.clone(),
            pod: PodRef::default(),
            netns: "/x".into(),
        }),
    )
    .await;
    assert!(matches!(r, Some(Response::Added { .. })), "{r:?}");
    assert_eq!(h.counters.add.load(Ordering::Relaxed), 1);
    let r = exchange(&h.sock, &frame(&Request::Del { key })).await;
    assert!(
        matches!(r, Some(Response::Deleted { released: Some(_) })),
        "{r:?}"
    );
}

#[test]
fn eviction_takes_the_longest_waiting_client_never_one_being_answered() {
    let counters = Arc::new(Counters::default());
    let conns = Arc::new(Conns {
        open: Mutex::new(BTreeMap::new()),
        next: Mutex::new(0),
        counters: counters.clone(),
    });
    let yes = |a: Admitted| match a {
        Admitted::Yes { ticket, evicted } => (ticket, evicted),
        Admitted::Busy => panic!("busy"),
    };
    let (a, _) = yes(conns.admit(2));
    std::thread::sleep(Duration::from_millis(2));
    let (b, _) = yes(conns.admit(2));
    assert_eq!(counters.connections.load(Ordering::Relaxed), 2);
    // a is being answered; b waits on its client: b goes.
    assert!(a.waiting(false));
    let (c, evicted) = yes(conns.admit(2));
    assert!(evicted.is_some());
    assert!(!b.waiting(false), "b learns it was evicted");
    // a and c being answered: nothing to evict.
    assert!(c.waiting(false));
    assert!(matches!(conns.admit(2), Admitted::Busy));
    // c answered and gone: room again.
    drop(c);
    assert_eq!(counters.connections.load(Ordering::Relaxed), 1);
    let (_d, evicted) = yes(conns.admit(2));
    assert!(evicted.is_none());
    drop(a);
    drop(b);
    assert_eq!(counters.connections.load(Ordering::Relaxed), 1);
}

#[test]
fn refusals_are_logged_at_most_once_per_period() {
    let log = RateLimitedLog::new(Duration::from_secs(10));
    let t0 = Instant::now();
    assert_eq!(log.admit(Rejection::Oversized, t0), Some(0));
    assert_eq!(
        log.admit(Rejection::Oversized, t0 + Duration::from_secs(1)),
        None
    );
    assert_eq!(
        log.admit(Rejection::Oversized, t0 + Duration::from_secs(9)),
        None
    );
    assert_eq!(
        log.admit(Rejection::Deadline, t0 + Duration::from_secs(9)),
        Some(0),
        "per reason"
    );
    assert_eq!(
        log.admit(Rejection::Oversized, t0 + Duration::from_secs(10)),
        Some(2),
        "two not logged"
    );
}

#[test]
fn accept_errors_for_want_of_resources_do_not_stop_the_server() {
    let os = std::io::Error::from_raw_os_error;
    assert!(accept_error_is_transient(&os(libc::EMFILE)));
    assert!(accept_error_is_transient(&os(libc::ENFILE)));
    assert!(accept_error_is_transient(&os(libc::ECONNABORTED)));
    assert!(!accept_error_is_transient(&os(libc::EBADF)));
    assert!(!accept_error_is_transient(&os(libc::EINVAL)));
}
