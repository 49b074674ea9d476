//! `vpc-cni-conformance`: drive a CNI plugin with real clients (containerd's CRI plugin,
//! cnitool). Every subcommand prints one JSON document on stdout; errors go to stderr with a
//! non-zero exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use conformance::cnitool::{self, Verb};
use conformance::containerd::{self, StartOptions};
use conformance::cri::{Cri, SandboxSpec};
use conformance::util::{find_cache_file, netns_path};
use testkit::stats::ms;

#[derive(Debug, Parser)]
#[command(
    name = "vpc-cni-conformance",
    about = "Drive a CNI plugin with real clients: containerd (CRI) and cnitool"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start/stop a throwaway containerd with its CRI plugin inside a network namespace.
    Containerd {
        #[command(subcommand)]
        action: ContainerdCmd,
    },
    /// Talk to a CRI runtime (containerd started by `containerd start`).
    Cri {
        #[command(flatten)]
        target: CriTarget,
        #[command(subcommand)]
        action: CriCmd,
    },
    /// Run cnitool add|check|del inside a network namespace.
    Cnitool(CnitoolArgs),
}

#[derive(Debug, Subcommand)]
enum ContainerdCmd {
    /// Start containerd detached inside --netns; prints {pid, socket, status, ...}.
    Start {
        /// Network namespace: a name under /run/netns or a path.
        #[arg(long)]
        netns: String,
        /// Directory for containerd's config, root, state, runc root, sockets and log.
        #[arg(long)]
        dir: PathBuf,
        /// CNI plugin binaries directory, or a ':' list of them (merged into <dir>/cni-bin with
        /// symlinks at start, first wins). containerd also runs `loopback` for every sandbox:
        /// add /usr/lib/cni after a directory holding only the plugin under test.
        #[arg(long)]
        cni_bin: String,
        /// CNI configuration directory.
        #[arg(long)]
        cni_conf: PathBuf,
        /// Pause image OCI tar (default: .cache/pause-oci.tar of the repository).
        #[arg(long)]
        pause_image: Option<PathBuf>,
        #[arg(long, default_value = "containerd")]
        containerd: PathBuf,
        #[arg(long, default_value = "ctr")]
        ctr: PathBuf,
        /// Seconds to wait for the CRI socket to answer.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Also wait (within --timeout) until the CRI reports NetworkReady, i.e. it loaded a
        /// conflist from --cni-conf (useful when an agent writes it after containerd starts).
        #[arg(long)]
        require_network_ready: bool,
    },
    /// Remove its sandboxes, stop it by PID, and remove everything it left; prints what was removed.
    Stop {
        #[arg(long)]
        dir: PathBuf,
        /// Keep containerd.log (and so the directory).
        #[arg(long)]
        keep_log: bool,
        /// Seconds each CRI call may take before containerd is treated as hung and stopped
        /// by signal (its sandboxes then get no CNI DEL).
        #[arg(long, default_value_t = 20)]
        cri_timeout: u64,
    },
}

#[derive(Debug, Args)]
struct CriTarget {
    /// containerd directory given to `containerd start` (the socket is <dir>/containerd.sock).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
    /// The CRI socket itself (instead of --dir).
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Per-call timeout in seconds.
    #[arg(long, global = true, default_value_t = 120)]
    timeout: u64,
}

#[derive(Debug, Subcommand)]
enum CriCmd {
    /// Runtime version and RuntimeReady/NetworkReady.
    Status,
    /// RunPodSandbox + PodSandboxStatus; prints {id, ip, netns, run_ms, ...}.
    RunSandbox {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "")]
        uid: String,
    },
    /// PodSandboxStatus of a sandbox (by --id, or --name/--namespace).
    SandboxStatus(SandboxRef),
    /// StopPodSandbox + RemovePodSandbox (by --id, or --name/--namespace).
    StopRemove(SandboxRef),
    /// ListPodSandbox.
    List,
    /// Start --count sandboxes concurrently, report latency p50/p99 and total, then remove all.
    Burst {
        #[arg(long, default_value_t = 50)]
        count: usize,
        #[arg(long, default_value = "burst")]
        prefix: String,
        #[arg(long, default_value = "conformance")]
        namespace: String,
        /// Leave the sandboxes running.
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Debug, Args)]
struct SandboxRef {
    #[arg(long, conflicts_with = "name")]
    id: Option<String>,
    #[arg(long)]
    name: Option<String>,
    #[arg(long, default_value = "default")]
    namespace: String,
}

