//! The verbs against a fake backend (no root, no sockets).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dataplane::{DataplaneError, NetError, PodLinks, PodSpec, PodTeardown, TeardownError};
use nix::errno::Errno;
use proto::{Allocation, AttachmentKey, ProtoError, Request, Response, StatusReply};
use serde_json::{Value, json};

use crate::deadline::{CALL_BUDGET, LOCAL_WORK_RESERVE, STATUS_BUDGET};
use crate::{Backend, Deadline, Invocation, NetnsState, PluginError, Reply, execute};

mod fuzz;

#[derive(Debug, Clone, PartialEq)]
struct Setup {
    netns: PathBuf,
    host_veth: String,
    ifname: String,
    ip: Ipv4Addr,
    mtu: u32,
    route_table: u32,
}

impl Setup {
    fn of(s: &PodSpec) -> Setup {
        Setup {
            netns: s.netns.into(),
            host_veth: s.host_veth.into(),
            ifname: s.ifname.into(),
            ip: s.ip,
            mtu: s.mtu,
            route_table: s.route_table,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Teardown {
    netns: Option<PathBuf>,
    host_veth: Option<String>,
    ifname: String,
    ip: Option<Ipv4Addr>,
}

#[derive(Default)]
struct Fake {
    netns: HashMap<PathBuf, NetnsState>,
    /// Scripted agent answers, in order; an empty queue means "unreachable".
    answers: RefCell<VecDeque<Response>>,
    requests: RefCell<Vec<Request>>,
    sockets: RefCell<Vec<PathBuf>>,
    /// The deadline each agent call was given.
    deadlines: RefCell<Vec<Instant>>,
    /// Answer an empty queue with a timeout instead of "unreachable".
    agent_hangs: bool,
    /// Scripted dataplane failures (made afresh for each call: the errors are not `Clone`).
    setup_error: Option<fn() -> DataplaneError>,
    check_error: Option<fn() -> DataplaneError>,
    teardown_errors: Option<fn() -> Vec<DataplaneError>>,
    setups: RefCell<Vec<Setup>>,
    checks: RefCell<Vec<Setup>>,
    teardowns: RefCell<Vec<Teardown>>,
}

impl Fake {
    fn new() -> Fake {
        let mut f = Fake::default();
        f.netns.insert(NETNS.into(), NetnsState::Usable);
        f
    }
    fn answer(self, r: Response) -> Fake {
        self.answers.borrow_mut().push_back(r);
        self
    }
}

impl Backend for Fake {
    fn probe_netns(&self, path: &Path) -> NetnsState {
        self.netns.get(path).cloned().unwrap_or(NetnsState::Missing)
    }
    fn call_agent(
        &self,
        socket: &Path,
        req: &Request,
        deadline: Instant,
    ) -> Result<Response, ProtoError> {
        self.sockets.borrow_mut().push(socket.into());
        self.requests.borrow_mut().push(req.clone());
        self.deadlines.borrow_mut().push(deadline);
        self.answers.borrow_mut().pop_front().ok_or_else(|| {
            if self.agent_hangs {
                ProtoError::Timeout {
                    stage: proto::Stage::Receive,
                    waited: Duration::from_millis(7750),
                }
            } else {
                ProtoError::Connect {
                    path: socket.display().to_string(),
                    source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
                }
            }
        })
    }
    fn setup_pod(&self, spec: &PodSpec) -> Result<PodLinks, DataplaneError> {
        self.setups.borrow_mut().push(Setup::of(spec));
        if let Some(e) = self.setup_error {
            return Err(e());
        }
        Ok(PodLinks {
            host_veth: spec.host_veth.into(),
            host_mac: "02:00:00:00:00:01".into(),
            container_ifname: spec.ifname.into(),
            container_mac: "02:00:00:00:00:02".into(),
        })
    }
    fn check_pod(&self, spec: &PodSpec) -> Result<(), DataplaneError> {
        self.checks.borrow_mut().push(Setup::of(spec));
        self.check_error.map_or(Ok(()), |e| Err(e()))
    }
    fn teardown_pod(&self, t: &PodTeardown) -> Result<(), TeardownError> {
        self.teardowns.borrow_mut().push(Teardown {
            netns: t.netns.map(Into::into),
            host_veth: t.host_veth.map(Into::into),
            ifname: t.ifname.into(),
            ip: t.ip,
        });
        match self.teardown_errors {
            None => Ok(()),
            Some(errors) => Err(TeardownError { errors: errors() }),
        }
    }
}

const NETNS: &str = "/run/netns/pod1";
const CID: &str = "c0ffee";
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 7);
const K8S_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web";

fn vars(cmd: &str) -> Vec<(String, String)> {
    [
        ("CNI_COMMAND", cmd),
        ("CNI_CONTAINERID", CID),
        ("CNI_NETNS", NETNS),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", K8S_ARGS),
        ("CNI_PATH", "/opt/cni/bin"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn conf(version: &str, extra: Value) -> Vec<u8> {
    let mut c = json!({
        "cniVersion": version, "name": "vpc-cni", "type": "vpc-cni",
        "mtu": "9001", "vethPrefix": "eni", "agentSocket": "/tmp/test-agent.sock"
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    serde_json::to_vec(&c).unwrap()
}

fn alloc(ip: Ipv4Addr, table: u32) -> Allocation {
    Allocation {
        ip,
        eni_id: "eni-1".into(),
        device_number: if table == 254 { 0 } else { table - 1 },
        route_table: table,
        subnet: "10.99.0.0/24".parse().unwrap(),
        vpc_cidrs: vec!["10.99.0.0/16".parse().unwrap()],
    }
}

fn key() -> AttachmentKey {
    AttachmentKey {
        network: "vpc-cni".into(),
        container_id: CID.into(),
        ifname: "eth0".into(),
    }
}

fn run(
    vars: Vec<(String, String)>,
    stdin: &[u8],
    fake: &Fake,
) -> Result<Option<Value>, PluginError> {
    run_by(
        vars,
        stdin,
        fake,
        Deadline::new(Instant::now(), CALL_BUDGET),
    )
}

fn run_by(
    vars: Vec<(String, String)>,
    stdin: &[u8],
    fake: &Fake,
    deadline: Deadline,
) -> Result<Option<Value>, PluginError> {
    let inv = Invocation::parse(vars, stdin)?;
    execute(&inv, fake, deadline)
}

fn code(r: Result<Option<Value>, PluginError>) -> u32 {
    r.unwrap_err().to_cni().code
}

/// What the dataplane reports when CNI_IFNAME is taken in the pod's namespace.
fn eth0_exists() -> DataplaneError {
    DataplaneError::InterfaceExists {
        ifname: "eth0".into(),
        netns: NETNS.into(),
    }
}

/// A kernel refusal of `op`.
fn eperm(op: &str) -> NetError {
    NetError::Kernel {
        op: op.into(),
        errno: Errno::EPERM,
        ext_msg: None,
    }
}

fn prev_result(ip: &str) -> Value {
    let veth = dataplane::host_veth_name("eni", "default", "web");
    json!({
        "interfaces": [{"name": veth, "mac": "02:00:00:00:00:01"},
                       {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": NETNS}],
        "ips": [{"address": format!("{ip}/32"), "gateway": "169.254.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}]
    })
}

#[test]
fn add_wires_the_pod_and_reports_it_in_every_version() {
    for v in cni::SUPPORTED_VERSIONS {
        let fake = Fake::new().answer(Response::Added {
            allocation: alloc(POD_IP, 3),
            existing: false,
        });
        let out = run(vars("ADD"), &conf(v, json!({"mtu": 1500})), &fake)
            .unwrap()
            .unwrap();
        let veth = dataplane::host_veth_name("eni", "default", "web");
        assert_eq!(
            *fake.requests.borrow(),
            vec![Request::Add {
                key: key(),
                pod: proto::PodRef {
                    namespace: "default".into(),
                    name: "web".into(),
                    infra_container_id: None
                },
                netns: NETNS.into()
            }]
        );
        assert_eq!(
            fake.sockets.borrow()[0],
            PathBuf::from("/tmp/test-agent.sock")
        );
        assert_eq!(
            *fake.setups.borrow(),
            vec![Setup {
                netns: NETNS.into(),
                host_veth: veth.clone(),
                ifname: "eth0".into(),
                ip: POD_IP,
                mtu: 1500,
                route_table: 3
            }]
        );
        assert_eq!(out["cniVersion"], v);
        assert_eq!(out["interfaces"][0]["name"], veth.as_str());
        assert_eq!(out["interfaces"][0]["mac"], "02:00:00:00:00:01");
        assert_eq!(out["interfaces"][0].get("sandbox"), None);
        assert_eq!(out["interfaces"][1]["name"], "eth0");
        assert_eq!(out["interfaces"][1]["sandbox"], NETNS);
        assert_eq!(out["ips"][0]["address"], "10.99.0.7/32");
        assert_eq!(out["ips"][0]["gateway"], "169.254.1.1");
        assert_eq!(out["ips"][0]["interface"], 1);
        assert_eq!(
            out["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}])
        );
        let old = v.starts_with("0.");
        assert_eq!(out["ips"][0].get("version").is_some(), old, "{v}");
        assert_eq!(
            out["interfaces"][1].get("mtu").is_some(),
            v == "1.1.0",
            "{v}"
        );
    }
}

#[test]
fn add_without_k8s_args_names_the_veth_after_container_and_ifname() {
    let fake = Fake::new().answer(Response::Added {
        allocation: alloc(POD_IP, 254),
        existing: false,
    });
    let mut vars = vars("ADD");
    vars.retain(|(k, _)| k != "CNI_ARGS");
    run(vars, &conf("1.0.0", json!({"vethPrefix": "pod"})), &fake).unwrap();
    let veth = &fake.setups.borrow()[0].host_veth;
    assert_eq!(*veth, dataplane::host_veth_name("pod", CID, "eth0"));
    assert_ne!(*veth, dataplane::host_veth_name("pod", "default", "web"));
    assert_eq!(veth.len(), 14);
}

#[test]
fn second_interface_of_a_pod_gets_its_own_veth() {
    let mut v = vars("ADD");
    v[3].1 = "eth1".into();
    let fake = Fake::new().answer(Response::Added {
        allocation: alloc(POD_IP, 254),
        existing: false,
    });
    run(v, &conf("1.0.0", json!({})), &fake).unwrap();
    assert_ne!(
        fake.setups.borrow()[0].host_veth,
        dataplane::host_veth_name("eni", "default", "web")
    );
}

#[test]
fn add_chained_keeps_prev_result_and_appends() {
    let prev = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "other0"}],
        "ips": [{"address": "192.0.2.5/24", "interface": 0}],
        "dns": {"nameservers": ["192.0.2.53"]}
    });
    let fake = Fake::new().answer(Response::Added {
        allocation: alloc(POD_IP, 254),
        existing: false,
    });
    let out = run(
        vars("ADD"),
        &conf("1.0.0", json!({"prevResult": prev})),
        &fake,
    )
    .unwrap()
    .unwrap();
    assert_eq!(out["interfaces"][0]["name"], "other0");
    assert_eq!(out["interfaces"][2]["name"], "eth0");
    assert_eq!(out["ips"][0]["address"], "192.0.2.5/24");
    assert_eq!(out["ips"][1]["address"], "10.99.0.7/32");
    assert_eq!(out["ips"][1]["interface"], 2);
    assert_eq!(out["dns"]["nameservers"][0], "192.0.2.53");
}

#[test]
fn add_missing_netns_fails_before_the_agent() {
    let mut fake = Fake::new();
    fake.netns.clear();
    let e = run(vars("ADD"), &conf("1.0.0", json!({})), &fake)
        .unwrap_err()
        .to_cni();
    assert_eq!(e.code, 4);
    assert!(e.msg.contains("CNI_NETNS") && e.msg.contains(NETNS), "{e}");
    assert!(fake.requests.borrow().is_empty());
}

#[test]
fn add_into_own_netns_is_refused() {
    let mut fake = Fake::new();
    fake.netns.insert(NETNS.into(), NetnsState::Own);
    assert_eq!(code(run(vars("ADD"), &conf("1.0.0", json!({})), &fake)), 8);
    assert!(fake.requests.borrow().is_empty());
}

#[test]
fn add_agent_down_is_try_again_later() {
    let fake = Fake::new();
    let e = run(vars("ADD"), &conf("1.0.0", json!({})), &fake)
        .unwrap_err()
        .to_cni();
    assert_eq!(e.code, 11);
    assert!(e.msg.contains("/tmp/test-agent.sock"), "{e}");
    assert!(fake.setups.borrow().is_empty());
}

#[test]
fn add_agent_error_is_passed_through() {
    let fake = Fake::new().answer(Response::Error {
        code: 11,
        message: "no free address: pool exhausted".into(),
    });
    let e = run(vars("ADD"), &conf("1.0.0", json!({})), &fake)
        .unwrap_err()
        .to_cni();
    assert_eq!(e.code, 11);
    assert_eq!(e.msg, "no free address: pool exhausted");
}

#[test]
fn add_setup_failure_releases_the_address() {
    let mut fake = Fake::new()
        .answer(Response::Added {
            allocation: alloc(POD_IP, 254),
            existing: false,
        })
        .answer(Response::Deleted {
            released: Some(alloc(POD_IP, 254)),
        });
    fake.setup_error = Some(eth0_exists);
    let e = run(vars("ADD"), &conf("1.0.0", json!({})), &fake)
        .unwrap_err()
        .to_cni();
    assert_eq!(e.code, 100);
    assert!(e.details.contains("eth0 already exists"), "{e}");
    assert!(e.details.contains("was released"), "{e}");
    assert_eq!(fake.requests.borrow()[1], Request::Del { key: key() });

    // and when the release fails too, both are reported
    let mut fake = Fake::new().answer(Response::Added {
        allocation: alloc(POD_IP, 254),
        existing: false,
    });
    fake.setup_error = Some(|| DataplaneError::LinkNotFound {
        what: "boom".into(),
    });
    let e = run(vars("ADD"), &conf("1.0.0", json!({})), &fake)
        .unwrap_err()
        .to_cni();
    assert!(
        e.details
            .contains("releasing the address 10.99.0.7 also failed"),
        "{e}"
    );
}

#[test]
fn repeated_add_failure_keeps_the_address() {
    // The attachment already held the address (a second ADD without DEL): the failure must not
    // release an address the first ADD's interface may be using.
    let mut fake = Fake::new().answer(Response::Added {
        allocation: alloc(POD_IP, 254),
        existing: true,
    });
    fake.setup_error = Some(eth0_exists);
    let e = run(vars("ADD"), &conf("1.0.0", json!({})), &fake)
        .unwrap_err()
        .to_cni();
    assert_eq!(e.code, 100);
    assert!(e.details.contains("stays assigned"), "{e}");
    assert_eq!(fake.requests.borrow().len(), 1, "no DEL sent to the agent");
}

#[test]
fn del_uses_the_agents_address() {
    let fake = Fake::new().answer(Response::Deleted {
        released: Some(alloc(POD_IP, 2)),
    });
    assert_eq!(
        run(vars("DEL"), &conf("0.3.1", json!({})), &fake).unwrap(),
        None
    );
    assert_eq!(
        *fake.teardowns.borrow(),
        vec![Teardown {
            netns: Some(NETNS.into()),
            host_veth: Some(dataplane::host_veth_name("eni", "default", "web")),
            ifname: "eth0".into(),
            ip: Some(POD_IP)
        }]
    );
}

#[test]
fn del_with_agent_down_tears_down_from_prev_result_and_succeeds() {
    let mut fake = Fake::new();
    fake.netns.clear(); // netns gone as well
    let c = conf("0.4.0", json!({"prevResult": prev_result("10.99.0.9")}));
    assert_eq!(run(vars("DEL"), &c, &fake).unwrap(), None);
    let t = &fake.teardowns.borrow()[0];
    assert_eq!(t.ip, Some(Ipv4Addr::new(10, 99, 0, 9)));
    assert_eq!(t.netns, None);
    assert!(t.host_veth.is_some());
}

#[test]
fn del_of_unknown_pod_without_prev_result_succeeds() {
    for answer in [
        Response::Deleted { released: None },
        Response::Error {
            code: 3,
            message: "unknown container".into(),
        },
    ] {
        let fake = Fake::new().answer(answer);
        let mut v = vars("DEL");
        v.retain(|(k, _)| k != "CNI_NETNS");
        assert_eq!(run(v, &conf("1.1.0", json!({})), &fake).unwrap(), None);
        let t = &fake.teardowns.borrow()[0];
        assert_eq!((t.ip, t.netns.as_ref()), (None, None));
    }
}

#[test]
fn del_reports_every_teardown_error() {
    let mut fake = Fake::new().answer(Response::Deleted { released: None });
    fake.teardown_errors = Some(|| vec![eperm("route 10.99.0.7/32").into(), eperm("rule").into()]);
    let e = run(vars("DEL"), &conf("1.0.0", json!({})), &fake)
        .unwrap_err()
        .to_cni();
    assert_eq!(e.code, 102);
    assert!(
        e.details.contains("route 10.99.0.7/32") && e.details.contains("rule:"),
        "{e}"
    );
}

#[test]
fn del_agent_refusal_is_reported_after_teardown() {
    let fake = Fake::new().answer(Response::Error {
        code: 5,
        message: "checkpoint write failed".into(),
    });
    let c = conf("1.0.0", json!({"prevResult": prev_result("10.99.0.9")}));
    assert_eq!(code(run(vars("DEL"), &c, &fake)), 5);
    assert_eq!(fake.teardowns.borrow().len(), 1);
}

#[test]
fn del_never_enters_the_plugins_own_netns() {
    let mut fake = Fake::new().answer(Response::Deleted { released: None });
    fake.netns.insert(NETNS.into(), NetnsState::Own);
    run(vars("DEL"), &conf("1.0.0", json!({})), &fake).unwrap();
    assert_eq!(fake.teardowns.borrow()[0].netns, None);
}

#[test]
fn check_compares_agent_and_prev_result() {
    let c = conf("1.0.0", json!({"prevResult": prev_result("10.99.0.7")}));
    let fake = Fake::new().answer(Response::Checked {
        allocation: alloc(POD_IP, 2),
    });
    assert_eq!(run(vars("CHECK"), &c, &fake).unwrap(), None);
    assert_eq!(fake.requests.borrow()[0], Request::Check { key: key() });
    assert_eq!(fake.checks.borrow()[0].route_table, 2);
    assert_eq!(fake.checks.borrow()[0].ip, POD_IP);

    let fake = Fake::new().answer(Response::Checked {
        allocation: alloc(Ipv4Addr::new(10, 99, 0, 8), 2),
    });
    let e = run(vars("CHECK"), &c, &fake).unwrap_err().to_cni();
    assert_eq!(e.code, 101);
    assert!(
        e.details.contains("10.99.0.8") && e.details.contains("10.99.0.7"),
        "{e}"
    );
    assert!(fake.checks.borrow().is_empty());

    let mut fake = Fake::new().answer(Response::Checked {
        allocation: alloc(POD_IP, 2),
    });
    fake.check_error = Some(|| DataplaneError::CheckFailed {
        problems: vec!["neighbour 169.254.1.1 missing".into()],
    });
    let e = run(vars("CHECK"), &c, &fake).unwrap_err().to_cni();
    assert_eq!(e.code, 101);
    assert!(e.details.contains("neighbour"), "{e}");
}

#[test]
fn check_needs_prev_result_and_version() {
    let fake = Fake::new();
    let e = run(vars("CHECK"), &conf("1.0.0", json!({})), &fake)
        .unwrap_err()
        .to_cni();
    assert_eq!(e.code, 7);
    assert!(e.msg.contains("prevResult"), "{e}");
    let c = conf("0.3.1", json!({"prevResult": prev_result("10.99.0.7")}));
    assert_eq!(code(run(vars("CHECK"), &c, &fake)), 1);
    assert!(fake.requests.borrow().is_empty());
}

#[test]
fn check_flags_a_prev_result_from_another_veth() {
    let c = conf(
        "1.0.0",
        json!({"prevResult": prev_result("10.99.0.7"), "vethPrefix": "pod"}),
    );
    let fake = Fake::new();
    let e = run(vars("CHECK"), &c, &fake).unwrap_err().to_cni();
    assert_eq!(e.code, 101);
    assert!(e.details.contains("host interface pod"), "{e}");
}

#[test]
fn status() {
    let fake = Fake::new().answer(Response::Status(StatusReply {
        ready: true,
        message: "ok".into(),
        free_ips: 3,
        assigned_ips: 1,
    }));
    assert_eq!(
        run(vars("STATUS"), &conf("1.1.0", json!({})), &fake).unwrap(),
        None
    );

    let fake = Fake::new().answer(Response::Status(StatusReply {
        ready: false,
        message: "waiting for the first ENI".into(),
        free_ips: 0,
        assigned_ips: 0,
    }));
    let e = run(vars("STATUS"), &conf("1.1.0", json!({})), &fake)
        .unwrap_err()
        .to_cni();
    assert_eq!(e.code, 50);
    assert!(e.details.contains("waiting for the first ENI"), "{e}");

    let e = run(vars("STATUS"), &conf("1.1.0", json!({})), &Fake::new())
        .unwrap_err()
        .to_cni();
    assert_eq!(e.code, 50);
    assert!(e.details.contains("/tmp/test-agent.sock"), "{e}");

    assert_eq!(
        code(run(vars("STATUS"), &conf("1.0.0", json!({})), &Fake::new())),
        1
    );
}

#[test]
fn gc_tears_down_what_the_agent_released() {
    let gone = AttachmentKey {
        network: "vpc-cni".into(),
        container_id: "dead".into(),
        ifname: "eth0".into(),
    };
    let fake = Fake::new().answer(Response::Collected {
        released: vec![(gone.clone(), Ipv4Addr::new(10, 99, 0, 3))],
    });
    let c = conf(
        "1.1.0",
        json!({"cni.dev/valid-attachments": [{"containerID": CID, "ifname": "eth0"}]}),
    );
    assert_eq!(run(vars("GC"), &c, &fake).unwrap(), None);
    assert_eq!(
        fake.requests.borrow()[0],
        Request::Gc {
            network: "vpc-cni".into(),
            valid: vec![key()]
        }
    );
    assert_eq!(
        *fake.teardowns.borrow(),
        vec![Teardown {
            netns: None,
            host_veth: None,
            ifname: "eth0".into(),
            ip: Some(Ipv4Addr::new(10, 99, 0, 3))
        }]
    );

    // without the valid list we refuse rather than release everything
    let e = run(vars("GC"), &conf("1.1.0", json!({})), &Fake::new())
        .unwrap_err()
        .to_cni();
    assert_eq!(e.code, 7);
    assert!(e.msg.contains("cni.dev/valid-attachments"));
    // agent down: try again later
    assert_eq!(code(run(vars("GC"), &c, &Fake::new())), 11);
}

#[test]
fn version_verb_and_error_replies() {
    let inv = Invocation::parse([("CNI_COMMAND", "VERSION")], b"").unwrap();
    let r = Reply::new(
        execute(
            &inv,
            &Fake::new(),
            Deadline::new(Instant::now(), CALL_BUDGET),
        ),
        None,
    );
    assert_eq!(r.exit_code, 0);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);

    let err = Invocation::parse(vars("ADD"), b"{nope").unwrap_err();
    let r = Reply::new(Err(err), None);
    assert_eq!(r.exit_code, 1);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["code"], 6);
    assert_eq!(v["cniVersion"], "1.1.0");

    let err = Invocation::parse(vars("ADD"), &conf("0.4.0", json!({"mtu": 100}))).unwrap_err();
    let r = Reply::new(Err(err), Some(cni::Version::V0_4_0));
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["code"], 7);
    assert_eq!(v["cniVersion"], "0.4.0");
    assert!(v["msg"].as_str().unwrap().contains("mtu"));
}

#[test]
fn the_agent_gets_the_deadline_less_the_reserve_for_local_work() {
    let t0 = Instant::now();
    let call = Deadline::new(t0, CALL_BUDGET);
    let agent = call.reserving(LOCAL_WORK_RESERVE).at();

    // ADD: the agent's share, then the release after a failed wiring gets what is left
    let mut fake = Fake::new()
        .answer(Response::Added {
            allocation: alloc(POD_IP, 254),
            existing: false,
        })
        .answer(Response::Deleted { released: None });
    fake.setup_error = Some(eth0_exists);
    run_by(vars("ADD"), &conf("1.0.0", json!({})), &fake, call).unwrap_err();
    assert_eq!(*fake.deadlines.borrow(), vec![agent, call.at()]);

    let fake = Fake::new().answer(Response::Deleted { released: None });
    run_by(vars("DEL"), &conf("1.0.0", json!({})), &fake, call).unwrap();
    assert_eq!(*fake.deadlines.borrow(), vec![agent]);

    let c = conf("1.0.0", json!({"prevResult": prev_result("10.99.0.7")}));
    let fake = Fake::new().answer(Response::Checked {
        allocation: alloc(POD_IP, 2),
    });
    run_by(vars("CHECK"), &c, &fake, call).unwrap();
    assert_eq!(*fake.deadlines.borrow(), vec![agent]);

    let c = conf("1.1.0", json!({"cni.dev/valid-attachments": []}));
    let fake = Fake::new().answer(Response::Collected { released: vec![] });
    run_by(vars("GC"), &c, &fake, call).unwrap();
    assert_eq!(*fake.deadlines.borrow(), vec![agent]);

    // STATUS: nothing follows the answer, the whole (shorter) budget is the agent's
    let status = Deadline::new(t0, STATUS_BUDGET);
    let fake = Fake::new().answer(Response::Status(StatusReply {
        ready: true,
        message: "ok".into(),
        free_ips: 1,
        assigned_ips: 0,
    }));
    run_by(vars("STATUS"), &conf("1.1.0", json!({})), &fake, status).unwrap();
    assert_eq!(*fake.deadlines.borrow(), vec![status.at()]);
}

#[test]
fn an_agent_out_of_time_is_code_104_and_del_still_tears_down() {
    let mut fake = Fake::new();
    fake.agent_hangs = true;
    let e = run(vars("ADD"), &conf("1.0.0", json!({})), &fake)
        .unwrap_err()
        .to_cni();
    assert_eq!(e.code, 104);
    assert!(e.msg.contains("did not answer in time"), "{e}");
    assert!(fake.setups.borrow().is_empty());

    let c = conf("1.0.0", json!({"prevResult": prev_result("10.99.0.9")}));
    assert_eq!(run(vars("DEL"), &c, &fake).unwrap(), None);
    assert_eq!(
        fake.teardowns.borrow()[0].ip,
        Some(Ipv4Addr::new(10, 99, 0, 9))
    );

    let e = run(vars("STATUS"), &conf("1.1.0", json!({})), &fake)
        .unwrap_err()
        .to_cni();
    assert_eq!(e.code, 50);
    assert!(e.details.contains("did not answer in time"), "{e}");
}

#[test]
fn codes_the_agent_may_not_send_are_an_agent_protocol_error() {
    for (verb, version) in [("ADD", "1.0.0"), ("DEL", "1.0.0"), ("GC", "1.1.0")] {
        let fake = Fake::new().answer(Response::Error {
            code: u32::MAX,
            message: "garbage".into(),
        });
        let c = conf(version, json!({"cni.dev/valid-attachments": []}));
        let e = run(vars(verb), &c, &fake).unwrap_err().to_cni();
        assert_eq!(e.code, 103, "{verb}: {e}");
        assert!(e.msg.contains("4294967295"), "{verb}: {e}");
        assert!(e.details.contains("garbage"), "{verb}: {e}");
    }
    // a valid one passes
    let fake = Fake::new().answer(Response::Error {
        code: 5,
        message: "checkpoint".into(),
    });
    assert_eq!(code(run(vars("ADD"), &conf("1.0.0", json!({})), &fake)), 5);
    // and a reply that does not fit the request is one too
    let fake = Fake::new().answer(Response::Deleted { released: None });
    assert_eq!(
        code(run(vars("ADD"), &conf("1.0.0", json!({})), &fake)),
        103
    );
}

#[test]
fn gc_stops_tearing_down_at_the_deadline_and_says_what_is_left() {
    let gone = |c: &str| AttachmentKey {
        network: "vpc-cni".into(),
        container_id: c.into(),
        ifname: "eth0".into(),
    };
    let fake = Fake::new().answer(Response::Collected {
        released: vec![
            (gone("a"), Ipv4Addr::new(10, 99, 0, 3)),
            (gone("b"), Ipv4Addr::new(10, 99, 0, 4)),
        ],
    });
    let c = conf("1.1.0", json!({"cni.dev/valid-attachments": []}));
    let past = Deadline::new(Instant::now(), Duration::ZERO);
    let e = run_by(vars("GC"), &c, &fake, past).unwrap_err().to_cni();
    assert_eq!(e.code, 102);
    assert!(
        e.details.contains("vpc-cni/a/eth0 (10.99.0.3)")
            && e.details.contains("vpc-cni/b/eth0 (10.99.0.4)")
            && e.details.contains("deadline"),
        "{e}"
    );
    assert!(fake.teardowns.borrow().is_empty());
}
