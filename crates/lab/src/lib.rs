//! The lab's control, as a library: where its files are (`paths`) and what they hold
//! (`store`), bringing it up and down and running the agents (`control`), the daemon that
//! serves IMDS and the EC2 proxy and keeps the fabric in line with EC2 (`daemon`), a container
//! runtime's pods (`pods`), the seed's connectivity matrix and demo (`matrix`), and a node as
//! aws-node v1.23 leaves it, with its judge (`aws_node`).
//!
//! `vpc-lab` is its command line; `lab-bench` and the lab tests call it directly.
//!
//! Module order (each uses only those before it): paths → store → pods → aws_node → daemon →
//! control → matrix.

pub mod aws_node;
pub mod control;
pub mod daemon;
pub mod matrix;
pub mod paths;
pub mod pods;
pub mod store;
