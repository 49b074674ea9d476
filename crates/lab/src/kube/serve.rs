//! The daemon's side of the lab's Kubernetes API: the store, seeded from the world; the
//! `lab_kube` server on `127.0.0.1:6443` in every instance's namespace and on a loopback port
//! of the root namespace; the kubeconfigs; and the control socket that `super`'s functions
//! talk to.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use lab_aws::world::World;
use lab_kube::{EniConfig, Running, Server, Store};
use lab_net::ns;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};

use super::{API_ADDR, KubeStatus, MAX_LINE, Reply, Request, instance_url, objects};
use crate::paths;

/// The API server of the lab's lifetime.
pub(crate) struct Service {
    store: Store,
    server: Server,
    inner: tokio::sync::Mutex<Inner>,
}

struct Inner {
    /// The root namespace's loopback address (kept across stop and start).
    host_addr: SocketAddr,
    /// Instance namespaces the API is served in.
    namespaces: Vec<String>,
    /// The running servers (none after a stop).
    running: Vec<Running>,
}

/// Binds `API_ADDR` inside namespace `name`.
async fn bind_in(name: &str) -> Result<TcpListener> {
    let n = name.to_string();
    let l = tokio::task::spawn_blocking(move || ns::bind_tcp(&n, API_ADDR.into()))
        .await
        .context("binding the Kubernetes API in a namespace")??;
    TcpListener::from_std(l).with_context(|| format!("serving the Kubernetes API in {name}"))
}

