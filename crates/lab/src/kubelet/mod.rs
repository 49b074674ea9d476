//! The lab's kubelet: runs the DaemonSet's pod (`deploy/base/daemonset.yaml`) on a lab
//! instance through containerd's CRI, the way kubelet runs it on a node (`vpc-lab up --deploy
//! daemonset`, `vpc-lab kubelet …`).
//!
//! One kubelet per instance: a detached `vpc-lab kubelet run <instance>` process inside the
//! instance's network namespace (the node's, so the pod's host network is the instance's),
//! which starts its own containerd there (`conformance::containerd`: config, root, state and
//! sockets under `/run/vpc-lab/<instance>/containerd`), imports the node image
//! (`target/image/vpc-cni.oci.tar`, `make image`) and then keeps the node's pod as the API
//! says it should be:
//!
//! - `kubelet/pod.json` is the pod the API server has bound to the node (the DaemonSet
//!   controller's pod): written by `start` and `deploy`, removed by `delete` (`kubectl delete
//!   pod`; there is no DaemonSet controller, so nothing makes a new one until `deploy`);
//! - for a new pod: the images checked (`imagePullPolicy`; the lab has no registry to pull
//!   from), RunPodSandbox, each init container in order until it exits 0 (restarted with
//!   back-off when it fails), then the containers; liveness and readiness probes on kubelet's
//!   schedule from the node's network namespace ([`probe`]); a container that exits or fails
//!   its liveness probe is killed and started again with kubelet's back-off, its restarts
//!   counted; the pod is Ready when every container runs and passes its readiness probe;
//! - a deleted pod: its containers stopped with the grace period, then StopPodSandbox and
//!   RemovePodSandbox;
//! - `kubelet/status.json`: what `vpc-lab kubelet status` shows (pod, containers, restarts,
//!   readiness, the last probes, and the pod's timeline from request to Ready).
//!
//! The translation from the pod spec to CRI configurations, and where the lab differs from a
//! node, is [`spec`]. `vpc-lab down` stops the kubelet and then its containerd ([`stop`]).

pub mod probe;
pub mod spec;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use conformance::containerd::{self, StartOptions};
use conformance::cri::Cri;
use lab_net::ns;
use serde::{Deserialize, Serialize};
use testkit::procs;
use tokio::task::JoinHandle;

use crate::{paths, pods, store};
use probe::{Backoff, Change, Kind, Outcome, Worker};
use spec::{ContainerPlan, HostPathType, LabEnv, Node, PodId, PodPlan, PullPolicy};

/// The DaemonSet the lab's kubelet runs, relative to the repository.
pub const MANIFEST: &str = "deploy/base/daemonset.yaml";
/// The node image `make image` builds, relative to the repository (`scripts/image/common.sh`).
pub const IMAGE_ARCHIVE: &str = "target/image/vpc-cni.oci.tar";
/// What the process in the kubelet's pid file must show in its cmdline before it is signalled.
pub const MARKER: &[&str] = &["vpc-lab", "kubelet"];

/// How long each CRI call may take.
const CRI_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a running container's state is read while the pod starts (its timeline is
/// measured) and once it is Ready (kubelet's PLEG relists every second).
const POLL_STARTING: Duration = Duration::from_millis(50);
const POLL_READY: Duration = Duration::from_millis(500);

fn dir(instance: &str) -> PathBuf {
    paths::kubelet_dir(instance)
}
fn config_file(instance: &str) -> PathBuf {
    dir(instance).join("config.json")
}
fn pod_file(instance: &str) -> PathBuf {
    dir(instance).join("pod.json")
}
fn status_file(instance: &str) -> PathBuf {
    dir(instance).join("status.json")
}
/// The kubelet's pid file.
pub fn pid_file(instance: &str) -> PathBuf {
    dir(instance).join("kubelet.pid")
}
/// The kubelet's own log.
pub fn log_file(instance: &str) -> PathBuf {
    dir(instance).join("kubelet.log")
}
fn log_root(instance: &str) -> PathBuf {
    dir(instance).join("logs")
}

/// Milliseconds since the epoch (timelines cross processes: `up` and the kubelet).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What `start` leaves for the kubelet process and for `deploy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub manifest: PathBuf,
    pub image_archive: PathBuf,
    pub env: LabEnv,
}

/// The pod the node must run, as the API server holds it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Desired {
    pub id: PodId,
    pub requested_at_ms: u64,
}

