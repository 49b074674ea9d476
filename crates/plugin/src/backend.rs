//! The plugin's two boundaries — the agent socket and the kernel (via crate `dataplane`) —
//! behind one trait, so the verbs can be unit-tested with a fake.

use std::path::Path;
use std::time::Duration;

use dataplane::{DataplaneError, PodLinks, PodSpec, PodTeardown, TeardownError};
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
    /// One request/response with the agent at `socket`.
    fn call_agent(
        &self,
        socket: &Path,
        req: &Request,
        timeout: Duration,
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
        let ns = match netns::NetNs::open(path) {
            Ok(ns) => ns,
            Err(e) if e.is_not_found() => return NetnsState::Missing,
            Err(e) => return NetnsState::Unusable(e.to_string()),
        };
        // A namespace file lives on nsfs; a leftover plain file (a mount point whose
        // namespace was unmounted) does not. This needs no privilege, unlike setns.
        match nix::sys::statfs::fstatfs(ns.as_fd()) {
            Ok(st) if st.filesystem_type() == nix::sys::statfs::NSFS_MAGIC => {}
            Ok(st) => {
                return NetnsState::Unusable(format!(
                    "not a namespace file (filesystem type {:#x})",
                    st.filesystem_type().0
                ));
            }
            Err(e) => return NetnsState::Unusable(format!("statfs: {e}")),
        }
        match ns.is_current() {
            Ok(true) => NetnsState::Own,
            Ok(false) => NetnsState::Usable,
            Err(e) => NetnsState::Unusable(e.to_string()),
        }
    }

    fn call_agent(
        &self,
        socket: &Path,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, ProtoError> {
        proto::call(socket, req, timeout)
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
