//! The plugin's two boundaries — the agent socket and the kernel (via crate `dataplane`) —
//! behind one trait, so the verbs can be unit-tested with a fake.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

use dataplane::{DataplaneError, PodLinks, PodSpec, PodTeardown, TeardownError};
use nix::fcntl::OFlag;
use nix::sys::statfs::{FsType, NSFS_MAGIC, fstatfs, statfs};
use proto::{ProtoError, Request, Response};

/// What `CNI_NETNS` turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsState {
    /// A network namespace other than the plugin's own.
    Usable,
    /// Nothing exists at the path.
    Missing,
    /// The plugin's own namespace (wiring it as a pod would break the node).
    Own,
    /// The path exists but is not an enterable network namespace.
    Unusable(String),
}

pub trait Backend {
    /// Inspect `CNI_NETNS`.
    fn probe_netns(&self, path: &Path) -> NetnsState;
    /// One request/response with the agent at `socket`, all of it by `deadline`.
    fn call_agent(
        &self,
        socket: &Path,
        req: &Request,
        deadline: Instant,
    ) -> Result<Response, ProtoError>;
    /// Wire the pod (veth pair, addresses, routes, neighbour, host routes and rules).
    fn setup_pod(&self, spec: &PodSpec) -> Result<PodLinks, DataplaneError>;
    /// Verify the pod's wiring ([`DataplaneError::CheckFailed`] lists every difference).
    fn check_pod(&self, spec: &PodSpec) -> Result<(), DataplaneError>;
    /// Remove what `setup_pod` created; idempotent. Every step runs; the error holds every
    /// failure.
    fn teardown_pod(&self, t: &PodTeardown) -> Result<(), TeardownError>;
}

/// The real thing: `proto::call` and the `dataplane` crate.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealBackend;

impl Backend for RealBackend {
    fn probe_netns(&self, path: &Path) -> NetnsState {
        probe_netns(path)
    }

    fn call_agent(
        &self,
        socket: &Path,
        req: &Request,
        deadline: Instant,
    ) -> Result<Response, ProtoError> {
        proto::call(socket, req, deadline)
    }

    fn setup_pod(&self, spec: &PodSpec) -> Result<PodLinks, DataplaneError> {
        dataplane::setup_pod(spec)
    }

    fn check_pod(&self, spec: &PodSpec) -> Result<(), DataplaneError> {
        dataplane::check_pod(spec)
    }

    fn teardown_pod(&self, t: &PodTeardown) -> Result<(), TeardownError> {
        dataplane::teardown_pod(t)
    }
}

/// Inspects `CNI_NETNS` without ever blocking: only a regular file on nsfs is opened at all
/// (`stat` and `statfs` first: opening a FIFO blocks until a writer comes, opening a device
/// may do anything), and the open is `O_NONBLOCK | O_NOCTTY` in case the path changed in
/// between, after which the opened file is checked again. Needs no privilege, unlike setns.
pub fn probe_netns(path: &Path) -> NetnsState {
    // stat follows symlinks (/proc/<pid>/ns/net is one); a namespace file is a regular file
    // on nsfs; a leftover plain file (a mount point whose namespace was unmounted) is not
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return NetnsState::Missing,
        Err(e) => return NetnsState::Unusable(format!("stat: {e}")),
    };
    if !meta.is_file() {
        return NetnsState::Unusable(format!(
            "is {}, not a network namespace file",
            file_kind(meta.file_type())
        ));
    }
    match statfs(path) {
        Ok(st) if st.filesystem_type() == NSFS_MAGIC => {}
        Ok(st) => return not_nsfs(st.filesystem_type()),
        Err(e) => return NetnsState::Unusable(format!("statfs: {e}")),
    }
    let flags = OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return NetnsState::Missing,
        Err(e) => return NetnsState::Unusable(format!("open: {e}")),
    };
    match fstatfs(file.as_fd()) {
        Ok(st) if st.filesystem_type() == NSFS_MAGIC => {}
        Ok(st) => return not_nsfs(st.filesystem_type()),
        Err(e) => return NetnsState::Unusable(format!("statfs: {e}")),
    }
    let ours = match std::fs::metadata(netns::THREAD_SELF_NETNS) {
        Ok(m) => m,
        Err(e) => {
            return NetnsState::Unusable(format!("stat {}: {e}", netns::THREAD_SELF_NETNS));
        }
    };
    let theirs = match file.metadata() {
        Ok(m) => m,
        Err(e) => return NetnsState::Unusable(format!("fstat: {e}")),
    };
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        NetnsState::Own
    } else {
        NetnsState::Usable
    }
}

fn not_nsfs(fs_type: FsType) -> NetnsState {
    NetnsState::Unusable(format!(
        "not a namespace file (filesystem type {:#x})",
        fs_type.0
    ))
}

/// What a file that is not a regular file is, for messages (`CNI_NETNS`, `pluginLogFile`).
pub(crate) fn file_kind(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_never_blocks_and_names_what_it_found() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        let unusable = |p: &Path| match probe_netns(p) {
            NetnsState::Unusable(why) => why,
            other => panic!("{}: {other:?}", p.display()),
        };
        assert!(unusable(&fifo).contains("is a FIFO"));
        assert!(unusable(dir.path()).contains("is a directory"));
        assert!(unusable(Path::new("/dev/null")).contains("character device"));
        assert!(unusable(&plain).contains("not a namespace file"));
        assert_eq!(
            probe_netns(&dir.path().join("missing")),
            NetnsState::Missing
        );
        assert_eq!(probe_netns(Path::new("/proc/self/ns/net")), NetnsState::Own);
        assert_eq!(
            probe_netns(Path::new(netns::THREAD_SELF_NETNS)),
            NetnsState::Own
        );
    }
}
