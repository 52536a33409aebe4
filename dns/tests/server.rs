//! The DNS server end to end over real sockets: hickory's resolver, raw hickory-proto
//! messages over UDP and TCP, and `dig`. The catalog holds services of three clusters
//! (`meshup_dns::fixture::three_clusters`), seen from `east`.

mod common;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::RecordType;
use hickory_resolver::Resolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use meshup_core::catalog::{Change, ExportKey, Snapshot};
use meshup_core::model::Protocol;
use meshup_core::names::{ClusterName, GatewayId};
use meshup_dns::fixture::{export, three_clusters, vip};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpStream, UdpSocket};

const ZONE: &str = "clusterset.local.";

fn fqdn(rel: &str) -> String {
    if rel.is_empty() {
        ZONE.to_owned()
    } else {
        format!("{rel}.{ZONE}")
    }
}

/// Checks a negative answer: AA, no answers, exactly the SOA in authority with the negative
/// TTL (min(SOA TTL, minimum) = 5 s by default).
fn assert_negative(msg: &Message, rcode: ResponseCode, what: &str) {
    assert_eq!(msg.metadata.response_code, rcode, "{what}");
    assert!(msg.metadata.authoritative, "{what}: AA");
    assert!(msg.answers.is_empty(), "{what}: answers {:?}", msg.answers);
    assert_eq!(msg.authorities.len(), 1, "{what}: authority");
    assert_eq!(msg.authorities[0].record_type(), RecordType::SOA, "{what}");
    assert_eq!(msg.authorities[0].ttl, 5, "{what}: negative TTL");
}

#[tokio::test]
async fn every_name_form_over_udp_and_tcp() -> anyhow::Result<()> {
    with_deadline(async {
        let server = TestServer::start(three_clusters(), |_| {}).await?;
        use RecordType as T;
        let positive: &[(&str, RecordType, &[&str])] = &[
            ("pay.prod.svc", T::A, &["A 10.64.0.1"]),
            ("v6.prod.svc", T::AAAA, &["AAAA fd00::6"]),
            (
                "_http._tcp.pay.prod.svc",
                T::SRV,
                &["SRV 10 100 8080 pay.prod.svc.clusterset.local."],
            ),
            (
                "_dns._udp.pay.prod.svc",
                T::SRV,
                &["SRV 10 100 53 pay.prod.svc.clusterset.local."],
            ),
            ("dns-version", T::TXT, &["TXT 1.0.0"]),
            ("", T::NS, &["NS ns.dns.clusterset.local."]),
            ("ns.dns", T::A, &["A 127.0.0.1"]),
            ("pay.prod.svc.west", T::A, &["A 10.64.0.2"]),
            // RFC 8482: one RRset for ANY.
            ("pay.prod.svc", T::ANY, &["A 10.64.0.1"]),
        ];
        let nodata: &[(&str, RecordType)] = &[
            ("pay.prod.svc", T::AAAA),
            ("v6.prod.svc", T::A),
            ("novip.prod.svc", T::A),
            ("svc", T::A),
            ("prod.svc", T::A),
            ("_tcp.pay.prod.svc", T::SRV),
            ("west", T::A),
            ("svc.west", T::A),
            ("prod.svc.west", T::A),
            ("pay.prod.svc.east", T::A),
            ("dns-version", T::A),
            ("", T::A),
        ];
        let nxdomain: &[&str] = &[
            "nothere.prod.svc",
            "west.pay.prod.svc",
            "pay.prod.svc.south",
            "_http._udp.pay.prod.svc",
            "other.svc",
            "north",
        ];
        for over_tcp in [false, true] {
            let ask = |rel: &str, t| {
                let q = fqdn(rel);
                let addr = server.addr;
                async move {
                    if over_tcp {
                        tcp(addr, &q, t).await
                    } else {
                        udp(addr, &q, t, None).await
                    }
                }
            };
            for (rel, t, want) in positive {
                let msg = ask(rel, *t).await?;
                let what = format!("{rel} {t} tcp={over_tcp}");
                assert_eq!(msg.metadata.response_code, ResponseCode::NoError, "{what}");
                assert!(msg.metadata.authoritative, "{what}: AA");
                assert!(!msg.metadata.recursion_available, "{what}: RA");
                assert_eq!(rdata(&msg), *want, "{what}");
                assert!(msg.answers.iter().all(|r| r.ttl == 5), "{what}: TTL");
            }
            for (rel, t) in nodata {
                let msg = ask(rel, *t).await?;
                assert_negative(
                    &msg,
                    ResponseCode::NoError,
                    &format!("NODATA {rel} {t} tcp={over_tcp}"),
                );
            }
            for rel in nxdomain {
                let msg = ask(rel, T::A).await?;
                assert_negative(
                    &msg,
                    ResponseCode::NXDomain,
                    &format!("NXDOMAIN {rel} tcp={over_tcp}"),
                );
            }
            // SRV carries the target's address; the apex SOA carries the NS set.
            let srv = ask("_http._tcp.pay.prod.svc", T::SRV).await?;
            assert_eq!(srv.additionals.len(), 1, "SRV additional");
            assert_eq!(format!("{}", srv.additionals[0].data), "10.64.0.1");
            let soa = ask("", T::SOA).await?;
            assert_eq!(soa.answers.len(), 1);
            assert_eq!(soa.answers[0].record_type(), T::SOA);
            assert_eq!(soa.authorities.len(), 1);
            assert_eq!(soa.authorities[0].record_type(), T::NS);
        }
        server.stop().await
    })
    .await
}

