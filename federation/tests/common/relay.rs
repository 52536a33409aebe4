//! A TCP relay on a loopback port in front of one server, whose link can be cut for real.
//!
//! A client connects to the relay instead of the server. [`Relay::sever`] closes every
//! relayed connection and, until [`Relay::restore`], closes each new one as soon as it is
//! accepted: the client sees its connections drop and every reconnect fail, while other
//! clients that talk to the server directly keep working. That is a network partition
//! between one client and the server, which stopping the server cannot give (nobody could
//! write meanwhile).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug)]
struct Shared {
    up: AtomicBool,
    /// Bumped by every `sever`: relayed connections end when it changes.
    epoch: watch::Sender<u64>,
    relayed: AtomicU64,
    refused: AtomicU64,
}

/// A relay to one server. Stops relaying (and closes every connection) on drop.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Relay {
    /// Listens on a free loopback port and relays every connection to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let addr = listener.local_addr().expect("relay address");
        let shared = Arc::new(Shared {
            up: AtomicBool::new(true),
            epoch: watch::channel(0).0,
            relayed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, target, shared.clone()));
        Self {
            addr,
            shared,
            accept,
        }
    }

    /// `http://<relay address>`, to give a client instead of the server's endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts the link: closes every relayed connection, refuses new ones until `restore`.
    pub fn sever(&self) {
        // Refuse first, so no connection accepted from now on slips through.
        self.shared.up.store(false, Ordering::SeqCst);
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    /// Relays new connections again.
    pub fn restore(&self) {
        self.shared.up.store(true, Ordering::SeqCst);
    }

    /// Connections relayed to the server so far.
    pub fn relayed(&self) -> u64 {
        self.shared.relayed.load(Ordering::SeqCst)
    }

    /// Connections closed on accept while severed.
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.up.store(false, Ordering::SeqCst);
        self.shared.epoch.send_modify(|e| *e += 1);
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    while let Ok((client, _)) = listener.accept().await {
        // Subscribed before checking `up`: a `sever` racing with this accept either makes
        // the check fail or changes the epoch this connection watches.
        let mut epoch = shared.epoch.subscribe();
        epoch.borrow_and_update();
        if !shared.up.load(Ordering::SeqCst) {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            drop(client);
            continue;
        }
        shared.relayed.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(target).await else {
                return;
            };
            let mut client = client;
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                _ = epoch.changed() => {}
            }
            // Both sockets close here.
        });
    }
}
