//! The local VPC: network namespaces, an EC2 API (moto), IMDS and the VPC fabric.

pub mod daemon;
pub mod fabric;
pub mod imds;
pub mod matrix;
pub mod moto;
pub mod ns;
pub mod pods;
pub mod provision;
pub mod relay;
pub mod world;