#[tokio::test]
async fn hickory_resolver_over_udp_and_tcp() -> anyhow::Result<()> {
    with_deadline(async {
        let server = TestServer::start(three_clusters(), |_| {}).await?;
        for tcp_only in [false, true] {
            let mut ns = if tcp_only {
                NameServerConfig::tcp(server.addr.ip())
            } else {
                NameServerConfig::udp(server.addr.ip())
            };
            for c in &mut ns.connections {
                c.port = server.addr.port();
            }
            let resolver = Resolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                TokioRuntimeProvider::default(),
            )
            .build()?;
            let ips: Vec<IpAddr> = resolver
                .lookup_ip("pay.prod.svc.clusterset.local.")
                .await?
                .iter()
                .collect();
            assert_eq!(ips, ["10.64.0.1".parse::<IpAddr>()?], "tcp_only={tcp_only}");
            let srv = resolver
                .lookup("_http._tcp.pay.prod.svc.clusterset.local.", RecordType::SRV)
                .await?;
            assert_eq!(
                srv.answers()
                    .iter()
                    .map(|r| r.data.to_string())
                    .collect::<Vec<_>>(),
                ["10 100 8080 pay.prod.svc.clusterset.local."]
            );
            let pinned: Vec<IpAddr> = resolver
                .lookup_ip("pay.prod.svc.west.clusterset.local.")
                .await?
                .iter()
                .collect();
            assert_eq!(pinned, ["10.64.0.2".parse::<IpAddr>()?]);
            let missing = resolver
                .lookup_ip("nothere.prod.svc.clusterset.local.")
                .await;
            assert!(missing.is_err(), "NXDOMAIN must fail the lookup");
        }
        server.stop().await
    })
    .await
}

#[tokio::test]
async fn outside_the_zone_is_refused_without_recursion() -> anyhow::Result<()> {
    with_deadline(async {
        let server = TestServer::start(three_clusters(), |_| {}).await?;
        for name in ["example.com.", "local.", "clusterset.local.evil."] {
            for msg in [
                udp(server.addr, name, RecordType::A, None).await?,
                tcp(server.addr, name, RecordType::A).await?,
            ] {
                assert_eq!(msg.metadata.response_code, ResponseCode::Refused, "{name}");
                assert!(!msg.metadata.recursion_available, "{name}: RA must be 0");
                assert!(!msg.metadata.authoritative, "{name}: AA must be 0");
                assert!(msg.answers.is_empty() && msg.authorities.is_empty());
            }
        }
        assert!(
            server.metrics_text().contains("dns_refused_total 6"),
            "{}",
            server.metrics_text()
        );
        server.stop().await
    })
    .await
}

