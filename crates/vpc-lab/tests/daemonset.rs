//! The agent deployed as the DaemonSet's pod (`deploy/base/daemonset.yaml`) by the lab's
//! kubelet through containerd's CRI, from the node image (issue 11): `up --deploy daemonset` →
//! every node's pod Ready → the seed's pods → the connectivity matrix → the pod of instance1
//! deleted (`kubectl delete pod`): the node's pods keep reaching instance2 (measured with pings
//! running throughout), new pods wait → the pod deployed again → Ready with the same
//! allocations → the matrix again → the agent frozen (SIGSTOP): its liveness probe fails, the
//! kubelet kills it and starts it again (one restart), Ready again → `down` leaves nothing.
//! Prints each node's DaemonSet start → Ready time and what it is spent on.
//!
//! Needs root, the built binaries, containerd/runc/ctr and `.cache/pause-oci.tar`
//! (`scripts/setup-clients.sh`), and the node image `target/image/vpc-cni.oci.tar`: built here
//! from the debug binaries with `scripts/image/build.sh --profile debug` when it is missing or
//! older than them (buildah and mmdebstrap, also from `setup-clients.sh`).

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use lab::kubelet::NodeStatus;
use serde_json::Value;

const NODES: [&str; 2] = ["instance1", "instance2"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Builds the node image (`scripts/image/build.sh --profile debug`: the debug binaries, built
/// if they are not, and the Containerfile) unless the archive is newer than the binaries.
fn ensure_image() {
    let archive = repo().join(lab::kubelet::IMAGE_ARCHIVE);
    let newest_bin = ["vpc-cni-agent", "vpc-cni"]
        .iter()
        .filter_map(|b| mtime(&bin_dir().join(b)))
        .max();
    if let (Some(a), Some(b)) = (mtime(&archive), newest_bin)
        && a > b
    {
        eprintln!(
            "{} is newer than the binaries: used as it is",
            archive.display()
        );
        return;
    }
    let t = Instant::now();
    let ok = Command::new("bash")
        .arg(repo().join("scripts/image/build.sh"))
        .args(["--profile", "debug"])
        .current_dir(repo())
        .status()
        .expect("running scripts/image/build.sh")
        .success();
    assert!(ok, "scripts/image/build.sh --profile debug failed");
    eprintln!("node image built in {:?}", t.elapsed());
}

fn missing_tools() -> Option<String> {
    let needed = [
        repo().join(".cache/pause-oci.tar"),
        PathBuf::from("/usr/bin/containerd"),
        PathBuf::from("/usr/bin/ctr"),
        PathBuf::from("/usr/sbin/runc"),
    ];
    needed.iter().find(|p| !p.exists()).map(|p| {
        format!(
            "{} is missing (run scripts/setup-clients.sh as root)",
            p.display()
        )
    })
}

fn kubelet_status() -> Vec<NodeStatus> {
    let out = lab_quiet(&["kubelet", "status", "--json"]);
    assert!(out.status.success(), "vpc-lab kubelet status --json failed");
    serde_json::from_slice(&out.stdout).expect("kubelet status is JSON")
}

fn node_status(instance: &str) -> NodeStatus {
    kubelet_status()
        .into_iter()
        .find(|s| s.instance == instance)
        .unwrap_or_else(|| panic!("no kubelet status for {instance}"))
}

/// The pod of `instance` is Ready: its init container exited 0, the agent's container runs,
/// its readiness probe passed, nothing restarted. Prints the start's timeline.
fn assert_ready(instance: &str, what: &str) -> NodeStatus {
    let s = node_status(instance);
    let pod = s
        .pod
        .as_ref()
        .unwrap_or_else(|| panic!("{instance} has no pod: {s:?}"));
    assert!(pod.ready, "{instance}'s pod is not Ready: {s:?}");
    let init = pod
        .containers
        .iter()
        .find(|c| c.init)
        .expect("an init container");
    assert_eq!(
        (init.state.as_str(), init.exit_code),
        ("Terminated", Some(0))
    );
    let main = pod
        .containers
        .iter()
        .find(|c| !c.init)
        .expect("the agent's container");
    assert_eq!(main.state, "Running");
    assert!(main.ready);
    for c in &pod.containers {
        assert_eq!(c.restarts, 0, "{instance}: {} restarted: {s:?}", c.name);
    }
    let r = main.readiness.as_ref().expect("a readiness probe");
    assert!(r.reported && r.last.as_ref().is_some_and(|l| l.outcome.ok));
    let (steps, total) = pod.timeline.breakdown();
    eprintln!(
        "TIMING {what} {instance}: DaemonSet pod request → Ready {} ms",
        total.expect("Ready has a time")
    );
    for (step, ms) in steps {
        eprintln!("TIMING {what} {instance}:   {step:<36} {ms:>6} ms");
    }
    s
}

/// The agent's allocations (`/v1/state` pods), without their timestamps, sorted.
fn allocations(instance: &str) -> Vec<Value> {
    let st = agent_state(instance).unwrap_or_else(|| panic!("the agent of {instance} answers"));
    let mut v: Vec<Value> = st["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .map(|p| {
            let mut p = p.clone();
            p.as_object_mut().expect("a pod object").remove("sinceMs");
            p
        })
        .collect();
    v.sort_by_key(|p| p["containerID"].as_str().unwrap_or("").to_string());
    v
}

/// `ping -i 0.1` from namespace `ns` to `ip`, running until [`stop_ping`].
fn start_ping(ns: &str, ip: Ipv4Addr) -> Child {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["ping", "-n", "-q", "-i", "0.1", &ip.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting ping")
}

/// Stops a ping started by [`start_ping`] (SIGINT: it prints its statistics); returns (sent,
/// received).
fn stop_ping(c: Child) -> (u64, u64) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT to ping");
    let out = c.wait_with_output().expect("ping's output");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping statistics in {text:?}"));
    let num = |what: &str| -> u64 {
        line.split(',')
            .find(|p| p.contains(what))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {what:?} in {line:?}"))
    };
    (num("transmitted"), num("received"))
}

/// Stops the kubelets and their containerd before [`Down`] (declared before this guard, so
/// dropped after it) copies a failed run's `/run/vpc-lab`: containerd's root holds the image
/// and the containers' file systems (hundreds of MB). Its log is kept, in the kubelet's dir.
struct Kubelets;

impl Drop for Kubelets {
    fn drop(&mut self) {
        for n in NODES {
            let _ = std::fs::copy(
                lab::paths::containerd_dir(n).join("containerd.log"),
                lab::paths::kubelet_dir(n).join("containerd.log"),
            );
            for e in lab::kubelet::stop(n) {
                eprintln!("stopping the kubelet of {n}: {e}");
            }
        }
    }
}

/// The pid of the agent's process in `instance`'s pod (`/app/vpc-cni-agent`, in the instance's
/// network namespace).
fn agent_process(instance: &str) -> i32 {
    use std::os::unix::fs::MetadataExt;
    let want = std::fs::metadata(format!("/run/netns/vpclab-{instance}"))
        .unwrap()
        .ino();
    let found: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c == b"/app/vpc-cni-agent\0")
                && std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == want)
        })
        .collect();
    assert_eq!(found.len(), 1, "one agent process in {instance}: {found:?}");
    found[0]
}

