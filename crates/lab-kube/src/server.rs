//! Serving a [`Store`] on a TCP listener (plain HTTP): start, stop (open watches end, idle
//! connections close, the port is free), start again on the same address with the same
//! store; and a kubeconfig that points a client at it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Error;
use crate::http::{App, router};
use crate::store::Store;

/// How long [`Running::stop`] waits for open requests to finish.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A server for one store: start it on an address, stop it, start it again.
#[derive(Clone, Debug)]
pub struct Server {
    store: Store,
    bookmark_interval: Duration,
}

impl Server {
    /// A server for `store`, sending watch bookmarks (to watches that allow them) every
    /// minute, as the real server roughly does.
    pub fn new(store: Store) -> Server {
        Server {
            store,
            bookmark_interval: Duration::from_secs(60),
        }
    }

    /// Sends watch bookmarks every `every` instead.
    pub fn bookmark_interval(mut self, every: Duration) -> Server {
        self.bookmark_interval = every;
        self
    }

    /// The store this server serves.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Binds `addr` (port 0 picks a free one) and serves until [`Running::stop`] or drop.
    pub async fn start(&self, addr: SocketAddr) -> Result<Running, Error> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        self.serve(listener)
    }

    /// Serves on a listener bound by the caller (for instance inside another network
    /// namespace) until [`Running::stop`] or drop. Needs a Tokio runtime.
    pub fn serve(&self, listener: TcpListener) -> Result<Running, Error> {
        let local = listener.local_addr().map_err(|source| Error::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        let (stop, stopped) = watch::channel(false);
        let app = router(App {
            store: self.store.clone(),
            stop: stopped.clone(),
            bookmark_interval: self.bookmark_interval,
        });
        let mut signal = stopped;
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // An error means the handle is gone, which also means stop.
                    let _ = signal.wait_for(|s| *s).await;
                })
                .await
        });
        tracing::info!(addr = %local, "lab-kube serving the Kubernetes API");
        Ok(Running {
            addr: local,
            stop,
            task: Some(task),
        })
    }
}

/// A started server. Dropping it stops it too, without waiting.
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Running {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, the server URL for a kubeconfig or `kube::Config::new`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving: open watches end (their streams close cleanly), idle connections are
    /// closed, new connections are refused. Returns once the listener is closed.
    pub async fn stop(mut self) -> Result<(), Error> {
        self.stop.send_replace(true);
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        let addr = self.addr;
        match tokio::time::timeout(STOP_TIMEOUT, &mut task).await {
            Ok(Ok(Ok(()))) => {
                tracing::info!(%addr, "lab-kube stopped");
                Ok(())
            }
            Ok(Ok(Err(source))) => Err(Error::Serve { addr, source }),
            Ok(Err(e)) => Err(Error::Internal(format!(
                "the server task on {addr} failed: {e}"
            ))),
            Err(_) => {
                task.abort();
                Err(Error::StopTimeout {
                    addr,
                    waited: STOP_TIMEOUT,
                })
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Writes a kubeconfig for the server at `url` (plain HTTP, no credentials) to `path`: one
/// cluster, user and context named `lab-kube`, the current context, namespace `default`.
pub fn write_kubeconfig(path: &Path, url: &str) -> Result<(), Error> {
    // A JSON string is a valid YAML double-quoted scalar: the URL needs no other escaping.
    let server = serde_json::to_string(url).map_err(|e| Error::Internal(e.to_string()))?;
    let text = format!(
        "# Written by lab-kube: the lab's Kubernetes API server (plain HTTP, no auth).\n\
         apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: lab-kube\n  cluster:\n    server: {server}\n\
         users:\n\
         - name: lab-kube\n  user: {{}}\n\
         contexts:\n\
         - name: lab-kube\n  context:\n    cluster: lab-kube\n    user: lab-kube\n    namespace: default\n\
         current-context: lab-kube\n\
         preferences: {{}}\n"
    );
    std::fs::write(path, text).map_err(|source| Error::Kubeconfig {
        path: path.to_path_buf(),
        source,
    })
}
