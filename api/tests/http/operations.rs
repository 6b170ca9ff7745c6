use std::time::{Duration, Instant};

use axum::http::StatusCode;
use hangar_jobs::{OperationId, OperationStatus};
use serde_json::json;

use crate::common::{ADMIN_KEY, TestApp, until_parked};

#[tokio::test]
async fn get_and_list_operations_with_filters() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let a = app.create_capsule(&key).await;
    let id = app.make_running(&a).await;
    let pause = app
        .post_json(&format!("/v1/capsules/{id}/pause"), &key, json!({}))
        .await;
    let b = app.create_capsule(&key).await;

    let op = a["operation"]["id"].as_str().unwrap();
    let got = app.get(&format!("/v1/operations/{op}"), &key).await;
    got.assert_status(StatusCode::OK);
    assert_eq!(got.body["status"], "succeeded");
    assert_eq!(got.body["kind"], "create");

    let all = app.get("/v1/operations", &key).await;
    let ids: Vec<_> = all.body["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["id"].clone())
        .collect();
    assert_eq!(
        ids,
        vec![
            b["operation"]["id"].clone(),
            pause.body["operation"]["id"].clone(),
            a["operation"]["id"].clone()
        ]
    );
    assert!(all.body["next_cursor"].is_null());

    let of_a = app
        .get(&format!("/v1/operations?capsule_id={id}"), &key)
        .await;
    assert_eq!(of_a.body["operations"].as_array().unwrap().len(), 2);
    let creates = app
        .get("/v1/operations?kind=create&status=queued", &key)
        .await;
    assert_eq!(creates.body["operations"].as_array().unwrap().len(), 1);
    assert_eq!(creates.body["operations"][0]["id"], b["operation"]["id"]);

    let page = app.get("/v1/operations?limit=2", &key).await;
    assert_eq!(page.body["next_cursor"], pause.body["operation"]["id"]);
    let rest = app
        .get(
            &format!(
                "/v1/operations?limit=2&cursor={}",
                page.body["next_cursor"].as_str().unwrap()
            ),
            &key,
        )
        .await;
    assert_eq!(rest.body["operations"].as_array().unwrap().len(), 1);
    assert!(rest.body["next_cursor"].is_null());

    // Admin keys see every team's operations.
    app.get(&format!("/v1/operations/{op}"), ADMIN_KEY)
        .await
        .assert_status(StatusCode::OK);
}

#[tokio::test]
async fn wait_returns_as_soon_as_the_operation_finishes() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let created = app.create_capsule(&key).await;
    let op: OperationId = created["operation"]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let started = Instant::now();
    let path = format!("/v1/operations/{op}?wait=60");
    let poll = {
        let app_router = app.router.clone();
        let key = key.clone();
        tokio::spawn(async move {
            use tower::ServiceExt;
            let request = axum::http::Request::get(path)
                .header("authorization", format!("Bearer {key}"))
                .body(axum::body::Body::empty())
                .unwrap();
            let response = app_router.oneshot(request).await.unwrap();
            let status = response.status();
            let bytes = http_body_util::BodyExt::collect(response.into_body())
                .await
                .unwrap()
                .to_bytes();
            (
                status,
                serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
            )
        })
    };
    until_parked(&app.state, 1).await;
    app.finish(op, OperationStatus::Failed).await;
    let (status, body) = poll.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "failed");
    // Woken by the notification, not by the 5 s safety-net re-read.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(app.state.parked_waiters(), 0);
}

#[tokio::test]
async fn wait_returns_the_operation_as_it_is_when_the_wait_ends() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let created = app.create_capsule(&key).await;
    let op = created["operation"]["id"].as_str().unwrap();
    let started = Instant::now();
    let r = app.get(&format!("/v1/operations/{op}?wait=1"), &key).await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.body["status"], "queued");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(3),
        "took {took:?}"
    );
}

#[tokio::test]
async fn wait_on_a_finished_operation_returns_at_once() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let created = app.create_capsule(&key).await;
    app.make_running(&created).await;
    let op = created["operation"]["id"].as_str().unwrap();
    let started = Instant::now();
    let r = app
        .get(&format!("/v1/operations/{op}?wait=300"), &key)
        .await;
    assert_eq!(r.body["status"], "succeeded");
    assert!(started.elapsed() < Duration::from_secs(1));
}
