//! `cloud::ImdsMetadata` (the SDK's IMDS client) against a table-driven IMDSv2 fake.

mod common;

use std::net::Ipv4Addr;

use cloud::{CloudError, ImdsMetadata, Metadata};
use common::fake_imds::{serve, two_enis};

const MD: &str = "/latest/meta-data";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_identity_and_enis_sorted_by_device_number() {
    let (addr, task) = serve(two_enis()).await;
    let md = ImdsMetadata::with_endpoint(&format!("http://{addr}")).unwrap();
    let got = md.instance().await.unwrap();
    task.abort();

    assert_eq!(got.instance_id, "i-0abc");
    assert_eq!(got.instance_type, "m5.large");
    assert_eq!(got.region, "us-west-2");
    assert_eq!(got.availability_zone, "us-west-2a");
    assert_eq!(got.primary_mac, "02:00:00:00:00:0a");
    assert_eq!(got.local_ipv4, Ipv4Addr::new(172, 31, 15, 228));
    let devs: Vec<(u32, &str)> = got
        .enis
        .iter()
        .map(|e| (e.device_number, e.interface_id.as_str()))
        .collect();
    assert_eq!(devs, [(0, "eni-a"), (1, "eni-b")]);
    let [a, b] = got.enis.as_slice() else {
        unreachable!()
    };
    assert_eq!(a.primary_ip, Ipv4Addr::new(172, 31, 15, 228));
    assert_eq!(a.secondary_ips, [Ipv4Addr::new(172, 31, 5, 50)]);
    assert!(a.prefixes.is_empty(), "ipv4-prefix 404 means no prefixes");
    assert_eq!(a.security_groups, ["sg-1"]);
    assert_eq!(
        b.secondary_ips,
        [
            Ipv4Addr::new(172, 31, 13, 130),
            Ipv4Addr::new(172, 31, 11, 77)
        ]
    );
    assert_eq!(
        b.prefixes.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        ["172.31.8.0/28", "172.31.8.16/28"]
    );
    assert_eq!(b.security_groups, ["sg-1", "sg-2"]);
    assert_eq!(b.subnet_cidr.to_string(), "172.31.0.0/20");
    assert_eq!(b.vpc_cidrs.len(), 2);
    assert_eq!(
        (b.vpc_id.as_str(), b.subnet_id.as_str()),
        ("vpc-1", "subnet-a")
    );
    assert_eq!(got.primary_eni().unwrap().mac, "02:00:00:00:00:0a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_name_the_path() {
    let mac_b = format!("{MD}/network/interfaces/macs/02:00:00:00:00:0b");

    // A non-404 error status on a required path.
    let mut t = two_enis();
    t.statuses.insert(format!("{mac_b}/subnet-id"), 403);
    let (addr, task) = serve(t).await;
    let err = ImdsMetadata::with_endpoint(&format!("http://{addr}"))
        .unwrap()
        .instance()
        .await
        .unwrap_err();
    task.abort();
    assert!(
        matches!(&err, CloudError::Imds { path, .. } if path.ends_with("0b/subnet-id")),
        "{err}"
    );
    assert!(err.to_string().contains("403"), "{err}");

    // A required path that is missing (404).
    let mut t = two_enis();
    t.values.remove(&format!("{mac_b}/vpc-ipv4-cidr-blocks"));
    let (addr, task) = serve(t).await;
    let err = ImdsMetadata::with_endpoint(&format!("http://{addr}"))
        .unwrap()
        .instance()
        .await
        .unwrap_err();
    task.abort();
    assert!(
        err.to_string().contains("vpc-ipv4-cidr-blocks") && err.to_string().contains("404"),
        "{err}"
    );

    // A non-404 error on an optional path is an error too.
    let mut t = two_enis();
    t.statuses.insert(format!("{mac_b}/ipv4-prefix"), 403);
    let (addr, task) = serve(t).await;
    let err = ImdsMetadata::with_endpoint(&format!("http://{addr}"))
        .unwrap()
        .instance()
        .await
        .unwrap_err();
    task.abort();
    assert!(err.to_string().contains("ipv4-prefix"), "{err}");

    // Unparseable values.
    for (path, value, needle) in [
        (format!("{MD}/local-ipv4"), "172.31.15", "local-ipv4"),
        (format!("{mac_b}/device-number"), "one", "device-number"),
        (
            format!("{mac_b}/local-ipv4s"),
            "172.31.3.173\nnope",
            "local-ipv4s",
        ),
        (
            "/latest/dynamic/instance-identity/document".to_owned(),
            "{}",
            "instance-identity",
        ),
    ] {
        let mut t = two_enis();
        t.set(&path, value);
        let (addr, task) = serve(t).await;
        let err = ImdsMetadata::with_endpoint(&format!("http://{addr}"))
            .unwrap()
            .instance()
            .await
            .unwrap_err();
        task.abort();
        assert!(matches!(err, CloudError::ImdsValue { .. }), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
    }
}

#[test]
fn bad_endpoint_is_rejected_with_its_value() {
    let err = ImdsMetadata::with_endpoint("not a uri").unwrap_err();
    assert!(err.to_string().contains("not a uri"), "{err}");
}
