//! `vpc-cni-agent`: the node agent binary. Parses the configuration from the environment, sets
//! up logging, runs the agent (crate `agent`) and maps a fatal error to a log line, a message on
//! stderr and exit status 1.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use agent::config::{self, Config};
use anyhow::Context;
use tracing::error;
use tracing_subscriber::EnvFilter;

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

async fn start(started: Instant) -> anyhow::Result<()> {
    let vars: HashMap<String, String> = std::env::vars().collect();
    let cfg = config::from_env(&vars).context("invalid configuration")?;
    init_logging(&cfg)?;
    agent::run(cfg, started).await?;
    Ok(())
}

fn main() -> ExitCode {
    agent::housekeeping::tune_malloc();
    let result = match agent::runtime() {
        Ok(rt) => rt.block_on(start(Instant::now())),
        Err(e) => Err(anyhow::Error::new(e).context("starting the tokio runtime")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("vpc-cni-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
