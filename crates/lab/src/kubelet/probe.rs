//! Kubelet's container probes and restart back-off, as pure state machines the lab's kubelet
//! loop drives with the current time (`pkg/kubelet/prober/worker.go` and the container
//! back-off of `pkg/kubelet/kuberuntime`), plus the HTTP GET an `httpGet` probe makes.
//!
//! A probe worker is made when the kubelet takes the pod on (kubelet's probe manager adds
//! one per container and probe when the pod is admitted), before its containers run: it ticks
//! every `periodSeconds` from then on (after a random part of a period when kubelet itself
//! started less than a period ago; ticks missed while a probe runs are dropped, as with Go's
//! ticker). A tick probes only while the container runs and `initialDelaySeconds` have passed
//! since it started. A result changes the reported result only after `failureThreshold`
//! failures or `successThreshold` successes in a row. A new container starts from the initial
//! result: failed (not ready) for readiness, passed for liveness. A liveness failure puts the
//! worker on hold: the kubelet kills the container, and the worker resumes with the next one.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Liveness,
    Readiness,
}

/// An `httpGet` probe with kubelet's defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub kind: Kind,
    /// The address probed: the pod's IP, which for a host-network pod is the node's.
    pub host: String,
    pub port: u16,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Spec {
    /// `http://host:port/path`, for messages.
    pub fn url(&self) -> String {
        format!("http://{}:{}{}", self.host, self.port, self.path)
    }
}

/// What one probe saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub ok: bool,
    /// The HTTP status, when an answer came.
    pub code: Option<u16>,
    /// The first line of the body, or why there was no answer.
    pub message: String,
    pub took_ms: u64,
}

/// What the kubelet must do after a probe's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The reported result is unchanged.
    None,
    /// The reported result became `ok`.
    Reported(bool),
    /// Liveness failed `failureThreshold` times in a row: kill and restart the container.
    Restart,
}

/// One probe of one container.
#[derive(Debug, Clone)]
pub struct Worker {
    pub spec: Spec,
    next_tick: Instant,
    /// When the container running now started; `None` while none runs.
    container: Option<Instant>,
    last: Option<bool>,
    run: u32,
    reported: bool,
    on_hold: bool,
    /// Probes made and those that failed.
    pub probes: u64,
    pub failures: u64,
}

impl Worker {
    /// A worker for a pod taken on at `created`: it first ticks after `first_delay`, then every
    /// period.
    pub fn new(spec: Spec, created: Instant, first_delay: Duration) -> Worker {
        Worker {
            reported: Worker::initial(spec.kind),
            spec,
            next_tick: created + first_delay,
            container: None,
            last: None,
            run: 0,
            on_hold: false,
            probes: 0,
            failures: 0,
        }
    }

    fn initial(kind: Kind) -> bool {
        kind == Kind::Liveness
    }

    /// A new container started at `at`: the reported result is the initial one again, and a
    /// worker on hold resumes.
    pub fn container_started(&mut self, at: Instant) {
        self.container = Some(at);
        self.reported = Worker::initial(self.spec.kind);
        self.on_hold = false;
    }

    /// The container exited or was killed: nothing to probe until the next one.
    pub fn container_stopped(&mut self) {
        self.container = None;
    }

    /// The result the kubelet acts on: ready (readiness), alive (liveness).
    pub fn reported(&self) -> bool {
        self.reported
    }

    /// The result of the last probe and how many in a row were that.
    pub fn last(&self) -> Option<(bool, u32)> {
        self.last.map(|l| (l, self.run))
    }

    /// Whether a probe is to be made at `now`. Consumes the tick(s) due: the next is a whole
    /// number of periods after the first. A tick probes only a running container past its
    /// initial delay, and none while on hold.
    pub fn tick(&mut self, now: Instant) -> bool {
        if now < self.next_tick {
            return false;
        }
        let period = self.spec.period.max(Duration::from_millis(1));
        let behind = now.duration_since(self.next_tick);
        let skipped = (behind.as_nanos() / period.as_nanos()) as u32;
        self.next_tick += period * (skipped + 1);
        match self.container {
            Some(started) if !self.on_hold => {
                now.duration_since(started) >= self.spec.initial_delay
            }
            _ => false,
        }
    }

    /// When the next tick is due.
    pub fn next_tick(&self) -> Instant {
        self.next_tick
    }

