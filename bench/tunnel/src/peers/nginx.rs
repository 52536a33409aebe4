//! The nginx `stream` pair: one nginx with one worker holds both tunnel ends. Server A
//! listens plain and proxies with `proxy_ssl` (client certificate, server verified) to
//! server B, which terminates TLS 1.3 with `ssl_verify_client on` and proxies to the backend.
//! CPU is counted for the master and its worker.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Result;

use super::{Contender, Kind};
use meshup_tests::free_port;
use meshup_tests::nginx::{self, mtls_client_directives, mtls_server_directives};
use meshup_tests::tls::Pki;

/// Starts nginx in `dir` and returns the contender once both ends listen.
pub fn start(dir: &Path, pki: &Pki, backend: SocketAddr) -> Result<Contender> {
    let front = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let back = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let stream = format!(
        "server {{\n\
           listen {front};\n\
           proxy_pass {back};\n\
           {client}\
         }}\n\
         server {{\n\
           listen {back} ssl;\n\
           {server}\
           proxy_pass {backend};\n\
         }}\n",
        client = mtls_client_directives(pki),
        server = mtls_server_directives(pki),
    );
    let nginx = nginx::start(dir, "nginx", &stream, &[back, front])?;
    Ok(Contender::with_processes(
        "nginx",
        Kind::Peer,
        front,
        vec![nginx],
        Vec::new(),
    ))
}
