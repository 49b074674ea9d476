//! The seed's experiment end to end on the lab with the real agent and plugin: `vpc-lab up`,
//! pods on every address of instance1 and one on instance2, `pod check`, the connectivity
//! matrix with its negative controls, `pod del`, and a `down` that leaves nothing behind.
//! Needs root and the built `vpc-cni-agent` and `vpc-cni` binaries (`cargo build`): ignored
//! without root, failing when a binary is missing.

mod common;

use std::time::Instant;

use common::*;

#[test]
#[ignore = "root: brings up the lab (network namespaces)"]
fn seed_experiment_end_to_end() {
    require_lab();
    let _serial = serial();
    let _down = Down;
    let t = Instant::now();
    lab_ok(&["up"]);
    eprintln!("bring-up with agents: {:?}", t.elapsed());
    let pids = lab_pids();
    assert_eq!(pids.len(), 4, "moto, daemon and two agents have pid files");

    let pods = [
        ("instance1", "default/pod-a"),
        ("instance1", "default/pod-b"),
        ("instance1", "default/pod-c"),
        ("instance2", "default/pod-d"),
    ];
    for (inst, pod) in pods {
        let out = lab_ok(&["pod", "add", inst, pod]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ADD result is JSON");
        assert!(
            v["ips"][0]["address"].is_string(),
            "ADD result has an IP: {out}"
        );
    }
    // A second ADD of the same pod is refused.
    assert!(
        !lab(&["pod", "add", "instance1", "default/pod-a"])
            .status
            .success()
    );
    // Every address of instance1 is held by a pod.
    let status = lab_ok(&["status"]);
    for ip in ["172.31.13.130", "172.31.11.77", "172.31.5.50"] {
        let line = status
            .lines()
            .find(|l| l.contains(ip))
            .unwrap_or_else(|| panic!("{ip} not in status:\n{status}"));
        assert!(
            line.contains("pod default/pod-"),
            "{ip} is held by a pod: {line}"
        );
    }
    for (inst, pod) in pods {
        lab_ok(&["pod", "check", inst, pod]);
    }
    assert_root_untouched();
    // With the agent stopped, ADD fails with the plugin's error and leaks no pod namespace;
    // the agent comes back with `agent start`.
    lab_ok(&["agent", "stop", "instance2"]);
    let out = lab(&["pod", "add", "instance2", "default/no-agent"]);
    assert!(!out.status.success(), "ADD without an agent must fail");
    assert!(
        !lab_namespaces().contains(&"vpclab-pod-instance2-default-no-agent".to_string()),
        "the failed pod's namespace was removed"
    );
    lab_ok(&["agent", "start", "instance2"]);
    // The matrix, negatives included, exits 0 only if every row is as expected.
    let m = lab_ok(&["matrix", "--negative"]);
    assert!(!m.contains("FAIL"), "matrix:\n{m}");
    assert!(
        m.lines().filter(|l| l.starts_with("PASS")).count() >= 16,
        "matrix:\n{m}"
    );

    for (inst, pod) in pods.iter().rev() {
        lab_ok(&["pod", "del", inst, pod]);
    }
    // The pod namespaces and records are gone; DEL of an unknown pod is an error.
    assert!(
        lab_namespaces()
            .iter()
            .all(|n| !n.starts_with("vpclab-pod-")),
        "{:?}",
        lab_namespaces()
    );
    assert!(
        !lab(&["pod", "del", "instance1", "default/pod-a"])
            .status
            .success()
    );
    let status = lab_ok(&["status"]);
    assert!(
        !status.contains("pod default/"),
        "no pod holds an IP any more:\n{status}"
    );

    // The restarted agent has a new pid: check it too.
    let mut pids = pids;
    pids.extend(lab_pids());
    down_and_assert_clean(&pids);
}
