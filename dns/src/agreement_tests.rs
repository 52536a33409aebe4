//! The fast path and the hickory catalog path must give the same answer to every query the
//! fast path takes: same flags, rcode, question (as sent), sections and OPT. Checked for every
//! name form of a fixed catalog, and for seeded random (and mutated) queries over a catalog
//! that keeps changing, so a fast table that misses a change disagrees with the catalog.
//! Header flags too: a query's flags (AD as `dig` sends it, CD, DO, and the bits that mean
//! nothing in a query) never change which path answers, and both answer them alike.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use hickory_server::net::xfer::Protocol;
use meshup_core::catalog::{Change, ExportKey, VipKey};
use meshup_core::model::Protocol as PortProtocol;
use meshup_core::names::{ClusterName, GatewayId, ServiceKey};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;

use crate::answer::{ZoneSettings, ZoneView, existing_names, resolve, service_names};
use crate::config::DnsConfig;
use crate::fixture::{export, synthetic, three_clusters, vip};
use crate::handler::{ClustersetZone, Guarded, ViewSource};
use crate::wire::{FAST_TYPES, Fast, FastTable};

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

/// Header flags a query may carry, each tried on every query of the name-form check: `(what,
/// bits set in header byte 2, bits set in byte 3, DO in the OPT)`. `dig`'s defaults are RD, AD
/// and an OPT (RFC 6840 §5.7); `+dnssec` adds DO, `+cdflag` CD. The rest mean nothing in a
/// query (AA, TC, RA, Z, RCODE) and must change nothing either.
const FLAG_VARIANTS: [(&str, u8, u8, bool); 13] = [
    ("none", 0, 0, false),
    ("rd", 0x01, 0, false),
    ("rd ad (dig)", 0x01, 0x20, false),
    ("rd ad do (dig +dnssec)", 0x01, 0x20, true),
    ("ad", 0, 0x20, false),
    ("cd", 0, 0x10, false),
    ("ad cd", 0, 0x30, false),
    ("rd ad cd do", 0x01, 0x30, true),
    ("do", 0, 0, true),
    ("z", 0, 0x40, false),
    ("ra", 0, 0x80, false),
    ("rcode 5", 0, 0x05, false),
    ("aa tc", 0x06, 0, false),
];

/// `query` with the flags of one of [`FLAG_VARIANTS`] set.
fn with_flags(mut q: Vec<u8>, byte2: u8, byte3: u8, dnssec_ok: bool) -> Vec<u8> {
    q[2] |= byte2;
    q[3] |= byte3;
    if dnssec_ok {
        // The OPT, last and without options: flags are its TTL's third byte.
        let at = q.len() - 4;
        q[at] |= 0x80;
    }
    q
}

