//! Helpers shared by the lab tests: they drive the built `vpc-lab` binary as root.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const LAB: &str = env!("CARGO_BIN_EXE_vpc-lab");

/// The directory of the built binaries (vpc-lab, vpc-cni-agent, vpc-cni).
pub fn bin_dir() -> PathBuf {
    Path::new(LAB)
        .parent()
        .expect("binary has a directory")
        .to_path_buf()
}

/// Runs `vpc-lab args…`, echoing its output into the test log.
pub fn lab(args: &[&str]) -> Output {
    let out = Command::new(LAB)
        .args(args)
        .output()
        .expect("running vpc-lab");
    eprintln!(
        "$ vpc-lab {} -> {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `vpc-lab args…` and panics unless it succeeds; returns stdout.
pub fn lab_ok(args: &[&str]) -> String {
    let out = lab(args);
    assert!(out.status.success(), "vpc-lab {} failed", args.join(" "));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `vpc-lab exec target -- bash -c script`.
pub fn sh(target: &str, script: &str) -> Output {
    lab(&["exec", target, "--", "bash", "-c", script])
}

/// Always runs `vpc-lab down` when dropped (also when the test panics).
pub struct Down;

impl Drop for Down {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Keep the lab's logs for diagnosis before `down` removes them.
            let keep = std::env::temp_dir().join("vpc-lab-failed");
            let _ = std::fs::remove_dir_all(&keep);
            let _ = Command::new("cp")
                .args(["-r", lab::paths::RUN_DIR])
                .arg(&keep)
                .status();
            let _ = Command::new(LAB)
                .arg("status")
                .stdout(
                    std::fs::File::create(keep.join("status.txt"))
                        .map(std::process::Stdio::from)
                        .unwrap_or_else(|_| std::process::Stdio::null()),
                )
                .status();
            eprintln!("the lab's files and logs are kept in {}", keep.display());
        }
        let _ = Command::new(LAB).arg("down").status();
    }
}

/// Pids recorded in the lab's pid files (read before `down` removes them).
pub fn lab_pids() -> Vec<i32> {
    let mut files = vec![
        lab_aws::moto::pid_file(&lab::paths::run_dir()),
        lab::paths::daemon_pid(),
    ];
    if let Ok(rd) = std::fs::read_dir(lab::paths::RUN_DIR) {
        for e in rd.flatten() {
            files.push(e.path().join("agent.pid"));
        }
    }
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// Whether a pid is alive (a zombie is not: it holds no resources and waits for PID 1).
pub fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next())
        .unwrap_or("");
    state != "Z" && state != "X"
}

pub fn lab_namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("vpclab-"))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `vpc-lab down` and asserts that nothing of the lab is left.
pub fn down_and_assert_clean(pids: &[i32]) {
    lab_ok(&["down"]);
    assert_root_untouched();
    assert!(
        lab_namespaces().is_empty(),
        "namespaces left: {:?}",
        lab_namespaces()
    );
    for p in pids {
        assert!(!alive(*p), "process {p} started by the lab is still alive");
    }
    assert!(!lab::paths::run_dir().exists(), "/run/vpc-lab left behind");
    // Idempotent.
    lab_ok(&["down"]);
}

/// The lab tests share /run/vpc-lab and the namespace names: one at a time, in this process
/// (a mutex) and across processes (an exclusive lock on `$TMPDIR/vpc-lab-tests.lock`, so two
/// test binaries never tear down each other's lab).
pub struct Serial {
    _guard: std::sync::MutexGuard<'static, ()>,
    _file: nix::fcntl::Flock<std::fs::File>,
}

pub fn serial() -> Serial {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let path = std::env::temp_dir().join("vpc-lab-tests.lock");
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map(|f| Serial {
            _guard: guard,
            _file: f,
        })
        .unwrap_or_else(|(_, e)| panic!("locking {}: {e}", path.display()))
}

