//! The OpenAPI document and the router come from one registration (`routes!`): every
//! documented operation is served, every served route is documented, and the document says
//! what the issue asks of it.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use hangar_api::ApiError;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use crate::common::TestApp;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// Status, content type and body text of an unauthenticated request with no body.
async fn probe(app: &TestApp, method: &str, path: &str) -> (StatusCode, String, String) {
    let request = Request::builder()
        .method(Method::from_bytes(method.to_uppercase().as_bytes()).unwrap())
        .uri(path)
        .body(Body::empty())
        .unwrap();
    let response = app.router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

async fn document(app: &TestApp) -> Value {
    let (status, content_type, body) = probe(app, "get", "/openapi.json").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    serde_json::from_str(&body).expect("the document is JSON")
}

/// `{param}` segments filled with something a route matches (handlers then reject it).
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|s| if s.starts_with('{') { "x" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

/// (method, path, operation) for every operation in the document.
fn operations(doc: &Value) -> Vec<(&str, &str, &Value)> {
    let mut all = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if METHODS.contains(&method.as_str()) {
                all.push((method.as_str(), path.as_str(), op));
            }
        }
    }
    all
}

#[tokio::test]
async fn the_document_is_openapi_3_1() {
    let app = TestApp::new().await;
    let doc = document(&app).await;
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    assert_eq!(doc["info"]["title"], "Hangar API");
    assert!(operations(&doc).len() >= 30);
}

#[tokio::test]
async fn every_documented_operation_is_served_and_nothing_else_on_its_path() {
    let app = TestApp::new().await;
    let doc = document(&app).await;
    let no_route = ApiError::NoRoute.to_string();
    for (path, item) in doc["paths"].as_object().unwrap() {
        let uri = concrete(path);
        for method in METHODS {
            let (status, _, body) = probe(&app, method, &uri).await;
            if item.get(method).is_some() {
                assert!(
                    status != StatusCode::METHOD_NOT_ALLOWED && !body.contains(&no_route),
                    "documented {method} {path} is not served: {status} {body}"
                );
            } else {
                assert_eq!(
                    status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is served but not documented: {body}"
                );
            }
        }
    }
}

/// `OpenApiRouter::route` (and axum's routing functions) would add a route the document
/// does not know: the source must register routes with `routes!` only.
#[test]
fn routes_are_registered_only_with_routes_macro() {
    fn visit(dir: &std::path::Path, offenders: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                visit(&path, offenders);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for needle in [
                    ".route(",
                    ".route_service(",
                    ".nest(",
                    ".nest_service(",
                    "routing::",
                ] {
                    if text.contains(needle) {
                        offenders.push(format!("{}: {needle}", path.display()));
                    }
                }
            }
        }
    }
    let mut offenders = Vec::new();
    visit(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut offenders,
    );
    assert!(offenders.is_empty(), "undocumented routes: {offenders:?}");
}

#[tokio::test]
async fn operations_carry_tags_security_and_the_error_envelope() {
    let app = TestApp::new().await;
    let doc = document(&app).await;
    let schemes = &doc["components"]["securitySchemes"];
    for name in ["api_key", "admin_key", "host_token"] {
        assert_eq!(schemes[name]["type"], "http", "{name}");
        assert_eq!(schemes[name]["scheme"], "bearer", "{name}");
    }
    let envelope = "#/components/schemas/ErrorEnvelope";
    assert!(doc["components"]["schemas"]["ErrorEnvelope"].is_object());
    for (method, path, op) in operations(&doc) {
        let what = format!("{method} {path}");
        let tags = op["tags"]
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no tag"));
        if path.starts_with("/v1/admin/") {
            assert_eq!(tags[0], "admin", "{what}");
            assert_eq!(
                op["security"][0]["admin_key"],
                serde_json::json!([]),
                "{what}"
            );
        }
        if path.starts_with("/v1/hosts/") {
            assert_eq!(tags[0], "hosts", "{what}");
        }
        if !path.starts_with("/v1/") {
            continue;
        }
        assert!(op["summary"].is_string(), "{what}: no summary");
        let errors: Vec<_> = op["responses"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(status, _)| status.starts_with('4'))
            .collect();
        assert!(!errors.is_empty(), "{what}: no error response");
        for (status, response) in errors {
            assert_eq!(
                response["content"]["application/json"]["schema"]["$ref"], envelope,
                "{what} {status}"
            );
        }
        if op.get("security").is_some() {
            assert!(op["responses"]["401"].is_object(), "{what}: no 401");
        }
    }
}

#[tokio::test]
async fn schemas_describe_sse_bodies_and_typed_ids() {
    let app = TestApp::new().await;
    let doc = document(&app).await;
    let events = &doc["paths"]["/v1/events"]["get"]["responses"]["200"]["content"];
    assert_eq!(
        events["text/event-stream"]["schema"]["$ref"],
        "#/components/schemas/Event"
    );
    let schemas = &doc["components"]["schemas"];
    for name in [
        "Capsule",
        "Operation",
        "Template",
        "Host",
        "Event",
        "AcceptedBody",
    ] {
        assert!(schemas[name].is_object(), "no schema {name}");
    }
    assert_eq!(schemas["CapsuleId"]["type"], "string");
    assert_eq!(schemas["CapsuleId"]["pattern"], "^cap_[0-9a-f]{32}$");
    assert_eq!(
        schemas["Capsule"]["properties"]["id"]["$ref"],
        "#/components/schemas/CapsuleId"
    );
    assert!(schemas["Host"]["properties"].get("agent_token").is_none());
    let create = &doc["paths"]["/v1/capsules"]["post"];
    assert_eq!(
        create["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/CreateCapsuleBody"
    );
    assert_eq!(
        create["responses"]["202"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/AcceptedBody"
    );
}

#[tokio::test]
async fn docs_page_renders_the_document_without_network() {
    let app = TestApp::new().await;
    let (status, content_type, body) = probe(&app, "get", "/docs").await;
    assert_eq!(status, StatusCode::OK);
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert!(body.contains("/openapi.json"));
    // Self-contained: nothing loaded from elsewhere.
    assert!(!body.contains("http://") && !body.contains("https://"));
    assert!(!body.contains("<script src") && !body.contains("<link"));
}
