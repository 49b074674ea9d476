//! vpc-lab: the local VPC — network namespaces, an EC2 API (moto), IMDS and the VPC fabric.

mod daemon;
mod fabric;
mod imds;
mod matrix;
mod moto;
mod ns;
mod pods;
mod provision;
mod relay;
mod world;

fn main() {}
