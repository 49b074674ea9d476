//! Processes the lab and the tools start: detached spawning, pid files, and stopping them by
//! pid only after checking that `/proc/<pid>/cmdline` is still the process we started.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("opening log {path}: {source}")]
    Log {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("starting {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("writing pid file {path}: {source}")]
    PidFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("signalling pid {pid} from {pid_file}: {source}")]
    Signal {
        pid: i32,
        pid_file: std::path::PathBuf,
        source: nix::Error,
    },
}

/// Starts `cmd` detached (own session, stdin from /dev/null, stdout+stderr appended to `log`)
/// and writes its pid to `pid_file`.
pub fn spawn_detached(mut cmd: Command, log: &Path, pid_file: &Path) -> Result<u32, ProcError> {
    let log_err = |source| ProcError::Log {
        path: log.to_path_buf(),
        source,
    };
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(log_err)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().map_err(log_err)?)
        .stderr(out);
    // SAFETY: setsid(2) is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| ProcError::Spawn {
        program: cmd.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    let pid = child.id();
    std::fs::write(pid_file, format!("{pid}\n")).map_err(|source| ProcError::PidFile {
        path: pid_file.to_path_buf(),
        source,
    })?;
    // The child is left to run; it is reaped by whoever inherits it after we exit.
    std::mem::forget(child);
    Ok(pid)
}

pub fn read_pid(pid_file: &Path) -> Option<i32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

/// The process's argv, or None when it does not exist or is a zombie.
pub fn cmdline(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // state is the field after the ")" that closes comm
    let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// Whether `pid` is alive and every one of `markers` occurs in some argument of its cmdline.
pub fn is_ours(pid: i32, markers: &[&str]) -> bool {
    cmdline(pid).is_some_and(|argv| markers.iter().all(|m| argv.iter().any(|a| a.contains(m))))
}

/// Whether `pid` is alive (not a zombie).
pub fn alive(pid: i32) -> bool {
    cmdline(pid).is_some()
}

/// Stops the process in `pid_file` if it is still the one we started (`marker` in its
/// cmdline): SIGTERM (or SIGKILL when `hard`), wait up to `grace`, then SIGKILL.
/// Removes the pid file. Returns whether a process was signalled.
pub fn stop(
    pid_file: &Path,
    marker: &[&str],
    hard: bool,
    grace: Duration,
) -> Result<bool, ProcError> {
    let Some(pid) = read_pid(pid_file) else {
        let _ = std::fs::remove_file(pid_file);
        return Ok(false);
    };
    if !is_ours(pid, marker) {
        tracing::debug!(pid, pid_file = %pid_file.display(), "process already gone");
        let _ = std::fs::remove_file(pid_file);
        return Ok(false);
    }
    let p = Pid::from_raw(pid);
    kill(
        p,
        if hard {
            Signal::SIGKILL
        } else {
            Signal::SIGTERM
        },
    )
    .map_err(|source| ProcError::Signal {
        pid,
        pid_file: pid_file.to_path_buf(),
        source,
    })?;
    let t = Instant::now();
    while alive(pid) && t.elapsed() < grace {
        // Reap it if it happens to be our child (e.g. started by this process).
        let _ = nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive(pid) {
        tracing::warn!(pid, "did not exit after {grace:?}; sending SIGKILL");
        let _ = kill(p, Signal::SIGKILL);
        let t = Instant::now();
        while alive(pid) && t.elapsed() < Duration::from_secs(5) {
            let _ = nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = std::fs::remove_file(pid_file);
    Ok(true)
}

/// The last `n` lines of a log file (for error messages).
pub fn tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let lines: Vec<&str> = s.lines().collect();
            let start = lines.len().saturating_sub(n);
            lines[start..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
