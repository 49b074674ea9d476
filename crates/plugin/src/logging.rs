//! Logs: to `pluginLogFile` when configured (at `pluginLogLevel`, with warnings and errors
//! also on stderr), otherwise to stderr at `pluginLogLevel`. Never to stdout, which carries
//! the CNI result.
//!
//! The log file is only ever a regular file, opened without following a symlink and without
//! blocking (a FIFO would block the open forever; a device is never opened at all); one that
//! cannot be used is an error of the call ([`PluginError::LogFile`]), not a silent switch to
//! stderr. Writes to stderr wait for the runtime to drain it for at most the time left of
//! the call ([`BoundedStderr`]): a runtime that never reads stderr loses log lines, not the
//! answer.

use std::fs::{File, FileType, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, poll};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{DEFAULT_FILE_LOG_LEVEL, DEFAULT_STDERR_LOG_LEVEL, PluginConfig};
use crate::deadline::Deadline;
use crate::error::PluginError;

/// Install the global subscriber. Before the configuration is known (or when it is invalid),
/// `cfg` is `None`: warnings to stderr.
///
/// With `pluginLogFile`: the file gets `pluginLogLevel` (default info), stderr warnings and
/// errors. Without it: stderr gets `pluginLogLevel` (default warn). A `pluginLogFile` that
/// cannot be opened as a regular file is [`PluginError::LogFile`]; stderr is set up all the
/// same, so that the failure is logged there.
pub fn init(cfg: Option<&PluginConfig>, deadline: &Deadline) -> Result<(), PluginError> {
    let configured = cfg.and_then(|c| c.log_level);
    let (file, error) = match cfg.and_then(|c| c.log_file.as_deref()) {
        None => (None, None),
        Some(path) => match open_log_file(path) {
            Ok(f) => (Some(f), None),
            Err(reason) => (
                None,
                Some(PluginError::LogFile {
                    path: path.into(),
                    reason,
                }),
            ),
        },
    };
    let level = configured.unwrap_or(DEFAULT_FILE_LOG_LEVEL);
    let stderr_level = if file.is_some() {
        level.min(LevelFilter::WARN)
    } else {
        configured.unwrap_or(DEFAULT_STDERR_LOG_LEVEL)
    };
    let stderr = BoundedStderr::new(deadline);
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(move || stderr)
        .with_ansi(false)
        .with_target(false)
        .with_filter(stderr_level);
    let file = file.map(|f| {
        tracing_subscriber::fmt::layer()
            .with_writer(Mutex::new(f))
            .with_ansi(false)
            .with_target(false)
            .with_filter(level)
    });
    // Fails only if a subscriber is already installed (tests): keep that one.
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init();
    match error {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// Opens (creating it, and its directory, if missing) the log file at `path` for appending.
/// Only a regular file is accepted: nothing but a regular file is opened at all, the open
/// neither follows a symlink (`O_NOFOLLOW`) nor blocks (`O_NONBLOCK`: a FIFO swapped in
/// meanwhile fails with `ENXIO` or is refused by the `fstat` after the open), and the file the
/// plugin's stdout goes to is refused. The error says why, for the CNI error's details.
pub fn open_log_file(path: &Path) -> Result<File, String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.is_file() => return Err(not_regular(m.file_type())),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("cannot create its directory {}: {e}", dir.display()))?;
            }
        }
        Err(e) => return Err(format!("cannot be inspected: {e}")),
    }
    let flags = OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(flags.bits())
        .open(path)
        .map_err(|e| match e.raw_os_error().map(Errno::from_raw) {
            Some(Errno::ELOOP) => not_regular_text("a symbolic link"),
            Some(Errno::ENXIO) => not_regular_text("a FIFO or socket"),
            _ => format!("cannot be opened for appending: {e}"),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot be inspected: {e}"))?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    let stdout = io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .and_then(|fd| File::from(fd).metadata());
    if let Ok(out) = stdout
        && (out.dev(), out.ino()) == (meta.dev(), meta.ino())
    {
        return Err(
            "is the file the plugin's stdout is written to, which carries the CNI result".into(),
        );
    }
    Ok(file)
}

fn not_regular(t: FileType) -> String {
    not_regular_text(crate::backend::file_kind(t))
}

fn not_regular_text(what: &str) -> String {
    format!("is {what}, not a regular file")
}

/// The most one write to stderr hands the kernel: a pipe that poll(2) reports writable takes
/// this much without blocking (`PIPE_BUF`).
const STDERR_CHUNK: usize = 4096;

/// stderr, written without ever blocking past the call's deadline: each write first waits
/// (poll(2)) until stderr can take a chunk, for at most the time left, and fails with
/// `TimedOut` otherwise (the line is lost; the answer on stdout is not).
#[derive(Debug, Clone, Copy)]
pub struct BoundedStderr {
    deadline: Instant,
}

impl BoundedStderr {
    pub fn new(deadline: &Deadline) -> BoundedStderr {
        BoundedStderr {
            deadline: deadline.at(),
        }
    }
}

impl Write for BoundedStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let stderr = io::stderr();
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            let timeout = proto::poll_timeout(left);
            let mut fds = [PollFd::new(stderr.as_fd(), PollFlags::POLLOUT)];
            match poll(&mut fds, timeout) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "stderr is not being read",
                    ));
                }
                // writable, or in error (the write reports which)
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        stderr.lock().write(&buf[..buf.len().min(STDERR_CHUNK)])
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Panics report through [`BoundedStderr`] (the default hook writes to stderr without a
/// bound); `main` turns the panic itself into a CNI error on stdout.
pub fn install_panic_hook(deadline: &Deadline) {
    let stderr = BoundedStderr::new(deadline);
    std::panic::set_hook(Box::new(move |info| {
        let _ = writeln!(stderr.clone(), "vpc-cni: {info}");
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_regular_file_is_created_and_appended_to() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/plugin.log");
        open_log_file(&path).unwrap().write_all(b"one\n").unwrap();
        open_log_file(&path).unwrap().write_all(b"two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
    }

    #[test]
    fn anything_but_a_regular_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let link = dir.path().join("link");
        symlink(dir.path().join("target.log"), &link).unwrap();
        let sock = dir.path().join("sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        for (path, what) in [
            (fifo.as_path(), "a FIFO"),
            (link.as_path(), "a symbolic link"),
            (sock.as_path(), "a socket"),
            (dir.path(), "a directory"),
            (Path::new("/dev/null"), "a character device"),
            (Path::new("/dev/stdout"), "a symbolic link"),
        ] {
            let e = open_log_file(path).unwrap_err();
            assert!(e.contains(what), "{}: {e}", path.display());
            assert!(e.contains("regular file"), "{e}");
        }
        // the symlink's target was not created through it
        assert!(!dir.path().join("target.log").exists());
    }

    #[test]
    fn an_unwritable_place_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        // a path "under" a regular file cannot be created
        let e = open_log_file(&file.join("plugin.log")).unwrap_err();
        assert!(e.contains("cannot"), "{e}");
    }
}