#[tokio::test]
async fn question_case_is_echoed_as_received() -> anyhow::Result<()> {
    with_deadline(async {
        let server = TestServer::start(three_clusters(), |_| {}).await?;
        for (qname, t) in [
            ("PaY.pRoD.sVc.ClUsTeRsEt.LoCaL.", RecordType::A),
            ("NoThErE.pRoD.sVc.ClUsTeRsEt.LoCaL.", RecordType::A),
            ("_HTTP._Tcp.PAY.prod.svc.clusterset.LOCAL.", RecordType::SRV),
            ("EXAMPLE.com.", RecordType::A),
        ] {
            let q = query(0x2020, qname, t, None);
            let reply = udp_raw(server.addr, &q).await?;
            let qend = q.len();
            assert_eq!(&reply[12..qend], &q[12..qend], "question of {qname}");
        }
        let msg = udp(
            server.addr,
            "PaY.pRoD.sVc.ClUsTeRsEt.LoCaL.",
            RecordType::A,
            None,
        )
        .await?;
        assert_eq!(rdata(&msg), ["A 10.64.0.1"]);
        server.stop().await
    })
    .await
}

/// A zone whose SOA cannot be compressed below 512 bytes: long NS and mailbox names outside
/// the zone. Every MCS answer is small (one VIP per name), so the SOA is what gets big.
fn long_name(tag: char) -> String {
    let label: String = std::iter::repeat_n(tag, 60).collect();
    format!("{label}.{label}.{label}.{label}.example.")
}

#[tokio::test]
async fn big_answers_are_truncated_over_udp_and_complete_over_tcp() -> anyhow::Result<()> {
    with_deadline(async {
        let server = TestServer::start(three_clusters(), |c| {
            c.ns_name = Some(long_name('n'));
            c.soa_rname = Some(long_name('h'));
        })
        .await?;
        let full = tcp(server.addr, ZONE, RecordType::SOA).await?;
        assert!(!full.metadata.truncation);
        assert_eq!(full.answers.len(), 1, "full SOA over TCP");
        assert_eq!(full.authorities.len(), 1, "NS over TCP");
        assert!(full.to_vec()?.len() > 512);

        // No EDNS: 512 bytes at most, TC=1.
        let q = query(7, ZONE, RecordType::SOA, None);
        let reply = udp_raw(server.addr, &q).await?;
        assert!(reply.len() <= 512, "{} bytes", reply.len());
        let cut = Message::from_vec(&reply)?;
        assert!(cut.metadata.truncation, "TC=1 without EDNS");
        // EDNS 512 behaves the same; a bigger buffer gets the whole answer.
        let cut = udp(server.addr, ZONE, RecordType::SOA, Some(512)).await?;
        assert!(cut.metadata.truncation, "TC=1 with EDNS 512");
        let whole = udp(server.addr, ZONE, RecordType::SOA, Some(4096)).await?;
        assert!(!whole.metadata.truncation);
        assert_eq!(whole.answers, full.answers);
        // Small answers in the same zone are not cut.
        let a = udp(
            server.addr,
            "pay.prod.svc.clusterset.local.",
            RecordType::A,
            None,
        )
        .await?;
        assert!(!a.metadata.truncation);
        assert_eq!(rdata(&a), ["A 10.64.0.1"]);
        assert!(
            server.metrics_text().contains("dns_truncated_total 2"),
            "{}",
            server.metrics_text()
        );
        server.stop().await
    })
    .await
}

