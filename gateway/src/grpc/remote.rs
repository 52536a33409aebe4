//! The admin API's connections, each stamped with its [`Caller`]: plain TCP on the loopback
//! listener ([`local_incoming`]), and mutual TLS for operators on the remote listener
//! ([`tls_incoming`]): TLS 1.3 only, the gateway's own certificate as the server's, a client
//! certificate mandatory and verified by [`OperatorVerifier`] (chain to the federation bundle,
//! an operator SPIFFE ID of our trust domain). There is no plaintext on the remote listener and
//! no fallback: a client without an operator certificate never gets an HTTP/2 byte through.
//!
//! Handshakes run in their own tasks, bounded in number ([`MAX_HANDSHAKES`]) and time
//! ([`HANDSHAKE_TIMEOUT`]), so a slow or silent client cannot hold up the accept loop.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use super::caller::Caller;
use crate::identity::{CertResolver, Identity, OperatorVerifier};

/// Longest a client may take for its TLS handshake on the remote listener.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once on the remote listener; more connections are closed.
pub const MAX_HANDSHAKES: usize = 64;
/// Pause after a failed `accept` (out of file descriptors, say) before the next one.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// The admin API is gRPC: HTTP/2 only.
const ALPN_H2: &[u8] = b"h2";

/// An admin connection and who is on its other end (tonic copies the caller into every
/// request's extensions).
pub struct AdminConn<S> {
    inner: S,
    caller: Caller,
}

impl<S> std::fmt::Debug for AdminConn<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConn")
            .field("caller", &self.caller)
            .finish_non_exhaustive()
    }
}

impl<S> Connected for AdminConn<S> {
    type ConnectInfo = Caller;

    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AdminConn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AdminConn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Loopback connections, every one a [`Caller::Local`].
pub fn local_incoming(
    listener: TcpListener,
) -> impl Stream<Item = io::Result<AdminConn<TcpStream>>> + Send + 'static {
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        accepted.map(|tcp| {
            let _ = tcp.set_nodelay(true);
            AdminConn {
                inner: tcp,
                caller: Caller::Local,
            }
        })
    })
}

/// The remote listener's TLS settings: TLS 1.3 only, HTTP/2, our certificate (hot-reloaded),
/// an operator certificate required of every client, no session resumption (a resumed
/// session would skip the client-certificate check).
pub fn server_config(identity: &Arc<Identity>) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_client_cert_verifier(OperatorVerifier::new(identity.clone()))
    .with_cert_resolver(Arc::new(CertResolver(identity.clone())));
    tls.alpn_protocols = vec![ALPN_H2.to_vec()];
    tls.max_early_data_size = 0;
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(tls))
}

/// Operator connections on `listener`, each handshaken and verified before it is yielded,
/// until `shutdown`.
pub fn tls_incoming(
    listener: TcpListener,
    identity: Arc<Identity>,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> impl Stream<Item = io::Result<AdminConn<TlsStream<TcpStream>>>> + Send + 'static {
    let (tx, rx) = mpsc::channel(MAX_HANDSHAKES);
    let acceptor = TlsAcceptor::from(tls);
    let verifier = OperatorVerifier::new(identity);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "remote admin listener cannot accept");
                        tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(%peer, limit = MAX_HANDSHAKES, "remote admin: too many TLS handshakes in progress; connection closed");
                continue;
            };
            let (acceptor, verifier, tx) = (acceptor.clone(), verifier.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                if let Some(conn) = handshake(tcp, peer, &acceptor, &verifier).await {
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// One TLS handshake; the connection and its operator, or `None` (logged) if refused.
async fn handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: &TlsAcceptor,
    verifier: &OperatorVerifier,
) -> Option<AdminConn<TlsStream<TcpStream>>> {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "remote admin: TLS handshake refused");
            return None;
        }
        Err(_) => {
            tracing::info!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "remote admin: TLS handshake timed out");
            return None;
        }
    };
    // The verifier passed this leaf during the handshake; read the operator back from it.
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())?;
    match verifier.operator_of(leaf.as_ref()) {
        Ok(operator) => {
            tracing::debug!(%peer, operator = %operator, "remote admin: operator connected");
            Some(AdminConn {
                inner: tls,
                caller: Caller::Operator(operator),
            })
        }
        Err(e) => {
            tracing::warn!(%peer, error = %e, "remote admin: verified certificate names no operator; closed");
            None
        }
    }
}
