//! The `vpc-cni` CNI plugin: a thin synchronous shim that asks `vpc-cni-agent` for an
//! address and wires the pod through crate `dataplane`.
//!
//! Flow: [`input::read_stdin`] (by the deadline, capped) → [`Invocation::parse`] (the
//! environment and stdin, every CNI validation) → [`logging::init`] → [`execute`] (the verb,
//! against a [`Backend`]) → [`Reply`] (what goes on stdout, and the exit code). One
//! [`Deadline`] per call bounds all of it. Logs never go to stdout.

pub mod backend;
pub mod commands;
pub mod config;
pub mod deadline;
pub mod error;
pub mod input;
pub mod logging;

#[cfg(test)]
mod tests;

use std::ffi::OsStr;

use cni::{Command, Env, NetConf, Version};
use serde_json::Value;

pub use backend::{Backend, NetnsState, RealBackend};
pub use config::PluginConfig;
pub use deadline::Deadline;
pub use error::{GcFailure, PluginError, Release, agent_code_is_valid, plugin_code};

/// A validated request.
#[derive(Debug, Clone)]
pub enum Invocation {
    /// `CNI_COMMAND=VERSION`: nothing else is needed.
    Version,
    Verb(Box<Verb>),
}

/// Any verb but VERSION: the environment, the configuration and our keys in it.
#[derive(Debug, Clone)]
pub struct Verb {
    pub env: Env,
    pub conf: NetConf,
    pub cfg: PluginConfig,
}

impl Invocation {
    /// Validate in the order libcni's skel does: environment (code 4), configuration JSON
    /// (6), `cniVersion` (1) and whether it allows the verb (1), required keys (7), our own
    /// keys (7).
    pub fn parse<I, K, V>(vars: I, stdin: &[u8]) -> Result<Invocation, PluginError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let env = Env::from_vars(vars)?;
        if env.command == Command::Version {
            return Ok(Invocation::Version);
        }
        let conf = NetConf::parse(stdin)?;
        conf.cni_version.allows(env.command)?;
        let cfg = PluginConfig::from_raw(&conf.raw)?;
        Ok(Invocation::Verb(Box::new(Verb { env, conf, cfg })))
    }

    pub fn config(&self) -> Option<&PluginConfig> {
        match self {
            Invocation::Version => None,
            Invocation::Verb(v) => Some(&v.cfg),
        }
    }
}

/// Run the verb by `deadline`. `Some(json)` is printed on success (ADD's result, VERSION's
/// info).
pub fn execute(
    inv: &Invocation,
    backend: &dyn Backend,
    deadline: Deadline,
) -> Result<Option<Value>, PluginError> {
    let (env, conf, cfg) = match inv {
        Invocation::Version => return Ok(Some(cni::version_info())),
        Invocation::Verb(v) => (&v.env, &v.conf, &v.cfg),
    };
    let ctx = commands::Ctx {
        env,
        conf,
        cfg,
        backend,
        deadline,
    };
    match env.command {
        Command::Add => commands::add(&ctx).map(Some),
        Command::Del => commands::del(&ctx).map(|()| None),
        Command::Check => commands::check(&ctx).map(|()| None),
        Command::Status => commands::status(&ctx).map(|()| None),
        Command::Gc => commands::gc(&ctx).map(|()| None),
        Command::Version => Ok(Some(cni::version_info())),
    }
}

/// What the process prints on stdout and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub stdout: String,
    pub exit_code: u8,
}

impl Reply {
    /// `version` labels an error object: the requested version if it is one we support.
    pub fn new(outcome: Result<Option<Value>, PluginError>, version: Option<Version>) -> Reply {
        match outcome {
            Ok(None) => Reply {
                stdout: String::new(),
                exit_code: 0,
            },
            Ok(Some(v)) => Reply {
                stdout: pretty(&v),
                exit_code: 0,
            },
            Err(e) => {
                let label = version.unwrap_or(cni::LATEST);
                Reply {
                    stdout: pretty(&e.to_cni().to_json(label.as_str())),
                    exit_code: 1,
                }
            }
        }
    }
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("JSON values always serialise");
    s.push('\n');
    s
}
