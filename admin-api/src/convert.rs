//! Conversions between the catalog's records and the API's messages, and the field a record
//! error is about (so INVALID_ARGUMENT and the CLI can name it).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use meshup_core::model::{AppProtocol, EndpointProtocol, PortSpec, Protocol};
use meshup_core::names::{ClusterName, DrillId, Namespace, ServiceKey, ServiceName};
use meshup_core::policy::{DrillAudit, DrillKind, DrillRecord, RecordError};

use crate::pb;

/// The record's kind of a message's kind; `None` for UNSPECIFIED or an unknown number.
pub fn drill_kind_from_pb(kind: i32) -> Option<DrillKind> {
    match pb::DrillKind::try_from(kind).ok()? {
        pb::DrillKind::Drain => Some(DrillKind::Drain),
        pb::DrillKind::Fail => Some(DrillKind::Fail),
        pb::DrillKind::Pin => Some(DrillKind::Pin),
        pb::DrillKind::Unspecified => None,
    }
}

pub fn drill_kind_to_pb(kind: DrillKind) -> pb::DrillKind {
    match kind {
        DrillKind::Drain => pb::DrillKind::Drain,
        DrillKind::Fail => pb::DrillKind::Fail,
        DrillKind::Pin => pb::DrillKind::Pin,
    }
}

/// `drain`, `fail` or `pin` of a message's kind (`?` when unknown).
pub fn drill_kind_word(kind: i32) -> &'static str {
    drill_kind_from_pb(kind).map_or("?", DrillKind::as_str)
}

/// A stored drill as a message; `revision` is the revision it was created at.
pub fn drill_to_pb(id: &DrillId, d: &DrillRecord, revision: i64, unix_now: i64) -> pb::Drill {
    pb::Drill {
        id: id.to_string(),
        kind: drill_kind_to_pb(d.kind) as i32,
        cluster: d.cluster.to_string(),
        service: d
            .service
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        who: d.who.clone(),
        why: d.why.clone(),
        created: d.created,
        expires: d.expires,
        revision,
        active: d.active(unix_now),
    }
}

/// An audit entry as a message.
pub fn audit_to_pb(id: &DrillId, a: &DrillAudit, unix_now: i64) -> pb::DrillAudit {
    pb::DrillAudit {
        drill: Some(drill_to_pb(
            id,
            &a.drill,
            a.created_revision.unwrap_or_default(),
            unix_now,
        )),
        ended: a.ended,
        how: a.how.as_str().to_owned(),
        ended_by: a.ended_by.clone(),
    }
}

/// The field of a policy record an error is about, as a path (`retry.max_attempts`,
/// `levels[1]`), when it is about one.
pub fn record_error_field(err: &RecordError) -> Option<String> {
    Some(match err {
        RecordError::TooLarge { .. } | RecordError::Decode(_) => return None,
        RecordError::UnsupportedSchema { .. } => "schema".into(),
        RecordError::EmptyLevel { level } | RecordError::ZeroWeights { level } => {
            format!("levels[{level}]")
        }
        RecordError::DuplicateCluster { second, .. } => format!("levels[{second}].clusters"),
        RecordError::OutOfRange { what, .. } => match *what {
            "clusters in a level" => "levels[].clusters".into(),
            "weight" => "levels[].clusters[].weight".into(),
            w => w
                .trim_end_matches(" (ms)")
                .trim_end_matches(" (s)")
                .to_owned(),
        },
        RecordError::LocalOnlyWithLevels => "local_only".into(),
        RecordError::EjectionOrder { .. } => "outlier.max_ejection".into(),
        RecordError::MissingAudit(f) | RecordError::TextTooLong(f) => (*f).into(),
        RecordError::ExpiresBeforeCreated { .. } | RecordError::TooLong => "expires".into(),
        RecordError::PinWithoutService => "service".into(),
        RecordError::MissingEndedBy => "ended_by".into(),
        RecordError::ExpiredEarly { .. } => "ended".into(),
    })
}

