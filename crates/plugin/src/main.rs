//! `vpc-cni`: the CNI plugin binary. Reads `CNI_*` and stdin, prints the result or a CNI
//! error object on stdout, exits 0 or 1.

use std::io::{Read, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;

use plugin::{Invocation, PluginError, RealBackend, Reply, execute, logging};

fn main() -> ExitCode {
    let reply = run();
    let mut out = std::io::stdout().lock();
    // Nothing sensible is left to do if stdout is gone.
    let _ = out.write_all(reply.stdout.as_bytes());
    let _ = out.flush();
    ExitCode::from(reply.exit_code)
}

fn run() -> Reply {
    // VERSION needs nothing but CNI_COMMAND; do not block on a stdin nobody writes to.
    let is_version = std::env::var_os("CNI_COMMAND").is_some_and(|c| c == "VERSION");
    let mut stdin = Vec::new();
    if !is_version && let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        let err = cni::CniError::new(
            cni::code::IO_FAILURE,
            "cannot read the network configuration from stdin",
            e.to_string(),
        );
        return Reply::new(Err(err.into()), None);
    }
    let version = cni::peek_version(&stdin);

    let inv = match Invocation::parse(std::env::vars_os(), &stdin) {
        Ok(inv) => inv,
        Err(e) => {
            logging::init(None);
            tracing::warn!(error = %e, "rejected invocation");
            return Reply::new(Err(e), version);
        }
    };
    logging::init(inv.config());
    if let Invocation::Verb(v) = &inv {
        tracing::debug!(command = %v.env.command, container = v.env.container_id(),
            ifname = v.env.ifname(), netns = ?v.env.netns, network = %v.conf.name,
            version = %v.conf.cni_version, "invoked");
    }

    let outcome =
        catch_unwind(AssertUnwindSafe(|| execute(&inv, &RealBackend))).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".into());
            Err(PluginError::Internal(what))
        });
    if let Err(e) = &outcome {
        tracing::error!(error = %e, "failed");
    }
    Reply::new(outcome, version)
}
