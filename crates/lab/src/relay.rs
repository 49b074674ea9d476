//! A TCP relay: each accepted connection is piped to `upstream` (moto). The lab daemon binds
//! the listener on 127.0.0.1:1339 inside each instance namespace, so an agent there reaches
//! EC2 with `AWS_ENDPOINT_URL_EC2=http://127.0.0.1:1339`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// Relays connections accepted on `listener` to `upstream` until the task is dropped.
pub async fn relay(listener: TcpListener, upstream: SocketAddr) {
    let local = listener.local_addr().ok();
    loop {
        let (mut client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // e.g. EMFILE: back off instead of spinning
                tracing::warn!(?local, "relay accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let mut up = match TcpStream::connect(upstream).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, %upstream, "relay cannot reach upstream: {e}");
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = up.set_nodelay(true);
            match tokio::io::copy_bidirectional(&mut client, &mut up).await {
                Ok((to_up, to_client)) => {
                    tracing::trace!(%peer, %upstream, to_up, to_client, "relay connection closed")
                }
                Err(e) => tracing::debug!(%peer, %upstream, "relay connection ended: {e}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An upstream that answers each connection with "<n>:" + what it read, per connection.
    #[tokio::test]
    async fn relays_both_directions_and_many_connections() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        let up_task = tokio::spawn(async move {
            let mut n = 0u32;
            loop {
                let (mut s, _) = upstream.accept().await.unwrap();
                n += 1;
                let tag = n;
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    s.read_to_end(&mut buf).await.unwrap();
                    s.write_all(format!("{tag}:").as_bytes()).await.unwrap();
                    s.write_all(&buf).await.unwrap();
                    s.shutdown().await.unwrap();
                });
            }
        });

        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let relay_task = tokio::spawn(relay(front, up_addr));

        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut seen = Vec::new();
        for _ in 0..3 {
            let mut c = TcpStream::connect(front_addr).await.unwrap();
            let (mut r, mut w) = c.split();
            let send = async {
                w.write_all(&payload).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let recv = r.read_to_end(&mut got);
            let (_, n) = tokio::join!(send, recv);
            n.unwrap();
            let colon = got.iter().position(|b| *b == b':').unwrap();
            seen.push(String::from_utf8(got[..colon].to_vec()).unwrap());
            assert_eq!(&got[colon + 1..], &payload[..], "payload relayed intact");
        }
        assert_eq!(
            seen,
            ["1", "2", "3"],
            "one upstream connection per client connection"
        );
        relay_task.abort();
        up_task.abort();
    }

    #[tokio::test]
    async fn unreachable_upstream_closes_the_client_and_keeps_serving() {
        let dead = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let relay_task = tokio::spawn(relay(front, dead));
        for _ in 0..2 {
            let mut c = TcpStream::connect(front_addr).await.unwrap();
            let mut buf = Vec::new();
            let n = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf))
                .await
                .expect("client closed promptly")
                .unwrap_or(0);
            assert_eq!(n, 0);
        }
        relay_task.abort();
    }
}
