//! `vpc-cni`: the CNI plugin binary. Reads `CNI_*` and stdin, prints the result or a CNI
//! error object on stdout, exits 0 or 1 — by the call's deadline (10 s, STATUS 3 s) whatever
//! stdin, the files named in the configuration or the agent do. Run by hand (no
//! `CNI_COMMAND`), it says what it is on stderr and exits 1 without reading stdin.

use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;
use std::time::Instant;

use plugin::{Deadline, Invocation, PluginError, RealBackend, Reply, execute, input, logging};

/// What a person who runs the binary by hand is told (one line, on stderr).
fn about() -> String {
    format!(
        "vpc-cni {}: the vpc-cni CNI plugin; run by a container runtime with CNI_COMMAND set \
         (CNI spec {}\u{2013}{}); see the README's \"Operating the agent\"",
        env!("CARGO_PKG_VERSION"),
        cni::SUPPORTED_VERSIONS[0],
        cni::SUPPORTED_VERSIONS[cni::SUPPORTED_VERSIONS.len() - 1],
    )
}

fn main() -> ExitCode {
    let started = Instant::now();
    let command = std::env::var_os("CNI_COMMAND");
    // Run by hand: say what this is instead of waiting for a configuration on stdin.
    if command.as_ref().is_none_or(|c| c.is_empty()) {
        eprintln!("{}", about());
        return ExitCode::FAILURE;
    }
    let deadline = Deadline::for_command(command.as_deref(), started);
    logging::install_panic_hook(&deadline);
    // Whatever happens, one JSON object on stdout: a panic anywhere is a CNI error too.
    let reply = catch_unwind(AssertUnwindSafe(|| run(&deadline))).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        Reply::new(Err(PluginError::Internal(what)), None)
    });
    let mut out = std::io::stdout().lock();
    // Nothing sensible is left to do if stdout is gone.
    let _ = out.write_all(reply.stdout.as_bytes());
    let _ = out.flush();
    ExitCode::from(reply.exit_code)
}

fn run(deadline: &Deadline) -> Reply {
    // VERSION needs nothing but CNI_COMMAND: it reads no stdin, opens no file, calls no agent.
    let is_version = std::env::var_os("CNI_COMMAND").is_some_and(|c| c == "VERSION");
    let stdin = if is_version {
        Vec::new()
    } else {
        match input::read_stdin(deadline) {
            Ok(bytes) => bytes,
            Err(e) => {
                let _ = logging::init(None, deadline);
                tracing::warn!(error = %e, "rejected invocation");
                return Reply::new(Err(e.into()), None);
            }
        }
    };
    let version = cni::peek_version(&stdin);

    let inv = match Invocation::parse(std::env::vars_os(), &stdin) {
        Ok(inv) => inv,
        Err(e) => {
            let _ = logging::init(None, deadline);
            tracing::warn!(error = %e, "rejected invocation");
            return Reply::new(Err(e), version);
        }
    };
    // A log file that cannot be used fails the call (naming the value) before it does anything.
    if let Err(e) = logging::init(inv.config(), deadline) {
        tracing::error!(error = %e, "failed");
        return Reply::new(Err(e), version);
    }
    if let Invocation::Verb(v) = &inv {
        tracing::debug!(command = %v.env.command, container = v.env.container_id(),
            ifname = v.env.ifname(), netns = ?v.env.netns, network = %v.conf.name,
            version = %v.conf.cni_version, "invoked");
    }

    let outcome = execute(&inv, &RealBackend, *deadline);
    if let Err(e) = &outcome {
        tracing::error!(error = %e, "failed");
    }
    Reply::new(outcome, version)
}
