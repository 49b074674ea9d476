//! vpcctl over documents the agent's own code writes: a pool built with `ipam` and
//! `agent::state::State`, served by `agent::http`'s introspection router on loopback, read by
//! vpcctl's client and shown by its `status`, `enis`, `pods` and `why`. A change of the
//! agent's shapes breaks these tests. No root needed.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use agent::health::Health;
use agent::http::{Counters, Endpoints, Shared};
use agent::state::State;
use ipam::planner::Limits;
use ipam::{EniInfo, Pool};
use vpcctl::client::{Client, parse_state};
use vpcctl::doc::{Enis, StateAnswer};
use vpcctl::show::{self, ProbeAnswers};
use vpcctl::why::{PodName, Verdict, why};

/// One node's agent state, in memory.
struct Node {
    shared: Shared,
    endpoints: Arc<Endpoints>,
    health: Arc<Health>,
    _dir: tempfile::TempDir,
}

const LIMIT: &str = "node at its limit of 4 pod IPs: 2 ENIs × 2 secondary IPs for t3.micro";

/// ENIs eni-0 (device 0, `10.0.0.11`, `.12`) and eni-1 (device 1, `10.0.1.11`, `.12`),
/// cooldown 30 s. With provisioning: limits 2 ENIs × 2 IPs, max pods 10 (a full pool is at
/// its limit).
fn node(provisioning: bool, env: &[(&str, &str)]) -> Node {
    let mut pool = Pool::new(30_000);
    for (dev, net) in [(0u32, 0u8), (1, 1)] {
        pool.add_eni(
            EniInfo {
                id: format!("eni-{dev}"),
                device_number: dev,
                subnet: "10.0.0.0/16".parse().unwrap(),
                primary_ip: Ipv4Addr::new(10, 0, net, 10),
            },
            &[Ipv4Addr::new(10, 0, net, 11), Ipv4Addr::new(10, 0, net, 12)],
        )
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut st = State::new(pool, vec![], dir.path().join("ipam.json"), String::new());
    if provisioning {
        st.capacity = Some((4, LIMIT.into()));
    }
    let shared = Shared {
        state: Arc::new(Mutex::new(st)),
        counters: Arc::new(Counters::default()),
        ec2: None,
        limits: provisioning.then_some(Limits {
            max_enis: 2,
            ips_per_eni: 2,
            max_pods: 10,
        }),
    };
    let mut vars: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    vars.insert(
        "DISABLE_NETWORK_RESOURCE_PROVISIONING".into(),
        (!provisioning).to_string(),
    );
    let cfg = agent::config::from_env(&vars).unwrap();
    let health = Arc::new(Health::new());
    let endpoints = Arc::new(Endpoints::new(&cfg, health.clone()));
    endpoints.set_shared(shared.clone());
    health.serving();
    Node {
        shared,
        endpoints,
        health,
        _dir: dir,
    }
}

fn key(container: &str) -> proto::AttachmentKey {
    proto::AttachmentKey {
        network: "vpc-cni".into(),
        container_id: container.into(),
        ifname: "eth0".into(),
    }
}

impl Node {
    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }

    /// ADD `namespace/name` in container `container`; the address it got, if any.
    fn add(&self, pod: &str, container: &str) -> Option<Ipv4Addr> {
        let (ns, name) = pod.split_once('/').unwrap();
        match self.st().handle(proto::Request::Add {
            key: key(container),
            pod: proto::PodRef {
                namespace: ns.into(),
                name: name.into(),
                infra_container_id: None,
            },
            netns: String::new(),
        }) {
            proto::Response::Added { allocation, .. } => Some(allocation.ip),
            _ => None,
        }
    }

    fn del(&self, container: &str) {
        self.st().handle(proto::Request::Del {
            key: key(container),
        });
    }

    /// `/v1/state` as the agent writes it, read by vpcctl.
    fn state(&self) -> StateAnswer {
        let doc = agent::http::state_document(&self.endpoints, &self.shared);
        parse_state(200, &serde_json::to_string(&doc).unwrap())
            .unwrap_or_else(|e| panic!("vpcctl cannot read the agent's /v1/state: {e:?}\n{doc:#}"))
    }

    fn enis(&self) -> Enis {
        let doc = agent::http::enis(&self.shared);
        serde_json::from_value(doc.clone())
            .unwrap_or_else(|e| panic!("vpcctl cannot read the agent's /v1/enis: {e}\n{doc:#}"))
    }

    fn why(&self, pod: &str) -> Verdict {
        let v = why(&pod.parse::<PodName>().unwrap(), &self.state());
        eprintln!("$ vpcctl why {pod} -> {}\n{}", v.has_address, v.text);
        v
    }
}

