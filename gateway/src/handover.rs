//! Replacing a gateway process on a node without losing a connection or a DNS answer
//! (docs/upgrade.md).
//!
//! A running gateway with `handover.socket` listens there (a Unix stream socket, its
//! directory private to the gateway's user). A new gateway process started with the same
//! config connects before binding anything and takes the old one's listening sockets:
//!
//! ```text
//! successor                               predecessor
//!   Hello{version}                 ─────▶
//!                                  ◀─────   Offer{quic_port, sockets, more} + SCM_RIGHTS
//!                                           (publisher paused, /ready 503 "handing over")
//!   ... binds QUIC on the other port, syncs the catalog, publishes, serves ...
//!   Ready{gateway}                 ─────▶
//!                                  ◀─────   Released (admin listeners no longer served)
//!   re-asserts its records, listens on the hand-over socket itself
//!                                           SIGTERM: stops accepting, drains in flight,
//!                                           revokes its (now empty) lease, exits
//! ```
//!
//! - **Listeners are the same kernel sockets** (VIP listeners, DNS UDP and TCP, admin HTTP
//!   and gRPC): no connection queued in a backlog and no datagram in a receive buffer is lost
//!   when the old process stops reading them. Both processes accept on them until the old
//!   one gets SIGTERM.
//! - **The QUIC port alternates** between `tunnel.listen`'s port and `tunnel.handover_port`:
//!   QUIC connections are state inside one process, so the successor binds the other port and
//!   publishes it under the same gateway id; peers open new connections there as soon as they
//!   see the record, while streams on the old process's connections finish there.
//! - **One writer per key**: the predecessor pauses its publisher when it offers its sockets
//!   (the records are the same keys), the successor re-asserts every record once released, so
//!   revoking the old lease at the end removes nothing the successor published.
//! - A successor that dies before `Ready` (EOF) aborts the hand-over: the predecessor resumes
//!   publishing and reports ready again. Every read has a deadline.

use std::collections::BTreeMap;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Version of the hand-over protocol; a successor speaking another one is refused.
pub const VERSION: u32 = 1;
/// Most descriptors passed in one message (the kernel's limit is 253).
const FDS_PER_MESSAGE: usize = 200;
/// Largest message body accepted.
const MAX_MESSAGE: usize = 1 << 20;
/// Deadline for each step of the exchange that has no reason to wait (a hello, an offer).
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a predecessor waits for its successor to become ready: a catalog sync of a
/// large federation takes seconds; past this the hand-over is abandoned.
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// What a passed socket is, so the successor puts each one where it belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    DnsUdp,
    DnsTcp,
    AdminHttp,
    AdminGrpc,
    AdminGrpcRemote,
    Vip,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Message {
    Hello {
        version: u32,
    },
    Offer {
        version: u32,
        quic_port: u16,
        /// One entry per descriptor passed with this message, in order.
        sockets: Vec<(Kind, SocketAddr)>,
        /// More offers follow (descriptors are passed at most 200 per message).
        more: bool,
    },
    /// `gateway`: the successor's gateway id, which its catalog record is published under
    /// (absent from a successor of an older version).
    Ready {
        #[serde(default)]
        gateway: Option<String>,
    },
    Released,
    Refused {
        reason: String,
    },
}

/// Why a hand-over failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("hand-over socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("the running gateway refused the hand-over: {0}")]
    Refused(String),
    #[error("unexpected hand-over message: {0}")]
    Protocol(String),
}

/// Listening sockets by kind and address: the ones a gateway could offer a successor, or the
/// ones it inherited from a predecessor. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Sockets {
    inner: Arc<Mutex<SocketMap>>,
}

type SocketMap = BTreeMap<(Kind, SocketAddr), Vec<Held>>;

/// One socket of a set: a descriptor of the set's own (a duplicate, or one inherited), or
/// a share of a listener that also serves, duplicated only when offered. A VIP listener is
/// held shared: a gateway with 10,000 of them would otherwise hold 20,000 descriptors, over
/// common hard limits, for a hand-over that may never come.
#[derive(Debug)]
enum Held {
    Own(OwnedFd),
    Shared(Arc<tokio::net::TcpListener>),
}