/// A query without header flags (RD clear), with an OPT of payload `edns` if given.
fn query(id: u16, name: &Name, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
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
    let mut fast_by_flags = [0usize; FLAG_VARIANTS.len()];
    let mut out = Vec::new();
    let mut id = 0u16;
    for name in &names {
        for spelled in [name.clone(), mixed_case(name)] {
            for qtype in types {
                for edns in [None, Some(1232), Some(100), Some(4096)] {
                    // Whether the query without flags took the fast path: with any flags it
                    // must too (and answer the same as the catalog, flags included).
                    let mut plain_fast = false;
                    for (v, &(flags, byte2, byte3, dnssec_ok)) in FLAG_VARIANTS.iter().enumerate() {
                        if dnssec_ok && edns.is_none() {
                            continue;
                        }
                        id = id.wrapping_add(7919);
                        let q =
                            with_flags(query(id, &spelled, qtype, edns), byte2, byte3, dnssec_ok);
                        let slow = guarded.answer_bytes(&q, src, Protocol::Udp).await;
                        let fast = table.answer(&q, &mut out);
                        compared += 1;
                        let what = format!("{spelled} {qtype} edns={edns:?} flags: {flags}");
                        let taken = matches!(fast, Fast::Answered { .. });
                        if v == 0 {
                            plain_fast = taken;
                        } else {
                            assert_eq!(
                                taken, plain_fast,
                                "{what}: the flags alone changed the path (fast: {taken})"
                            );
                        }
                        if !taken {
                            continue;
                        }
                        fast_count += 1;
                        fast_by_flags[v] += 1;
                        let slow = slow.expect("catalog answers what the fast path answers");
                        let question_end = q.len() - if edns.is_some() { 11 } else { 0 };
                        assert_same_answer(&q, question_end, &out, &slow, &what);
                        // The flags themselves, spelled out (RFC 4035 §3.1.6, RFC 6840 §5.8):
                        // CD and RD copied, AD, RA and Z clear, DO not copied.
                        assert_eq!(out[2] & 0x01, q[2] & 0x01, "RD of {what}");
                        assert_eq!(out[3] & 0xf0, q[3] & 0x10, "RA, Z, AD, CD of {what}");
                        if edns.is_some() {
                            assert_eq!(out[out.len() - 4], 0, "DO of {what}");
                        }
                    }
                }
            }
        }
    }
    eprintln!("fast path answered {fast_count} of {compared} queries");
    eprintln!(
        "fast answers by query flags: {:?}",
        FLAG_VARIANTS
            .iter()
            .map(|v| v.0)
            .zip(fast_by_flags)
            .collect::<Vec<_>>()
    );
    assert!(
        fast_by_flags[2] > 0 && fast_by_flags[3] > 0,
        "dig's queries must take the fast path: {fast_by_flags:?}"
    );
    // The fast path must actually take the ordinary queries.
    assert!(
        fast_count * 2 > compared,
        "fast path took {fast_count} of {compared}"
    );
}

