//! The lab's network: named network namespaces (`vpclab-*`) and commands run inside them, on
//! the `netns` crate; and the VPC fabric — subnet bridges, the router, ARP answers and the
//! source/destination check — derived from the EC2 world of `lab-aws`.

pub mod fabric;
pub mod ns;
