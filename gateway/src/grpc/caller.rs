//! Who calls the admin API, and the audit event every write logs.
//!
//! Each listener stamps its connections with a [`Caller`] (tonic puts it into every request's
//! extensions): the loopback listener with [`Caller::Local`], the remote mTLS listener with
//! the [`Caller::Operator`] its client certificate names. A request without one is refused,
//! so a listener that forgot to say who calls fails closed.
//!
//! What a write records as its author ([`author`]) is pure and table-tested: an operator is
//! their certificate's name, whatever the request says; a local caller is the name it gives
//! (`who`), since anyone on the host can reach loopback and the server cannot tell them apart.

use std::fmt;

use meshup_core::identity::{LOCAL_CALLER, OperatorIdentity};
use tonic::{Request, Status};

/// The tracing target of audit events: `MESHUP_LOG=meshup::audit=info` selects them.
pub const AUDIT_TARGET: &str = "meshup::audit";

/// Who is on the other end of an admin connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The loopback listener: a user of this host, unverified.
    Local,
    /// The remote listener: verified by an operator certificate of our trust domain.
    Operator(OperatorIdentity),
}

impl Caller {
    /// The name writes record: the operator's name, or [`LOCAL_CALLER`].
    pub fn name(&self) -> &str {
        match self {
            Caller::Local => LOCAL_CALLER,
            Caller::Operator(op) => &op.name,
        }
    }

    /// Whether a certificate proves the identity.
    pub fn verified(&self) -> bool {
        matches!(self, Caller::Operator(_))
    }

    /// The SPIFFE ID of a verified caller, or "" for a local one.
    pub fn spiffe_id(&self) -> String {
        match self {
            Caller::Local => String::new(),
            Caller::Operator(op) => op.spiffe_id().to_string(),
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The caller a listener stamped on `request`'s connection.
pub fn caller_of<T>(request: &Request<T>) -> Result<Caller, Status> {
    request.extensions().get::<Caller>().cloned().ok_or_else(|| {
        Status::unauthenticated(
            "this connection carries no caller identity; call the admin API on admin.grpc (loopback) or admin.grpc_remote (mTLS)",
        )
    })
}

/// Why a request's `who` cannot stand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorError {
    #[error(
        "missing: say who you are (--who NAME); it goes into the audit trail (callers with an operator certificate are named by it)"
    )]
    Missing,
    #[error(
        "{declared:?} is not the caller: this connection is operator {operator:?} by its certificate; leave --who out (or pass --who {operator})"
    )]
    NotTheCaller { declared: String, operator: String },
}

/// Who a write records as its author: an operator's certificate name (a `who` in the request
/// must be empty or equal it: a certificate holder cannot write in someone else's name); a
/// local caller's `who`, which it must give.
pub fn author(caller: &Caller, declared: &str) -> Result<String, AuthorError> {
    let declared = declared.trim();
    match caller {
        Caller::Operator(op) if declared.is_empty() || declared == op.name => Ok(op.name.clone()),
        Caller::Operator(op) => Err(AuthorError::NotTheCaller {
            declared: declared.to_owned(),
            operator: op.name.clone(),
        }),
        Caller::Local if declared.is_empty() => Err(AuthorError::Missing),
        Caller::Local => Ok(declared.to_owned()),
    }
}

/// Logs one audit event for a write that succeeded: who (and whether a certificate proves
/// it), what, on which object, and the store revision it made.
pub fn audit(caller: &Caller, author: &str, action: &'static str, object: &str, revision: i64) {
    tracing::info!(
        target: AUDIT_TARGET,
        caller = caller.name(),
        author,
        verified = caller.verified(),
        spiffe_id = %caller.spiffe_id(),
        action,
        object,
        revision,
        "admin write"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_author_of_a_write_is_the_certificate_or_the_local_callers_word() {
        let ana = Caller::Operator(OperatorIdentity::new("mesh.test", "ana").expect("valid"));
        let cases: &[(&Caller, &str, Result<&str, AuthorError>)] = &[
            (&ana, "", Ok("ana")),
            (&ana, " ana ", Ok("ana")),
            (
                &ana,
                "bo",
                Err(AuthorError::NotTheCaller {
                    declared: "bo".into(),
                    operator: "ana".into(),
                }),
            ),
            (&Caller::Local, "bo", Ok("bo")),
            (&Caller::Local, "  ", Err(AuthorError::Missing)),
            (&Caller::Local, "", Err(AuthorError::Missing)),
        ];
        for (caller, declared, want) in cases {
            assert_eq!(
                author(caller, declared).as_deref(),
                want.as_ref().map(|s| *s),
                "{caller:?} {declared:?}"
            );
        }
        assert_eq!(ana.to_string(), "ana");
        assert_eq!(Caller::Local.to_string(), "local");
        assert!(ana.verified() && !Caller::Local.verified());
        assert_eq!(ana.spiffe_id(), "spiffe://mesh.test/operator/ana");
    }
}
