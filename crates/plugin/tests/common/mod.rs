//! Shared helpers for the plugin's process-level tests: running the binary, throwaway
//! network namespaces (on `testkit`'s), and a fake agent serving the proto socket.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use proto::{Allocation, AttachmentKey, Request, Response, StatusReply};
use serde_json::Value;
use testkit::is_root;

pub const BIN: &str = env!("CARGO_BIN_EXE_vpc-cni");

/// What one plugin run produced.
#[derive(Debug)]
pub struct Run {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// stdout must be exactly one JSON document (nothing else).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not one JSON document ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    /// Asserts a CNI error object with `code`; returns it.
    pub fn error(&self, code: u64) -> Value {
        assert_ne!(self.status, 0, "expected failure: {self:?}");
        let v = self.json();
        assert_eq!(v["code"], code, "wrong code: {self:?}");
        assert!(v["msg"].is_string(), "{v}");
        assert!(v["cniVersion"].is_string(), "{v}");
        v
    }

    pub fn ok(&self) -> &Self {
        assert_eq!(self.status, 0, "expected success: {self:?}");
        self
    }

    /// Success with empty stdout (DEL, CHECK, STATUS, GC).
    pub fn ok_empty(&self) {
        self.ok();
        assert_eq!(self.stdout.trim(), "", "stdout must be empty: {self:?}");
    }
}

