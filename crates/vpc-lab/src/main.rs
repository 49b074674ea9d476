//! vpc-lab: the local VPC — network namespaces, an EC2 API (moto), IMDS and the VPC fabric.
//! A thin command line over the lab crates (`lab`, `lab-aws`, `lab-net`, `lab-bench`).

use std::os::unix::process::ExitStatusExt;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use lab::control::{self, Deploy, UpOptions};
use lab::store::LabState;
use lab::{aws_node, daemon, kube, kubelet, matrix, paths, pods};
use lab_aws::{fidelity, seed};
use lab_bench::{bench, perf, prefixes, soak};
use lab_net::ns;

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
        /// How the agents run: `process` (a process per instance), or `daemonset` (the
        /// DaemonSet's pod of deploy/base/daemonset.yaml from the node image
        /// target/image/vpc-cni.oci.tar, run by the lab's kubelet through containerd's CRI;
        /// `up` returns when every node's pod is Ready). See `vpc-lab kubelet`.
        #[arg(long, value_enum, default_value = "process")]
        deploy: DeployArg,
        /// Agents provision ENIs and IPs through EC2 (DISABLE_NETWORK_RESOURCE_PROVISIONING=false):
        /// all node instances, or only those listed (comma-separated).
        #[arg(long, value_name = "INSTANCES", num_args = 0..=1, default_missing_value = "")]
        provisioning: Option<String>,
        /// Instance type of the node instances (instance1, instance2).
        #[arg(long, default_value = seed::INSTANCE_TYPE)]
        instance_type: String,
        /// Node instances start like a new EC2 instance: primary ENI and address only (no
        /// secondary IPs, no second ENI). The seed's demo needs the default layout.
        #[arg(long)]
        fresh_nodes: bool,
        /// Fraction (0..=1) of EC2 calls answered 503 RequestLimitExceeded or 500 InternalError.
        #[arg(long, default_value = "0")]
        ec2_error_rate: String,
        /// Latency added to every EC2 call.
        #[arg(long, default_value = "0")]
        ec2_latency_ms: String,
        /// EC2 throttling: off, ec2 (EC2's default token buckets), or BURST/PER_SECOND per API.
        #[arg(long, default_value = "off")]
        ec2_throttle: String,
        /// IMDS serves the EC2 state of this long ago.
        #[arg(long, default_value = "0")]
        imds_delay_ms: String,
        /// An attached ENI's interface appears in the instance this long after the attach.
        #[arg(long, default_value = "0")]
        attach_delay_ms: String,
        /// Addresses each subnet can still hand out (default unlimited).
        #[arg(long, default_value = "unlimited")]
        subnet_free: String,
    },
    /// Show or change the EC2/IMDS fidelity knobs of the running lab (`set key=value …`).
    Fidelity {
        #[command(subcommand)]
        cmd: FidelityCmd,
    },
    /// EC2 calls seen by the lab's EC2 proxy, by instance and API (JSON).
    Ec2Stats,
    /// Benchmark: EC2 calls by API for instance1 going 0 → max pods → 0 and during a churn
    /// with agent kills (brings up its own lab, takes it down; prints a Markdown table).
    Bench {
        /// ADD/DEL operations in the churn phase.
        #[arg(long, default_value_t = 300)]
        churn: usize,
    },
    /// Benchmark: prefix delegation side by side with secondary IPs on instance1 (an
    /// m5.large): its max pods in each mode ADDed at once, wall time, ADD latency and EC2 calls
    /// by API (brings up its own lab per mode, takes it down; prints a Markdown table).
    BenchPrefixes {
        /// Threads ADDing pods at once.
        #[arg(long, default_value_t = 12)]
        parallel: usize,
    },
    /// Benchmark: the performance baseline of issue 4 (ADD+DEL cycle and concurrent ADDs
    /// against ptp+host-local, forwarding rate, agent memory and start time against the number
    /// of pods, pod vs instance TCP throughput). Brings up its own lab, takes it down; prints
    /// Markdown and writes the samples as JSON.
    Perf(perf::Opts),
    /// Soak: two provisioning nodes under pod churn with random faults (agent kill -9, EC2
    /// errors and throttling, IMDS lag, addresses unassigned and ENIs detached behind the
    /// agents' backs, plugins killed mid-ADD); a line per minute of pods served, failures by
    /// code and leaks; exits 1 on a duplicate address, a leak or an unreported lost pod.
    /// Brings up its own lab and takes it down.
    Soak(soak::Opts),
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
    /// Start, stop (SIGTERM), kill (SIGKILL) or restart an instance's agent, or hand the
    /// instance back to aws-node with the agent stopped (uninstall).
    Agent {
        action: AgentAction,
        instance: String,
        #[arg(long = "agent-env", value_name = "K=V", value_parser = parse_kv)]
        agent_env: Vec<(String, String)>,
    },
    /// The lab's Kubernetes API (Node, Pod, Event, ENIConfig) that the agents use through
    /// $KUBECONFIG: where it is, stop and start it, read and change its objects.
    Kube {
        #[command(subcommand)]
        cmd: KubeCmd,
    },
    /// The lab's kubelet (with `up --deploy daemonset`): the DaemonSet's pod on each node.
    Kubelet {
        #[command(subcommand)]
        cmd: KubeletCmd,
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
    /// A node as aws-node (amazon-vpc-cni-k8s v1.23) leaves it: wire pods its way, or judge
    /// whether aws-node would accept a node.
    AwsNode {
        #[command(subcommand)]
        cmd: AwsNodeCmd,
    },
}

