//! The fast path and the hickory catalog path must give the same answer to every query the
//! fast path takes: same flags, rcode, question (as sent), sections and OPT.

use std::net::SocketAddr;
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use hickory_server::net::xfer::Protocol;
use meshup_core::names::ClusterName;
use tokio::sync::watch;

use crate::answer::{ZoneSettings, ZoneView, existing_names};
use crate::config::DnsConfig;
use crate::fixture::three_clusters;
use crate::handler::{ClustersetZone, Guarded, ViewSource};
use crate::wire::{Fast, FastTable};

/// Flips the case of every other letter, like a resolver doing 0x20.
fn mixed_case(name: &Name) -> Name {
    let text: String = name
        .to_ascii()
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    Name::from_ascii(text).unwrap_or_else(|_| name.clone())
}

fn query(id: u16, name: &Name, qtype: RecordType, edns: Option<u16>, rd: bool) -> Vec<u8> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = rd;
    msg.add_query(Query::query(name.clone(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        msg.set_edns(e);
    }
    msg.to_vec().expect("encodes")
}

#[tokio::test]
async fn fast_and_catalog_paths_agree_for_every_name_form() {
    tokio::time::timeout(std::time::Duration::from_secs(120), agree())
        .await
        .expect("agreement check finishes within its deadline");
}

async fn agree() {
    let cfg = DnsConfig::default();
    let settings = Arc::new(ZoneSettings::from_config(&cfg).expect("settings"));
    let local = ClusterName::new("east").expect("name");
    let snapshot = Arc::new(three_clusters());
    let (_tx, rx) = watch::channel(snapshot.clone());
    let view = ZoneView::new(settings.clone(), local.clone(), snapshot);
    let table = FastTable::build(&view).expect("table");
    let guarded = Guarded::new(ClustersetZone::new(ViewSource::new(settings, local, rx)));

    let mut names = existing_names(&view);
    for extra in [
        "nothere.prod.svc.clusterset.local.",
        "west.pay.prod.svc.clusterset.local.",
        "_x._tcp.pay.prod.svc.clusterset.local.",
        "deep.a.b.c.d.clusterset.local.",
        "example.com.",
        "clusterset.local.example.",
    ] {
        names.push(Name::from_ascii(extra).expect("name"));
    }
    let types = [
        RecordType::A,
        RecordType::AAAA,
        RecordType::SRV,
        RecordType::TXT,
        RecordType::SOA,
        RecordType::NS,
        RecordType::ANY,
        RecordType::MX,
        RecordType::CAA,
        RecordType::PTR,
        RecordType::AXFR,
        RecordType::Unknown(4000),
    ];
    let src: SocketAddr = "127.0.0.1:5353".parse().expect("addr");
    let (mut fast_count, mut compared) = (0, 0);
    let mut out = Vec::new();
    let mut id = 0u16;
    for name in &names {
        for spelled in [name.clone(), mixed_case(name)] {
            for qtype in types {
                for edns in [None, Some(1232), Some(100), Some(4096)] {
                    for rd in [false, true] {
                        id = id.wrapping_add(7919);
                        let q = query(id, &spelled, qtype, edns, rd);
                        let slow = guarded.answer_bytes(&q, src, Protocol::Udp).await;
                        let fast = table.answer(&q, &mut out);
                        compared += 1;
                        let Fast::Answered { .. } = fast else {
                            continue;
                        };
                        fast_count += 1;
                        let slow = slow.expect("catalog answers what the fast path answers");
                        let what = format!("{spelled} {qtype} edns={edns:?} rd={rd}");
                        let (f, s) = (
                            Message::from_vec(&out).expect("fast decodes"),
                            Message::from_vec(&slow).expect("slow decodes"),
                        );
                        assert_eq!(f.metadata, s.metadata, "header of {what}");
                        assert_eq!(f.answers, s.answers, "answers of {what}");
                        assert_eq!(f.authorities, s.authorities, "authority of {what}");
                        assert_eq!(f.additionals, s.additionals, "additional of {what}");
                        assert_eq!(f.edns, s.edns, "OPT of {what}");
                        // The question is echoed byte for byte (0x20 case included).
                        let qlen = q.len() - if edns.is_some() { 11 } else { 0 };
                        assert_eq!(&out[12..qlen], &q[12..qlen], "question of {what}");
                        assert_eq!(&slow[12..qlen], &q[12..qlen], "question of {what}");
                        for r in f.answers.iter().chain(&f.authorities).chain(&f.additionals) {
                            // TTLs too (Record's equality may ignore them).
                            let twin = s
                                .answers
                                .iter()
                                .chain(&s.authorities)
                                .chain(&s.additionals)
                                .find(|x| *x == r)
                                .expect("same records");
                            assert_eq!(r.ttl, twin.ttl, "ttl in {what}");
                        }
                    }
                }
            }
        }
    }
    eprintln!("fast path answered {fast_count} of {compared} queries");
    // The fast path must actually take the ordinary queries.
    assert!(
        fast_count * 2 > compared,
        "fast path took {fast_count} of {compared}"
    );
}