/// The equality the two paths owe each other for one query both answered: same header
/// (flags, rcode), same records in the same order with the same TTLs, same OPT, and the
/// question echoed byte for byte (0x20 case included). Not the whole message byte for byte:
/// the fast path's NXDOMAIN carries its SOA uncompressed.
fn assert_same_answer(query: &[u8], question_end: usize, fast: &[u8], slow: &[u8], what: &str) {
    let f = Message::from_vec(fast).unwrap_or_else(|e| panic!("fast answer to {what}: {e}"));
    let s = Message::from_vec(slow).unwrap_or_else(|e| panic!("slow answer to {what}: {e}"));
    assert_eq!(f.metadata, s.metadata, "header of {what}");
    assert_eq!(f.queries, s.queries, "question of {what}");
    assert_eq!(f.answers, s.answers, "answers of {what}");
    assert_eq!(f.authorities, s.authorities, "authority of {what}");
    assert_eq!(f.additionals, s.additionals, "additional of {what}");
    assert_eq!(f.edns, s.edns, "OPT of {what}");
    let question = &query[12..question_end];
    assert_eq!(
        fast.get(12..question_end),
        Some(question),
        "fast question of {what}"
    );
    assert_eq!(
        slow.get(12..question_end),
        Some(question),
        "slow question of {what}"
    );
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

// === random queries over a changing catalog ===

/// Catalog changes; before the first and after each, `QUERIES_PER_STEP` queries.
const STEPS: usize = 40;
const QUERIES_PER_STEP: usize = 1000;
/// Fixed, so a failure reproduces; change it to explore other sequences.
const SEED: u64 = 0x6661_7374_2f73_6c6f;
/// Clusters of the generated catalogs (`east` is the local one).
const CLUSTERS: [&str; 5] = ["east", "west", "south", "north", "far"];

/// The catalog both paths answer from: `snapshot` is what the watcher would publish, the
/// table follows it with [`FastTable::update`] exactly as the server's table builder does,
/// and the catalog path reads the newest snapshot from the channel.
struct Scenario {
    settings: Arc<ZoneSettings>,
    local: ClusterName,
    snapshot: meshup_core::catalog::Snapshot,
    view: ZoneView,
    table: FastTable,
    catalog: watch::Sender<Arc<meshup_core::catalog::Snapshot>>,
    guarded: Guarded,
}

impl Scenario {
    fn new(snapshot: meshup_core::catalog::Snapshot) -> Self {
        let settings =
            Arc::new(ZoneSettings::from_config(&DnsConfig::default()).expect("settings"));
        let local = ClusterName::new("east").expect("name");
        let shared = Arc::new(snapshot.clone());
        let (catalog, rx) = watch::channel(shared.clone());
        let view = ZoneView::new(settings.clone(), local.clone(), shared);
        let table = FastTable::build(&view).expect("table");
        let guarded = Guarded::new(ClustersetZone::new(ViewSource::new(
            settings.clone(),
            local.clone(),
            rx,
        )));
        Self {
            settings,
            local,
            snapshot,
            view,
            table,
            catalog,
            guarded,
        }
    }

    /// Applies `changes` as one new revision; returns the names that existed before or
    /// exist now for the services the changes touched (the names a stale table gets wrong).
    fn change(&mut self, changes: Vec<Change>) -> Vec<Name> {
        let mut touched: Vec<ServiceKey> = Vec::new();
        for change in changes {
            touched.push(match &change {
                Change::PutExport(k, _) | Change::DeleteExport(k) => k.service.clone(),
                Change::PutVip(k, _) | Change::DeleteVip(k) => k.service.clone(),
                _ => continue,
            });
            self.snapshot.apply(change);
        }
        self.snapshot.revision += 1;
        let shared = Arc::new(self.snapshot.clone());
        let next = ZoneView::new(self.settings.clone(), self.local.clone(), shared.clone());
        self.table = self.table.update(&self.view, &next).expect("update");
        self.catalog.send_replace(shared);
        let mut names = BTreeSet::new();
        for key in &touched {
            for view in [&self.view, &next] {
                if let Some(service) = view.snapshot.service(key) {
                    names.extend(service_names(&self.settings, service));
                }
            }
        }
        self.view = next;
        names.into_iter().collect()
    }
}

/// Random catalog changes: exports added, replaced (other ports) and removed, local VIPs
/// set (IPv4 or IPv6, plain or pinned), moved and removed, other clusters' VIPs changed.
/// Mostly a few at a time (the incremental update), sometimes many (a full rebuild).
fn random_changes(
    rng: &mut StdRng,
    snap: &meshup_core::catalog::Snapshot,
    step: usize,
) -> Vec<Change> {
    let count = if step.is_multiple_of(5) {
        40
    } else {
        rng.random_range(1..=4)
    };
    let existing: Vec<ServiceKey> = snap.services().map(|v| v.key.clone()).collect();
    let local_vips: Vec<VipKey> = snap
        .vips()
        .filter(|(k, _)| k.cluster.as_str() == "east")
        .map(|(k, _)| k.clone())
        .collect();
    let pick_service = |rng: &mut StdRng| -> String {
        if existing.is_empty() || rng.random_bool(0.3) {
            // A new service, sometimes in a namespace nothing else uses.
            let ns = if rng.random_bool(0.5) {
                format!("ns-{}", rng.random_range(0..10))
            } else {
                format!("fresh-{step}")
            };
            format!("new-{step}-{}.{ns}", rng.random_range(0..5))
        } else {
            existing[rng.random_range(0..existing.len())].to_string()
        }
    };
    let ip = |rng: &mut StdRng| -> IpAddr {
        if rng.random_bool(0.2) {
            IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, rng.random::<u16>()])
        } else {
            IpAddr::from([10, 64, rng.random(), rng.random()])
        }
    };
    const PORTS: [(&str, u16, PortProtocol); 4] = [
        ("http", 8080, PortProtocol::Tcp),
        ("dns", 53, PortProtocol::Udp),
        ("grpc", 9000, PortProtocol::Tcp),
        ("web", 80, PortProtocol::Tcp),
    ];
    let mut out = Vec::new();
    for _ in 0..count {
        let cluster = CLUSTERS[rng.random_range(0..CLUSTERS.len())];
        let change = match rng.random_range(0..6) {
            0 | 1 => {
                let ports: Vec<_> = PORTS
                    .iter()
                    .copied()
                    .filter(|_| rng.random_bool(0.5))
                    .collect();
                let ports = if ports.is_empty() {
                    vec![PORTS[0]]
                } else {
                    ports
                };
                export(cluster, &pick_service(rng), &ports)
            }
            2 => {
                let Some(view) = (!existing.is_empty())
                    .then(|| snap.service(&existing[rng.random_range(0..existing.len())]))
                    .flatten()
                else {
                    continue;
                };
                let gone = view
                    .clusters
                    .keys()
                    .nth(rng.random_range(0..view.clusters.len()));
                let Some(gone) = gone else { continue };
                Ok(Change::DeleteExport(ExportKey {
                    cluster: gone.clone(),
                    gateway: GatewayId::new("gw-0").expect("id"),
                    service: view.key.clone(),
                }))
            }
            3 => {
                let target = rng.random_bool(0.3).then_some(cluster);
                vip("east", &pick_service(rng), target, ip(rng))
            }
            4 if !local_vips.is_empty() => Ok(Change::DeleteVip(
                local_vips[rng.random_range(0..local_vips.len())].clone(),
            )),
            _ => vip(cluster, &pick_service(rng), None, ip(rng)),
        };
        out.push(change.expect("generated names are valid"));
    }
    out
}

