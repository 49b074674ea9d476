//! `vpcctl` (issue 11, operator tools) on the lab: run inside instance1's namespace as an
//! operator runs it on a node, against the real agent. Its `status`, `enis` and `pods` agree
//! with the agent's `/v1/state`; `why` names a running pod's address (exit 0); on a node filled
//! to its limit a refused pod's `why` says the node is at its limit (exit 1); a freed address
//! shows its cooldown; and with provisioning turned off on the full pool, `why` says so.
//!
//! The node is kept small to be quick: MAX_ENI=1 (m5.large: one ENI × 9 secondary IPs), a
//! fresh instance (no secondary IP until the agent assigns them), IP_COOLDOWN_PERIOD=10.
//! Needs root and the built binaries, vpcctl included (`cargo build -p vpcctl -p vpc-lab`).

mod common;

use std::net::Ipv4Addr;
use std::process::Output;
use std::time::Duration;

use common::*;

/// The vpcctl binary beside vpc-lab.
fn vpcctl_bin() -> String {
    let b = bin_dir().join("vpcctl");
    assert!(
        b.is_file(),
        "{} is not built (run `cargo build -p vpcctl`)",
        b.display()
    );
    b.display().to_string()
}

/// `vpcctl args…` inside instance1: (exit code, stdout), both echoed into the test log.
fn vpcctl(args: &[&str]) -> (i32, String) {
    let bin = vpcctl_bin();
    let mut cmd = vec!["exec", "instance1", "--", bin.as_str()];
    cmd.extend_from_slice(args);
    let out: Output = lab_quiet(&cmd);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "$ vpcctl {} -> {}\n{stdout}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), stdout)
}

fn state() -> serde_json::Value {
    agent_state("instance1").expect("instance1's agent answers /v1/state")
}

#[track_caller]
fn says(text: &str, want: &str) {
    assert!(text.contains(want), "{want:?} not in:\n{text}");
}

/// `status`, `enis` and `pods` say what `/v1/state` says (read right after, on a quiet pool).
fn agrees_with_the_state() {
    let (code, status) = vpcctl(&["status"]);
    let (_, enis) = vpcctl(&["enis"]);
    let (_, pods) = vpcctl(&["pods"]);
    let v = state();
    assert_eq!(code, 0, "both probes pass: {status}");
    let s = &v["stats"];
    says(
        &status,
        &format!(
            "pool            {} ENIs, {} addresses: {} assigned, {} cooling, {} available; {} lost",
            s["enis"], s["total"], s["assigned"], s["cooling"], s["available"], s["lost"]
        ),
    );
    says(&status, "provisioning    on (EC2)");
    says(
        &status,
        "warm targets    WARM_ENI_TARGET=1 WARM_IP_TARGET=unset MINIMUM_IP_TARGET=unset",
    );
    let l = &v["limits"];
    says(
        &status,
        &format!(
            "limits          {} ENIs × {} IPs = {} addresses, max pods {}",
            l["maxENIs"], l["ipsPerENI"], l["maxIPs"], l["maxPods"]
        ),
    );
    says(&status, &format!("pending         {} ADDs", v["pending"]));
    says(
        &status,
        &format!("reconcile       {} done", v["drift"]["reconciles"]),
    );
    // JSON: the agent's document itself.
    let (_, raw) = vpcctl(&["--json", "status"]);
    let raw: serde_json::Value = serde_json::from_str(&raw).expect("--json prints JSON");
    assert_eq!(raw["stats"], v["stats"]);
    assert_eq!(raw["pods"], v["pods"]);

    for e in v["enis"].as_array().unwrap() {
        let id = e["info"]["id"].as_str().unwrap();
        says(
            &enis,
            &format!(
                "{id}  device {}",
                e["info"]["device_number"].as_u64().unwrap()
            ),
        );
        for a in e["available"].as_array().unwrap() {
            let a = a.as_str().unwrap();
            assert_eq!(
                address_row(&enis, a).get(1).map(String::as_str),
                Some("available"),
                "{a} in:\n{enis}"
            );
        }
    }
    let n = v["pods"].as_array().unwrap().len();
    says(&pods, &format!("{n} pods with an address"));
    for p in v["pods"].as_array().unwrap() {
        let name = format!(
            "{}/{}",
            p["namespace"].as_str().unwrap(),
            p["pod"].as_str().unwrap()
        );
        let ip = p["ip"].as_str().unwrap();
        let eni = p["eni"].as_str().unwrap();
        let row: Vec<String> = pods
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not in vpcctl pods:\n{pods}"))
            .split_whitespace()
            .map(String::from)
            .collect();
        // POD CONTAINER IF IP ENI DEVICE SINCE
        assert_eq!(
            row[3..6],
            [ip, eni, &p["deviceNumber"].to_string()],
            "{row:?}"
        );
        assert_eq!(address_row(&enis, ip)[1..3], ["assigned", name.as_str()]);
    }
}