#[derive(Debug, Args)]
struct CnitoolArgs {
    verb: Verb,
    /// Network namespace cnitool runs in (the node): a name under /run/netns or a path.
    #[arg(long)]
    netns: String,
    /// Network name (the conflist's `name`).
    #[arg(long)]
    net: String,
    /// The pod's network namespace (CNI_NETNS): a name under /run/netns or a path.
    #[arg(long)]
    pod_netns: String,
    /// NETCONFPATH: directory holding the conflist.
    #[arg(long)]
    conf_dir: PathBuf,
    /// CNI_PATH: plugin binaries directory (or a ':' list).
    #[arg(long)]
    cni_bin: String,
    #[arg(long, default_value = "eth0")]
    ifname: String,
    /// CNI_ARGS passed through, e.g. 'K8S_POD_NAMESPACE=default;K8S_POD_NAME=p'.
    #[arg(long)]
    cni_args: Option<String>,
    /// The cnitool binary (default: .cache/bin/cnitool of the repository).
    #[arg(long)]
    cnitool: Option<PathBuf>,
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

fn print(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn require_root() -> Result<()> {
    if !testkit::is_root() {
        bail!(
            "must run as root (it enters network namespaces and starts containerd); run it with sudo"
        );
    }
    Ok(())
}

impl CriTarget {
    async fn connect(&self) -> Result<Cri> {
        let socket = match (&self.socket, &self.dir) {
            (Some(s), _) => s.clone(),
            (None, Some(d)) => containerd::socket_path(d),
            (None, None) => bail!("give --dir <containerd dir> or --socket <CRI socket>"),
        };
        Cri::connect(&socket, Duration::from_secs(self.timeout)).await
    }
}

impl SandboxRef {
    async fn resolve(&self, cri: &Cri) -> Result<String> {
        match (&self.id, &self.name) {
            (Some(id), _) => Ok(id.clone()),
            (None, Some(name)) => cri.find(name, &self.namespace).await?.with_context(|| {
                format!(
                    "no sandbox {}/{name} on {}; `cri list` shows what exists",
                    self.namespace,
                    cri.socket().display()
                )
            }),
            (None, None) => bail!("give --id or --name (with --namespace)"),
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Containerd { action } => match action {
            ContainerdCmd::Start {
                netns,
                dir,
                cni_bin,
                cni_conf,
                pause_image,
                containerd,
                ctr,
                timeout,
                require_network_ready,
            } => {
                require_root()?;
                let pause_tar = match pause_image {
                    Some(p) => p,
                    None => find_cache_file("pause-oci.tar")?,
                };
                let started = containerd::start(&StartOptions {
                    netns: netns_path(&netns)?,
                    dir,
                    cni_bin: std::env::split_paths(&cni_bin).collect(),
                    cni_conf,
                    pause_tar,
                    containerd,
                    ctr,
                    timeout: Duration::from_secs(timeout),
                    require_network_ready,
                })
                .await?;
                print(&started)?;
            }
            ContainerdCmd::Stop {
                dir,
                keep_log,
                cri_timeout,
            } => {
                require_root()?;
                let rep =
                    containerd::stop(&dir, keep_log, Duration::from_secs(cri_timeout)).await?;
                print(&rep)?;
                if !rep.errors.is_empty() {
                    return Ok(ExitCode::FAILURE);
                }
            }
        },
        Cmd::Cri { target, action } => {
            let cri = target.connect().await?;
            match action {
                CriCmd::Status => print(&cri.status().await?)?,
                CriCmd::RunSandbox {
                    name,
                    namespace,
                    uid,
                } => {
                    let mut spec = SandboxSpec::new(&name, &namespace);
                    spec.uid = uid;
                    let (info, took) = cri.run_and_status(&spec).await?;
                    let mut v = serde_json::to_value(&info)?;
                    v["run_ms"] = ms(took).into();
                    print(&v)?;
                }
                CriCmd::SandboxStatus(r) => {
                    let id = r.resolve(&cri).await?;
                    print(&cri.sandbox_status(&id).await?)?;
                }
                CriCmd::StopRemove(r) => {
                    let id = r.resolve(&cri).await?;
                    let t = std::time::Instant::now();
                    cri.stop_sandbox(&id).await?;
                    let stop = t.elapsed();
                    cri.remove_sandbox(&id).await?;
                    print(&serde_json::json!({
                        "id": id,
                        "stop_ms": ms(stop),
                        "stop_remove_ms": ms(t.elapsed()),
                    }))?;
                }
                CriCmd::List => print(&cri.list().await?)?,
                CriCmd::Burst {
                    count,
                    prefix,
                    namespace,
                    keep,
                } => {
                    let rep = cri.burst(count, &prefix, &namespace, keep).await?;
                    print(&rep)?;
                    if !rep.ok() {
                        eprintln!(
                            "burst: {} of {} sandboxes ready; errors: {:?}",
                            rep.ready, rep.count, rep.errors
                        );
                        return Ok(ExitCode::FAILURE);
                    }
                }
            }
        }
        Cmd::Cnitool(a) => {
            require_root()?;
            let cnitool = match a.cnitool {
                Some(p) => p,
                None => find_cache_file("bin/cnitool")?,
            };
            let run = cnitool::Run {
                cnitool,
                node_netns: netns_path(&a.netns)?,
                net: a.net,
                pod_netns: netns_path(&a.pod_netns)?,
                conf_dir: a.conf_dir,
                cni_path: a.cni_bin,
                ifname: a.ifname,
                cni_args: a.cni_args,
            };
            let out = tokio::task::spawn_blocking(move || {
                run.run(a.verb, Duration::from_secs(a.timeout))
            })
            .await??;
            print(&out)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vpc-cni-conformance: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vpc-cni-conformance: {e:#}");
            ExitCode::FAILURE
        }
    }
}
