//! The fast path: answers precomputed in wire form, served by patching a few bytes.
//!
//! For every name that exists in the zone and every query type with an answer, the whole
//! response message (header, lowercase question, records, compressed) is encoded once per
//! catalog change from [`resolve`](crate::answer::resolve). A query that matches is answered
//! by copying that template and patching only:
//!
//! - the ID, the RD bit and the CD bit (copied from the query; see "Header flags"),
//! - the question (copied byte for byte from the query: same length, since the key is the
//!   lowercased name, so the client's 0x20 case comes back and compression pointers into the
//!   question stay valid),
//! - an OPT record appended when the query had one (ARCOUNT + 1).
//!
//! A message that cannot be read at all (counts its body does not hold, bad label types,
//! pointers that do not point backwards) is answered FORMERR here, from its header, as the
//! catalog would; a response or anything shorter than a header is dropped. Anything else
//! unusual (other opcodes, several questions, a compressed question, an EDNS
//! version above 0, meta query types, a response that would not fit the client's UDP size) returns
//! [`Fast::Slow`] and goes to hickory's `Catalog`. NXDOMAIN for unknown
//! names inside the zone is served here too, so random-subdomain floods stay on the cheap path.
//!
//! ## Pinned names
//!
//! A cluster-pinned name (`<svc>.<ns>.svc.<cluster>`) exists for every cluster that
//! exports the service, but has an address only where this cluster allocated it a VIP
//! (`pinned_names`). Without one it answers NODATA to every type; at 100 clusters that is
//! 100 names per service, as many as the catalog has export records, all with the same
//! answer. The table leaves those out: a name it lacks is looked up in the snapshot it was
//! built for (`pinned_host_exists`: the name's shape, then the service's view), and
//! answers NODATA if the view lists the cluster, NXDOMAIN otherwise, with the same SOA as
//! the catalog path. At 1M export records this keeps 1M entries out of the table.
//!
//! ## Header flags
//!
//! What an answer keeps of the query's header flags, on both paths (here, and hickory's
//! `Metadata::response_from_request` on the catalog path, which is the reference). No flag
//! of an ordinary query (QR=0, opcode QUERY) sends it to the catalog path: `dig` sets AD in
//! every query (RFC 6840 §5.7), and its queries must stay on the fast path.
//!
//! | query bit | in the answer | why |
//! | --- | --- | --- |
//! | RD | copied | RFC 1035 §4.1.1 |
//! | CD | copied | RFC 4035 §3.1.6: the name server "MUST copy the setting of the CD bit from a query to the corresponding response" |
//! | AD | always 0 | RFC 6840 §5.7: AD in a query only asks for AD in the answer; §5.8: a server sets AD only when it considers the answer's data authentic (DNSSEC), and this zone is unsigned |
//! | AA, TC | from the answer | meaningless in a query |
//! | RA | always 0 | no recursion |
//! | Z | always 0 | RFC 1035 §4.1.1: zero in all queries and responses |
//! | RCODE | from the answer | meaningless in a query |
//! | DO (EDNS) | not copied: the answer's OPT has no flags | hickory built without DNSSEC (as here) does not copy it, so neither does the fast path. RFC 3225 §3 says DO "MUST be copied in the response": a known deviation, harmless for an unsigned zone (DO only asks for DNSSEC records, and there are none); copying it would mean patching the catalog path's encoded OPT too |

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use hickory_proto::ProtoError;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder, NameEncoding};

use imbl::ordmap::DiffItem;

use crate::answer::{
    Answer, ZoneView, pinned_empty_names, resolve, service_base_names, service_name, table_names,
};
use meshup_core::catalog::Snapshot;
use meshup_core::names::{ClusterName, ServiceKey};

/// Size of the DNS header.
pub const HEADER_LEN: usize = 12;
/// Largest UDP answer without EDNS (RFC 1035 §4.2.1).
pub const MAX_PLAIN_UDP: usize = 512;
/// Query types precomputed per name; every other ordinary type is NODATA for a name that
/// exists.
pub const FAST_TYPES: [RecordType; 7] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::SRV,
    RecordType::TXT,
    RecordType::SOA,
    RecordType::NS,
    RecordType::ANY,
];
const TYPE_OPT: u16 = 41;
/// RD in the header's third byte, CD in its fourth.
const FLAG_RD: u8 = 0x01;
const FLAG_CD: u8 = 0x10;

/// Longest name in wire form (RFC 1035 §3.1).
const MAX_NAME_WIRE: usize = 255;
const CLASS_IN: u16 = 1;
const OPT_RR_LEN: usize = 11;

/// Why the template table could not be built (an encoding bug, not an input problem).
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("could not encode the precomputed answer for {name} {qtype}: {source}")]
    Encode {
        name: String,
        qtype: RecordType,
        source: ProtoError,
    },
}

/// One name's precomputed answers in a single allocation, so a lookup walks one region of
/// memory instead of chasing a pointer per field (the table does not fit in cache; each
/// dependent miss costs as much as the rest of the answer). Layout:
///
/// `[key_len u8][key][count u8]([qtype u16][len u16] × count)[nodata_len u16][answers…][nodata]`
///
/// Hash and equality are those of the key, so the set can be searched with `&[u8]`.
#[derive(Debug, Clone)]
struct NameEntry(Arc<[u8]>);

impl NameEntry {
    /// Packs an entry; `None` if a length does not fit its field (cannot happen for DNS
    /// names and messages, which are at most 255 and 65535 bytes).
    fn pack(key: &[u8], answers: &[(u16, Vec<u8>)], nodata: &[u8]) -> Option<Self> {
        let mut blob = Vec::with_capacity(
            4 + key.len()
                + 4 * answers.len()
                + answers.iter().map(|a| a.1.len()).sum::<usize>()
                + nodata.len(),
        );
        blob.push(u8::try_from(key.len()).ok()?);
        blob.extend_from_slice(key);
        blob.push(u8::try_from(answers.len()).ok()?);
        for (qtype, bytes) in answers {
            blob.extend_from_slice(&qtype.to_be_bytes());
            blob.extend_from_slice(&u16::try_from(bytes.len()).ok()?.to_be_bytes());
        }
        blob.extend_from_slice(&u16::try_from(nodata.len()).ok()?.to_be_bytes());
        for (_, bytes) in answers {
            blob.extend_from_slice(bytes);
        }
        blob.extend_from_slice(nodata);
        Some(Self(blob.into()))
    }

    fn key(&self) -> &[u8] {
        let len = usize::from(self.0.first().copied().unwrap_or(0));
        self.0.get(1..1 + len).unwrap_or(&[])
    }

