//! Conversions between the catalog's records and the API's messages, and the field a record
//! error is about (so INVALID_ARGUMENT and the CLI can name it).

use meshup_core::names::DrillId;
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
}