#[tokio::test]
async fn a_catalog_change_is_visible_to_the_next_query() -> anyhow::Result<()> {
    with_deadline(async {
        let server = TestServer::start(three_clusters(), |_| {}).await?;
        let name = "new.prod.svc.clusterset.local.";
        assert_eq!(
            udp(server.addr, name, RecordType::A, None)
                .await?
                .metadata
                .response_code,
            ResponseCode::NXDomain
        );
        for round in 0..20u8 {
            // Add: the very next query sees it (no polling), over UDP and TCP.
            let ip: IpAddr = format!("10.65.0.{}", round + 1).parse()?;
            server.catalog.send_modify(|snap| {
                let mut next = Snapshot::clone(snap);
                for change in [
                    export("west", "new.prod", &[("http", 80, Protocol::Tcp)]),
                    vip("east", "new.prod", None, ip),
                ] {
                    next.apply(change.unwrap_or_else(|e| panic!("{e}")));
                }
                *snap = Arc::new(next);
            });
            let msg = udp(server.addr, name, RecordType::A, None).await?;
            assert_eq!(rdata(&msg), [format!("A {ip}")], "round {round} udp");
            assert_eq!(
                rdata(&tcp(server.addr, name, RecordType::A).await?),
                [format!("A {ip}")]
            );
            // Remove: gone for the next query.
            server.catalog.send_modify(|snap| {
                let mut next = Snapshot::clone(snap);
                next.apply(Change::DeleteExport(ExportKey {
                    cluster: ClusterName::new("west").unwrap_or_else(|e| panic!("{e}")),
                    gateway: GatewayId::new("gw-0").unwrap_or_else(|e| panic!("{e}")),
                    service: "new.prod".parse().unwrap_or_else(|e| panic!("{e}")),
                }));
                *snap = Arc::new(next);
            });
            let msg = udp(server.addr, name, RecordType::A, None).await?;
            assert_negative(
                &msg,
                ResponseCode::NXDomain,
                &format!("round {round} after delete"),
            );
        }
        // The fast path catches up: once the table for the newest snapshot is published, the
        // same query is answered from it again.
        let fast_a = |text: &str| -> u64 {
            text.lines()
                .find(|l| {
                    l.starts_with("dns_queries_total{qtype=\"A\",rcode=\"NOERROR\",path=\"Fast\"}")
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        let before = fast_a(&server.metrics_text());
        let addr = server.addr;
        let srv = &server;
        eventually_ok(
            "fast path answers again",
            Duration::from_secs(10),
            || async move {
                let msg = udp(addr, "pay.prod.svc.clusterset.local.", RecordType::A, None).await?;
                anyhow::ensure!(rdata(&msg) == ["A 10.64.0.1"], "wrong answer {msg:?}");
                let fast = fast_a(&srv.metrics_text());
                anyhow::ensure!(fast > before, "{fast} fast-path answers, {before} before");
                Ok(())
            },
        )
        .await;
        server.stop().await
    })
    .await
}

#[tokio::test]
async fn edns_is_echoed_and_newer_versions_get_badvers() -> anyhow::Result<()> {
    with_deadline(async {
        let server = TestServer::start(three_clusters(), |_| {}).await?;
        let msg = udp(
            server.addr,
            "pay.prod.svc.clusterset.local.",
            RecordType::A,
            Some(1232),
        )
        .await?;
        let edns = msg
            .edns
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no OPT in reply"))?;
        assert_eq!(edns.version(), 0);
        assert_eq!(edns.max_payload(), 1232);
        let plain = udp(
            server.addr,
            "pay.prod.svc.clusterset.local.",
            RecordType::A,
            None,
        )
        .await?;
        assert!(plain.edns.is_none(), "no OPT for a query without one");

        let mut q = Message::new(99, MessageType::Query, OpCode::Query);
        q.add_query(Query::query(
            name("pay.prod.svc.clusterset.local."),
            RecordType::A,
        ));
        let mut e = Edns::new();
        e.set_max_payload(1232);
        e.set_version(1);
        q.set_edns(e);
        let reply = udp_raw(server.addr, &q.to_vec()?).await?;
        let msg = Message::from_vec(&reply)?;
        let edns = msg
            .edns
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no OPT in BADVERS reply"))?;
        let rcode = (u16::from(edns.rcode_high()) << 4) | u16::from(reply[3] & 0x0f);
        assert_eq!(rcode, 16, "BADVERS");
        assert_eq!(edns.version(), 0);
        assert!(msg.answers.is_empty());
        server.stop().await
    })
    .await
}

/// Sends `packet`, then a valid query with ID 0xabcd from the same socket; returns the
/// replies received before (and including) the valid one.
async fn send_then_probe(
    addr: std::net::SocketAddr,
    packet: &[u8],
) -> anyhow::Result<Vec<Vec<u8>>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await?;
    sock.send_to(packet, addr).await?;
    sock.send_to(
        &query(
            0xabcd,
            "pay.prod.svc.clusterset.local.",
            RecordType::A,
            None,
        ),
        addr,
    )
    .await?;
    let mut replies = Vec::new();
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, _) = tokio::time::timeout(REPLY_DEADLINE, sock.recv_from(&mut buf))
            .await
            .map_err(|_| anyhow::anyhow!("server stopped answering after {packet:02x?}"))??;
        let reply = buf[..n].to_vec();
        let done = reply.get(..2) == Some(&[0xab, 0xcd][..]);
        replies.push(reply);
        if done {
            return Ok(replies);
        }
    }
}

