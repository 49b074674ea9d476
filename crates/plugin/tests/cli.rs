//! The plugin binary's answers to bad input and an absent agent: no root needed (a foreign
//! network namespace is made with `unshare -rn` when not root, `ip netns add` when root),
//! except for one DEL that runs the plugin inside a namespace of its own (ignored without
//! `--include-ignored`).

mod common;

use common::{Foreign, TestNetns, run_plugin};
use serde_json::{Value, json};
use testkit::require_root;

const NO_AGENT: &str = "/nonexistent/vpc-cni-test/agent.sock";

fn conf(version: &str, extra: Value) -> Vec<u8> {
    let mut c = json!({
        "cniVersion": version, "name": "vpc-cni", "type": "vpc-cni",
        "agentSocket": NO_AGENT
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    serde_json::to_vec(&c).unwrap()
}

fn env<'a>(cmd: &'a str, netns: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", "cli-test-1"),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=cli",
        ),
    ]
}

#[test]
fn version_needs_only_the_command() {
    let r = run_plugin(&[("CNI_COMMAND", "VERSION")], b"", None);
    r.ok();
    assert_eq!(
        r.json(),
        json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
    // with the runtime's stdin too
    let r = run_plugin(
        &[("CNI_COMMAND", "VERSION")],
        br#"{"cniVersion":"0.4.0"}"#,
        None,
    );
    assert_eq!(r.json()["supportedVersions"][4], "1.1.0");
}

/// The one line a person who runs the plugin by hand gets on stderr.
fn assert_about(status: i32, stdout: &str, stderr: &str) {
    assert_eq!(status, 1, "stderr: {stderr}");
    assert_eq!(stdout, "", "nothing on stdout");
    let want = format!(
        "vpc-cni {}: the vpc-cni CNI plugin; run by a container runtime with CNI_COMMAND set \
         (CNI spec 0.3.0\u{2013}1.1.0); see the README's \"Operating the agent\"\n",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(stderr, want);
}

#[test]
fn run_by_hand_it_says_what_it_is_without_reading_stdin() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    // No CNI_COMMAND, and stdin open and silent (a terminal): it must not wait for it.
    let mut child = Command::new(common::BIN)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vpc-cni");
    let stdin = child.stdin.take();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            panic!("vpc-cni without CNI_COMMAND waited on its stdin");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert_about(
        status.code().unwrap_or(-1),
        &String::from_utf8_lossy(&out.stdout),
        &String::from_utf8_lossy(&out.stderr),
    );
    // An empty CNI_COMMAND is no command either (as libcni's skel reads it).
    let r = run_plugin(&[("CNI_COMMAND", "")], br#"{"cniVersion":"1.0.0"}"#, None);
    assert_about(r.status, &r.stdout, &r.stderr);
}

#[test]
fn malformed_json_is_code_6() {
    let r = run_plugin(&env("ADD", "/run/netns/x"), b"{\"cniVersion\": ", None);
    let v = r.error(6);
    assert_eq!(v["cniVersion"], "1.1.0");
}

#[test]
fn unknown_version_is_code_1() {
    let r = run_plugin(&env("ADD", "/run/netns/x"), &conf("0.2.0", json!({})), None);
    let v = r.error(1);
    let details = v["details"].as_str().unwrap();
    assert!(
        details.contains("0.2.0") && details.contains("1.1.0"),
        "{v}"
    );
}

#[test]
fn missing_container_id_is_code_4_and_named() {
    let mut e = env("ADD", "/run/netns/x");
    e.retain(|(k, _)| *k != "CNI_CONTAINERID");
    let r = run_plugin(&e, &conf("1.0.0", json!({})), None);
    let v = r.error(4);
    assert!(
        v["msg"].as_str().unwrap().contains("CNI_CONTAINERID"),
        "{v}"
    );
    assert_eq!(v["cniVersion"], "1.0.0");
}

#[test]
fn nonexistent_netns_is_code_4_and_named() {
    let path = "/run/netns/vpccni-pt-does-not-exist";
    let r = run_plugin(&env("ADD", path), &conf("1.0.0", json!({})), None);
    let v = r.error(4);
    let msg = v["msg"].as_str().unwrap();
    assert!(msg.contains("CNI_NETNS") && msg.contains(path), "{v}");
}

#[test]
fn bad_mtu_is_code_7_and_named() {
    let r = run_plugin(
        &env("ADD", "/run/netns/x"),
        &conf("0.4.0", json!({"mtu": "20000"})),
        None,
    );
    let v = r.error(7);
    assert!(v["msg"].as_str().unwrap().contains("mtu"), "{v}");
    assert!(v["details"].as_str().unwrap().contains("20000"), "{v}");
    assert_eq!(v["cniVersion"], "0.4.0");
}

#[test]
fn agent_down_on_add_is_code_11() {
    let ns = Foreign::new("cli-add").expect(
        "cannot make a network namespace: not root, and `unshare -rn` (user namespaces) failed",
    );
    let r = run_plugin(&env("ADD", &ns.path()), &conf("1.0.0", json!({})), None);
    let v = r.error(11);
    assert!(v["msg"].as_str().unwrap().contains(NO_AGENT), "{v}");
    assert!(
        v["details"].as_str().unwrap().contains("vpc-cni-agent"),
        "{v}"
    );
}

#[test]
fn status_with_agent_down_is_code_50() {
    let r = run_plugin(
        &[("CNI_COMMAND", "STATUS")],
        &conf("1.1.0", json!({})),
        None,
    );
    let v = r.error(50);
    assert!(v["details"].as_str().unwrap().contains(NO_AGENT), "{v}");
}

#[test]
fn check_with_0_3_1_is_code_1() {
    let r = run_plugin(
        &env("CHECK", "/run/netns/x"),
        &conf(
            "0.3.1",
            json!({"prevResult": {"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.99.0.2/32"}]}}),
        ),
        None,
    );
    let v = r.error(1);
    assert!(v["details"].as_str().unwrap().contains("CHECK"), "{v}");
}

