//! IMDS and EC2 endpoints that hang or answer garbage (issue 14, class 4): every call ends
//! within its bound with an error that names the call. (Garbage IMDS values: `imds_client.rs`;
//! a refused connection: `moto_ec2.rs`.) No moto needed.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use cloud::{CloudError, Ec2, ImdsMetadata, Metadata};
use common::fake_imds::{serve, two_enis};

const MD: &str = "/latest/meta-data";

/// A TCP endpoint that accepts connections, reads nothing and never answers.
async fn silent_endpoint() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

/// An HTTP endpoint answering every request with `status` and `body`.
async fn answering(
    status: StatusCode,
    body: &'static str,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let app = Router::new().fallback(move || async move { (status, body) });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(l, app).await.unwrap();
    });
    (addr, task)
}

/// Reads the instance from the IMDS at `addr`, which must fail; stops the endpoint's `task`.
/// Returns the error and how long the read took.
async fn imds_failure(
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
) -> (CloudError, Duration) {
    let t0 = Instant::now();
    let err = ImdsMetadata::with_endpoint(&format!("http://{addr}"))
        .unwrap()
        .instance()
        .await
        .unwrap_err();
    let took = t0.elapsed();
    task.abort();
    eprintln!("failed after {took:?}: {err}");
    (err, took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_imds_path_fails_within_seconds_naming_it() {
    let path = format!("{MD}/network/interfaces/macs/02:00:00:00:00:0b/subnet-id");
    let mut t = two_enis();
    t.hangs.insert(path.clone());
    let (addr, task) = serve(t).await;
    let (err, took) = imds_failure(addr, task).await;
    // The SDK's IMDS client: 1 s read timeout, timeouts not retried.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        matches!(&err, CloudError::Imds { path: p, .. } if *p == path),
        "{err}"
    );
    assert!(err.to_string().contains("timeout"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imds_that_never_answers_fails_within_seconds() {
    let (addr, task) = silent_endpoint().await;
    let (err, took) = imds_failure(addr, task).await;
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        matches!(&err, CloudError::Imds { path, .. } if path.ends_with("instance-id")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_answering_garbage_fails_at_once_with_a_clear_error() {
    // Not EC2's XML at all: the SDK cannot read it.
    let (addr, task) = answering(StatusCode::OK, "<html>captive portal</html>").await;
    let ec2 = Ec2::for_endpoint(&format!("http://{addr}"), "us-west-2");
    let t0 = Instant::now();
    let err = ec2.describe_network_interfaces(&[], &[]).await.unwrap_err();
    task.abort();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert!(
        err.to_string()
            .starts_with("EC2 DescribeNetworkInterfaces failed"),
        "{err}"
    );

    // EC2's shape with a value the agent cannot use: the field is named.
    let (addr, task) = answering(
        StatusCode::OK,
        r#"<DescribeNetworkInterfacesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r-1</requestId>
  <networkInterfaceSet>
    <item>
      <networkInterfaceId>eni-1</networkInterfaceId>
      <subnetId>subnet-1</subnetId>
      <vpcId>vpc-1</vpcId>
      <macAddress>02:00:00:00:00:01</macAddress>
      <status>in-use</status>
      <privateIpAddress>10.0.0.x</privateIpAddress>
    </item>
  </networkInterfaceSet>
</DescribeNetworkInterfacesResponse>"#,
    )
    .await;
    let ec2 = Ec2::for_endpoint(&format!("http://{addr}"), "us-west-2");
    let err = ec2.describe_network_interfaces(&[], &[]).await.unwrap_err();
    task.abort();
    assert!(
        matches!(&err, CloudError::Ec2Answer { field, .. } if field == "PrivateIpAddress"),
        "{err}"
    );
    assert!(err.to_string().contains("10.0.0.x"), "{err}");
}

/// The slowest test here (40 s): the bound itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_ec2_fails_within_the_operation_timeout() {
    let (addr, task) = silent_endpoint().await;
    let ec2 = Ec2::for_endpoint(&format!("http://{addr}"), "us-west-2");
    let t0 = Instant::now();
    let err = ec2.describe_network_interfaces(&[], &[]).await.unwrap_err();
    let took = t0.elapsed();
    task.abort();
    eprintln!("failed after {took:?}: {err}");
    // 10 s per attempt, retried, all within the 40 s operation timeout.
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(45)).contains(&took),
        "took {took:?}"
    );
    assert!(
        err.to_string()
            .starts_with("EC2 DescribeNetworkInterfaces failed"),
        "{err}"
    );
    assert!(err.to_string().contains("timeout"), "{err}");
    assert_eq!(err.code(), None);
}