#[tokio::test]
async fn responses_are_never_answered() -> anyhow::Result<()> {
    with_deadline(async {
        let server = TestServer::start(three_clusters(), |_| {}).await?;
        let mut response = query(
            0x1111,
            "pay.prod.svc.clusterset.local.",
            RecordType::A,
            None,
        );
        response[2] |= 0x80; // QR=1
        for packet in [response.clone(), {
            let mut r = response.clone();
            r[3] = 0x03; // a NXDOMAIN "response"
            r
        }] {
            let replies = send_then_probe(server.addr, &packet).await?;
            assert_eq!(
                replies.len(),
                1,
                "the QR=1 packet was answered: {replies:02x?}"
            );
        }
        // Over TCP too: the probe after the response gets the only reply.
        let mut stream = TcpStream::connect(server.addr).await?;
        let len = u16::try_from(response.len())?;
        tokio::io::AsyncWriteExt::write_all(
            &mut stream,
            &[&len.to_be_bytes()[..], &response].concat(),
        )
        .await?;
        let reply = tcp_exchange(
            &mut stream,
            &query(
                0xabcd,
                "pay.prod.svc.clusterset.local.",
                RecordType::A,
                None,
            ),
        )
        .await?;
        assert_eq!(&reply[..2], &[0xab, 0xcd]);
        server.stop().await
    })
    .await
}

#[tokio::test]
async fn garbage_gets_formerr_or_nothing_and_the_server_keeps_answering() -> anyhow::Result<()> {
    with_deadline(async {
        let server = TestServer::start(three_clusters(), |_| {}).await?;
        let valid = query(
            0x4242,
            "pay.prod.svc.clusterset.local.",
            RecordType::A,
            Some(1232),
        );
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0x12],
            vec![0x42; 11],
            // Header only, claims one question.
            vec![0x42, 0x42, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
            // Compression pointer loop in the question.
            vec![
                0x42, 0x42, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c, 0, 1, 0, 1,
            ],
            // Label longer than 63.
            [
                &[0x42, 0x42, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 64][..],
                &[b'a'; 64],
                &[0, 0, 1, 0, 1],
            ]
            .concat(),
            // Two questions announced, one present.
            {
                let mut v = valid.clone();
                v[5] = 2;
                v
            },
            // OPT with an RDLENGTH past the end.
            {
                let mut v = valid.clone();
                let n = v.len();
                v[n - 1] = 40;
                v
            },
            // Truncated in the middle of the question.
            valid[..20].to_vec(),
            // Opcode 2 (STATUS).
            {
                let mut v = valid.clone();
                v[2] = 0x10;
                v
            },
        ];
        // And a few thousand random packets.
        for i in 0..3000u32 {
            let len = (i as usize * 7) % 600;
            let mut p: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
            if let Some(b) = p.get_mut(2) {
                *b &= 0x7f; // mostly queries, so the parser is exercised
            }
            cases.push(p);
        }
        let spray = UdpSocket::bind("127.0.0.1:0").await?;
        for (i, packet) in cases.iter().enumerate() {
            if i < 10 || i % 300 == 0 {
                let replies = send_then_probe(server.addr, packet).await?;
                for reply in &replies[..replies.len() - 1] {
                    // Whatever came back for garbage is a response to it, with its ID.
                    assert_eq!(&reply[..2], &packet[..2], "case {i}");
                    assert!(reply[2] & 0x80 != 0, "case {i}: QR");
                    if i < 10 {
                        let rcode = reply[3] & 0x0f;
                        assert!(
                            rcode == 1 || rcode == 4,
                            "case {i}: rcode {rcode}, want FORMERR or NOTIMP"
                        );
                    }
                }
            } else {
                // One long-lived socket: replies to these packets must not land on a later
                // probe socket that happens to reuse the port.
                spray.send_to(packet, server.addr).await?;
            }
        }
        // Still answering, over UDP and TCP.
        let msg = udp(
            server.addr,
            "pay.prod.svc.clusterset.local.",
            RecordType::A,
            None,
        )
        .await?;
        assert_eq!(rdata(&msg), ["A 10.64.0.1"]);
        let msg = tcp(server.addr, "pay.prod.svc.clusterset.local.", RecordType::A).await?;
        assert_eq!(rdata(&msg), ["A 10.64.0.1"]);
        server.stop().await
    })
    .await
}

