//! lab-kube against a real Kubernetes client (kube-rs, through a kubeconfig written by
//! `write_kubeconfig`): what the agent will do, seen from the client's side. Loopback only.

use std::borrow::Cow;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Container, Event, Node, ObjectReference, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Client, Config};
use lab_kube::{EniConfig, Running, Server, Store};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Every wait in these tests: long enough for a loaded 2-core machine, short enough to fail.
const WAIT: Duration = Duration::from_secs(10);

struct Lab {
    store: Store,
    server: Server,
    running: Running,
    client: Client,
    _dir: tempfile::TempDir,
}

async fn client_from_kubeconfig(url: &str, dir: &std::path::Path) -> Client {
    let path = dir.join("kubeconfig");
    lab_kube::write_kubeconfig(&path, url).expect("kubeconfig written");
    let kc = Kubeconfig::read_from(&path).expect("kube reads the kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("a client config");
    assert_eq!(config.default_namespace, "default");
    Client::try_from(config).expect("a client")
}

async fn lab_with(server: Server) -> Lab {
    let running = server
        .start("127.0.0.1:0".parse().expect("loopback"))
        .await
        .expect("serving");
    let dir = tempfile::tempdir().expect("a temp dir");
    let client = client_from_kubeconfig(&running.url(), dir.path()).await;
    Lab {
        store: server.store().clone(),
        server,
        running,
        client,
        _dir: dir,
    }
}

async fn lab() -> Lab {
    lab_with(Server::new(Store::new())).await
}

fn meta(name: &str, namespace: Option<&str>, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        }),
        ..ObjectMeta::default()
    }
}

fn node(name: &str, labels: &[(&str, &str)]) -> Node {
    Node {
        metadata: meta(name, None, labels),
        ..Node::default()
    }
}