/// A name that exists and the types it has records of.
type Known = (Name, Vec<u16>);

/// Pairs each name with the types it has records of in `view`.
fn known(view: &ZoneView, names: Vec<Name>) -> Vec<Known> {
    names
        .into_iter()
        .map(|n| {
            let types = FAST_TYPES
                .iter()
                .filter(|t| !resolve(view, &n, **t).answers.is_empty())
                .map(|t| u16::from(*t))
                .collect();
            (n, types)
        })
        .collect()
}

/// A random query for a name of one of `pools` (or a name near it or outside the zone), as raw bytes,
/// with the end of its question. Mostly ordinary queries the fast path takes; a share with
/// odd types, classes, flags, EDNS versions, options and sizes, wrong counts, and mutated
/// bytes, which the fast path must either decline or answer exactly like the catalog.
fn random_query(rng: &mut StdRng, pools: [&[Known]; 3]) -> (Vec<u8>, usize) {
    let pool = pools[rng.random_range(0..pools.len())];
    let pool = if pool.is_empty() { pools[0] } else { pool };
    let (base, types) = &pool[rng.random_range(0..pool.len())];
    let mut labels: Vec<Vec<u8>> = base.iter().map(<[u8]>::to_vec).collect();
    match rng.random_range(0..20) {
        // An unknown name below an existing one (NXDOMAIN, or REFUSED outside the zone).
        0 | 1 => labels.insert(0, random_label(rng)),
        // Outside the zone, or its parent.
        2 => {
            labels = [&b"example"[..], b"com"].map(<[u8]>::to_vec).to_vec();
        }
        3 => {
            labels.push(b"example".to_vec());
        }
        4 => {
            labels.drain(..labels.len().saturating_sub(1));
        }
        // One label swapped for a random one.
        5 if !labels.is_empty() => {
            let i = rng.random_range(0..labels.len());
            labels[i] = random_label(rng);
        }
        _ => {}
    }
    for label in &mut labels {
        for b in label.iter_mut() {
            if b.is_ascii_alphabetic() && rng.random_bool(0.3) {
                *b ^= 0x20;
            }
        }
    }
    // Often a type the name has records of, so many answers carry records.
    let qtype: u16 = match rng.random_range(0..20) {
        _ if !types.is_empty() && rng.random_bool(0.5) => types[rng.random_range(0..types.len())],
        0..6 => 1,   // A
        6..8 => 28,  // AAAA
        8..11 => 33, // SRV
        11 => 16,    // TXT
        12 => 6,     // SOA
        13 => 2,     // NS
        14 => 255,   // ANY
        15 => [15, 257, 12, 5, 10, 13, 43, 48][rng.random_range(0..8)],
        16 => [252, 251, 41, 254, 0, 250, 249][rng.random_range(0..7)],
        _ => rng.random(),
    };
    let qclass: u16 = if rng.random_bool(0.85) {
        1
    } else {
        [3, 4, 254, 255, 0, rng.random()][rng.random_range(0..6)]
    };
    let edns = rng.random_bool(0.5);

    let mut q = Vec::with_capacity(128);
    q.extend_from_slice(&rng.random::<u16>().to_be_bytes());
    let mut flags2 = u8::from(rng.random_bool(0.5)); // RD
    // AD as `dig` sends it by default, CD as `dig +cdflag` does.
    let mut flags3 = if rng.random_bool(0.3) { 0x20 } else { 0 };
    if rng.random_bool(0.1) {
        flags3 |= 0x10;
    }
    if rng.random_bool(0.08) {
        flags2 = rng.random(); // opcode, AA, TC, even QR
    }
    if rng.random_bool(0.08) {
        flags3 = rng.random(); // RA, Z, AD, CD, rcode
    }
    q.extend_from_slice(&[flags2, flags3]);
    let (mut qd, mut an, mut ns, mut ar) = (1u16, 0u16, 0u16, u16::from(edns));
    if rng.random_bool(0.04) {
        match rng.random_range(0..4) {
            0 => qd = rng.random_range(0..3),
            1 => an = 1,
            2 => ns = 1,
            _ => ar = rng.random_range(0..3),
        }
    }
    for count in [qd, an, ns, ar] {
        q.extend_from_slice(&count.to_be_bytes());
    }
    for label in &labels {
        q.push(label.len() as u8);
        q.extend_from_slice(label);
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&qclass.to_be_bytes());
    let question_end = q.len();
    if edns {
        let payload: u16 = match rng.random_range(0..12) {
            0 => 0,
            1 => 1,
            2 => 100,
            3 => 511,
            4 => 512,
            5 => 513,
            6 => 1232,
            7 => 1400,
            8 => 4096,
            9 => u16::MAX,
            _ => rng.random(),
        };
        let ext_rcode = if rng.random_bool(0.05) {
            rng.random()
        } else {
            0
        };
        let version = if rng.random_bool(0.1) {
            rng.random()
        } else {
            0
        };
        let do_bit = if rng.random_bool(0.3) { 0x80 } else { 0 };
        let mut options = Vec::new();
        match rng.random_range(0..20) {
            // A cookie, padding, NSID, an unknown code, a length past the end.
            0 => options.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]),
            1 => options.extend_from_slice(&[0, 12, 0, 4, 0, 0, 0, 0]),
            2 => options.extend_from_slice(&[0, 3, 0, 0]),
            3 => options.extend_from_slice(&[0xfd, 0xe9, 0, 2, 0xab, 0xcd]),
            4 => options.extend_from_slice(&[0, 10, 0, 40, 1, 2]),
            _ => {}
        }
        q.extend_from_slice(&[0, 0, 41]);
        q.extend_from_slice(&payload.to_be_bytes());
        q.extend_from_slice(&[ext_rcode, version, do_bit, 0]);
        q.extend_from_slice(&(options.len() as u16).to_be_bytes());
        q.extend_from_slice(&options);
    }
    if rng.random_bool(0.05) {
        let i = rng.random_range(0..q.len());
        q[i] = rng.random();
    }
    (q, question_end)
}

