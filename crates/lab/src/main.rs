//! vpc-lab: the local VPC — network namespaces, an EC2 API (moto), IMDS and the VPC fabric.

mod ctl;
mod daemon;
mod fabric;
mod imds;
mod matrix;
mod moto;
mod ns;
mod pods;
mod procs;
mod provision;
mod relay;
mod world;

use std::os::unix::process::ExitStatusExt;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "vpc-lab",
    about = "A local AWS VPC in network namespaces, for vpc-cni"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the lab (cleaning up a crashed run first); returns when every agent is ready.
    Up {
        /// Extra environment for the agents (repeatable).
        #[arg(long = "agent-env", value_name = "K=V", value_parser = parse_kv)]
        agent_env: Vec<(String, String)>,
        /// Do not start the agents (bring up EC2, fabric, IMDS only).
        #[arg(long)]
        no_agents: bool,
    },
    /// Remove every namespace, process and file of the lab.
    Down,
    /// Instances, ENIs, their IPs and which pod holds which IP.
    Status,
    /// (internal) the lab daemon started by `up`.
    #[command(hide = true)]
    Daemon,
    /// Run CNI for a pod like a container runtime.
    Pod {
        #[command(subcommand)]
        cmd: PodCmd,
    },
    /// Start, stop (SIGTERM), kill (SIGKILL) or restart an instance's agent.
    Agent {
        action: AgentAction,
        instance: String,
        #[arg(long = "agent-env", value_name = "K=V", value_parser = parse_kv)]
        agent_env: Vec<(String, String)>,
    },
    /// Run a command inside an instance, the internet host, or a pod (<ns>/<name>).
    Exec {
        target: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// The connectivity matrix (PASS/FAIL rows); non-zero exit if any row is not as expected.
    Matrix {
        /// Also remove one data-path piece at a time and show the traffic fail, then restore.
        #[arg(long)]
        negative: bool,
    },
    /// Add the demo pods, print the routing state, run the matrix with negatives, delete them.
    Demo,
}

#[derive(Debug, Subcommand)]
enum PodCmd {
    /// CNI ADD.
    Add { instance: String, pod: String },
    /// CNI DEL, then delete the pod's namespace and record.
    Del { instance: String, pod: String },
    /// CNI CHECK.
    Check { instance: String, pod: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AgentAction {
    Start,
    Stop,
    Kill,
    Restart,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("vpc-lab needs root (it creates network namespaces); run it with sudo");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.cmd {
        Cmd::Daemon => "info",
        Cmd::Up { .. } | Cmd::Down => "vpc_lab=info,warn",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vpc-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    require_root()?;
    match cli.cmd {
        Cmd::Up {
            agent_env,
            no_agents,
        } => {
            let t0 = Instant::now();
            let state = ctl::up_prepare()?;
            ctl::set_sdk_env(state.moto, &state.region);
            let r = runtime()?.block_on(ctl::up(state, &agent_env, !no_agents, t0));
            if let Err(e) = r {
                bail!(
                    "{e:#}\n(the lab is left as it is for inspection; `vpc-lab down` removes it)"
                );
            }
        }
        Cmd::Down => ctl::down()?,
        Cmd::Status => ctl::status()?,
        Cmd::Daemon => runtime()?.block_on(daemon::run())?,
        Cmd::Pod { cmd } => match cmd {
            PodCmd::Add { instance, pod } => {
                pods::add(&instance, &pod, false)?;
            }
            PodCmd::Del { instance, pod } => pods::del(&instance, &pod)?,
            PodCmd::Check { instance, pod } => pods::check(&instance, &pod)?,
        },
        Cmd::Agent {
            action,
            instance,
            agent_env,
        } => {
            let region = ctl::load_world()?.region;
            match action {
                AgentAction::Start => {
                    ctl::agent_start(&instance, &agent_env, &region)?;
                    ctl::wait_agent_ready(&instance, std::time::Duration::from_secs(30))?;
                }
                AgentAction::Stop => ctl::agent_stop(&instance, false)?,
                AgentAction::Kill => ctl::agent_stop(&instance, true)?,
                AgentAction::Restart => {
                    let _ = ctl::agent_stop(&instance, false);
                    ctl::agent_start(&instance, &agent_env, &region)?;
                    ctl::wait_agent_ready(&instance, std::time::Duration::from_secs(30))?;
                }
            }
        }
        Cmd::Exec { target, cmd } => {
            let ns_name = pods::exec_target(&target)?;
            let status = ns::command(&ns_name, &cmd[0])?
                .args(&cmd[1..])
                .status()
                .with_context(|| format!("running {:?} in {ns_name}", cmd[0]))?;
            let code = status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        Cmd::Matrix { negative } => {
            if !matrix::run(negative)? {
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Demo => {
            if !matrix::demo()? {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
