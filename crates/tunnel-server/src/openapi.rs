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
        doc.to_json().expect("the OpenAPI document serialises")
    })
}