fn known(a: StateAnswer) -> Box<vpcctl::doc::State> {
    match a {
        StateAnswer::Known(s) => s,
        StateAnswer::Starting(w) => panic!("starting: {w}"),
    }
}

#[track_caller]
fn says(text: &str, want: &str) {
    assert!(text.contains(want), "{want:?} not in:\n{text}");
}

#[test]
fn a_running_pod_has_its_address_named() {
    let n = node(true, &[]);
    let ip = n.add("default/web-0", "c0ffee0123456789").unwrap();
    let v = n.why("default/web-0");
    assert!(v.has_address);
    says(
        &v.text,
        &format!("default/web-0 has {ip} on eni-0 (device 0), assigned "),
    );
    says(&v.text, "(container c0ffee012345, interface eth0)");

    let s = known(n.state());
    let pods = show::pods(&s);
    eprintln!("{pods}");
    says(&pods, "POD            CONTAINER     IF    IP");
    says(
        &pods,
        &format!("default/web-0  c0ffee012345  eth0  {ip}  eni-0  0"),
    );
    says(&pods, "1 pods with an address");
    assert!(!pods.contains("LOST"), "{pods}");

    let enis = show::enis(&n.enis());
    eprintln!("{enis}");
    says(
        &enis,
        "2 ENIs, 4 addresses: 1 assigned, 0 cooling, 3 available",
    );
    says(
        &enis,
        "eni-0  device 0 (primary)  subnet 10.0.0.0/16  primary IP 10.0.0.10  route table 254",
    );
    says(
        &enis,
        "eni-1  device 1  subnet 10.0.0.0/16  primary IP 10.0.1.10  route table 2",
    );
    says(
        &enis,
        &format!("  {ip}  assigned   default/web-0 (c0ffee012345)"),
    );
    says(&enis, "  10.0.1.12  available");
}

#[test]
fn status_shows_counts_targets_limits_and_probes() {
    let n = node(
        true,
        &[("WARM_IP_TARGET", "2"), ("IP_COOLDOWN_PERIOD", "30")],
    );
    n.add("default/a", "ca").unwrap();
    n.add("default/b", "cb").unwrap();
    n.del("cb");
    n.st().pending = 3;
    n.st().blocker = Some("subnet subnet-1 has no free addresses (EC2: x)".into());
    let probes = ProbeAnswers {
        livez: Ok(()),
        readyz: Ok(()),
    };
    let text = show::status("http://127.0.0.1:61679", &probes, &n.state());
    eprintln!("{text}");
    for want in [
        "agent           http://127.0.0.1:61679",
        "livez           ok",
        "readyz          ok",
        "pool            2 ENIs, 4 addresses: 1 assigned, 1 cooling, 2 available; 0 lost",
        "cooldown        30s (IP_COOLDOWN_PERIOD); 1 cooling, all free within 30s",
        "warm targets    WARM_ENI_TARGET=1 WARM_IP_TARGET=2 MINIMUM_IP_TARGET=unset",
        "provisioning    on (EC2)",
        "limits          2 ENIs × 2 IPs = 4 addresses, max pods 10; holds 4 addresses: at its limit",
        "pending         3 ADDs waiting for an address",
        "blocker         subnet subnet-1 has no free addresses (EC2: x)",
        "ec2 refused     none",
        "reconcile       0 done",
        "drift           lost 0 (none), free removed 0, ENIs detached 0, adopted 0, relisted 0",
        "eni operations  none",
        "ec2 errors      0 throttled, 0 failed",
        "ec2 calls       none",
        "checkpoint      0 write failures",
    ] {
        says(&text, want);
    }
    // A failing probe is shown with its reason.
    let probes = ProbeAnswers {
        livez: Ok(()),
        readyz: Err("no address available: x".into()),
    };
    assert!(!probes.ok());
    says(
        &show::status("u", &probes, &n.state()),
        "readyz          failing: no address available: x",
    );
    // Starting: the pool is not known, the reason is.
    let text = show::status(
        "u",
        &probes,
        &StateAnswer::Starting("conflist not written yet: x (for 1s)".into()),
    );
    says(
        &text,
        "pool    not known yet: conflist not written yet: x (for 1s)",
    );
}