impl Held {
    fn duplicate(&self) -> io::Result<OwnedFd> {
        match self {
            Held::Own(fd) => fd.try_clone(),
            Held::Shared(listener) => listener.as_fd().try_clone_to_owned(),
        }
    }

    fn into_owned(self) -> io::Result<OwnedFd> {
        match self {
            Held::Own(fd) => Ok(fd),
            Held::Shared(listener) => listener.as_fd().try_clone_to_owned(),
        }
    }
}

impl Sockets {
    /// Keeps a duplicate of `fd` (the caller keeps its own) under `kind` and `addr`.
    pub fn add(&self, kind: Kind, addr: SocketAddr, fd: impl AsFd) -> io::Result<()> {
        let dup = fd.as_fd().try_clone_to_owned()?;
        self.lock()
            .entry((kind, addr))
            .or_default()
            .push(Held::Own(dup));
        Ok(())
    }

    /// Keeps a share of `listener` (which also serves) under `kind` and `addr`: no
    /// descriptor of its own until the set is offered. The socket stays open until both the
    /// server and the set let go of it.
    pub fn add_shared(&self, kind: Kind, addr: SocketAddr, listener: Arc<tokio::net::TcpListener>) {
        self.lock()
            .entry((kind, addr))
            .or_default()
            .push(Held::Shared(listener));
    }

    /// Forgets the sockets of `kind` at `addr` (closing the duplicates).
    pub fn remove(&self, kind: Kind, addr: SocketAddr) {
        self.lock().remove(&(kind, addr));
    }

    /// Takes every socket of `kind` at `addr` (a shared one as a duplicate: one that
    /// cannot be duplicated, out of descriptors, is left out).
    pub fn take(&self, kind: Kind, addr: SocketAddr) -> Vec<OwnedFd> {
        owned(self.lock().remove(&(kind, addr)).unwrap_or_default())
    }

    /// Takes the one TCP listener of `kind` at `addr`.
    pub fn take_tcp(&self, kind: Kind, addr: SocketAddr) -> Option<std::net::TcpListener> {
        self.take(kind, addr)
            .into_iter()
            .next()
            .map(std::net::TcpListener::from)
    }

    /// Takes the sockets of `kind` bound to exactly `addr`, or, when `addr` has port 0 (any
    /// port), the ones bound to its IP on any port.
    pub fn take_matching(&self, kind: Kind, addr: SocketAddr) -> Vec<OwnedFd> {
        let mut map = self.lock();
        let key = map
            .keys()
            .find(|(k, a)| *k == kind && (*a == addr || (addr.port() == 0 && a.ip() == addr.ip())))
            .copied();
        owned(key.and_then(|k| map.remove(&k)).unwrap_or_default())
    }

    /// Drops every socket left (inherited but not wanted); returns how many.
    pub fn clear(&self) -> usize {
        let mut map = self.lock();
        let n = map.values().map(Vec::len).sum();
        map.clear();
        n
    }