#[test]
#[ignore = "root: brings up the lab (network namespaces) and containerd"]
fn the_daemonset_runs_through_the_labs_kubelet() {
    require_lab();
    if let Some(why) = missing_tools() {
        panic!("{why}");
    }
    let _serial = serial();
    ensure_image();
    let _down = Down;
    let _kubelets = Kubelets;

    // ---- up: every node's pod Ready ------------------------------------------------------
    // IP_COOLDOWN_PERIOD=0 (into the agent's container, over the manifest's 30): a freed
    // address serves the next pod at once.
    let t = Instant::now();
    lab_ok(&[
        "up",
        "--deploy",
        "daemonset",
        "--agent-env",
        "IP_COOLDOWN_PERIOD=0",
    ]);
    eprintln!(
        "TIMING up --deploy daemonset (lab and both pods Ready): {:?}",
        t.elapsed()
    );
    let mut pids = lab_pids();
    for n in NODES {
        let s = assert_ready(n, "up");
        pids.push(s.kubelet_pid as i32);
        pids.push(s.containerd_pid.expect("containerd's pid"));
        assert!(
            !lab::paths::agent_pid(n).exists(),
            "no agent process of the lab's own on {n}"
        );
        // The agent wrote its conflist with the socket's path on the lab's host, which the
        // plugin (run on the host) connects to.
        let conf: Value = serde_json::from_slice(
            &std::fs::read(lab::paths::conf_dir(n).join(lab::paths::CONFLIST)).unwrap(),
        )
        .unwrap();
        assert_eq!(
            conf["plugins"][0]["agentSocket"],
            lab::paths::agent_socket(n).display().to_string()
        );
    }
    // The lab's settings reach the agent's container over the manifest's env.
    let env = sh(
        "instance1",
        "curl -sf --max-time 2 http://127.0.0.1:61679/v1/ipamd-env-settings",
    );
    let env: Value = serde_json::from_slice(&env.stdout).expect("ipamd-env-settings is JSON");
    assert_eq!(env["IP_COOLDOWN_PERIOD"], "0", "{env}");
    assert_eq!(
        env["DISABLE_NETWORK_RESOURCE_PROVISIONING"], "true",
        "{env}"
    );
    let text = lab_ok(&["kubelet", "status"]);
    assert!(
        text.contains("Ready") && text.contains("readiness ready"),
        "{text}"
    );

    // ---- pods and the matrix -----------------------------------------------------------
    let pods = [
        ("instance1", "default/pod-a"),
        ("instance1", "default/pod-b"),
        ("instance1", "default/pod-c"),
        ("instance2", "default/pod-d"),
    ];
    let mut ips = Vec::new();
    for (inst, pod) in pods {
        match pod_add_once(inst, pod) {
            Add::Ok(ip) => ips.push((inst, pod, ip)),
            Add::Failed(code, msg) => panic!("pod add {inst} {pod}: code {code}: {msg}"),
        }
    }
    lab_ok(&["matrix"]);
    let on_eni1 = lab::matrix::POD_ON_SECONDARY_ENI;
    let (_, pod_x, _) = ips
        .iter()
        .find(|(_, _, ip)| *ip == on_eni1)
        .expect("a pod on instance1's secondary ENI");
    let pod_x_ns = {
        let (ns, name) = pod_x.split_once('/').unwrap();
        lab_net::ns::pod_ns("instance1", ns, name)
    };
    let pod_d = ips[3].2;
    let before = allocations("instance1");
    assert_eq!(before.len(), 3, "three pods on instance1: {before:?}");

    // ---- delete the pod of instance1: the node keeps working --------------------------
    let out_ping = start_ping(&pod_x_ns, pod_d);
    let in_ping = start_ping("vpclab-instance2", on_eni1);
    std::thread::sleep(Duration::from_secs(2));
    let t = Instant::now();
    lab_ok(&["kubelet", "delete", "instance1"]);
    eprintln!("TIMING kubelet delete instance1: {:?}", t.elapsed());
    assert!(node_status("instance1").pod.is_none());
    assert!(
        agent_state("instance1").is_none(),
        "the agent of instance1 is gone with its pod"
    );
    // Running pods keep their network; a new pod waits for the agent (its ADD fails).
    assert!(
        unreachable(&pod_x_ns, &[pod_d, Ipv4Addr::new(172, 31, 3, 123)]).is_empty(),
        "pod {pod_x} reaches instance2 and its pod while the agent is away"
    );
    assert!(unreachable("instance2", &[on_eni1]).is_empty());
    match pod_add_once("instance1", "default/pod-new") {
        Add::Failed(code, msg) => {
            assert_eq!(code, 11, "try again later: {msg}");
            assert!(msg.contains("cannot connect to the vpc-cni agent"), "{msg}");
        }
        Add::Ok(ip) => panic!("ADD succeeded without the agent ({ip})"),
    }
    std::thread::sleep(Duration::from_secs(3));

    // ---- deploy it again: Ready with the same allocations -------------------------------
    let t = Instant::now();
    lab_ok(&["kubelet", "deploy", "instance1"]);
    eprintln!(
        "TIMING kubelet deploy instance1 (to Ready): {:?}",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    let (sent_out, got_out) = stop_ping(out_ping);
    let (sent_in, got_in) = stop_ping(in_ping);
    eprintln!(
        "PING during delete → redeploy: {pod_x} → pod-d {got_out}/{sent_out} answered, instance2 → {pod_x} {got_in}/{sent_in} answered"
    );
    let s = assert_ready("instance1", "redeploy");
    pids.push(s.kubelet_pid as i32);
    assert_eq!(
        allocations("instance1"),
        before,
        "the redeployed agent restored the same allocations from its checkpoint"
    );
    assert_eq!(
        (sent_out, sent_in),
        (got_out, got_in),
        "no packet lost while the agent's pod was deleted and deployed again"
    );
    assert!(sent_out > 50, "the pings ran throughout ({sent_out} sent)");
    lab_ok(&["matrix"]);
    // New pods get addresses again: pod-b's, freed (the seed's instance1 has three).
    let (_, pod_b, ip_b) = ips[1];
    lab_ok(&["pod", "del", "instance1", pod_b]);
    let (ip_new, _) = pod_add_retry("instance1", "default/pod-new", Duration::from_secs(10));
    assert_eq!(ip_new, ip_b);
    assert!(unreachable("instance2", &[ip_new]).is_empty());
    let before = allocations("instance1");

    // ---- liveness: a frozen agent is killed and started again ----------------------------
    let agent = agent_process("instance1");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("SIGSTOP to the agent");
    let t = Instant::now();
    let s = wait_for(
        Duration::from_secs(240),
        "the kubelet to restart instance1's frozen agent and see it Ready",
        || {
            let s = node_status("instance1");
            let p = s.pod.as_ref()?;
            let main = p.containers.iter().find(|c| !c.init)?;
            (main.restarts == 1 && p.ready).then_some(s)
        },
        || lab::kubelet::render(&node_status("instance1")),
    );
    eprintln!(
        "TIMING liveness: the agent frozen (SIGSTOP) → killed, restarted and Ready again in {:?}",
        t.elapsed()
    );
    let log = std::fs::read_to_string(lab::kubelet::log_file("instance1")).unwrap();
    assert!(log.contains("liveness probe failed"), "{log}");
    assert!(!common::alive(agent), "the frozen agent was killed");
    assert_ne!(agent_process("instance1"), agent);
    let init = s
        .pod
        .as_ref()
        .unwrap()
        .containers
        .iter()
        .find(|c| c.init)
        .unwrap();
    assert_eq!(init.restarts, 0, "init containers do not run again");
    assert_eq!(
        allocations("instance1"),
        before,
        "the restarted agent kept every allocation"
    );

    // ---- down ----------------------------------------------------------------------------
    for (inst, pod) in pods.iter().chain([&("instance1", "default/pod-new")]) {
        if *pod != pod_b {
            lab_ok(&["pod", "del", inst, pod]);
        }
    }
    assert_eq!(allocations("instance1").len(), 0);
    down_and_assert_clean(&pids);
    // containerd's shims and the containers' processes went with it.
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(lab::paths::RUN_DIR))
        .collect();
    assert!(left.is_empty(), "processes of the lab left: {left:?}");
}
