//! An IMDSv2 server for one instance, built from the current [`World`] (i.e. from EC2 state):
//! `PUT /latest/api/token`, then token-authenticated GETs of the paths of reference §3.7.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use tokio::sync::watch;

use crate::world::World;

pub const TOKEN_PATH: &str = "/latest/api/token";
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const MAX_TTL_SECS: u64 = 21_600;

#[derive(Clone)]
struct Imds {
    world: watch::Receiver<World>,
    instance_id: Arc<str>,
    /// token → expiry
    tokens: Arc<Mutex<HashMap<String, Instant>>>,
}

/// The IMDS of instance `instance_id`; every answer reflects the latest `world`.
pub fn router(world: watch::Receiver<World>, instance_id: String) -> Router {
    let state = Imds {
        world,
        instance_id: instance_id.into(),
        tokens: Arc::default(),
    };
    Router::new()
        .route(TOKEN_PATH, put(put_token))
        .fallback(get_path)
        .with_state(state)
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [("content-type", "text/plain")], body.into()).into_response()
}

async fn put_token(State(s): State<Imds>, headers: HeaderMap) -> Response {
    let ttl = headers
        .get(TTL_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|t| (1..=MAX_TTL_SECS).contains(t));
    let Some(ttl) = ttl else {
        tracing::debug!(instance = %s.instance_id, "IMDS token PUT without a valid TTL header");
        return text(
            StatusCode::BAD_REQUEST,
            format!("{TTL_HEADER} must be an integer in 1..={MAX_TTL_SECS}"),
        );
    };
    let token = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    let now = Instant::now();
    {
        let mut tokens = s.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.retain(|_, exp| *exp > now);
        tokens.insert(token.clone(), now + Duration::from_secs(ttl));
    }
    (StatusCode::OK, [(TTL_HEADER, ttl.to_string())], token).into_response()
}

async fn get_path(State(s): State<Imds>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    if method != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} not allowed"),
        );
    }
    let valid = headers
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            let tokens = s.tokens.lock().unwrap_or_else(|e| e.into_inner());
            tokens.get(t).is_some_and(|exp| *exp > Instant::now())
        });
    if !valid {
        return text(
            StatusCode::UNAUTHORIZED,
            "missing, unknown or expired IMDSv2 token",
        );
    }
    let answer = {
        let world = s.world.borrow();
        lookup(&world, &s.instance_id, uri.path())
    };
    match answer {
        Some(body) => text(StatusCode::OK, body),
        None => {
            tracing::debug!(instance = %s.instance_id, path = uri.path(), "IMDS 404");
            text(StatusCode::NOT_FOUND, "Not Found")
        }
    }
}

