//! CNI specification types for spec versions 0.3.0 – 1.1.0: the environment, the request
//! configuration, results in every version's shape, errors and their codes.
//!
//! No I/O here beyond parsing what the caller hands in: the plugin reads the process
//! environment and stdin and passes them to [`Env::from_vars`] and [`NetConf::parse`].

pub mod config;
pub mod env;
pub mod error;
pub mod result;
pub mod version;

pub use config::{Attachment, NetConf, peek_version};
pub use env::{CniArgs, CniArgsError, Command, Env, validate_container_id, validate_ifname};
pub use error::{CniError, code};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use version::{LATEST, SUPPORTED_VERSIONS, Version, version_info};