    /// Whether any type has records here (else every type is NODATA).
    fn has_answers(&self) -> bool {
        let len = usize::from(self.0.first().copied().unwrap_or(0));
        self.0.get(1 + len).is_some_and(|&count| count > 0)
    }

    /// The response template for `qtype`, or the NODATA template when `qtype` has no
    /// records here (`Err(())` when the blob is malformed, which `pack` never produces).
    fn template(&self, qtype: u16) -> Result<(bool, &[u8]), ()> {
        let b = &*self.0;
        let u16_at = |i: usize| -> Result<usize, ()> {
            let two = b.get(i..i + 2).ok_or(())?;
            Ok(usize::from(u16::from_be_bytes([two[0], two[1]])))
        };
        let mut pos = 1 + usize::from(*b.first().ok_or(())?);
        let count = usize::from(*b.get(pos).ok_or(())?);
        pos += 1;
        let dir = pos;
        let nodata_len = u16_at(dir + 4 * count)?;
        let mut off = dir + 4 * count + 2;
        for i in 0..count {
            let t = u16_at(dir + 4 * i)?;
            let len = u16_at(dir + 4 * i + 2)?;
            if t == usize::from(qtype) {
                return b.get(off..off + len).map(|t| (true, t)).ok_or(());
            }
            off += len;
        }
        b.get(off..off + nodata_len).map(|t| (false, t)).ok_or(())
    }
}

impl std::borrow::Borrow<[u8]> for NameEntry {
    fn borrow(&self) -> &[u8] {
        self.key()
    }
}

impl std::hash::Hash for NameEntry {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialEq for NameEntry {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for NameEntry {}

/// The table of precomputed answers for one snapshot.
#[derive(Debug)]
pub struct FastTable {
    /// Every name but the apex. Entries are shared between successive tables, and an
    /// update copies only the shards it touches; a change that no answer shows (endpoint
    /// counts) copies none.
    names: Names,
    /// The apex, apart: its SOA serial is the catalog revision, so it is the one name that
    /// changes with every revision.
    apex_entry: NameEntry,
    /// Lowercase wire form of the apex, to tell "in zone, unknown" (NXDOMAIN) from
    /// "outside the zone" (REFUSED, slow path).
    apex: Box<[u8]>,
    /// NXDOMAIN: header flags byte 3 and the SOA record, uncompressed (the question varies).
    nx_soa: Box<[u8]>,
    /// The catalog the table was built for: a name the table lacks may be a cluster-pinned
    /// name without an address, which exists (NODATA) if the service's view lists the
    /// cluster (module docs, "Pinned names").
    snapshot: Arc<Snapshot>,
}

/// Names per shard of a table when it is built: an update that touches one name copies
/// the pointers of this many entries, not of every name in the zone.
const NAMES_PER_SHARD: usize = 256;

/// A table's names in shards by hash, each shared between successive tables until an
/// update touches it (copy on write).
#[derive(Debug, Clone)]
struct Names {
    hasher: NameHash,
    /// A power of two of them.
    shards: Vec<Arc<HashSet<NameEntry, NameHash>>>,
    len: usize,
}

impl Names {
    fn new(entries: Vec<NameEntry>) -> Self {
        let count = (entries.len() / NAMES_PER_SHARD)
            .next_power_of_two()
            .clamp(1, 1 << 16);
        let hasher = NameHash::new();
        let mut shards: Vec<HashSet<NameEntry, NameHash>> =
            (0..count).map(|_| HashSet::with_hasher(hasher)).collect();
        for entry in entries {
            shards[Self::index(&hasher, count, entry.key())].insert(entry);
        }
        Self {
            hasher,
            len: shards.iter().map(HashSet::len).sum(),
            shards: shards.into_iter().map(Arc::new).collect(),
        }
    }

    /// The shard of `key`: hash bits 40 and up, apart from those a shard's own table uses
    /// (its bucket from the low bits, its control byte from the top seven).
    fn index(hasher: &NameHash, count: usize, key: &[u8]) -> usize {
        use std::hash::BuildHasher;
        (hasher.hash_one(key) >> 40) as usize & (count - 1)
    }

    fn get(&self, key: &[u8]) -> Option<&NameEntry> {
        self.shards[Self::index(&self.hasher, self.shards.len(), key)].get(key)
    }

    /// The shard of `key`, copied first if another table shares it.
    fn shard_mut(&mut self, key: &[u8]) -> &mut HashSet<NameEntry, NameHash> {
        let i = Self::index(&self.hasher, self.shards.len(), key);
        Arc::make_mut(&mut self.shards[i])
    }

    fn put(&mut self, entry: NameEntry) {
        if self.shard_mut(entry.key()).replace(entry).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, key: &[u8]) {
        if self.shard_mut(key).remove(key) {
            self.len -= 1;
        }
    }

