//! The lab without agents: bring-up, the AWS-like fabric (ARP by the fabric, src/dst check,
//! internet gateway), IMDS and the EC2 relay inside an instance, ENI hot-plug driven by EC2,
//! a hand-made pod like the seed's, and a `down` that leaves nothing behind.
//! Needs root: ignored without it (`make test` runs it as root with --include-ignored).

mod common;

use std::time::{Duration, Instant};

use common::*;

fn world() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(lab::paths::world_file()).expect("world.json"))
        .expect("world.json is JSON")
}

fn eni<'a>(w: &'a serde_json::Value, inst: &str, dev: u64) -> &'a serde_json::Value {
    w["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == inst)
        .unwrap_or_else(|| panic!("no {inst} in world"))["enis"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["device_index"] == dev)
        .unwrap_or_else(|| panic!("no eth{dev} on {inst}"))
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn src_drops_i1e0() -> u64 {
    let o = lab(&[
        "exec", "fabric", "--", "nft", "list", "chain", "bridge", "vpclab", "src_i1e0",
    ]);
    let s = stdout(&o);
    let line = s
        .lines()
        .find(|l| l.contains("counter packets"))
        .expect("src-check rule for i1e0");
    let n = line
        .split("counter packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("counter");
    n.parse().unwrap()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "root: brings up the lab (network namespaces)"]
fn fabric_without_agents() {
    testkit::require_root();
    let _serial = serial();
    let _down = Down;
    let t = Instant::now();
    lab_ok(&["up", "--no-agents"]);
    eprintln!("bring-up without agents: {:?}", t.elapsed());
    let pids = lab_pids();
    assert_eq!(pids.len(), 2, "moto and the daemon have pid files");
    assert_root_untouched();
    let w = world();
    let i1_eth0_mac = eni(&w, "instance1", 0)["mac"].as_str().unwrap().to_string();
    let i1_eth1_mac = eni(&w, "instance1", 1)["mac"].as_str().unwrap().to_string();

    // Instances reach each other, the other subnet, and the internet (primary IPs only).
    assert!(
        sh("instance2", "ping -c1 -W2 172.31.15.228")
            .status
            .success()
    );
    assert!(
        sh("instance1", "ping -c1 -W2 172.31.16.10")
            .status
            .success()
    );
    let who = sh("instance1", "exec 3<>/dev/tcp/203.0.113.10/8080; cat <&3");
    assert_eq!(
        stdout(&who).trim(),
        "172.31.15.228",
        "whoami sees instance1's primary IP"
    );
    let who = sh("vpc-host", "exec 3<>/dev/tcp/203.0.113.10/8080; cat <&3");
    assert_eq!(stdout(&who).trim(), "172.31.16.10");

    // ARP is answered by the fabric with the owning ENI's MAC: the seed's step 4.2 (an
    // unbound secondary IP of eth1 resolves to eth1's MAC), and no ARP flux for eth0's IP.
    let _ = sh(
        "instance2",
        "ip neigh flush all; ping -c1 -W1 172.31.13.130",
    );
    let n = stdout(&sh("instance2", "ip neigh show 172.31.13.130"));
    assert!(
        n.contains(&i1_eth1_mac),
        "172.31.13.130 -> eth1 MAC {i1_eth1_mac}: {n}"
    );
    assert!(
        sh("instance2", "ping -c1 -W2 172.31.15.228")
            .status
            .success()
    );
    let n = stdout(&sh("instance2", "ip neigh show 172.31.15.228"));
    assert!(
        n.contains(&i1_eth0_mac),
        "172.31.15.228 -> eth0 MAC {i1_eth0_mac}: {n}"
    );

    // IMDSv2 and the EC2 relay inside the instance namespace.
    let id = stdout(&sh(
        "instance1",
        "T=$(curl -sf -X PUT -H 'x-aws-ec2-metadata-token-ttl-seconds: 60' http://127.0.0.1:1338/latest/api/token) && \
         curl -sf -H \"x-aws-ec2-metadata-token: $T\" http://127.0.0.1:1338/latest/meta-data/instance-id",
    ));
    let want_id = w["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "instance1")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(id.trim(), want_id);
    let code = stdout(&sh(
        "instance1",
        "curl -s -o /dev/null -w '%{http_code}' 'http://127.0.0.1:1339/?Action=DescribeRegions&Version=2016-11-15'",
    ));
    assert!(
        !code.starts_with('0') && !code.is_empty(),
        "EC2 relay answers HTTP: {code:?}"
    );

    // A hand-made pod on eth1's secondary IP, wired like the seed (and the test-infra script).
    let pod = "vpclab-pod-instance1-test-hand";
    assert!(
        std::process::Command::new("ip")
            .args(["netns", "add", pod])
            .status()
            .unwrap()
            .success()
    );
    let setup = format!(
        "set -e
         sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.eth0.rp_filter=2
         ip addr add 172.31.3.173/20 dev eth1; ip link set eth1 up
         ip route del 172.31.0.0/20 dev eth1
         ip route add 172.31.0.1 dev eth1 scope link table 2
         ip route add default via 172.31.0.1 dev eth1 table 2
         ip link add vhand type veth peer name eth0 netns {pod}
         ip link set vhand up
         ip route add 172.31.13.130/32 dev vhand scope link
         ip rule add from 172.31.13.130 lookup 2 pref 1536"
    );
    assert!(sh("instance1", &setup).status.success());
    let vmac = stdout(&sh(
        "instance1",
        "ip -br link show vhand | awk '{print $3}'",
    ));
    let vmac = vmac.lines().last().unwrap_or("").trim().to_string();
    let pod_setup = format!(
        "set -e; ip link set lo up; ip addr add 172.31.13.130/32 dev eth0; ip link set eth0 up
         ip route add 172.31.0.1 dev eth0 scope link; ip route add default via 172.31.0.1 dev eth0
         ip neigh add 172.31.0.1 lladdr {vmac} dev eth0 nud permanent"
    );
    assert!(sh(pod, &pod_setup).status.success());
    assert!(
        sh("instance2", "ping -c1 -W2 172.31.13.130")
            .status
            .success(),
        "instance2 -> hand pod"
    );
    assert!(
        sh(pod, "ping -c1 -W2 172.31.3.123").status.success(),
        "hand pod -> instance2"
    );
    // Without the from-pod rule the pod's packets leave eth0 with eth1's address: the fabric's
    // source check drops them, as EC2 does.
    let before = src_drops_i1e0();
    assert!(
        sh(
            "instance1",
            "ip rule del from 172.31.13.130 lookup 2 pref 1536"
        )
        .status
        .success()
    );
    assert!(
        !sh(pod, "ping -c1 -W1 172.31.3.123").status.success(),
        "must fail without the rule"
    );
    assert!(
        src_drops_i1e0() > before,
        "the source check counted the drop"
    );
    // Un-SNATed pod traffic to the internet is dropped by the IGW (no mapping).
    assert!(
        !sh(pod, "timeout 3 sh -c 'exec 3<>/dev/tcp/203.0.113.10/8080'")
            .status
            .success()
    );

    // Hot-plug: EC2 attaches an ENI to instance2 -> eth1 with its MAC appears; detach -> gone.
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lab::paths::state_file()).unwrap()).unwrap();
    let endpoint = format!("http://{}", state["moto"].as_str().unwrap());
    let region = w["region"].as_str().unwrap().to_string();
    let subnet = eni(&w, "instance2", 0)["subnet_id"]
        .as_str()
        .unwrap()
        .to_string();
    let i2_id = w["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "instance2")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ec2 = cloud::Ec2::for_endpoint(&endpoint, &region);

    // A secondary IP assigned later: the fabric answers ARP for it with the ENI's MAC, and the
    // update keeps the source-check counters (only the address sets change).
    let drops = src_drops_i1e0();
    assert!(drops > 0);
    let i2_eni = eni(&w, "instance2", 0)["id"].as_str().unwrap().to_string();
    let i2_mac = eni(&w, "instance2", 0)["mac"]
        .as_str()
        .unwrap()
        .to_lowercase();
    rt.block_on(async {
        ec2.assign_private_ip_addresses(
            &i2_eni,
            &cloud::IpRequest::Addresses(vec!["172.31.3.200".parse().unwrap()]),
        )
        .await
        .expect("AssignPrivateIpAddresses");
    });
    wait_for("the fabric to answer ARP for 172.31.3.200", || {
        let _ = sh("instance1", "ping -c1 -W1 172.31.3.200");
        stdout(&sh("instance1", "ip neigh show 172.31.3.200")).contains(&i2_mac)
    });
    assert!(
        src_drops_i1e0() >= drops,
        "counters survive an address change"
    );
    let (eni_id, mac, attachment) = rt.block_on(async {
        let e = ec2
            .create_network_interface(&cloud::NewEni {
                subnet_id: subnet.clone(),
                private_ip: Some("172.31.7.7".parse().unwrap()),
                ..Default::default()
            })
            .await
            .expect("CreateNetworkInterface");
        let a = ec2
            .attach_network_interface(&e.id, &i2_id, 1)
            .await
            .expect("AttachNetworkInterface");
        (e.id, e.mac, a)
    });
    wait_for("eth1 to appear in instance2", || {
        stdout(&sh("instance2", "ip -br link show eth1")).contains(&mac.to_lowercase())
    });
    // The fabric knows the new ENI: it answers ARP for its address with its MAC.
    wait_for("the fabric to answer ARP for 172.31.7.7", || {
        let _ = sh("instance1", "ping -c1 -W1 172.31.7.7");
        stdout(&sh("instance1", "ip neigh show 172.31.7.7")).contains(&mac.to_lowercase())
    });
    rt.block_on(async {
        ec2.detach_network_interface(&attachment, false)
            .await
            .expect("DetachNetworkInterface");
    });
    wait_for("eth1 to disappear from instance2", || {
        !sh("instance2", "ip link show eth1").status.success()
    });
    eprintln!("hot-plug of {eni_id} ok");

    down_and_assert_clean(&pids);
}