    /// Fresh duplicates of every socket, in key order.
    fn duplicates(&self) -> io::Result<Vec<(Kind, SocketAddr, OwnedFd)>> {
        let map = self.lock();
        let mut out = Vec::new();
        for ((kind, addr), fds) in map.iter() {
            for held in fds {
                out.push((*kind, *addr, held.duplicate()?));
            }
        }
        Ok(out)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SocketMap> {
        // A panic while holding the lock leaves the map consistent (every method is one
        // insert or remove), so a poisoned lock is still good.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn owned(held: Vec<Held>) -> Vec<OwnedFd> {
    held.into_iter()
        .filter_map(|h| match h.into_owned() {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!(error = %e, "cannot duplicate a listening socket");
                None
            }
        })
        .collect()
}

/// The two sides of a gateway's listening sockets: what it would offer a successor (a
/// duplicate of each socket it serves) and what it inherited from a predecessor (taken by
/// whatever binds the same address).
#[derive(Debug, Clone, Default)]
pub struct SocketSets {
    pub offer: Sockets,
    pub inherited: Sockets,
}

/// A listening TCP socket for `addr`: the one of `kind` inherited from a predecessor, or a
/// new one (tokio's bind: `SO_REUSEADDR`, backlog 1024).
pub async fn tcp_listener(
    inherited: &Sockets,
    kind: Kind,
    addr: SocketAddr,
) -> io::Result<tokio::net::TcpListener> {
    match inherited.take_matching(kind, addr).into_iter().next() {
        Some(fd) => {
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(listener)
        }
        None => tokio::net::TcpListener::bind(addr).await,
    }
}

/// What a successor received: the sockets, the predecessor's QUIC port and the connection
/// to tell it when this process is ready.
#[derive(Debug)]
pub struct Successor {
    path: PathBuf,
    stream: UnixStream,
    /// The QUIC port the predecessor serves on (the successor binds the other one).
    pub quic_port: u16,
    /// The predecessor's listening sockets, taken by whatever binds their address.
    pub sockets: Sockets,
}

/// Connects to the gateway serving at `path` and takes its sockets. `Ok(None)` when no
/// gateway answers there (nothing to take over: the caller binds fresh sockets).
pub fn take_over(path: &Path) -> Result<Option<Successor>, HandoverError> {
    let io_err = |source| HandoverError::Io {
        path: path.to_owned(),
        source,
    };
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(io_err(e)),
    };
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(io_err)?;
    send(&stream, &Message::Hello { version: VERSION }, &[]).map_err(io_err)?;
    let sockets = Sockets::default();
    let mut passed = 0;
    let quic_port = loop {
        let (msg, fds) = recv(&stream).map_err(io_err)?;
        match msg {
            Message::Offer {
                version,
                quic_port,
                sockets: listed,
                more,
            } => {
                if version != VERSION {
                    return Err(HandoverError::Protocol(format!(
                        "offer of protocol version {version}, this gateway speaks {VERSION}"
                    )));
                }
                if listed.len() != fds.len() {
                    return Err(HandoverError::Protocol(format!(
                        "offer lists {} sockets but passed {} descriptors",
                        listed.len(),
                        fds.len()
                    )));
                }
                passed += fds.len();
                let mut map = sockets.lock();
                for ((kind, addr), fd) in listed.into_iter().zip(fds) {
                    map.entry((kind, addr)).or_default().push(Held::Own(fd));
                }
                drop(map);
                if !more {
                    break quic_port;
                }
            }
            Message::Refused { reason } => return Err(HandoverError::Refused(reason)),
            other => return Err(HandoverError::Protocol(format!("{other:?}"))),
        }
    };
    tracing::info!(
        path = %path.display(),
        sockets = passed,
        quic_port,
        "took over the listening sockets of the running gateway"
    );
    Ok(Some(Successor {
        path: path.to_owned(),
        stream,
        quic_port,
        sockets,
    }))
}

impl Successor {
    /// Tells the predecessor this process is ready, publishing as gateway `gateway`, and
    /// waits until it has stopped serving the admin listeners and writing the catalog.
    /// Returns the connection, to keep open while the predecessor drains (its end closes
    /// when it exits).
    pub fn ready(self, gateway: &str) -> Result<UnixStream, HandoverError> {
        let io_err = |source| HandoverError::Io {
            path: self.path.clone(),
            source,
        };
        let ready = Message::Ready {
            gateway: Some(gateway.to_owned()),
        };
        send(&self.stream, &ready, &[]).map_err(io_err)?;
        match recv(&self.stream).map_err(io_err)?.0 {
            Message::Released => Ok(self.stream),
            other => Err(HandoverError::Protocol(format!("{other:?}"))),
        }
    }
}

/// What a predecessor does at each step; called from the hand-over thread.
pub trait Predecessor: Send + Sync + 'static {
    /// The sockets to offer now (duplicates are taken) and the QUIC port in use.
    fn offer(&self) -> io::Result<(u16, Sockets)>;
    /// The offer went out: stop writing the catalog, report not ready.
    fn offered(&self);
    /// The successor is ready: stop serving the admin listeners.
    fn released(&self);
    /// The successor went away before it was ready: resume.
    fn abandoned(&self, why: &str);
}