    fn iter(&self) -> impl Iterator<Item = &NameEntry> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    /// How many shards `self` and `other` share (for tests: what an update copied).
    #[cfg(test)]
    fn shared_shards(&self, other: &Self) -> usize {
        self.shards
            .iter()
            .zip(&other.shards)
            .filter(|(a, b)| Arc::ptr_eq(a, b))
            .count()
    }
}

/// The apex's precomputed answers (it always exists).
fn apex_entry(zone: &ZoneView) -> Result<NameEntry, TableError> {
    let origin = &zone.settings.origin;
    entry_for(zone, origin)?.ok_or_else(|| TableError::Encode {
        name: origin.to_string(),
        qtype: RecordType::SOA,
        source: "the apex has no answers".into(),
    })
}

/// The precomputed answers of one existing name; `None` when the name does not exist.
fn entry_for(zone: &ZoneView, name: &Name) -> Result<Option<NameEntry>, TableError> {
    let err = |qtype, source| TableError::Encode {
        name: name.to_string(),
        qtype,
        source,
    };
    // CAA stands for "any ordinary type with no records here".
    let probe = resolve(zone, name, RecordType::CAA);
    if probe.rcode != ResponseCode::NoError {
        return Ok(None);
    }
    let mut answers = Vec::new();
    for qtype in FAST_TYPES {
        let answer = resolve(zone, name, qtype);
        if answer.rcode == ResponseCode::NoError && !answer.answers.is_empty() {
            let bytes = encode_answer(name, qtype, &answer).map_err(|e| err(qtype, e))?;
            answers.push((u16::from(qtype), bytes));
        }
    }
    let nodata =
        encode_answer(name, RecordType::CAA, &probe).map_err(|e| err(RecordType::CAA, e))?;
    // A name with answers too large to pack is simply left to the catalog path.
    Ok(NameEntry::pack(&wire_name(name), &answers, &nodata))
}

/// The entry `name` gets in the table: [`entry_for`]'s, except for a cluster-pinned name
/// without records, which the miss path answers (`None`: left out).
fn table_entry(zone: &ZoneView, name: &Name, apex: &[u8]) -> Result<Option<NameEntry>, TableError> {
    let Some(entry) = entry_for(zone, name)? else {
        return Ok(None);
    };
    if !entry.has_answers() && pinned_host_exists(&zone.snapshot, entry.key(), apex) {
        return Ok(None);
    }
    Ok(Some(entry))
}

/// Whether `key` (a lowercase wire name) is `<svc>.<ns>.svc.<cluster>` right under `apex`
/// for a service whose view lists `cluster`: a cluster-pinned name that exists, as the
/// catalog path classifies names.
fn pinned_host_exists(snapshot: &Snapshot, key: &[u8], apex: &[u8]) -> bool {
    let mut labels: [&[u8]; 4] = [&[]; 4];
    let mut pos = 0;
    for label in &mut labels {
        let Some(&len) = key.get(pos) else {
            return false;
        };
        let Some(text) = key.get(pos + 1..pos + 1 + usize::from(len)) else {
            return false;
        };
        if len == 0 {
            return false;
        }
        *label = text;
        pos += 1 + usize::from(len);
    }
    if key.get(pos..) != Some(apex) || labels[2] != b"svc" {
        return false;
    }
    let (Ok(svc), Ok(ns), Ok(cluster)) = (
        std::str::from_utf8(labels[0]),
        std::str::from_utf8(labels[1]),
        std::str::from_utf8(labels[3]),
    ) else {
        return false;
    };
    let (Ok(service), Ok(cluster)) = (ServiceKey::parse(ns, svc), ClusterName::new(cluster)) else {
        return false;
    };
    snapshot
        .service(&service)
        .is_some_and(|view| view.clusters.contains_key(&cluster))
}

/// The names whose answers may differ between two zone views of the same settings and local
/// cluster, found with the persistent maps' cheap `diff`; `None` once more than `limit`
/// (then a full build is cheaper):
///
/// - a service that came or went: its names that do not name a cluster, and its pinned
///   names that have a VIP of this cluster (the others are not in the table: see "Pinned
///   names" above);
/// - a service whose ports changed: its names that do not name a cluster;
/// - a cluster that came to or left a service: its pinned name, if it has a VIP here;
/// - a (cluster, namespace) pair that started or stopped exporting: the pinned empty
///   non-terminals it makes exist;
/// - a VIP of this cluster: the names that answer it.
///
/// A new service of 100 clusters in a federation where they all export its namespace
/// already is thus its 3 + 2 × ports base names, not 400 more.
fn changed_names(old: &ZoneView, new: &ZoneView, limit: usize) -> Option<BTreeSet<Name>> {
    let settings = &*new.settings;
    let local = &new.local;
    let (before, after) = (&*old.snapshot, &*new.snapshot);
    let mut candidates: BTreeSet<Name> = BTreeSet::new();
    let pinned_host = |candidates: &mut BTreeSet<Name>, key: &ServiceKey, cluster: &ClusterName| {
        if [before, after]
            .iter()
            .any(|s| s.vip(local, key, Some(cluster)).is_some())
        {
            candidates.extend(service_name(settings, key, Some(cluster)));
        }
    };
    for item in before.service_map().diff(after.service_map()) {
        match item {
            DiffItem::Add(_, view) | DiffItem::Remove(_, view) => {
                candidates.extend(service_base_names(settings, view));
                for cluster in view.clusters.keys() {
                    pinned_host(&mut candidates, &view.key, cluster);
                }
            }
            DiffItem::Update {
                old: (_, was),
                new: (_, is),
            } => {
                if was.ports != is.ports {
                    candidates.extend(service_base_names(settings, was));
                    candidates.extend(service_base_names(settings, is));
                }
                let moved = was
                    .clusters
                    .keys()
                    .filter(|c| !is.clusters.contains_key(*c))
                    .chain(
                        is.clusters
                            .keys()
                            .filter(|c| !was.clusters.contains_key(*c)),
                    );
                for cluster in moved {
                    pinned_host(&mut candidates, &is.key, cluster);
                }
            }
        }
        if candidates.len() > limit {
            return None;
        }
    }
    for item in before.exporting_map().diff(after.exporting_map()) {
        match item {
            DiffItem::Add((cluster, ns), _) | DiffItem::Remove((cluster, ns), _) => {
                candidates.extend(pinned_empty_names(settings, cluster, ns));
            }
            // Only the count of exported services changed: the names stay.
            DiffItem::Update { .. } => {}
        }
        if candidates.len() > limit {
            return None;
        }
    }
    for item in before.vip_map().diff(after.vip_map()) {
        let key = match item {
            DiffItem::Add(k, _) | DiffItem::Remove(k, _) => k,
            DiffItem::Update { new: (k, _), .. } => k,
        };
        if key.cluster != *local {
            continue;
        }
        match &key.target {
            Some(target) => candidates.extend(service_name(settings, &key.service, Some(target))),
            None => {
                for snap in [before, after] {
                    if let Some(view) = snap.service(&key.service) {
                        candidates.extend(service_base_names(settings, view));
                    }
                }
            }
        }
    }
    Some(candidates)
}

/// Hashing for the name table: a seeded multiply-rotate hash over 8-byte words (the
/// FxHash step), several times cheaper than SipHash on 30–60 byte names. The table's keys
/// come from the catalog, never from packets, and the seed is random per process, so
/// queries cannot grow its chains; SipHash's flooding resistance buys nothing here.
#[derive(Debug, Clone, Copy)]
struct NameHash {
    seed: u64,
}

impl NameHash {
    fn new() -> Self {
        use std::hash::BuildHasher;
        Self {
            seed: std::hash::RandomState::new().hash_one(0x6d65_7368u64),
        }
    }
}

impl std::hash::BuildHasher for NameHash {
    type Hasher = NameHasher;
    fn build_hasher(&self) -> NameHasher {
        NameHasher(self.seed)
    }
}

/// See [`NameHash`].
#[derive(Debug)]
struct NameHasher(u64);

impl std::hash::Hasher for NameHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(w)).wrapping_mul(K);
        }
    }

    fn write_usize(&mut self, n: usize) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        self.0 = (self.0.rotate_left(5) ^ n as u64).wrapping_mul(K);
    }

    fn finish(&self) -> u64 {
        // Mix the high bits down: hashbrown takes its control bits from the top.
        self.0 ^ (self.0 >> 29)
    }
}

