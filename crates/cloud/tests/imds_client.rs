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

/// Regression (found by `fuzz_imds_garbage_answers`): a MAC listing entry that is not a MAC
/// went into the next IMDS path, and the SDK's client panicked on the invalid URI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_mac_that_is_not_one_is_refused() {
    let macs = format!("{MD}/network/interfaces/macs/");
    for listing in ["02:00:00:00:00:0a/\n02:00 00:00:00:0b/", "é/", "../../x/"] {
        let mut t = two_enis();
        t.set(&macs, listing);
        let (addr, task) = serve(t).await;
        let md = ImdsMetadata::with_endpoint(&format!("http://{addr}")).unwrap();
        let got = tokio::spawn(async move { md.instance().await }).await;
        task.abort();
        let err = got.expect("no panic").unwrap_err();
        assert!(
            matches!(&err, CloudError::ImdsValue { path, .. } if *path == macs),
            "{err}"
        );
        assert!(err.to_string().contains("not a MAC address"), "{err}");
    }
}

#[test]
fn bad_endpoint_is_rejected_with_its_value() {
    let err = ImdsMetadata::with_endpoint("not a uri").unwrap_err();
    assert!(err.to_string().contains("not a uri"), "{err}");
}

mod fuzz {
    //! Property ("fuzz") test of the whole IMDS read against garbage answers: 64 cases in
    //! `cargo test` (each serves a fake IMDS), `PROPTEST_CASES=<n> cargo test -p cloud fuzz_`
    //! for more (docs/testing.md).

    use std::sync::LazyLock;

    use super::*;
    use proptest::prelude::*;
    use testkit::fuzz::config;

    static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    });

    /// Arbitrary text, text of the alphabet IMDS values use, or the real value with a few
    /// characters changed.
    fn garbage(real: String) -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,40}",
            "[0-9a-fA-F:./ \t\r\n%?#-]{0,40}",
            prop::collection::vec((any::<usize>(), any::<char>()), 1..4).prop_map(move |edits| {
                let mut c: Vec<char> = real.chars().collect();
                for (at, ch) in edits {
                    let at = at % c.len().max(1);
                    if at < c.len() {
                        c[at] = ch;
                    } else {
                        c.push(ch);
                    }
                }
                c.into_iter().collect()
            }),
        ]
    }

    /// One path of the two-ENI instance and a garbage answer for it.
    fn one_bad_answer() -> impl Strategy<Value = (String, String)> {
        let table = two_enis();
        let paths: Vec<String> = table.values.keys().cloned().collect();
        prop::sample::select(paths).prop_flat_map(move |path| {
            let real = table.values[&path].clone();
            (Just(path), garbage(real))
        })
    }

    proptest! {
        #![proptest_config(config(64))]

        /// IMDS answering garbage on any one path: the read returns (never panics), and a
        /// value it cannot parse is an error naming that path and that value.
        #[test]
        fn fuzz_imds_garbage_answers((path, value) in one_bad_answer()) {
            let mut t = two_enis();
            t.set(&path, &value);
            let got = RT.block_on(async {
                let (addr, task) = serve(t).await;
                let md = ImdsMetadata::with_endpoint(&format!("http://{addr}")).unwrap();
                let got = tokio::spawn(async move { md.instance().await }).await;
                task.abort();
                got
            });
            let got = match got {
                Ok(r) => r,
                Err(e) => return Err(TestCaseError::fail(format!("the read panicked: {e}"))),
            };
            match got {
                Ok(md) => prop_assert!(!md.enis.is_empty() || path.ends_with("/macs/")),
                Err(CloudError::ImdsValue { path: p, value: v, .. }) => {
                    prop_assert_eq!(&p, &path);
                    prop_assert!(value.contains(v.trim()), "{v:?} is not from {value:?}");
                }
                // another MAC listed: its required paths are missing
                Err(CloudError::Imds { .. }) => prop_assert!(path.ends_with("/macs/")),
                Err(e) => prop_assert!(false, "{e}"),
            }
        }
    }
}