fn pod(name: &str, namespace: &str, node: &str) -> Pod {
    Pod {
        metadata: meta(name, Some(namespace), &[("app", "web")]),
        spec: Some(PodSpec {
            node_name: Some(node.to_string()),
            containers: vec![Container {
                name: "c".to_string(),
                image: Some("busybox".to_string()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// The status of an API error, or a panic naming what came instead.
fn api_error<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> Box<kube::core::Status> {
    match r {
        Err(kube::Error::Api(s)) => s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn next<S, T, E>(stream: &mut S, what: &str) -> T
where
    S: futures_util::Stream<Item = Result<T, E>> + Unpin,
    E: std::fmt::Display,
{
    match tokio::time::timeout(WAIT, stream.next()).await {
        Ok(Some(Ok(t))) => t,
        Ok(Some(Err(e))) => panic!("{what}: the stream failed: {e}"),
        Ok(None) => panic!("{what}: the stream ended"),
        Err(_) => panic!("{what}: nothing within {WAIT:?}"),
    }
}

#[tokio::test]
async fn nodes_get_list_and_watch_a_label_change() {
    let lab = lab().await;
    lab.store
        .put(node("n1", &[("topology.kubernetes.io/zone", "us-west-2a")]))
        .expect("seeded");
    lab.store.put(node("n2", &[])).expect("seeded");
    let nodes: Api<Node> = Api::all(lab.client.clone());

    let n1 = nodes.get("n1").await.expect("get");
    assert_eq!(n1.metadata.resource_version.as_deref(), Some("1"));
    assert!(n1.metadata.uid.is_some() && n1.metadata.creation_timestamp.is_some());

    let all = nodes.list(&ListParams::default()).await.expect("list");
    let names: Vec<_> = all.iter().filter_map(|n| n.metadata.name.clone()).collect();
    assert_eq!(names, ["n1", "n2"]);
    assert_eq!(all.types.kind, "NodeList");
    assert_eq!(all.metadata.resource_version.as_deref(), Some("2"));
    let zoned = nodes
        .list(&ListParams::default().labels("topology.kubernetes.io/zone=us-west-2a"))
        .await
        .expect("list by label");
    assert_eq!(zoned.items.len(), 1);
    let by_name = nodes
        .list(&ListParams::default().fields("metadata.name=n2"))
        .await
        .expect("list by name");
    assert_eq!(by_name.items[0].metadata.name.as_deref(), Some("n2"));
    let e = api_error(
        nodes
            .list(&ListParams::default().fields("spec.nodeName=n1"))
            .await,
    );
    assert_eq!((e.code, e.reason.as_str()), (400, "BadRequest"));
    assert!(e.message.contains("spec.nodeName"), "{}", e.message);

    let rv = all
        .metadata
        .resource_version
        .clone()
        .expect("a list version");
    let mut events = nodes
        .watch(&WatchParams::default().fields("metadata.name=n1"), &rv)
        .await
        .expect("watch")
        .boxed();
    nodes
        .patch(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"vpc.amazonaws.com/eniConfig": "az1"}}})),
        )
        .await
        .expect("label patched");
    lab.store.put(node("n3", &[])).expect("not watched");
    match next(&mut events, "watch n1").await {
        WatchEvent::Modified(n) => {
            let labels = n.metadata.labels.unwrap_or_default();
            assert_eq!(labels["vpc.amazonaws.com/eniConfig"], "az1");
            assert_eq!(n.metadata.resource_version.as_deref(), Some("3"));
        }
        other => panic!("expected MODIFIED, got {other:?}"),
    }
    nodes
        .delete("n1", &Default::default())
        .await
        .expect("deleted");
    match next(&mut events, "watch n1").await {
        WatchEvent::Deleted(n) => assert_eq!(n.metadata.name.as_deref(), Some("n1")),
        other => panic!("expected DELETED, got {other:?}"),
    }
}

#[tokio::test]
async fn events_are_created_and_listed() {
    let lab = lab().await;
    let events: Api<Event> = Api::namespaced(lab.client.clone(), "default");
    let ev = Event {
        metadata: ObjectMeta {
            generate_name: Some("n1.".to_string()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            kind: Some("Node".to_string()),
            name: Some("n1".to_string()),
            ..ObjectReference::default()
        },
        reason: Some("MissingIAMPermissions".to_string()),
        message: Some("ec2:AssignPrivateIpAddresses denied".to_string()),
        type_: Some("Warning".to_string()),
        ..Event::default()
    };
    let created = events
        .create(&PostParams::default(), &ev)
        .await
        .expect("created");
    let name = created.metadata.name.clone().expect("a generated name");
    assert!(name.starts_with("n1.") && name.len() == 8, "{name}");
    assert_eq!(created.metadata.namespace.as_deref(), Some("default"));

    let listed = events
        .list(&ListParams::default().fields("involvedObject.name=n1,reason=MissingIAMPermissions"))
        .await
        .expect("list");
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].message, ev.message);
    let everywhere: Api<Event> = Api::all(lab.client.clone());
    assert_eq!(
        everywhere
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );
    let stored = lab.store.list::<Event>(Some("default"));
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].reason.as_deref(), Some("MissingIAMPermissions"));

    // A node's event outside `default` is refused, as by the real validation.
    let elsewhere: Api<Event> = Api::namespaced(lab.client.clone(), "kube-system");
    let e = api_error(elsewhere.create(&PostParams::default(), &ev).await);
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
}

#[tokio::test]
async fn a_pod_annotation_is_patched_and_read_back() {
    let lab = lab().await;
    lab.store.put(pod("web-1", "apps", "n1")).expect("seeded");
    lab.store.put(pod("web-2", "apps", "n2")).expect("seeded");
    let pods: Api<Pod> = Api::namespaced(lab.client.clone(), "apps");
    let patched = pods
        .patch(
            "web-1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"vpc.amazonaws.com/pod-ips": "10.0.1.5"}}}),
            ),
        )
        .await
        .expect("merge patch");
    let ann = |p: &Pod, k: &str| {
        p.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(k).cloned())
    };
    assert_eq!(
        ann(&patched, "vpc.amazonaws.com/pod-ips").as_deref(),
        Some("10.0.1.5")
    );
    let strategic = pods
        .patch(
            "web-1",
            &PatchParams::default(),
            &Patch::Strategic(json!({"metadata": {"annotations": {"b": "2"}}})),
        )
        .await
        .expect("strategic merge patch");
    assert_eq!(ann(&strategic, "b").as_deref(), Some("2"));
    let read = pods.get("web-1").await.expect("get");
    assert_eq!(
        ann(&read, "vpc.amazonaws.com/pod-ips").as_deref(),
        Some("10.0.1.5")
    );
    let stored = lab.store.get::<Pod>(Some("apps"), "web-1").expect("stored");
    assert_eq!(ann(&stored, "b").as_deref(), Some("2"));

    let on_n1 = Api::<Pod>::all(lab.client.clone())
        .list(&ListParams::default().fields("spec.nodeName=n1"))
        .await
        .expect("pods of a node");
    let names: Vec<_> = on_n1
        .iter()
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    assert_eq!(names, ["web-1"]);

    let e = api_error(
        pods.patch(
            "web-1",
            &PatchParams::apply("lab-test"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Pod"})),
        )
        .await,
    );
    assert_eq!(e.code, 415);
}