/// The root network namespace carries nothing of the lab: no lab interface, no VPC (custom
/// networking's 100.64.0.0/16 included) or TEST-NET address, route or rule (the only
/// root-namespace listeners are moto and the lab's Kubernetes API, on loopback).
pub fn assert_root_untouched() {
    let run = |args: &[&str]| {
        let o = Command::new("ip").args(args).output().expect("ip");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let links = run(&["-o", "link", "show"]);
    for l in links.lines() {
        let name = l.split(':').nth(1).unwrap_or("").trim();
        let name = name.split('@').next().unwrap_or("");
        let lab_like = name.starts_with("br-")
            || name == "up0"
            || name == "vhand"
            || (name.len() == 4
                && (name.starts_with('i') || name.starts_with("vh"))
                && name.as_bytes()[name.len() - 2] == b'e');
        assert!(
            !lab_like,
            "lab-like interface {name:?} in the root namespace"
        );
    }
    for args in [
        &["-o", "addr", "show"][..],
        &["route", "show", "table", "all"][..],
        &["rule", "show"][..],
    ] {
        let out = run(args);
        // The VPC, the internet, and custom networking's CIDR and pod subnets (exact prefixes:
        // 100.64.0.0/10 is shared address space a host may use for its own ends).
        for bad in [
            "172.31.",
            "203.0.113.",
            "100.64.0.0/16",
            "100.64.0.0/19",
            "100.64.32.0/19",
            "100.64.0.1/19",
            "100.64.32.1/19",
        ] {
            assert!(
                !out.contains(bad),
                "`ip {}` in the root namespace mentions {bad}:\n{out}",
                args.join(" ")
            );
        }
    }
}

/// The lab tests' precondition: root (they are `#[ignore = "root: …"]`, so a run without root
/// lists them as ignored) and the binaries built. Panics with what is missing.
#[track_caller]
pub fn require_lab() {
    testkit::require_root();
    for b in ["vpc-cni-agent", "vpc-cni"] {
        assert!(
            bin_dir().join(b).is_file(),
            "{} is not built (run `cargo build --workspace --bins`)",
            bin_dir().join(b).display()
        );
    }
}

/// Runs `vpc-lab args…` quietly (output returned, not echoed).
pub fn lab_quiet(args: &[&str]) -> Output {
    Command::new(LAB)
        .args(args)
        .output()
        .expect("running vpc-lab")
}

/// The result of one `vpc-lab pod add`.
#[derive(Debug)]
pub enum Add {
    Ok(std::net::Ipv4Addr),
    /// The plugin's CNI error code (the exit code) and what it said.
    Failed(i32, String),
}

/// One `vpc-lab pod add`; returns the pod's IPv4 address or the exit code and message.
pub fn pod_add_once(instance: &str, pod: &str) -> Add {
    let out = lab_quiet(&["pod", "add", instance, pod]);
    if out.status.success() {
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ADD result of {pod} is not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        let a = v["ips"][0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("ADD result of {pod} has no address: {v}"));
        let ip = a
            .split('/')
            .next()
            .unwrap()
            .parse()
            .expect("an IPv4 address");
        return Add::Ok(ip);
    }
    Add::Failed(
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// ADD like a runtime: retried (short sleep) while the plugin answers code 11 ("try again",
/// the pool is refilling) or the agent is restarting, up to `timeout`. Returns the address
/// and how many attempts failed.
pub fn pod_add_retry(
    instance: &str,
    pod: &str,
    timeout: std::time::Duration,
) -> (std::net::Ipv4Addr, u32) {
    let t = std::time::Instant::now();
    let mut failures = 0;
    loop {
        match pod_add_once(instance, pod) {
            Add::Ok(ip) => return (ip, failures),
            Add::Failed(code, msg) => {
                failures += 1;
                assert!(
                    t.elapsed() < timeout,
                    "ADD {pod} on {instance} still failing after {:?} ({failures} attempts); last: code {code}: {msg}",
                    t.elapsed()
                );
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    }
}

/// DEL, retried while it fails (e.g. the agent is restarting), up to `timeout`.
pub fn pod_del_retry(instance: &str, pod: &str, timeout: std::time::Duration) {
    let t = std::time::Instant::now();
    loop {
        let out = lab_quiet(&["pod", "del", instance, pod]);
        if out.status.success() {
            return;
        }
        assert!(
            t.elapsed() < timeout,
            "DEL {pod} on {instance} still failing after {:?}: {}",
            t.elapsed(),
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// The lab's world.json.
pub fn world() -> serde_json::Value {
    let s = std::fs::read_to_string(lab::paths::world_file()).expect("world.json (is the lab up?)");
    serde_json::from_str(&s).expect("world.json is JSON")
}

pub fn instance_id(name: &str) -> String {
    let w = world();
    w["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no instance {name} in world.json"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// An EC2 client straight to the lab's moto (the address is in /run/vpc-lab/state.json).
pub struct Ec2 {
    pub rt: tokio::runtime::Runtime,
    pub ec2: cloud::Ec2,
}

impl Ec2 {
    pub fn new() -> Ec2 {
        let state = lab::store::LabState::load().expect("the lab's state (is the lab up?)");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        Ec2 {
            rt,
            ec2: state.ec2(),
        }
    }

    /// ENIs attached to `instance_id`, by device index.
    pub fn attached(&self, instance_id: &str) -> Vec<cloud::NetworkInterface> {
        let mut v = self
            .rt
            .block_on(
                self.ec2
                    .describe_network_interfaces(&[], &[cloud::Filter::attached_to(instance_id)]),
            )
            .expect("DescribeNetworkInterfaces");
        v.sort_by_key(|e| e.attachment.as_ref().map(|a| a.device_index));
        v
    }

    /// (ENIs, secondary IPs) of `instance_id` in EC2.
    pub fn counts(&self, instance_id: &str) -> (usize, usize) {
        let v = self.attached(instance_id);
        (v.len(), v.iter().map(|e| e.secondary_ips.len()).sum())
    }

    /// Every secondary IP of `instance_id`'s ENIs.
    pub fn secondary_ips(
        &self,
        instance_id: &str,
    ) -> std::collections::BTreeSet<std::net::Ipv4Addr> {
        self.attached(instance_id)
            .iter()
            .flat_map(|e| e.secondary_ips.iter().copied())
            .collect()
    }

    /// ENIs tagged as the agent tags them for `instance_id`.
    pub fn tagged(&self, instance_id: &str) -> Vec<cloud::NetworkInterface> {
        self.rt
            .block_on(self.ec2.describe_network_interfaces(
                &[],
                &[cloud::Filter::tag(
                    "node.k8s.amazonaws.com/instance_id",
                    instance_id,
                )],
            ))
            .expect("DescribeNetworkInterfaces by tag")
    }

    pub fn eni_exists(&self, eni_id: &str) -> bool {
        match self
            .rt
            .block_on(self.ec2.describe_network_interface(eni_id))
        {
            Ok(_) => true,
            Err(e) if e.is_not_found() => false,
            Err(e) => panic!("DescribeNetworkInterfaces {eni_id}: {e}"),
        }
    }
}

/// Polls `f` every 250 ms until it returns `Some`, or panics after `timeout` with `what` and the
/// last value `describe` gives.
/// The pod veths that DEL retired in `target` (`ip -o link` lines) and the agent has not
/// deleted yet.
pub fn retired_links(target: &str) -> String {
    let out = sh(
        target,
        &format!("ip -o link show group {}", dataplane::RETIRED_LINK_GROUP),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until the agent of `target` has deleted every veth that DEL retired (it reaps them
/// every second).
pub fn wait_reaped(target: &str) {
    wait_for(
        std::time::Duration::from_secs(10),
        &format!("the agent of {target} to delete the retired pod veths"),
        || retired_links(target).trim().is_empty().then_some(()),
        || retired_links(target),
    );
}

pub fn wait_for<T>(
    timeout: std::time::Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
    mut describe: impl FnMut() -> String,
) -> T {
    let t = std::time::Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; last: {}",
            describe()
        );
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Pings each address once from `from`; returns the addresses that did not answer.
pub fn unreachable(from: &str, ips: &[std::net::Ipv4Addr]) -> Vec<std::net::Ipv4Addr> {
    let list = ips
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let out = lab_quiet(&[
        "exec",
        from,
        "--",
        "bash",
        "-c",
        &format!(
            "for ip in {list}; do ping -c1 -W2 -q $ip >/dev/null 2>&1 || ping -c1 -W2 -q $ip >/dev/null 2>&1 || echo $ip; done"
        ),
    ]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// EC2 calls the lab's proxy saw for `instance`: action → calls (and the full JSON).
pub fn ec2_calls(instance: &str) -> std::collections::BTreeMap<String, serde_json::Value> {
    let out = lab_quiet(&["ec2-stats"]);
    assert!(out.status.success(), "vpc-lab ec2-stats failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ec2-stats is JSON");
    v[instance]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

/// Sum of one counter over every action.
pub fn ec2_total(instance: &str, field: &str) -> u64 {
    ec2_calls(instance)
        .values()
        .map(|c| c[field].as_u64().unwrap_or(0))
        .sum()
}

/// The agent's introspection state (`stats.available` etc.), or `None` when the agent does
/// not answer.
pub fn agent_state(instance: &str) -> Option<serde_json::Value> {
    lab::control::agent_state(instance)
}

pub fn agent_available(instance: &str) -> Option<usize> {
    agent_state(instance)?["stats"]["available"]
        .as_u64()
        .map(|n| n as usize)
}

/// An EC2 client through a lab EC2 proxy of the test's own (on `rt`, a loopback port), for the
/// lab's `state` and `world`: what the proxy adds to moto (prefixes, ENIs' own security groups,
/// EC2's rules), as the agents see it. The proxy reads the lab's knobs file, as the daemon's does.
pub fn proxy_ec2(
    rt: &tokio::runtime::Runtime,
    state: &lab::store::LabState,
    world: &lab_aws::world::World,
) -> cloud::Ec2 {
    // The proxy only reads the world (it does not change here).
    let (_, rx) = tokio::sync::watch::channel(world.clone());
    let proxy = lab_aws::ec2proxy::Proxy::new(
        state.moto,
        &state.region,
        rx,
        lab::paths::knobs_file(),
        None,
    );
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("a loopback port for the proxy");
    let addr = listener.local_addr().expect("its address");
    rt.spawn(proxy.serve(listener, "test".into()));
    cloud::Ec2::for_endpoint(&format!("http://{addr}"), &state.region)
}