/// What the fast path did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fast {
    /// `out` holds the response.
    Answered { qtype: u16, rcode: ResponseCode },
    /// Not for the fast path: hand the packet to the hickory catalog.
    Slow,
    /// Not answerable at all (a response, or too short to have an ID): drop silently.
    Drop,
}

/// Encodes an [`Answer`] as a complete response with ID 0 and a lowercase question.
pub fn encode_answer(
    qname: &Name,
    qtype: RecordType,
    answer: &Answer,
) -> Result<Vec<u8>, ProtoError> {
    let mut msg = Message::new(0, MessageType::Response, OpCode::Query);
    msg.metadata.authoritative = answer.authoritative;
    msg.metadata.response_code = answer.rcode;
    msg.add_query(Query::query(qname.to_lowercase(), qtype));
    msg.answers.extend(answer.answers.iter().cloned());
    msg.authorities.extend(answer.authorities.iter().cloned());
    msg.additionals.extend(answer.additionals.iter().cloned());
    msg.to_vec()
}

impl FastTable {
    /// Precomputes every answer of a zone view. O(names × types); run off the hot path.
    pub fn build(zone: &ZoneView) -> Result<Self, TableError> {
        let origin = &zone.settings.origin;
        let apex_entry = apex_entry(zone)?;
        let apex = wire_name(origin).into_boxed_slice();
        let mut entries = Vec::new();
        for name in table_names(zone) {
            if name == *origin {
                continue;
            }
            if let Some(entry) = table_entry(zone, &name, &apex)? {
                entries.push(entry);
            }
        }
        let nx = crate::answer::soa_record(&zone.settings, 0, zone.settings.negative_ttl);
        let mut nx_soa = Vec::new();
        {
            let mut enc = BinEncoder::new(&mut nx_soa);
            enc.set_name_encoding(NameEncoding::Uncompressed);
            nx.emit(&mut enc).map_err(|source| TableError::Encode {
                name: origin.to_string(),
                qtype: RecordType::SOA,
                source,
            })?;
        }
        Ok(Self {
            names: Names::new(entries),
            apex_entry,
            apex,
            nx_soa: nx_soa.into_boxed_slice(),
            snapshot: zone.snapshot.clone(),
        })
    }

    /// The table for `new`, derived from this table (built for `old`) by recomputing only
    /// the names whose answers may differ, found with the persistent maps' cheap `diff`:
    ///
    /// - see [`changed_names`];
    /// - the apex, whose SOA serial is the revision.
    ///
    /// Nothing else in a view shows in an answer (endpoint counts, allowed callers), so
    /// catalog churn of that kind copies no name. Falls back to [`build`](Self::build) when
    /// the zone settings or the local cluster differ, or when most names are touched.
    pub fn update(&self, old: &ZoneView, new: &ZoneView) -> Result<Self, TableError> {
        if old.settings != new.settings || old.local != new.local {
            return Self::build(new);
        }
        let Some(candidates) = changed_names(old, new, self.names.len.max(32) / 2) else {
            return Self::build(new);
        };
        let mut names = self.names.clone();
        for name in candidates {
            match table_entry(new, &name, &self.apex)? {
                Some(entry) => names.put(entry),
                None => names.remove(&wire_name(&name)),
            }
        }
        Ok(Self {
            names,
            apex_entry: apex_entry(new)?,
            apex: self.apex.clone(),
            nx_soa: self.nx_soa.clone(),
            snapshot: new.snapshot.clone(),
        })
    }

    /// Whether two tables hold the same answers (for tests of [`update`](Self::update)).
    pub fn same_answers(&self, other: &Self) -> bool {
        self.names.len == other.names.len
            && self.apex_entry.0 == other.apex_entry.0
            && self
                .names
                .iter()
                .all(|e| other.names.get(e.key()).is_some_and(|o| o.0 == e.0))
            && self.apex == other.apex
            && self.nx_soa == other.nx_soa
    }

    /// Number of names with precomputed answers.
    pub fn len(&self) -> usize {
        self.names.len + 1
    }

    /// Whether the table is empty (it never is: the apex always exists).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Answers `query` into `out` if it is an ordinary query. Never panics on any input.
    pub fn answer(&self, query: &[u8], out: &mut Vec<u8>) -> Fast {
        let mut key = [0u8; MAX_NAME_WIRE];
        let Some(q) = parse_query(query, &mut key) else {
            return if query.len() < HEADER_LEN || query[2] & 0x80 != 0 {
                Fast::Drop
            } else if !readable(query) {
                // What the catalog path answers too, without copying and parsing it there:
                // a flood of junk costs a header's worth of work per datagram.
                formerr(query, out);
                Fast::Answered {
                    qtype: 0,
                    rcode: ResponseCode::FormErr,
                }
            } else {
                Fast::Slow
            };
        };
        let question = &query[HEADER_LEN..q.question_end];
        let limit = match q.edns_payload {
            Some(p) => usize::from(p).max(MAX_PLAIN_UDP),
            None => MAX_PLAIN_UDP,
        };
        out.clear();
        let key = &key[..q.key_len];
        let found = if key == &*self.apex {
            Some(&self.apex_entry)
        } else {
            self.names.get(key)
        };
        let rcode = match found {
            Some(entry) => {
                let template = match entry.template(q.qtype) {
                    Ok((true, t)) => t,
                    Ok((false, t)) if is_ordinary_type(q.qtype) => t,
                    _ => return Fast::Slow,
                };
                // The template's question has the same length (same name, lowercased).
                if template.len() < question.len() + HEADER_LEN {
                    return Fast::Slow;
                }
                out.extend_from_slice(template);
                out[HEADER_LEN..HEADER_LEN + question.len()].copy_from_slice(question);
                ResponseCode::from_low(template[3] & 0x0f)
            }
            None => {
                if !is_ordinary_type(q.qtype) && q.qtype != u16::from(RecordType::ANY)
                    || !in_zone(key, &self.apex)
                {
                    return Fast::Slow;
                }
                let rcode = if pinned_host_exists(&self.snapshot, key, &self.apex) {
                    if !is_ordinary_type(q.qtype) {
                        return Fast::Slow;
                    }
                    ResponseCode::NoError
                } else {
                    ResponseCode::NXDomain
                };
                // NXDOMAIN or NODATA: AA, the rcode, one SOA in authority (the same record
                // for both, as the catalog path answers).
                out.extend_from_slice(&[0, 0, 0x84, rcode.low(), 0, 1, 0, 0, 0, 1, 0, 0]);
                out.extend_from_slice(question);
                out.extend_from_slice(&self.nx_soa);
                rcode
            }
        };
        out[0] = query[0];
        out[1] = query[1];
        // QR, opcode 0, AA and TC from the template, RA, Z, AD and RCODE too (all but RCODE
        // zero); RD and CD echoed from the query (module docs, "Header flags").
        out[2] = (out[2] & !FLAG_RD) | (query[2] & FLAG_RD);
        out[3] = (out[3] & !FLAG_CD) | (query[3] & FLAG_CD);
        if let Some(payload) = q.edns_payload {
            let arcount = u16::from_be_bytes([out[10], out[11]]).saturating_add(1);
            out[10..12].copy_from_slice(&arcount.to_be_bytes());
            let [hi, lo] = payload.max(MAX_PLAIN_UDP as u16).to_be_bytes();
            // Root name, type OPT, class = payload size, ext-rcode 0, version 0, no flags,
            // no options: what hickory's catalog sends for an EDNS query.
            out.extend_from_slice(&[0, 0, 41, hi, lo, 0, 0, 0, 0, 0, 0]);
        }
        if out.len() > limit {
            // Truncation is rare and subtle: hickory's encoder does it.
            out.clear();
            return Fast::Slow;
        }
        Fast::Answered {
            qtype: q.qtype,
            rcode,
        }
    }
}