#[tokio::test]
async fn tcp_connections_are_capped_and_idle_ones_closed() -> anyhow::Result<()> {
    with_deadline(async {
        let server = TestServer::start(three_clusters(), |c| {
            c.max_tcp_connections = 2;
            c.tcp_idle_timeout = Duration::from_millis(300);
        })
        .await?;
        let q = query(1, "pay.prod.svc.clusterset.local.", RecordType::A, None);
        let mut a = TcpStream::connect(server.addr).await?;
        let mut b = TcpStream::connect(server.addr).await?;
        tcp_exchange(&mut a, &q).await?;
        tcp_exchange(&mut b, &q).await?;
        // At the cap, a third connection takes the slot of the one that has waited longest
        // for a query (a), which is closed at once; the new one is served.
        let mut c = TcpStream::connect(server.addr).await?;
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(REPLY_DEADLINE, a.read(&mut byte)).await??;
        assert_eq!(n, 0, "the connection waiting longest must give its slot up");
        tcp_exchange(&mut c, &q).await?;
        // Idle connections are closed after the idle timeout...
        for s in [&mut b, &mut c] {
            let n = tokio::time::timeout(REPLY_DEADLINE, s.read(&mut byte)).await??;
            assert_eq!(n, 0, "idle connection must be closed");
        }
        // ...and so is one that sends half a query and stalls (slowloris).
        let mut d = TcpStream::connect(server.addr).await?;
        tokio::io::AsyncWriteExt::write_all(&mut d, &[0, 40, 0x12]).await?;
        let n = tokio::time::timeout(REPLY_DEADLINE, d.read(&mut byte)).await??;
        assert_eq!(n, 0, "stalled connection must be closed");
        // Slots are free again.
        assert_eq!(
            rdata(&tcp(server.addr, "pay.prod.svc.clusterset.local.", RecordType::A).await?),
            ["A 10.64.0.1"]
        );
        let metrics = server.metrics_text();
        assert!(
            metrics.contains("dns_tcp_evicted_total 1")
                && metrics.contains("dns_tcp_rejected_total 0"),
            "{metrics}"
        );
        server.stop().await
    })
    .await
}

#[tokio::test]
async fn a_busy_port_fails_at_bind() -> anyhow::Result<()> {
    with_deadline(async {
        let server = TestServer::start(three_clusters(), |_| {}).await?;
        let cfg = meshup_dns::DnsConfig {
            listen: server.addr,
            ..Default::default()
        };
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(three_clusters()));
        let mut registry = prometheus_client::registry::Registry::default();
        let err = meshup_dns::DnsServer::bind(
            &cfg,
            ClusterName::new("east")?,
            rx,
            meshup_dns::Metrics::register(&mut registry),
        )
        .expect_err("second bind on a used port must fail");
        assert!(err.to_string().contains("cannot bind DNS"), "{err}");
        server.stop().await
    })
    .await
}

/// The UDP port is the server's alone: a socket asking to share it with SO_REUSEPORT (as
/// `dig` does for its own port-0 bind) is refused. When the server set SO_REUSEPORT, a
/// `dig` run as the same user was now and then handed the server's port and read its own
/// query back as the answer.
#[tokio::test]
async fn the_udp_port_cannot_be_shared() -> anyhow::Result<()> {
    with_deadline(async {
        let server = TestServer::start(three_clusters(), |c| c.udp_workers = 2).await?;
        let intruder = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        intruder.set_reuse_port(true)?;
        let err = intruder
            .bind(&server.addr.into())
            .expect_err("a SO_REUSEPORT socket must not join the DNS server's UDP port");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse, "{err}");
        // Both workers still answer on the one socket.
        for id in 0..8u16 {
            let reply = udp_raw(
                server.addr,
                &query(id, "pay.prod.svc.clusterset.local.", RecordType::A, None),
            )
            .await?;
            let msg = Message::from_vec(&reply)?;
            assert_eq!(msg.metadata.message_type, MessageType::Response);
            assert_eq!(msg.metadata.id, id);
            assert_eq!(msg.answers.len(), 1, "{msg:?}");
        }
        server.stop().await
    })
    .await
}

