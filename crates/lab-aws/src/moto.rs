//! The EC2 API: moto's server on a free loopback port (the lab's only root-namespace listener).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use testkit::moto::{answers_http, find_server, free_port};
use testkit::procs;

/// The marker checked in /proc/<pid>/cmdline before signalling.
pub const MARKER: &[&str] = &["moto_server"];

/// moto's pid file in the lab's run directory.
pub fn pid_file(run_dir: &Path) -> PathBuf {
    run_dir.join("moto.pid")
}

/// Starts moto on a free 127.0.0.1 port and waits until it answers HTTP. Returns the address.
pub fn start(run_dir: &Path) -> Result<SocketAddr> {
    let server = find_server()?;
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()?).into();
    let mut cmd = Command::new(&server);
    cmd.args(["-H", "127.0.0.1", "-p", &addr.port().to_string()]);
    let log = run_dir.join("moto.log");
    let pid = procs::spawn_detached(cmd, &log, &pid_file(run_dir))?;
    tracing::info!(pid, %addr, server = %server.display(), "started moto");
    let t = Instant::now();
    loop {
        if answers_http(addr) {
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