#[tokio::test]
async fn a_stale_put_conflicts_and_a_missing_object_is_404() {
    let lab = lab().await;
    lab.store.put(node("n1", &[])).expect("seeded");
    let nodes: Api<Node> = Api::all(lab.client.clone());
    let stale = nodes.get("n1").await.expect("get");
    let mut fresh = stale.clone();
    fresh.metadata.labels = Some([("a".to_string(), "1".to_string())].into());
    let replaced = nodes
        .replace("n1", &PostParams::default(), &fresh)
        .await
        .expect("replace with the current version");
    assert_ne!(
        replaced.metadata.resource_version,
        stale.metadata.resource_version
    );
    let e = api_error(nodes.replace("n1", &PostParams::default(), &stale).await);
    assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
    assert!(
        e.message.contains("the object has been modified"),
        "{}",
        e.message
    );

    let e = api_error(nodes.get("missing").await);
    assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"));
    assert_eq!(e.message, "nodes \"missing\" not found");
    assert!(nodes.get_opt("missing").await.expect("get_opt").is_none());
    let e = api_error(nodes.create(&PostParams::default(), &node("n1", &[])).await);
    assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(lab.client.clone(), "default");
    let e = api_error(services.list(&ListParams::default()).await);
    assert_eq!(e.code, 404, "an unserved resource");
}

