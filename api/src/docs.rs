//! The OpenAPI 3.1 document (`GET /openapi.json`) and a page that renders it (`GET /docs`).
//!
//! The document is generated from the handlers' `#[utoipa::path]` annotations as
//! [`crate::routes`] registers them, so it lists exactly the routes the router serves. The
//! page is one static file with a few lines of JavaScript: no CDN, since CI and many
//! deployments have no network.

use std::sync::LazyLock;

use axum::Json;
use axum::response::Html;
use utoipa::openapi::OpenApi as Document;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::AppState;
use crate::error::ErrorEnvelope;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Hangar API",
        license(name = "Apache-2.0"),
        description = "Control plane for microVM sandboxes (capsules). Lifecycle requests answer \
                       at once with 202 and an operation (the job handle) to poll. Errors share \
                       one envelope: `{\"error\": {\"code\", \"message\"}}`. POSTs take an \
                       optional `Idempotency-Key` header."
    ),
    modifiers(&SecuritySchemes),
    components(schemas(ErrorEnvelope)),
    tags(
        (name = "capsules", description = "A team's capsules"),
        (name = "operations", description = "Job handles of lifecycle requests"),
        (name = "events", description = "The capsule event stream"),
        (name = "templates", description = "What capsules are created from"),
        (name = "admin", description = "Platform operators (admin keys)"),
        (name = "hosts", description = "Called by the host agents"),
        (name = "ops", description = "Health, readiness and this documentation"),
        (name = "dashboard", description = "The operator dashboard (HTML pages, admin-key login session)"),
    )
)]
struct ApiDoc;

/// The three bearer credentials; each operation names the one it takes.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut Document) {
        let components = openapi.components.get_or_insert_default();
        let bearer = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(description))
                    .build(),
            )
        };
        components.add_security_scheme(
            "api_key",
            bearer("A team's API key (`hk_…`); an admin key acts as the platform team."),
        );
        components.add_security_scheme(
            "admin_key",
            bearer("An admin key of the platform team; other keys get 403 `forbidden`."),
        );
        components.add_security_scheme(
            "host_token",
            bearer("The token a host got at registration; only for its own `{id}`."),
        );
    }
}

/// The document's title, tags and security schemes, before any route is added.
pub(crate) fn base() -> Document {
    ApiDoc::openapi()
}

pub(crate) fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(openapi_json))
        .routes(routes!(docs_page))
}

/// Built once, on first request (from the same registrations as the router).
static DOCUMENT: LazyLock<Document> = LazyLock::new(|| crate::routes().into_openapi());

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "ops",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object))
)]
async fn openapi_json() -> Json<&'static Document> {
    Json(&DOCUMENT)
}

/// A readable rendering of `/openapi.json`.
#[utoipa::path(
    get,
    path = "/docs",
    tag = "ops",
    responses((status = 200, description = "A self-contained HTML page", content_type = "text/html", body = String))
)]
async fn docs_page() -> Html<&'static str> {
    Html(include_str!("docs.html"))
}
