//! A named network namespace for a test: created with `ip netns add`, deleted on drop (also
//! when the test panics). Every address and route a test makes lives in one of these.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// The prefix of every test namespace (`vpccni-t-<pid>-<seq>-<tag>`).
pub const PREFIX: &str = "vpccni-t-";

#[derive(Debug)]
pub struct TestNs {
    name: String,
    deleted: bool,
}

impl TestNs {
    /// Creates `vpccni-t-<pid>-<seq>-<tag>`; panics if `ip netns add` fails.
    pub fn new(tag: &str) -> TestNs {
        let name = format!(
            "{PREFIX}{}-{}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("running ip netns add");
        assert!(out.status.success(), "ip netns add {name}: {out:?}");
        TestNs {
            name,
            deleted: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Opens the namespace for `netns::NetNs::run`.
    pub fn open(&self) -> netns::NetNs {
        netns::NetNs::open(&self.path()).expect("opening a test namespace")
    }

    /// `ip -n <ns> args…` (split on white space), which must succeed; returns stdout.
    pub fn ip(&self, args: &str) -> String {
        let out = self.ip_raw(args);
        assert!(out.status.success(), "ip -n {} {args}: {out:?}", self.name);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ip -n <ns> args…`, whatever its outcome.
    pub fn ip_raw(&self, args: &str) -> Output {
        Command::new("ip")
            .args(["-n", &self.name])
            .args(args.split_whitespace())
            .output()
            .expect("running ip")
    }

    /// `ip netns exec <ns> args…`.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("running ip netns exec")
    }

    /// One echo request answered within 2 s.
    pub fn ping(&self, dst: &str) -> bool {
        self.exec(&["ping", "-c1", "-W2", "-q", dst])
            .status
            .success()
    }

    /// Three echo requests of one ICMP flow (one conntrack entry): every one answered.
    pub fn ping_flow(&self, dst: &str) -> bool {
        let o = self.exec(&["ping", "-c3", "-i0.2", "-W2", "-q", dst]);
        String::from_utf8_lossy(&o.stdout).contains("3 received")
    }

    /// Diagnostics for a failed connectivity assertion: ruleset, rules, routes, conntrack and
    /// the forwarding sysctls of this namespace.
    pub fn dump(&self) -> String {
        let mut s = String::new();
        for cmd in [
            &["nft", "list", "ruleset"][..],
            &["ip", "rule"],
            &["ip", "route", "show", "table", "all"],
            &["conntrack", "-L"],
            &[
                "sh",
                "-c",
                "grep . /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv4/conf/*/rp_filter",
            ],
        ] {
            let o = self.exec(cmd);
            s.push_str(&format!(
                "--- {} ({})\n{}{}",
                cmd.join(" "),
                self.name,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        s
    }

    /// Deletes the namespace now (idempotent). With `VPCCNI_KEEP_NS` set, a panicking test
    /// keeps it for inspection.
    pub fn delete(&mut self) {
        if std::env::var_os("VPCCNI_KEEP_NS").is_some() && std::thread::panicking() {
            eprintln!("keeping netns {} (VPCCNI_KEEP_NS)", self.name);
            return;
        }
        if !self.deleted {
            self.deleted = true;
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        self.delete();
    }
}
