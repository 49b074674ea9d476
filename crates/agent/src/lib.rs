//! vpc-cni-agent as a library: the node agent that learns the node from IMDS, sets up the host
//! network and the ENIs, keeps the address pool and its checkpoint, serves the plugin, and
//! signals readiness by installing the plugin and writing the CNI network configuration.
//!
//! The binary (`src/main.rs`) parses the configuration, sets up logging and calls [`run`].
//!
//! Modules, each importing only modules above it in this list:
//! - [`config`], [`checkpoint`], [`install`] (→ config), [`clock`] (→ checkpoint), [`state`]
//!   (→ checkpoint, clock): the configuration, the pool's checkpoint, the plugin install, the
//!   agent's step-proof clock, the pool and its requests;
//! - [`recovery`] (→ checkpoint, clock, state): the allocations at start, from the checkpoint
//!   or, when it is torn or missing, from the node's pod wiring;
//! - [`cloud_api`]: the seam to EC2 ([`cloud_api::Cloud`]);
//! - [`node_net`]: the seam to the node's network ([`node_net::NodeNet`]);
//! - [`startup`] (→ config, cloud_api, node_net): the node's start-up from IMDS;
//! - [`provisioner`] (→ checkpoint, cloud_api, node_net, state): the warm pool through EC2;
//! - [`http`] (→ state), [`server`] (→ http, state): metrics, introspection, plugin socket;
//! - [`housekeeping`]: reaping retired veths, malloc tuning;
//! - [`swap`] (→ checkpoint, config, install, startup, state): adopting a node aws-node wired, and
//!   handing it back (`vpc-cni-agent uninstall --to aws-node`);
//! - [`run`] (→ all): the agent's life from configuration to SIGTERM.

pub mod checkpoint;
pub mod clock;
pub mod cloud_api;
pub mod config;
pub mod housekeeping;
pub mod http;
pub mod install;
pub mod node_net;
pub mod provisioner;
pub mod recovery;
pub mod run;
pub mod server;
pub mod startup;
pub mod state;
pub mod swap;

pub use run::{AgentError, run, runtime};
