//! The EC2 API: moto's server on a free loopback port (the lab's only root-namespace listener).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::procs;

pub const PID_FILE: &str = "/run/vpc-lab/moto.pid";
/// The marker checked in /proc/<pid>/cmdline before signalling.
pub const MARKER: &[&str] = &["moto_server"];

/// Finds `moto_server`: `$VPC_LAB_MOTO_SERVER`, else `.venv/bin/moto_server` in the current
/// directory or any ancestor of it or of this executable (the repository's virtualenv), else PATH.
pub fn find_server() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("VPC_LAB_MOTO_SERVER") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!(
            "VPC_LAB_MOTO_SERVER={} is not a file; point it at moto_server or unset it",
            p.display()
        );
    }
    let mut starts = Vec::new();
    if let Ok(d) = std::env::current_dir() {
        starts.push(d);
    }
    if let Ok(e) = std::env::current_exe() {
        starts.push(e);
    }
    for s in starts {
        for dir in s.ancestors() {
            let c = dir.join(".venv/bin/moto_server");
            if c.is_file() {
                return Ok(c);
            }
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            let c = d.join("moto_server");
            if c.is_file() {
                return Ok(c);
            }
        }
    }
    bail!(
        "moto_server not found (looked at $VPC_LAB_MOTO_SERVER, .venv/bin/moto_server above the \
         current directory and the vpc-lab binary, and PATH); run scripts/setup.sh to install it"
    )
}

/// Starts moto on a free 127.0.0.1 port and waits until it answers HTTP. Returns the address.
pub fn start(run_dir: &Path) -> Result<SocketAddr> {
    let server = find_server()?;
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
        l.local_addr()?.port()
    };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut cmd = Command::new(&server);
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    let log = run_dir.join("moto.log");
    let pid = procs::spawn_detached(cmd, &log, Path::new(PID_FILE))?;
    tracing::info!(pid, %addr, server = %server.display(), "started moto");
    let t = Instant::now();
    loop {
        if http_ok(addr) {
            break;
        }
        if !procs::alive(pid as i32) {
            bail!(
                "moto_server (pid {pid}) exited during start-up; its log {}:\n{}",
                log.display(),
                procs::tail(&log, 20)
            );
        }
        if t.elapsed() > Duration::from_secs(30) {
            bail!(
                "moto_server did not answer on {addr} within 30 s; its log {}:\n{}",
                log.display(),
                procs::tail(&log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(run_dir.join("moto.addr"), addr.to_string())?;
    tracing::info!(elapsed = ?t.elapsed(), "moto answers");
    Ok(addr)
}

/// Whether an HTTP request to moto gets an HTTP answer.
fn http_ok(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    matches!(s.read(&mut buf), Ok(n) if n >= 5 && &buf[..5] == b"HTTP/")
}