/// The words of `vpcctl enis`'s line for address `ip` (address, state, detail…).
fn address_row(enis: &str, ip: &str) -> Vec<String> {
    enis.lines()
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .find(|w| w.first().is_some_and(|a| a == ip))
        .unwrap_or_else(|| panic!("{ip} not in vpcctl enis:\n{enis}"))
}

#[test]
#[ignore = "root: brings up the lab (network namespaces)"]
fn vpcctl_explains_a_node_from_its_agent() {
    require_lab();
    vpcctl_bin();
    let _serial = serial();
    let _down = Down;
    lab_ok(&[
        "up",
        "--fresh-nodes",
        "--provisioning=instance1",
        "--agent-env",
        "MAX_ENI=1",
        "--agent-env",
        "IP_COOLDOWN_PERIOD=10",
    ]);
    let limit = 9;
    // The warm target: the primary ENI's 9 addresses.
    wait_for(
        Duration::from_secs(60),
        "instance1's pool to reach its 9 addresses",
        || (state()["stats"]["total"] == limit).then_some(()),
        || state()["stats"].to_string(),
    );

    let mut pods: Vec<(String, Ipv4Addr)> = Vec::new();
    for i in 0..3 {
        let name = format!("default/web-{i}");
        let (ip, _) = pod_add_retry("instance1", &name, Duration::from_secs(60));
        pods.push((name, ip));
    }
    agrees_with_the_state();

    // A running pod: its address, exit 0.
    let (code, out) = vpcctl(&["why", "default/web-1"]);
    assert_eq!(code, 0, "{out}");
    says(&out, &format!("default/web-1 has {} on eni-", pods[1].1));
    // A pod the agent never saw, on a node with free addresses.
    let (code, out) = vpcctl(&["why", "default/nobody"]);
    assert_eq!(code, 1, "{out}");
    says(
        &out,
        "An ADD for it now would get one: 6 of the node's 9 addresses",
    );

    // Filled to its limit: one more is refused, and `why` says the node is at its limit.
    for i in 3..limit {
        let name = format!("default/web-{i}");
        let (ip, _) = pod_add_retry("instance1", &name, Duration::from_secs(60));
        pods.push((name, ip));
    }
    match pod_add_once("instance1", "default/one-too-many") {
        Add::Ok(ip) => panic!("a pod over the limit got {ip}"),
        Add::Failed(code, msg) => assert_eq!(code, 11, "{msg}"),
    }
    let (code, out) = vpcctl(&["why", "default/one-too-many"]);
    assert_eq!(code, 1, "{out}");
    says(&out, "- no free address: all 9 are assigned to pods");
    says(
        &out,
        "- the node is at its limit: node at its limit of 9 pod IPs: 1 ENIs × 9 secondary IPs for m5.large",
    );
    agrees_with_the_state();
    let (_, status) = vpcctl(&["status"]);
    says(&status, "holds 9 addresses: at its limit");

    // A pod goes: its address cools down, and both `enis` and `why` say for how long.
    let (gone, gone_ip) = pods.remove(0);
    pod_del_retry("instance1", &gone, Duration::from_secs(30));
    let (_, out) = vpcctl(&["why", "default/one-too-many"]);
    says(&out, "- no free address: 8 assigned, 1 cooling for up to ");
    says(&out, "(IP_COOLDOWN_PERIOD is 10s)");
    let (_, enis) = vpcctl(&["enis"]);
    let row = address_row(&enis, &gone_ip.to_string());
    assert!(
        row.len() == 4 && row[1] == "cooling" && row[2].ends_with('s') && row[3] == "left",
        "{row:?}"
    );
    let (ip, _) = pod_add_retry("instance1", "default/late", Duration::from_secs(30));
    assert_eq!(ip, gone_ip, "the only address, once cooled down");
    pods.push(("default/late".into(), ip));

    // Provisioning off on the full pool: `why` says so, not the limit (the agent knows none).
    lab_ok(&[
        "agent",
        "restart",
        "instance1",
        "--agent-env",
        "DISABLE_NETWORK_RESOURCE_PROVISIONING=true",
    ]);
    let (code, out) = vpcctl(&["why", "default/one-too-many"]);
    assert_eq!(code, 1, "{out}");
    says(&out, "- no free address: all 9 are assigned to pods");
    says(
        &out,
        "- provisioning is off (DISABLE_NETWORK_RESOURCE_PROVISIONING=true or ENABLE_IMDS_ONLY_MODE=true)",
    );
    assert!(!out.contains("at its limit"), "{out}");
    // The pods kept their addresses across the restart.
    let (code, out) = vpcctl(&["why", &pods[0].0]);
    assert_eq!(code, 0, "{out}");
    says(&out, &format!("has {} on eni-", pods[0].1));
    let (code, status) = vpcctl(&["status"]);
    assert_eq!(code, 0, "a full node is ready: {status}");
    says(&status, "provisioning    off");
    says(&status, "limits          not known (provisioning off)");
    let (_, p) = vpcctl(&["pods"]);
    says(&p, &format!("{limit} pods with an address"));
}
