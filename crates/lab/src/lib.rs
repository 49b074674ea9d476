//! The lab's control, as a library: where its files are (`paths`) and what they hold
//! (`store`), bringing it up and down and running the agents (`control`), the daemon that
//! serves IMDS and the EC2 proxy and keeps the fabric in line with EC2 (`daemon`), a container
//! runtime's pods (`pods`), the lab's Kubernetes API that the daemon serves and its control
//! (`kube`), the seed's connectivity matrix and demo (`matrix`), a node as
//! aws-node v1.23 leaves it, with its judge (`aws_node`), and a kubelet that runs the
//! DaemonSet's pod on an instance through containerd's CRI (`kubelet`).
//!
//! `vpc-lab` is its command line; `lab-bench` and the lab tests call it directly.
//!
//! Module order (each uses only those before it): paths → store → kube → pods → aws_node →
//! daemon → kubelet → control → matrix.

pub mod aws_node;
pub mod control;
pub mod daemon;
pub mod kube;
pub mod kubelet;
pub mod matrix;
pub mod paths;
pub mod pods;
pub mod store;
