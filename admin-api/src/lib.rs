//! meshup-admin-api: the gateway's gRPC admin API (`proto/meshup/admin/v1/admin.proto`,
//! package `meshup.admin.v1`) and what its server (the gateway) and its client (the `meshup`
//! CLI) share.
//!
//! - [`pb`]: the generated messages, client and server (tonic 0.14), and the file descriptor
//!   set that server reflection serves.
//! - [`names`]: service names and the DNS names `Resolve` accepts.
//! - [`policy_file`]: policy files as people write them (YAML) to the catalog's JSON record,
//!   and back; a mistake names its line and field.
//! - [`route_file`]: route files (a service's HTTP route rules) the same way.
//! - [`file`]: what the two share: the error naming a line and a field, finding a field's line.
//! - [`convert`]: drill records and audit entries to messages, and record errors to the field
//!   they are about.

pub mod convert;
pub mod file;
pub mod names;
pub mod policy_file;
pub mod route_file;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// The generated code of `meshup.admin.v1`.
#[allow(
    missing_docs,
    clippy::all,
    clippy::pedantic,
    missing_debug_implementations
)]
pub mod pb {
    tonic::include_proto!("meshup.admin.v1");

    /// The encoded `FileDescriptorSet` of admin.proto, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("meshup_admin_v1_descriptor");
}

/// The gRPC service's full name, as reflection and grpcurl list it.
pub const SERVICE_NAME: &str = "meshup.admin.v1.AdminService";

/// Where the CLI looks for the admin API when neither `--admin` nor `MESHUP_ADMIN` says.
pub const DEFAULT_ADMIN_GRPC: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 15021);

/// The trailer of a FAILED_PRECONDITION answer to a lost compare-and-set: the key's current
/// mod revision (0: it does not exist), so a client can read it without parsing the message.
pub const CURRENT_REVISION_METADATA: &str = "meshup-current-revision";

/// Largest request or answer message, both ways (a policy record is at most 64 KiB; a
/// service list of 10k services fits).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Longest a drill may last, as the API states it (the record's own limit).
pub const MAX_DRILL_DURATION: Duration = meshup_core::policy::MAX_DRILL_LIFETIME;

/// Serializers that write enum fields by name in `-o json|yaml` (see build.rs).
#[doc(hidden)]
pub mod enum_names {
    use super::pb;
    use serde::Serializer;

    fn name<S: Serializer>(
        s: S,
        name: Option<&'static str>,
        value: i32,
    ) -> Result<S::Ok, S::Error> {
        match name {
            Some(n) => s.serialize_str(n),
            None => s.serialize_i32(value),
        }
    }

    pub fn link_state<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        name(
            s,
            pb::LinkState::try_from(*v).ok().map(|e| e.as_str_name()),
            *v,
        )
    }

    pub fn drill_kind<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        name(
            s,
            pb::DrillKind::try_from(*v).ok().map(|e| e.as_str_name()),
            *v,
        )
    }

    pub fn event_kind<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        name(
            s,
            pb::EventKind::try_from(*v).ok().map(|e| e.as_str_name()),
            *v,
        )
    }
}
