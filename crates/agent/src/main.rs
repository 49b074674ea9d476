//! `vpc-cni-agent`: the node agent binary. Parses the command line and the configuration from
//! the environment, sets up logging, runs the agent (crate `agent`) or one of its one-shot
//! commands, and reports a fatal error exactly once per destination: in the log, and on
//! stderr unless the log already is stderr.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Instant;

use agent::build_info;
use agent::config::{self, Config, LogFormat};
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Where the log lines go once logging is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogSink {
    Stderr,
    Stdout,
    File,
}

/// Sets up logging as `AWS_VPC_K8S_CNI_LOG_FILE`, `AWS_VPC_K8S_CNI_LOGLEVEL` (or `RUST_LOG`) and
/// `VPC_CNI_LOG_FORMAT` say. Colour codes only on a terminal.
fn init_logging(cfg: &Config) -> anyhow::Result<LogSink> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.log_level));
    let (writer, ansi, sink) = match cfg.log_file.as_str() {
        "stderr" => (
            BoxMakeWriter::new(std::io::stderr),
            std::io::stderr().is_terminal(),
            LogSink::Stderr,
        ),
        "stdout" => (
            BoxMakeWriter::new(std::io::stdout),
            std::io::stdout().is_terminal(),
            LogSink::Stdout,
        ),
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
            (BoxMakeWriter::new(Mutex::new(file)), false, LogSink::File)
        }
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(writer)
        .with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    match cfg.log_format {
        LogFormat::Text => registry.with(layer).init(),
        LogFormat::Json => registry.with(layer.json()).init(),
    }
    Ok(sink)
}

/// The node agent of vpc-cni (one per node, on the host network).
///
/// Configured by the reference's environment variables (see the README's Configuration).
/// Without a subcommand it runs until SIGTERM: it serves the plugin on VPC_CNI_AGENT_SOCKET,
/// metrics and the probes /livez and /readyz on METRICS_BIND_ADDRESS (0.0.0.0:61678), and
/// introspection on INTROSPECTION_BIND_ADDRESS (127.0.0.1:61679).
#[derive(Debug, Parser)]
#[command(name = "vpc-cni-agent", version = build_info::LONG_VERSION)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install the plugin binaries and set the host sysctls (the DaemonSet's init container).
    ///
    /// Installs into HOST_CNI_BIN_PATH vpc-cni (from VPC_CNI_PLUGIN_BINARY) and the chained
    /// portmap, and bandwidth with ENABLE_BANDWIDTH_PLUGIN=true (from
    /// VPC_CNI_CHAINED_PLUGINS_DIR), each else from beside this executable; sets the sysctls
    /// the reference's init container sets in this network namespace (rp_filter=2 on the
    /// primary interface, found by IMDS's primary MAC, and tcp_early_demux=1); prints what it
    /// did and exits.
    Init,
    /// Hand this node back to another CNI with every running pod keeping its address.
    ///
    /// Run it with the agent stopped and the agent's environment.
    Uninstall {
        /// The CNI that takes the node over.
        #[arg(long, value_enum)]
        to: Target,
    },
    /// Print the reference's max pods for an instance type: with secondary IPs (its
    /// eni-max-pods.txt), prefix delegation, custom networking and both, and the value for
    /// kubelet's --max-pods (capped at 110 up to 30 vCPUs, 250 above). From the built-in
    /// table, or DescribeInstanceTypes for a type it lacks (or with --ec2), with the AWS SDK's
    /// usual configuration (AWS_REGION, credentials).
    MaxPods {
        /// An EC2 instance type, e.g. m5.large.
        instance_type: String,
        /// MAX_ENI: fewer ENIs than the type allows.
        #[arg(long)]
        max_eni: Option<u32>,
        /// Ask EC2 even when the built-in table has the type.
        #[arg(long)]
        ec2: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Target {
    /// aws/amazon-vpc-cni-k8s v1.23 (its DaemonSet aws-node).
    AwsNode,
}

async fn start(cli: Cli, started: Instant, sink: &mut Option<LogSink>) -> anyhow::Result<()> {
    let vars: HashMap<String, String> = std::env::vars().collect();
    let cfg = config::from_env(&vars).context("invalid configuration")?;
    *sink = Some(init_logging(&cfg)?);
    info!(
        version = build_info::VERSION,
        commit = build_info::COMMIT,
        "vpc-cni-agent starting"
    );
    match cli.cmd {
        Some(Cmd::Init) => {
            let report = agent::init::run(&cfg)
                .await
                .context("the init step (plugin binaries, host sysctls)")?;
            print!("{report}");
            return Ok(());
        }
        Some(Cmd::Uninstall {
            to: Target::AwsNode,
        }) => {
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
        Some(Cmd::MaxPods { .. }) => unreachable!("answered before the configuration is read"),
        None => {}
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

/// `vpc-cni-agent max-pods`: the built-in table's entry, else (or with `--ec2`)
/// DescribeInstanceTypes'.
fn max_pods(instance_type: &str, ec2: bool) -> anyhow::Result<agent::max_pods::TypeInfo> {
    if !ec2 && let Some(info) = agent::max_pods::builtin(instance_type) {
        return Ok(info);
    }
    let rt = agent::runtime().context("starting the tokio runtime")?;
    let info = rt
        .block_on(async {
            let ec2 = cloud::Ec2::from_env().await?;
            ec2.describe_instance_type_info(instance_type).await
        })
        .with_context(|| {
            format!("{instance_type}: not in the built-in table, and DescribeInstanceTypes failed")
        })?;
    agent::max_pods::from_ec2(&info).with_context(|| {
        format!("{instance_type}: DescribeInstanceTypes lists no vCPUs (VCpuInfo.DefaultVCpus)")
    })
}

/// Reports a fatal error once per destination: through the log (in its format) when logging
/// is set up, and on stderr unless the log is stderr.
fn report_fatal(e: &anyhow::Error, sink: Option<LogSink>) {
    if sink.is_some() {
        error!("{e:#}");
    }
    if sink != Some(LogSink::Stderr) {
        eprintln!("vpc-cni-agent: {e:#}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Cmd::MaxPods {
        instance_type,
        max_eni,
        ec2,
    }) = &cli.cmd
    {
        return match max_pods(instance_type, *ec2) {
            Ok(info) => {
                print!(
                    "{}",
                    agent::max_pods::report(instance_type, &info, *max_eni)
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("vpc-cni-agent: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    agent::housekeeping::tune_malloc();
    let mut sink = None;
    let result = match agent::runtime() {
        Ok(rt) => rt.block_on(start(cli, Instant::now(), &mut sink)),
        Err(e) => Err(anyhow::Error::new(e).context("starting the tokio runtime")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report_fatal(&e, sink);
            ExitCode::FAILURE
        }
    }
}
