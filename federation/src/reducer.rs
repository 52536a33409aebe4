//! The catalog reducer: one store key and its value (or its deletion) in, one snapshot
//! [`Change`] out, or the reason the key is skipped. Pure and total: it never panics, whatever
//! the bytes.
//!
//! A skipped *put* of a key that names a catalog entry also retracts that entry
//! ([`Outcome::Skip::retract`]): if a valid record is overwritten by a corrupt one, the old
//! record must not stay behind as a ghost.

use std::sync::Arc;

use meshup_core::catalog::Change;
use meshup_core::model::{
    self, AddressRules, ExportRecord, GatewayRecord, RecordError, SCHEMA_VERSION, VipRecord,
};

use meshup_core::policy::{self, DrillRecord, PolicyRecord};
use meshup_core::routes;

use crate::keys::{CatalogKey, KeyError, KeyLayout};

/// Why a key was skipped; the metric label of `catalog_skipped_records_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SkipReason {
    UnparseableKey,
    Oversized,
    Undecodable,
    UnsupportedSchema,
    BadPorts,
    UnroutableAddress,
    WrongOwner,
    Invalid,
}

impl SkipReason {
    /// Every reason, for pre-registering metric series.
    pub const ALL: [SkipReason; 8] = [
        SkipReason::UnparseableKey,
        SkipReason::Oversized,
        SkipReason::Undecodable,
        SkipReason::UnsupportedSchema,
        SkipReason::BadPorts,
        SkipReason::UnroutableAddress,
        SkipReason::WrongOwner,
        SkipReason::Invalid,
    ];

    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::UnparseableKey => "unparseable_key",
            SkipReason::Oversized => "oversized",
            SkipReason::Undecodable => "undecodable",
            SkipReason::UnsupportedSchema => "unsupported_schema",
            SkipReason::BadPorts => "bad_ports",
            SkipReason::UnroutableAddress => "unroutable_address",
            SkipReason::WrongOwner => "wrong_owner",
            SkipReason::Invalid => "invalid",
        }
    }

    fn of(error: &RecordError) -> Self {
        match error {
            RecordError::TooLarge { .. } => SkipReason::Oversized,
            RecordError::Decode(_) => SkipReason::Undecodable,
            RecordError::UnsupportedSchema { .. } => SkipReason::UnsupportedSchema,
            RecordError::BadPort { .. }
            | RecordError::BadPortName(_)
            | RecordError::DuplicatePort(_)
            | RecordError::AppProtocolNeedsTcp { .. } => SkipReason::BadPorts,
            RecordError::UnroutableAddress(_) | RecordError::ZeroPort(_) => {
                SkipReason::UnroutableAddress
            }
            RecordError::WrongOwner { .. } | RecordError::BadIdentity(_) => SkipReason::WrongOwner,
            RecordError::TooMany { .. }
            | RecordError::BadEndpointCounts { .. }
            | RecordError::TextTooLong { .. } => SkipReason::Invalid,
        }
    }
}

/// What to do with one key.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Apply this change to the snapshot.
    Apply(Change),
    /// A key the snapshot does not hold (address claims, drill audit entries).
    Ignore,
    /// The key or value is bad: log it, count it, and apply `retract` if present.
    Skip {
        reason: SkipReason,
        /// Operator-readable detail for the log line.
        detail: String,
        /// Removes whatever this key contributed before (a corrupt overwrite leaves no ghost).
        retract: Option<Change>,
    },
}