/// What the kubelet reports (`kubelet/status.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub instance: String,
    pub kubelet_pid: u32,
    pub containerd_pid: Option<i32>,
    pub containerd_socket: Option<PathBuf>,
    /// The image the pod runs, as the runtime names it, and its id.
    pub images: Vec<ImageState>,
    pub pod: Option<PodStatus>,
    /// The last error the kubelet met (it retries).
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageState {
    pub image: String,
    pub id: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodStatus {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub sandbox_id: String,
    /// `Init:<done>/<n>`, `Running` or `Terminating`.
    pub phase: String,
    pub ready: bool,
    pub containers: Vec<ContainerStatus>,
    pub timeline: Timeline,
    pub log_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerStatus {
    pub name: String,
    pub init: bool,
    pub id: Option<String>,
    /// `Waiting`, `Running`, `Terminated`, or `CrashLoopBackOff` (waiting for its back-off).
    pub state: String,
    pub exit_code: Option<i32>,
    pub reason: String,
    pub restarts: u32,
    pub ready: bool,
    pub started_at_ms: Option<u64>,
    pub liveness: Option<ProbeStatus>,
    pub readiness: Option<ProbeStatus>,
    pub log: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeStatus {
    pub url: String,
    /// The result kubelet acts on (alive / ready).
    pub reported: bool,
    pub probes: u64,
    pub failures: u64,
    pub last: Option<LastProbe>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastProbe {
    pub at_ms: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// When each step of a pod's start happened (ms since the epoch).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// The pod was requested (`up` started the kubelet, or `deploy`).
    pub requested: u64,
    /// For the kubelet's first pod: its process started, its containerd answered, the image
    /// was imported.
    pub kubelet_started: Option<u64>,
    pub containerd_ready: Option<u64>,
    pub image_imported: Option<u64>,
    /// The kubelet began creating the pod.
    pub seen: Option<u64>,
    pub sandbox_ready: Option<u64>,
    /// The first init container's start and the last one's successful exit.
    pub init_started: Option<u64>,
    pub init_done: Option<u64>,
    /// The agent's container started (first start).
    pub main_started: Option<u64>,
    /// The agent wrote its conflist (the file's modification time).
    pub conflist_written: Option<u64>,
    /// The readiness probe passed: the pod is Ready.
    pub ready: Option<u64>,
}

impl Timeline {
    /// From request to Ready, step by step: (what, milliseconds), then the total.
    pub fn breakdown(&self) -> (Vec<(&'static str, u64)>, Option<u64>) {
        let points = [
            ("kubelet process start", self.kubelet_started),
            ("containerd start", self.containerd_ready),
            ("image import", self.image_imported),
            ("kubelet notices the pod", self.seen),
            ("RunPodSandbox", self.sandbox_ready),
            ("init container create+start", self.init_started),
            ("init container run", self.init_done),
            ("agent container create+start", self.main_started),
            ("agent start → conflist written", self.conflist_written),
            ("conflist → readiness probe passes", self.ready),
        ];
        let mut out = Vec::new();
        let mut last = self.requested;
        for (what, at) in points {
            if let Some(at) = at {
                out.push((what, at.saturating_sub(last)));
                last = at;
            }
        }
        (out, self.ready.map(|r| r.saturating_sub(self.requested)))
    }

    /// One line: `start → Ready 7.9 s: a 0.9 s, b 2.1 s, …`.
    pub fn summary(&self) -> String {
        let (steps, total) = self.breakdown();
        let steps: Vec<String> = steps
            .iter()
            .map(|(w, ms)| format!("{w} {:.2} s", *ms as f64 / 1000.0))
            .collect();
        match total {
            Some(t) => format!(
                "request → Ready {:.2} s: {}",
                t as f64 / 1000.0,
                steps.join(", ")
            ),
            None => format!("not Ready yet: {}", steps.join(", ")),
        }
    }
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// A random number in [0, 1) (0.5 if /dev/urandom cannot be read).
fn random_fraction() -> f64 {
    pods::random_id()
        .ok()
        .and_then(|hex| u64::from_str_radix(&hex[..13], 16).ok())
        .map_or(0.5, |n| n as f64 / (1u64 << 52) as f64)
}

/// A new pod of the DaemonSet for `instance`: the DaemonSet's name and namespace, a name per
/// node (the controller's would end in a random suffix) and a fresh UID.
fn new_pod(manifest: &Path, instance: &str) -> Result<Desired> {
    let ds = spec::load_daemonset(manifest)?;
    let name = ds.metadata.name.clone().unwrap_or_else(|| "vpc-cni".into());
    let u = pods::random_id()?;
    Ok(Desired {
        id: PodId {
            name: format!("{name}-{instance}"),
            namespace: ds
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            uid: format!(
                "{}-{}-{}-{}-{}",
                &u[0..8],
                &u[8..12],
                &u[12..16],
                &u[16..20],
                &u[20..32]
            ),
        },
        requested_at_ms: now_ms(),
    })
}

fn find_repo_file(rel: &str, hint: &str) -> Result<PathBuf> {
    testkit::repo::find(rel).with_context(|| {
        format!("{rel} not found (looked in $VPC_CNI_REPO, the current directory and this executable's parents); {hint}")
    })
}

/// The node image archive and the DaemonSet, or why they are missing.
fn inputs() -> Result<(PathBuf, PathBuf)> {
    let manifest = find_repo_file(MANIFEST, "run from the repository")?;
    let archive = find_repo_file(
        IMAGE_ARCHIVE,
        "build the node image first: `make image`, or from the debug binaries already built: `bash scripts/image/build.sh --no-build --profile debug`",
    )?;
    Ok((manifest, archive))
}

/// Whether the kubelet of `instance` runs.
pub fn running(instance: &str) -> Option<i32> {
    procs::read_pid(&pid_file(instance)).filter(|p| procs::is_ours(*p, MARKER))
}

/// Starts the kubelet of `instance` (detached, in the instance's namespace) with the pod of
/// the DaemonSet to run, and returns at once (see [`wait_ready`]). `env` is the lab's
/// environment for the pod ([`LabEnv`]).
pub fn start(instance: &str, env: LabEnv) -> Result<u32> {
    let ins = ns::instance_ns(instance);
    if !ns::exists(&ins) {
        bail!("no namespace {ins}: is {instance:?} an instance of the lab, and is the lab up?");
    }
    if let Some(p) = running(instance) {
        bail!("the kubelet of {instance} is already running (pid {p})");
    }
    let (manifest, image_archive) = inputs()?;
    std::fs::create_dir_all(dir(instance))?;
    let desired = new_pod(&manifest, instance)?;
    // Refuse a manifest the kubelet could not run before starting anything.
    let ds = spec::load_daemonset(&manifest)?;
    spec::plan(
        &ds,
        &node(instance, Ipv4Addr::UNSPECIFIED, &env),
        &desired.id,
    )
    .with_context(|| format!("{} as the lab's kubelet reads it", manifest.display()))?;
    write_json(
        &config_file(instance),
        &Config {
            manifest,
            image_archive,
            env,
        },
    )?;
    write_json(&pod_file(instance), &desired)?;
    let _ = std::fs::remove_file(status_file(instance));
    let exe = paths::exe_dir()?.join("vpc-lab");
    if !exe.is_file() {
        bail!(
            "{} not found: build it with `cargo build -p vpc-lab`",
            exe.display()
        );
    }
    let mut cmd = ns::command(&ins, exe.to_str().context("vpc-lab path is not UTF-8")?)?;
    cmd.args(["kubelet", "run", instance]);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let pid = procs::spawn_detached(cmd, &log_file(instance), &pid_file(instance))?;
    tracing::info!(instance, pid, "started the lab's kubelet");
    Ok(pid)
}

/// The status the kubelet of `instance` last reported.
pub fn status(instance: &str) -> Result<Option<NodeStatus>> {
    read_json(&status_file(instance))
}

/// Every instance's kubelet status (instances without a kubelet are left out).
pub fn status_all() -> Result<Vec<NodeStatus>> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(paths::run_dir()) else {
        return Ok(out);
    };
    let mut names: Vec<String> = rd
        .flatten()
        .filter(|e| e.path().join("kubelet").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for n in names {
        match status(&n)? {
            Some(s) => out.push(s),
            None => out.push(NodeStatus {
                instance: n,
                error: Some("no status reported yet".into()),
                ..Default::default()
            }),
        }
    }
    Ok(out)
}

/// Waits until the pod `uid` (else the desired pod) of `instance` is Ready; fails early when
/// the kubelet exits, and with its status and log when `timeout` passes.
pub fn wait_ready(instance: &str, timeout: Duration) -> Result<NodeStatus> {
    let t = Instant::now();
    loop {
        let want: Option<Desired> = read_json(&pod_file(instance))?;
        let Some(want) = want else {
            bail!(
                "{instance} has no pod to wait for (deleted; `vpc-lab kubelet deploy {instance}`)"
            );
        };
        let st = status(instance)?;
        if let Some(s) = &st
            && let Some(p) = &s.pod
            && p.uid == want.id.uid
            && p.ready
        {
            return Ok(s.clone());
        }
        if running(instance).is_none() {
            bail!(
                "the kubelet of {instance} is not running; last lines of {}:\n{}",
                log_file(instance).display(),
                procs::tail(&log_file(instance), 30)
            );
        }
        if t.elapsed() > timeout {
            bail!(
                "the pod of {instance} was not Ready after {timeout:?}; status:\n{}\nlast lines of {}:\n{}",
                st.map(|s| render(&s))
                    .unwrap_or_else(|| "(none reported)".into()),
                log_file(instance).display(),
                procs::tail(&log_file(instance), 30)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `vpc-lab kubelet delete <instance>`: deletes the node's pod (as `kubectl delete pod`, with
/// no DaemonSet controller to make a new one) and waits until the kubelet has stopped its
/// containers and removed its sandbox.
pub fn delete(instance: &str) -> Result<Duration> {
    let t = Instant::now();
    let Some(pid) = running(instance) else {
        bail!(
            "no kubelet runs on {instance} (bring the lab up with `vpc-lab up --deploy daemonset`)"
        );
    };
    match std::fs::remove_file(pod_file(instance)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{instance} has no pod to delete")
        }
        Err(e) => return Err(e).context("removing the pod"),
    }
    loop {
        let s = status(instance)?;
        if s.as_ref().is_some_and(|s| s.pod.is_none()) {
            return Ok(t.elapsed());
        }
        if !procs::is_ours(pid, MARKER) {
            bail!("the kubelet of {instance} exited while deleting the pod");
        }
        if t.elapsed() > Duration::from_secs(90) {
            bail!(
                "the pod of {instance} was still there 90 s after its deletion; status:\n{}",
                s.map(|s| render(&s)).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `vpc-lab kubelet deploy <instance>`: a new pod of the DaemonSet for the node (after
/// `delete`), waiting until it is Ready.
pub fn deploy(instance: &str, timeout: Duration) -> Result<NodeStatus> {
    if running(instance).is_none() {
        bail!(
            "no kubelet runs on {instance} (bring the lab up with `vpc-lab up --deploy daemonset`)"
        );
    }
    if let Some(d) = read_json::<Desired>(&pod_file(instance))? {
        bail!(
            "{instance} already has its pod {}/{} (uid {}); delete it first: vpc-lab kubelet delete {instance}",
            d.id.namespace,
            d.id.name,
            d.id.uid
        );
    }
    let cfg: Config = read_json(&config_file(instance))?
        .with_context(|| format!("{} is missing", config_file(instance).display()))?;
    write_json(&pod_file(instance), &new_pod(&cfg.manifest, instance)?)?;
    wait_ready(instance, timeout)
}

/// Stops the kubelet of `instance` (by its pid file) and then its containerd with everything
/// it left (`conformance::containerd::stop`: the sandboxes through CRI, containerd and its
/// shims by pid, mounts, files). Returns the problems met; the clean-up goes on after each.
pub fn stop(instance: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if let Err(e) = procs::stop(&pid_file(instance), MARKER, false, Duration::from_secs(5)) {
        errors.push(format!("{e:#}"));
    }
    let ctrd = paths::containerd_dir(instance);
    if containerd::StartRecord::path(&ctrd).exists() {
        // On a thread of its own: the caller may be inside a runtime.
        let r = std::thread::spawn(move || -> Result<containerd::Stopped> {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(containerd::stop(&ctrd, false, Duration::from_secs(20)))
        })
        .join();
        match r {
            Ok(Ok(s)) => errors.extend(
                s.errors
                    .into_iter()
                    .map(|e| format!("stopping the containerd of {instance}: {e}")),
            ),
            Ok(Err(e)) => errors.push(format!("stopping the containerd of {instance}: {e:#}")),
            Err(_) => errors.push(format!("stopping the containerd of {instance}: panicked")),
        }
    }
    errors
}

fn ms(d: u64) -> String {
    format!("{:.2} s", d as f64 / 1000.0)
}

fn ago(at: u64) -> String {
    format!("{} ago", ms(now_ms().saturating_sub(at)))
}

fn render_probe(what: &str, p: &ProbeStatus) -> String {
    let verdict = match (what, p.reported) {
        ("liveness", true) => "alive",
        ("liveness", false) => "FAILED",
        (_, true) => "ready",
        (_, false) => "not ready",
    };
    let last = p
        .last
        .as_ref()
        .map(|l| {
            format!(
                "last {} {:?} in {} ms, {}",
                l.outcome
                    .code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "no answer".into()),
                l.outcome.message,
                l.outcome.took_ms,
                ago(l.at_ms)
            )
        })
        .unwrap_or_else(|| "not probed yet".into());
    format!(
        "{what} {verdict} ({}; {last}; {} probes, {} failed)",
        p.url, p.probes, p.failures
    )
}

/// A node's status as text (`vpc-lab kubelet status`).
pub fn render(s: &NodeStatus) -> String {
    let mut out = format!(
        "{}: kubelet pid {}, containerd pid {}\n",
        s.instance,
        s.kubelet_pid,
        s.containerd_pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into())
    );
    for i in &s.images {
        out.push_str(&format!(
            "  image {} {} ({:.1} MB)\n",
            i.image,
            i.id,
            i.size as f64 / 1e6
        ));
    }
    match &s.pod {
        None => out.push_str("  no pod\n"),
        Some(p) => {
            out.push_str(&format!(
                "  pod {}/{} uid {} sandbox {}: {}, {}\n",
                p.namespace,
                p.name,
                p.uid,
                &p.sandbox_id[..p.sandbox_id.len().min(12)],
                p.phase,
                if p.ready { "Ready" } else { "not Ready" }
            ));
            for c in &p.containers {
                out.push_str(&format!(
                    "    {}{}: {}{}, restarts {}{}{}\n",
                    if c.init { "init " } else { "" },
                    c.name,
                    c.state,
                    c.exit_code
                        .map(|e| format!(" (exit {e})"))
                        .unwrap_or_default(),
                    c.restarts,
                    if c.init {
                        String::new()
                    } else if c.ready {
                        ", ready".into()
                    } else {
                        ", not ready".into()
                    },
                    if c.reason.is_empty() {
                        String::new()
                    } else {
                        format!(", {}", c.reason)
                    }
                ));
                for (what, p) in [("liveness", &c.liveness), ("readiness", &c.readiness)] {
                    if let Some(p) = p {
                        out.push_str(&format!("      {}\n", render_probe(what, p)));
                    }
                }
                if let Some(l) = &c.log {
                    out.push_str(&format!("      log {}\n", l.display()));
                }
            }
            out.push_str(&format!("    {}\n", p.timeline.summary()));
        }
    }
    if let Some(e) = &s.error {
        out.push_str(&format!("  error: {e}\n"));
    }
    out
}

// ---- the kubelet process ------------------------------------------------------------------

/// The node as the kubelet knows it.
fn node(instance: &str, ip: Ipv4Addr, env: &LabEnv) -> Node {
    Node {
        instance: instance.to_string(),
        root: paths::inst_dir(instance),
        ip,
        resolv_conf: std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        log_root: log_root(instance),
        env: env.clone(),
    }
}

/// Creates or checks a `hostPath` as kubelet does before mounting it.
fn prepare_host_path(v: &spec::HostVolume) -> Result<()> {
    let p = &v.host;
    let kind = v.kind;
    let exists = p.exists();
    match kind {
        HostPathType::Unset => {}
        HostPathType::DirectoryOrCreate => {
            std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?
        }
        // As kubelet: the file, not its parent directory.
        HostPathType::FileOrCreate if !exists => {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("creating {}", p.display()))?;
        }
        HostPathType::FileOrCreate => {}
        HostPathType::Directory if !p.is_dir() => {
            bail!("hostPath {} is not a directory", p.display())
        }
        HostPathType::File if !p.is_file() => bail!("hostPath {} is not a file", p.display()),
        HostPathType::Socket if !exists => bail!("hostPath {} is not a socket", p.display()),
        _ => {}
    }
    Ok(())
}

/// One container of the running pod.
#[derive(Debug)]
struct Ctr {
    plan: ContainerPlan,
    id: Option<String>,
    restarts: u32,
    state: State,
    started: Option<Instant>,
    started_ms: Option<u64>,
    backoff: Backoff,
    liveness: Option<Worker>,
    readiness: Option<Worker>,
    last: HashMap<Kind, LastProbe>,
    in_flight: Vec<(Kind, JoinHandle<Outcome>)>,
    last_poll: Option<Instant>,
    log: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    /// Not started yet.
    Waiting,
    Running,
    /// Exited (or killed): to be started again at `restart_at` (init containers that exited 0
    /// are done and never restarted).
    Exited {
        code: i32,
        reason: String,
        finished: Instant,
        restart_at: Option<Instant>,
    },
}

impl Ctr {
    /// A container of a pod taken on at `created`; each of its probe workers ticks from
    /// then, the first time after `first_delay` of its own period.
    fn new(
        plan: ContainerPlan,
        created: Instant,
        first_delay: &dyn Fn(Duration) -> Duration,
    ) -> Ctr {
        let worker = |s: &Option<probe::Spec>| {
            s.clone()
                .map(|s| Worker::new(s.clone(), created, first_delay(s.period)))
        };
        Ctr {
            liveness: worker(&plan.liveness),
            readiness: worker(&plan.readiness),
            plan,
            id: None,
            restarts: 0,
            state: State::Waiting,
            started: None,
            started_ms: None,
            backoff: Backoff::default(),
            last: HashMap::new(),
            in_flight: Vec::new(),
            last_poll: None,
            log: None,
        }
    }

    fn ready(&self) -> bool {
        self.state == State::Running && self.readiness.as_ref().is_none_or(Worker::reported)
    }

    /// The container stopped: probes in flight are dropped, the workers wait for the next.
    fn stop_probes(&mut self) {
        for (_, h) in self.in_flight.drain(..) {
            h.abort();
        }
        for w in [&mut self.liveness, &mut self.readiness]
            .into_iter()
            .flatten()
        {
            w.container_stopped();
        }
    }

    fn status(&self, now: Instant) -> ContainerStatus {
        let (state, exit_code, reason) = match &self.state {
            State::Waiting => ("Waiting".to_string(), None, String::new()),
            State::Running => ("Running".to_string(), None, String::new()),
            State::Exited {
                code,
                reason,
                restart_at,
                ..
            } => (
                if restart_at.is_some_and(|r| r > now) {
                    "CrashLoopBackOff".to_string()
                } else {
                    "Terminated".to_string()
                },
                Some(*code),
                reason.clone(),
            ),
        };
        let probe = |w: &Option<Worker>, k: Kind| {
            w.as_ref().map(|w| ProbeStatus {
                url: w.spec.url(),
                reported: w.reported(),
                probes: w.probes,
                failures: w.failures,
                last: self.last.get(&k).cloned(),
            })
        };
        ContainerStatus {
            name: self.plan.name.clone(),
            init: self.plan.init,
            id: self.id.clone(),
            state,
            exit_code,
            reason,
            restarts: self.restarts,
            ready: !self.plan.init && self.ready(),
            started_at_ms: self.started_ms,
            liveness: probe(&self.liveness, Kind::Liveness),
            readiness: probe(&self.readiness, Kind::Readiness),
            log: self.log.clone(),
        }
    }
}

/// What a pod's containers are created in: the pod's plan, its sandbox, its images' ids.
#[derive(Debug)]
struct PodCtx {
    plan: PodPlan,
    sandbox_id: String,
    images: HashMap<String, String>,
}

/// The pod the kubelet runs.
#[derive(Debug)]
struct Pod {
    ctx: PodCtx,
    /// How many init containers exited 0 (all: the containers run).
    init_done: usize,
    init: Vec<Ctr>,
    main: Vec<Ctr>,
    timeline: Timeline,
    ready: bool,
}

impl Pod {
    fn status(&self, now: Instant) -> PodStatus {
        let phase = if self.init_done < self.init.len() {
            format!("Init:{}/{}", self.init_done, self.init.len())
        } else {
            "Running".to_string()
        };
        let plan = &self.ctx.plan;
        PodStatus {
            name: plan.id.name.clone(),
            namespace: plan.id.namespace.clone(),
            uid: plan.id.uid.clone(),
            sandbox_id: self.ctx.sandbox_id.clone(),
            phase,
            ready: self.ready,
            containers: self
                .init
                .iter()
                .chain(&self.main)
                .map(|c| c.status(now))
                .collect(),
            timeline: self.timeline.clone(),
            log_dir: plan.log_dir.clone(),
        }
    }
}

struct Kubelet {
    instance: String,
    /// When this kubelet started (its probe manager's start).
    started: Instant,
    cri: Cri,
    config: Config,
    node: Node,
    status: NodeStatus,
    pod: Option<Pod>,
    /// Node start-up times for the first pod's timeline.
    first: Option<Timeline>,
    /// When to try again to create the desired pod after a failure.
    retry_at: Option<Instant>,
    written: Option<NodeStatus>,
}

/// `vpc-lab kubelet run <instance>` (started by [`start`]): runs until SIGTERM, leaving the
/// pod running (as kubelet does when it stops).
pub fn main(instance: &str) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(instance))
}

async fn run(instance: &str) -> Result<()> {
    let started = now_ms();
    let started_at = Instant::now();
    let config: Config = read_json(&config_file(instance))?.with_context(|| {
        format!(
            "{} is missing: start the kubelet with `vpc-lab up --deploy daemonset`",
            config_file(instance).display()
        )
    })?;
    let world = store::load_world()?;
    let ip = world
        .instance(instance)
        .and_then(|i| i.enis.iter().find(|e| e.device_index == 0))
        .map(|e| e.primary_ip)
        .with_context(|| format!("the lab has no instance {instance} with a primary ENI"))?;
    let mut status = NodeStatus {
        instance: instance.to_string(),
        kubelet_pid: std::process::id(),
        ..Default::default()
    };

    let ctrd_dir = paths::containerd_dir(instance);
    let pause_tar = conformance::util::find_cache_file("pause-oci.tar")?;
    let started_ctrd = containerd::start(&StartOptions {
        netns: ns::path(&ns::instance_ns(instance)),
        dir: ctrd_dir,
        cni_bin: vec![paths::cni_bin_dir(instance)],
        cni_conf: paths::conf_dir(instance),
        pause_tar,
        containerd: PathBuf::from("containerd"),
        ctr: PathBuf::from("ctr"),
        timeout: Duration::from_secs(30),
        require_network_ready: false,
    })
    .await
    .context("starting the node's containerd")?;
    let containerd_ready = now_ms();
    status.containerd_pid = Some(started_ctrd.pid);
    status.containerd_socket = Some(started_ctrd.socket.clone());
    tracing::info!(
        instance,
        pid = started_ctrd.pid,
        ready_ms = started_ctrd.ready_ms,
        "containerd ready"
    );

    let ds = spec::load_daemonset(&config.manifest)?;
    let images: Vec<String> = ds
        .spec
        .iter()
        .flat_map(|s| s.template.spec.iter())
        .flat_map(|p| p.init_containers.iter().flatten().chain(&p.containers))
        .filter_map(|c| c.image.clone())
        .collect();
    let want = images.first().context("the DaemonSet names no image")?;
    let t = Instant::now();
    let archive = config.image_archive.clone();
    let socket = started_ctrd.socket.clone();
    let expect = normalize_image(want);
    tokio::task::spawn_blocking(move || {
        containerd::import_image(Path::new("ctr"), &socket, &archive, &expect)
    })
    .await??;
    let image_imported = now_ms();
    tracing::info!(instance, image = %want, took = ?t.elapsed(), "image imported");

    let cri = Cri::connect(&started_ctrd.socket, CRI_TIMEOUT).await?;
    let mut k = Kubelet {
        instance: instance.to_string(),
        started: started_at,
        cri,
        node: node(instance, ip, &config.env),
        config,
        status,
        pod: None,
        first: Some(Timeline {
            kubelet_started: Some(started),
            containerd_ready: Some(containerd_ready),
            image_imported: Some(image_imported),
            ..Default::default()
        }),
        retry_at: None,
        written: None,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        // Quick turns while a pod starts (its timeline is measured), slower once it is Ready,
        // and a second after an error.
        let pace = match k.sync().await {
            Err(e) => {
                tracing::warn!(instance, "{e:#}");
                k.status.error = Some(format!("{e:#}"));
                Duration::from_secs(1)
            }
            Ok(()) if k.pod.as_ref().is_some_and(|p| p.ready) => Duration::from_millis(100),
            Ok(()) => Duration::from_millis(20),
        };
        k.write_status();
        tokio::select! {
            _ = term.recv() => {
                tracing::info!(instance, "SIGTERM: the kubelet exits; its pod keeps running");
                return Ok(());
            }
            _ = tokio::time::sleep(pace) => {}
        }
    }
}

/// An image reference as containerd's CRI normalizes it (`vpc-cni:latest` →
/// `docker.io/library/vpc-cni:latest`).
pub fn normalize_image(image: &str) -> String {
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    let first = name.split('/').next().unwrap_or("");
    let has_domain =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let mut full = if has_domain {
        name.to_string()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    let last = full.rsplit('/').next().unwrap_or("");
    if !last.contains(':') && digest.is_none() {
        full.push_str(":latest");
    }
    match digest {
        Some(d) => format!("{full}@{d}"),
        None => full,
    }
}

impl Kubelet {
    fn write_status(&mut self) {
        let now = Instant::now();
        self.status.pod = self.pod.as_ref().map(|p| p.status(now));
        if self.written.as_ref() == Some(&self.status) {
            return;
        }
        match write_json(&status_file(&self.instance), &self.status) {
            Ok(()) => self.written = Some(self.status.clone()),
            Err(e) => tracing::warn!("{e:#}"),
        }
    }

    /// One turn: make the node's pod what the API says, then drive it.
    async fn sync(&mut self) -> Result<()> {
        let desired: Option<Desired> = read_json(&pod_file(&self.instance))?;
        let keep =
            matches!((&self.pod, &desired), (Some(p), Some(d)) if p.ctx.plan.id.uid == d.id.uid);
        if !keep && let Some(pod) = self.pod.take() {
            self.kill_pod(pod).await?;
            self.status.error = None;
        }
        if self.pod.is_none()
            && let Some(d) = desired
        {
            if self.retry_at.is_some_and(|r| Instant::now() < r) {
                return Ok(());
            }
            match self.create_pod(&d).await {
                Ok(p) => {
                    self.pod = Some(p);
                    self.retry_at = None;
                    self.status.error = None;
                }
                Err(e) => {
                    self.retry_at = Some(Instant::now() + Duration::from_secs(2));
                    return Err(e.context(format!("creating the pod {}", d.id.name)));
                }
            }
        }
        if let Some(mut pod) = self.pod.take() {
            let r = self.drive(&mut pod).await;
            self.pod = Some(pod);
            r?;
        }
        Ok(())
    }

    /// The images the pod needs, by `imagePullPolicy`: present (IfNotPresent, Never) or
    /// pulled (Always, which the lab cannot: no registry). Returns image → image id.
    async fn ensure_images(&mut self, plan: &PodPlan) -> Result<HashMap<String, String>> {
        let mut out = HashMap::new();
        for c in plan.init.iter().chain(&plan.containers) {
            if out.contains_key(&c.image) {
                continue;
            }
            if c.pull_policy == PullPolicy::Always {
                bail!(
                    "container {:?}: imagePullPolicy Always needs a registry, and the lab has none (the image is imported from {})",
                    c.name,
                    self.config.image_archive.display()
                );
            }
            let Some(info) = self.cri.image_status(&c.image).await? else {
                bail!(
                    "container {:?}: image {} is not on the node (ErrImageNeverPull / no registry to pull from); import {}",
                    c.name,
                    c.image,
                    self.config.image_archive.display()
                );
            };
            let state = ImageState {
                image: info
                    .repo_tags
                    .first()
                    .cloned()
                    .unwrap_or_else(|| c.image.clone()),
                id: info.id.clone(),
                size: info.size,
            };
            if !self.status.images.contains(&state) {
                self.status.images.push(state);
            }
            out.insert(c.image.clone(), info.id);
        }
        Ok(out)
    }

    async fn create_pod(&mut self, d: &Desired) -> Result<Pod> {
        let seen = now_ms();
        let ds = spec::load_daemonset(&self.config.manifest)?;
        let plan = spec::plan(&ds, &self.node, &d.id)?;
        for v in &plan.volumes {
            prepare_host_path(v).with_context(|| format!("volume {:?}", v.name))?;
        }
        std::fs::create_dir_all(&plan.log_dir)
            .with_context(|| format!("creating {}", plan.log_dir.display()))?;
        let images = self.ensure_images(&plan).await?;
        // Kubelet's probe manager takes the pod on: each worker ticks from now, the first time
        // after a random part of its period when kubelet itself started less than a period
        // ago.
        let created = Instant::now();
        let since_start = created.duration_since(self.started);
        let first_delay = |period: Duration| {
            if since_start < period {
                period.mul_f64(random_fraction())
            } else {
                Duration::ZERO
            }
        };
        let main = plan
            .containers
            .iter()
            .map(|c| Ctr::new(c.clone(), created, &first_delay))
            .collect();
        let mut timeline = self.first.take().unwrap_or_default();
        timeline.requested = d.requested_at_ms;
        timeline.seen = Some(seen);
        let sandbox_id = self.cri.run_sandbox_config(plan.sandbox.clone()).await?;
        timeline.sandbox_ready = Some(now_ms());
        tracing::info!(instance = %self.instance, pod = %plan.id.name, uid = %plan.id.uid, sandbox = %sandbox_id, "sandbox ready");
        Ok(Pod {
            init_done: 0,
            init: plan
                .init
                .iter()
                .map(|c| Ctr::new(c.clone(), created, &|_| Duration::ZERO))
                .collect(),
            main,
            ctx: PodCtx {
                plan,
                sandbox_id,
                images,
            },
            timeline,
            ready: false,
        })
    }

    /// Kubelet's pod deletion: each container stopped with the grace period, then the sandbox
    /// stopped and removed (which removes the containers).
    async fn kill_pod(&mut self, mut pod: Pod) -> Result<()> {
        let grace = pod.ctx.plan.grace.as_secs() as i64;
        let name = pod.ctx.plan.id.name.clone();
        tracing::info!(instance = %self.instance, pod = %name, "deleting the pod");
        let mut stopped = Ok(());
        for c in pod.main.iter_mut().chain(pod.init.iter_mut()) {
            c.stop_probes();
            if let (Some(id), State::Running) = (&c.id, &c.state)
                && let Err(e) = self.cri.stop_container(id, grace).await
            {
                stopped = Err(e);
            }
        }
        // The sandbox goes whatever happened to the containers (stopping it kills them).
        self.cri.stop_sandbox(&pod.ctx.sandbox_id).await?;
        self.cri.remove_sandbox(&pod.ctx.sandbox_id).await?;
        tracing::info!(instance = %self.instance, pod = %name, "pod deleted");
        stopped
    }

    /// Creates and starts container `c` (again), removing its previous container.
    async fn start_container(&self, pod: &PodCtx, c: &mut Ctr) -> Result<()> {
        if let Some(old) = c.id.take() {
            self.cri.remove_container(&old).await?;
        }
        let mut cfg = c.plan.config.clone();
        if let Some(md) = cfg.metadata.as_mut() {
            md.attempt = c.restarts;
        }
        if let (Some(img), Some(id)) = (cfg.image.as_mut(), pod.images.get(&c.plan.image)) {
            img.image = id.clone();
        }
        std::fs::create_dir_all(pod.plan.log_dir.join(&c.plan.name))?;
        cfg.log_path = format!("{}/{}.log", c.plan.name, c.restarts);
        cfg.annotations.insert(
            "io.kubernetes.container.restartCount".into(),
            c.restarts.to_string(),
        );
        let id = self
            .cri
            .create_container(&pod.sandbox_id, cfg.clone(), pod.plan.sandbox.clone())
            .await?;
        self.cri.start_container(&id).await?;
        let now = Instant::now();
        c.log = Some(pod.plan.log_dir.join(&cfg.log_path));
        c.id = Some(id);
        c.state = State::Running;
        c.started = Some(now);
        c.started_ms = Some(now_ms());
        c.last_poll = Some(now);
        for w in [&mut c.liveness, &mut c.readiness].into_iter().flatten() {
            w.container_started(now);
        }
        tracing::info!(instance = %self.instance, container = %c.plan.name, restarts = c.restarts, "container started");
        Ok(())
    }

    /// Reads the state of a running container; on exit, schedules its restart by the
    /// back-off (none for an init container that exited 0).
    async fn poll(&self, c: &mut Ctr, now: Instant, every: Duration) -> Result<()> {
        if c.state != State::Running || c.last_poll.is_some_and(|t| now < t + every) {
            return Ok(());
        }
        c.last_poll = Some(now);
        let Some(id) = &c.id else { return Ok(()) };
        let st = self.cri.container_status(id).await?;
        if st.state == "CONTAINER_EXITED" || st.state == "CONTAINER_UNKNOWN" {
            let done = c.plan.init && st.exit_code == 0;
            tracing::info!(instance = %self.instance, container = %c.plan.name, exit_code = st.exit_code, reason = %st.reason, "container exited");
            c.stop_probes();
            c.state = State::Exited {
                code: st.exit_code,
                reason: if st.reason.is_empty() {
                    "Error".into()
                } else {
                    st.reason
                },
                finished: now,
                restart_at: (!done).then(|| c.backoff.earliest_restart(now)),
            };
        }
        Ok(())
    }

    /// Starts a container that never ran, or again once its back-off has passed.
    async fn start_if_due(&self, pod: &PodCtx, c: &mut Ctr, now: Instant) -> Result<bool> {
        match c.state.clone() {
            State::Waiting => {
                self.start_container(pod, c).await?;
                Ok(true)
            }
            State::Exited {
                finished,
                restart_at: Some(at),
                ..
            } if now >= at => {
                c.backoff.restarted(finished);
                c.restarts += 1;
                self.start_container(pod, c).await?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Collects finished probes, acts on their results, and starts the probes that are due.
    async fn probe(&self, c: &mut Ctr, now: Instant, grace: i64) -> Result<()> {
        if c.state != State::Running {
            return Ok(());
        }
        let mut i = 0;
        while i < c.in_flight.len() {
            if !c.in_flight[i].1.is_finished() {
                i += 1;
                continue;
            }
            let (kind, h) = c.in_flight.remove(i);
            let Ok(outcome) = h.await else { continue };
            c.last.insert(
                kind,
                LastProbe {
                    at_ms: now_ms(),
                    outcome: outcome.clone(),
                },
            );
            let w = match kind {
                Kind::Liveness => c.liveness.as_mut(),
                Kind::Readiness => c.readiness.as_mut(),
            };
            let Some(w) = w else { continue };
            match w.observe(outcome.ok) {
                Change::None => {}
                Change::Reported(ok) => {
                    tracing::info!(instance = %self.instance, container = %c.plan.name, ?kind, ok, message = %outcome.message, "probe result changed");
                }
                Change::Restart => {
                    tracing::warn!(instance = %self.instance, container = %c.plan.name, message = %outcome.message, "liveness probe failed: killing the container, it will be restarted");
                    self.kill_for_liveness(c, grace).await?;
                    return Ok(());
                }
            }
        }
        for kind in [Kind::Liveness, Kind::Readiness] {
            if c.in_flight.iter().any(|(k, _)| *k == kind) {
                // A probe still running consumes its ticks (Go's ticker drops them).
                let w = match kind {
                    Kind::Liveness => c.liveness.as_mut(),
                    Kind::Readiness => c.readiness.as_mut(),
                };
                if let Some(w) = w {
                    let _ = w.tick(now);
                }
                continue;
            }
            let w = match kind {
                Kind::Liveness => c.liveness.as_mut(),
                Kind::Readiness => c.readiness.as_mut(),
            };
            if let Some(w) = w
                && w.tick(now)
            {
                let spec = w.spec.clone();
                c.in_flight.push((
                    kind,
                    tokio::spawn(async move { probe::http_get(&spec).await }),
                ));
            }
        }
        Ok(())
    }

    /// Kubelet's reaction to a failed liveness probe: stop the container with the grace
    /// period; it is started again by the back-off.
    async fn kill_for_liveness(&self, c: &mut Ctr, grace: i64) -> Result<()> {
        c.stop_probes();
        if let Some(id) = &c.id {
            self.cri.stop_container(id, grace).await?;
        }
        let now = Instant::now();
        let code = match &c.id {
            Some(id) => self
                .cri
                .container_status(id)
                .await
                .map(|s| s.exit_code)
                .unwrap_or(-1),
            None => -1,
        };
        c.state = State::Exited {
            code,
            reason: "liveness probe failed".into(),
            finished: now,
            restart_at: Some(c.backoff.earliest_restart(now)),
        };
        Ok(())
    }

    /// Drives the pod: init containers in order, then the containers and their probes.
    async fn drive(&self, pod: &mut Pod) -> Result<()> {
        let now = Instant::now();
        let every = if pod.ready { POLL_READY } else { POLL_STARTING };
        // Init containers, one at a time, each until it exits 0.
        while pod.init_done < pod.init.len() {
            let i = pod.init_done;
            let c = &mut pod.init[i];
            if self.start_if_due(&pod.ctx, c, now).await? && i == 0 && c.restarts == 0 {
                pod.timeline.init_started = c.started_ms;
            }
            self.poll(c, now, every).await?;
            let done = matches!(
                c.state,
                State::Exited {
                    code: 0,
                    restart_at: None,
                    ..
                }
            );
            if !done {
                return Ok(());
            }
            pod.init_done += 1;
            if pod.init_done == pod.init.len() {
                pod.timeline.init_done = Some(now_ms());
            }
        }
        // The containers.
        let grace = pod.ctx.plan.grace.as_secs() as i64;
        for c in &mut pod.main {
            if self.start_if_due(&pod.ctx, c, now).await?
                && c.restarts == 0
                && pod.timeline.main_started.is_none()
            {
                pod.timeline.main_started = c.started_ms;
            }
            self.poll(c, now, every).await?;
            self.probe(c, now, grace).await?;
        }
        // The agent's conflist, for the timeline: written after the container started.
        if pod.timeline.conflist_written.is_none()
            && let Some(started) = pod.timeline.main_started
            && let Ok(m) = std::fs::metadata(paths::conf_dir(&self.instance).join(paths::CONFLIST))
            && let Ok(mtime) = m.modified()
        {
            let at = mtime
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            if at + 5 >= started {
                pod.timeline.conflist_written = Some(at);
            }
        }
        let ready = pod.init_done == pod.init.len() && pod.main.iter().all(Ctr::ready);
        if ready != pod.ready {
            tracing::info!(instance = %self.instance, pod = %pod.ctx.plan.id.name, ready, "pod readiness changed");
            pod.ready = ready;
            if ready && pod.timeline.ready.is_none() {
                pod.timeline.ready = Some(now_ms());
                tracing::info!(instance = %self.instance, "{}", pod.timeline.summary());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_probe_delays_are_a_fraction_of_the_period() {
        let f: Vec<f64> = (0..50).map(|_| random_fraction()).collect();
        assert!(f.iter().all(|x| (0.0..1.0).contains(x)), "{f:?}");
        assert!(f.iter().any(|x| *x != f[0]), "random: {f:?}");
    }

    #[test]
    fn image_names_are_normalized_as_containerd_does() {
        assert_eq!(
            normalize_image("vpc-cni:latest"),
            "docker.io/library/vpc-cni:latest"
        );
        assert_eq!(
            normalize_image("vpc-cni"),
            "docker.io/library/vpc-cni:latest"
        );
        assert_eq!(normalize_image("me/vpc-cni:1"), "docker.io/me/vpc-cni:1");
        assert_eq!(
            normalize_image("registry.example.com:5000/vpc-cni"),
            "registry.example.com:5000/vpc-cni:latest"
        );
        assert_eq!(
            normalize_image("localhost/pause:lab"),
            "localhost/pause:lab"
        );
        assert_eq!(
            normalize_image("vpc-cni@sha256:ab"),
            "docker.io/library/vpc-cni@sha256:ab"
        );
    }

    #[test]
    fn the_timeline_breaks_the_start_into_steps() {
        let t = Timeline {
            requested: 1_000,
            kubelet_started: Some(1_010),
            containerd_ready: Some(1_900),
            image_imported: Some(4_000),
            seen: Some(4_005),
            sandbox_ready: Some(4_300),
            init_started: Some(4_500),
            init_done: Some(5_000),
            main_started: Some(5_200),
            conflist_written: Some(6_700),
            ready: Some(9_000),
        };
        let (steps, total) = t.breakdown();
        assert_eq!(total, Some(8_000));
        assert_eq!(steps.iter().map(|(_, ms)| ms).sum::<u64>(), 8_000);
        assert_eq!(steps[2], ("image import", 2_100));
        assert_eq!(steps[9], ("conflist → readiness probe passes", 2_300));
        // A redeploy has no node start-up steps.
        let r = Timeline {
            requested: 0,
            seen: Some(20),
            sandbox_ready: Some(300),
            ready: Some(1_000),
            ..Default::default()
        };
        let (steps, total) = r.breakdown();
        assert_eq!(steps.len(), 3);
        assert_eq!(total, Some(1_000));
        assert!(
            r.summary()
                .starts_with("request → Ready 1.00 s: kubelet notices the pod 0.02 s")
        );
        let pending = Timeline {
            requested: 0,
            seen: Some(20),
            ..Default::default()
        };
        assert!(pending.summary().starts_with("not Ready yet"));
    }

    #[test]
    fn host_paths_are_prepared_by_their_type() {
        let d = tempfile::tempdir().unwrap();
        let vol = |name: &str, kind| spec::HostVolume {
            name: name.into(),
            manifest_path: format!("/{name}"),
            host: d.path().join(name).join("x"),
            kind,
        };
        prepare_host_path(&vol("dir", HostPathType::DirectoryOrCreate)).unwrap();
        assert!(d.path().join("dir/x").is_dir());
        assert!(
            prepare_host_path(&vol("file", HostPathType::FileOrCreate)).is_err(),
            "no parent directory is made for a file"
        );
        std::fs::create_dir(d.path().join("file")).unwrap();
        prepare_host_path(&vol("file", HostPathType::FileOrCreate)).unwrap();
        assert!(d.path().join("file/x").is_file());
        // FileOrCreate leaves an existing file as it is.
        std::fs::write(d.path().join("file/x"), "held").unwrap();
        prepare_host_path(&vol("file", HostPathType::FileOrCreate)).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join("file/x")).unwrap(),
            "held"
        );
        assert!(prepare_host_path(&vol("missing", HostPathType::Directory)).is_err());
        assert!(prepare_host_path(&vol("file", HostPathType::Directory)).is_err());
        assert!(prepare_host_path(&vol("dir", HostPathType::File)).is_err());
        assert!(prepare_host_path(&vol("nope", HostPathType::Socket)).is_err());
        prepare_host_path(&vol("nope", HostPathType::Unset)).unwrap();
    }
}
