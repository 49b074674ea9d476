//! The plugin binary against a hostile runtime, hostile files and hostile agents: whatever
//! they do, every call ends within its deadline (10 s, STATUS 3 s) with exactly one JSON
//! object on stdout (or nothing, for a DEL that succeeds) and the documented code. Times are
//! measured and printed, but only bounds are asserted (deadline + a margin for a loaded
//! machine), never performance figures.
//!
//! No root needed: ADD's namespace is `ip netns add` as root, else `unshare -rn`'s; a DEL,
//! which tears down in the namespace it runs in, runs under `unshare -rn`. The root
//! namespace's network is never touched. The slow cases (those that wait for the deadline)
//! run in parallel threads of one test, so they cost about one deadline together.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{BIN, Foreign, Run};
use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use proto::{Request, Response};
use serde_json::{Value, json};

/// ADD, DEL, CHECK, GC: 10 s budget, plus a margin for a loaded machine.
const CALL_BOUND: Duration = Duration::from_secs(12);
/// STATUS: 3 s budget, plus a margin.
const STATUS_BOUND: Duration = Duration::from_secs(4);
/// What a call that does not wait for anything gets.
const QUICK_BOUND: Duration = Duration::from_secs(3);
/// A run still going after this is killed and the test fails (it would hang otherwise).
const WATCHDOG: Duration = Duration::from_secs(40);

const NO_AGENT: &str = "/nonexistent/vpc-cni-test/agent.sock";

fn conf(version: &str, socket: &str, extra: Value) -> Vec<u8> {
    let mut c = json!({
        "cniVersion": version, "name": "vpc-cni", "type": "vpc-cni",
        "agentSocket": socket
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    serde_json::to_vec(&c).unwrap()
}

fn env(cmd: &str, netns: &str) -> Vec<(String, String)> {
    [
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", "hostile-1"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=hostile",
        ),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// How the runtime behaves towards the plugin.
#[derive(Default)]
struct Runtime {
    env: Vec<(String, String)>,
    stdin: Vec<u8>,
    /// Write `stdin` but never close it (until the plugin has exited).
    hold_stdin: bool,
    /// Never read the plugin's stderr while it runs.
    ignore_stderr: bool,
    /// Run the plugin in a network namespace of its own (`unshare -rn`).
    own_netns: bool,
    cwd: Option<PathBuf>,
}

/// Runs the plugin as `rt` says; returns what it produced and how long it took.
fn run(rt: Runtime) -> (Run, Duration) {
    let mut cmd = if rt.own_netns {
        let mut c = Command::new("unshare");
        c.args(["-rn", BIN]);
        c
    } else {
        Command::new(BIN)
    };
    cmd.env_clear();
    if let Some(p) = std::env::var_os("PATH") {
        cmd.env("PATH", p);
    }
    cmd.envs(rt.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(d) = &rt.cwd {
        cmd.current_dir(d);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn vpc-cni");
    let mut stdin = child.stdin.take().unwrap();
    let (bytes, hold) = (rt.stdin, rt.hold_stdin);
    // The plugin may read none of it (VERSION) or stop at its cap: errors are fine.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&bytes);
        hold.then_some(stdin)
    });
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let mut err = child.stderr.take().unwrap();
    let (err_reader, unread) = if rt.ignore_stderr {
        (None, Some(err))
    } else {
        let t = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = err.read_to_end(&mut s);
            s
        });
        (Some(t), None)
    };
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > WATCHDOG {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vpc-cni still running after {WATCHDOG:?} (killed)");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = started.elapsed();
    drop(writer.join().unwrap()); // closes a held stdin now
    let stdout = reader.join().unwrap();
    let stderr = match (err_reader, unread) {
        (Some(t), _) => t.join().unwrap(),
        // whatever fitted in the pipe
        (None, Some(err)) => {
            let mut s = Vec::new();
            let _ = err.take(1 << 20).read_to_end(&mut s);
            s
        }
        (None, None) => unreachable!(),
    };
    let run = Run {
        status: status.code().unwrap_or(-1),
        stdout,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    };
    (run, took)
}

/// How a fake agent misbehaves.
#[derive(Debug, Clone, Copy)]
enum Misbehaviour {
    /// Listens with a backlog of 0 that is already full, and never accepts.
    FullBacklog,
    /// Accepts, reads nothing, answers nothing.
    Silent,
    /// Reads the request, then sends a valid answer one byte per second.
    Trickle,
    /// Answers with this error code.
    Code(u32),
}

struct HostileAgent {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// FullBacklog: the listener and the connections that fill its queue.
    _fds: Vec<OwnedFd>,
    _dir: tempfile::TempDir,
}

impl HostileAgent {
    fn start(m: Misbehaviour) -> HostileAgent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let mut fds = Vec::new();
        let mut thread = None;
        if let Misbehaviour::FullBacklog = m {
            let addr = UnixAddr::new(&socket).unwrap();
            let l = unix_socket(SockFlag::empty());
            socket::bind(l.as_raw_fd(), &addr).unwrap();
            socket::listen(&l, Backlog::new(0).unwrap()).unwrap();
            fds.push(l);
            loop {
                let c = unix_socket(SockFlag::SOCK_NONBLOCK);
                match socket::connect(c.as_raw_fd(), &addr) {
                    Ok(()) => fds.push(c),
                    Err(Errno::EAGAIN) => break,
                    Err(e) => panic!("filling the backlog: {e}"),
                }
                assert!(fds.len() < 100, "the backlog does not fill up");
            }
        } else {
            let l = UnixListener::bind(&socket).unwrap();
            let stop = stop.clone();
            thread = Some(std::thread::spawn(move || {
                for conn in l.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let stop = stop.clone();
                    std::thread::spawn(move || misbehave(m, conn, &stop));
                }
            }));
        }
        HostileAgent {
            socket,
            stop,
            thread,
            _fds: fds,
            _dir: dir,
        }
    }

    fn socket(&self) -> &str {
        self.socket.to_str().unwrap()
    }
}