#[test]
fn a_full_node_at_its_limit_says_so() {
    let n = node(true, &[]);
    for i in 0..4 {
        n.add(&format!("default/p{i}"), &format!("c{i}")).unwrap();
    }
    assert_eq!(n.add("default/p4", "c4"), None, "refused: the node is full");
    let v = n.why("default/p4");
    assert!(!v.has_address);
    says(
        &v.text,
        "The agent holds no address for default/p4: no pod of that name is assigned one, and none was lost.",
    );
    says(
        &v.text,
        "An ADD for it now would get no address (2 ENIs, 4 addresses: 4 assigned, 0 cooling, 0 available):",
    );
    says(&v.text, "- no free address: all 4 are assigned to pods");
    says(&v.text, &format!("- the node is at its limit: {LIMIT}"));
    // The refused ADD left a pending request, and the state says so.
    says(
        &v.text,
        "- the provisioner is requesting more: 1 ADDs are waiting for an address",
    );
    assert!(!v.text.contains("provisioning is off"), "{}", v.text);
    assert!(
        !v.text.contains("not ready"),
        "a full node is ready: {}",
        v.text
    );

    // The provisioner's blocker says the limit too: said once.
    n.st().blocker = Some(LIMIT.into());
    n.st().pending = 0;
    let v = n.why("default/p4");
    assert_eq!(v.text.matches(LIMIT).count(), 1, "{}", v.text);
    assert!(!v.text.contains("requesting more"), "{}", v.text);

    // A pod that goes: its address cools down, and the answer says for how long.
    n.del("c0");
    let v = n.why("default/p4");
    says(
        &v.text,
        "- no free address: 3 assigned, 1 cooling for up to 30s (IP_COOLDOWN_PERIOD is 30s)",
    );
    let enis = show::enis(&n.enis());
    says(&enis, "  10.0.0.11  cooling   30s left");

    // Two cooling, 4 s apart: when the first is free, too.
    n.del("c1");
    let mut s = known(n.state());
    assert_eq!(s.cooling.len(), 2);
    s.cooling[0].left_ms -= 4_000;
    let reasons = vpcctl::why::no_address(&s);
    assert_eq!(
        reasons[0],
        "no free address: 2 assigned, 2 cooling for up to 30s (IP_COOLDOWN_PERIOD is 30s; the \
         first is free in 26s)"
    );
}

#[test]
fn provisioning_off_on_a_full_pool_says_so() {
    let n = node(false, &[]);
    for i in 0..4 {
        n.add(&format!("kube-system/p{i}"), &format!("c{i}"))
            .unwrap();
    }
    let v = n.why("default/late");
    assert!(!v.has_address);
    says(&v.text, "- no free address: all 4 are assigned to pods");
    says(
        &v.text,
        "- provisioning is off (DISABLE_NETWORK_RESOURCE_PROVISIONING=true or ENABLE_IMDS_ONLY_MODE=true): the agent adds no address",
    );
    assert!(
        !v.text.contains("limit"),
        "no limits without EC2: {}",
        v.text
    );
    let s = known(n.state());
    assert!(!s.provisioning);
    assert_eq!(s.limits, None);
    let text = show::status(
        "u",
        &ProbeAnswers {
            livez: Ok(()),
            readyz: Ok(()),
        },
        &n.state(),
    );
    says(&text, "limits          not known (provisioning off)");
    says(
        &text,
        "provisioning    off (DISABLE_NETWORK_RESOURCE_PROVISIONING",
    );
}

#[test]
fn ec2_refusing_below_the_limit_makes_the_agent_unready_and_says_why() {
    let n = node(true, &[]);
    // Two of the four slots: the node has room (capacity 6 now).
    n.st().capacity = Some((6, "node at its limit of 6".into()));
    let mut n = n;
    n.shared.limits = Some(Limits {
        max_enis: 3,
        ips_per_eni: 2,
        max_pods: 10,
    });
    for i in 0..4 {
        n.add(&format!("default/p{i}"), &format!("c{i}")).unwrap();
    }
    n.health.record_growth(Err(&cloud::CloudError::Ec2 {
        call: "AssignPrivateIpAddresses",
        code: Some("UnauthorizedOperation".into()),
        message: "You are not authorized to perform this operation.".into(),
    }));
    let v = n.why("default/p9");
    let refusal = "EC2 refused AssignPrivateIpAddresses: UnauthorizedOperation: You are not authorized to perform this operation.";
    says(
        &v.text,
        "- the node holds 4 of the 6 addresses it may have (3 ENIs × 2 secondary IPs): below its limit",
    );
    says(
        &v.text,
        &format!("- EC2 refused the last request for addresses: {refusal}"),
    );
    says(
        &v.text,
        &format!("- the agent is not ready: no address available: {refusal}"),
    );
}

