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
//! - [`max_pods`]: instance types as max pods needs them, and the reference's max-pods values;
//! - [`cloud_api`] (→ max_pods): the seam to EC2 ([`cloud_api::Cloud`]);
//! - [`node_net`]: the seam to the node's network ([`node_net::NodeNet`]);
//! - [`startup`] (→ config, cloud_api, node_net): the node's start-up from IMDS;
//! - [`provisioner`] (→ checkpoint, cloud_api, node_net, state): the warm pool through EC2;
//! - [`build_info`]: the version and git commit of this build;
//! - [`health`] (→ cloud_api): what the probes answer (heartbeats, readiness), and the EC2
//!   seam that remembers EC2's last refusal to add addresses;
//! - [`http`] (→ build_info, config, health, state), [`server`] (→ http, state): metrics,
//!   introspection and probes, plugin socket;
//! - [`housekeeping`] (→ health): reaping retired veths, malloc tuning;
//! - [`init`] (→ config, install, startup): `vpc-cni-agent init`, the DaemonSet's init
//!   container (plugin binaries, host sysctls);
//! - [`swap`] (→ checkpoint, config, install, startup, state): adopting a node aws-node wired, and
//!   handing it back (`vpc-cni-agent uninstall --to aws-node`);
//! - [`rbac`]: the Kubernetes API permissions the agent uses (none yet), for the ClusterRole;
//! - [`run`] (→ all): the agent's life from configuration to SIGTERM.

pub mod build_info;
pub mod checkpoint;
pub mod clock;
pub mod cloud_api;
pub mod config;
pub mod health;
pub mod housekeeping;
pub mod http;
pub mod init;
pub mod install;
pub mod k8s;
pub mod max_pods;
pub mod node_net;
pub mod provisioner;
pub mod rbac;
pub mod recovery;
pub mod run;
pub mod server;
pub mod startup;
pub mod state;
pub mod swap;

pub use run::{AgentError, run, runtime};
