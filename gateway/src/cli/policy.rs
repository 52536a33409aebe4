//! `meshup policy get|validate|apply|set|delete`: a service's failover policy
//! (docs/policy.md), written as a policy file (YAML or JSON, strict:
//! `meshup_admin_api::policy_file`) and stored through the admin API. The verbs and their
//! meaning are [`super::record`]'s, shared with `meshup route`.

use meshup_admin_api::file::FileError;
use meshup_admin_api::pb;
use meshup_admin_api::policy_file::{self, PolicyFile};
use meshup_core::names::ServiceKey;
use meshup_core::policy::PolicyRecord;
use tonic::Status;

use super::record::{Client, Family, Stored, StoredView, Written};
use super::render;

/// Failover policies, for [`super::record`].
pub(super) struct Policies;

impl Family for Policies {
    type File = PolicyFile;
    const COMMAND: &'static str = "policy";
    const WHAT: &'static str = "policy";
    const IS: &'static str = "is";
    const FIELD: &'static str = "policy";
    const DELETED: &'static str = "the default applies again";

    fn parse(text: &str, service: Option<&ServiceKey>) -> Result<PolicyFile, FileError> {
        policy_file::parse(text, service)
    }

    fn service(f: &PolicyFile) -> &ServiceKey {
        &f.service
    }

    fn same(stored_json: &str, f: &PolicyFile) -> bool {
        meshup_core::policy::decode::<PolicyRecord>(stored_json.as_bytes())
            .is_ok_and(|stored| stored.same_rules(&f.record))
    }

    fn render_get(v: &StoredView) -> String {
        let head = if v.found {
            format!(
                "# policy for {} at revision {} (apply changes with --revision {})\n",
                v.service, v.revision, v.revision
            )
        } else {
            format!(
                "# no policy stored for {}: the default below applies (create one with --revision 0)\n",
                v.service
            )
        };
        render::as_file(head, &v.service, &v.record, policy_file::to_yaml)
    }

    async fn get(c: &mut Client, service: String) -> Result<Stored, Status> {
        let r = c
            .get_policy(pb::GetPolicyRequest { service })
            .await?
            .into_inner();
        Ok(Stored {
            found: r.found,
            revision: r.revision,
            json: r.policy_json,
        })
    }

    async fn validate(c: &mut Client, f: &PolicyFile) -> Result<Vec<String>, Status> {
        Ok(c.validate_policy(pb::ValidatePolicyRequest {
            service: f.service.to_string(),
            policy_json: f.json(),
        })
        .await?
        .into_inner()
        .warnings)
    }

    async fn write(c: &mut Client, f: &PolicyFile, revision: i64) -> Result<Written, Status> {
        let r = c
            .set_policy(pb::SetPolicyRequest {
                service: f.service.to_string(),
                policy_json: f.json(),
                revision,
            })
            .await?
            .into_inner();
        Ok(Written {
            revision: r.revision,
            warnings: r.warnings,
        })
    }

    async fn delete(c: &mut Client, service: String, revision: i64) -> Result<i64, Status> {
        Ok(
            c.delete_policy(pb::DeletePolicyRequest { service, revision })
                .await?
                .into_inner()
                .revision,
        )
    }
}