/// An export as `RegisterExport` carries it, parsed into the catalog's types (the gateway
/// validates it further, with the rules of the config file's exports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub name: ServiceName,
    pub namespace: Namespace,
    pub ports: Vec<PortSpec>,
    pub endpoints: Vec<SocketAddr>,
    pub allowed_callers: Vec<ClusterName>,
    pub labels: BTreeMap<String, String>,
}

impl Export {
    pub fn key(&self) -> ServiceKey {
        ServiceKey::new(self.namespace.clone(), self.name.clone())
    }
}

/// A message field that does not parse: INVALID_ARGUMENT names `field`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

fn field_error(field: impl Into<String>, message: impl std::fmt::Display) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.to_string(),
    }
}

/// `tcp`, `udp`, `sctp`; empty is tcp.
pub fn protocol_from_str(text: &str) -> Option<Protocol> {
    match text.trim().to_ascii_lowercase().as_str() {
        "" | "tcp" => Some(Protocol::Tcp),
        "udp" => Some(Protocol::Udp),
        "sctp" => Some(Protocol::Sctp),
        _ => None,
    }
}

/// Parses a port's application protocol; empty means tcp.
pub fn app_protocol_from_str(text: &str) -> Option<AppProtocol> {
    match text.trim().to_ascii_lowercase().as_str() {
        "" | "tcp" => Some(AppProtocol::Tcp),
        "http" => Some(AppProtocol::Http),
        "grpc" => Some(AppProtocol::Grpc),
        _ => None,
    }
}

/// Parses what a port's endpoints speak; empty means `as_client`.
pub fn endpoint_protocol_from_str(text: &str) -> Option<EndpointProtocol> {
    match text.trim().to_ascii_lowercase().as_str() {
        "" | "as_client" => Some(EndpointProtocol::AsClient),
        "http1" => Some(EndpointProtocol::Http1),
        _ => None,
    }
}