#[tokio::test]
async fn a_watch_from_a_compacted_version_gets_410() {
    let lab = lab().await;
    let nodes: Api<Node> = Api::all(lab.client.clone());
    lab.store.put(node("n1", &[])).expect("seeded");
    let old = lab.store.resource_version().to_string();
    lab.store.put(node("n2", &[])).expect("seeded");
    lab.store.compact();
    let mut events = nodes
        .watch(&WatchParams::default(), &old)
        .await
        .expect("a watch answers 200")
        .boxed();
    match next(&mut events, "watch from a compacted version").await {
        WatchEvent::Error(s) => {
            assert_eq!((s.code, s.reason.as_str()), (410, "Expired"));
            assert!(
                s.message.contains("too old resource version"),
                "{}",
                s.message
            );
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    // From the current version the watch works.
    let now = lab.store.resource_version().to_string();
    let mut events = nodes
        .watch(&WatchParams::default(), &now)
        .await
        .expect("watch")
        .boxed();
    lab.store.put(node("n3", &[])).expect("seeded");
    match next(&mut events, "watch from now").await {
        WatchEvent::Added(n) => assert_eq!(n.metadata.name.as_deref(), Some("n3")),
        other => panic!("expected ADDED, got {other:?}"),
    }
}

/// ENIConfig as the agent would declare it (the fields `kube::CustomResource` derives),
/// independently of lab-kube's own type.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AgentEniConfig {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    metadata: ObjectMeta,
    spec: AgentEniConfigSpec,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AgentEniConfigSpec {
    subnet: String,
    #[serde(default)]
    security_groups: Vec<String>,
}

impl kube::Resource for AgentEniConfig {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;
    fn kind(_: &()) -> Cow<'_, str> {
        "ENIConfig".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "crd.k8s.amazonaws.com".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1alpha1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "eniconfigs".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[tokio::test]
async fn typed_eniconfigs_get_list_and_create() {
    let lab = lab().await;
    lab.store
        .put(EniConfig::new("us-west-2a", "subnet-0a", &["sg-1", "sg-2"]))
        .expect("seeded");
    let enis: Api<AgentEniConfig> = Api::all(lab.client.clone());
    let a = enis.get("us-west-2a").await.expect("get");
    assert_eq!(a.spec.subnet, "subnet-0a");
    assert_eq!(a.spec.security_groups, ["sg-1", "sg-2"]);
    let mut b = AgentEniConfig {
        api_version: String::new(),
        kind: String::new(),
        metadata: meta("us-west-2b", None, &[]),
        spec: AgentEniConfigSpec {
            subnet: "subnet-0b".to_string(),
            security_groups: vec![],
        },
    };
    // As the real server, a body without apiVersion and kind is refused.
    let e = api_error(enis.create(&PostParams::default(), &b).await);
    assert_eq!(
        (e.code, e.message.as_str()),
        (400, "Object 'Kind' is missing in the body")
    );
    b.api_version = "crd.k8s.amazonaws.com/v1alpha1".to_string();
    b.kind = "ENIConfig".to_string();
    let created = enis
        .create(&PostParams::default(), &b)
        .await
        .expect("created");
    assert_eq!(created.kind, "ENIConfig");
    assert_eq!(created.metadata.generation, Some(1));
    let list = enis.list(&ListParams::default()).await.expect("list");
    assert_eq!(list.types.kind, "ENIConfigList");
    let subnets: Vec<_> = list.iter().map(|e| e.spec.subnet.as_str()).collect();
    assert_eq!(subnets, ["subnet-0a", "subnet-0b"]);
    // lab-kube's own type works as a kube resource too (k8s-openapi's traits).
    let own: Api<EniConfig> = Api::all(lab.client.clone());
    let b = own.get("us-west-2b").await.expect("get");
    assert_eq!(b.spec.map(|s| s.subnet).as_deref(), Some("subnet-0b"));
    assert!(lab.store.get::<EniConfig>(None, "us-west-2b").is_some());
    // The upstream schema's required field.
    let e = api_error(
        Api::<kube::core::DynamicObject>::all_with(
            lab.client.clone(),
            &kube::discovery::ApiResource::erase::<AgentEniConfig>(&()),
        )
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"apiVersion": "crd.k8s.amazonaws.com/v1alpha1",
                "kind": "ENIConfig", "metadata": {"name": "bad"}, "spec": {"securityGroups": ["sg-1"]}}))
            .expect("a dynamic object"),
        )
        .await,
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(
        e.message.contains("spec.subnet: Required value"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn the_runtime_watcher_sees_an_eniconfig_change() {
    let lab = lab().await;
    lab.store
        .put(EniConfig::new("us-west-2a", "subnet-0a", &["sg-1"]))
        .expect("seeded");
    let enis: Api<AgentEniConfig> = Api::all(lab.client.clone());
    let mut current = "subnet-0a";
    for config in [
        watcher::Config::default(),
        watcher::Config::default().streaming_lists(),
    ] {
        let streaming = config.initial_list_strategy == watcher::InitialListStrategy::StreamingList;
        let mut stream = watcher(enis.clone(), config).boxed();
        let mut initial = Vec::new();
        loop {
            match next(&mut stream, "initial list").await {
                watcher::Event::Init => {}
                watcher::Event::InitApply(e) => initial.push(e.spec.subnet),
                watcher::Event::InitDone => break,
                other => panic!("unexpected {other:?} before InitDone"),
            }
        }
        assert_eq!(initial, [current], "streaming={streaming}");
        let subnet = if streaming {
            "subnet-streamed"
        } else {
            "subnet-listed"
        };
        enis.patch(
            "us-west-2a",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"subnet": subnet}})),
        )
        .await
        .expect("patched");
        match next(&mut stream, "the change").await {
            watcher::Event::Apply(e) => {
                assert_eq!(e.spec.subnet, subnet);
                assert_eq!(e.metadata.generation, Some(if streaming { 3 } else { 2 }));
            }
            other => panic!("expected Apply, got {other:?}"),
        }
        current = subnet;
    }
}