/// Every leaf of the instance's metadata tree, keyed by the path under `/latest/`.
fn leaves(world: &World, instance_id: &str) -> Option<BTreeMap<String, String>> {
    let inst = world.instance_by_id(instance_id)?;
    let primary = inst.primary_eni()?;
    let mut m = BTreeMap::new();
    let mut put = |k: String, v: String| {
        m.insert(k, v);
    };
    let md = "meta-data";
    put(format!("{md}/instance-id"), inst.id.clone());
    put(format!("{md}/instance-type"), inst.instance_type.clone());
    put(format!("{md}/mac"), primary.mac.clone());
    put(format!("{md}/local-ipv4"), primary.primary_ip.to_string());
    put(
        format!("{md}/local-hostname"),
        format!(
            "ip-{}.{}.compute.internal",
            primary.primary_ip.to_string().replace('.', "-"),
            world.region
        ),
    );
    put(format!("{md}/placement/availability-zone"), inst.az.clone());
    put(format!("{md}/placement/region"), world.region.clone());
    let join = |items: &mut dyn Iterator<Item = String>| items.collect::<Vec<_>>().join("\n");
    for e in &inst.enis {
        let base = format!("{md}/network/interfaces/macs/{}", e.mac);
        put(format!("{base}/mac"), e.mac.clone());
        put(format!("{base}/device-number"), e.device_index.to_string());
        put(format!("{base}/network-card"), "0".to_owned());
        put(format!("{base}/interface-id"), e.id.clone());
        put(format!("{base}/subnet-id"), e.subnet_id.clone());
        put(format!("{base}/vpc-id"), world.vpc_id.clone());
        put(
            format!("{base}/local-ipv4s"),
            join(
                &mut std::iter::once(e.primary_ip)
                    .chain(e.secondary_ips.iter().copied())
                    .map(|a| a.to_string()),
            ),
        );
        if !e.security_groups.is_empty() {
            put(
                format!("{base}/security-group-ids"),
                e.security_groups.join("\n"),
            );
        }
        if !e.prefixes.is_empty() {
            put(
                format!("{base}/ipv4-prefix"),
                join(&mut e.prefixes.iter().map(|p| p.to_string())),
            );
        }
        if let Some(subnet) = world.subnet(&e.subnet_id) {
            put(
                format!("{base}/subnet-ipv4-cidr-block"),
                subnet.cidr.to_string(),
            );
        }
        // The primary CIDR, and every associated CIDR (custom networking's 100.64.0.0/16).
        if let Some(primary) = world.vpc_cidrs.first() {
            put(format!("{base}/vpc-ipv4-cidr-block"), primary.to_string());
        }
        put(
            format!("{base}/vpc-ipv4-cidr-blocks"),
            join(&mut world.vpc_cidrs.iter().map(|c| c.to_string())),
        );
    }
    let document = serde_json::json!({
        "region": world.region,
        "instanceId": inst.id,
        "instanceType": inst.instance_type,
        "availabilityZone": inst.az,
        "privateIp": primary.primary_ip.to_string(),
    });
    put(
        "dynamic/instance-identity/document".to_owned(),
        serde_json::to_string_pretty(&document).unwrap_or_default(),
    );
    Some(m)
}

