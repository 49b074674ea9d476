//! The lab's EC2 emulation, without namespaces: the world model rebuilt from EC2 (moto), moto
//! itself, the EC2 fidelity proxy that behaves like EC2 where moto does not, IMDSv2 derived
//! from the world, and the seed's provisioning through the real SDK.
//!
//! Where a file lives is the caller's business: functions that read or write lab files take
//! the path (`lab::paths` holds them).

pub mod ec2proxy;
pub mod fidelity;
pub mod imds;
pub mod moto;
pub mod seed;
pub mod world;
