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
use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info, warn};
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

/// The node agent of vpc-cni. Configured by the reference's environment variables (see the
/// README); without a subcommand it runs until SIGTERM.
#[derive(Debug, Parser)]
#[command(name = "vpc-cni-agent", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Hand this node back to another CNI with every running pod keeping its address (run it
    /// with the agent stopped and the agent's environment).
    Uninstall {
        /// The CNI that takes the node over.
        #[arg(long, value_enum)]
        to: Target,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Target {
    /// aws/amazon-vpc-cni-k8s v1.23 (its DaemonSet aws-node).
    AwsNode,
}

async fn start(cli: Cli, started: Instant) -> anyhow::Result<()> {
    let vars: HashMap<String, String> = std::env::vars().collect();
    let cfg = config::from_env(&vars).context("invalid configuration")?;
    init_logging(&cfg)?;
    if let Some(Cmd::Uninstall {
        to: Target::AwsNode,
    }) = cli.cmd
    {
        let done = agent::swap::uninstall_to_aws_node(&cfg)
            .await
            .context("handing the node back to aws-node")?;
        println!(
            "the node is aws-node's again: {} pods kept their addresses; {} written; start aws-node now",
            done.pods,
            done.conflist.display()
        );
        return Ok(());
    }
    for n in &cfg.notices {
        if n.differs {
            warn!(var = n.var, "{n}");
        } else {
            info!(var = n.var, "{n}");
        }
    }
    agent::run(cfg, started).await?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    agent::housekeeping::tune_malloc();
    let result = match agent::runtime() {
        Ok(rt) => rt.block_on(start(cli, Instant::now())),
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
