//! Everything that can go wrong in the plugin, and — in [`PluginError::to_cni`], the one place
//! that does it — the CNI error code and message each failure is reported with. The
//! plugin-specific codes are [`plugin_code`] (the table in the crate's README lists them);
//! which codes the agent may send is [`agent_code_is_valid`].

use std::net::Ipv4Addr;
use std::path::PathBuf;

use cni::{CniError, code};
use dataplane::{DataplaneError, TeardownError};
use proto::{AttachmentKey, ProtoError};

use crate::input::StdinError;

/// Plugin-specific error codes (the spec reserves 0–99). Each is in the README's table.
pub mod plugin_code {
    /// Wiring the pod's network (veth, addresses, routes, rules) failed.
    pub const POD_SETUP_FAILED: u32 = 100;
    /// CHECK found the pod's network not as ADD left it.
    pub const CHECK_FAILED: u32 = 101;
    /// Some of the pod's network could not be removed (DEL or GC).
    pub const TEARDOWN_FAILED: u32 = 102;
    /// The agent broke the protocol: an error code it may not send (the message names it), a
    /// reply that does not fit the request, a malformed or oversized frame, another protocol
    /// version.
    pub const AGENT_PROTOCOL_ERROR: u32 = 103;
    /// The call's deadline ran out (10 s; STATUS 3 s): stdin not closed, the agent's socket
    /// not accepting (listen backlog full), the agent not answering (in full) in time.
    pub const DEADLINE_EXCEEDED: u32 = 104;
    /// `pluginLogFile` names something that cannot be used as the log: not a regular file
    /// (FIFO, device, directory, symlink, the plugin's stdout), or not creatable/writable.
    pub const LOG_FILE_UNUSABLE: u32 = 105;

    /// Every plugin-specific code, for the README's table and its test.
    pub const ALL: &[u32] = &[
        POD_SETUP_FAILED,
        CHECK_FAILED,
        TEARDOWN_FAILED,
        AGENT_PROTOCOL_ERROR,
        DEADLINE_EXCEEDED,
        LOG_FILE_UNUSABLE,
    ];
}

