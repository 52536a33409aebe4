//! The floor: two plain TCP relay processes, no encryption, no protocol. Whatever a
//! two-process tunnel (stunnel's pair, meshup's gateways) adds over direct TCP on this
//! machine, this pair adds too: the cost of two more processes waking per direction.
//! It is a reference line in the tables, never a peer in the ratios.
//!
//! The relay is this benchmark binary itself (`--relay LISTEN=TARGET`), one thread each,
//! forwarding with `copy_bidirectional` over `TCP_NODELAY` sockets.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};

use super::{Contender, Kind};
use meshup_tests::free_port;
use meshup_tests::procs::ChildGuard;

pub fn start(dir: &Path, backend: SocketAddr) -> Result<Contender> {
    let exe = std::env::current_exe().context("find the benchmark binary for the relays")?;
    let near = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let far = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let spawn = |name: &str, listen: SocketAddr, target: SocketAddr| {
        let mut cmd = Command::new(&exe);
        cmd.arg("--relay").arg(format!("{listen}={target}"));
        ChildGuard::spawn(name, cmd, &dir.join(format!("{name}.log")))
    };
    let mut far_relay = spawn("relay-far", far, backend)?;
    let mut near_relay = spawn("relay-near", near, far)?;
    far_relay.wait_for_port(far, Duration::from_secs(10))?;
    near_relay.wait_for_port(near, Duration::from_secs(10))?;
    Ok(Contender::with_processes(
        "relay",
        Kind::Floor,
        near,
        vec![near_relay, far_relay],
        Vec::new(),
    ))
}

/// Parses `LISTEN=TARGET`.
pub fn parse_spec(spec: &str) -> Result<(SocketAddr, SocketAddr)> {
    let (listen, target) = spec
        .split_once('=')
        .with_context(|| format!("--relay {spec:?}: expected LISTEN=TARGET"))?;
    Ok((
        listen
            .parse()
            .with_context(|| format!("--relay listen address {listen:?}"))?,
        target
            .parse()
            .with_context(|| format!("--relay target address {target:?}"))?,
    ))
}

/// Runs one relay until the process is killed, on a single thread.
pub fn run(listen: SocketAddr, target: SocketAddr) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("start the relay's runtime")?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("bind {listen}"))?;
        loop {
            let (mut client, _) = listener.accept().await.context("accept")?;
            tokio::spawn(async move {
                let Ok(mut upstream) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_spec_is_listen_equals_target() {
        let (l, t) = parse_spec("127.0.0.1:1=127.0.0.1:2").expect("parses");
        assert_eq!(l.port(), 1);
        assert_eq!(t.port(), 2);
        assert!(parse_spec("127.0.0.1:1").is_err());
        assert!(parse_spec("x=127.0.0.1:2").is_err());
    }
}