/// Binds the hand-over socket at `path` for a future successor, replacing a stale file (or
/// the socket of a predecessor this process has taken over, which keeps its connection) by
/// an atomic rename, so there is never a moment without one.
pub fn listen(path: &Path) -> Result<UnixListener, HandoverError> {
    let io_err = |source| HandoverError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension(format!("new-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(io_err)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    }
    std::fs::rename(&tmp, path).map_err(io_err)?;
    Ok(listener)
}

/// A completed hand-over, as the predecessor learnt it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandedOver {
    /// The gateway id the successor publishes under; `None` when it did not say (a
    /// successor of an older version).
    pub successor: Option<String>,
}

/// Serves successors on `listener` until one takes over (then `handed_over` is set and the
/// task ends) or `stop` is cancelled. One successor at a time; a successor of another user
/// or protocol version is refused.
pub async fn serve(
    listener: UnixListener,
    predecessor: Arc<dyn Predecessor>,
    handed_over: watch::Sender<Option<HandedOver>>,
    stop: CancellationToken,
) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the hand-over socket");
            return;
        }
    };
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "hand-over accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let stream = match stream.into_std().and_then(|s| {
            s.set_nonblocking(false)?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "hand-over connection unusable");
                continue;
            }
        };
        let p = predecessor.clone();
        let done = tokio::task::spawn_blocking(move || hand_over(&stream, p.as_ref())).await;
        match done {
            Ok(Ok(done)) => {
                handed_over.send_replace(Some(done));
                return;
            }
            Ok(Err(why)) => {
                tracing::warn!(%why, "hand-over abandoned; serving on");
            }
            Err(e) => tracing::error!(error = %e, "hand-over thread failed"),
        }
    }
}

/// One hand-over, on the blocking thread. `Err` leaves this process serving as before.
fn hand_over(stream: &UnixStream, p: &dyn Predecessor) -> Result<HandedOver, String> {
    let creds = rustix::net::sockopt::socket_peercred(stream).map_err(|e| e.to_string())?;
    let (uid, pid) = (creds.uid.as_raw(), creds.pid.as_raw_pid());
    let me = rustix::process::geteuid().as_raw();
    if uid != me && uid != 0 {
        return Err(refuse(
            stream,
            format!("uid {uid} is not this gateway's user ({me})"),
        ));
    }
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(|e| e.to_string())?;
    match recv(stream).map_err(|e| e.to_string())?.0 {
        Message::Hello { version } if version == VERSION => {}
        Message::Hello { version } => {
            return Err(refuse(
                stream,
                format!("protocol version {version}; this gateway speaks {VERSION}"),
            ));
        }
        other => return Err(format!("expected hello, got {other:?}")),
    }
    let (quic_port, sockets) = p.offer().map_err(|e| e.to_string())?;
    let all = sockets.duplicates().map_err(|e| e.to_string())?;
    tracing::info!(
        pid,
        sockets = all.len(),
        "a successor process is taking over; pausing catalog writes"
    );
    p.offered();
    let sent = send_offer(stream, quic_port, &all);
    drop(all);
    if let Err(e) = sent {
        p.abandoned(&e.to_string());
        return Err(e.to_string());
    }
    let _ = stream.set_read_timeout(Some(READY_TIMEOUT));
    match recv(stream) {
        Ok((Message::Ready { gateway }, _)) => {
            p.released();
            if let Err(e) = send(stream, &Message::Released, &[]) {
                // It is serving; only the acknowledgement was lost.
                tracing::warn!(error = %e, "hand-over: could not acknowledge the successor");
            }
            tracing::info!(
                pid,
                successor = gateway.as_deref().unwrap_or("(not named)"),
                "the successor is ready; drain this process with SIGTERM"
            );
            Ok(HandedOver { successor: gateway })
        }
        Ok((other, _)) => {
            let why = format!("expected ready, got {other:?}");
            p.abandoned(&why);
            Err(why)
        }
        Err(e) => {
            let why = format!("the successor went away before it was ready ({e})");
            p.abandoned(&why);
            Err(why)
        }
    }
}

