//! The demo's sample backend: a tiny TCP server that says which service and cluster answered.
//!
//! It speaks just enough HTTP/1.1 for `curl` (one response per connection) and answers any
//! other first line (as typed into `nc`) with a plain line, so both show where a connection
//! landed.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Most bytes of a request the backend reads before answering.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Starts a backend on `127.0.0.1:0`; returns its address. Stops on `shutdown`.
pub async fn spawn(
    service: String,
    cluster: String,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((mut conn, peer)) = accepted else {
                continue;
            };
            let (service, cluster) = (service.clone(), cluster.clone());
            tokio::spawn(async move {
                let mut head = Vec::with_capacity(1024);
                let mut buf = [0u8; 1024];
                // Read until the end of an HTTP head, a newline of a plain line, or the cap.
                while head.len() < MAX_REQUEST_HEAD {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                    if is_complete(&head) {
                        break;
                    }
                }
                let reply = respond(&head, &service, &cluster, peer);
                let _ = conn.write_all(reply.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    Ok(addr)
}

fn is_complete(head: &[u8]) -> bool {
    if head.starts_with(b"GET ") || head.starts_with(b"HEAD ") || head.starts_with(b"POST ") {
        head.windows(4).any(|w| w == b"\r\n\r\n")
    } else {
        head.contains(&b'\n')
    }
}

/// The reply for a request head. Pure.
fn respond(head: &[u8], service: &str, cluster: &str, peer: SocketAddr) -> String {
    let body = format!("hello from {service} in cluster {cluster} (you came from {peer})\n");
    if head.starts_with(b"GET ") || head.starts_with(b"HEAD ") || head.starts_with(b"POST ") {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nx-served-by: {cluster}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_and_plain_requests_get_fitting_replies() {
        let peer: SocketAddr = "127.0.0.1:5555".parse().expect("addr");
        let http = respond(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "pay", "west", peer);
        assert!(http.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(http.ends_with("hello from pay in cluster west (you came from 127.0.0.1:5555)\n"));
        let body_len = http.split("\r\n\r\n").nth(1).map(str::len);
        assert!(http.contains(&format!("content-length: {}", body_len.unwrap_or(0))));
        let plain = respond(b"hi\n", "pay", "west", peer);
        assert!(plain.starts_with("hello from pay in cluster west"));
        assert!(is_complete(b"hi\n"));
        assert!(!is_complete(b"GET / HTTP/1.1\r\n"));
    }
}
