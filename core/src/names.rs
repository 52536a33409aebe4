//! Names that travel between clusters: cluster names, namespaces, service names and port
//! names. Each is validated once, when it is built, so code that holds one never re-checks it.
//!
//! The rules are Kubernetes' (RFC 1123 labels for namespaces and clusters, RFC 1035 labels
//! for services, IANA service names for ports) because every name ends up in a DNS name of
//! the Multi-Cluster Services spec: `<svc>.<ns>.svc.clusterset.local`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest DNS label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest IANA service name, which Kubernetes uses for port names (RFC 6335 §5.1).
pub const MAX_PORT_NAME_LEN: usize = 15;

/// Why a name was rejected. The message names the value and the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} {value:?} is longer than {max} characters")]
    TooLong {
        kind: &'static str,
        value: String,
        max: usize,
    },
    #[error(
        "{kind} {value:?} may hold only lowercase letters, digits and '-', and must start and end with a letter or digit"
    )]
    BadCharacters { kind: &'static str, value: String },
    #[error("{kind} {value:?} must start with a lowercase letter")]
    MustStartWithLetter { kind: &'static str, value: String },
    #[error("service name {0:?} must be <name>.<namespace>")]
    BadServiceKey(String),
}

/// At most the first [`SHOWN_MAX`] characters of a rejected `value`, marked when cut, so that
/// an error never carries a caller's whole input back (a 10 MB name must not become a 10 MB
/// error message).
fn shown(value: &str) -> String {
    match value.char_indices().nth(SHOWN_MAX) {
        Some((end, _)) => format!("{}…", &value[..end]),
        None => value.to_owned(),
    }
}

/// Longest part of a rejected value an error message repeats.
pub const SHOWN_MAX: usize = 80;

/// Checks an RFC 1123 label: `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub fn check_dns1123_label(kind: &'static str, value: &str) -> Result<(), NameError> {
    check_label(kind, value, MAX_LABEL_LEN)
}

/// Checks an RFC 1035 label: an RFC 1123 label that starts with a letter.
pub fn check_dns1035_label(kind: &'static str, value: &str) -> Result<(), NameError> {
    check_label(kind, value, MAX_LABEL_LEN)?;
    if !value.as_bytes()[0].is_ascii_lowercase() {
        return Err(NameError::MustStartWithLetter {
            kind,
            value: value.to_owned(),
        });
    }
    Ok(())
}