/// Reduces one key. `value` is `None` for a deletion.
pub fn reduce(
    layout: &KeyLayout,
    rules: &AddressRules,
    key: &[u8],
    value: Option<&[u8]>,
) -> Outcome {
    let parsed = match layout.parse(key) {
        Ok(parsed) => parsed,
        Err(e) => {
            // A deleted unparseable key never contributed anything; nothing to report.
            if value.is_none() {
                return Outcome::Ignore;
            }
            return skip_key(e);
        }
    };
    match (parsed, value) {
        (CatalogKey::Ignored(_), _) | (CatalogKey::AddressClaim { .. }, _) => Outcome::Ignore,
        (CatalogKey::Policy(service), None) => Outcome::Apply(Change::DeletePolicy(service)),
        (CatalogKey::Policy(service), Some(bytes)) => {
            match policy::decode::<PolicyRecord>(bytes).and_then(|r| r.validate().map(|()| r)) {
                Ok(r) => Outcome::Apply(Change::PutPolicy(service, Arc::new(r))),
                Err(e) => skip_operator_record(e),
            }
        }
        (CatalogKey::Routes(service), None) => Outcome::Apply(Change::DeleteRoutes(service)),
        (CatalogKey::Routes(service), Some(bytes)) => {
            match routes::decode(bytes).and_then(|r| r.compile()) {
                Ok(r) => Outcome::Apply(Change::PutRoutes(service, Arc::new(r))),
                Err(e) => {
                    use routes::RouteError as E;
                    let reason = match &e {
                        E::TooLarge { .. } => SkipReason::Oversized,
                        E::Decode(_) => SkipReason::Undecodable,
                        E::UnsupportedSchema { .. } => SkipReason::UnsupportedSchema,
                        E::Invalid { .. } => SkipReason::Invalid,
                    };
                    // Like a policy: the previous good rules stay in force.
                    Outcome::Skip {
                        reason,
                        detail: e.to_string(),
                        retract: None,
                    }
                }
            }
        }
        (CatalogKey::Drill(id), None) => Outcome::Apply(Change::DeleteDrill(id)),
        (CatalogKey::Drill(id), Some(bytes)) => {
            match policy::decode::<DrillRecord>(bytes).and_then(|r| r.validate().map(|()| r)) {
                Ok(r) => Outcome::Apply(Change::PutDrill(id, Arc::new(r))),
                Err(e) => skip_operator_record(e),
            }
        }
        (CatalogKey::Gateway { cluster, gateway }, None) => {
            Outcome::Apply(Change::DeleteGateway { cluster, gateway })
        }
        (CatalogKey::Gateway { cluster, gateway }, Some(bytes)) => {
            let record = decode::<GatewayRecord>(bytes)
                .and_then(|r| r.validate(&cluster, &gateway, rules).map(|()| r));
            match record {
                Ok(r) => Outcome::Apply(Change::PutGateway(Arc::new(r))),
                Err(e) => skip(e, Change::DeleteGateway { cluster, gateway }),
            }
        }
        (CatalogKey::Export(key), None) => Outcome::Apply(Change::DeleteExport(key)),
        (CatalogKey::Export(key), Some(bytes)) => {
            match decode::<ExportRecord>(bytes).and_then(|r| r.validate().map(|()| r)) {
                Ok(r) => Outcome::Apply(Change::PutExport(key, Arc::new(r))),
                Err(e) => skip(e, Change::DeleteExport(key)),
            }
        }
        (CatalogKey::Vip(key), None) => Outcome::Apply(Change::DeleteVip(key)),
        (CatalogKey::Vip(key), Some(bytes)) => {
            match decode::<VipRecord>(bytes).and_then(|r| r.validate().map(|()| r)) {
                Ok(r) => Outcome::Apply(Change::PutVip(key, r.vip)),
                Err(e) => skip(e, Change::DeleteVip(key)),
            }
        }
    }
}

/// Decodes a record, telling a newer major schema apart from garbage: a record of another
/// major may change a field's type, and would otherwise look merely undecodable.
fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    #[derive(serde::Deserialize)]
    struct SchemaOnly {
        schema: u32,
    }
    model::decode::<T>(bytes).map_err(|e| match e {
        RecordError::Decode(_) => match serde_json::from_slice::<SchemaOnly>(bytes) {
            Ok(s) if s.schema != SCHEMA_VERSION => {
                RecordError::UnsupportedSchema { found: s.schema }
            }
            _ => e,
        },
        other => other,
    })
}

fn skip(error: RecordError, retract: Change) -> Outcome {
    Outcome::Skip {
        reason: SkipReason::of(&error),
        detail: error.to_string(),
        retract: Some(retract),
    }
}

/// A bad policy or drill is skipped without retracting the one it overwrote: an operator's
/// typo must not turn a working policy into the default, nor end a drill in progress. The
/// previous good record (or the default) stays in force, and the log line says why.
fn skip_operator_record(error: policy::RecordError) -> Outcome {
    use policy::RecordError as E;
    let reason = match &error {
        E::TooLarge { .. } => SkipReason::Oversized,
        E::Decode(_) => SkipReason::Undecodable,
        E::UnsupportedSchema { .. } => SkipReason::UnsupportedSchema,
        _ => SkipReason::Invalid,
    };
    Outcome::Skip {
        reason,
        detail: error.to_string(),
        retract: None,
    }
}

