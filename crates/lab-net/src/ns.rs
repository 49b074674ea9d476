//! Network namespaces of the lab, and running things inside them.
//!
//! Every namespace the lab makes is named `vpclab-*` and bind-mounted under `/run/netns` by
//! `ip netns add`, run from the lab process itself (which lives in the root mount namespace, so
//! the bind mount is visible to everyone). Commands are run inside a namespace by `setns` in the
//! forked child before `exec` (like `nsenter --net`): no mount namespace is unshared, so cgroup
//! mounts stay visible and `/run/netns` of the root mount namespace is used.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use netns::NetNs;

/// Prefix of every namespace the lab creates.
pub const PREFIX: &str = "vpclab-";
/// The fabric: subnet bridges, the router, the source/destination check.
pub const FABRIC: &str = "vpclab-fabric";
/// The internet host 203.0.113.10.
pub const INTERNET: &str = "vpclab-internet";

/// The namespace of an instance (`instance1`, `instance2`, `vpc-host`).
pub fn instance_ns(instance: &str) -> String {
    format!("{PREFIX}{instance}")
}

/// The namespace of a pod on an instance.
pub fn pod_ns(instance: &str, namespace: &str, name: &str) -> String {
    format!("{PREFIX}pod-{instance}-{namespace}-{name}")
}

/// The bind mount of a named namespace.
pub fn path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Creates a named namespace (no-op when it exists) and brings its loopback up.
pub fn add(name: &str) -> Result<()> {
    if !exists(name) {
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .context("running `ip netns add` (is iproute2 installed? run scripts/setup.sh)")?;
        if !out.status.success() {
            bail!(
                "`ip netns add {name}` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    run(name, &["ip", "link", "set", "lo", "up"])?;
    Ok(())
}

/// Deletes a named namespace; a namespace that does not exist is not an error.
pub fn del(name: &str) -> Result<()> {
    if !exists(name) {
        return Ok(());
    }
    let out = Command::new("ip").args(["netns", "del", name]).output()?;
    if !out.status.success() {
        bail!(
            "`ip netns del {name}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Every `vpclab-*` namespace currently mounted under /run/netns.
pub fn list_lab() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(PREFIX) {
                out.push(n);
            }
        }
    }
    out.sort();
    out
}

/// Opens a namespace's bind mount, with an error that says what to do.
pub fn open(name: &str) -> Result<NetNs> {
    NetNs::open(&path(name)).with_context(|| {
        format!("network namespace {name:?} of the lab: is the lab up? run `vpc-lab up`")
    })
}

/// A command whose child enters namespace `name` (network only) before exec.
pub fn command(name: &str, program: &str) -> Result<Command> {
    let f = open(name)?;
    let mut cmd = Command::new(program);
    // SAFETY: the closure only calls setns(2), which is async-signal-safe, on an fd that the
    // closure owns (the File moves into it and lives as long as the Command).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Runs `args` inside namespace `name`; fails with the command and its stderr when it fails.
pub fn run(name: &str, args: &[&str]) -> Result<String> {
    run_stdin(name, args, None)
}

/// Like [`run`] with `input` on stdin.
pub fn run_stdin(name: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    let mut cmd = command(name, args[0])?;
    cmd.args(&args[1..])
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting `{}` in {name}", args.join(" ")))?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("stdin is piped");
        stdin.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let shown = match input {
            Some(i) if i.len() < 4000 => format!("\ninput was:\n{i}"),
            _ => String::new(),
        };
        bail!(
            "`{}` in {name} failed ({}): {}{shown}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a dedicated thread that has entered namespace `name` (`netns::NetNs::run`).
pub fn in_ns<T: Send>(name: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    open(name)?.run(f)?
}

/// Sets sysctl `key` (dotted, like `net.ipv4.ip_forward`) inside namespace `name`.
pub fn sysctl(name: &str, key: &str, value: &str) -> Result<()> {
    let p = format!("/proc/sys/{}", key.replace('.', "/"));
    let v = value.to_string();
    let k = key.to_string();
    in_ns(name, move || {
        std::fs::write(&p, &v).with_context(|| format!("setting sysctl {k}={v}"))
    })
    .with_context(|| format!("in namespace {name}"))
}

/// Binds a TCP listener inside namespace `name` (for serving it from anywhere).
pub fn bind_tcp(name: &str, addr: std::net::SocketAddr) -> Result<std::net::TcpListener> {
    let l = in_ns(name, move || {
        let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .with_context(|| format!("in namespace {name}"))?;
    Ok(l)
}
