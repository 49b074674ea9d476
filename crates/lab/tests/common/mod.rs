//! Helpers shared by the lab tests: they drive the built `vpc-lab` binary as root.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const LAB: &str = env!("CARGO_BIN_EXE_vpc-lab");

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The directory of the built binaries (vpc-lab, vpc-cni-agent, vpc-cni).
pub fn bin_dir() -> PathBuf {
    Path::new(LAB)
        .parent()
        .expect("binary has a directory")
        .to_path_buf()
}

/// Runs `vpc-lab args…`, echoing its output into the test log.
pub fn lab(args: &[&str]) -> Output {
    let out = Command::new(LAB)
        .args(args)
        .output()
        .expect("running vpc-lab");
    eprintln!(
        "$ vpc-lab {} -> {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `vpc-lab args…` and panics unless it succeeds; returns stdout.
pub fn lab_ok(args: &[&str]) -> String {
    let out = lab(args);
    assert!(out.status.success(), "vpc-lab {} failed", args.join(" "));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `vpc-lab exec target -- bash -c script`.
pub fn sh(target: &str, script: &str) -> Output {
    lab(&["exec", target, "--", "bash", "-c", script])
}

/// Always runs `vpc-lab down` when dropped (also when the test panics).
pub struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        let _ = Command::new(LAB).arg("down").status();
    }
}

/// Pids recorded in the lab's pid files (read before `down` removes them).
pub fn lab_pids() -> Vec<i32> {
    let mut files = vec![
        PathBuf::from("/run/vpc-lab/moto.pid"),
        PathBuf::from("/run/vpc-lab/daemon.pid"),
    ];
    if let Ok(rd) = std::fs::read_dir("/run/vpc-lab") {
        for e in rd.flatten() {
            files.push(e.path().join("agent.pid"));
        }
    }
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// Whether a pid is alive (a zombie is not: it holds no resources and waits for PID 1).
pub fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next())
        .unwrap_or("");
    state != "Z" && state != "X"
}

pub fn lab_namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vpclab-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `vpc-lab down` and asserts that nothing of the lab is left.
pub fn down_and_assert_clean(pids: &[i32]) {
    lab_ok(&["down"]);
    assert_root_untouched();
    assert!(
        lab_namespaces().is_empty(),
        "namespaces left: {:?}",
        lab_namespaces()
    );
    for p in pids {
        assert!(!alive(*p), "process {p} started by the lab is still alive");
    }
    assert!(
        !Path::new("/run/vpc-lab").exists(),
        "/run/vpc-lab left behind"
    );
    // Idempotent.
    lab_ok(&["down"]);
}

/// The lab tests share /run/vpc-lab and the namespace names: one at a time.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The root network namespace carries nothing of the lab: no lab interface, no VPC or
/// TEST-NET address, route or rule (the only root-namespace listener is moto on loopback).
pub fn assert_root_untouched() {
    let run = |args: &[&str]| {
        let o = Command::new("ip").args(args).output().expect("ip");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let links = run(&["-o", "link", "show"]);
    for l in links.lines() {
        let name = l.split(':').nth(1).unwrap_or("").trim();
        let name = name.split('@').next().unwrap_or("");
        let lab_like = name.starts_with("br-")
            || name == "up0"
            || name == "vhand"
            || (name.len() == 4
                && (name.starts_with('i') || name.starts_with("vh"))
                && name.as_bytes()[name.len() - 2] == b'e');
        assert!(
            !lab_like,
            "lab-like interface {name:?} in the root namespace"
        );
    }
    for args in [
        &["-o", "addr", "show"][..],
        &["route", "show", "table", "all"][..],
        &["rule", "show"][..],
    ] {
        let out = run(args);
        for bad in ["172.31.", "203.0.113."] {
            assert!(
                !out.contains(bad),
                "`ip {}` in the root namespace mentions {bad}:\n{out}",
                args.join(" ")
            );
        }
    }
}
