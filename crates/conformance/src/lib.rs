//! Test tooling that drives vpc-cni (or any CNI plugin) with container runtimes we did not
//! write: containerd's CRI plugin (over its CRI socket, with the `k8s-cri` bindings) and
//! `cnitool` (built by `scripts/setup-clients.sh` from Debian's source package of the CNI
//! library).
//!
//! - [`containerd`]: start a containerd inside a given network namespace with a generated
//!   config whose every directory lives under one directory, import the locally built pause
//!   image, and stop it again leaving nothing behind.
//! - [`cri`]: a CRI client (RunPodSandbox, PodSandboxStatus, StopPodSandbox, RemovePodSandbox,
//!   ListPodSandbox) and a concurrent burst of sandboxes with latency statistics.
//! - [`cnitool`]: run `cnitool add|check|del` inside a given network namespace.
//!
//! The binary `vpc-cni-conformance` exposes all of it as subcommands printing JSON.

pub mod cnitool;
pub mod containerd;
pub mod cri;
pub mod util;
