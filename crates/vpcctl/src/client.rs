//! The one thing vpcctl talks to: the agent's introspection listener
//! (`INTROSPECTION_BIND_ADDRESS`, `127.0.0.1:61679` by default), over plain HTTP/1.1 GETs with
//! a 2 s deadline each. Never EC2, never Kubernetes: what vpcctl shows is the agent's own
//! state.

use std::time::Duration;

use crate::doc::{Enis, State, StateAnswer};

/// The agent's introspection address when nothing else is said.
pub const DEFAULT_AGENT: &str = "http://127.0.0.1:61679";

/// The deadline of one request, connection included.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// What to check when the agent does not answer.
pub const UNREACHABLE_HINT: &str = "is the agent running on this node? It serves its state on \
    INTROSPECTION_BIND_ADDRESS (default 127.0.0.1:61679, the node's loopback: run vpcctl on the \
    node, e.g. `kubectl exec -n kube-system ds/vpc-cni -- /app/vpcctl status`) unless \
    DISABLE_INTROSPECTION=true; another address: --agent URL or VPCCTL_AGENT";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: no answer from the agent ({reason}); {UNREACHABLE_HINT}")]
    Unreachable { url: String, reason: String },
    #[error("{url}: the agent answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error(
        "{url}: the agent's answer is not the document vpcctl reads ({source}); is vpcctl from \
         the same image as the agent?"
    )]
    Shape {
        url: String,
        source: serde_json::Error,
    },
}

/// One HTTP answer: its status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// A client of one agent.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    http: ureq::Agent,
}

impl Client {
    /// A client of the agent at `base` (`http://host:port`).
    pub fn new(base: &str) -> Client {
        let http: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            // A 503 (starting, not ready) carries the reason: read it, not an error.
            .http_status_as_error(false)
            // Loopback: no HTTP_PROXY detour.
            .proxy(None)
            .max_redirects(0)
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_string(),
            http,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET path`, whatever the status.
    pub fn get(&self, path: &str) -> Result<Answer, ClientError> {
        let url = self.url(path);
        let unreachable = |e: ureq::Error| ClientError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        };
        let mut resp = self.http.get(&url).call().map_err(unreachable)?;
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().map_err(unreachable)?;
        Ok(Answer { status, body })
    }

    /// `GET path`: the body of a 200, an error otherwise.
    pub fn get_ok(&self, path: &str) -> Result<String, ClientError> {
        let a = self.get(path)?;
        if a.status == 200 {
            Ok(a.body)
        } else {
            Err(ClientError::Status {
                url: self.url(path),
                status: a.status,
                body: a.body.trim().to_string(),
            })
        }
    }

    /// A probe (`/livez`, `/readyz`): `Ok(())` for 200, `Err(reason)` for 503.
    pub fn probe(&self, path: &str) -> Result<Result<(), String>, ClientError> {
        let a = self.get(path)?;
        match a.status {
            200 => Ok(Ok(())),
            503 => Ok(Err(a.body.trim().to_string())),
            status => Err(ClientError::Status {
                url: self.url(path),
                status,
                body: a.body.trim().to_string(),
            }),
        }
    }

    /// `/v1/state`, raw: the body (a 503's too) and what it says.
    pub fn state(&self) -> Result<(String, StateAnswer), ClientError> {
        let path = "/v1/state";
        let a = self.get(path)?;
        let answer = parse_state(a.status, &a.body).map_err(|e| match e {
            ParseError::Shape(source) => ClientError::Shape {
                url: self.url(path),
                source,
            },
            ParseError::Status => ClientError::Status {
                url: self.url(path),
                status: a.status,
                body: a.body.trim().to_string(),
            },
        })?;
        Ok((a.body, answer))
    }

    /// `/v1/enis`, raw and read.
    pub fn enis(&self) -> Result<(String, Enis), ClientError> {
        let path = "/v1/enis";
        let body = self.get_ok(path)?;
        let doc = serde_json::from_str(&body).map_err(|source| ClientError::Shape {
            url: self.url(path),
            source,
        })?;
        Ok((body, doc))
    }
}

/// Why a `/v1/state` answer could not be read.
#[derive(Debug)]
pub enum ParseError {
    /// A status other than 200 and 503.
    Status,
    Shape(serde_json::Error),
}

/// Reads a `/v1/state` answer: 200 is the document, 503 `{"error": why}` the agent starting.
pub fn parse_state(status: u16, body: &str) -> Result<StateAnswer, ParseError> {
    match status {
        200 => serde_json::from_str::<State>(body)
            .map(|s| StateAnswer::Known(Box::new(s)))
            .map_err(ParseError::Shape),
        503 => {
            #[derive(serde::Deserialize)]
            struct Starting {
                error: String,
            }
            serde_json::from_str::<Starting>(body)
                .map(|s| StateAnswer::Starting(s.error))
                .map_err(ParseError::Shape)
        }
        _ => Err(ParseError::Status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// Serves one canned HTTP answer per connection, `n` times; returns the base URL.
    fn serve(answers: Vec<(u16, &'static str)>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            for (status, body) in answers {
                let (mut c, _) = l.accept().unwrap();
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = c.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                let _ = write!(
                    c,
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        base
    }

    #[test]
    fn probes_read_200_and_503() {
        let base = serve(vec![
            (200, "ok\n"),
            (503, "no address available: x\n"),
            (404, "nope"),
        ]);
        let c = Client::new(&base);
        assert_eq!(c.probe("/readyz").unwrap(), Ok(()));
        assert_eq!(
            c.probe("/readyz").unwrap(),
            Err("no address available: x".into())
        );
        let e = c.probe("/readyz").unwrap_err().to_string();
        assert!(e.contains("/readyz: the agent answered 404: nope"), "{e}");
    }

    #[test]
    fn a_starting_agent_says_why() {
        let base = serve(vec![(
            503,
            r#"{"error": "conflist not written yet: restoring the pool (for 2s)"}"#,
        )]);
        let (_, a) = Client::new(&base).state().unwrap();
        assert_eq!(
            a,
            StateAnswer::Starting("conflist not written yet: restoring the pool (for 2s)".into())
        );
    }

    #[test]
    fn a_wrong_shape_is_named() {
        let base = serve(vec![(200, r#"{"stats": {}}"#)]);
        let e = Client::new(&base).state().unwrap_err().to_string();
        assert!(
            e.contains("/v1/state: the agent's answer is not the document"),
            "{e}"
        );
        assert!(e.contains("missing field"), "{e}");
    }

    #[test]
    fn no_agent_names_the_url_and_what_to_check() {
        // A port nothing listens on: bound, then closed.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let base = format!("http://127.0.0.1:{port}");
        let t = std::time::Instant::now();
        let e = Client::new(&base).state().unwrap_err().to_string();
        assert!(t.elapsed() < TIMEOUT + Duration::from_secs(1));
        assert!(
            e.starts_with(&format!("{base}/v1/state: no answer from the agent")),
            "{e}"
        );
        for want in [
            "INTROSPECTION_BIND_ADDRESS",
            "DISABLE_INTROSPECTION",
            "--agent",
        ] {
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn a_silent_agent_times_out_in_two_seconds() {
        // Accepts, never answers.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let t = std::time::Instant::now();
        let e = Client::new(&base).get("/livez").unwrap_err().to_string();
        let took = t.elapsed();
        assert!(
            took >= TIMEOUT && took < TIMEOUT + Duration::from_secs(2),
            "{took:?}"
        );
        assert!(e.contains("no answer from the agent"), "{e}");
        drop(l);
    }
}
