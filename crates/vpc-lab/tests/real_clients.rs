//! vpc-cni driven by clients we did not write (issue 4): containerd 1.6 with its CRI plugin,
//! started inside a lab instance and configured with that instance's CNI directories, and
//! libcni's cnitool. Needs root, the built binaries and the clients that
//! `scripts/setup-clients.sh` installs (containerd, `.cache/bin/cnitool`,
//! `.cache/pause-oci.tar`): ignored without root, failing with what is missing otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const INSTANCE: &str = "instance1";
const CTRD_DIR: &str = "/run/vpc-lab/instance1/containerd";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn conformance() -> PathBuf {
    bin_dir().join("vpc-cni-conformance")
}

/// Runs `vpc-cni-conformance args…`; returns (success, stdout as JSON).
fn conf(args: &[&str]) -> (bool, Value) {
    let out = Command::new(conformance())
        .args(args)
        .output()
        .expect("running vpc-cni-conformance");
    eprintln!(
        "$ vpc-cni-conformance {} -> {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), v)
}

/// Stops containerd (its sandboxes' DELs run) before the lab goes down.
struct Containerd;

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = Command::new(conformance())
            .args(["containerd", "stop", "--dir", CTRD_DIR])
            .status();
    }
}

fn missing_clients() -> Option<String> {
    let needed = [
        conformance(),
        repo().join(".cache/bin/cnitool"),
        repo().join(".cache/pause-oci.tar"),
        PathBuf::from("/usr/bin/containerd"),
        PathBuf::from("/usr/lib/cni/loopback"),
    ];
    needed.iter().find(|p| !p.exists()).map(|p| {
        format!(
            "{} is missing (run scripts/setup-clients.sh and cargo build --workspace --bins)",
            p.display()
        )
    })
}

