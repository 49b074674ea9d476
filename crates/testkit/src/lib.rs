//! Test and lab tooling shared by every crate's tests, the lab and the benchmarks: the root
//! check, test network namespaces, moto for tests, a CNI runtime harness and percentiles.
//!
//! Dev tooling only: the agent and the plugin never depend on this crate.
//!
//! Root-only tests are marked `#[ignore = "root: …"]` and start with [`require_root`]: a run
//! without root lists them as ignored (never as passed), and `make test`, which runs as root,
//! passes `--include-ignored`, so CI fails if one of them cannot run.

pub mod cni;
pub mod fuzz;
pub mod moto;
pub mod procs;
pub mod repo;
mod root;
pub mod stats;
mod testns;

pub use root::{is_root, require_root};
pub use testns::TestNs;
