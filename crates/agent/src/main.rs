//! vpc-cni-agent: the node agent. Learns the node from IMDS, sets up the host network and the
//! ENIs, keeps the address pool and its checkpoint, serves the plugin, and signals readiness by
//! installing the plugin and writing the CNI network configuration.

mod checkpoint;
mod config;
mod host;
mod install;
mod server;
mod state;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;

use crate::config::Config;
use crate::state::State;

fn init_logging(cfg: &Config) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    match cfg.log_file.as_str() {
        "stderr" => builder.with_writer(std::io::stderr).init(),
        "stdout" => builder.with_writer(std::io::stdout).init(),
        path => {
            if let Some(dir) = std::path::Path::new(path).parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("AWS_VPC_K8S_CNI_LOG_FILE={path}"))?;
            }
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("AWS_VPC_K8S_CNI_LOG_FILE={path}: cannot open"))?;
            builder
                .with_writer(Mutex::new(file))
                .with_ansi(false)
                .init()
        }
    }
    Ok(())
}

async fn run() -> anyhow::Result<()> {
    let started = Instant::now();
    let vars: HashMap<String, String> = std::env::vars().collect();
    let cfg = config::from_env(&vars).context("invalid configuration")?;
    init_logging(&cfg)?;
    if cfg.provisioning {
        bail!(
            "DISABLE_NETWORK_RESOURCE_PROVISIONING is not true, but this version cannot yet provision ENIs and IPs through EC2; set DISABLE_NETWORK_RESOURCE_PROVISIONING=true to use the ENIs and secondary IPs already attached to the instance"
        );
    }

    let imds = cloud::ImdsMetadata::from_env().context("IMDS client")?;
    let md = host::learn(&imds, 10).await?;
    info!(instance = %md.instance_id, r#type = %md.instance_type, enis = md.enis.len(), "learned the instance from IMDS");

    let node = {
        let (cfg, md) = (cfg.clone(), md.clone());
        tokio::task::spawn_blocking(move || host::setup(&cfg, &md)).await??
    };
    info!(primary = %node.primary_ifname, vpc_cidrs = ?node.vpc_cidrs, "host network set up");

    let hint = "provisioning is disabled (DISABLE_NETWORK_RESOURCE_PROVISIONING=true): assign more secondary IPs to this node's ENIs, or delete pods".to_string();
    let mut state = State::new(node.pool, node.vpc_cidrs, cfg.checkpoint.clone(), hint);
    let cp = checkpoint::load(&cfg.checkpoint)?;
    for w in state.restore(&cp) {
        warn!("{w}");
    }
    let s = state.pool().stats(state::now_ms());
    info!(
        restored = cp.allocations.len(),
        total = s.total,
        assigned = s.assigned,
        cooling = s.cooling,
        "pool ready"
    );
    let state = Arc::new(Mutex::new(state));

    let listener = server::bind(&cfg.socket)?;
    let plugin_src = match &cfg.plugin_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locating the agent executable")?
            .with_file_name(install::PLUGIN_NAME),
    };
    let plugin = install::install_plugin(&plugin_src, &cfg.cni_bin_dir)?;
    let conflist = install::write_conflist(&cfg)?;
    info!(
        plugin = %plugin.display(),
        conflist = %conflist.display(),
        socket = %cfg.socket.display(),
        startup_ms = started.elapsed().as_millis() as u64,
        "ready"
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let result = tokio::select! {
        r = server::serve(listener, state) => r.context("plugin socket"),
        _ = term.recv() => { info!("SIGTERM: shutting down"); Ok(()) }
        _ = int.recv() => { info!("SIGINT: shutting down"); Ok(()) }
    };
    let _ = std::fs::remove_file(&cfg.socket);
    result
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("vpc-cni-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