/// FORMERR for a message with a header whose body cannot be read, into `out`: ID, opcode
/// and RD echoed, QR set, no sections (RFC 1035 §4.1.1: the name server was unable to
/// interpret the query). `message` must be at least a header long.
pub(crate) fn formerr(message: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.resize(HEADER_LEN, 0);
    if let Some(header) = message.get(..3) {
        out[0] = header[0];
        out[1] = header[1];
        out[2] = 0x80 | (header[2] & 0x79);
    }
    out[3] = ResponseCode::FormErr.low();
}

/// Whether a message (at least a header) can be read as DNS at all: every question and
/// record its header counts is there, each name made of labels of at most 63 bytes and
/// ending in the root label or a compression pointer to an earlier offset than the name
/// (RFC 1035 §3.1, §4.1.4), and no record's data runs past the end.
///
/// It checks a subset of what the catalog path's reader (hickory's) checks, in the same
/// order: a message that fails here fails there, and the catalog path answers it with the
/// same [`formerr`]. A message that passes may still fail there (record data, names longer
/// than 255 bytes or whose pointers lead astray): it goes to the catalog path. The walk is
/// bounded by the length: every question or record read moves forward by at least 5 bytes.
fn readable(p: &[u8]) -> bool {
    let Some(header) = p.get(..HEADER_LEN) else {
        return false;
    };
    let count = |i: usize| usize::from(u16::from_be_bytes([header[i], header[i + 1]]));
    let mut pos = HEADER_LEN;
    for _ in 0..count(4) {
        // Name, type, class.
        match skip_name(p, pos) {
            Some(end) if end + 4 <= p.len() => pos = end + 4,
            _ => return false,
        }
    }
    for _ in 0..count(6) + count(8) + count(10) {
        // Name, type, class, TTL, RDLENGTH, then RDLENGTH bytes of data.
        let Some(end) = skip_name(p, pos) else {
            return false;
        };
        let Some(fixed) = p.get(end..end + 10) else {
            return false;
        };
        let rdlen = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        pos = end + 10 + rdlen;
        if pos > p.len() {
            return false;
        }
    }
    true
}

/// The end of the name starting at `start`, or `None` when it cannot be read: it runs past
/// the end, uses a reserved label type (0x40, 0x80), or has a pointer that does not point
/// before `start` (which also rules out loops). Pointers are not followed.
fn skip_name(p: &[u8], start: usize) -> Option<usize> {
    let mut pos = start;
    loop {
        let len = *p.get(pos)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Some(pos + 1),
            0x00 => pos += 1 + usize::from(len),
            0xc0 => {
                let low = *p.get(pos + 1)?;
                let target = usize::from(u16::from_be_bytes([len & 0x3f, low]));
                return (target < start).then_some(pos + 2);
            }
            _ => return None,
        }
    }
}

/// A parsed ordinary query.
struct ParsedQuery {
    /// Length of the lowercased name written into the caller's key buffer.
    key_len: usize,
    question_end: usize,
    qtype: u16,
    edns_payload: Option<u16>,
}

/// Parses a query the fast path can answer, writing its lowercased name into `key`;
/// `None` for anything else.
fn parse_query(p: &[u8], key: &mut [u8; MAX_NAME_WIRE]) -> Option<ParsedQuery> {
    let header = p.get(..HEADER_LEN)?;
    // QR=0 and opcode 0 (QUERY) in byte 2. AA and TC mean nothing in a query and RD is
    // echoed; nor does any bit of byte 3 stop the fast path (RA, Z, AD, CD, RCODE): `dig`
    // sets AD in every query (RFC 6840 §5.7). What the answer echoes: module docs, "Header
    // flags".
    if header[2] & 0xf8 != 0 {
        return None;
    }
    let count = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    let (qd, an, ns, ar) = (count(4), count(6), count(8), count(10));
    if qd != 1 || an != 0 || ns != 0 || ar > 1 {
        return None;
    }
    let mut pos = HEADER_LEN;
    let mut key_len = 0;
    loop {
        let len = usize::from(*p.get(pos)?);
        if len == 0 {
            key[key_len] = 0;
            key_len += 1;
            pos += 1;
            break;
        }
        // Pointers (0xC0) and the extended label types are not for the fast path.
        if len > 63 || key_len + 1 + len + 1 > key.len() {
            return None;
        }
        let label = p.get(pos + 1..pos + 1 + len)?;
        key[key_len] = len as u8;
        for (dst, src) in key[key_len + 1..key_len + 1 + len].iter_mut().zip(label) {
            *dst = src.to_ascii_lowercase();
        }
        key_len += 1 + len;
        pos += 1 + len;
    }
    let fixed = p.get(pos..pos + 4)?;
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
    if qclass != CLASS_IN {
        return None;
    }
    let question_end = pos + 4;
    let rest = &p[question_end..];
    let edns_payload = if ar == 1 {
        // Exactly one OPT: root name, type 41, class = payload, ttl = ext-rcode|version|flags,
        // rdlen covering the rest of the packet exactly.
        let opt = rest.get(..OPT_RR_LEN)?;
        let rdlen = usize::from(u16::from_be_bytes([opt[9], opt[10]]));
        if opt[0] != 0
            || u16::from_be_bytes([opt[1], opt[2]]) != TYPE_OPT
            || opt[5] != 0
            || opt[6] != 0
            || rest.len() != OPT_RR_LEN + rdlen
            || !options_well_formed(&rest[OPT_RR_LEN..])
        {
            return None;
        }
        Some(u16::from_be_bytes([opt[3], opt[4]]))
    } else {
        if !rest.is_empty() {
            return None;
        }
        None
    };
    Some(ParsedQuery {
        key_len,
        question_end,
        qtype,
        edns_payload,
    })
}

