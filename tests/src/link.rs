//! Two clusters' gateways as real processes on a real etcd, the serving one behind the
//! user-space UDP relay ([`crate::relay`]): it advertises the relay's address as its tunnel
//! address, so every QUIC datagram between the two gateways crosses the relay, where a test
//! counts them or makes the link lossy, slow or partitioned. etcd is not behind the relay.

use std::net::SocketAddr;

use meshup_test_support::EtcdServer;
use meshup_test_support::relay::Relay;

use crate::failover::SERVICE;
use crate::gateways::{Certs, GatewayProcess, GatewaySpec, free_udp_port};
use crate::workload::EchoServer;

/// The port `echo.prod` is exported and called on.
pub const PORT: u16 = 7000;

/// East (the client side) and west (exports `echo.prod` on [`PORT`]), west's tunnel behind
/// a relay.
#[derive(Debug)]
pub struct Link {
    pub east: GatewayProcess,
    pub west: GatewayProcess,
    pub echo: EchoServer,
    pub relay: Relay,
    /// East's virtual IP for `echo.prod`, with [`PORT`].
    pub vip: SocketAddr,
    // Dropped last: the gateways use both.
    _certs: Certs,
    _etcd: EtcdServer,
}

impl Link {
    /// Starts etcd, the relay and both gateways (`worker_threads` for both; `None`: their
    /// default) under the etcd key `prefix`; returns once east routes `echo.prod`.
    pub async fn start(prefix: &str, worker_threads: Option<usize>) -> Self {
        let etcd = tokio::task::spawn_blocking(EtcdServer::start)
            .await
            .expect("etcd start task");
        let certs = Certs::new(&["east", "west"]);
        let echo = EchoServer::start().await.expect("echo server");
        let west_port = free_udp_port();
        let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], west_port)))
            .await
            .expect("relay");
        let mut west = GatewayProcess::start(GatewaySpec {
            exports: vec![("echo", "prod", PORT, echo.addr())],
            tunnel_port: Some(west_port),
            advertise: Some(relay.addr()),
            worker_threads,
            ..GatewaySpec::new("west", "127.90.2.0/24", &etcd, &certs, prefix)
        });
        let mut east = GatewayProcess::start(GatewaySpec {
            worker_threads,
            ..GatewaySpec::new("east", "127.90.1.0/24", &etcd, &certs, prefix)
        });
        west.wait_ready().await;
        east.wait_ready().await;
        let vip = east.wait_routable(SERVICE, PORT).await;
        Self {
            east,
            west,
            echo,
            relay,
            vip,
            _certs: certs,
            _etcd: etcd,
        }
    }
}
