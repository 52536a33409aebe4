//! `meshup route get|validate|apply|set|delete`: the route rules of a service's http and grpc
//! ports (docs/http-routing.md), written as a route file (YAML or JSON, strict:
//! `meshup_admin_api::route_file`) and stored through the admin API. The verbs and their
//! meaning are [`super::record`]'s, shared with `meshup policy`.

use meshup_admin_api::file::FileError;
use meshup_admin_api::pb;
use meshup_admin_api::route_file::{self, RouteFile};
use meshup_core::names::ServiceKey;
use tonic::Status;

use super::record::{Client, Family, Stored, StoredView, Written};
use super::render;

/// Route rules, for [`super::record`].
pub(super) struct Routes;

impl Family for Routes {
    type File = RouteFile;
    const COMMAND: &'static str = "route";
    const WHAT: &'static str = "route rules";
    const IS: &'static str = "are";
    const FIELD: &'static str = "routes";
    const DELETED: &'static str = "every request follows the failover policy again";

    fn parse(text: &str, service: Option<&ServiceKey>) -> Result<RouteFile, FileError> {
        route_file::parse(text, service)
    }

    fn service(f: &RouteFile) -> &ServiceKey {
        &f.service
    }

    fn same(stored_json: &str, f: &RouteFile) -> bool {
        meshup_core::routes::decode(stored_json.as_bytes())
            .is_ok_and(|stored| route_file::same_rules(&stored, &f.record))
    }

    fn render_get(v: &StoredView) -> String {
        let head = if v.found {
            format!(
                "# route rules for {} at revision {} (apply changes with --revision {})\n",
                v.service, v.revision, v.revision
            )
        } else {
            format!(
                "# no route rules stored for {}: every request follows the failover policy (create them with --revision 0)\n",
                v.service
            )
        };
        render::as_file(head, &v.service, &v.record, route_file::to_yaml)
    }

    async fn get(c: &mut Client, service: String) -> Result<Stored, Status> {
        let r = c
            .get_routes(pb::GetRoutesRequest { service })
            .await?
            .into_inner();
        Ok(Stored {
            found: r.found,
            revision: r.revision,
            json: r.routes_json,
        })
    }

    async fn validate(c: &mut Client, f: &RouteFile) -> Result<Vec<String>, Status> {
        Ok(c.validate_routes(pb::ValidateRoutesRequest {
            service: f.service.to_string(),
            routes_json: f.json(),
        })
        .await?
        .into_inner()
        .warnings)
    }

    async fn write(c: &mut Client, f: &RouteFile, revision: i64) -> Result<Written, Status> {
        let r = c
            .apply_routes(pb::ApplyRoutesRequest {
                service: f.service.to_string(),
                routes_json: f.json(),
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
            c.delete_routes(pb::DeleteRoutesRequest { service, revision })
                .await?
                .into_inner()
                .revision,
        )
    }
}
