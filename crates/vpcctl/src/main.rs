//! `vpcctl`: the operator's view of one node's vpc-cni agent, from its introspection
//! endpoint. Thin: the documents are read by `vpcctl::client` and shown by `vpcctl::show` and
//! `vpcctl::why`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vpcctl::client::{Client, DEFAULT_AGENT};
use vpcctl::doc::StateAnswer;
use vpcctl::show::{self, ProbeAnswers};
use vpcctl::why::{self, PodName};

#[derive(Debug, Parser)]
#[command(
    name = "vpcctl",
    version,
    about = "A node's vpc-cni state from its agent: ENIs, addresses, pods, cooldowns, warm-pool \
             targets, and why a pod has no address",
    after_help = "Reads only the agent's introspection endpoint (INTROSPECTION_BIND_ADDRESS, \
                  127.0.0.1:61679 on the node). Exit status: 0; 1 when `status` finds a probe \
                  failing or `why` finds the pod without an address; 2 when the agent cannot \
                  be read."
)]
struct Cli {
    /// The agent's introspection endpoint.
    #[arg(long, global = true, env = "VPCCTL_AGENT", default_value = DEFAULT_AGENT, value_name = "URL")]
    agent: String,
    /// Print the agent's raw JSON document instead (`/v1/state`; `/v1/enis` for `enis`).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Probes, pool counts, cooldowns, warm-pool targets and limits, pending ADDs, blocker,
    /// reconciles and drift, EC2 calls and errors
    Status,
    /// Each ENI with its addresses: assigned (and the pod), cooling (time left), available,
    /// parked
    Enis,
    /// Pods holding an address, and the pods whose address was lost (with the reason)
    Pods,
    /// Why a pod has no address (exit 0 when it has one, 1 when not)
    Why {
        /// The pod, as <namespace>/<name>
        pod: PodName,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vpcctl: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let c = Client::new(&cli.agent);
    match &cli.command {
        Command::Status => {
            let (raw, state) = c.state()?;
            if cli.json {
                println!("{}", raw.trim_end());
                return Ok(ExitCode::SUCCESS);
            }
            let probes = ProbeAnswers {
                livez: c.probe("/livez")?,
                readyz: c.probe("/readyz")?,
            };
            print!("{}", show::status(&cli.agent, &probes, &state));
            Ok(exit(probes.ok()))
        }
        Command::Enis => {
            let (raw, enis) = c.enis()?;
            if cli.json {
                println!("{}", raw.trim_end());
            } else {
                print!("{}", show::enis(&enis));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Pods => {
            let (raw, state) = c.state()?;
            if cli.json {
                println!("{}", raw.trim_end());
                return Ok(ExitCode::SUCCESS);
            }
            match state {
                StateAnswer::Known(s) => print!("{}", show::pods(&s)),
                StateAnswer::Starting(why) => {
                    anyhow::bail!("the agent has no pool yet (it is starting): {why}")
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Why { pod } => {
            let (raw, state) = c.state()?;
            let v = why::why(pod, &state);
            if cli.json {
                println!("{}", raw.trim_end());
            } else {
                print!("{}", v.text);
            }
            Ok(exit(v.has_address))
        }
    }
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
