//! `/openapi.json`: generated from the handlers' annotations, so it cannot drift from the
//! routes. Each operation's `security` scope names the least role it needs (admin may call
//! everything); the auth test walks this document to check every route.

use std::sync::OnceLock;

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{InfoBuilder, OpenApi, OpenApiBuilder};

pub(crate) fn base() -> OpenApi {
    let mut doc = OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("tunnel API")
                .version("1")
                .description(Some(
                    "Hand coding tasks from chat to AI coding agents on runners behind NAT. \
                     Times are Unix milliseconds. Errors are {\"error\": {\"code\", \"message\"}}.",
                ))
                .build(),
        )
        .build();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "A token from `tunnel token create` (tnl_…) or WORKER_TOKEN (admin).",
                ))
                .build(),
        ),
    );
    doc
}

/// The whole API description as JSON.
pub fn openapi_json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        let (_, mut doc) = crate::api::api_routes().split_for_parts();
        doc.paths.paths.insert(
            "/openapi.json".into(),
            utoipa::openapi::path::PathItem::new(
                utoipa::openapi::HttpMethod::Get,
                utoipa::openapi::path::OperationBuilder::new()
                    .summary(Some("This document."))
                    .response(
                        "200",
                        utoipa::openapi::Response::new("the OpenAPI document"),
                    )
                    .build(),
            ),
        );
        document_errors(&mut doc);
        doc.to_json().expect("the OpenAPI document serialises")
    })
}

/// Adds the error answers every operation can give, so the document lists every status the
/// server sends (schemathesis checks it): 401 and 403 where a token is needed, 400 where there
/// is a body, query or path to refuse (and 413, 415 for bodies), 404 where a path names a
/// task or token, 409 for task transitions, and 503 where the database is asked. Each is an
/// `ErrorBody`. Operations keep what their annotation already says.
fn document_errors(doc: &mut OpenApi) {
    use utoipa::openapi::path::ParameterIn;
    use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};

    let error = |what: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(what)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build(),
        )
    };
    for (path, item) in doc.paths.paths.iter_mut() {
        let ops = [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
            &mut item.patch,
        ];
        for op in ops.into_iter().flatten() {
            let mut add: Vec<(&str, &str)> = Vec::new();
            let secured = op.security.as_ref().is_some_and(|s| !s.is_empty());
            if secured {
                add.push(("401", "no token, or not a valid one"));
                add.push(("403", "the token's role may not call this"));
                add.push(("503", "the database is unavailable; try again"));
            }
            let params = op.parameters.as_deref().unwrap_or_default();
            if op.request_body.is_some() || !params.is_empty() || path.contains('{') {
                add.push(("400", "the request is not valid"));
            }
            if op.request_body.is_some() {
                add.push(("413", "the body is larger than the server accepts"));
                add.push(("415", "the body is not sent as JSON"));
            }
            if params
                .iter()
                .any(|p| matches!(p, RefOr::T(p) if matches!(p.parameter_in, ParameterIn::Path)))
            {
                add.push(("404", "no such task or token (or not yours)"));
            }
            if path.starts_with("/v1/tasks/{id}/") {
                add.push(("409", "the task or attempt has moved on"));
            }
            for (status, what) in add {
                op.responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| error(what));
            }
        }
    }
}