#[test]
#[ignore = "root: creates a network namespace and runs the plugin in it"]
fn del_with_agent_down_and_nothing_to_remove_succeeds() {
    require_root();
    // run inside a throwaway "node" namespace: DEL looks for host links there
    let node = TestNetns::new("cli-del");
    let r = run_plugin(
        &env("DEL", "/run/netns/vpccni-pt-gone"),
        &conf("1.0.0", json!({})),
        Some(&node.path()),
    );
    // No prevResult, no netns, no agent: nothing to remove, and DEL still succeeds.
    r.ok_empty();
    assert!(r.stderr.contains("agent unavailable"), "{}", r.stderr);
}

#[test]
fn logs_never_reach_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("plugin.log");
    let r = run_plugin(
        &env("ADD", "/run/netns/vpccni-pt-does-not-exist"),
        &conf(
            "1.0.0",
            json!({"pluginLogLevel": "trace", "pluginLogFile": log.display().to_string()}),
        ),
        None,
    );
    r.error(4);
    let _ = std::fs::read_to_string(&log); // may or may not exist: rejected before logging
    let r = run_plugin(
        &[("CNI_COMMAND", "STATUS")],
        &conf(
            "1.1.0",
            json!({"pluginLogLevel": "trace", "pluginLogFile": log.display().to_string()}),
        ),
        None,
    );
    r.error(50);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("calling the agent"), "{text}");
    // warnings and errors are copied to stderr, debug lines are not
    assert!(r.stderr.contains("failed"), "{}", r.stderr);
    assert!(!r.stderr.contains("calling the agent"), "{}", r.stderr);
}

#[test]
fn binary_links_no_async_runtime_aws_sdk_or_kube() {
    // Symbol names and panic locations of any linked crate appear in the binary; this also
    // catches feature unification in a workspace-wide build (e.g. nftables' tokio feature).
    let bin = std::fs::read(common::BIN).unwrap();
    assert!(bin.len() > 100_000);
    assert!(
        contains(&bin, b"serde_json"),
        "symbol names expected in the binary"
    );
    for name in ["tokio", "aws_sdk", "aws_smithy", "kube_client", "hyper"] {
        assert!(!contains(&bin, name.as_bytes()), "vpc-cni links {name}");
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