/// EDNS options are (code, len, data) triples filling the RDATA exactly. Options are
/// ignored (as hickory does without NSID configured), but a malformed list goes to the slow
/// path, which answers FORMERR.
fn options_well_formed(mut data: &[u8]) -> bool {
    while !data.is_empty() {
        let Some(head) = data.get(..4) else {
            return false;
        };
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let code = u16::from_be_bytes([head[0], head[1]]);
        // NSID (3) is answered by hickory when configured; keep it on the slow path.
        if code == 3 {
            return false;
        }
        match data.get(4 + len..) {
            Some(rest) => data = rest,
            None => return false,
        }
    }
    true
}

/// Data types (not meta types like OPT, TSIG, AXFR, IXFR): a name without them is NODATA.
fn is_ordinary_type(qtype: u16) -> bool {
    (1..128).contains(&qtype) && qtype != TYPE_OPT || (256..0xff00).contains(&qtype)
}

/// Whether `name` (lowercase wire form) is `apex` or below it, on a label boundary.
fn in_zone(name: &[u8], apex: &[u8]) -> bool {
    let mut pos = 0;
    while pos < name.len() {
        if &name[pos..] == apex {
            return true;
        }
        pos += 1 + usize::from(name[pos]);
    }
    false
}

/// Uncompressed lowercase wire form of a name.
pub fn wire_name(name: &Name) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    for label in name.to_lowercase().iter() {
        out.push(label.len() as u8);
        out.extend_from_slice(label);
    }
    out.push(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_membership_is_label_aligned() {
        let apex = wire_name(&Name::from_ascii("clusterset.local.").expect("name"));
        let yes = wire_name(&Name::from_ascii("a.b.clusterset.local.").expect("name"));
        let no = wire_name(&Name::from_ascii("xclusterset.local.").expect("name"));
        assert!(in_zone(&yes, &apex));
        assert!(in_zone(&apex, &apex));
        assert!(!in_zone(&no, &apex));
    }

    /// The table holds every existing name but the cluster-pinned names without a VIP;
    /// those are answered NODATA on the fast path all the same, while a pinned name of a
    /// cluster that does not export the service stays NXDOMAIN.
    #[test]
    fn pinned_names_without_a_vip_are_answered_without_an_entry() {
        use hickory_proto::op::{Message, MessageType, OpCode, Query};

        use crate::answer::{ZoneSettings, existing_names};
        use crate::config::DnsConfig;
        use crate::fixture::three_clusters;

        let settings =
            Arc::new(ZoneSettings::from_config(&DnsConfig::default()).expect("settings"));
        let local = ClusterName::new("east").expect("name");
        let snapshot = Arc::new(three_clusters());
        let view = ZoneView::new(settings, local.clone(), snapshot.clone());
        let table = FastTable::build(&view).expect("table");
        let without_vip: Vec<Name> = snapshot
            .services()
            .flat_map(|v| v.clusters.keys().map(move |c| (v, c)))
            .filter(|(v, c)| snapshot.vip(&local, &v.key, Some(c)).is_none())
            .filter_map(|(v, c)| crate::answer::service_name(&view.settings, &v.key, Some(c)))
            .collect();
        assert!(
            !without_vip.is_empty(),
            "the fixture has pinned names without a VIP"
        );
        assert_eq!(
            table.len(),
            existing_names(&view).len() - without_vip.len(),
            "every existing name but those has an entry"
        );
        let ask = |name: &str| {
            let mut msg = Message::new(7, MessageType::Query, OpCode::Query);
            msg.add_query(Query::query(
                Name::from_ascii(name).expect("name"),
                RecordType::A,
            ));
            let mut out = Vec::new();
            let fast = table.answer(&msg.to_vec().expect("query"), &mut out);
            let answer = Message::from_vec(&out).expect("answer");
            (fast, answer.answers.len(), answer.authorities.len())
        };
        for name in &without_vip {
            let (fast, answers, authority) = ask(&name.to_ascii());
            assert!(
                matches!(
                    fast,
                    Fast::Answered {
                        rcode: ResponseCode::NoError,
                        ..
                    }
                ),
                "{name}: {fast:?}"
            );
            assert_eq!((answers, authority), (0, 1), "{name}: NODATA with the SOA");
        }
        let (fast, _, authority) = ask("pay.prod.svc.nowhere.clusterset.local.");
        assert!(
            matches!(
                fast,
                Fast::Answered {
                    rcode: ResponseCode::NXDomain,
                    ..
                }
            ),
            "{fast:?}"
        );
        assert_eq!(authority, 1);
    }

    /// A sequence of catalog changes: after each, the incremental table equals a table
    /// built from scratch.
    #[test]
    fn incremental_updates_equal_full_builds() {
        use std::net::IpAddr;

        use meshup_core::catalog::{Change, ExportKey, VipKey};
        use meshup_core::model::Protocol;
        use meshup_core::names::{ClusterName, GatewayId};

        use crate::answer::ZoneSettings;
        use crate::config::DnsConfig;
        use crate::fixture::{export, synthetic, vip};

        let settings =
            Arc::new(ZoneSettings::from_config(&DnsConfig::default()).expect("settings"));
        let local = ClusterName::new("east").expect("name");
        let view_of = |snap: &meshup_core::catalog::Snapshot| {
            ZoneView::new(settings.clone(), local.clone(), Arc::new(snap.clone()))
        };
        let mut snap = synthetic("east", &["east", "west", "south"], 60).expect("catalog");
        let mut view = view_of(&snap);
        let mut table = FastTable::build(&view).expect("table");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let key = |c: &str, s: &str| ExportKey {
            cluster: ClusterName::new(c).expect("name"),
            gateway: GatewayId::new("gw-0").expect("id"),
            service: s.parse().expect("key"),
        };
        let endpoints = |c: &str, s: &str, healthy: u32| {
            let Ok(Change::PutExport(k, record)) = export(
                c,
                s,
                &[("http", 8080, Protocol::Tcp), ("dns", 53, Protocol::Udp)],
            ) else {
                panic!("the fixture makes an export");
            };
            let mut record = (*record).clone();
            record.endpoints_healthy = healthy;
            Change::PutExport(k, Arc::new(record))
        };
        let steps: Vec<Vec<Change>> = vec![
            // A new service in a new namespace, exported by a new cluster.
            vec![
                export("north", "fresh.newns", &[("web", 80, Protocol::Tcp)]).expect("c"),
                vip("east", "fresh.newns", None, ip("10.70.0.1")).expect("c"),
            ],
            // Its VIP changes to IPv6; a pinned VIP appears.
            vec![
                vip("east", "fresh.newns", None, ip("fd00::70")).expect("c"),
                vip("east", "fresh.newns", Some("north"), ip("10.70.0.2")).expect("c"),
            ],
            // Ports change on an existing service.
            vec![export("west", "svc-3.ns-3", &[("grpc", 9000, Protocol::Tcp)]).expect("c")],
            // A VIP of another cluster changes: no visible effect, still consistent.
            vec![vip("west", "svc-4.ns-4", None, ip("10.99.0.4")).expect("c")],
            // The only service of namespace newns and of cluster north goes away.
            vec![
                Change::DeleteExport(key("north", "fresh.newns")),
                Change::DeleteVip(VipKey {
                    cluster: local.clone(),
                    service: "fresh.newns".parse().expect("key"),
                    target: None,
                }),
            ],
            // A service loses one exporting cluster.
            vec![Change::DeleteExport(key("south", "svc-5.ns-5"))],
            // Only endpoint counts change: no answer shows them.
            vec![endpoints("west", "svc-6.ns-6", 0)],
            // A new cluster joins an existing service (its pinned empty non-terminals
            // appear), then gets a pinned VIP, which then goes away.
            vec![export("far", "svc-7.ns-7", &[("http", 8080, Protocol::Tcp)]).expect("c")],
            vec![vip("east", "svc-7.ns-7", Some("far"), ip("10.70.0.9")).expect("c")],
            vec![Change::DeleteVip(VipKey {
                cluster: local.clone(),
                service: "svc-7.ns-7".parse().expect("key"),
                target: Some(ClusterName::new("far").expect("name")),
            })],
            // The clusterset VIP of a service goes away: its SRV answers lose their glue.
            vec![Change::DeleteVip(VipKey {
                cluster: local.clone(),
                service: "svc-8.ns-8".parse().expect("key"),
                target: None,
            })],
            // The new cluster leaves again.
            vec![Change::DeleteExport(key("far", "svc-7.ns-7"))],
            // Nothing but the revision.
            vec![],
        ];
        // The steps whose answers, the apex's aside, are those of the step before.
        let unchanged = [3, 6, 12];
        for (i, changes) in steps.into_iter().enumerate() {
            for c in changes {
                snap.apply(c);
            }
            snap.revision += 1;
            let next = view_of(&snap);
            let updated = table.update(&view, &next).expect("update");
            let rebuilt = FastTable::build(&next).expect("build");
            assert!(
                updated.same_answers(&rebuilt),
                "step {i}: incremental table differs"
            );
            assert_eq!(
                updated.names.shared_shards(&table.names) == table.names.shards.len(),
                unchanged.contains(&i),
                "step {i}: whether no name was copied"
            );
            assert!(
                !Arc::ptr_eq(&updated.apex_entry.0, &table.apex_entry.0),
                "step {i}: the apex carries the new serial"
            );
            table = updated;
            view = next;
        }
    }

    /// A change to one service copies the few shards its names fall in, and the table
    /// still answers like one built from scratch.
    #[test]
    fn an_update_copies_only_the_shards_it_touches() {
        use meshup_core::model::Protocol;
        use meshup_core::names::ClusterName;

        use crate::answer::ZoneSettings;
        use crate::config::DnsConfig;
        use crate::fixture::{export, synthetic};

        let settings =
            Arc::new(ZoneSettings::from_config(&DnsConfig::default()).expect("settings"));
        let local = ClusterName::new("east").expect("name");
        let mut snap = synthetic("east", &["east", "west"], 800).expect("catalog");
        let view = ZoneView::new(settings.clone(), local.clone(), Arc::new(snap.clone()));
        let table = FastTable::build(&view).expect("table");
        let shards = table.names.shards.len();
        assert!(shards >= 32, "{} names in {shards} shards", table.len());
        snap.apply(export("west", "svc-3.ns-3", &[("grpc", 9000, Protocol::Tcp)]).expect("c"));
        snap.revision += 1;
        let next = ZoneView::new(settings, local, Arc::new(snap));
        let updated = table.update(&view, &next).expect("update");
        assert!(updated.same_answers(&FastTable::build(&next).expect("build")));
        let copied = shards - updated.names.shared_shards(&table.names);
        // The service's names that do not name a cluster: 3 for its old ports, 3 for its
        // new ones, itself and the two empty non-terminals above it.
        assert!(
            (1..=9).contains(&copied),
            "{copied} of {shards} shards copied"
        );
    }

    /// A new service exported by many clusters, none with a pinned VIP here, in a namespace
    /// they all export already: the table re-evaluates its base names only, not four names
    /// per cluster; a pinned VIP brings its name back in, and the first service of a new
    /// namespace brings that namespace's pinned empty non-terminals.
    #[test]
    fn a_new_service_reevaluates_only_names_that_can_change() {
        use meshup_core::model::Protocol;
        use meshup_core::names::ClusterName;

        use crate::answer::ZoneSettings;
        use crate::config::DnsConfig;
        use crate::fixture::{export, synthetic, vip};

        let settings =
            Arc::new(ZoneSettings::from_config(&DnsConfig::default()).expect("settings"));
        let local = ClusterName::new("east").expect("name");
        let clusters: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
        let clusters: Vec<&str> = clusters.iter().map(String::as_str).collect();
        let mut snap = synthetic("east", &clusters, 20).expect("catalog");
        // synthetic gives every service a pinned VIP per cluster: drop those of svc-0.
        let pinned: Vec<_> = snap
            .vips()
            .filter(|(k, _)| k.target.is_some() && k.service.name.as_str() == "svc-0")
            .map(|(k, _)| k.clone())
            .collect();
        for key in pinned {
            snap.apply(meshup_core::catalog::Change::DeleteVip(key));
        }
        let view_of = |snap: &Snapshot| {
            ZoneView::new(settings.clone(), local.clone(), Arc::new(snap.clone()))
        };
        let base = view_of(&snap);
        let table = FastTable::build(&base).expect("table");
        let ports = [("http", 8080, Protocol::Tcp), ("dns", 53, Protocol::Udp)];
        let cases: [(&str, Option<&str>, usize); 3] = [
            // Its name, two empty non-terminals above it (shared), one protocol name and
            // one port name per port; `svc` and `ns-0.svc` exist already but are re-read.
            ("fresh.ns-0", None, 3 + 2 * 2),
            // The same, plus its pinned name to c7, which has a VIP here.
            ("fresh.ns-0", Some("c7"), 3 + 2 * 2 + 1),
            // The first service of namespace newns: each cluster's `newns.svc.<c>` and the
            // unchanged `svc.<c>` and `<c>` are re-read.
            ("fresh.newns", None, 3 + 2 * 2 + 3 * clusters.len()),
        ];
        for (service, pinned_vip, expected) in cases {
            let mut next = snap.clone();
            for c in &clusters {
                next.apply(export(c, service, &ports).expect("change"));
            }
            if let Some(target) = pinned_vip {
                next.apply(
                    vip(
                        "east",
                        service,
                        Some(target),
                        "10.99.0.1".parse().expect("ip"),
                    )
                    .expect("change"),
                );
            }
            next.revision += 1;
            let next = view_of(&next);
            let names = changed_names(&base, &next, usize::MAX).expect("under the limit");
            assert_eq!(names.len(), expected, "{service} {pinned_vip:?}: {names:?}");
            let updated = table.update(&base, &next).expect("update");
            assert!(
                updated.same_answers(&FastTable::build(&next).expect("build")),
                "{service} {pinned_vip:?}: the update answers as a full build"
            );
        }
    }

    /// Messages the fast path cannot answer from its table: dropped, FORMERR from the
    /// header, or left to the catalog path.
    #[test]
    fn unreadable_messages_get_formerr_from_the_header() {
        let header = |flags: u8, counts: [u16; 4]| {
            let mut h = vec![0xab, 0xcd, flags, 0];
            for c in counts {
                h.extend_from_slice(&c.to_be_bytes());
            }
            h
        };
        let with = |mut h: Vec<u8>, body: &[u8]| {
            h.extend_from_slice(body);
            h
        };
        let q = header(0x01, [1, 0, 0, 0]);
        let question = b"\x04echo\x04test\x00\x00\x01\x00\x01";
        #[derive(Debug, Clone, PartialEq)]
        enum Want {
            Slow,
            Drop,
            Reply(Vec<u8>),
        }
        use Want::{Drop, Reply, Slow};
        let formerr = Reply(vec![0xab, 0xcd, 0x81, 0x01, 0, 0, 0, 0, 0, 0, 0, 0]);
        let cases: Vec<(&str, Vec<u8>, Want)> = vec![
            ("11 bytes", q[..11].to_vec(), Drop),
            (
                "a response",
                with(header(0x84, [1, 0, 0, 0]), question),
                Drop,
            ),
            ("no question body", q.clone(), formerr.clone()),
            (
                "a label past the end",
                with(q.clone(), b"\x3fab"),
                formerr.clone(),
            ),
            (
                "label type 0x40",
                with(q.clone(), b"\x50x\x00\x00\x01\x00\x01"),
                formerr.clone(),
            ),
            (
                "label type 0x80",
                with(q.clone(), b"\x80x\x00\x00\x01\x00\x01"),
                formerr.clone(),
            ),
            (
                "a pointer to itself",
                with(q.clone(), b"\xc0\x0c\x00\x01\x00\x01"),
                formerr.clone(),
            ),
            (
                "pointers to each other",
                with(q.clone(), b"\xc0\x0e\xc0\x0c\x00\x01\x00\x01"),
                formerr.clone(),
            ),
            (
                "a pointer cut short",
                with(q.clone(), b"\xc0"),
                formerr.clone(),
            ),
            (
                "no type and class",
                with(q.clone(), b"\x04echo\x00\x00\x01"),
                formerr.clone(),
            ),
            (
                "huge counts",
                with(header(0x01, [0xffff; 4]), question),
                formerr.clone(),
            ),
            (
                "an answer it lacks",
                with(header(0x01, [1, 1, 0, 0]), question),
                formerr.clone(),
            ),
            (
                "record data past the end",
                with(
                    header(0x01, [1, 0, 0, 1]),
                    &[
                        &question[..],
                        b"\x00\x00\x29\x10\x00\x00\x00\x00\x00\x00\x05\x00",
                    ]
                    .concat(),
                ),
                formerr.clone(),
            ),
            // Opcode and RD are echoed (opcode 2, STATUS, and RD).
            (
                "opcode echoed",
                header(0x11, [1, 0, 0, 0]),
                Reply(vec![0xab, 0xcd, 0x91, 0x01, 0, 0, 0, 0, 0, 0, 0, 0]),
            ),
            // Readable but not for the table: the catalog path decides.
            (
                "a compressed question",
                with(
                    header(0x01, [2, 0, 0, 0]),
                    &[&question[..], b"\xc0\x0c\x00\x01\x00\x01"].concat(),
                ),
                Slow,
            ),
            ("no question at all", header(0x01, [0, 0, 0, 0]), Slow),
            (
                "another opcode",
                with(header(0x29, [1, 0, 0, 0]), question),
                Slow,
            ),
            (
                "trailing bytes",
                with(q.clone(), &[&question[..], b"junk"].concat()),
                Slow,
            ),
        ];
        let table = {
            use crate::answer::ZoneSettings;
            use crate::config::DnsConfig;
            let settings =
                Arc::new(ZoneSettings::from_config(&DnsConfig::default()).expect("settings"));
            let snap = crate::fixture::three_clusters();
            let view = ZoneView::new(
                settings,
                meshup_core::names::ClusterName::new("east").expect("name"),
                Arc::new(snap),
            );
            FastTable::build(&view).expect("table")
        };
        for (what, message, want) in cases {
            let mut out = Vec::new();
            let got = match table.answer(&message, &mut out) {
                Fast::Slow => Slow,
                Fast::Drop => Drop,
                Fast::Answered { rcode, .. } => {
                    assert_eq!(rcode, ResponseCode::FormErr, "{what}");
                    Reply(out)
                }
            };
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn ordinary_types_exclude_meta_types() {
        assert!(is_ordinary_type(1));
        assert!(is_ordinary_type(257));
        for meta in [0, 41, 250, 251, 252, 255] {
            assert!(!is_ordinary_type(meta), "{meta}");
        }
    }
}
