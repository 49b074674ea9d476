//! Fixtures shared by the root tests: throwaway namespaces (`testkit::TestNs`, loopback up),
//! a temp directory with a ptp+host-local conflist whose host-local store lives in the temp
//! directory, the clients the tests need, and the `vpc-cni-conformance` binary. Everything is
//! removed on drop.

#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use ipnet::Ipv4Net;

pub const BIN: &str = env!("CARGO_BIN_EXE_vpc-cni-conformance");
pub const NET: &str = "rcnet";
pub const SUBNET: &str = "10.77.0.0/24";
pub const CNI_BIN: &str = "/usr/lib/cni";

pub use testkit::require_root;

/// Where a client these tests need is, or why it cannot be found.
fn locate(need: &str) -> Result<PathBuf, String> {
    let first = |paths: &[&str]| {
        paths
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| paths.join(" or "))
    };
    let cache = |rel: &str| {
        testkit::repo::find(&format!(".cache/{rel}")).ok_or_else(|| format!("<repo>/.cache/{rel}"))
    };
    match need {
        "containerd" => first(&["/usr/bin/containerd"]),
        "ctr" => first(&["/usr/bin/ctr"]),
        "runc" => first(&["/usr/sbin/runc", "/usr/bin/runc"]),
        "ptp" => first(&["/usr/lib/cni/ptp"]),
        "host-local" => first(&["/usr/lib/cni/host-local"]),
        "cnitool" => cache("bin/cnitool"),
        "pause" => cache("pause-oci.tar"),
        "ping" => first(&["/usr/bin/ping", "/bin/ping"]),
        other => panic!("unknown requirement {other}"),
    }
}

/// Panics, naming everything missing and `scripts/setup.sh`, unless every client in `need` is
/// installed. A test that cannot run fails rather than passing.
#[track_caller]
pub fn require(need: &[&str]) {
    let missing: Vec<String> = need
        .iter()
        .filter_map(|n| locate(n).err().map(|where_| format!("{n} ({where_})")))
        .collect();
    assert!(
        missing.is_empty(),
        "missing: {}; run `scripts/setup.sh` as root (it installs containerd, runc, cnitool, \
         the pause image and Debian's CNI plugins through scripts/setup-clients.sh)",
        missing.join(", ")
    );
}

pub fn sh(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"))
}

pub fn sh_ok(cmd: &str, args: &[&str]) -> String {
    let o = sh(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `vpc-cni-conformance ARGS`; on success returns its JSON output.
pub fn conformance(args: &[&str]) -> Result<serde_json::Value, String> {
    let o = Command::new(BIN)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {BIN}: {e}"))?;
    let out = String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        return Err(format!(
            "vpc-cni-conformance {args:?} failed ({}): {}{out}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    serde_json::from_str(&out).map_err(|e| format!("{args:?} printed no JSON ({e}): {out}"))
}

/// Runs `vpc-cni-conformance ARGS`; returns whether it succeeded and the JSON it printed.
pub fn conformance_json(args: &[&str]) -> (bool, serde_json::Value) {
    let o = Command::new(BIN)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"));
    let out = String::from_utf8_lossy(&o.stdout);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!(
            "{args:?} printed no JSON ({e}): {out}{}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (o.status.success(), v)
}

pub fn conformance_ok(args: &[&str]) -> serde_json::Value {
    conformance(args).unwrap_or_else(|e| panic!("{e}"))
}

/// A test namespace ([`testkit::TestNs`], deleted on drop) with loopback up.
pub struct Netns(testkit::TestNs);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let ns = testkit::TestNs::new(tag);
        ns.ip("link set lo up");
        Netns(ns)
    }

    /// Its name under /run/netns.
    pub fn name(&self) -> &str {
        self.0.name()
    }

    pub fn path(&self) -> String {
        self.0.path().display().to_string()
    }

    pub fn exec(&self, args: &[&str]) -> std::process::Output {
        self.0.exec(args)
    }

    pub fn exec_ok(&self, args: &[&str]) -> String {
        let mut a = vec!["netns", "exec", self.name()];
        a.extend_from_slice(args);
        sh_ok("ip", &a)
    }

    pub fn ping(&self, ip: &str) -> bool {
        self.0.ping(ip)
    }
}

/// A temp directory with `conf/10-rcnet.conflist` (ptp + host-local on 10.77.0.0/24 or the
/// given subnet, store in `data/`), and what existed of /var/lib/cni before the test.
pub struct Conf {
    pub tmp: tempfile::TempDir,
    pub subnet: String,
    var_lib_cni_existed: bool,
    results_existed: bool,
}

impl Conf {
    pub fn new() -> Conf {
        Conf::with_subnet(SUBNET)
    }

    pub fn with_subnet(subnet: &str) -> Conf {
        let tmp = tempfile::Builder::new()
            .prefix("vpccni-rc-")
            .tempdir()
            .expect("temp dir");
        let conf = tmp.path().join("conf");
        std::fs::create_dir_all(&conf).unwrap();
        let data = tmp.path().join("data");
        let list = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": NET,
            "plugins": [{
                "type": "ptp",
                "ipMasq": false,
                "mtu": 1500,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": data,
                }
            }]
        });
        std::fs::write(
            conf.join("10-rcnet.conflist"),
            serde_json::to_vec_pretty(&list).unwrap(),
        )
        .unwrap();
        Conf {
            tmp,
            subnet: subnet.to_string(),
            var_lib_cni_existed: Path::new("/var/lib/cni").exists(),
            results_existed: Path::new("/var/lib/cni/results").exists(),
        }
    }

    pub fn conf_dir(&self) -> String {
        self.tmp.path().join("conf").display().to_string()
    }

    /// Addresses host-local holds (files named by IP in its store).
    pub fn reserved(&self) -> Vec<String> {
        let d = self.tmp.path().join("data").join(NET);
        let mut v: Vec<String> = std::fs::read_dir(&d)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

impl Drop for Conf {
    fn drop(&mut self) {
        // Only directories the test created, and only when empty.
        if !self.results_existed {
            let _ = std::fs::remove_dir("/var/lib/cni/results");
        }
        if !self.var_lib_cni_existed {
            let _ = std::fs::remove_dir("/var/lib/cni");
        }
    }
}

/// True when `ip` (with or without a prefix length) is inside SUBNET.
pub fn in_subnet(ip: &str) -> bool {
    let addr: Ipv4Addr = ip
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|e| panic!("{ip:?} is not an IPv4 address: {e}"));
    SUBNET.parse::<Ipv4Net>().unwrap().contains(&addr)
}

/// PIDs whose command line contains `needle`.
pub fn pids_with(needle: &str) -> Vec<i32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline"))
            && String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .contains(needle)
        {
            v.push(pid);
        }
    }
    v
}
