//! Everything that can go wrong in the plugin, and — in [`PluginError::to_cni`], the one place
//! that does it — the CNI error code and message each failure is reported with.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use cni::{CniError, code};
use dataplane::{DataplaneError, TeardownError};
use proto::{AttachmentKey, ProtoError};

/// Plugin-specific error codes (the spec reserves 0–99).
pub mod plugin_code {
    /// Wiring the pod's network (veth, addresses, routes, rules) failed.
    pub const POD_SETUP_FAILED: u32 = 100;
    /// CHECK found the pod's network not as ADD left it.
    pub const CHECK_FAILED: u32 = 101;
    /// Some of the pod's network could not be removed (DEL or GC).
    pub const TEARDOWN_FAILED: u32 = 102;
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// Already a CNI error (environment, configuration, version checks).
    #[error(transparent)]
    Cni(#[from] CniError),

    /// `CNI_NETNS` names a file that does not exist.
    #[error("CNI_NETNS {path} does not exist")]
    NetnsMissing { path: PathBuf },

    /// `CNI_NETNS` exists but cannot be used.
    #[error("CNI_NETNS {path} cannot be used: {reason}")]
    NetnsUnusable { path: PathBuf, reason: String },

    /// `CNI_NETNS` is the namespace the plugin itself runs in (it would wire the node).
    #[error("CNI_NETNS {path} is the plugin's own network namespace")]
    NetnsIsOwn { path: PathBuf },

    /// The agent could not be reached, or the conversation with it failed.
    #[error("vpc-cni agent at {socket}: {source}")]
    Agent {
        socket: PathBuf,
        #[source]
        source: ProtoError,
    },

    /// The agent answered with an error (its code is a CNI code).
    #[error("vpc-cni agent: {message} (code {code})")]
    AgentRefused { code: u32, message: String },

    /// The agent answered with a response that does not fit the request.
    #[error("vpc-cni agent answered {got} to {request}")]
    AgentUnexpected { request: &'static str, got: String },

    /// STATUS: the plugin cannot serve ADD right now.
    #[error("vpc-cni is not available: {reason}")]
    NotAvailable { reason: String },

    /// ADD: wiring the pod failed. `release` says what happened to the address.
    #[error("setting up pod network failed: {source}")]
    Setup {
        ip: Ipv4Addr,
        #[source]
        source: DataplaneError,
        release: Release,
    },

    /// CHECK: prevResult and the agent's record disagree.
    #[error("check failed: {what}")]
    Check { what: String },

    /// CHECK: the pod's wiring differs from what ADD set up (or could not be inspected).
    #[error("check failed: {0}")]
    CheckWiring(#[source] DataplaneError),

    /// DEL: these parts of the pod's network could not be removed.
    #[error("teardown failed: {}", joined(&source.errors))]
    Teardown {
        #[source]
        source: TeardownError,
    },

    /// GC: these released attachments' host routes and rules could not all be removed.
    #[error("teardown failed: {}", gc_details(failed))]
    GcTeardown { failed: Vec<GcFailure> },

    /// A panic, reported rather than leaving stdout empty.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A released attachment whose host side GC could not fully remove.
#[derive(Debug)]
pub struct GcFailure {
    pub key: AttachmentKey,
    pub ip: Ipv4Addr,
    pub error: TeardownError,
}

/// Every error of a teardown, `; `-separated.
fn joined(errors: &[DataplaneError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Every error of every failed GC teardown, each prefixed with its attachment and address.
fn gc_details(failed: &[GcFailure]) -> String {
    failed
        .iter()
        .flat_map(|f| {
            f.error
                .errors
                .iter()
                .map(move |e| format!("{} ({}): {e}", f.key, f.ip))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// What became of the address after a failed ADD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    Released,
    /// Not released: the attachment held the address before this ADD.
    Kept,
    Failed(String),
}

impl PluginError {
    /// The CNI error this failure is reported as. Every code is chosen here.
    pub fn to_cni(&self) -> CniError {
        match self {
            PluginError::Cni(e) => e.clone(),
            PluginError::NetnsMissing { path } => CniError::new(
                code::INVALID_ENVIRONMENT_VARIABLES,
                format!("CNI_NETNS {} does not exist", path.display()),
                format!(
                    "CNI_NETNS names the pod's network namespace; nothing exists at {}",
                    path.display()
                ),
            ),
            PluginError::NetnsUnusable { path, reason } => CniError::new(
                code::INVALID_ENVIRONMENT_VARIABLES,
                format!("CNI_NETNS {} cannot be used", path.display()),
                reason.clone(),
            ),
            PluginError::NetnsIsOwn { path } => CniError::new(
                code::INVALID_NETNS,
                format!(
                    "CNI_NETNS {} is the plugin's own network namespace",
                    path.display()
                ),
                "refusing to wire the node's namespace as a pod".to_string(),
            ),
            PluginError::Agent { socket, source } => {
                let (msg, details) = if source.is_unreachable() {
                    (
                        format!(
                            "the vpc-cni agent is not reachable at {}; try again later",
                            socket.display()
                        ),
                        format!(
                            "{source}. Check that the vpc-cni-agent pod is running on this node \
                             and ready, that it created {}, and that agentSocket in the CNI \
                             config matches the agent's VPC_CNI_AGENT_SOCKET",
                            socket.display()
                        ),
                    )
                } else {
                    (
                        format!(
                            "talking to the vpc-cni agent at {} failed; try again later",
                            socket.display()
                        ),
                        source.to_string(),
                    )
                };
                CniError::new(code::TRY_AGAIN_LATER, msg, details)
            }
            // The agent speaks CNI codes; 0 would read as success, so it becomes internal.
            PluginError::AgentRefused { code: 0, message } => {
                CniError::new(code::INTERNAL, message.clone(), "the agent sent code 0")
            }
            PluginError::AgentRefused { code, message } => {
                CniError::new(*code, message.clone(), String::new())
            }
            PluginError::AgentUnexpected { request, got } => CniError::new(
                code::INTERNAL,
                format!("unexpected reply from the vpc-cni agent to {request}"),
                got.clone(),
            ),
            PluginError::NotAvailable { reason } => CniError::new(
                code::PLUGIN_NOT_AVAILABLE,
                "vpc-cni is not ready to add pods",
                reason.clone(),
            ),
            PluginError::Setup {
                ip,
                source: reason,
                release,
            } => CniError::new(
                plugin_code::POD_SETUP_FAILED,
                format!("failed to set up the pod network for {ip}"),
                match release {
                    Release::Released => format!("{reason}; the address {ip} was released"),
                    Release::Kept => format!(
                        "{reason}; the attachment already held {ip} before this ADD, so it stays assigned until DEL"
                    ),
                    Release::Failed(e) => {
                        format!("{reason}; releasing the address {ip} also failed: {e}")
                    }
                },
            ),
            PluginError::Check { what } => CniError::new(
                plugin_code::CHECK_FAILED,
                "pod network differs from what ADD set up",
                what.clone(),
            ),
            PluginError::CheckWiring(e) => CniError::new(
                plugin_code::CHECK_FAILED,
                "pod network differs from what ADD set up",
                e.to_string(),
            ),
            PluginError::Teardown { source } => CniError::new(
                plugin_code::TEARDOWN_FAILED,
                "some of the pod network could not be removed",
                joined(&source.errors),
            ),
            PluginError::GcTeardown { failed } => CniError::new(
                plugin_code::TEARDOWN_FAILED,
                "some of the pod network could not be removed",
                gc_details(failed),
            ),
            PluginError::Internal(what) => {
                CniError::new(code::INTERNAL, "internal error in vpc-cni", what.clone())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_agent_is_try_again_later_and_says_what_to_check() {
        let e = PluginError::Agent {
            socket: "/run/vpc-cni/agent.sock".into(),
            source: ProtoError::Connect {
                path: "/run/vpc-cni/agent.sock".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            },
        }
        .to_cni();
        assert_eq!(e.code, 11);
        assert!(e.msg.contains("/run/vpc-cni/agent.sock"), "{e}");
        assert!(e.details.contains("vpc-cni-agent"), "{e}");
        assert!(e.details.contains("agentSocket"), "{e}");
    }

    #[test]
    fn codes() {
        let c = |e: PluginError| e.to_cni().code;
        assert_eq!(c(PluginError::NetnsMissing { path: "/x".into() }), 4);
        assert_eq!(c(PluginError::NetnsIsOwn { path: "/x".into() }), 8);
        assert_eq!(
            c(PluginError::AgentRefused {
                code: 3,
                message: "unknown".into()
            }),
            3
        );
        assert_eq!(
            c(PluginError::AgentRefused {
                code: 0,
                message: "?".into()
            }),
            999
        );
        assert_eq!(
            c(PluginError::NotAvailable {
                reason: "no ENI".into()
            }),
            50
        );
        assert_eq!(
            c(PluginError::Check {
                what: "address".into()
            }),
            101
        );
        assert_eq!(
            c(PluginError::CheckWiring(DataplaneError::CheckFailed {
                problems: vec!["address".into()]
            })),
            101
        );
        let invalid = || DataplaneError::Invalid {
            what: "MTU",
            value: "a".into(),
        };
        assert_eq!(
            c(PluginError::Teardown {
                source: TeardownError {
                    errors: vec![invalid()]
                }
            }),
            102
        );
        let gc = PluginError::GcTeardown {
            failed: vec![GcFailure {
                key: AttachmentKey {
                    network: "n".into(),
                    container_id: "c".into(),
                    ifname: "eth0".into(),
                },
                ip: Ipv4Addr::new(10, 99, 0, 3),
                error: TeardownError {
                    errors: vec![invalid(), invalid()],
                },
            }],
        }
        .to_cni();
        assert_eq!(gc.code, 102);
        assert_eq!(
            gc.details,
            "n/c/eth0 (10.99.0.3): invalid MTU: a; n/c/eth0 (10.99.0.3): invalid MTU: a"
        );
        let e = PluginError::Setup {
            ip: Ipv4Addr::new(10, 99, 0, 2),
            source: DataplaneError::InterfaceExists {
                ifname: "eth0".into(),
                netns: "/run/netns/p".into(),
            },
            release: Release::Released,
        }
        .to_cni();
        assert_eq!(e.code, 100);
        assert!(e.details.contains("interface eth0 already exists"));
        assert!(e.details.contains("released"));
    }
}
