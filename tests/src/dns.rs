//! One real DNS query over UDP from this process (no `dig` process per query): for loops that
//! poll a gateway's DNS every millisecond and time when an answer appears.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

use anyhow::{Context, bail};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

/// What a server answered to an A query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// NOERROR with these addresses (empty: NODATA, the name exists without an address yet).
    Addresses(Vec<IpAddr>),
    /// NXDOMAIN: the name does not exist.
    NxDomain,
    /// Any other response code.
    Other(ResponseCode),
}

impl Answer {
    /// The addresses answered, if any.
    pub fn addresses(&self) -> &[IpAddr] {
        match self {
            Answer::Addresses(a) => a,
            _ => &[],
        }
    }
}

/// Sends one A query for `name` to `server` over UDP and waits up to `timeout` for the
/// reply with its id. A lost datagram is an error, not an answer.
pub fn query_a(server: SocketAddr, name: &str, timeout: Duration) -> anyhow::Result<Answer> {
    let socket = UdpSocket::bind(SocketAddr::new(server.ip(), 0)).context("bind a UDP socket")?;
    socket.set_read_timeout(Some(timeout))?;
    let id = rand::random::<u16>();
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    let qname = Name::from_ascii(name).with_context(|| format!("{name:?} is not a DNS name"))?;
    msg.add_query(Query::query(qname, RecordType::A));
    socket.send_to(&msg.to_vec()?, server)?;
    let mut buf = [0u8; 4096];
    loop {
        let (len, from) = socket
            .recv_from(&mut buf)
            .with_context(|| format!("no answer for {name} from {server} within {timeout:?}"))?;
        if from != server {
            continue;
        }
        let reply = Message::from_vec(&buf[..len]).context("reply does not parse")?;
        if reply.metadata.id != id {
            continue;
        }
        if reply.metadata.message_type != MessageType::Response {
            bail!("reply to {name} without QR");
        }
        return Ok(match reply.metadata.response_code {
            ResponseCode::NoError => Answer::Addresses(
                reply
                    .answers
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        _ => None,
                    })
                    .collect(),
            ),
            ResponseCode::NXDomain => Answer::NxDomain,
            other => Answer::Other(other),
        });
    }
}
