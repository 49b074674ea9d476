//! The agent binary as an operator meets it: `--version`, `--help`, and a fatal error reported
//! once per destination, in the log format asked for, without colour codes off a terminal.
//! Nothing here touches the network: the failures come from the configuration or from a
//! plugin binary that does not exist, before any other step.

use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_vpc-cni-agent");

fn agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear().args(args).envs(env.iter().copied());
    if let Some(p) = std::env::var_os("PATH") {
        cmd.env("PATH", p);
    }
    cmd.output().expect("running vpc-cni-agent")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn version_and_help() {
    let out = agent(&["--version"], &[]);
    assert!(out.status.success(), "{out:?}");
    let v = text(&out.stdout);
    let want = format!(
        "vpc-cni-agent {} (commit {})\n",
        agent::build_info::VERSION,
        agent::build_info::COMMIT
    );
    assert_eq!(v, want);
    let out = agent(&["--help"], &[]);
    assert!(out.status.success(), "{out:?}");
    let help = text(&out.stdout);
    for word in ["init", "uninstall", "/livez", "/readyz", "--version"] {
        assert!(help.contains(word), "{word} not in\n{help}");
    }
}

/// An environment in which `init` fails at its first step (the plugin binary is missing).
fn failing_init(dir: &Path) -> Vec<(String, String)> {
    [
        ("HOST_CNI_BIN_PATH", dir.join("bin").display().to_string()),
        (
            "HOST_CNI_CONFDIR_PATH",
            dir.join("net.d").display().to_string(),
        ),
        (
            "VPC_CNI_PLUGIN_BINARY",
            dir.join("no-such-plugin").display().to_string(),
        ),
        (
            "AWS_EC2_METADATA_SERVICE_ENDPOINT",
            "http://127.0.0.1:9".into(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn run_init(env: &[(String, String)]) -> Output {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = agent(&["init"], &env);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    out
}

const WHY: &str = "no-such-plugin";

#[test]
fn a_fatal_error_is_reported_once_on_stderr_when_the_log_is_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_init(&failing_init(dir.path()));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.matches(WHY).count(), 1, "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "colour codes off a terminal: {stderr:?}"
    );
    let line = stderr.lines().find(|l| l.contains(WHY)).unwrap();
    assert!(line.contains("ERROR"), "{line}");
    assert!(stderr.contains("vpc-cni-agent starting"), "{stderr}");
    assert_eq!(text(&out.stdout), "");

    // JSON lines: every line one object, the error among them once.
    let mut env = failing_init(dir.path());
    env.push(("VPC_CNI_LOG_FORMAT".into(), "json".into()));
    let out = run_init(&env);
    let stderr = text(&out.stderr);
    assert_eq!(stderr.matches(WHY).count(), 1, "{stderr}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let started = lines
        .iter()
        .find(|l| l["fields"]["message"] == "vpc-cni-agent starting")
        .expect("the start line");
    assert_eq!(started["fields"]["version"], agent::build_info::VERSION);
    assert_eq!(started["fields"]["commit"], agent::build_info::COMMIT);
    let fatal = lines.last().unwrap();
    assert_eq!(fatal["level"], "ERROR");
    assert!(
        fatal["fields"]["message"].as_str().unwrap().contains(WHY),
        "{fatal}"
    );
}

#[test]
fn a_fatal_error_is_in_the_log_file_once_and_on_stderr_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log/agent.log");
    let mut env = failing_init(dir.path());
    env.push(("AWS_VPC_K8S_CNI_LOG_FILE".into(), log.display().to_string()));
    let out = run_init(&env);
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("vpc-cni-agent: "), "{stderr}");
    assert!(stderr.contains(WHY), "{stderr}");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(logged.matches(WHY).count(), 1, "{logged}");
    assert!(!logged.contains('\x1b'), "{logged:?}");
}

#[test]
fn a_configuration_error_is_reported_once_on_stderr() {
    let out = agent(&[], &[("VPC_CNI_LOG_FORMAT", "yaml")]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("vpc-cni-agent: invalid configuration: VPC_CNI_LOG_FORMAT=\"yaml\""),
        "{stderr}"
    );
}

/// `max-pods`: the built-in table without any configuration, and DescribeInstanceTypes (moto,
/// on loopback) for a type the table lacks or with `--ec2`; the values agree.
#[test]
fn max_pods_from_the_table_and_from_ec2() {
    let out = agent(&["max-pods", "m5.large"], &[]);
    assert!(out.status.success(), "{out:?}");
    let table = text(&out.stdout);
    assert!(
        table.starts_with("m5.large: 3 ENIs × 10 IPv4 addresses, 2 vCPUs"),
        "{table}"
    );
    let pd: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("prefix delegation "))
        .map(|l| l.split_whitespace().skip(2).collect())
        .unwrap_or_default();
    assert_eq!(pd, ["434", "110"], "{table}");

    let moto = testkit::moto::Moto::for_test();
    let env = [
        ("AWS_ENDPOINT_URL_EC2", moto.endpoint()),
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_ACCESS_KEY_ID", "testing".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = agent(&["max-pods", "m5.large", "--ec2"], &env);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        text(&out.stdout),
        table,
        "EC2 and the table agree on m5.large"
    );
    // Not in the table: EC2 answers (moto knows every type).
    let out = agent(&["max-pods", "m5d.large"], &env);
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("secondary IPs"), "{out:?}");
    // Neither: the error names the type and both sources.
    let out = agent(&["max-pods", "x9.nonsense"], &env);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("x9.nonsense: not in the built-in table, and DescribeInstanceTypes failed"),
        "{err}"
    );
}