/// Run the plugin with exactly `env` (plus PATH), `stdin`, optionally inside `netns`.
pub fn run_plugin(env: &[(&str, &str)], stdin: &[u8], netns: Option<&Path>) -> Run {
    let mut cmd = Command::new(BIN);
    cmd.env_clear();
    if let Some(p) = std::env::var_os("PATH") {
        cmd.env("PATH", p);
    }
    cmd.envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let ns_file = netns.map(|p| File::open(p).unwrap_or_else(|e| panic!("open {p:?}: {e}")));
    if let Some(f) = &ns_file {
        let fd = f.as_raw_fd();
        // SAFETY: setns is async-signal-safe; the fd stays open until after spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().expect("spawn vpc-cni");
    // VERSION does not read stdin and may be gone before we write: a broken pipe is fine.
    match child.stdin.take().unwrap().write_all(stdin) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => panic!("write stdin: {e}"),
        _ => {}
    }
    let out = child.wait_with_output().expect("wait vpc-cni");
    drop(ns_file);
    Run {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A network namespace that is not ours, for as long as this lives: `ip netns add` as root,
/// else an `unshare -rn sleep` process's.
pub enum Foreign {
    Named(TestNetns),
    /// `unshare -rn sleep`: its /proc/<pid>/ns/net (killed by PID on drop).
    Unshared(Child),
}

impl Foreign {
    pub fn new(tag: &str) -> Option<Foreign> {
        if is_root() {
            return Some(Foreign::Named(TestNetns::new(tag)));
        }
        let child = Command::new("unshare")
            .args(["-rn", "sleep", "60"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let f = Foreign::Unshared(child);
        // wait until the child is in its own namespace
        for _ in 0..100 {
            let own = std::fs::read_link("/proc/self/ns/net").ok();
            if std::fs::read_link(f.path())
                .ok()
                .is_some_and(|l| Some(l) != own)
            {
                return Some(f);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        None
    }

    pub fn path(&self) -> String {
        match self {
            Foreign::Named(n) => n.path_str(),
            Foreign::Unshared(c) => format!("/proc/{}/ns/net", c.id()),
        }
    }
}

impl Drop for Foreign {
    fn drop(&mut self) {
        if let Foreign::Unshared(c) = self {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A test namespace ([`testkit::TestNs`], deleted on drop) with loopback up, and what these
/// tests read from it (root only).
pub struct TestNetns(testkit::TestNs);

impl TestNetns {
    pub fn new(tag: &str) -> TestNetns {
        let ns = testkit::TestNs::new(tag);
        ns.ip("link set lo up");
        TestNetns(ns)
    }

    pub fn name(&self) -> &str {
        self.0.name()
    }

    pub fn path(&self) -> PathBuf {
        self.0.path()
    }

    pub fn path_str(&self) -> String {
        self.path().display().to_string()
    }

    /// Delete it now (e.g. to test DEL after the pod's netns is gone).
    pub fn delete(&mut self) {
        self.0.delete();
        assert!(!self.path().exists(), "{} is still there", self.path_str());
    }

    /// `ip -j <args>` inside this namespace.
    pub fn ip_json(&self, args: &[&str]) -> Value {
        let mut full = vec!["ip", "-j", "-n", self.name()];
        full.extend_from_slice(args);
        let out = sh(&full);
        if out.trim().is_empty() {
            Value::Array(vec![])
        } else {
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{full:?}: {e}: {out}"))
        }
    }

    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", self.name()];
        full.extend_from_slice(args);
        sh(&full)
    }

    pub fn link_names(&self) -> Vec<String> {
        self.ip_json(&["link", "show"])
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["ifname"].as_str().unwrap().to_string())
            .collect()
    }

    /// Links that DEL has not retired. DEL leaves a pod's veth pair down in
    /// `dataplane::RETIRED_LINK_GROUP` for the agent to delete; a retired link that is still
    /// up is counted as live.
    pub fn live_link_names(&self) -> Vec<String> {
        let group = dataplane::RETIRED_LINK_GROUP.to_string();
        self.ip_json(&["link", "show"])
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| {
                l["group"].as_str() != Some(group.as_str())
                    || l["flags"]
                        .as_array()
                        .is_some_and(|f| f.iter().any(|x| x == "UP"))
            })
            .map(|l| l["ifname"].as_str().unwrap().to_string())
            .collect()
    }

    /// What the agent's reaper does: deletes the retired links of this namespace.
    pub fn reap_retired(&self) {
        let group = dataplane::RETIRED_LINK_GROUP.to_string();
        // ENODEV is fine: the kernel may have deleted them with a pod netns meanwhile
        let _ = Command::new("ip")
            .args(["-n", self.name(), "link", "del", "group", &group])
            .output();
    }
}

/// Run a command, panic with its stderr if it fails, return stdout.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The fake agent's state: a tiny address pool keyed by attachment.
#[derive(Debug)]
pub struct Pool {
    pub free: BTreeSet<Ipv4Addr>,
    pub assigned: BTreeMap<AttachmentKey, Allocation>,
    pub ready: bool,
    pub route_table: u32,
}

impl Pool {
    fn allocation(&self, ip: Ipv4Addr) -> Allocation {
        Allocation {
            ip,
            eni_id: "eni-test".into(),
            device_number: if self.route_table == 254 {
                0
            } else {
                self.route_table - 1
            },
            route_table: self.route_table,
            subnet: "10.99.0.0/24".parse().unwrap(),
            vpc_cidrs: vec!["10.99.0.0/16".parse().unwrap()],
        }
    }

    fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Add { key, .. } => {
                if let Some(a) = self.assigned.get(&key) {
                    return Response::Added {
                        allocation: a.clone(),
                        existing: true,
                    };
                }
                let Some(ip) = self.free.pop_first() else {
                    return Response::Error {
                        code: 11,
                        message: "no free address".into(),
                    };
                };
                let a = self.allocation(ip);
                self.assigned.insert(key, a.clone());
                Response::Added {
                    allocation: a,
                    existing: false,
                }
            }
            Request::Del { key } => {
                let released = self.assigned.remove(&key);
                if let Some(a) = &released {
                    self.free.insert(a.ip);
                }
                Response::Deleted { released }
            }
            Request::Check { key } => match self.assigned.get(&key) {
                Some(a) => Response::Checked {
                    allocation: a.clone(),
                },
                None => Response::Error {
                    code: 3,
                    message: format!("unknown attachment {key}"),
                },
            },
            Request::Status => Response::Status(StatusReply {
                ready: self.ready,
                message: if self.ready {
                    "ready".into()
                } else {
                    "waiting for the first ENI".into()
                },
                free_ips: self.free.len() as u32,
                assigned_ips: self.assigned.len() as u32,
            }),
            Request::Gc { network, valid } => {
                let valid: BTreeSet<_> = valid.into_iter().collect();
                let gone: Vec<_> = self
                    .assigned
                    .keys()
                    .filter(|k| k.network == network && !valid.contains(*k))
                    .cloned()
                    .collect();
                let mut released = Vec::new();
                for k in gone {
                    let a = self.assigned.remove(&k).unwrap();
                    self.free.insert(a.ip);
                    released.push((k, a.ip));
                }
                Response::Collected { released }
            }
        }
    }
}

/// A thread serving the proto socket from a [`Pool`].
pub struct FakeAgent {
    pub socket: PathBuf,
    pub pool: Arc<Mutex<Pool>>,
    pub requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl FakeAgent {
    /// Pool of 10.99.0.`first`..=10.99.0.`last`, answering with `route_table`.
    pub fn start(first: u8, last: u8, route_table: u32) -> FakeAgent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let pool = Arc::new(Mutex::new(Pool {
            free: (first..=last)
                .map(|i| Ipv4Addr::new(10, 99, 0, i))
                .collect(),
            assigned: BTreeMap::new(),
            ready: true,
            route_table,
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (pool, stop, requests) = (pool.clone(), stop.clone(), requests.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut conn) = conn else { continue };
                    let Ok(payload) = proto::read_frame(&mut conn) else {
                        continue;
                    };
                    let resp = match proto::decode::<Request>(&payload) {
                        Ok(req) => {
                            requests.fetch_add(1, Ordering::SeqCst);
                            pool.lock().unwrap().handle(req)
                        }
                        Err(e) => Response::Error {
                            code: 999,
                            message: e.to_string(),
                        },
                    };
                    let _ = conn.write_all(&proto::encode(&resp).unwrap());
                }
            })
        };
        FakeAgent {
            socket,
            pool,
            requests,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    pub fn socket_str(&self) -> String {
        self.socket.display().to_string()
    }

    /// Stop serving and remove the socket (the agent is "down" afterwards).
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            // wake the accept()
            let _ = std::os::unix::net::UnixStream::connect(&self.socket);
            t.join().unwrap();
            let _ = std::fs::remove_file(&self.socket);
        }
    }

    pub fn assigned(&self) -> usize {
        self.pool.lock().unwrap().assigned.len()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop();
    }
}
