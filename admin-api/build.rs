//! Generates the admin API's Rust code from proto/meshup/admin/v1/admin.proto (protoc comes
//! from Debian's protobuf-compiler, listed in .ci/packages), and its file descriptor set for
//! server reflection.
//!
//! Messages also derive `serde::Serialize`, so the CLI prints `-o json|yaml` straight from
//! the answers; enum fields are written by name (`LINK_STATE_UP`), not number.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=../proto/meshup/admin/v1/admin.proto");
    let enum_fields = [
        ("ClusterInfo.link", "link_state"),
        ("Drill.kind", "drill_kind"),
        ("StartDrillRequest.kind", "drill_kind"),
        ("Event.kind", "event_kind"),
    ];
    let mut builder = tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("meshup_admin_v1_descriptor.bin"))
        .message_attribute(".meshup.admin.v1", "#[derive(serde::Serialize)]");
    for (field, with) in enum_fields {
        builder = builder.field_attribute(
            format!(".meshup.admin.v1.{field}"),
            format!("#[serde(serialize_with = \"crate::enum_names::{with}\")]"),
        );
    }
    builder.compile_protos(&["../proto/meshup/admin/v1/admin.proto"], &["../proto"])?;
    Ok(())
}