#[tokio::test]
async fn the_server_goes_down_and_comes_back_with_the_same_objects() {
    let Lab {
        store,
        server,
        running,
        client,
        _dir,
    } = lab_with(Server::new(Store::new()).bookmark_interval(Duration::from_millis(200))).await;
    store.put(node("n1", &[])).expect("seeded");
    let nodes: Api<Node> = Api::all(client.clone());
    nodes.get("n1").await.expect("up");

    // An open watch gets bookmarks, then ends when the server stops.
    let rv = store.resource_version().to_string();
    let mut events = nodes
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    match next(&mut events, "a bookmark").await {
        WatchEvent::Bookmark(b) => assert_eq!(b.metadata.resource_version, rv),
        other => panic!("expected BOOKMARK, got {other:?}"),
    }
    let addr = running.addr();
    running.stop().await.expect("stopped");
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(ev) = events.next().await {
            if !matches!(ev, Ok(WatchEvent::Bookmark(_))) {
                return Some(ev);
            }
        }
        None
    })
    .await
    .expect("the watch ends when the server stops");
    assert!(ended.is_none(), "{ended:?}");
    let down = nodes.get("n1").await;
    assert!(
        !matches!(down, Ok(_) | Err(kube::Error::Api(_))),
        "a stopped server answers nothing: {down:?}"
    );

    store.put(node("n2", &[])).expect("changed while down");
    let running = server
        .start(addr)
        .await
        .expect("started again on the same address");
    assert_eq!(running.addr(), addr);
    let names: Vec<_> = nodes
        .list(&ListParams::default())
        .await
        .expect("the same client works again")
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    assert_eq!(names, ["n1", "n2"]);
    let mut events = nodes
        .watch(&WatchParams::default(), &rv)
        .await
        .expect("watch")
        .boxed();
    match next(&mut events, "the change made while down").await {
        WatchEvent::Added(n) => assert_eq!(n.metadata.name.as_deref(), Some("n2")),
        other => panic!("expected ADDED, got {other:?}"),
    }
    running.stop().await.expect("stopped");
}

#[tokio::test]
async fn discovery_and_version_have_the_real_shapes() {
    let lab = lab().await;
    let v = lab.client.apiserver_version().await.expect("/version");
    assert_eq!((v.major.as_str(), v.minor.as_str()), ("1", "33"));
    let core = lab.client.list_core_api_versions().await.expect("/api");
    assert_eq!(core.versions, ["v1"]);
    let groups = lab.client.list_api_groups().await.expect("/apis");
    assert_eq!(groups.groups[0].name, "crd.k8s.amazonaws.com");
    let discovery = kube::discovery::Discovery::new(lab.client.clone())
        .run()
        .await
        .expect("kube discovery");
    let gvk = kube::api::GroupVersionKind::gvk("crd.k8s.amazonaws.com", "v1alpha1", "ENIConfig");
    let (ar, caps) = discovery.resolve_gvk(&gvk).expect("ENIConfig discovered");
    assert_eq!(ar.plural, "eniconfigs");
    assert_eq!(caps.scope, kube::discovery::Scope::Cluster);
    let pods = discovery
        .resolve_gvk(&kube::api::GroupVersionKind::gvk("", "v1", "Pod"))
        .expect("pods discovered");
    assert!(pods.1.supports_operation(kube::discovery::verbs::WATCH));
    lab.store
        .put(EniConfig::new("az1", "subnet-1", &[]))
        .expect("seeded");
    let dynamic: Api<kube::core::DynamicObject> = Api::all_with(lab.client.clone(), &ar);
    let all = dynamic
        .list(&ListParams::default())
        .await
        .expect("dynamic list");
    assert_eq!(all.items[0].data["spec"]["subnet"], "subnet-1");
    // A paged list is answered whole, with no continue token.
    let paged = Api::<Node>::all(lab.client.clone())
        .list(&ListParams::default().limit(1))
        .await
        .expect("list");
    assert!(paged.metadata.continue_.is_none());
    assert_eq!(paged.items.len(), 0);
}

/// A server on a listener the caller bound (as the lab binds one inside each instance's
/// network namespace): served, stopped (connections refused), and served again on a new
/// listener at the same address with the same objects.
#[tokio::test]
async fn a_server_serves_a_listener_bound_elsewhere() {
    let store = Store::new();
    store.put(node("n1", &[("a", "b")])).expect("seeded");
    let server = Server::new(store.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a listener");
    let addr = l.local_addr().expect("its address");
    let running = server.serve(l).expect("serving the listener");
    assert_eq!(running.addr(), addr);
    let dir = tempfile::tempdir().expect("a temp dir");
    let client = client_from_kubeconfig(&running.url(), dir.path()).await;
    let nodes: Api<Node> = Api::all(client.clone());
    let n = nodes.get("n1").await.expect("served");
    running.stop().await.expect("stopped");
    assert!(nodes.get("n1").await.is_err(), "refused while stopped");
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .expect("the same address again");
    let _running = server.serve(l).expect("serving again");
    let back = nodes.get("n1").await.expect("served again");
    assert_eq!(back.metadata.uid, n.metadata.uid);
}