/// Parses an export message; the error names the field (`export.endpoints[1]`).
pub fn export_from_pb(spec: &pb::ExportSpec) -> Result<Export, FieldError> {
    let name = ServiceName::new(spec.name.trim()).map_err(|e| field_error("export.name", e))?;
    let namespace =
        Namespace::new(spec.namespace.trim()).map_err(|e| field_error("export.namespace", e))?;
    let ports = spec
        .ports
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let port = u16::try_from(p.port).map_err(|_| {
                field_error(
                    format!("export.ports[{i}].port"),
                    format!("{} is not a port number (1-65535)", p.port),
                )
            })?;
            let protocol = protocol_from_str(&p.protocol).ok_or_else(|| {
                field_error(
                    format!("export.ports[{i}].protocol"),
                    format!("{:?} is not tcp, udp or sctp", p.protocol),
                )
            })?;
            let app_protocol = app_protocol_from_str(&p.app_protocol).ok_or_else(|| {
                field_error(
                    format!("export.ports[{i}].app_protocol"),
                    format!("{:?} is not tcp, http or grpc", p.app_protocol),
                )
            })?;
            let endpoint_protocol =
                endpoint_protocol_from_str(&p.endpoint_protocol).ok_or_else(|| {
                    field_error(
                        format!("export.ports[{i}].endpoint_protocol"),
                        format!("{:?} is not as_client or http1", p.endpoint_protocol),
                    )
                })?;
            Ok(PortSpec {
                name: p.name.trim().to_owned(),
                port,
                protocol,
                app_protocol,
                endpoint_protocol,
            })
        })
        .collect::<Result<Vec<_>, FieldError>>()?;
    let endpoints = spec
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            e.trim().parse::<SocketAddr>().map_err(|err| {
                field_error(
                    format!("export.endpoints[{i}]"),
                    format!("{e:?} is not ip:port ({err})"),
                )
            })
        })
        .collect::<Result<Vec<_>, FieldError>>()?;
    let allowed_callers = spec
        .allowed_callers
        .iter()
        .enumerate()
        .map(|(i, c)| {
            ClusterName::new(c.trim())
                .map_err(|e| field_error(format!("export.allowed_callers[{i}]"), e))
        })
        .collect::<Result<Vec<_>, FieldError>>()?;
    Ok(Export {
        name,
        namespace,
        ports,
        endpoints,
        allowed_callers,
        labels: spec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

/// An export as its message.
pub fn export_to_pb(e: &Export) -> pb::ExportSpec {
    pb::ExportSpec {
        name: e.name.to_string(),
        namespace: e.namespace.to_string(),
        ports: e
            .ports
            .iter()
            .map(|p| pb::Port {
                name: p.name.clone(),
                port: u32::from(p.port),
                protocol: p.protocol.as_str().to_owned(),
                app_protocol: p.app_protocol.as_str().to_owned(),
                endpoint_protocol: p.endpoint_protocol.as_str().to_owned(),
            })
            .collect(),
        endpoints: e.endpoints.iter().map(ToString::to_string).collect(),
        allowed_callers: e.allowed_callers.iter().map(ToString::to_string).collect(),
        labels: e
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_errors_name_their_field() {
        for k in [DrillKind::Drain, DrillKind::Fail, DrillKind::Pin] {
            assert_eq!(drill_kind_from_pb(drill_kind_to_pb(k) as i32), Some(k));
        }
        assert_eq!(drill_kind_from_pb(0), None);
        assert_eq!(drill_kind_from_pb(99), None);
        let out = RecordError::OutOfRange {
            what: "outlier.base_ejection (ms)",
            value: 0,
            min: 1,
            max: 2,
        };
        assert_eq!(
            record_error_field(&out).as_deref(),
            Some("outlier.base_ejection")
        );
        assert_eq!(
            record_error_field(&RecordError::EmptyLevel { level: 2 }).as_deref(),
            Some("levels[2]")
        );
    }

    #[test]
    fn exports_round_trip_and_bad_fields_are_named() {
        let spec = pb::ExportSpec {
            name: "pay".into(),
            namespace: "prod".into(),
            ports: vec![pb::Port {
                name: "http".into(),
                port: 8080,
                protocol: String::new(),
                app_protocol: "http".into(),
                endpoint_protocol: "http1".into(),
            }],
            endpoints: vec!["127.0.0.1:9000".into()],
            allowed_callers: vec!["west".into()],
            labels: [("team".to_owned(), "pay".to_owned())].into(),
        };
        let export = export_from_pb(&spec).expect("valid");
        assert_eq!(export.key().to_string(), "pay.prod");
        assert_eq!(export.ports[0].protocol, Protocol::Tcp);
        let back = export_to_pb(&export);
        assert_eq!(back.ports[0].protocol, "tcp");
        assert_eq!(export.ports[0].app_protocol, AppProtocol::Http);
        assert_eq!(export.ports[0].endpoint_protocol, EndpointProtocol::Http1);
        assert_eq!(export_from_pb(&back).expect("again"), export);
        let mut unset = spec.clone();
        unset.ports[0].endpoint_protocol.clear();
        assert_eq!(
            export_from_pb(&unset).expect("valid").ports[0].endpoint_protocol,
            EndpointProtocol::AsClient
        );

        let bad = |f: &dyn Fn(&mut pb::ExportSpec)| {
            let mut s = spec.clone();
            f(&mut s);
            export_from_pb(&s).expect_err("invalid").field
        };
        assert_eq!(bad(&|s| s.name = "Pay_".into()), "export.name");
        assert_eq!(bad(&|s| s.namespace.clear()), "export.namespace");
        assert_eq!(bad(&|s| s.ports[0].port = 70_000), "export.ports[0].port");
        assert_eq!(
            bad(&|s| s.ports[0].protocol = "quic".into()),
            "export.ports[0].protocol"
        );
        assert_eq!(
            bad(&|s| s.ports[0].app_protocol = "http3".into()),
            "export.ports[0].app_protocol"
        );
        assert_eq!(
            bad(&|s| s.ports[0].endpoint_protocol = "h2".into()),
            "export.ports[0].endpoint_protocol"
        );
        assert_eq!(
            bad(&|s| s.endpoints.push("localhost:80".into())),
            "export.endpoints[1]"
        );
        assert_eq!(
            bad(&|s| s.allowed_callers = vec!["".into()]),
            "export.allowed_callers[0]"
        );
    }
}
