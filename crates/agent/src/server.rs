//! The plugin socket: a unix stream socket, mode 0600, one request and one response per
//! connection (framing in the `proto` crate).

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

use proto::{ProtoError, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::http::Counters;
use crate::state::State;
use std::sync::atomic::Ordering;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create socket directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: String },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
}

/// Binds the socket, replacing a stale socket file left by an earlier run.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let shown = path.display().to_string();
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|source| ServerError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            let _ = fs::remove_file(path);
        }
        Ok(_) => return Err(ServerError::NotASocket { path: shown }),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| ServerError::Bind {
        path: shown.clone(),
        source,
    })?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
        ServerError::Bind {
            path: shown,
            source,
        }
    })?;
    Ok(listener)
}

/// Serves connections until the listener fails.
pub async fn serve(
    listener: UnixListener,
    state: Arc<Mutex<State>>,
    counters: Arc<Counters>,
) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let state = state.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, state, counters).await {
                debug!("plugin connection ended early: {e}");
            }
        });
    }
}

async fn connection(
    mut stream: UnixStream,
    state: Arc<Mutex<State>>,
    counters: Arc<Counters>,
) -> std::io::Result<()> {
    let len = stream.read_u32().await? as usize;
    let response = if len > proto::MAX_FRAME {
        Response::Error {
            code: 6,
            message: format!(
                "request of {len} bytes exceeds the limit of {}",
                proto::MAX_FRAME
            ),
        }
    } else {
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await?;
        match proto::decode::<Request>(&payload) {
            Ok(req) => {
                match &req {
                    Request::Add { .. } => counters.add.fetch_add(1, Ordering::Relaxed),
                    Request::Del { .. } => counters.del.fetch_add(1, Ordering::Relaxed),
                    _ => 0,
                };
                let is_add = matches!(req, Request::Add { .. });
                let resp = tokio::task::spawn_blocking(move || {
                    state.lock().unwrap_or_else(|p| p.into_inner()).handle(req)
                })
                .await
                .unwrap_or_else(|e| Response::Error {
                    code: 999,
                    message: format!("agent request handler failed: {e}"),
                });
                if is_add && matches!(&resp, Response::Error { code: 11, .. }) {
                    counters.no_address.fetch_add(1, Ordering::Relaxed);
                }
                resp
            }
            Err(e @ ProtoError::Version { .. }) => Response::Error {
                code: 1,
                message: format!("{e}; install the vpc-cni plugin that ships with this agent"),
            },
            Err(e) => {
                warn!("undecodable request: {e}");
                Response::Error {
                    code: 6,
                    message: format!("cannot decode request: {e}"),
                }
            }
        }
    };
    let frame = proto::encode(&response).map_err(std::io::Error::other)?;
    stream.write_all(&frame).await?;
    stream.shutdown().await
}