fn skip_key(error: KeyError) -> Outcome {
    Outcome::Skip {
        reason: SkipReason::UnparseableKey,
        detail: error.to_string(),
        retract: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshup_core::catalog::{ExportKey, Snapshot};
    use meshup_core::fixture;
    use meshup_core::model::{MAX_RECORD_BYTES, encode};
    use meshup_core::names::{ClusterName, GatewayId};

    const GW_KEY: &str = "/m/v1/clusters/east/gateways/gw-0";
    const EXPORT_KEY: &str = "/m/v1/clusters/east/gateways/gw-0/exports/prod/pay";
    const VIP_KEY: &str = "/m/v1/vips/east/prod/pay";

    fn layout() -> KeyLayout {
        KeyLayout::new("/m").expect("prefix")
    }

    fn gateway_json(cluster: &str, addr: &str) -> Vec<u8> {
        encode(&GatewayRecord {
            quic_addrs: vec![addr.parse().expect("addr")],
            ..fixture::gateway(cluster, "gw-0")
        })
    }

    fn export_json(port: u16) -> Vec<u8> {
        encode(&ExportRecord {
            endpoints_total: 2,
            ..fixture::export(port, 1)
        })
    }

    fn reason(outcome: &Outcome) -> Option<SkipReason> {
        match outcome {
            Outcome::Skip { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    #[test]
    fn bad_values_are_skipped_with_their_reason() {
        let strict = AddressRules::default();
        let huge = vec![b' '; MAX_RECORD_BYTES + 1];
        let v2 =
            br#"{"schema":2,"ports":[],"endpoints_total":0,"endpoints_healthy":0,"new_field":1}"#;
        let table: Vec<(&str, Vec<u8>, Option<SkipReason>)> = vec![
            (GW_KEY, gateway_json("east", "10.0.0.1:15443"), None),
            (
                GW_KEY,
                gateway_json("east", "127.0.0.1:15443"),
                Some(SkipReason::UnroutableAddress),
            ),
            (
                GW_KEY,
                gateway_json("east", "169.254.0.1:15443"),
                Some(SkipReason::UnroutableAddress),
            ),
            (
                GW_KEY,
                gateway_json("west", "10.0.0.1:15443"),
                Some(SkipReason::WrongOwner),
            ),
            (GW_KEY, b"{not json".to_vec(), Some(SkipReason::Undecodable)),
            (GW_KEY, huge.clone(), Some(SkipReason::Oversized)),
            (EXPORT_KEY, export_json(8080), None),
            (EXPORT_KEY, export_json(0), Some(SkipReason::BadPorts)),
            (EXPORT_KEY, v2.to_vec(), Some(SkipReason::UnsupportedSchema)),
            // A newer minor of our major, with fields this version does not know: applied.
            (
                EXPORT_KEY,
                br#"{"schema":1,"schema_minor":4,"ports":[{"name":"http","port":8080,"app_protocol":"grpc"}],"endpoints_total":1,"endpoints_healthy":1,"failover_hint":"west"}"#.to_vec(),
                None,
            ),
            // A new major whose fields no longer decode as ours: still named as a schema skip.
            (
                EXPORT_KEY,
                br#"{"schema":3,"ports":"http/8080"}"#.to_vec(),
                Some(SkipReason::UnsupportedSchema),
            ),
            (
                EXPORT_KEY,
                br#"{"schema":1}"#.to_vec(),
                Some(SkipReason::Undecodable),
            ),
            (EXPORT_KEY, b"".to_vec(), Some(SkipReason::Undecodable)),
            (
                VIP_KEY,
                br#"{"schema":1,"vip":"127.77.0.1"}"#.to_vec(),
                None,
            ),
            (
                VIP_KEY,
                br#"{"schema":1,"vip":"0.0.0.0"}"#.to_vec(),
                Some(SkipReason::UnroutableAddress),
            ),
            (
                "/m/v1/clusters/EAST/gateways/gw-0",
                export_json(1),
                Some(SkipReason::UnparseableKey),
            ),
            (
                "/m/v1/unknown",
                b"x".to_vec(),
                Some(SkipReason::UnparseableKey),
            ),
        ];
        for (key, value, expected) in table {
            let outcome = reduce(&layout(), &strict, key.as_bytes(), Some(&value));
            assert_eq!(
                reason(&outcome),
                expected,
                "{key} {:?}",
                String::from_utf8_lossy(&value[..value.len().min(60)])
            );
            if expected.is_none() {
                assert!(matches!(outcome, Outcome::Apply(_)), "{key}: {outcome:?}");
            }
        }
        // Loopback is fine where the federation allows it.
        let loopback = reduce(
            &layout(),
            &AddressRules::LOOPBACK,
            GW_KEY.as_bytes(),
            Some(&gateway_json("east", "127.0.0.1:1")),
        );
        assert!(matches!(loopback, Outcome::Apply(Change::PutGateway(_))));
    }

    #[test]
    fn ignored_keys_and_deletes() {
        let rules = AddressRules::default();
        for key in ["/m/v1/vip-claims/east/127.77.0.1", "/m/v1/drill-audit/d1"] {
            assert_eq!(
                reduce(&layout(), &rules, key.as_bytes(), Some(b"garbage")),
                Outcome::Ignore,
                "{key}"
            );
        }
        assert!(matches!(
            reduce(&layout(), &rules, EXPORT_KEY.as_bytes(), None),
            Outcome::Apply(Change::DeleteExport(_))
        ));
        assert_eq!(
            reduce(&layout(), &rules, b"/m/v1/junk", None),
            Outcome::Ignore
        );
    }

    #[test]
    fn a_bad_policy_drill_or_route_leaves_the_previous_good_one_in_force() {
        const POLICY_KEY: &str = "/m/v1/policies/prod/pay";
        const DRILL_KEY: &str = "/m/v1/drills/d1";
        let rules = AddressRules::default();
        let mut snap = Snapshot::new();
        let mut apply = |key: &str, value: Option<&[u8]>| {
            let outcome = reduce(&layout(), &rules, key.as_bytes(), value);
            let reason = match &outcome {
                Outcome::Apply(c) => {
                    snap.apply(c.clone());
                    None
                }
                Outcome::Skip {
                    reason, retract, ..
                } => {
                    assert_eq!(
                        retract, &None,
                        "{key}: an operator record is never retracted"
                    );
                    Some(*reason)
                }
                Outcome::Ignore => panic!("{key} is read"),
            };
            (reason, snap.clone())
        };
        let pay = "pay.prod".parse().expect("key");
        let good = br#"{"schema":1,"levels":[{"clusters":[{"cluster":"west"}]}]}"#;
        let (reason, s) = apply(POLICY_KEY, Some(good));
        assert_eq!(reason, None);
        assert_eq!(s.policy(&pay).map(|p| p.levels.len()), Some(1));
        // (bad value, reason): each skipped, the good policy still in force.
        let bad: [(&[u8], SkipReason); 5] = [
            (b"{", SkipReason::Undecodable),
            (
                br#"{"schema":2,"levels":"x"}"#,
                SkipReason::UnsupportedSchema,
            ),
            (
                br#"{"schema":1,"levels":[{"clusters":[{"cluster":"west","weight":0}]}]}"#,
                SkipReason::Invalid,
            ),
            (
                br#"{"schema":1,"levels":[{"clusters":[{"cluster":"west"},{"cluster":"west"}]}]}"#,
                SkipReason::Invalid,
            ),
            (&[b' '; 70_000], SkipReason::Oversized),
        ];
        for (value, want) in bad {
            let (reason, s) = apply(POLICY_KEY, Some(value));
            assert_eq!(
                reason,
                Some(want),
                "{}",
                String::from_utf8_lossy(&value[..value.len().min(80)])
            );
            assert_eq!(s.policy(&pay).map(|p| p.levels.len()), Some(1));
        }
        let (_, s) = apply(POLICY_KEY, None);
        assert!(s.policy(&pay).is_none(), "deleted: the default applies");

        let drill = br#"{"schema":1,"kind":"drain","cluster":"west","who":"ops","why":"rehearsal","created":100,"expires":200}"#;
        let (reason, s) = apply(DRILL_KEY, Some(drill));
        assert_eq!(reason, None);
        assert_eq!(s.drills().count(), 1);
        let no_expiry =
            br#"{"schema":1,"kind":"drain","cluster":"west","who":"ops","why":"x","created":100}"#;
        let (reason, s) = apply(DRILL_KEY, Some(no_expiry));
        assert_eq!(reason, Some(SkipReason::Undecodable));
        assert_eq!(s.drills().count(), 1, "the drill in progress stays");
        let (_, s) = apply(DRILL_KEY, None);
        assert_eq!(s.drills().count(), 0);

        const ROUTES_KEY: &str = "/m/v1/routes/prod/pay";
        let good = br#"{"schema":1,"rules":[{"name":"api","match":[{"path":{"prefix":"/api"}}]}]}"#;
        let (reason, s) = apply(ROUTES_KEY, Some(good));
        assert_eq!(reason, None);
        assert_eq!(
            s.routes(&pay).map(|r| r.rules[0].name.as_str()),
            Some("api")
        );
        let bad: [(&[u8], SkipReason); 4] = [
            (b"[]", SkipReason::Undecodable),
            (br#"{"schema":3,"rules":{}}"#, SkipReason::UnsupportedSchema),
            (
                br#"{"schema":1,"rules":[{"match":[{"path":{"regex":"("}}]}]}"#,
                SkipReason::Invalid,
            ),
            (&[b' '; 70_000], SkipReason::Oversized),
        ];
        for (value, want) in bad {
            let (reason, s) = apply(ROUTES_KEY, Some(value));
            assert_eq!(reason, Some(want));
            assert_eq!(
                s.routes(&pay).map(|r| r.rules[0].name.as_str()),
                Some("api"),
                "the good rules stay in force"
            );
        }
        let (_, s) = apply(ROUTES_KEY, None);
        assert!(s.routes(&pay).is_none(), "deleted: the policy decides");
    }

    #[test]
    fn a_corrupt_overwrite_leaves_no_ghost() {
        let rules = AddressRules::default();
        let mut snap = Snapshot::new();
        let apply = |snap: &mut Snapshot, outcome: Outcome| match outcome {
            Outcome::Apply(c) => snap.apply(c),
            Outcome::Skip {
                retract: Some(c), ..
            } => snap.apply(c),
            _ => false,
        };
        assert!(apply(
            &mut snap,
            reduce(
                &layout(),
                &rules,
                EXPORT_KEY.as_bytes(),
                Some(&export_json(80))
            )
        ));
        assert_eq!(snap.export_count(), 1);
        assert!(apply(
            &mut snap,
            reduce(&layout(), &rules, EXPORT_KEY.as_bytes(), Some(b"{corrupt"))
        ));
        assert_eq!(snap.export_count(), 0);
        let key = ExportKey {
            cluster: ClusterName::new("east").expect("valid"),
            gateway: GatewayId::new("gw-0").expect("valid"),
            service: "pay.prod".parse().expect("valid"),
        };
        assert!(snap.export(&key).is_none());
    }

    /// Mutated bytes (flips, truncations, insertions) of valid records and keys never panic.
    #[test]
    fn mutated_bytes_never_panic() {
        let rules = AddressRules::default();
        let seeds: Vec<(&str, Vec<u8>)> = vec![
            (GW_KEY, gateway_json("east", "10.0.0.1:15443")),
            (EXPORT_KEY, export_json(8080)),
            (VIP_KEY, br#"{"schema":1,"vip":"127.77.0.1"}"#.to_vec()),
        ];
        // A small xorshift generator: deterministic, no dependency.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut outcomes = 0;
        for (key, value) in &seeds {
            for _ in 0..3000 {
                let mut v = value.clone();
                let mut k = key.as_bytes().to_vec();
                for _ in 0..(next() % 4 + 1) {
                    let target = if next() % 4 == 0 { &mut k } else { &mut v };
                    if target.is_empty() {
                        target.push(next() as u8);
                        continue;
                    }
                    let at = (next() as usize) % target.len();
                    match next() % 4 {
                        0 => target[at] ^= 1 << (next() % 8),
                        1 => target.truncate(at),
                        2 => target.insert(at, next() as u8),
                        _ => target[at] = b"{}[]\",:0-/\xff"[(next() % 11) as usize],
                    }
                }
                let _ = reduce(&layout(), &rules, &k, Some(&v));
                let _ = reduce(&layout(), &rules, &k, None);
                outcomes += 1;
            }
        }
        assert_eq!(outcomes, 9000);
    }
}
