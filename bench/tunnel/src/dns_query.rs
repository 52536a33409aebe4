//! A minimal DNS A-record lookup over UDP, built by hand: the benchmark only needs to ask
//! one gateway for one service's virtual IP, which does not justify a resolver dependency.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tokio::net::UdpSocket;

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;

/// Asks `server` for the A records of `name` (one query, bounded by `limit`).
pub async fn lookup_a(server: SocketAddr, name: &str, limit: Duration) -> Result<Vec<Ipv4Addr>> {
    let id: u16 = (std::process::id() as u16) ^ 0x5a5a;
    let query = build_query(id, name)?;
    let socket = UdpSocket::bind("127.0.0.1:0")
        .await
        .context("bind UDP socket for DNS query")?;
    socket
        .send_to(&query, server)
        .await
        .with_context(|| format!("send DNS query to {server}"))?;
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(limit, socket.recv_from(&mut buf))
        .await
        .with_context(|| format!("no DNS answer from {server} within {limit:?}"))?
        .context("receive DNS answer")?;
    parse_a_answers(id, &buf[..n])
}

/// A standard query with recursion desired and one question (name, A, IN).
fn build_query(id: u16, name: &str) -> Result<Vec<u8>> {
    let mut msg = Vec::with_capacity(512);
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    msg.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    msg.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // AN, NS, AR counts
    for label in name.trim_end_matches('.').split('.') {
        ensure!(
            !label.is_empty() && label.len() < 64,
            "bad DNS label {label:?} in {name}"
        );
        msg.push(label.len() as u8);
        msg.extend_from_slice(label.as_bytes());
    }
    msg.push(0);
    msg.extend_from_slice(&TYPE_A.to_be_bytes());
    msg.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(msg)
}

/// The IPv4 addresses in the answer section of a response to query `id`.
fn parse_a_answers(id: u16, msg: &[u8]) -> Result<Vec<Ipv4Addr>> {
    ensure!(msg.len() >= 12, "DNS answer shorter than a header");
    let u16_at = |i: usize| -> Result<u16> {
        let bytes = msg.get(i..i + 2).context("truncated DNS answer")?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    };
    ensure!(u16_at(0)? == id, "DNS answer for another query id");
    let flags = u16_at(2)?;
    ensure!(flags & 0x8000 != 0, "DNS message is not a response");
    let rcode = flags & 0x000f;
    if rcode != 0 {
        bail!("DNS rcode {rcode} (3 = NXDOMAIN: the service is not known yet)");
    }
    let questions = u16_at(4)?;
    let answers = u16_at(6)?;
    let mut pos = 12;
    for _ in 0..questions {
        pos = skip_name(msg, pos)? + 4;
    }
    let mut addrs = Vec::new();
    for _ in 0..answers {
        pos = skip_name(msg, pos)?;
        let rtype = u16_at(pos)?;
        let rdlen = u16_at(pos + 8)? as usize;
        let rdata = msg
            .get(pos + 10..pos + 10 + rdlen)
            .context("truncated DNS record data")?;
        if rtype == TYPE_A && rdlen == 4 {
            addrs.push(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]));
        }
        pos += 10 + rdlen;
    }
    Ok(addrs)
}

/// Position after a (possibly compressed) name starting at `pos`.
fn skip_name(msg: &[u8], mut pos: usize) -> Result<usize> {
    // A name has at most 127 labels; the bound also stops malformed loops.
    for _ in 0..128 {
        let len = *msg.get(pos).context("truncated DNS name")?;
        match len {
            0 => return Ok(pos + 1),
            l if l & 0xc0 == 0xc0 => return Ok(pos + 2),
            l => pos += 1 + l as usize,
        }
    }
    bail!("DNS name with too many labels")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_encodes_labels() {
        let q = build_query(7, "sink.bench.svc.").expect("query");
        assert_eq!(&q[..2], &[0, 7]);
        assert_eq!(&q[12..], b"\x04sink\x05bench\x03svc\x00\x00\x01\x00\x01");
    }

    #[test]
    fn answer_with_compressed_name_is_parsed() {
        let mut msg = build_query(9, "a.b").expect("query");
        msg[2] = 0x81; // QR + RD
        msg[3] = 0x80; // RA, rcode 0
        msg[7] = 1; // ANCOUNT = 1
        msg.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 127, 77, 0, 3]);
        assert_eq!(
            parse_a_answers(9, &msg).expect("parse"),
            vec![Ipv4Addr::new(127, 77, 0, 3)]
        );
    }

    #[test]
    fn nxdomain_is_an_error() {
        let mut msg = build_query(9, "a.b").expect("query");
        msg[2] = 0x81;
        msg[3] = 0x83;
        assert!(parse_a_answers(9, &msg).is_err());
    }
}