/// Tells the would-be successor why it is refused (best effort); returns the reason.
fn refuse(stream: &UnixStream, reason: String) -> String {
    let _ = send(
        stream,
        &Message::Refused {
            reason: reason.clone(),
        },
        &[],
    );
    reason
}

fn send_offer(
    stream: &UnixStream,
    quic_port: u16,
    all: &[(Kind, SocketAddr, OwnedFd)],
) -> io::Result<()> {
    let mut chunks = all.chunks(FDS_PER_MESSAGE).peekable();
    if chunks.peek().is_none() {
        return send(
            stream,
            &Message::Offer {
                version: VERSION,
                quic_port,
                sockets: Vec::new(),
                more: false,
            },
            &[],
        );
    }
    while let Some(chunk) = chunks.next() {
        let msg = Message::Offer {
            version: VERSION,
            quic_port,
            sockets: chunk.iter().map(|(k, a, _)| (*k, *a)).collect(),
            more: chunks.peek().is_some(),
        };
        let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, _, fd)| fd.as_fd()).collect();
        send(stream, &msg, &fds)?;
    }
    Ok(())
}

/// One frame: a 4-byte big-endian length, then JSON; `fds` ride on the frame's first byte.
fn send(stream: &UnixStream, msg: &Message, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(io::Error::other)?;
    let len = u32::try_from(body.len())
        .map_err(|_| io::Error::other("hand-over message too large"))?
        .to_be_bytes();
    let iov = [IoSlice::new(&len), IoSlice::new(&body)];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    let sent = sendmsg(stream, &iov, &mut control, SendFlags::empty())?;
    // A stream socket may take part of it; the descriptors went with the first byte.
    let total = len.len() + body.len();
    if sent < total {
        let mut rest = Vec::with_capacity(total - sent);
        rest.extend_from_slice(&len);
        rest.extend_from_slice(&body);
        (&*stream).write_all(&rest[sent..])?;
    }
    Ok(())
}