/// The answer for a request path: a leaf's value, or a directory listing (children, one a
/// line, sub-directories with a trailing `/`), or `None` (404).
fn lookup(world: &World, instance_id: &str, path: &str) -> Option<String> {
    let rel = path.strip_prefix("/latest/")?;
    let key = rel.trim_end_matches('/');
    let leaves = leaves(world, instance_id)?;
    if let Some(v) = leaves.get(key) {
        return Some(v.clone());
    }
    let prefix = if key.is_empty() {
        String::new()
    } else {
        format!("{key}/")
    };
    let mut children: Vec<String> = Vec::new();
    for k in leaves.keys() {
        let Some(rest) = k.strip_prefix(&prefix) else {
            continue;
        };
        let child = match rest.split_once('/') {
            Some((dir, _)) => format!("{dir}/"),
            None => rest.to_owned(),
        };
        if children.last() != Some(&child) && !children.contains(&child) {
            children.push(child);
        }
    }
    (!children.is_empty()).then(|| children.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::sample;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn call(
        app: &Router,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, String) {
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    async fn token(app: &Router, ttl: &str) -> String {
        let (st, h, body) = call(app, "PUT", TOKEN_PATH, &[(TTL_HEADER, ttl)]).await;
        assert_eq!(st, StatusCode::OK, "{body}");
        assert_eq!(h.get(TTL_HEADER).unwrap(), ttl);
        body
    }

    async fn get(app: &Router, tok: &str, path: &str) -> (StatusCode, String) {
        let (st, _, body) = call(app, "GET", path, &[(TOKEN_HEADER, tok)]).await;
        (st, body)
    }

    fn app() -> (watch::Sender<World>, Router) {
        let (tx, rx) = watch::channel(sample());
        (tx, router(rx, "i-1".into()))
    }

    #[tokio::test]
    async fn token_put_validates_ttl_and_echoes_it() {
        let (_tx, app) = app();
        for bad in [None, Some("0"), Some("21601"), Some("abc"), Some("-5")] {
            let h: Vec<(&str, &str)> = bad.map(|v| (TTL_HEADER, v)).into_iter().collect();
            let (st, _, body) = call(&app, "PUT", TOKEN_PATH, &h).await;
            assert_eq!(st, StatusCode::BAD_REQUEST, "ttl {bad:?}");
            assert!(body.contains(TTL_HEADER));
        }
        let a = token(&app, "60").await;
        let b = token(&app, "21600").await;
        assert!(a.len() >= 32 && a != b, "{a} {b}");
        let (st, _, _) = call(&app, "GET", TOKEN_PATH, &[]).await;
        assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn gets_need_a_valid_unexpired_token() {
        let (_tx, app) = app();
        let (st, _, _) = call(&app, "GET", "/latest/meta-data/instance-id", &[]).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        assert_eq!(
            get(&app, "bogus", "/latest/meta-data/instance-id").await.0,
            StatusCode::UNAUTHORIZED
        );
        let t = token(&app, "1").await;
        assert_eq!(
            get(&app, &t, "/latest/meta-data/instance-id").await,
            (StatusCode::OK, "i-1".into())
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            get(&app, &t, "/latest/meta-data/instance-id").await.0,
            StatusCode::UNAUTHORIZED
        );
        let (st, _, _) = call(
            &app,
            "POST",
            "/latest/meta-data/instance-id",
            &[(TOKEN_HEADER, &t)],
        )
        .await;
        assert_eq!(st, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn serves_the_tree_from_the_world() {
        let (tx, app) = app();
        let t = token(&app, "300").await;
        let md = "/latest/meta-data";
        let cases = [
            ("instance-type", "m5.large"),
            ("mac", "02:00:00:00:00:01"),
            ("local-ipv4", "172.31.15.228"),
            ("placement/availability-zone", "us-west-2a"),
            (
                "network/interfaces/macs/",
                "02:00:00:00:00:01/\n02:00:00:00:00:02/",
            ),
            (
                "network/interfaces/macs",
                "02:00:00:00:00:01/\n02:00:00:00:00:02/",
            ),
            ("network/interfaces/", "macs/"),
            ("placement/", "availability-zone\nregion"),
            (
                "network/interfaces/macs/02:00:00:00:00:02/device-number",
                "1",
            ),
            (
                "network/interfaces/macs/02:00:00:00:00:02/interface-id",
                "eni-1",
            ),
            (
                "network/interfaces/macs/02:00:00:00:00:02/local-ipv4s",
                "172.31.3.173\n172.31.13.130\n172.31.11.77",
            ),
            (
                "network/interfaces/macs/02:00:00:00:00:02/security-group-ids",
                "sg-1\nsg-2",
            ),
            (
                "network/interfaces/macs/02:00:00:00:00:02/ipv4-prefix",
                "172.31.8.0/28",
            ),
            (
                "network/interfaces/macs/02:00:00:00:00:02/subnet-ipv4-cidr-block",
                "172.31.0.0/20",
            ),
            (
                "network/interfaces/macs/02:00:00:00:00:02/vpc-ipv4-cidr-blocks",
                "172.31.0.0/16",
            ),
            ("network/interfaces/macs/02:00:00:00:00:01/vpc-id", "vpc-1"),
            (
                "network/interfaces/macs/02:00:00:00:00:01/subnet-id",
                "subnet-a",
            ),
        ];
        for (p, want) in cases {
            assert_eq!(
                get(&app, &t, &format!("{md}/{p}")).await,
                (StatusCode::OK, want.to_owned()),
                "{p}"
            );
        }
        let (st, listing) = get(&app, &t, &format!("{md}/")).await;
        assert_eq!(st, StatusCode::OK);
        for want in ["instance-id", "local-ipv4", "mac", "network/", "placement/"] {
            assert!(
                listing.lines().any(|l| l == want),
                "{want} missing in {listing}"
            );
        }
        let (_, fields) = get(
            &app,
            &t,
            &format!("{md}/network/interfaces/macs/02:00:00:00:00:01/"),
        )
        .await;
        assert!(
            fields.lines().any(|l| l == "local-ipv4s") && !fields.contains("ipv4-prefix"),
            "{fields}"
        );

        for missing in [
            "network/interfaces/macs/02:00:00:00:00:01/ipv4-prefix",
            "network/interfaces/macs/02:00:00:00:00:09/device-number",
            "nonsense",
            "instance-idx",
        ] {
            assert_eq!(
                get(&app, &t, &format!("{md}/{missing}")).await.0,
                StatusCode::NOT_FOUND,
                "{missing}"
            );
        }
        assert_eq!(
            get(&app, &t, "/other/meta-data/instance-id").await.0,
            StatusCode::NOT_FOUND
        );

        let (st, doc) = get(&app, &t, "/latest/dynamic/instance-identity/document").await;
        assert_eq!(st, StatusCode::OK);
        let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(doc["region"], "us-west-2");
        assert_eq!(doc["instanceId"], "i-1");
        assert_eq!(doc["instanceType"], "m5.large");
        assert_eq!(doc["availabilityZone"], "us-west-2a");
        assert_eq!(doc["privateIp"], "172.31.15.228");

        // A change in EC2 state (a new World) is served at once.
        let mut w = sample();
        w.instances[0].enis[0]
            .secondary_ips
            .push("172.31.5.51".parse().unwrap());
        tx.send(w).unwrap();
        let (_, ips) = get(
            &app,
            &t,
            &format!("{md}/network/interfaces/macs/02:00:00:00:00:01/local-ipv4s"),
        )
        .await;
        assert_eq!(ips, "172.31.15.228\n172.31.5.50\n172.31.5.51");
        // An instance that left the world has no metadata.
        let mut w = sample();
        w.instances.clear();
        tx.send(w).unwrap();
        assert_eq!(
            get(&app, &t, &format!("{md}/instance-id")).await.0,
            StatusCode::NOT_FOUND
        );
    }

    /// An ENI in custom networking's pod subnet (in the VPC's secondary CIDR) is described
    /// with that subnet's CIDR, and every interface lists both VPC CIDRs, as on EC2.
    #[tokio::test]
    async fn an_eni_in_the_secondary_cidr_is_described_with_its_subnet() {
        let mut w = sample();
        w.vpc_cidrs.push("100.64.0.0/16".parse().unwrap());
        w.subnets.push(crate::world::Subnet {
            id: "subnet-pods".into(),
            cidr: "100.64.0.0/19".parse().unwrap(),
            az: "us-west-2a".into(),
            name: "vpc-lab-pods-a".into(),
        });
        let eni = &mut w.instances[0].enis[1];
        eni.subnet_id = "subnet-pods".into();
        eni.primary_ip = "100.64.7.9".parse().unwrap();
        eni.secondary_ips = vec!["100.64.7.10".parse().unwrap()];
        eni.prefixes.clear();
        eni.security_groups = vec!["sg-pods".into()];
        let (_tx, rx) = watch::channel(w);
        let app = router(rx, "i-1".into());
        let t = token(&app, "60").await;
        let mac =
            |m: &str, leaf: &str| format!("/latest/meta-data/network/interfaces/macs/{m}/{leaf}");
        for (m, leaf, want) in [
            ("02:00:00:00:00:02", "subnet-id", "subnet-pods"),
            (
                "02:00:00:00:00:02",
                "subnet-ipv4-cidr-block",
                "100.64.0.0/19",
            ),
            (
                "02:00:00:00:00:02",
                "local-ipv4s",
                "100.64.7.9\n100.64.7.10",
            ),
            ("02:00:00:00:00:02", "security-group-ids", "sg-pods"),
            (
                "02:00:00:00:00:02",
                "vpc-ipv4-cidr-blocks",
                "172.31.0.0/16\n100.64.0.0/16",
            ),
            ("02:00:00:00:00:02", "vpc-ipv4-cidr-block", "172.31.0.0/16"),
            (
                "02:00:00:00:00:01",
                "subnet-ipv4-cidr-block",
                "172.31.0.0/20",
            ),
            (
                "02:00:00:00:00:01",
                "vpc-ipv4-cidr-blocks",
                "172.31.0.0/16\n100.64.0.0/16",
            ),
        ] {
            assert_eq!(
                get(&app, &t, &mac(m, leaf)).await,
                (StatusCode::OK, want.to_owned()),
                "{m} {leaf}"
            );
        }
    }

    /// The SDK's IMDS client (through `cloud`) reads this server: both sides agree.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cloud_imds_client_reads_this_server() {
        use cloud::Metadata;
        let (_tx, app) = app();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let md = cloud::ImdsMetadata::with_endpoint(&format!("http://{addr}")).unwrap();
        let got = md.instance().await.unwrap();
        server.abort();

        let w = sample();
        let inst = &w.instances[0];
        assert_eq!(got.instance_id, "i-1");
        assert_eq!(got.instance_type, "m5.large");
        assert_eq!(got.region, "us-west-2");
        assert_eq!(got.availability_zone, "us-west-2a");
        assert_eq!(got.primary_mac, "02:00:00:00:00:01");
        assert_eq!(got.local_ipv4, inst.enis[0].primary_ip);
        assert_eq!(got.enis.len(), 2);
        for (g, e) in got.enis.iter().zip(&inst.enis) {
            assert_eq!(g.mac, e.mac);
            assert_eq!(g.interface_id, e.id);
            assert_eq!(g.device_number, e.device_index);
            assert_eq!(g.subnet_id, e.subnet_id);
            assert_eq!(g.subnet_cidr, w.subnets[0].cidr);
            assert_eq!(g.vpc_id, "vpc-1");
            assert_eq!(g.vpc_cidrs, w.vpc_cidrs);
            assert_eq!(g.security_groups, e.security_groups);
            assert_eq!(g.primary_ip, e.primary_ip);
            assert_eq!(g.secondary_ips, e.secondary_ips);
            assert_eq!(g.prefixes, e.prefixes);
        }
        assert_eq!(got.primary_eni().unwrap().device_number, 0);
    }
    /// End to end: seed provisioned in moto → World::load → this server → the SDK's IMDS
    /// client: what the agent reads equals what EC2 says.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn imds_of_the_provisioned_seed_matches_ec2() {
        use cloud::Metadata;
        let moto = testkit::moto::Moto::for_test();
        let ec2 = cloud::Ec2::for_endpoint(&moto.endpoint(), "us-west-2");
        let vpc = crate::seed::provision_seed(&ec2, crate::seed::INSTANCE_TYPE, false)
            .await
            .unwrap();
        let world = World::load(&ec2, &vpc).await.unwrap();
        let i1 = world.instance("instance1").unwrap().id.clone();
        let (_tx, rx) = watch::channel(world);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server =
            tokio::spawn(async move { axum::serve(listener, router(rx, i1.clone())).await });

        let md = cloud::ImdsMetadata::with_endpoint(&format!("http://{addr}"))
            .unwrap()
            .instance()
            .await
            .unwrap();
        server.abort();

        assert_eq!(
            md.local_ipv4,
            "172.31.15.228".parse::<std::net::Ipv4Addr>().unwrap()
        );
        assert_eq!(md.region, "us-west-2");
        assert_eq!(md.instance_type, "m5.large");
        let enis = ec2
            .describe_network_interfaces(&[], &[cloud::Filter::attached_to(&md.instance_id)])
            .await
            .unwrap();
        assert_eq!(md.enis.len(), 2);
        assert_eq!(enis.len(), 2);
        for m in &md.enis {
            let e = enis
                .iter()
                .find(|e| e.id == m.interface_id)
                .expect("IMDS ENI exists in EC2");
            assert_eq!(m.mac, e.mac);
            assert_eq!(
                Some(m.device_number),
                e.attachment.as_ref().map(|a| a.device_index)
            );
            assert_eq!(m.primary_ip, e.primary_ip);
            assert_eq!(m.secondary_ips, e.secondary_ips);
            assert_eq!(m.subnet_id, e.subnet_id);
            assert_eq!(m.vpc_id, vpc);
            assert_eq!(m.subnet_cidr.to_string(), "172.31.0.0/20");
            assert_eq!(
                m.vpc_cidrs,
                [crate::seed::VPC_CIDR, crate::seed::POD_CIDR],
                "custom networking's secondary CIDR is a VPC CIDR"
            );
            assert_eq!(m.security_groups, e.security_groups);
        }
        assert_eq!(md.enis[1].primary_ip.to_string(), "172.31.3.173");
        assert_eq!(md.primary_mac, md.enis[0].mac);
    }
}