#[derive(Debug, Subcommand)]
enum AwsNodeCmd {
    /// Make the instance look as aws-node v1.23 leaves it with these pods (<ns>/<name>)
    /// running: checkpoint, 10-aws.conflist, ENI tables and rules, iptables and nftables, and
    /// per pod the veth, its route in main and its rules at 512 and 1536. The instance's
    /// vpc-cni agent must be stopped. Prints `<pod> <ip> eth<N> <host veth>` per pod.
    Wire {
        instance: String,
        #[arg(required = true, value_name = "NS/NAME")]
        pods: Vec<String>,
    },
    /// Whether aws-node v1.23 started now would accept the instance and keep every running
    /// pod working; lists the problems and exits 1 when it would not.
    Check { instance: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DeployArg {
    Process,
    Daemonset,
}

#[derive(Debug, Subcommand)]
enum KubeletCmd {
    /// Each node's pod: containers, restarts, readiness, the last probes, and its start's
    /// timeline.
    Status {
        /// The status files as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete the node's pod, as `kubectl delete pod` (its containers stopped with the grace
    /// period, its sandbox removed); with no DaemonSet controller, no new one comes until
    /// `deploy`. The node's pods keep their network (the data path is in the kernel).
    Delete { instance: String },
    /// Create the node's pod again and wait until it is Ready.
    Deploy {
        instance: String,
        /// Seconds to wait for Ready.
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
    /// (internal) the kubelet process of an instance, started by `up --deploy daemonset`.
    #[command(hide = true)]
    Run { instance: String },
}

#[derive(Debug, Subcommand)]
enum KubeCmd {
    /// Where the API is (in the instances and here), whether it answers, what it holds.
    Status {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make the API server unreachable (open watches end, connections refused); its objects
    /// stay.
    Stop,
    /// Serve again after `stop`, on the same addresses with the same objects.
    Start,
    /// Every Node (JSON).
    Nodes,
    /// Every Event, or those of one node: about the Node, from its host, or about a pod on it
    /// (JSON).
    Events {
        #[arg(long)]
        node: Option<String>,
    },
    /// One Pod (JSON); exits 1 when the API has none of that name.
    Pod {
        #[arg(value_name = "NS/NAME")]
        pod: String,
    },
    /// Every ENIConfig (JSON).
    Eniconfigs,
    /// Set a node's label.
    Label {
        node: String,
        #[arg(value_name = "K=V")]
        label: String,
    },
    /// Remove a node's label.
    Unlabel { node: String, key: String },
    /// Set a node's annotation.
    Annotate {
        node: String,
        #[arg(value_name = "K=V")]
        annotation: String,
    },
    /// Remove a node's annotation.
    Unannotate { node: String, key: String },
    /// Set a node's status.capacity.pods and status.allocatable.pods.
    Capacity { node: String, pods: u32 },
    /// Create or replace an ENIConfig.
    Eniconfig {
        name: String,
        subnet: String,
        /// Security group ids, comma-separated (may be empty: "").
        #[arg(value_name = "SG[,SG]")]
        security_groups: String,
    },
    /// Delete an ENIConfig.
    EniconfigDelete { name: String },
}

#[derive(Debug, Subcommand)]
enum FidelityCmd {
    /// Print the knobs in effect (JSON).
    Show,
    /// Change knobs: ec2-error-rate, ec2-latency-ms, ec2-throttle, imds-delay-ms,
    /// attach-delay-ms, subnet-free, subnet-fragmented (`SUBNET|all[=true|false]` or `none`:
    /// no free aligned /28 there, so IPv4 prefix requests get InsufficientCidrBlocks while
    /// single addresses are still handed out).
    Set {
        #[arg(value_name = "KEY=VALUE", value_parser = parse_kv, required = true)]
        settings: Vec<(String, String)>,
    },
}

#[derive(Debug, Subcommand)]
enum PodCmd {
    /// CNI ADD.
    Add {
        instance: String,
        pod: String,
        /// A hostPort: HOST:CONTAINER[/tcp|/udp] (repeatable), passed as the `portMappings`
        /// capability to portmap (and again on DEL and CHECK).
        #[arg(long = "port-mapping", value_name = "HOST:CONTAINER[/PROTO]")]
        port_mappings: Vec<pods::PortMapping>,
    },
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
    /// Hand the node back to aws-node (`vpc-cni-agent uninstall --to aws-node`; stop the agent
    /// first).
    Uninstall,
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `vpc-lab kube …`.
fn kube_cmd(cmd: KubeCmd) -> Result<ExitCode> {
    match cmd {
        KubeCmd::Status { json } => {
            let s = kube::status()?;
            if json {
                print_json(&s)?;
            } else {
                println!(
                    "{}: {} in the instances' namespaces, {} in the root namespace",
                    if s.serving { "serving" } else { "STOPPED" },
                    s.instance_url,
                    s.host_url
                );
                println!(
                    "kubeconfig {} (agents), {} (root namespace)",
                    s.kubeconfig.display(),
                    s.host_kubeconfig.display()
                );
                println!(
                    "{} nodes, {} pods, {} events, {} ENIConfigs; resourceVersion {}",
                    s.nodes, s.pods, s.events, s.eniconfigs, s.resource_version
                );
            }
        }
        KubeCmd::Stop => kube::stop()?,
        KubeCmd::Start => kube::start()?,
        KubeCmd::Nodes => print_json(&kube::nodes()?)?,
        KubeCmd::Events { node } => print_json(&kube::events(node.as_deref())?)?,
        KubeCmd::Pod { pod } => {
            let (ns, name) = pods::parse_pod(&pod)?;
            match kube::pod(&ns, &name)? {
                Some(p) => print_json(&p)?,
                None => {
                    eprintln!("vpc-lab: no Pod {pod} in the lab's Kubernetes API");
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        KubeCmd::Eniconfigs => print_json(&kube::eniconfigs()?)?,
        KubeCmd::Label { node, label } => {
            let (k, v) = kube::objects::parse_key_value(&label, false)?;
            kube::label(&node, &k, &v)?;
        }
        KubeCmd::Unlabel { node, key } => kube::unlabel(&node, &key)?,
        KubeCmd::Annotate { node, annotation } => {
            let (k, v) = kube::objects::parse_key_value(&annotation, true)?;
            kube::annotate(&node, &k, &v)?;
        }
        KubeCmd::Unannotate { node, key } => kube::unannotate(&node, &key)?,
        KubeCmd::Capacity { node, pods } => kube::capacity(&node, pods)?,
        KubeCmd::Eniconfig {
            name,
            subnet,
            security_groups,
        } => {
            let sgs: Vec<String> = security_groups
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            kube::eniconfig(&name, &subnet, &sgs)?;
        }
        KubeCmd::EniconfigDelete { name } => {
            if !kube::eniconfig_delete(&name)? {
                eprintln!("vpc-lab: no ENIConfig {name:?} in the lab's Kubernetes API");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn require_root() -> Result<()> {
    if !testkit::is_root() {
        bail!("vpc-lab needs root (it creates network namespaces); run it with sudo");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(
        cli.cmd,
        Cmd::Status
            | Cmd::Ec2Stats
            | Cmd::Fidelity { .. }
            | Cmd::Kube { .. }
            | Cmd::Kubelet {
                cmd: KubeletCmd::Status { .. }
            }
    ) {
        // Commands that only print: `vpc-lab status | head` ends quietly when `head` is done
        // (Rust ignores SIGPIPE, and a print to a closed pipe would panic).
        // SAFETY: restoring the default disposition of a signal, before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let default_level = match cli.cmd {
        Cmd::Daemon
        | Cmd::Kubelet {
            cmd: KubeletCmd::Run { .. },
        } => "info",
        Cmd::Up { .. } | Cmd::Down => "vpc_lab=info,lab=info,lab_aws=info,lab_net=info,warn",
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
            // A failed CNI call exits with the plugin's CNI error code (11: try again later).
            match e.downcast_ref::<pods::CniFailure>() {
                Some(f) if (1..=255).contains(&f.code) => ExitCode::from(f.code as u8),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    require_root()?;
    match cli.cmd {
        Cmd::Up {
            agent_env,
            no_agents,
            deploy,
            provisioning,
            instance_type,
            fresh_nodes,
            ec2_error_rate,
            ec2_latency_ms,
            ec2_throttle,
            imds_delay_ms,
            attach_delay_ms,
            subnet_free,
        } => {
            let mut knobs = fidelity::Knobs::default();
            for (k, v) in [
                ("ec2-error-rate", &ec2_error_rate),
                ("ec2-latency-ms", &ec2_latency_ms),
                ("ec2-throttle", &ec2_throttle),
                ("imds-delay-ms", &imds_delay_ms),
                ("attach-delay-ms", &attach_delay_ms),
                ("subnet-free", &subnet_free),
            ] {
                knobs.set(k, v).with_context(|| format!("--{k}"))?;
            }
            let opts = UpOptions {
                agent_env,
                agents: !no_agents,
                deploy: match deploy {
                    DeployArg::Process => Deploy::Process,
                    DeployArg::Daemonset => Deploy::DaemonSet,
                },
                provisioning: provisioning.map(|p| {
                    p.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect()
                }),
                instance_type,
                fresh_nodes,
                knobs,
            };
            control::up(&opts)?;
        }
        Cmd::Down => control::down()?,
        Cmd::Fidelity { cmd } => {
            LabState::load()?;
            let mut k = fidelity::Knobs::load_from(&paths::knobs_file())?;
            if let FidelityCmd::Set { settings } = cmd {
                for (key, v) in &settings {
                    k.set(key, v)?;
                }
                k.save_to(&paths::knobs_file())?;
                tracing::info!(knobs = ?k, "fidelity knobs saved");
            }
            println!("{}", serde_json::to_string_pretty(&k)?);
        }
        Cmd::Bench { churn } => bench::run(churn)?,
        Cmd::BenchPrefixes { parallel } => prefixes::run(parallel)?,
        Cmd::Perf(opts) => perf::run(&opts)?,
        Cmd::Soak(opts) => soak::run(&opts)?,
        Cmd::Ec2Stats => {
            LabState::load()?;
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &fidelity::load_stats_from(&paths::ec2_stats_file())?
                )?
            );
        }
        Cmd::Status => control::status()?,
        Cmd::Daemon => daemon::main()?,
        Cmd::Pod { cmd } => match cmd {
            PodCmd::Add {
                instance,
                pod,
                port_mappings,
            } => {
                pods::add_with(&instance, &pod, pods::Print::Pretty, &port_mappings)?;
            }
            PodCmd::Del { instance, pod } => pods::del(&instance, &pod, pods::Print::Pretty)?,
            PodCmd::Check { instance, pod } => pods::check(&instance, &pod)?,
        },
        Cmd::Agent {
            action,
            instance,
            agent_env,
        } => match action {
            AgentAction::Start => {
                control::agent_start_ready(&instance, &agent_env)?;
            }
            AgentAction::Stop => control::agent_stop(&instance, false)?,
            AgentAction::Kill => control::agent_stop(&instance, true)?,
            AgentAction::Restart => {
                let _ = control::agent_stop(&instance, false);
                control::agent_start_ready(&instance, &agent_env)?;
            }
            AgentAction::Uninstall => {
                print!("{}", control::agent_uninstall_to_aws_node(&instance)?);
            }
        },
        Cmd::Kube { cmd } => return kube_cmd(cmd),
        Cmd::Kubelet { cmd } => match cmd {
            KubeletCmd::Status { json } => {
                let all = kubelet::status_all()?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&all)?);
                } else if all.is_empty() {
                    println!("no kubelet runs in the lab (vpc-lab up --deploy daemonset)");
                } else {
                    for s in &all {
                        print!("{}", kubelet::render(s));
                    }
                }
            }
            KubeletCmd::Delete { instance } => {
                let took = kubelet::delete(&instance)?;
                println!("{instance}: pod deleted in {:.2} s", took.as_secs_f64());
            }
            KubeletCmd::Deploy { instance, timeout } => {
                let s = kubelet::deploy(&instance, std::time::Duration::from_secs(timeout))?;
                print!("{}", kubelet::render(&s));
            }
            KubeletCmd::Run { instance } => kubelet::main(&instance)?,
        },
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
        Cmd::AwsNode { cmd } => match cmd {
            AwsNodeCmd::Wire { instance, pods } => {
                let pods: Vec<&str> = pods.iter().map(String::as_str).collect();
                let world = lab::store::load_world()?;
                for r in aws_node::wire(&instance, &pods)? {
                    let ip = r.ips().first().copied();
                    let device = world
                        .instance(&instance)
                        .zip(ip)
                        .and_then(|(i, ip)| aws_node::device_of(i, ip));
                    println!(
                        "{} {} eth{} {}",
                        r.display(),
                        ip.map(|i| i.to_string()).unwrap_or_default(),
                        device.map(|d| d.to_string()).unwrap_or_else(|| "?".into()),
                        aws_node::host_veth(&r.namespace, &r.name)
                    );
                }
            }
            AwsNodeCmd::Check { instance } => {
                let problems = aws_node::check(&instance)?;
                if !problems.is_empty() {
                    println!(
                        "aws-node v1.23 would not accept {instance} as it is ({} problems):",
                        problems.len()
                    );
                    for p in &problems {
                        println!("  - {p}");
                    }
                    return Ok(ExitCode::FAILURE);
                }
                println!("aws-node v1.23 would accept {instance} and keep its pods running");
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}
