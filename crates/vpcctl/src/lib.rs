//! vpcctl: a node's vpc-cni state as the node's agent holds it — ENIs, addresses and their
//! state, pods, lost addresses, cooldowns, warm-pool targets and limits — and the answer to
//! "why has this pod no address?". It reads the agent's introspection endpoint only
//! ([`client`]); never EC2 or Kubernetes.
//!
//! Modules, each importing only modules above it:
//! - [`doc`]: the agent's documents (`/v1/state`, `/v1/enis`) as typed values;
//! - [`client`] (→ doc): GETs to the agent, with a deadline and errors that say what to check;
//! - [`show`] (→ doc): `status`, `enis`, `pods` as text;
//! - [`why`] (→ doc, show): the answer for one pod.
//!
//! Everything but [`client`] is pure: the tests feed it documents the agent's own code wrote.

pub mod client;
pub mod doc;
pub mod show;
pub mod why;