fn check_label(kind: &'static str, value: &str, max: usize) -> Result<(), NameError> {
    let bytes = value.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return Err(NameError::Empty { kind });
    };
    if bytes.len() > max {
        return Err(NameError::TooLong {
            kind,
            value: value.chars().take(max + 8).collect(),
            max,
        });
    }
    let inner_ok = bytes
        .iter()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
    let ends_ok = *first != b'-' && *last != b'-';
    if !inner_ok || !ends_ok {
        return Err(NameError::BadCharacters {
            kind,
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// Declares a validated, cheaply clonable name type backed by `Arc<str>`.
macro_rules! label_type {
    ($(#[$doc:meta])* $ty:ident, $kind:literal, $check:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $ty(Arc<str>);

        impl $ty {
            /// Validates `value` and wraps it.
            pub fn new(value: &str) -> Result<Self, NameError> {
                $check($kind, value)?;
                Ok(Self(Arc::from(value)))
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The empty name, which sorts below every valid one: a lower bound for ranges
            /// over ordered keys, never a name.
            #[allow(dead_code, reason = "used for the types some ranges start at")]
            pub(crate) fn lowest() -> Self {
                Self(Arc::from(""))
            }
        }

        impl FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $ty {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(&s)
            }
        }

        impl From<$ty> for String {
            fn from(v: $ty) -> String {
                v.0.to_string()
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", &*self.0)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

label_type!(
    /// A cluster's name (`east`): an RFC 1123 label, unique within a federation.
    ClusterName,
    "cluster name",
    check_dns1123_label
);
label_type!(
    /// A Kubernetes namespace: an RFC 1123 label.
    Namespace,
    "namespace",
    check_dns1123_label
);
label_type!(
    /// A service's name: an RFC 1035 label (starts with a letter).
    ServiceName,
    "service name",
    check_dns1035_label
);
label_type!(
    /// A gateway's id within its cluster (`east-gw-0`): an RFC 1123 label.
    GatewayId,
    "gateway id",
    check_dns1123_label
);

label_type!(
    /// An operator drill's id (`drain-west-0412`): an RFC 1123 label, unique in a federation.
    DrillId,
    "drill id",
    check_dns1123_label
);

/// Checks a port name: an IANA service name (RFC 6335): at most 15 characters, lowercase
/// letters, digits and '-', at least one letter, no leading, trailing or double '-'.
pub fn check_port_name(value: &str) -> Result<(), NameError> {
    const KIND: &str = "port name";
    check_label(KIND, value, MAX_PORT_NAME_LEN)?;
    if value.contains("--") || !value.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(NameError::BadCharacters {
            kind: KIND,
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// One clusterset service: `<name>.<namespace>`. The identity of a service across clusters.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceKey {
    pub namespace: Namespace,
    pub name: ServiceName,
}

impl ServiceKey {
    /// Builds a key from already validated parts.
    pub fn new(namespace: Namespace, name: ServiceName) -> Self {
        Self { namespace, name }
    }

    /// Validates both parts.
    pub fn parse(namespace: &str, name: &str) -> Result<Self, NameError> {
        Ok(Self {
            namespace: Namespace::new(namespace)?,
            name: ServiceName::new(name)?,
        })
    }
}

impl FromStr for ServiceKey {
    type Err = NameError;
    /// Parses `<name>.<namespace>`, the form operators type (`pay.prod`).
    fn from_str(s: &str) -> Result<Self, NameError> {
        let (name, ns) = s
            .split_once('.')
            .ok_or_else(|| NameError::BadServiceKey(shown(s)))?;
        Self::parse(ns, name)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

impl fmt::Debug for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_repeats_at_most_the_start_of_a_long_value() {
        let long = "a".repeat(20_000);
        for err in [
            long.parse::<ServiceKey>().expect_err("no dot"),
            ServiceKey::parse("prod", &long).expect_err("too long"),
        ] {
            let text = err.to_string();
            assert!(text.len() < 300, "{} bytes: {}", text.len(), &text[..300]);
        }
        let short = "nodot"
            .parse::<ServiceKey>()
            .expect_err("no dot")
            .to_string();
        assert!(short.contains("\"nodot\""), "{short}");
        assert!(
            "ä".repeat(100)
                .parse::<ServiceKey>()
                .expect_err("no dot")
                .to_string()
                .contains('…'),
            "cut on a character boundary, marked"
        );
    }

    #[test]
    fn labels_follow_rfc1123() {
        let cases: &[(&str, bool)] = &[
            ("east", true),
            ("us-east-1", true),
            ("0abc", true),
            ("a", true),
            ("", false),
            ("-east", false),
            ("east-", false),
            ("East", false),
            ("ea_st", false),
            ("ea.st", false),
            (&"a".repeat(63), true),
            (&"a".repeat(64), false),
        ];
        for (value, ok) in cases {
            assert_eq!(ClusterName::new(value).is_ok(), *ok, "{value:?}");
        }
    }

    #[test]
    fn service_names_start_with_a_letter() {
        assert!(ServiceName::new("pay").is_ok());
        assert!(matches!(
            ServiceName::new("9pay"),
            Err(NameError::MustStartWithLetter { .. })
        ));
        // Namespaces may start with a digit (RFC 1123).
        assert!(Namespace::new("9prod").is_ok());
    }

    #[test]
    fn port_names_are_iana_service_names() {
        for (value, ok) in [
            ("http", true),
            ("grpc-web", true),
            ("h2c", true),
            ("8080", false),
            ("a--b", false),
            ("way-too-long-port", false),
            ("", false),
        ] {
            assert_eq!(check_port_name(value).is_ok(), ok, "{value:?}");
        }
    }

    #[test]
    fn service_key_round_trips_through_text_and_json() {
        let key: ServiceKey = "pay.prod".parse().expect("valid");
        assert_eq!(key.to_string(), "pay.prod");
        assert_eq!(key.namespace.as_str(), "prod");
        let json = serde_json::to_string(&key).expect("serialize");
        assert_eq!(json, r#"{"namespace":"prod","name":"pay"}"#);
        let back: ServiceKey = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, key);
        assert!("pay".parse::<ServiceKey>().is_err());
        assert!(
            serde_json::from_str::<ServiceKey>(r#"{"namespace":"Prod","name":"pay"}"#).is_err()
        );
    }
}