/// A DNS label: mostly hostname characters, sometimes any byte at all.
fn random_label(rng: &mut StdRng) -> Vec<u8> {
    let len = rng.random_range(1..=20);
    if rng.random_bool(0.1) {
        return (0..len).map(|_| rng.random()).collect();
    }
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-_";
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())])
        .collect()
}

/// How the fast path fared over the run, to prove the generator exercises it.
#[derive(Debug, Default)]
struct Tally {
    queries: usize,
    answered: usize,
    nxdomain: usize,
    positive: usize,
    with_edns: usize,
    /// Answered with AD or CD in the query.
    with_ad_or_cd: usize,
    dropped: usize,
    formerr: usize,
}

#[tokio::test]
async fn fast_and_catalog_paths_agree_on_random_queries_across_catalog_changes() {
    tokio::time::timeout(std::time::Duration::from_secs(240), agree_randomly())
        .await
        .expect("random agreement check finishes within its deadline");
}

async fn agree_randomly() {
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut start = synthetic("east", &CLUSTERS[..3], 40).expect("catalog");
    // An IPv6 VIP and a service without a local VIP from the start.
    start.apply(vip("east", "svc-1.ns-1", None, "fd00::1".parse().expect("ip")).expect("c"));
    start.apply(Change::DeleteVip(VipKey {
        cluster: ClusterName::new("east").expect("name"),
        service: "svc-2.ns-2".parse().expect("key"),
        target: None,
    }));
    let mut scenario = Scenario::new(start);
    let src: SocketAddr = "127.0.0.1:5353".parse().expect("addr");
    let mut tally = Tally::default();
    let mut out = Vec::new();
    for step in 0..=STEPS {
        let touched = if step == 0 {
            Vec::new()
        } else {
            let changes = random_changes(&mut rng, &scenario.snapshot, step);
            scenario.change(changes)
        };
        // Names that vanished at this step are among `touched`: queried on purpose. Names
        // with records get their own share, as most existing names are empty non-terminals.
        let names = known(&scenario.view, existing_names(&scenario.view));
        let with_records: Vec<Known> = names.iter().filter(|k| !k.1.is_empty()).cloned().collect();
        let touched = known(&scenario.view, touched);
        for i in 0..QUERIES_PER_STEP {
            let (q, question_end) = random_query(&mut rng, [&names, &with_records, &touched]);
            let fast = scenario.table.answer(&q, &mut out);
            let slow = scenario.guarded.answer_bytes(&q, src, Protocol::Udp).await;
            tally.queries += 1;
            let what = || {
                let parsed = Message::from_vec(&q)
                    .map(|m| format!("{:?}", m.queries))
                    .unwrap_or_else(|e| format!("unparsable: {e}"));
                format!("step {step} query {i} {parsed} bytes {q:02x?}")
            };
            match fast {
                // Read from the header alone: the catalog path must send these very bytes.
                Fast::Answered {
                    rcode: ResponseCode::FormErr,
                    ..
                } => {
                    assert_eq!(
                        slow.as_deref(),
                        Some(&out[..]),
                        "fast path's FORMERR differs from the catalog's: {}",
                        what()
                    );
                    tally.formerr += 1;
                }
                Fast::Answered { rcode, .. } => {
                    let slow = slow.unwrap_or_else(|| {
                        panic!(
                            "catalog path dropped what the fast path answered: {}",
                            what()
                        )
                    });
                    assert_same_answer(&q, question_end, &out, &slow, &what());
                    tally.answered += 1;
                    match rcode {
                        ResponseCode::NXDomain => tally.nxdomain += 1,
                        ResponseCode::NoError if out.get(6..8) != Some(&[0, 0]) => {
                            tally.positive += 1
                        }
                        _ => {}
                    }
                    if q.len() > question_end {
                        tally.with_edns += 1;
                    }
                    if q[3] & 0x30 != 0 {
                        tally.with_ad_or_cd += 1;
                    }
                }
                Fast::Drop => {
                    assert_eq!(
                        slow,
                        None,
                        "fast path dropped, catalog answered: {}",
                        what()
                    );
                    tally.dropped += 1;
                }
                Fast::Slow => {}
            }
        }
    }
    eprintln!("{tally:?}");
    // The generator must keep the fast path busy with every kind of answer, or the
    // agreement above proves little (the rest goes to the catalog path alone: odd classes,
    // flags, EDNS versions or options, names outside the zone, mangled packets).
    assert!(tally.answered * 5 > tally.queries * 2, "{tally:?}");
    assert!(tally.positive * 5 > tally.answered, "{tally:?}");
    assert!(tally.nxdomain * 10 > tally.answered, "{tally:?}");
    assert!(tally.with_edns * 5 > tally.answered, "{tally:?}");
    assert!(tally.with_ad_or_cd * 5 > tally.answered, "{tally:?}");
    assert!(tally.dropped > 0, "{tally:?}");
    assert!(tally.formerr > 0, "{tally:?}");
}