    /// Records a probe's result; returns what the kubelet must do.
    pub fn observe(&mut self, ok: bool) -> Change {
        if self.on_hold {
            return Change::None;
        }
        self.probes += 1;
        if !ok {
            self.failures += 1;
        }
        if self.last == Some(ok) {
            self.run = self.run.saturating_add(1);
        } else {
            self.last = Some(ok);
            self.run = 1;
        }
        let threshold = if ok {
            self.spec.success_threshold
        } else {
            self.spec.failure_threshold
        };
        if self.run < threshold.max(1) {
            return Change::None;
        }
        if self.spec.kind == Kind::Liveness && !ok {
            self.reported = false;
            self.on_hold = true;
            self.run = 0;
            return Change::Restart;
        }
        if self.reported == ok {
            return Change::None;
        }
        self.reported = ok;
        Change::Reported(ok)
    }
}

/// Kubelet's restart back-off of one container (`CrashLoopBackOff`): a container that exits
/// for the first time is started again at once; each later exit waits 10 s, doubling up to
/// 5 min after each restart, and an exit more than 10 min after the previous restart starts
/// over at once (`flowcontrol.Backoff` with kubelet's 10 s and 300 s).
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    /// The back-off and the exit it was last advanced for.
    entry: Option<(Duration, Instant)>,
}

pub const BACKOFF_INITIAL: Duration = Duration::from_secs(10);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

impl Backoff {
    fn live(&self, finished: Instant) -> Option<Duration> {
        self.entry.and_then(|(b, last)| {
            (finished.saturating_duration_since(last) <= 2 * BACKOFF_MAX).then_some(b)
        })
    }

    /// When a container that exited at `finished` may be started again.
    pub fn earliest_restart(&self, finished: Instant) -> Instant {
        finished + self.live(finished).unwrap_or(Duration::ZERO)
    }

    /// Records that the container which exited at `finished` is being started again.
    pub fn restarted(&mut self, finished: Instant) {
        let next = match self.live(finished) {
            Some(b) => (b * 2).min(BACKOFF_MAX),
            None => BACKOFF_INITIAL,
        };
        self.entry = Some((next, finished));
    }
}

/// Kubelet's `httpGet` probe: a GET with its headers (`User-Agent: kube-probe/<minor>`,
/// `Accept: */*`, `Connection: close`) within `spec.timeout`; success is an answer with status
/// 200–399. Connects from this process's network namespace (the lab's kubelet runs in the
/// instance's, the node's).
pub async fn http_get(spec: &Spec) -> Outcome {
    let t = Instant::now();
    let r = tokio::time::timeout(spec.timeout, get(spec)).await;
    let took_ms = t.elapsed().as_millis() as u64;
    match r {
        Ok(Ok((code, body))) => Outcome {
            ok: (200..400).contains(&code),
            code: Some(code),
            message: first_line(&body),
            took_ms,
        },
        Ok(Err(e)) => Outcome {
            ok: false,
            code: None,
            message: format!("GET {}: {e}", spec.url()),
            took_ms,
        },
        Err(_) => Outcome {
            ok: false,
            code: None,
            message: format!(
                "GET {}: no answer within {:?} (timeoutSeconds)",
                spec.url(),
                spec.timeout
            ),
            took_ms,
        },
    }
}

/// The probe's User-Agent: kubelet sends `kube-probe/<major>.<minor>`; the lab's models 1.33.
const USER_AGENT: &str = "kube-probe/1.33";
/// Kubelet reads at most this much of a probe's body.
const MAX_BODY: usize = 10 * 1024;

/// The request an `httpGet` probe sends.
pub fn request(spec: &Spec) -> String {
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}:{}\r\n",
        spec.path, spec.host, spec.port
    );
    let has = |name: &str| {
        spec.headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(name))
    };
    for (k, v) in &spec.headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has("User-Agent") {
        req.push_str(&format!("User-Agent: {USER_AGENT}\r\n"));
    }
    if !has("Accept") {
        req.push_str("Accept: */*\r\n");
    }
    req.push_str("Connection: close\r\n\r\n");
    req
}

async fn get(spec: &Spec) -> std::io::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect((spec.host.as_str(), spec.port)).await?;
    s.write_all(request(spec).as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_BODY + 4096 {
            break;
        }
    }
    parse_response(&buf)
}