fn recv(stream: &UnixStream) -> io::Result<(Message, Vec<OwnedFd>)> {
    let mut len = [0u8; 4];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = {
        let mut iov = [IoSliceMut::new(&mut len)];
        recvmsg(stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?.bytes
    };
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = message {
            fds.extend(received);
        }
    }
    if got == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if got < len.len() {
        (&*stream).read_exact(&mut len[got..])?;
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_MESSAGE {
        return Err(io::Error::other(format!(
            "hand-over message of {n} bytes (limit {MAX_MESSAGE})"
        )));
    }
    let mut body = vec![0u8; n];
    (&*stream).read_exact(&mut body)?;
    let msg = serde_json::from_slice(&body).map_err(io::Error::other)?;
    Ok((msg, fds))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Default)]
    struct Recorder {
        sockets: Sockets,
        steps: Mutex<Vec<String>>,
        offers: AtomicUsize,
    }

    impl Predecessor for Recorder {
        fn offer(&self) -> io::Result<(u16, Sockets)> {
            self.offers.fetch_add(1, Ordering::SeqCst);
            Ok((15443, self.sockets.clone()))
        }
        fn offered(&self) {
            self.steps.lock().expect("lock").push("offered".into());
        }
        fn released(&self) {
            self.steps.lock().expect("lock").push("released".into());
        }
        fn abandoned(&self, _why: &str) {
            self.steps.lock().expect("lock").push("abandoned".into());
        }
    }

    fn steps(r: &Recorder) -> Vec<String> {
        r.steps.lock().expect("lock").clone()
    }

    /// 450 listeners (three messages of descriptors) pass; each arrives as the same socket
    /// (a connection made to the old listener is accepted from the inherited one); an
    /// abandoned hand-over resumes, a completed one reports `handed_over`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sockets_pass_and_the_steps_run_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("handover.sock");
        let recorder = Arc::new(Recorder::default());
        let mut originals = Vec::new();
        for _ in 0..450 {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = l.local_addr().expect("addr");
            recorder.sockets.add(Kind::Vip, addr, &l).expect("dup");
            originals.push((addr, l));
        }
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let udp_addr = udp.local_addr().expect("addr");
        recorder
            .sockets
            .add(Kind::DnsUdp, udp_addr, &udp)
            .expect("dup");
        let listener = listen(&path).expect("listen");
        let (handed_over, mut handed_rx) = watch::channel(None);
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, recorder.clone(), handed_over, stop.clone()));

        // A successor that goes away after the offer: abandoned, the old one serves on.
        let path2 = path.clone();
        let first = tokio::task::spawn_blocking(move || take_over(&path2))
            .await
            .expect("join")
            .expect("take over")
            .expect("someone answered");
        assert_eq!(first.quic_port, 15443);
        drop(first);
        let r = recorder.clone();
        let abandoned = tokio::time::timeout(Duration::from_secs(10), async move {
            while steps(&r).len() < 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(abandoned.is_ok(), "steps: {:?}", steps(&recorder));
        assert_eq!(steps(&recorder), vec!["offered", "abandoned"]);
        assert_eq!(*handed_rx.borrow(), None);

        // A successor that sees it through.
        let path2 = path.clone();
        let successor = tokio::task::spawn_blocking(move || take_over(&path2))
            .await
            .expect("join")
            .expect("take over")
            .expect("someone answered");
        let (addr, original) = &originals[449];
        let inherited = successor
            .sockets
            .take_tcp(Kind::Vip, *addr)
            .expect("the last listener was passed");
        let client = std::net::TcpStream::connect(addr).expect("connect");
        let (accepted, peer) = inherited.accept().expect("accept on the inherited socket");
        assert_eq!(peer, client.local_addr().expect("client addr"));
        drop((accepted, original));
        assert_eq!(
            successor.sockets.take(Kind::DnsUdp, udp_addr).len(),
            1,
            "the DNS socket"
        );
        assert_eq!(successor.sockets.clear(), 449);
        let _conn = tokio::task::spawn_blocking(move || successor.ready("east-1"))
            .await
            .expect("join")
            .expect("released");
        let done = handed_rx
            .wait_for(Option::is_some)
            .await
            .expect("handed over");
        assert_eq!(
            done.as_ref().and_then(|d| d.successor.as_deref()),
            Some("east-1")
        );
        drop(done);
        assert_eq!(
            steps(&recorder),
            vec!["offered", "abandoned", "offered", "released"]
        );
        assert_eq!(recorder.offers.load(Ordering::SeqCst), 2);
        server.await.expect("server task");
    }

    /// Processes of two versions hand over to each other: a `Ready` naming the successor
    /// is read by a predecessor that knows only the bare `Ready` (version 1 as first
    /// shipped), and a bare one is read here as "not named".
    #[test]
    fn ready_is_read_across_versions() {
        #[derive(Debug, Deserialize, PartialEq)]
        #[serde(tag = "type", rename_all = "snake_case")]
        enum FirstShipped {
            Ready,
        }
        let named = serde_json::to_string(&Message::Ready {
            gateway: Some("east-a-2".into()),
        })
        .expect("encode");
        assert_eq!(
            serde_json::from_str::<FirstShipped>(&named).expect("an older predecessor reads it"),
            FirstShipped::Ready
        );
        let bare = serde_json::from_str::<Message>(r#"{"type":"ready"}"#).expect("decode");
        assert!(matches!(bare, Message::Ready { gateway: None }), "{bare:?}");
    }

    #[test]
    fn nobody_listening_is_nothing_to_take_over() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(
            take_over(&dir.path().join("none.sock"))
                .expect("no error")
                .is_none()
        );
        // A stale socket file (its process gone) is the same.
        let path = dir.path().join("stale.sock");
        drop(UnixListener::bind(&path).expect("bind"));
        assert!(take_over(&path).expect("no error").is_none());
    }

    #[test]
    fn listen_replaces_the_file_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("h.sock");
        let first = listen(&path).expect("first");
        let second = listen(&path).expect("second replaces it");
        second.set_nonblocking(true).expect("nonblocking");
        let _c = UnixStream::connect(&path).expect("connect");
        assert!(second.accept().is_ok(), "the new listener owns the path");
        drop(first);
    }
}