impl Drop for HostileAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = UnixStream::connect(&self.socket); // wake the accept
            let _ = t.join();
        }
    }
}

fn unix_socket(flags: SockFlag) -> OwnedFd {
    socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        flags | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap()
}

fn misbehave(m: Misbehaviour, mut conn: UnixStream, stop: &AtomicBool) {
    match m {
        Misbehaviour::FullBacklog => unreachable!(),
        Misbehaviour::Silent => {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Misbehaviour::Trickle => {
            if proto::read_frame(&mut conn).is_err() {
                return;
            }
            let frame = proto::encode(&Response::Error {
                code: 11,
                message: "slow ".repeat(20),
            })
            .unwrap();
            for b in frame {
                if stop.load(Ordering::SeqCst) || conn.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Misbehaviour::Code(code) => {
            let Ok(payload) = proto::read_frame(&mut conn) else {
                return;
            };
            assert!(proto::decode::<Request>(&payload).is_ok());
            let resp = Response::Error {
                code,
                message: "misbehaving agent".into(),
            };
            let _ = conn.write_all(&proto::encode(&resp).unwrap());
        }
    }
}

/// One slow case: a name, the run, and what it must produce.
struct Case {
    name: &'static str,
    rt: Runtime,
    /// `Some(code)`: a CNI error with it; `None`: success with empty stdout.
    code: Option<u64>,
    bound: Duration,
    /// Text the error's msg + details (or, on success, stderr) must contain.
    says: &'static str,
}

fn check(case: &Case, r: &Run, took: Duration) {
    let name = case.name;
    assert!(
        took < case.bound,
        "{name}: took {took:?}, bound {:?}: {r:?}",
        case.bound
    );
    match case.code {
        Some(code) => {
            let v = r.error(code);
            let text = format!("{} {}", v["msg"], v["details"]);
            assert!(text.contains(case.says), "{name}: {v}");
        }
        None => {
            r.ok_empty();
            assert!(r.stderr.contains(case.says), "{name}: {}", r.stderr);
        }
    }
}

#[test]
fn hostile_agents_stdins_and_stderrs_are_answered_within_the_deadline() {
    let ns = Foreign::new("hostile").expect(
        "cannot make a network namespace: not root, and `unshare -rn` (user namespaces) failed",
    );
    let netns = ns.path();
    let full = HostileAgent::start(Misbehaviour::FullBacklog);
    let silent = HostileAgent::start(Misbehaviour::Silent);
    let trickle = HostileAgent::start(Misbehaviour::Trickle);
    let bad_code = HostileAgent::start(Misbehaviour::Code(u32::MAX));
    let prev = json!({"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.99.0.5/32"}]}});
    let add = |socket: &str| Runtime {
        env: env("ADD", &netns),
        stdin: conf("1.0.0", socket, json!({})),
        ..Default::default()
    };
    let status = |socket: &str| Runtime {
        env: env("STATUS", ""),
        stdin: conf("1.1.0", socket, json!({})),
        ..Default::default()
    };
    // a GC whose debug line (the whole request, ~90 KB) is more than a pipe holds (64 KiB),
    // and whose request still fits in a frame (proto::MAX_FRAME, 256 KiB)
    let many: Vec<Value> = (0..2_000)
        .map(|i| json!({"containerID": format!("c{i:08}"), "ifname": "eth0"}))
        .collect();
    let cases = vec![
        Case {
            name: "ADD, agent's backlog full",
            rt: add(full.socket()),
            code: Some(104),
            bound: CALL_BOUND,
            says: "backlog is full",
        },
        Case {
            name: "ADD, agent silent",
            rt: add(silent.socket()),
            code: Some(104),
            bound: CALL_BOUND,
            says: "did not answer within",
        },
        Case {
            name: "ADD, agent trickling",
            rt: add(trickle.socket()),
            code: Some(104),
            bound: CALL_BOUND,
            says: "did not answer within",
        },
        Case {
            name: "ADD, agent's code 4294967295",
            rt: add(bad_code.socket()),
            code: Some(103),
            bound: QUICK_BOUND,
            says: "4294967295",
        },
        Case {
            name: "CHECK, agent silent",
            rt: Runtime {
                env: env("CHECK", &netns),
                stdin: conf("1.0.0", silent.socket(), prev.clone()),
                ..Default::default()
            },
            code: Some(104),
            bound: CALL_BOUND,
            says: "did not answer within",
        },
        Case {
            name: "GC, agent trickling",
            rt: Runtime {
                env: env("GC", ""),
                stdin: conf(
                    "1.1.0",
                    trickle.socket(),
                    json!({"cni.dev/valid-attachments": []}),
                ),
                ..Default::default()
            },
            code: Some(104),
            bound: CALL_BOUND,
            says: "did not answer within",
        },
        Case {
            // DEL tears down in the namespace it runs in: a fresh one
            name: "DEL, agent silent",
            rt: Runtime {
                env: env("DEL", "/run/netns/vpccni-hostile-gone"),
                stdin: conf("1.0.0", silent.socket(), prev.clone()),
                own_netns: true,
                ..Default::default()
            },
            code: None,
            bound: CALL_BOUND,
            says: "agent unavailable",
        },
        Case {
            name: "STATUS, agent's backlog full",
            rt: status(full.socket()),
            code: Some(50),
            bound: STATUS_BOUND,
            says: "backlog is full",
        },
        Case {
            name: "STATUS, agent silent",
            rt: status(silent.socket()),
            code: Some(50),
            bound: STATUS_BOUND,
            says: "did not answer within",
        },
        Case {
            name: "STATUS, agent trickling",
            rt: status(trickle.socket()),
            code: Some(50),
            bound: STATUS_BOUND,
            says: "did not answer within",
        },
        Case {
            name: "ADD, stdin never closed",
            rt: Runtime {
                hold_stdin: true,
                stdin: b"{\"cniVersion\": \"1.0.0\",".to_vec(),
                ..add(NO_AGENT)
            },
            code: Some(104),
            bound: CALL_BOUND,
            says: "stdin was not closed",
        },
        Case {
            name: "STATUS, stdin never closed",
            rt: Runtime {
                hold_stdin: true,
                stdin: Vec::new(),
                ..status(NO_AGENT)
            },
            code: Some(104),
            bound: STATUS_BOUND,
            says: "stdin was not closed",
        },
        Case {
            name: "GC, stderr never read",
            rt: Runtime {
                env: env("GC", ""),
                stdin: conf(
                    "1.1.0",
                    NO_AGENT,
                    json!({"pluginLogLevel": "trace", "cni.dev/valid-attachments": many}),
                ),
                ignore_stderr: true,
                ..Default::default()
            },
            // the debug line took the whole deadline: no time was left for the agent
            code: Some(104),
            bound: CALL_BOUND,
            says: "no time was left",
        },
    ];
    let results: Vec<(Run, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|c| {
                let rt = Runtime {
                    env: c.rt.env.clone(),
                    stdin: c.rt.stdin.clone(),
                    cwd: c.rt.cwd.clone(),
                    ..c.rt
                };
                s.spawn(move || run(rt))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (case, (r, took)) in cases.iter().zip(&results) {
        eprintln!(
            "{:<32} {took:>10.2?}  {}",
            case.name,
            r.stdout.replace('\n', " ")
        );
    }
    for (case, (r, took)) in cases.iter().zip(&results) {
        check(case, r, *took);
    }
}

/// A FIFO at `dir/fifo`.
fn fifo(dir: &Path) -> String {
    let p = dir.join("fifo");
    nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    p.display().to_string()
}

#[test]
fn a_fifo_as_cni_netns_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = fifo(dir.path());
    for (cmd, extra) in [
        ("ADD", json!({})),
        (
            "CHECK",
            json!({"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.99.0.5/32"}]}}),
        ),
    ] {
        let (r, took) = run(Runtime {
            env: env(cmd, &fifo),
            stdin: conf("1.0.0", NO_AGENT, extra),
            ..Default::default()
        });
        assert!(took < QUICK_BOUND, "{cmd}: {took:?}");
        let v = r.error(4);
        assert!(v["details"].as_str().unwrap().contains("is a FIFO"), "{v}");
        assert!(v["msg"].as_str().unwrap().contains(&fifo), "{v}");
    }
    // DEL skips the unusable namespace and tears down the host side (in a namespace of its own)
    let (r, took) = run(Runtime {
        env: env("DEL", &fifo),
        stdin: conf("1.0.0", NO_AGENT, json!({})),
        own_netns: true,
        ..Default::default()
    });
    assert!(took < QUICK_BOUND, "DEL: {took:?}");
    r.ok_empty();
}