/// The status code and body of an HTTP/1.x response (the body as sent: the agent answers
/// with a Content-Length, not chunked).
pub fn parse_response(buf: &[u8]) -> std::io::Result<(u16, String)> {
    let text = String::from_utf8_lossy(buf);
    let bad = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not an HTTP response: {:?}", first_line(&text)),
        )
    };
    let status = text.lines().next().ok_or_else(bad)?;
    let mut parts = status.split_whitespace();
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(bad());
    }
    let code = parts
        .next()
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(bad)?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.chars().take(MAX_BODY).collect())
        .unwrap_or_default();
    Ok((code, body))
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: Kind, initial: u64, period: u64, failure: u32) -> Spec {
        Spec {
            kind,
            host: "127.0.0.1".into(),
            port: 61678,
            path: "/livez".into(),
            headers: vec![],
            initial_delay: Duration::from_secs(initial),
            period: Duration::from_secs(period),
            timeout: Duration::from_secs(5),
            success_threshold: 1,
            failure_threshold: failure,
        }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// A worker whose pod was taken on at `t0`, its container running since `t0`.
    fn running(spec: Spec, t0: Instant) -> Worker {
        let mut w = Worker::new(spec, t0, Duration::ZERO);
        w.container_started(t0);
        w
    }

    /// The manifest's liveness probe (initialDelaySeconds 60, periodSeconds 10,
    /// failureThreshold 6) against an agent that never answers: nothing is probed for 60 s,
    /// then six failures 10 s apart, and the sixth (at 110 s) restarts the container; the
    /// worker holds until the next container starts, and its initial delay counts from then.
    #[test]
    fn liveness_waits_the_initial_delay_then_restarts_after_the_threshold() {
        let t0 = Instant::now();
        let mut w = running(spec(Kind::Liveness, 60, 10, 6), t0);
        assert!(w.reported(), "alive until proven otherwise");
        let mut probed_at = Vec::new();
        let mut restart_at = None;
        for sec in 0..=130 {
            let now = t0 + s(sec);
            if w.tick(now) {
                probed_at.push(sec);
                if w.observe(false) == Change::Restart {
                    restart_at = Some(sec);
                }
            }
        }
        assert_eq!(probed_at, vec![60, 70, 80, 90, 100, 110]);
        assert_eq!(restart_at, Some(110));
        assert!(!w.reported());
        assert_eq!((w.probes, w.failures), (6, 6));
        // Killed at 120 s (the grace period), the next container started at 121 s: alive
        // again, and probed once 60 s have passed since, on the worker's 10 s grid: 190 s.
        w.container_stopped();
        w.container_started(t0 + s(121));
        assert!(w.reported());
        let probed: Vec<u64> = (131..=200).filter(|sec| w.tick(t0 + s(*sec))).collect();
        assert_eq!(probed, vec![190, 200]);
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut w = running(spec(Kind::Liveness, 0, 10, 3), t0);
        for ok in [false, false, true, false, false] {
            assert!(w.tick(t0 + s(w.probes * 10)));
            assert_eq!(w.observe(ok), Change::None);
        }
        assert_eq!(w.last(), Some((false, 2)));
        assert!(w.tick(t0 + s(50)));
        assert_eq!(w.observe(false), Change::Restart);
    }

    /// The manifest's readiness probe (periodSeconds 5, failureThreshold 3): not ready until
    /// the first success; then ready through two failures, not ready at the third.
    #[test]
    fn readiness_is_reported_on_success_and_lost_after_the_threshold() {
        let t0 = Instant::now();
        let mut w = running(spec(Kind::Readiness, 0, 5, 3), t0);
        assert!(!w.reported());
        assert!(w.tick(t0), "probes at once");
        assert_eq!(w.observe(false), Change::None);
        assert!(!w.tick(t0 + s(4)));
        assert!(w.tick(t0 + s(5)));
        assert_eq!(w.observe(true), Change::Reported(true));
        assert!(w.reported());
        for k in [10, 15] {
            assert!(w.tick(t0 + s(k)));
            assert_eq!(w.observe(false), Change::None, "still ready at {k} s");
        }
        assert!(w.tick(t0 + s(20)));
        assert_eq!(w.observe(false), Change::Reported(false));
        assert!(w.tick(t0 + s(25)));
        assert_eq!(w.observe(true), Change::Reported(true));
        // A new container: not ready until its first success.
        w.container_stopped();
        assert!(!w.tick(t0 + s(30)), "no container, no probe");
        w.container_started(t0 + s(31));
        assert!(!w.reported());
        assert!(w.tick(t0 + s(35)));
    }

    /// The grid starts when the pod is taken on, not when the container starts: a container
    /// that runs from 1.3 s on is first probed at the 5 s tick; with kubelet's first delay the
    /// grid is shifted by it.
    #[test]
    fn ticks_run_from_the_pod_not_the_container() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut w = Worker::new(spec(Kind::Readiness, 0, 5, 3), t0, Duration::ZERO);
        assert!(!w.tick(t0), "no container yet");
        w.container_started(t0 + ms(1300));
        assert!(!w.tick(t0 + ms(1300)));
        assert!(!w.tick(t0 + ms(4999)));
        assert!(w.tick(t0 + s(5)));
        let mut w = Worker::new(spec(Kind::Readiness, 0, 5, 3), t0, ms(2500));
        w.container_started(t0);
        assert!(!w.tick(t0 + ms(2499)));
        assert!(w.tick(t0 + ms(2500)));
        assert_eq!(w.next_tick(), t0 + ms(7500));
    }

    #[test]
    fn ticks_stay_on_the_period_grid_and_missed_ones_are_dropped() {
        let t0 = Instant::now();
        let mut w = running(spec(Kind::Readiness, 0, 5, 3), t0);
        assert!(w.tick(t0 + Duration::from_millis(10)));
        assert_eq!(w.next_tick(), t0 + s(5));
        // A probe that took 12 s: the ticks at 5 and 10 s were missed; one probe at 12 s.
        assert!(w.tick(t0 + s(12)));
        assert!(!w.tick(t0 + s(13)));
        assert_eq!(w.next_tick(), t0 + s(15));
    }

    #[test]
    fn success_threshold_is_honoured() {
        let t0 = Instant::now();
        let mut sp = spec(Kind::Readiness, 0, 1, 1);
        sp.success_threshold = 2;
        let mut w = running(sp, t0);
        assert_eq!(w.observe(true), Change::None);
        assert_eq!(w.observe(true), Change::Reported(true));
        assert_eq!(w.observe(false), Change::Reported(false));
    }

    #[test]
    fn backoff_restarts_at_once_then_doubles_and_resets_after_quiet() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        // Exit 1 at 0 s: at once.
        assert_eq!(b.earliest_restart(t0), t0);
        b.restarted(t0);
        // Exit 2 at 1 s: 10 s later; exit 3: 20 s; then 40, 80, 160, 300, 300.
        let mut t = t0 + s(1);
        for wait in [10, 20, 40, 80, 160, 300, 300] {
            assert_eq!(b.earliest_restart(t), t + s(wait), "exit at {t:?}");
            b.restarted(t);
            t += s(wait + 1);
        }
        // An exit more than 10 min after the last restart: at once again.
        let later = t + s(601);
        assert_eq!(b.earliest_restart(later), later);
        b.restarted(later);
        assert_eq!(b.earliest_restart(later + s(5)), later + s(15));
    }

    #[test]
    fn the_request_carries_kubelets_headers() {
        let mut sp = spec(Kind::Readiness, 0, 5, 3);
        sp.host = "172.31.15.228".into();
        sp.path = "/readyz".into();
        let r = request(&sp);
        assert!(r.starts_with("GET /readyz HTTP/1.1\r\nHost: 172.31.15.228:61678\r\n"));
        assert!(r.contains("User-Agent: kube-probe/1.33\r\n"));
        assert!(r.contains("Accept: */*\r\n"));
        assert!(r.ends_with("Connection: close\r\n\r\n"));
        sp.headers = vec![("User-Agent".into(), "mine".into())];
        let r = request(&sp);
        assert!(r.contains("User-Agent: mine\r\n") && !r.contains("kube-probe"));
    }

    #[test]
    fn responses_are_parsed() {
        let (code, body) =
            parse_response(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 20\r\n\r\nnot ready: no conflist\n")
                .unwrap();
        assert_eq!((code, body.as_str()), (503, "not ready: no conflist\n"));
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_response(b"").is_err());
    }

    /// The probe against a listener on loopback: 200 passes, 503 fails with its body, a
    /// closed port fails, a silent server times out.
    #[tokio::test]
    async fn http_get_judges_answers_refusals_and_silence() {
        async fn serve(answer: &'static str) -> u16 {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            tokio::spawn(async move {
                loop {
                    let (mut c, _) = l.accept().await.unwrap();
                    let mut buf = [0u8; 1024];
                    let _ = c.read(&mut buf).await;
                    if !answer.is_empty() {
                        let _ = c.write_all(answer.as_bytes()).await;
                    } else {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                }
            });
            port
        }
        let mut sp = spec(Kind::Readiness, 0, 5, 3);
        sp.timeout = Duration::from_millis(300);
        sp.port = serve("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n").await;
        let o = http_get(&sp).await;
        assert!(o.ok && o.code == Some(200) && o.message == "ok", "{o:?}");
        sp.port =
            serve("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 9\r\n\r\nnot yet\n").await;
        let o = http_get(&sp).await;
        assert!(
            !o.ok && o.code == Some(503) && o.message == "not yet",
            "{o:?}"
        );
        sp.port = serve("").await;
        let o = http_get(&sp).await;
        assert!(
            !o.ok && o.code.is_none() && o.message.contains("timeoutSeconds"),
            "{o:?}"
        );
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        sp.port = closed.local_addr().unwrap().port();
        drop(closed);
        let o = http_get(&sp).await;
        assert!(!o.ok && o.code.is_none(), "{o:?}");
    }
}
