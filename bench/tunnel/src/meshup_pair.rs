//! The meshup contender: the shared gateway pair (`meshup_tests::gateway_pair`) exporting
//! the backend as one plain `tcp` port, `sink.bench:9000`.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Result;
use meshup_tests::gateway_pair::{self, Export, FIRST_REQUEST_LIMIT};

use crate::peers::{Contender, Kind};

/// The service port clients use on the virtual IP.
const SERVICE_PORT: u16 = 9000;

/// Starts etcd and both gateways under `dir` and returns the contender (client-facing
/// address: east's virtual IP for the service) once a first request went through.
pub async fn start(
    dir: &Path,
    binary: &Path,
    backend: SocketAddr,
    threads: Option<usize>,
) -> Result<Contender> {
    let export = Export {
        name: "sink",
        port: SERVICE_PORT,
        app_protocol: None,
    };
    let pair = gateway_pair::start(dir, binary, backend, threads, &[export]).await?;
    let mut contender = Contender::with_processes(
        "meshup",
        Kind::Meshup,
        pair.addrs[0],
        pair.gateways,
        vec![pair.etcd],
    );
    contender.probe(FIRST_REQUEST_LIMIT).await?;
    Ok(contender)
}