/// Whether the agent may answer with `code` (passed through to the runtime as is): the
/// spec's codes 1–11 and 999 (internal, libcni's, what the agent sends when its handler
/// fails). Anything else becomes [`plugin_code::AGENT_PROTOCOL_ERROR`] naming the value.
pub fn agent_code_is_valid(code: u32) -> bool {
    (code::INCOMPATIBLE_CNI_VERSION..=code::TRY_AGAIN_LATER).contains(&code)
        || code == code::INTERNAL
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

    /// stdin was not closed in time, is too large, or cannot be read.
    #[error(transparent)]
    Stdin(#[from] StdinError),

    /// `pluginLogFile` cannot be used as the log.
    #[error("pluginLogFile {path} {reason}")]
    LogFile { path: PathBuf, reason: String },

    /// GC: the deadline ran out before these released attachments' host routes and rules
    /// were removed.
    #[error("teardown not attempted before the deadline: {}", keys(skipped))]
    GcOutOfTime {
        failed: Vec<GcFailure>,
        skipped: Vec<(AttachmentKey, Ipv4Addr)>,
    },

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

fn keys(skipped: &[(AttachmentKey, Ipv4Addr)]) -> String {
    skipped
        .iter()
        .map(|(k, ip)| format!("{k} ({ip})"))
        .collect::<Vec<_>>()
        .join(", ")
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
                let socket = socket.display();
                if source.is_unreachable() {
                    CniError::new(
                        code::TRY_AGAIN_LATER,
                        format!("the vpc-cni agent is not reachable at {socket}; try again later"),
                        format!(
                            "{source}. Check that the vpc-cni-agent pod is running on this node \
                             and ready, that it created {socket}, and that agentSocket in the CNI \
                             config matches the agent's VPC_CNI_AGENT_SOCKET"
                        ),
                    )
                } else if source.is_timeout() {
                    let msg = match source {
                        ProtoError::Timeout {
                            stage: proto::Stage::Start,
                            ..
                        } => format!("no time was left to call the vpc-cni agent at {socket}"),
                        _ => format!("the vpc-cni agent at {socket} did not answer in time"),
                    };
                    CniError::new(plugin_code::DEADLINE_EXCEEDED, msg, source.to_string())
                } else if source.is_protocol_violation() {
                    CniError::new(
                        plugin_code::AGENT_PROTOCOL_ERROR,
                        format!("the vpc-cni agent at {socket} broke the protocol"),
                        source.to_string(),
                    )
                } else {
                    CniError::new(
                        code::TRY_AGAIN_LATER,
                        format!("talking to the vpc-cni agent at {socket} failed; try again later"),
                        source.to_string(),
                    )
                }
            }
            PluginError::AgentRefused { code, message } if agent_code_is_valid(*code) => {
                let msg = if message.trim().is_empty() {
                    format!(
                        "the vpc-cni agent refused the request (code {code}) without saying why"
                    )
                } else {
                    message.clone()
                };
                CniError::new(*code, msg, String::new())
            }
            // 0 would read as success, 4294967295 as nothing at all: a code the agent may not
            // send is reported as what it is, with the agent's message kept.
            PluginError::AgentRefused { code, message } => CniError::new(
                plugin_code::AGENT_PROTOCOL_ERROR,
                format!("the vpc-cni agent answered with error code {code}, which it may not send"),
                format!("the agent's message: {message}; codes it may send: 1-11 and 999"),
            ),
            PluginError::AgentUnexpected { request, got } => CniError::new(
                plugin_code::AGENT_PROTOCOL_ERROR,
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
            PluginError::Stdin(e @ StdinError::TooLarge { .. }) => CniError::new(
                code::INVALID_NETWORK_CONFIG,
                e.to_string(),
                "a network configuration is a few KiB; the rest was not read",
            ),
            PluginError::Stdin(e @ StdinError::NotClosed { .. }) => CniError::new(
                plugin_code::DEADLINE_EXCEEDED,
                "stdin was not closed in time",
                e.to_string(),
            ),
            PluginError::Stdin(e @ StdinError::Io(_)) => {
                CniError::new(code::IO_FAILURE, e.to_string(), String::new())
            }
            PluginError::LogFile { path, reason } => CniError::new(
                plugin_code::LOG_FILE_UNUSABLE,
                format!("pluginLogFile {} cannot be used", path.display()),
                format!(
                    "{} {reason}; set pluginLogFile to the absolute path of a regular file, or to \"stderr\" (or empty) for stderr",
                    path.display()
                ),
            ),
            PluginError::GcOutOfTime { failed, skipped } => CniError::new(
                plugin_code::TEARDOWN_FAILED,
                "some of the pod network could not be removed",
                {
                    let mut d = format!(
                        "the call's deadline ran out before the host routes and rules of {} were removed (the agent released their addresses)",
                        keys(skipped)
                    );
                    if !failed.is_empty() {
                        d.push_str("; ");
                        d.push_str(&gc_details(failed));
                    }
                    d
                },
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
    fn agent_codes_are_validated() {
        for ok in (1..=11).chain([999]) {
            assert!(agent_code_is_valid(ok), "{ok}");
            let e = PluginError::AgentRefused {
                code: ok,
                message: "m".into(),
            }
            .to_cni();
            assert_eq!((e.code, e.msg.as_str()), (ok, "m"));
            let empty = PluginError::AgentRefused {
                code: ok,
                message: " ".into(),
            }
            .to_cni();
            assert!(empty.msg.contains("without saying why"), "{}", empty.msg);
        }
        for bad in [0, 12, 50, 51, 99, 100, 101, 103, 998, 1000, 4294967295] {
            assert!(!agent_code_is_valid(bad), "{bad}");
            let e = PluginError::AgentRefused {
                code: bad,
                message: "the agent's words".into(),
            }
            .to_cni();
            assert_eq!(e.code, plugin_code::AGENT_PROTOCOL_ERROR, "{bad}");
            assert!(e.msg.contains(&bad.to_string()), "{e}");
            assert!(e.details.contains("the agent's words"), "{e}");
        }
    }

    #[test]
    fn agent_failures_by_kind() {
        let agent = |source| {
            PluginError::Agent {
                socket: "/s".into(),
                source,
            }
            .to_cni()
        };
        let e = agent(ProtoError::Timeout {
            stage: proto::Stage::Receive,
            waited: std::time::Duration::from_millis(7700),
        });
        assert_eq!(e.code, plugin_code::DEADLINE_EXCEEDED);
        assert!(e.details.contains("did not answer within 7.7s"), "{e}");
        let e = agent(ProtoError::Timeout {
            stage: proto::Stage::Connect,
            waited: std::time::Duration::from_secs(7),
        });
        assert_eq!(e.code, 104);
        assert!(e.details.contains("backlog"), "{e}");
        assert_eq!(agent(ProtoError::TooLarge(1 << 30)).code, 103);
        assert_eq!(agent(ProtoError::Version { peer: 7 }).code, 103);
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert_eq!(agent(ProtoError::Io(eof)).code, 11);
        let e = PluginError::AgentUnexpected {
            request: "ADD",
            got: "Status".into(),
        };
        assert_eq!(e.to_cni().code, 103);
    }

    #[test]
    fn stdin_and_log_file_codes() {
        let c = |e: PluginError| e.to_cni();
        let e = c(StdinError::TooLarge { limit: 1 << 20 }.into());
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("1048576"), "{e}");
        let e = c(StdinError::NotClosed {
            waited: std::time::Duration::from_millis(9750),
            got: 14,
        }
        .into());
        assert_eq!(e.code, 104);
        assert!(
            e.details.contains("9.8s") && e.details.contains("14 bytes"),
            "{e}"
        );
        let e = c(StdinError::Io(std::io::Error::from_raw_os_error(9)).into());
        assert_eq!(e.code, 5);
        let e = c(PluginError::LogFile {
            path: "/tmp/fifo".into(),
            reason: "is a FIFO, not a regular file".into(),
        });
        assert_eq!(e.code, 105);
        assert!(e.msg.contains("/tmp/fifo"), "{e}");
        assert!(e.details.contains("is a FIFO"), "{e}");
    }

    #[test]
    fn the_readme_documents_every_plugin_code() {
        let readme = include_str!("../README.md");
        for c in plugin_code::ALL {
            assert!(
                readme.contains(&format!("\n| {c} | plugin | ")),
                "crates/plugin/README.md has no row for code {c}"
            );
        }
    }

    #[test]
    fn plugin_codes_are_unique_and_plugin_specific() {
        let mut all = plugin_code::ALL.to_vec();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), plugin_code::ALL.len());
        assert!(
            all.iter()
                .all(|c| *c >= code::FIRST_PLUGIN_SPECIFIC && *c < 999)
        );
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
            103
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
