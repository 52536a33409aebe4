//! The tunnel's UDP socket: quinn's own socket, with two fixes for large packets.
//!
//! - **GSO batches that fit.** quinn hands the socket up to 10 equal-size packets at once
//!   (UDP generic segmentation offload). With a path MTU above ~6.5 KB (jumbo frames, or
//!   loopback once discovery has raised it), ten packets exceed the 65,507 bytes one UDP send
//!   may carry: the kernel answers `EMSGSIZE`, quinn-udp counts that as sent, and every packet
//!   of the batch is lost. Those losses of large packets then trip quinn's MTU black-hole
//!   detector, which drops the path MTU back to 1200 bytes for good on a busy connection.
//!   [`gso_batches`] splits such a batch into sends that fit instead.
//! - **Socket buffers sized for bursts** (`tunnel.socket_buffer_bytes`): a flight of packets
//!   arrives faster than one thread drains it, and the kernel's default receive buffer
//!   (~208 KiB) drops the tail of the burst, which QUIC must then detect and resend.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// The largest UDP payload one send can carry over IPv4 (65,535 − 20 IP − 8 UDP bytes); the
/// IPv6 limit is higher, so this one is safe for both.
pub const MAX_UDP_SEND: usize = 65_507;

/// Splits a GSO transmit of `len` bytes in `segment`-byte packets into byte ranges that each
/// fit in one UDP send of at most `limit` bytes and hold whole packets (the last one may be
/// short, as in any GSO batch). A batch that fits comes back as one range.
pub fn gso_batches(len: usize, segment: usize, limit: usize) -> impl Iterator<Item = Range<usize>> {
    // A segment larger than the limit cannot be sent at all; one packet per send lets the
    // kernel refuse it on its own (an MTU probe that is too large, which quinn expects).
    let step = if segment == 0 || len <= limit {
        len.max(1)
    } else {
        (limit / segment).max(1) * segment
    };
    (0..len)
        .step_by(step)
        .map(move |start| start..(start + step).min(len))
}

/// quinn's platform socket with [`gso_batches`] applied to every send; with the port split
/// in two queues ([`super::queues`]), the known connections' socket (which also sends) and
/// the new connections' one, read only when the first has nothing to read.
pub struct TunnelSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    new: Option<Arc<dyn AsyncUdpSocket>>,
}

impl fmt::Debug for TunnelSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelSocket")
            .field("inner", &self.inner)
            .field("new", &self.new)
            .finish()
    }
}

impl TunnelSocket {
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, new: Option<Arc<dyn AsyncUdpSocket>>) -> Arc<Self> {
        Arc::new(Self { inner, new })
    }
}

impl AsyncUdpSocket for TunnelSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(segment) = transmit.segment_size else {
            return self.inner.try_send(transmit);
        };
        if transmit.contents.len() <= MAX_UDP_SEND {
            // The common case, without building a new transmit.
            return self.inner.try_send(transmit);
        }
        // If a later part would block, quinn retries the whole transmit: the parts already
        // sent arrive twice, and the peer discards the duplicate packet numbers. That is
        // cheaper than losing them.
        for range in gso_batches(transmit.contents.len(), segment, MAX_UDP_SEND) {
            let contents = &transmit.contents[range];
            self.inner.try_send(&Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents,
                segment_size: (contents.len() > segment).then_some(segment),
                src_ip: transmit.src_ip,
            })?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        if let Poll::Ready(read) = self.inner.poll_recv(cx, bufs, meta) {
            return Poll::Ready(read);
        }
        match &self.new {
            Some(new) => new.poll_recv(cx, bufs, meta),
            None => Poll::Pending,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// Asks the kernel for `bytes` of send and receive buffer on `socket` and returns what it
/// granted (Linux reports twice the usable size; the value is capped by `net.core.rmem_max`
/// and `net.core.wmem_max`).
pub fn size_buffers(socket: &std::net::UdpSocket, bytes: usize) -> io::Result<(usize, usize)> {
    let sock = socket2::SockRef::from(socket);
    sock.set_recv_buffer_size(bytes)?;
    sock.set_send_buffer_size(bytes)?;
    Ok((sock.recv_buffer_size()?, sock.send_buffer_size()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batches(len: usize, segment: usize) -> Vec<Range<usize>> {
        gso_batches(len, segment, MAX_UDP_SEND).collect()
    }

    #[test]
    fn a_batch_that_fits_is_one_send() {
        assert_eq!(batches(12_000, 1200), vec![0..12_000]);
        assert_eq!(batches(65_507, 1200), vec![0..65_507]);
        assert_eq!(batches(5000, 1200), vec![0..5000]);
    }

    #[test]
    fn ten_jumbo_packets_are_split_into_whole_packets_that_fit() {
        // quinn's batch of 10 packets at the default 8952-byte MTU: 7 + 3.
        let got = batches(89_520, 8952);
        assert_eq!(got, vec![0..62_664, 62_664..89_520]);
        assert!(got.iter().all(|r| r.len() <= MAX_UDP_SEND));
        assert!(got.iter().all(|r| r.start % 8952 == 0));
    }

    #[test]
    fn a_short_last_packet_stays_at_the_end() {
        let got = batches(8952 * 9 + 100, 8952);
        assert_eq!(got, vec![0..62_664, 62_664..80_668]);
    }

    #[test]
    fn every_byte_is_covered_once_for_any_size() {
        for segment in [1200, 1452, 6000, 6551, 8952, 9000, 16_000, 65_507] {
            for count in 1..=10 {
                for tail in [0, 1, segment / 2] {
                    let len = segment * count + tail;
                    let got = batches(len, segment);
                    assert_eq!(got.first().map(|r| r.start), Some(0));
                    assert_eq!(got.last().map(|r| r.end), Some(len));
                    for pair in got.windows(2) {
                        assert_eq!(pair[0].end, pair[1].start);
                    }
                    assert!(got.iter().all(|r| r.len() <= MAX_UDP_SEND.max(segment)));
                    assert!(got.iter().all(|r| r.start % segment == 0));
                }
            }
        }
    }

    #[test]
    fn a_segment_larger_than_the_limit_goes_alone() {
        assert_eq!(batches(140_000, 70_000), vec![0..70_000, 70_000..140_000]);
    }
}