/// Runs dig; fails loudly when it is not installed.
async fn dig(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new("dig")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("dig {args:?} did not finish"))?
    .map_err(|e| anyhow::anyhow!("cannot run dig (install dnsutils; CI must have it): {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn dig_over_udp_and_tcp() -> anyhow::Result<()> {
    with_deadline(async {
        let server = TestServer::start(three_clusters(), |_| {}).await?;
        let at = format!("@{}", server.addr.ip());
        let port = server.addr.port().to_string();
        let base = |extra: &[&str]| {
            let mut v = vec![at.as_str(), "-p", port.as_str(), "+time=2", "+tries=1"];
            v.extend_from_slice(extra);
            v.into_iter().map(str::to_owned).collect::<Vec<_>>()
        };
        let run = |extra: &[&str]| {
            let args = base(extra);
            async move { dig(&args.iter().map(String::as_str).collect::<Vec<_>>()).await }
        };
        for tcp_flag in ["+notcp", "+tcp"] {
            assert_eq!(
                run(&[tcp_flag, "+short", "pay.prod.svc.clusterset.local", "A"])
                    .await?
                    .trim(),
                "10.64.0.1"
            );
            assert_eq!(
                run(&[
                    tcp_flag,
                    "+short",
                    "_http._tcp.pay.prod.svc.clusterset.local",
                    "SRV"
                ])
                .await?
                .trim(),
                "10 100 8080 pay.prod.svc.clusterset.local."
            );
            assert_eq!(
                run(&[tcp_flag, "+short", "dns-version.clusterset.local", "TXT"])
                    .await?
                    .trim(),
                "\"1.0.0\""
            );
            assert_eq!(
                run(&[tcp_flag, "+short", "pay.prod.svc.west.clusterset.local"])
                    .await?
                    .trim(),
                "10.64.0.2"
            );
            let nx = run(&[tcp_flag, "nothere.prod.svc.clusterset.local"]).await?;
            assert!(nx.contains("status: NXDOMAIN"), "{nx}");
            assert!(nx.contains("flags: qr aa rd;"), "AA set, RA clear: {nx}");
            assert!(nx.contains("IN\tSOA"), "SOA in authority: {nx}");
            let nodata = run(&[tcp_flag, "prod.svc.clusterset.local"]).await?;
            assert!(
                nodata.contains("status: NOERROR") && nodata.contains("ANSWER: 0"),
                "{nodata}"
            );
            let refused = run(&[tcp_flag, "example.com"]).await?;
            assert!(refused.contains("status: REFUSED"), "{refused}");
            assert!(!refused.contains(" ra"), "no RA: {refused}");
            // The zone is class IN only: CHAOS or HESIOD questions get no IN data.
            for class in ["CH", "HS"] {
                let other =
                    run(&[tcp_flag, "-c", class, "pay.prod.svc.clusterset.local", "A"]).await?;
                assert!(other.contains("status: REFUSED"), "{class}: {other}");
                assert!(other.contains("ANSWER: 0"), "{class}: {other}");
            }
        }
        server.stop().await
    })
    .await
}

/// Answers counted on one path (`Fast`, `Slow` or `Tcp`), all types and codes together.
fn answers_on(server: &TestServer, path: &str) -> u64 {
    let label = format!("path=\"{path}\"");
    server
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with("dns_queries_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A real `dig` with its default flags (RD, AD as RFC 6840 §5.7 allows, an OPT with a
/// cookie), and with `+dnssec` (DO) and `+cdflag` (CD), is answered on the fast path: each
/// query adds exactly one fast-path answer and none on the catalog path. The answer's flags
/// are an authoritative server's: AA, RD and CD echoed, no AD (unsigned zone), no RA.
#[tokio::test]
async fn dig_queries_take_the_fast_path() -> anyhow::Result<()> {
    with_deadline(async {
        let server = TestServer::start(three_clusters(), |_| {}).await?;
        let (addr, srv) = (server.addr, &server);
        // The first table is built after start-up: wait until the fast path answers.
        eventually_ok(
            "the fast path answers",
            Duration::from_secs(10),
            || async move {
                let before = answers_on(srv, "Fast");
                udp_raw(
                    addr,
                    &query(1, "pay.prod.svc.clusterset.local.", RecordType::A, None),
                )
                .await?;
                let after = answers_on(srv, "Fast");
                anyhow::ensure!(after > before, "not answered on the fast path yet");
                Ok(())
            },
        )
        .await;
        let at = format!("@{}", server.addr.ip());
        let port = server.addr.port().to_string();
        for (extra, flags) in [
            (None, "flags: qr aa rd;"),
            (Some("+dnssec"), "flags: qr aa rd;"),
            (Some("+cdflag"), "flags: qr aa rd cd;"),
        ] {
            let mut args = vec![at.as_str(), "-p", port.as_str(), "+time=2", "+tries=1"];
            args.extend(extra);
            args.extend(["pay.prod.svc.clusterset.local", "A"]);
            let (fast, slow) = (answers_on(&server, "Fast"), answers_on(&server, "Slow"));
            let out = dig(&args).await?;
            let what = format!("dig {extra:?}");
            assert!(out.contains("status: NOERROR"), "{what}: {out}");
            assert!(out.contains("\t10.64.0.1\n"), "{what}: {out}");
            assert!(out.contains(flags), "{what}: expected {flags:?} in {out}");
            assert_eq!(
                (
                    answers_on(&server, "Fast") - fast,
                    answers_on(&server, "Slow") - slow
                ),
                (1, 0),
                "{what}: (fast, catalog) path answers for one dig query\n{out}"
            );
        }
        server.stop().await
    })
    .await
}

/// A burst of queries from one socket is read in batches (one `recvmmsg` for every datagram
/// queued, each into its own slot of one buffer): every reply answers its own query, by ID,
/// question and response code, names that exist and names that do not interleaved.
#[tokio::test]
async fn a_burst_of_queries_gets_each_its_own_answer() -> anyhow::Result<()> {
    with_deadline(async {
        let server = TestServer::start(three_clusters(), |c| c.udp_workers = 1).await?;
        let sock = UdpSocket::bind("127.0.0.1:0").await?;
        let name_of = |id: u16| {
            if id.is_multiple_of(2) {
                "pay.prod.svc.clusterset.local.".to_owned()
            } else {
                // Of every length, so no two neighbouring slots hold the same bytes.
                format!(
                    "{}.prod.svc.clusterset.local.",
                    "x".repeat(usize::from(id % 50) + 1)
                )
            }
        };
        const BURST: u16 = 64;
        for id in 0..BURST {
            sock.send_to(&query(id, &name_of(id), RecordType::A, None), server.addr)
                .await?;
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut buf = vec![0u8; 65_535];
        while seen.len() < usize::from(BURST) {
            let (n, _) = tokio::time::timeout(REPLY_DEADLINE, sock.recv_from(&mut buf))
                .await
                .map_err(|_| anyhow::anyhow!("{} of {BURST} answered", seen.len()))??;
            let msg = Message::from_vec(&buf[..n])?;
            let id = msg.metadata.id;
            anyhow::ensure!(
                id < BURST && seen.insert(id),
                "reply with ID {id} twice or unasked"
            );
            let question = msg.queries.first().map(|q| q.name().to_string());
            assert_eq!(
                question,
                Some(name_of(id)),
                "the reply to {id} has another question"
            );
            let expected = if id.is_multiple_of(2) {
                ResponseCode::NoError
            } else {
                ResponseCode::NXDomain
            };
            assert_eq!(msg.metadata.response_code, expected, "reply to {id}");
            assert_eq!(
                msg.answers.len(),
                usize::from(id.is_multiple_of(2)),
                "reply to {id}"
            );
        }
        server.stop().await
    })
    .await
}
