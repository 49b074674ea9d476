//! Entering Linux network namespaces safely.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the *calling thread* only. Doing it on a
//! thread that is reused afterwards (a thread pool, a tokio worker, the main thread of a
//! plugin that still has work to do in the host namespace) is the classic source of "the
//! route landed in the wrong namespace" bugs. [`NetNs::run`] therefore never touches the
//! caller's thread: it spawns a fresh thread, enters the namespace there, runs the closure,
//! and lets the thread end.
//!
//! Things that follow the *thread's* namespace and therefore work inside [`NetNs::run`]:
//! sockets created there (netlink sockets stay bound to the namespace they were created in,
//! even when used from another thread later), `/proc/sys/net/...`,
//! `/proc/thread-self/net/...`, and child processes spawned from that thread. Things that do
//! **not** follow it: `/proc/self/net/...` (the main thread's view) and `/sys/class/net`
//! (whatever sysfs was mounted) — use netlink instead.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// Path naming the calling thread's own network namespace.
pub const THREAD_SELF_NETNS: &str = "/proc/thread-self/ns/net";

/// Errors of this crate. Every variant names the namespace path involved.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace file does not exist (the pod's namespace is gone, or never existed).
    #[error("network namespace {path} does not exist")]
    NotFound { path: PathBuf },
    /// The file exists but could not be opened.
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is not a network namespace (or the kernel refused to enter it).
    #[error("cannot enter network namespace {path}: {source}")]
    Setns {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// The helper thread could not be spawned.
    #[error("cannot spawn a thread to enter network namespace {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl NetnsError {
    /// True when the namespace file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, NetnsError::NotFound { .. })
    }
}

/// An open handle on a network namespace (the namespace stays alive while this is open).
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl fmt::Debug for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetNs")
            .field("path", &self.path)
            .field("fd", &self.file.as_raw_fd())
            .finish()
    }
}

impl NetNs {
    /// Opens the network namespace at `path` (e.g. `/run/netns/x` or `/proc/<pid>/ns/net`).
    ///
    /// A missing file gives [`NetnsError::NotFound`]. The file is not validated as a
    /// network namespace here; [`NetNs::run`] reports a non-namespace file when entering it.
    pub fn open(path: &Path) -> Result<NetNs, NetnsError> {
        match File::open(path) {
            Ok(file) => Ok(NetNs {
                file,
                path: path.to_path_buf(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(NetnsError::NotFound {
                path: path.to_path_buf(),
            }),
            Err(source) => Err(NetnsError::Open {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// The calling thread's current network namespace (via `/proc/thread-self/ns/net`,
    /// which, unlike `/proc/self/ns/net`, is right in a multi-threaded process).
    pub fn current() -> Result<NetNs, NetnsError> {
        NetNs::open(Path::new(THREAD_SELF_NETNS))
    }

    /// The path this handle was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw file descriptor (e.g. for `IFLA_NET_NS_FD`).
    pub fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The file descriptor, borrowed.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// An identifier of the namespace: `(device, inode)` of the nsfs file. Two handles refer
    /// to the same namespace iff their identifiers are equal.
    pub fn id(&self) -> io::Result<(u64, u64)> {
        let m = self.file.metadata()?;
        Ok((m.dev(), m.ino()))
    }

    /// Duplicates the handle (a new file descriptor on the same namespace).
    pub fn try_clone(&self) -> io::Result<NetNs> {
        Ok(NetNs {
            file: self.file.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// True when the calling thread is currently in this namespace.
    pub fn is_current(&self) -> Result<bool, NetnsError> {
        let cur = NetNs::current()?;
        let a = self.id().map_err(|source| NetnsError::Open {
            path: self.path.clone(),
            source,
        })?;
        let b = cur.id().map_err(|source| NetnsError::Open {
            path: cur.path.clone(),
            source,
        })?;
        Ok(a == b)
    }

    /// Runs `f` on a freshly spawned thread that first enters this namespace, and returns
    /// its result. The caller's thread never changes namespace; the helper thread ends when
    /// `f` returns. `f` may borrow from the caller (scoped thread). A panic in `f` is
    /// propagated to the caller.
    pub fn run<F, T>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let fd = self.file.as_fd();
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name("netns".into())
                .spawn_scoped(s, move || -> Result<T, NetnsError> {
                    setns(fd, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Setns {
                        path: self.path.clone(),
                        source,
                    })?;
                    Ok(f())
                })
                .map_err(|source| NetnsError::Spawn {
                    path: self.path.clone(),
                    source,
                })?;
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for NetNs {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    //! Tests that need no privilege. Entering namespaces needs root: those tests are in
    //! `tests/enter.rs`, where they can use `testkit`'s namespaces.

    use super::*;

    #[test]
    fn open_missing_is_not_found_and_names_path() {
        let err = NetNs::open(Path::new("/nonexistent/vpccni/ns")).unwrap_err();
        assert!(err.is_not_found());
        assert!(err.to_string().contains("/nonexistent/vpccni/ns"), "{err}");
    }

    #[test]
    fn current_is_current() {
        let cur = NetNs::current().unwrap();
        assert!(cur.is_current().unwrap());
        let clone = cur.try_clone().unwrap();
        assert_eq!(cur.id().unwrap(), clone.id().unwrap());
    }
}
