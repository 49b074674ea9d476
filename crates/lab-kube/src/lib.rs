//! The lab's Kubernetes API server: an honest stand-in for kube-apiserver for the objects
//! vpc-cni's agent uses (core/v1 nodes, pods and events, and `ENIConfig`s of
//! `crd.k8s.amazonaws.com/v1alpha1`), with the API's real paths, JSON shapes and semantics
//! (get, list, watch, create, update, patch, delete, `Status` errors, resourceVersions) over
//! plain HTTP, so that a real client (kube-rs, kubectl) works against it. Dev tooling: nothing
//! shipped depends on it. What it does not emulate: docs/testing.md, "The lab's Kubernetes API
//! (lab-kube)".
//!
//! ```no_run
//! # async fn demo() -> Result<(), lab_kube::Error> {
//! let store = lab_kube::Store::new();
//! store.put(lab_kube::EniConfig::new("us-west-2a", "subnet-1", &["sg-1"]))?;
//! let server = lab_kube::Server::new(store.clone());
//! let running = server.start("127.0.0.1:0".parse().expect("an address")).await?;
//! lab_kube::write_kubeconfig(std::path::Path::new("/tmp/kubeconfig"), &running.url())?;
//! // … the API server goes down mid-run, and comes back with the same objects:
//! let addr = running.addr();
//! running.stop().await?;
//! let running = server.start(addr).await?;
//! # drop(running); Ok(()) }
//! ```

mod api;
mod http;
mod patch;
mod resource;
mod select;
mod server;
mod status;
mod store;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use resource::{
    ENICONFIG_GROUP, ENICONFIG_VERSION, EniConfig, EniConfigSpec, EniConfigStatus, Kind, Resource,
};
pub use server::{Running, Server, write_kubeconfig};
pub use store::{DEFAULT_HISTORY, Store};

/// Whether `key` is a valid label (or annotation) key, as the API validates it: an optional
/// DNS-subdomain prefix and `/`, then at most 63 alphanumerics, `-`, `_` or `.`.
pub fn valid_label_key(key: &str) -> bool {
    select::valid_key(key)
}

/// Whether `value` is a valid label value (empty, or at most 63 alphanumerics, `-`, `_` or
/// `.`, beginning and ending with an alphanumeric).
pub fn valid_label_value(value: &str) -> bool {
    select::valid_value(value)
}

/// What can go wrong running the server or using its store directly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding the lab Kubernetes API server to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the lab Kubernetes API server on {addr} failed: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the lab Kubernetes API server on {addr} did not stop within {} s", .waited.as_secs())]
    StopTimeout { addr: SocketAddr, waited: Duration },
    #[error("writing the kubeconfig {}: {source}", .path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The store refused an object (as the API would: code, reason, message naming the field).
    #[error("the lab Kubernetes store refused the object ({code} {reason}): {message}")]
    Rejected {
        code: u16,
        reason: String,
        message: String,
    },
    #[error("lab-kube internal error: {0}")]
    Internal(String),
}