#[test]
#[ignore = "root: brings up the lab (network namespaces)"]
fn containerd_and_cnitool_drive_vpc_cni() {
    require_lab();
    if let Some(why) = missing_clients() {
        panic!("{why}");
    }
    let _serial = serial();
    let _down = Down;
    // A node with room for the burst, a warm pool that already holds it, no cooldown.
    lab_ok(&[
        "up",
        "--provisioning=instance1",
        "--fresh-nodes",
        "--instance-type",
        "m5.4xlarge",
        "--agent-env",
        "WARM_IP_TARGET=56",
        "--agent-env",
        "IP_COOLDOWN_PERIOD=0",
        "--agent-env",
        "VPC_CNI_MIN_ENI_AGE=2",
    ]);
    wait_for(
        Duration::from_secs(60),
        "instance1's warm pool to hold 56 free addresses",
        || agent_available(INSTANCE).filter(|n| *n >= 56),
        || format!("{:?}", agent_state(INSTANCE)),
    );

    let bin = format!("/run/vpc-lab/{INSTANCE}/opt/cni/bin:/usr/lib/cni");
    let confdir = format!("/run/vpc-lab/{INSTANCE}/etc/cni/net.d");
    let _ctrd = Containerd;
    let (ok, _) = conf(&[
        "containerd",
        "start",
        "--netns",
        "vpclab-instance1",
        "--dir",
        CTRD_DIR,
        "--cni-bin",
        &bin,
        "--cni-conf",
        &confdir,
        "--require-network-ready",
    ]);
    assert!(
        ok,
        "containerd starts in the instance and sees the network ready"
    );

    // One sandbox: a VPC address of instance1, reachable from instance2; then released.
    let (ok, sb) = conf(&[
        "cri",
        "--dir",
        CTRD_DIR,
        "run-sandbox",
        "--name",
        "web",
        "--namespace",
        "default",
    ]);
    assert!(ok, "RunPodSandbox");
    let ip: std::net::Ipv4Addr = sb["ip"].as_str().expect("pod IP").parse().unwrap();
    let ec2 = Ec2::new();
    let id = instance_id(INSTANCE);
    let held = ec2.secondary_ips(&id);
    assert!(
        held.contains(&ip),
        "{ip} is a secondary IP of instance1 in EC2: {held:?}"
    );
    assert!(
        unreachable("instance2", &[ip]).is_empty(),
        "instance2 reaches the pod at {ip}"
    );
    let before = agent_state(INSTANCE).unwrap()["stats"]["assigned"]
        .as_u64()
        .unwrap();
    let (ok, _) = conf(&[
        "cri",
        "--dir",
        CTRD_DIR,
        "stop-remove",
        "--name",
        "web",
        "--namespace",
        "default",
    ]);
    assert!(ok, "StopPodSandbox + RemovePodSandbox");
    let after = agent_state(INSTANCE).unwrap()["stats"]["assigned"]
        .as_u64()
        .unwrap();
    assert_eq!(after + 1, before, "the address was released");

    // 50 sandboxes at once: all come up with distinct VPC addresses and all go away.
    let (ok, burst) = conf(&["cri", "--dir", CTRD_DIR, "burst", "--count", "50"]);
    assert!(ok, "burst of 50: {burst}");
    assert_eq!(burst["ready"], 50);
    assert_eq!(
        agent_state(INSTANCE).unwrap()["stats"]["assigned"],
        0,
        "all released"
    );

    // cnitool (Debian's libcni 1.1) against the installed conflist, then the conformance
    // matrix's libcni column: ADD, CHECK, DEL, DEL from a conflist of each version libcni
    // speaks (0.3.0–1.0.0). libcni itself refuses CHECK below 0.4.0. 1.1.0 (and STATUS, GC) is
    // runtime_edges.rs, our harness.
    let installed: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{confdir}/10-vpc-cni.conflist")).unwrap(),
    )
    .unwrap();
    let mut runs = vec![(
        "installed".to_string(),
        confdir.clone(),
        installed["cniVersion"].clone(),
    )];
    for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0"] {
        let dir = format!("/run/vpc-lab/{INSTANCE}/cnitool-{v}");
        std::fs::create_dir_all(&dir).unwrap();
        let mut list = installed.clone();
        list["cniVersion"] = v.into();
        list.as_object_mut().unwrap().remove("cniVersions");
        std::fs::write(format!("{dir}/10-vpc-cni.conflist"), list.to_string()).unwrap();
        runs.push((v.to_string(), dir, v.into()));
    }
    let assigned = || agent_state(INSTANCE).unwrap()["stats"]["assigned"].clone();
    let before = assigned();
    for (i, (label, dir, version)) in runs.iter().enumerate() {
        let pod_ns = format!("vpclab-pod-cniv{i}");
        assert!(
            Command::new("ip")
                .args(["netns", "add", &pod_ns])
                .status()
                .unwrap()
                .success()
        );
        let args = format!("K8S_POD_NAMESPACE=default;K8S_POD_NAME=cniv{i}");
        let run = |verb: &str| {
            conf(&[
                "cnitool",
                verb,
                "--netns",
                "vpclab-instance1",
                "--net",
                "vpc-cni",
                "--pod-netns",
                &pod_ns,
                "--conf-dir",
                dir,
                "--cni-bin",
                &bin,
                "--cni-args",
                &args,
            ])
        };
        let (ok, added) = run("add");
        assert!(ok, "cnitool add, conflist {label}");
        assert_eq!(&added["result"]["cniVersion"], version, "{added}");
        let ip: std::net::Ipv4Addr = added["ips"][0]
            .as_str()
            .expect("cnitool ADD ip")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            unreachable("instance2", &[ip]).is_empty(),
            "instance2 reaches the cnitool pod ({label})"
        );
        let pre_check = version == "0.3.0" || version == "0.3.1";
        let check = run("check").0;
        assert_eq!(check, !pre_check, "cnitool check, conflist {label}");
        assert!(run("del").0, "cnitool del, conflist {label}");
        assert!(run("del").0, "cnitool del again, conflist {label}");
        eprintln!(
            "matrix: cnitool, conflist {label} ({version}): ADD ok ({ip}), CHECK {}, DEL ok, DEL again ok",
            if check {
                "ok"
            } else {
                "refused by libcni (< 0.4.0)"
            }
        );
        let _ = Command::new("ip").args(["netns", "del", &pod_ns]).status();
    }
    assert_eq!(assigned(), before, "every cnitool pod's address released");
    wait_reaped(INSTANCE);
}