impl Service {
    /// Seeds the store from `world` (a `Node` per node instance, the `ENIConfig`s), serves it
    /// in every instance's namespace and on a loopback port of the root namespace, writes the
    /// kubeconfigs and serves the control socket.
    pub(crate) async fn start(world: &World) -> Result<Arc<Service>> {
        std::fs::create_dir_all(paths::kube_dir())
            .with_context(|| format!("creating {}", paths::kube_dir().display()))?;
        let store = Store::new();
        for n in objects::nodes(world) {
            store.put(n)?;
        }
        match objects::eniconfigs(world) {
            Ok(configs) => {
                for c in configs {
                    store.put(c)?;
                }
            }
            Err(e) => tracing::warn!("no ENIConfigs seeded: {e:#}"),
        }
        let server = Server::new(store.clone());
        let host = server
            .start(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("starting the lab's Kubernetes API in the root namespace")?;
        let host_addr = host.addr();
        let mut running = vec![host];
        let mut namespaces = Vec::new();
        for i in &world.instances {
            let name = ns::instance_ns(&i.name);
            running.push(server.serve(bind_in(&name).await?)?);
            namespaces.push(name);
        }
        lab_kube::write_kubeconfig(&paths::kubeconfig(), &instance_url())?;
        lab_kube::write_kubeconfig(&paths::kubeconfig_host(), &format!("http://{host_addr}"))?;
        let service = Arc::new(Service {
            store,
            server,
            inner: tokio::sync::Mutex::new(Inner {
                host_addr,
                namespaces,
                running,
            }),
        });
        let sock = paths::kube_control_socket();
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock)
            .with_context(|| format!("binding the control socket {}", sock.display()))?;
        let s = service.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => {
                        let s = s.clone();
                        tokio::spawn(async move { s.converse(conn).await });
                    }
                    Err(e) => {
                        tracing::warn!("kube control socket accept: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tracing::info!(
            host = %host_addr,
            instances = %instance_url(),
            nodes = service.store.list::<Node>(None).len(),
            "the lab's Kubernetes API is serving"
        );
        Ok(service)
    }

    /// A new instance in the world: the API is served in its namespace too, and a node
    /// instance gets its `Node` (unless the store has it).
    pub(crate) async fn add_instance(&self, world: &World, name: &str) -> Result<()> {
        let Some(inst) = world.instance(name) else {
            bail!("no instance {name:?} in the world");
        };
        if inst.node && self.store.get::<Node>(None, name).is_none() {
            self.store.put(objects::node(world, inst))?;
        }
        let nsname = ns::instance_ns(name);
        let mut inner = self.inner.lock().await;
        if inner.namespaces.contains(&nsname) {
            return Ok(());
        }
        if !inner.running.is_empty() {
            let l = bind_in(&nsname).await?;
            inner.running.push(self.server.serve(l)?);
        }
        inner.namespaces.push(nsname);
        Ok(())
    }

    /// Reads one request line, answers it, closes.
    async fn converse(&self, conn: UnixStream) {
        let (r, mut w) = conn.into_split();
        let mut line = String::new();
        let read = BufReader::new(r.take(MAX_LINE)).read_line(&mut line).await;
        let reply = match read {
            Err(e) => Reply {
                value: Value::Null,
                error: Some(format!("reading the request: {e}")),
            },
            Ok(_) => match serde_json::from_str::<Request>(&line) {
                Err(e) => Reply {
                    value: Value::Null,
                    error: Some(format!("not a request ({e}): {:?}", line.trim())),
                },
                Ok(req) => match self.handle(req).await {
                    Ok(value) => Reply { value, error: None },
                    Err(e) => Reply {
                        value: Value::Null,
                        error: Some(format!("{e:#}")),
                    },
                },
            },
        };
        let mut out = serde_json::to_vec(&reply)
            .unwrap_or_else(|e| format!(r#"{{"error":"encoding the answer: {e}"}}"#).into_bytes());
        out.push(b'\n');
        if let Err(e) = w.write_all(&out).await {
            tracing::debug!("kube control: the client left before the answer: {e}");
        }
    }

    fn node(&self, name: &str) -> Result<Node> {
        self.store.get::<Node>(None, name).with_context(|| {
            let names: Vec<String> = self
                .store
                .list::<Node>(None)
                .into_iter()
                .filter_map(|n| n.metadata.name)
                .collect();
            format!(
                "no node {name:?} in the lab's Kubernetes API (nodes: {})",
                names.join(", ")
            )
        })
    }

    fn host_ip(&self, node: &str) -> Option<Ipv4Addr> {
        self.store
            .get::<Node>(None, node)?
            .status?
            .addresses?
            .into_iter()
            .find(|a| a.type_ == "InternalIP")?
            .address
            .parse()
            .ok()
    }

    async fn handle(&self, req: Request) -> Result<Value> {
        let store = &self.store;
        let v =
            match req {
                Request::Status => {
                    let inner = self.inner.lock().await;
                    serde_json::to_value(KubeStatus {
                        serving: !inner.running.is_empty(),
                        instance_url: instance_url(),
                        host_url: format!("http://{}", inner.host_addr),
                        kubeconfig: paths::kubeconfig(),
                        host_kubeconfig: paths::kubeconfig_host(),
                        resource_version: store.resource_version(),
                        nodes: store.list::<Node>(None).len(),
                        pods: store.list::<Pod>(None).len(),
                        events: store.list::<Event>(None).len(),
                        eniconfigs: store.list::<EniConfig>(None).len(),
                    })?
                }
                Request::Stop => {
                    let mut inner = self.inner.lock().await;
                    let mut errors = Vec::new();
                    for r in inner.running.drain(..) {
                        let addr = r.addr();
                        if let Err(e) = r.stop().await {
                            errors.push(format!("{addr}: {e}"));
                        }
                    }
                    tracing::info!("the lab's Kubernetes API stopped (kube stop)");
                    if !errors.is_empty() {
                        bail!("stopping the Kubernetes API: {}", errors.join("; "));
                    }
                    Value::Null
                }
                Request::Start => {
                    let mut inner = self.inner.lock().await;
                    if inner.running.is_empty() {
                        let mut running =
                            vec![self.server.start(inner.host_addr).await.context(
                                "serving the Kubernetes API again in the root namespace",
                            )?];
                        for n in &inner.namespaces {
                            running.push(self.server.serve(bind_in(n).await?)?);
                        }
                        inner.running = running;
                        tracing::info!("the lab's Kubernetes API serves again (kube start)");
                    }
                    Value::Null
                }
                Request::Nodes => serde_json::to_value(store.list::<Node>(None))?,
                Request::EniConfigs => serde_json::to_value(store.list::<EniConfig>(None))?,
                Request::Events { node } => {
                    let mut events = store.list::<Event>(None);
                    if let Some(n) = node {
                        let on_node = |namespace: &str, name: &str| {
                            store
                                .get::<Pod>(Some(namespace), name)
                                .is_some_and(|p| objects::pod_node(&p) == Some(n.as_str()))
                        };
                        events.retain(|e| objects::event_concerns_node(e, &n, on_node));
                    }
                    serde_json::to_value(events)?
                }
                Request::Pod { namespace, name } => {
                    serde_json::to_value(store.get::<Pod>(Some(&namespace), &name))?
                }
                Request::Label { node, key, value } => {
                    objects::check_key(&key)?;
                    if let Some(v) = &value {
                        objects::parse_key_value(&format!("{key}={v}"), false)?;
                    }
                    let mut n = self.node(&node)?;
                    if objects::set_label(&mut n, &key, value.as_deref()) {
                        store.put(n)?;
                        tracing::info!(%node, %key, ?value, "node label changed");
                    }
                    Value::Null
                }
                Request::Annotate { node, key, value } => {
                    objects::check_key(&key)?;
                    let mut n = self.node(&node)?;
                    if objects::set_annotation(&mut n, &key, value.as_deref()) {
                        store.put(n)?;
                        tracing::info!(%node, %key, ?value, "node annotation changed");
                    }
                    Value::Null
                }
                Request::Capacity { node, pods } => {
                    let mut n = self.node(&node)?;
                    objects::set_capacity(&mut n, pods);
                    store.put(n)?;
                    tracing::info!(%node, pods, "node pod capacity set");
                    Value::Null
                }
                Request::PutEniConfig {
                    name,
                    subnet,
                    security_groups,
                } => {
                    if subnet.is_empty() {
                        bail!("ENIConfig {name:?}: spec.subnet is required");
                    }
                    let sgs: Vec<&str> = security_groups.iter().map(String::as_str).collect();
                    let mut c = EniConfig::new(&name, &subnet, &sgs);
                    if let Some(old) = store.get::<EniConfig>(None, &name) {
                        // As the API's update: the generation grows when the spec changes.
                        let g = old.metadata.generation.unwrap_or(1);
                        c.metadata.generation = Some(if old.spec == c.spec { g } else { g + 1 });
                    }
                    store.put(c)?;
                    tracing::info!(%name, %subnet, ?security_groups, "ENIConfig written");
                    Value::Null
                }
                Request::DeleteEniConfig { name } => {
                    let gone = store.delete::<EniConfig>(None, &name).is_some();
                    tracing::info!(%name, gone, "ENIConfig deleted");
                    Value::Bool(gone)
                }
                Request::PodScheduled {
                    namespace,
                    name,
                    node,
                } => match store.get::<Pod>(Some(&namespace), &name) {
                    Some(p) => {
                        if objects::pod_node(&p) != Some(node.as_str()) {
                            tracing::warn!(
                                pod = %format!("{namespace}/{name}"),
                                %node,
                                on = ?objects::pod_node(&p),
                                "the API's pod of that name is on another node: left as it is"
                            );
                        }
                        Value::Bool(false)
                    }
                    None => {
                        store.put(objects::pod(&namespace, &name, &node))?;
                        tracing::debug!(pod = %format!("{namespace}/{name}"), %node, "Pod written");
                        Value::Bool(true)
                    }
                },
                Request::PodRunning {
                    namespace,
                    name,
                    node,
                    ips,
                } => {
                    if let Some(mut p) = store.get::<Pod>(Some(&namespace), &name)
                        && objects::pod_node(&p) == Some(node.as_str())
                    {
                        objects::set_running(&mut p, &ips, self.host_ip(&node));
                        store.put(p)?;
                    }
                    Value::Null
                }
                Request::PodDeleted {
                    namespace,
                    name,
                    node,
                } => {
                    let ours = store
                        .get::<Pod>(Some(&namespace), &name)
                        .is_some_and(|p| objects::pod_node(&p) == Some(node.as_str()));
                    let gone = ours && store.delete::<Pod>(Some(&namespace), &name).is_some();
                    Value::Bool(gone)
                }
            };
        Ok(v)
    }
}