#[test]
fn log_files_are_regular_files_named_by_absolute_paths() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = fifo(dir.path());
    let link = dir.path().join("link.log");
    std::os::unix::fs::symlink(dir.path().join("target.log"), &link).unwrap();
    let status = |log: &str| {
        let (r, took) = run(Runtime {
            env: env("STATUS", ""),
            stdin: conf(
                "1.1.0",
                NO_AGENT,
                json!({"pluginLogFile": log, "pluginLogLevel": "debug"}),
            ),
            cwd: Some(dir.path().into()),
            ..Default::default()
        });
        assert!(took < QUICK_BOUND, "{log}: {took:?}");
        r
    };
    // not a regular file: 105, naming the value and what it is
    for (log, what) in [
        (fifo.as_str(), "is a FIFO"),
        ("/dev/null", "is a character device"),
        (link.to_str().unwrap(), "is a symbolic link"),
        (dir.path().to_str().unwrap(), "is a directory"),
    ] {
        let r = status(log);
        let v = r.error(105);
        assert!(v["msg"].as_str().unwrap().contains(log), "{v}");
        assert!(v["details"].as_str().unwrap().contains(what), "{v}");
        // and the failure is on stderr too
        assert!(r.stderr.contains(log), "{}", r.stderr);
    }
    assert!(!dir.path().join("target.log").exists());
    // stdout and relative paths: 7, naming the value; nothing is created
    for log in [
        "/dev/stdout",
        "stdout",
        "plugin.log",
        "./stderr",
        "logs/p.log",
    ] {
        let r = status(log);
        let v = r.error(7);
        assert!(v["msg"].as_str().unwrap().contains("pluginLogFile"), "{v}");
        assert!(v["details"].as_str().unwrap().contains(log), "{v}");
    }
    // stderr, by name or empty: the logs go to stderr, no file named "stderr" appears
    for log in ["stderr", ""] {
        let r = status(log);
        r.error(50);
        assert!(r.stderr.contains("calling the agent"), "{}", r.stderr);
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut left = left;
    left.sort();
    assert_eq!(left, ["fifo", "link.log"]);
    // an absolute path to a regular file is created and used; stdout carries only the answer
    let log = dir.path().join("sub/plugin.log");
    let r = status(log.to_str().unwrap());
    r.error(50);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("calling the agent"), "{text}");
}

#[test]
fn an_oversized_configuration_is_refused() {
    let mut stdin = conf("1.0.0", NO_AGENT, json!({"pad": "x".repeat(2 << 20)}));
    stdin.truncate(2 << 20);
    let (r, took) = run(Runtime {
        env: env("ADD", "/run/netns/vpccni-hostile-x"),
        stdin,
        ..Default::default()
    });
    assert!(took < QUICK_BOUND, "{took:?}");
    let v = r.error(7);
    assert!(v["msg"].as_str().unwrap().contains("1048576"), "{v}");
}

#[test]
fn version_touches_neither_stdin_nor_files_nor_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = fifo(dir.path());
    let (r, took) = run(Runtime {
        env: env("VERSION", &fifo),
        stdin: conf("1.1.0", &fifo, json!({"pluginLogFile": fifo})),
        hold_stdin: true,
        ..Default::default()
    });
    assert!(took < QUICK_BOUND, "{took:?}");
    r.ok();
    assert_eq!(r.json()["cniVersion"], "1.1.0");
}