#[test]
fn a_lost_address_says_why_and_when() {
    let n = node(true, &[]);
    let ip = n.add("default/web-0", "c1").unwrap();
    {
        let mut st = n.st();
        let now = st.now();
        st.pool_mut().detach_eni("eni-0", now).unwrap();
    }
    let v = n.why("default/web-0");
    assert!(!v.has_address);
    says(
        &v.text,
        &format!("default/web-0 has no working address: {ip} (on eni-0) was lost "),
    );
    says(
        &v.text,
        &format!("(eni_detached): {}.", ipam::LostReason::EniDetached),
    );
    says(
        &v.text,
        "stays blocked until the pod (container c1) is deleted",
    );
    let pods = show::pods(&known(n.state()));
    eprintln!("{pods}");
    says(&pods, "0 pods with an address");
    says(&pods, "LOST POD       CONTAINER  IP");
    says(&pods, &format!("default/web-0  c1         {ip}  eni-0"));
    says(&pods, "eni_detached: its ENI is no longer attached");
}

#[test]
fn an_unknown_pod_on_a_node_with_free_addresses() {
    let n = node(true, &[]);
    n.add("default/web-0", "c1").unwrap();
    let v = n.why("default/web-1");
    assert!(!v.has_address);
    says(
        &v.text,
        "An ADD for it now would get one: 3 of the node's 4 addresses are available.",
    );
    assert_eq!(v.text.lines().count(), 2, "{}", v.text);
}

/// Free port on loopback (bound, then released for the agent's listener).
fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// The agent's introspection listener (its real router) on loopback, in a runtime of its
/// own; `None` for the pool: the agent is starting.
fn serve(endpoints: Arc<Endpoints>) -> (SocketAddr, tokio::runtime::Runtime) {
    let addr = free_port();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.spawn(agent::http::serve_introspection(addr, endpoints));
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return (addr, rt);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("the introspection listener did not start on {addr}");
}

#[test]
fn over_the_wire_from_the_agents_router() {
    let n = node(true, &[]);
    let ip = n.add("default/web-0", "c1").unwrap();
    let (addr, _rt) = serve(n.endpoints.clone());
    let c = Client::new(&format!("http://{addr}"));
    let (raw, state) = c.state().unwrap();
    assert!(raw.contains("\"probes\""), "{raw}");
    let v = why(&"default/web-0".parse().unwrap(), &state);
    assert!(v.has_address);
    says(&v.text, &ip.to_string());
    let (_, enis) = c.enis().unwrap();
    assert_eq!(enis.assigned_ips, 1);
    assert_eq!(c.probe("/readyz").unwrap(), Ok(()));
    assert_eq!(c.probe("/livez").unwrap(), Ok(()));

    // The binary itself: output and exit codes.
    let bin = env!("CARGO_BIN_EXE_vpcctl");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(args)
            .env("VPCCTL_AGENT", format!("http://{addr}"))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&["why", "default/web-0"]);
    assert_eq!(code, Some(0), "{out}");
    says(&out, &format!("default/web-0 has {ip} on eni-0"));
    let (code, out, _) = run(&["why", "default/nope"]);
    assert_eq!(code, Some(1), "{out}");
    says(&out, "An ADD for it now would get one");
    let (code, out, _) = run(&["status"]);
    assert_eq!(code, Some(0), "{out}");
    says(&out, "readyz          ok");
    let (code, out, _) = run(&["--json", "enis"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["assignedIPs"], 1);
    let (code, out, _) = run(&["pods", "--json"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["pods"][0]["pod"], "web-0");
    let (code, _, err) = run(&["why", "web-0"]);
    assert_eq!(code, Some(2), "{err}");
    says(&err, "is not <namespace>/<name>");
    // No agent there: exit 2, the URL and what to check.
    let gone = free_port();
    let out = std::process::Command::new(bin)
        .args(["--agent", &format!("http://{gone}"), "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    says(
        &err,
        &format!("vpcctl: http://{gone}/v1/state: no answer from the agent"),
    );
    says(&err, "DISABLE_INTROSPECTION");
}

#[test]
fn a_starting_agent_over_the_wire() {
    let vars = HashMap::new();
    let cfg = agent::config::from_env(&vars).unwrap();
    let health = Arc::new(Health::new());
    health.step("restoring the pool");
    let endpoints = Arc::new(Endpoints::new(&cfg, health));
    let (addr, _rt) = serve(endpoints);
    let bin = env!("CARGO_BIN_EXE_vpcctl");
    let out = std::process::Command::new(bin)
        .args(["--agent", &format!("http://{addr}"), "status"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert_eq!(out.status.code(), Some(1), "not ready: {text}");
    says(&text, "livez   ok");
    says(
        &text,
        "readyz  failing: conflist not written yet: restoring the pool (for ",
    );
    says(
        &text,
        "pool    not known yet: conflist not written yet: restoring the pool",
    );
    let out = std::process::Command::new(bin)
        .args(["--agent", &format!("http://{addr}"), "why", "default/web-0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    says(
        &String::from_utf8_lossy(&out.stdout),
        "the agent is not ready: conflist not written yet: restoring the pool",
    );
}
