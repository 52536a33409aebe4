//! The stunnel pair: a client-side stunnel (plain in → TLS 1.3 with a client certificate)
//! and a server-side stunnel (TLS in, verified client certificate required → backend).
//! Two processes, both counted for CPU.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use super::{Contender, Kind};
use meshup_tests::free_port;
use meshup_tests::procs::{ChildGuard, find_program};
use meshup_tests::tls::{Pki, SERVER_NAME};

/// Starts both stunnel processes in `dir` and returns the contender once both listen.
pub fn start(dir: &Path, pki: &Pki, backend: SocketAddr) -> Result<Contender> {
    let program = find_program(&["stunnel4", "stunnel"], "stunnel4")?;
    let client_port = free_port()?;
    let server_port = free_port()?;

    // TCP_NODELAY on both legs: stunnel leaves Nagle on by default, which would turn the
    // request/response phase into a measure of delayed ACKs rather than of the tunnel; any
    // user running interactive traffic through stunnel sets these.
    // `debug = 3` (errors only): the default level logs every connection, which would charge
    // the new-connection phase for log writes a tuned deployment does not do.
    let server_conf = format!(
        "foreground = yes\n\
         pid = {dir}/stunnel-server.pid\n\
         debug = 3\n\
         [server]\n\
         accept = 127.0.0.1:{server_port}\n\
         connect = {backend}\n\
         cert = {cert}\n\
         key = {key}\n\
         CAfile = {ca}\n\
         verifyChain = yes\n\
         requireCert = yes\n\
         sslVersionMin = TLSv1.3\n\
         socket = l:TCP_NODELAY=1\n\
         socket = r:TCP_NODELAY=1\n",
        dir = dir.display(),
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
        ca = pki.ca.display(),
    );
    let client_conf = format!(
        "foreground = yes\n\
         pid = {dir}/stunnel-client.pid\n\
         debug = 3\n\
         [client]\n\
         client = yes\n\
         accept = 127.0.0.1:{client_port}\n\
         connect = 127.0.0.1:{server_port}\n\
         cert = {cert}\n\
         key = {key}\n\
         CAfile = {ca}\n\
         verifyChain = yes\n\
         checkHost = {SERVER_NAME}\n\
         sslVersionMin = TLSv1.3\n\
         socket = l:TCP_NODELAY=1\n\
         socket = r:TCP_NODELAY=1\n",
        dir = dir.display(),
        cert = pki.client_cert.display(),
        key = pki.client_key.display(),
        ca = pki.ca.display(),
    );
    let server_path = dir.join("stunnel-server.conf");
    let client_path = dir.join("stunnel-client.conf");
    std::fs::write(&server_path, server_conf).context("write stunnel server config")?;
    std::fs::write(&client_path, client_conf).context("write stunnel client config")?;

    let mut server_cmd = Command::new(&program);
    server_cmd.arg(&server_path);
    let mut server = ChildGuard::spawn(
        "stunnel (server side)",
        server_cmd,
        &dir.join("stunnel-server.log"),
    )?;
    let mut client_cmd = Command::new(&program);
    client_cmd.arg(&client_path);
    let mut client = ChildGuard::spawn(
        "stunnel (client side)",
        client_cmd,
        &dir.join("stunnel-client.log"),
    )?;
    let server_addr = SocketAddr::from(([127, 0, 0, 1], server_port));
    let client_addr = SocketAddr::from(([127, 0, 0, 1], client_port));
    server.wait_for_port(server_addr, Duration::from_secs(10))?;
    client.wait_for_port(client_addr, Duration::from_secs(10))?;
    Ok(Contender::with_processes(
        "stunnel",
        Kind::Peer,
        client_addr,
        vec![client, server],
        Vec::new(),
    ))
}
