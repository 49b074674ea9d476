//! Against a real API server stand-in (crates/lab-kube, on loopback) with the real `kube`
//! client the agent uses: the node's capacity through an outage, events and annotations that
//! wait for the API server.

use std::net::SocketAddr;

use k8s_openapi::api::core::v1::{NodeStatus, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use lab_kube::{Server, Store};

use super::*;

fn node(name: &str, pods: u32) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                [(
                    "topology.kubernetes.io/zone".to_string(),
                    "us-west-2a".to_string(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        status: Some(NodeStatus {
            capacity: Some([("pods".to_string(), Quantity(pods.to_string()))].into()),
            ..NodeStatus::default()
        }),
        ..Node::default()
    }
}

fn pod(ns: &str, name: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![k8s_openapi::api::core::v1::Container {
                name: "c".into(),
                image: Some("pause".into()),
                ..Default::default()
            }],
            node_name: Some("node-1".into()),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// A server on a free loopback port, and a client from a kubeconfig naming it (as the lab's
/// agents get one).
async fn api(store: &Store, dir: &tempfile::TempDir) -> (Server, lab_kube::Running, kube::Client) {
    let server = Server::new(store.clone());
    let running = server
        .start(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap();
    let path = dir.path().join("kubeconfig");
    lab_kube::write_kubeconfig(&path, &running.url()).unwrap();
    let client = client_from_env(Some(path.to_str().unwrap()), false)
        .await
        .unwrap()
        .expect("a client from KUBECONFIG");
    (server, running, client)
}

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..300 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn the_nodes_capacity_is_followed_through_an_api_server_outage() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();
    store.put(node("node-1", 20)).unwrap();
    store.put(node("node-2", 99)).unwrap();
    let (server, running, client) = api(&store, &dir).await;
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(watch_node(client, "node-1".into(), tx));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(follow_capacity(rx.clone(), move |p| {
        s.lock().unwrap().push(p)
    }));
    until("capacity 20", || {
        seen.lock().unwrap().contains(&Some(20)).then_some(())
    })
    .await;
    assert_eq!(
        rx.borrow().as_ref().unwrap().labels["topology.kubernetes.io/zone"],
        "us-west-2a"
    );

    store.put(node("node-1", 30)).unwrap();
    until("capacity 30", || {
        seen.lock().unwrap().contains(&Some(30)).then_some(())
    })
    .await;

    // Down, changed meanwhile, back on the same address: the watch resumes and sees it.
    let addr = running.addr();
    running.stop().await.unwrap();
    store.put(node("node-1", 40)).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _back = server.start(addr).await.unwrap();
    until("capacity 40", || {
        seen.lock().unwrap().contains(&Some(40)).then_some(())
    })
    .await;
    // Only this node was read.
    assert!(!seen.lock().unwrap().contains(&Some(99)));
}

#[tokio::test]
async fn events_and_pod_annotations_wait_for_the_api_server_and_then_go() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();
    store.put(node("node-1", 110)).unwrap();
    store.put(pod("web", "web-1")).unwrap();
    let (server, running, client) = api(&store, &dir).await;
    let addr = running.addr();
    running.stop().await.unwrap();

    let (outbox, sender) = Outbox::new(client, "node-1".into());
    tokio::spawn(sender);
    let e = NodeEvent {
        reason: "SubnetFull",
        message: "subnet subnet-1 has no free addresses".into(),
    };
    outbox.event(e.clone());
    outbox.event(e.clone()); // the same again: not sent twice
    outbox.pod_ip("web", "web-1", Ipv4Addr::new(10, 0, 1, 7));
    outbox.pod_ip("web", "gone", Ipv4Addr::new(10, 0, 1, 8)); // no such pod: dropped
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(store.list::<Event>(None).is_empty());

    let _back = server.start(addr).await.unwrap();
    let events = until("the event", || {
        let v = store.list::<Event>(None);
        (!v.is_empty()).then_some(v)
    })
    .await;
    let annotated = until("the annotation", || {
        store
            .get::<Pod>(Some("web"), "web-1")
            .and_then(|p| p.metadata.annotations)
            .and_then(|a| a.get(POD_IPS_ANNOTATION).cloned())
    })
    .await;
    assert_eq!(annotated, "10.0.1.7");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = if events.len() == 1 {
        store.list::<Event>(None)
    } else {
        events
    };
    assert_eq!(events.len(), 1, "{events:?}");
    let ev = &events[0];
    assert_eq!(ev.involved_object.kind.as_deref(), Some("Node"));
    assert_eq!(ev.involved_object.name.as_deref(), Some("node-1"));
    assert_eq!(ev.reason.as_deref(), Some("SubnetFull"));
    assert_eq!(ev.type_.as_deref(), Some("Warning"));
    assert_eq!(ev.message.as_deref(), Some(e.message.as_str()));
    assert_eq!(outbox.dropped.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[tokio::test]
async fn without_kubeconfig_or_service_account_there_is_no_client_and_a_bad_kubeconfig_is_named() {
    assert!(client_from_env(None, false).await.unwrap().is_none());
    let Err(e) = client_from_env(Some("/nonexistent/kubeconfig"), false).await else {
        panic!("a client from a kubeconfig that does not exist");
    };
    assert!(e.to_string().contains("/nonexistent/kubeconfig"), "{e}");
}

#[test]
fn the_eniconfig_name_comes_from_the_external_label_the_annotation_the_label_or_default() {
    let mut n = NodeView::default();
    let name = |n: &NodeView| eni_config_name(n, "topology.kubernetes.io/zone", ENI_CONFIG_KEY);
    assert_eq!(name(&n), "default");
    n.labels
        .insert("topology.kubernetes.io/zone".into(), "us-west-2a".into());
    assert_eq!(name(&n), "us-west-2a");
    n.annotations
        .insert(ENI_CONFIG_KEY.into(), "annotated".into());
    assert_eq!(name(&n), "annotated");
    n.labels
        .insert(EXTERNAL_ENI_CONFIG_LABEL.into(), "external".into());
    assert_eq!(name(&n), "external");
}

#[tokio::test]
async fn the_nodes_eniconfig_is_followed_by_label_and_its_absence_is_told() {
    use crate::provisioner::EniConfigState;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();
    store.put(node("node-1", 110)).unwrap();
    store
        .put(lab_kube::EniConfig::new(
            "us-west-2a",
            "subnet-pods",
            &["sg-pods"],
        ))
        .unwrap();
    let (_server, _running, client) = api(&store, &dir).await;
    let (tx, rx) = tokio::sync::watch::channel(None);
    tokio::spawn(watch_node(client.clone(), "node-1".into(), tx));
    let (ctx, crx) = tokio::sync::watch::channel(None);
    tokio::spawn(watch_eni_configs(client, ctx));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    tokio::spawn(follow_eni_config(
        rx,
        crx,
        "topology.kubernetes.io/zone".into(),
        ENI_CONFIG_KEY.into(),
        move |st| s.lock().unwrap().push(st),
    ));
    let found = EniConfigState::Found {
        name: "us-west-2a".into(),
        subnet: "subnet-pods".into(),
        security_groups: vec!["sg-pods".into()],
    };
    until("the zone's ENIConfig", || {
        seen.lock().unwrap().contains(&found).then_some(())
    })
    .await;
    assert_eq!(seen.lock().unwrap()[0], EniConfigState::Unknown);
    store.delete::<lab_kube::EniConfig>(None, "us-west-2a");
    let missing = EniConfigState::Missing {
        name: "us-west-2a".into(),
    };
    until("its absence", || {
        seen.lock().unwrap().contains(&missing).then_some(())
    })
    .await;
}
