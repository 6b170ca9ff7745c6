use axum::body::Body;
use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::common::TestApp;

#[tokio::test]
async fn health_and_readiness() {
    let app = TestApp::new().await;
    let h = app
        .request(Method::GET, "/healthz", None, &[], Body::empty())
        .await;
    h.assert_status(StatusCode::OK);
    assert_eq!(h.body, json!({"status": "ok"}));
    let r = app
        .request(Method::GET, "/readyz", None, &[], Body::empty())
        .await;
    r.assert_status(StatusCode::OK);
    assert_eq!(
        r.body,
        json!({"status": "ok", "postgres": "ok", "redis": "ok"})
    );
}

#[tokio::test]
async fn request_ids_are_set_and_propagated() {
    let app = TestApp::new().await;
    let r = app
        .request(Method::GET, "/healthz", None, &[], Body::empty())
        .await;
    assert!(!r.headers["x-request-id"].is_empty());
    let r = app
        .request(
            Method::GET,
            "/v1/nowhere",
            None,
            &[("x-request-id", "abc-123")],
            Body::empty(),
        )
        .await;
    assert_eq!(r.headers["x-request-id"], "abc-123");
    r.assert_error(StatusCode::NOT_FOUND, "not_found");
}

/// A raw HTTP/1.1 GET over TCP (the server under test is real here).
async fn raw_get(addr: std::net::SocketAddr, path: String, key: Option<String>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = key
        .map(|k| format!("authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n{auth}connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test]
async fn serve_answers_parked_waits_at_shutdown_and_returns() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let created = app.create_capsule(&key).await;
    let op = created["operation"]["id"].as_str().unwrap().to_owned();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(hangar_api::serve(listener, app.state.clone(), async {
        let _ = stopped.await;
    }));

    let health = raw_get(addr, "/healthz".into(), None).await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");

    let poll = tokio::spawn(raw_get(
        addr,
        format!("/v1/operations/{op}?wait=300"),
        Some(key),
    ));
    crate::common::until_parked(&app.state, 1).await;
    let started = std::time::Instant::now();
    stop.send(()).unwrap();
    let response = poll.await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains(r#""status":"queued""#), "{response}");
    server.await.unwrap().unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
}
