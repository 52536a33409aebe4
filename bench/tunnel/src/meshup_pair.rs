//! The meshup contender: the shared gateway pair (`meshup_tests::gateway_pair`) exporting
//! the backend as one plain `tcp` port, `sink.bench:9000` (or another service, such as
//! `redis.bench:6379` in front of redis-server).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Result;
use meshup_tests::gateway_pair::{self, Export, FIRST_REQUEST_LIMIT};

use crate::peers::{Backend, Contender, Kind};

/// The service the data-path measures use, and the port clients use on its virtual IP.
pub const SINK: Service = Service {
    name: "sink",
    port: 9000,
    backend: Backend::Echo,
};

/// The service the redis-benchmark measure uses. A pair of its own (own etcd, own gateways)
/// that allocates the same virtual IP as the sink's pair: the ports differ, so their
/// listeners do not.
pub const REDIS: Service = Service {
    name: "redis",
    port: 6379,
    backend: Backend::Redis,
};

/// A service the pair exports, as one `tcp` port.
#[derive(Debug, Clone, Copy)]
pub struct Service {
    pub name: &'static str,
    pub port: u16,
    pub backend: Backend,
}

/// Starts etcd and both gateways under `dir` and returns the contender (client-facing
/// address: east's virtual IP for the service) once a first request went through.
pub async fn start(
    dir: &Path,
    binary: &Path,
    backend: SocketAddr,
    service: Service,
    threads: Option<usize>,
) -> Result<Contender> {
    let export = Export {
        name: service.name,
        port: service.port,
        app_protocol: None,
        endpoint_protocol: None,
    };
    let pair = gateway_pair::start(dir, binary, backend, threads, &[export]).await?;
    let mut contender = Contender::with_processes(
        "meshup",
        Kind::Meshup,
        pair.addrs[0],
        pair.gateways,
        vec![pair.etcd],
    )
    .serving(service.backend);
    contender.probe(FIRST_REQUEST_LIMIT).await?;
    Ok(contender)
}
