//! vpc-cni's only door to AWS: EC2 through the AWS SDK for Rust and IMDSv2 through
//! `aws_config::imds`, exposed with domain types (no SDK types in the public API).

mod ec2;
mod error;
mod imds;
mod parse;

pub use ec2::{
    Ec2, EniAttachment, Filter, Instance, InstanceEni, InstanceTypeLimits, IpRequest,
    NetworkInterface, NewEni, Subnet, Tags, Vpc,
};
pub use error::CloudError;
pub use imds::{
    ENDPOINT_ENV as IMDS_ENDPOINT_ENV, EniMetadata, ImdsMetadata, InstanceMetadata, Metadata,
};
