//! moto's EC2 server: finding it, knowing when it answers, and one on a free loopback port for
//! the life of a test. The lab's long-running moto (pid file, log) builds on the first two.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `moto_server` could not be found or started.
#[derive(Debug, thiserror::Error)]
pub enum MotoError {
    #[error("VPC_LAB_MOTO_SERVER={0} is not a file; point it at moto_server or unset it")]
    BadOverride(PathBuf),
    #[error(
        "moto_server not found (looked at $VPC_LAB_MOTO_SERVER, .venv/bin/moto_server of the \
         repository, and PATH); run scripts/setup.sh to install it"
    )]
    NotFound,
    #[error("no free loopback port: {0}")]
    Port(std::io::Error),
    #[error("starting {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("moto_server did not answer HTTP on {addr} within {waited:?}")]
    NoAnswer { addr: SocketAddr, waited: Duration },
}

/// Finds `moto_server`: `$VPC_LAB_MOTO_SERVER`, else the repository's `.venv/bin/moto_server`
/// (see [`crate::repo::find`]), else PATH.
pub fn find_server() -> Result<PathBuf, MotoError> {
    if let Some(p) = std::env::var_os("VPC_LAB_MOTO_SERVER") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(MotoError::BadOverride(p))
        };
    }
    if let Some(p) = crate::repo::find(".venv/bin/moto_server") {
        return Ok(p);
    }
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("moto_server"))
                .find(|c| c.is_file())
        })
        .ok_or(MotoError::NotFound)
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for a server started next).
pub fn free_port() -> Result<u16, MotoError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(MotoError::Port)
}

/// Whether an HTTP request to moto at `addr` gets an HTTP answer (within ~2 s).
pub fn answers_http(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /moto-api/ HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 12];
    matches!(s.read(&mut buf), Ok(n) if n >= 5 && &buf[..5] == b"HTTP/")
}

/// moto_server on a free loopback port, killed (by its own handle) when dropped.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    pub addr: SocketAddr,
}

impl Moto {
    /// Starts moto and waits (30 s at most) until it answers.
    pub fn start() -> Result<Moto, MotoError> {
        let bin = find_server()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
        let child = Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &addr.port().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| MotoError::Spawn { path: bin, source })?;
        let moto = Moto { child, addr };
        let t = Instant::now();
        while !answers_http(addr) {
            if t.elapsed() > Duration::from_secs(30) {
                return Err(MotoError::NoAnswer {
                    addr,
                    waited: t.elapsed(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(moto)
    }

    /// Starts moto for a test, panicking with the reason when it cannot.
    #[track_caller]
    pub fn for_test() -> Moto {
        match Moto::start() {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        }
    }

    /// `http://127.0.0.1:<port>`, for `AWS_ENDPOINT_URL_EC2`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
