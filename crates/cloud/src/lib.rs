//! vpc-cni's only door to AWS: EC2 through the AWS SDK for Rust and IMDSv2 through
//! `aws_config::imds`, exposed with domain types (no SDK types in the public API).
//!
//! - [`Ec2`]: one SDK client (`Ec2::from_env` = the standard chain: `AWS_REGION`, credentials,
//!   `AWS_ENDPOINT_URL_EC2`) with the calls the agent makes: ENIs, their addresses, instance-type
//!   limits, IPv4 prefixes (`assign_ipv4_prefixes`, `unassign_ipv4_prefixes`, prefixes at
//!   creation). Errors name the EC2 operation and the AWS error code ([`CloudError::code`],
//!   [`CloudError::is_throttling`], [`CloudError::is_insufficient_cidr_blocks`]).
//! - `lab` (feature `lab`, for the lab and tests only): VPCs, subnets, security groups, tags,
//!   instances, and `Ec2::for_endpoint` for an emulator. `aws-sdk-ec2` is compiled once, here.
//! - [`ImdsMetadata`]: IMDSv2 via the SDK client (`AWS_EC2_METADATA_SERVICE_ENDPOINT`), read
//!   into [`InstanceMetadata`] behind the [`Metadata`] trait.
//!
//! Emulator (moto 5.2.5) notes, checked by `tests/moto_ec2.rs`: AssignPrivateIpAddresses
//! answers with every address of the ENI, so [`Ec2::assign_private_ip_addresses`] diffs the
//! answer against a describe taken just before (so does [`Ec2::assign_ipv4_prefixes`]); moto
//! does not reflect DeleteOnTermination, has no prefix delegation at all (the lab's EC2 proxy,
//! `lab_aws::ec2proxy`, answers the prefix calls itself), and enforces no ENI/IP limits.

mod ec2;
mod error;
mod imds;
#[cfg(feature = "lab")]
pub mod lab;
mod parse;
mod stats;

pub use ec2::{
    Ec2, EniAttachment, Filter, InstanceTypeInfo, InstanceTypeLimits, IpRequest, NetworkInterface,
    NewEni, Subnet, Tags,
};
pub use error::CloudError;
pub use imds::{
    ENDPOINT_ENV as IMDS_ENDPOINT_ENV, EniMetadata, ImdsMetadata, InstanceMetadata, Metadata,
};
pub use stats::{ApiCount, ApiStats, MAX_ATTEMPTS};
