//! The IPv4 prefix calls against a scripted EC2 endpoint: what goes on the wire (EC2's Query
//! parameters) and how the answers are read. moto has no prefixes at all; the calls against the
//! lab's EC2 proxy in front of moto are tested in `lab-aws`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use cloud::{Ec2, NewEni};
use ipnet::Ipv4Net;

type Requests = Arc<Mutex<Vec<BTreeMap<String, String>>>>;

const NS: &str = "xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\"";

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

/// One ENI as EC2 describes it, holding `prefixes`.
fn eni_xml(tag: &str, prefixes: &[&str]) -> String {
    let set: String = prefixes
        .iter()
        .map(|p| format!("<item><ipv4Prefix>{p}</ipv4Prefix></item>"))
        .collect();
    format!(
        "<{tag}><networkInterfaceId>eni-1</networkInterfaceId><subnetId>subnet-1</subnetId>\
         <vpcId>vpc-1</vpcId><macAddress>02:00:00:00:00:01</macAddress><status>in-use</status>\
         <privateIpAddress>10.0.0.10</privateIpAddress><privateIpAddressesSet><item>\
         <privateIpAddress>10.0.0.10</privateIpAddress><primary>true</primary></item>\
         </privateIpAddressesSet><ipv4PrefixSet>{set}</ipv4PrefixSet></{tag}>"
    )
}

/// Answers like EC2 for an ENI that holds 10.0.0.16/28; records every request's parameters.
async fn ec2(State(seen): State<Requests>, body: Bytes) -> (StatusCode, String) {
    let q: BTreeMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    seen.lock().unwrap().push(q.clone());
    let action = q.get("Action").cloned().unwrap_or_default();
    let ok = |inner: String| {
        (
            StatusCode::OK,
            format!("<{action}Response {NS}><requestId>r-1</requestId>{inner}</{action}Response>"),
        )
    };
    match action.as_str() {
        "DescribeNetworkInterfaces" => ok(format!(
            "<networkInterfaceSet>{}</networkInterfaceSet>",
            eni_xml("item", &["10.0.0.16/28"])
        )),
        "AssignPrivateIpAddresses" if q.get("Ipv4PrefixCount").map(String::as_str) == Some("9") => (
            StatusCode::BAD_REQUEST,
            "<Response><Errors><Error><Code>InsufficientCidrBlocks</Code><Message>The specified \
             subnet does not have enough free cidr blocks to satisfy the request.</Message>\
             </Error></Errors><RequestID>r-2</RequestID></Response>"
                .into(),
        ),
        // Lists the prefix the ENI already had too, as an emulator might.
        "AssignPrivateIpAddresses" => ok("<networkInterfaceId>eni-1</networkInterfaceId>\
             <assignedIpv4PrefixSet><item><ipv4Prefix>10.0.0.16/28</ipv4Prefix></item>\
             <item><ipv4Prefix>10.0.0.32/28</ipv4Prefix></item>\
             <item><ipv4Prefix>10.0.0.64/28</ipv4Prefix></item></assignedIpv4PrefixSet>"
            .into()),
        "UnassignPrivateIpAddresses" => ok("<return>true</return>".into()),
        "CreateNetworkInterface" => ok(eni_xml("networkInterface", &["10.0.0.80/28"])),
        _ => (StatusCode::BAD_REQUEST, format!("unexpected {action}")),
    }
}

async fn endpoint() -> (Ec2, Requests, tokio::task::JoinHandle<()>) {
    let seen = Requests::default();
    let app = Router::new().fallback(ec2).with_state(seen.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(l, app).await.unwrap();
    });
    (
        Ec2::for_endpoint(&format!("http://{addr}"), "us-west-2"),
        seen,
        task,
    )
}

fn last(seen: &Requests, action: &str) -> BTreeMap<String, String> {
    seen.lock()
        .unwrap()
        .iter()
        .rev()
        .find(|q| q.get("Action").map(String::as_str) == Some(action))
        .cloned()
        .unwrap_or_else(|| panic!("no {action} request"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_are_assigned_listed_and_unassigned_with_ec2s_parameters() {
    let (ec2, seen, task) = endpoint().await;

    let eni = &ec2.describe_network_interfaces(&[], &[]).await.unwrap()[0];
    assert_eq!(eni.prefixes, [net("10.0.0.16/28")]);

    // Only the new prefixes, though the answer repeats the one the ENI had.
    let new = ec2.assign_ipv4_prefixes("eni-1", 2).await.unwrap();
    assert_eq!(new, [net("10.0.0.32/28"), net("10.0.0.64/28")]);
    let q = last(&seen, "AssignPrivateIpAddresses");
    assert_eq!(q.get("Ipv4PrefixCount").map(String::as_str), Some("2"));
    assert_eq!(
        q.get("NetworkInterfaceId").map(String::as_str),
        Some("eni-1")
    );
    assert!(
        !q.contains_key("SecondaryPrivateIpAddressCount") && !q.contains_key("Ipv4Prefix.1"),
        "{q:?}"
    );

    let err = ec2.assign_ipv4_prefixes("eni-1", 9).await.unwrap_err();
    assert!(err.is_insufficient_cidr_blocks(), "{err}");
    assert!(!err.is_throttling() && !err.is_not_found());
    assert!(
        err.to_string().contains("AssignPrivateIpAddresses")
            && err.to_string().contains("InsufficientCidrBlocks"),
        "{err}"
    );

    ec2.unassign_ipv4_prefixes("eni-1", &[net("10.0.0.32/28"), net("10.0.0.64/28")])
        .await
        .unwrap();
    let q = last(&seen, "UnassignPrivateIpAddresses");
    assert_eq!(
        q.get("Ipv4Prefix.1").map(String::as_str),
        Some("10.0.0.32/28")
    );
    assert_eq!(
        q.get("Ipv4Prefix.2").map(String::as_str),
        Some("10.0.0.64/28")
    );
    assert!(!q.contains_key("PrivateIpAddress.1"), "{q:?}");

    let spec = NewEni {
        subnet_id: "subnet-1".into(),
        ..Default::default()
    };
    let created = ec2
        .create_network_interface_with_prefixes(&spec, 1)
        .await
        .unwrap();
    assert_eq!(created.prefixes, [net("10.0.0.80/28")]);
    let q = last(&seen, "CreateNetworkInterface");
    assert_eq!(q.get("Ipv4PrefixCount").map(String::as_str), Some("1"));
    assert!(!q.contains_key("SecondaryPrivateIpAddressCount"), "{q:?}");
    // Without prefixes the request carries no prefix parameter at all.
    ec2.create_network_interface(&spec).await.unwrap();
    assert!(!last(&seen, "CreateNetworkInterface").contains_key("Ipv4PrefixCount"));

    // Refused before any request: nothing to ask for, or what EC2 would refuse.
    let before = seen.lock().unwrap().len();
    for err in [
        ec2.assign_ipv4_prefixes("eni-1", 0).await.unwrap_err(),
        ec2.unassign_ipv4_prefixes("eni-1", &[]).await.unwrap_err(),
        ec2.create_network_interface_with_prefixes(
            &NewEni {
                secondary_ip_count: 2,
                ..spec.clone()
            },
            1,
        )
        .await
        .unwrap_err(),
    ] {
        assert!(
            matches!(err, cloud::CloudError::InvalidArgument { .. }),
            "{err}"
        );
    }
    assert_eq!(seen.lock().unwrap().len(), before);
    task.abort();
}
