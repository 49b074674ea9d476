//! A table-driven IMDSv2 fake on 127.0.0.1:0 for testing the client side alone: token PUT
//! (echoing the TTL header the SDK requires), token-checked GETs, 404 for unknown paths,
//! per-path injected statuses, and paths that never answer.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::put;

const TOKEN: &str = "fake-token-123";

#[derive(Clone, Default)]
pub struct Table {
    pub values: BTreeMap<String, String>,
    pub statuses: BTreeMap<String, u16>,
    /// GETs of these paths are accepted and never answered (a hung IMDS).
    pub hangs: BTreeSet<String>,
}

impl Table {
    pub fn set(&mut self, path: &str, value: &str) -> &mut Self {
        self.values.insert(path.to_owned(), value.to_owned());
        self
    }
}

async fn token(headers: HeaderMap) -> Response {
    match headers.get("x-aws-ec2-metadata-token-ttl-seconds") {
        Some(ttl) => (
            StatusCode::OK,
            [("x-aws-ec2-metadata-token-ttl-seconds", ttl.clone())],
            TOKEN,
        )
            .into_response(),
        None => StatusCode::BAD_REQUEST.into_response(),
    }
}

async fn get(State(t): State<Arc<Table>>, uri: Uri, headers: HeaderMap) -> Response {
    if headers
        .get("x-aws-ec2-metadata-token")
        .and_then(|v| v.to_str().ok())
        != Some(TOKEN)
    {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let path = uri.path();
    if t.hangs.contains(path) {
        std::future::pending::<()>().await;
    }
    if let Some(code) = t.statuses.get(path) {
        return StatusCode::from_u16(*code).unwrap().into_response();
    }
    match t.values.get(path) {
        Some(v) => v.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Serves `table` until the returned task is aborted.
pub async fn serve(table: Table) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let app = Router::new()
        .route("/latest/api/token", put(token))
        .fallback(get)
        .with_state(Arc::new(table));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(l, app).await.unwrap();
    });
    (addr, task)
}

/// A two-ENI instance; the listing names the device-1 ENI first to check sorting.
pub fn two_enis() -> Table {
    let mut t = Table::default();
    let md = "/latest/meta-data";
    t.set(&format!("{md}/instance-id"), "i-0abc")
        .set(&format!("{md}/instance-type"), "m5.large")
        .set(&format!("{md}/placement/availability-zone"), "us-west-2a")
        .set(&format!("{md}/mac"), "02:00:00:00:00:0a")
        .set(&format!("{md}/local-ipv4"), "172.31.15.228")
        .set(
            "/latest/dynamic/instance-identity/document",
            r#"{"region":"us-west-2","instanceId":"i-0abc"}"#,
        )
        .set(
            &format!("{md}/network/interfaces/macs/"),
            "02:00:00:00:00:0b/\n02:00:00:00:00:0a/",
        );
    for (mac, dev, id, ips, prefix, sgs) in [
        (
            "02:00:00:00:00:0a",
            "0",
            "eni-a",
            "172.31.15.228\n172.31.5.50",
            None,
            "sg-1",
        ),
        (
            "02:00:00:00:00:0b",
            "1",
            "eni-b",
            "172.31.3.173\n172.31.13.130\n172.31.11.77",
            Some("172.31.8.0/28\n172.31.8.16/28"),
            "sg-1\nsg-2",
        ),
    ] {
        let b = format!("{md}/network/interfaces/macs/{mac}");
        t.set(&format!("{b}/device-number"), dev)
            .set(&format!("{b}/interface-id"), id)
            .set(&format!("{b}/subnet-id"), "subnet-a")
            .set(&format!("{b}/vpc-id"), "vpc-1")
            .set(&format!("{b}/security-group-ids"), sgs)
            .set(&format!("{b}/local-ipv4s"), ips)
            .set(&format!("{b}/subnet-ipv4-cidr-block"), "172.31.0.0/20")
            .set(
                &format!("{b}/vpc-ipv4-cidr-blocks"),
                "172.31.0.0/16\n100.64.0.0/16",
            );
        if let Some(p) = prefix {
            t.set(&format!("{b}/ipv4-prefix"), p);
        }
    }
    t
}
