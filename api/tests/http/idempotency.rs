use axum::http::{StatusCode, header};
use hangar_jobs::OperationKind;
use serde_json::json;

use crate::common::{ADMIN_KEY, TestApp};

#[tokio::test]
async fn a_replay_returns_the_first_response_and_creates_nothing() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let body = json!({"vcpus": 2, "metadata": {"job": "1"}});
    let first = app
        .post_idempotent("/v1/capsules", &key, "create-1", body.clone())
        .await;
    first.assert_status(StatusCode::ACCEPTED);
    let before = app.db_snapshot().await;

    let second = app
        .post_idempotent("/v1/capsules", &key, "create-1", body)
        .await;
    second.assert_status(StatusCode::ACCEPTED);
    assert_eq!(second.body, first.body);
    assert_eq!(
        second.headers[header::LOCATION],
        first.headers[header::LOCATION]
    );
    assert_eq!(app.db_snapshot().await, before);
    assert_eq!(app.stream_len(OperationKind::Create).await, 1);
}

#[tokio::test]
async fn a_key_reused_for_another_request_is_422() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let first = app
        .post_idempotent("/v1/capsules", &key, "k", json!({"vcpus": 2}))
        .await;
    first.assert_status(StatusCode::ACCEPTED);
    let id = first.body["capsule"]["id"].as_str().unwrap();
    let before = app.db_snapshot().await;

    app.post_idempotent("/v1/capsules", &key, "k", json!({"vcpus": 3}))
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    // Another route.
    app.post_idempotent(&format!("/v1/capsules/{id}/pause"), &key, "k", json!({}))
        .await
        .assert_error(StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    assert_eq!(app.db_snapshot().await, before);
}

#[tokio::test]
async fn keys_belong_to_a_team_and_failures_store_nothing() {
    let app = TestApp::new().await;
    let (_, a) = app.team("team-a").await;
    let (_, b) = app.team("team-b").await;
    // A failed request under a key stores nothing: the key is still free afterwards.
    app.post_idempotent("/v1/capsules", &a, "shared", json!({"template": "missing"}))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "unknown_template");
    let ra = app
        .post_idempotent("/v1/capsules", &a, "shared", json!({}))
        .await;
    ra.assert_status(StatusCode::ACCEPTED);
    // Another team's use of the same key is its own.
    let rb = app
        .post_idempotent("/v1/capsules", &b, "shared", json!({}))
        .await;
    rb.assert_status(StatusCode::ACCEPTED);
    assert_ne!(ra.body["capsule"]["id"], rb.body["capsule"]["id"]);
}

#[tokio::test]
async fn concurrent_requests_with_one_key_create_one_capsule() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let before = app.db_snapshot().await;
    let requests = (0..4).map(|_| app.post_idempotent("/v1/capsules", &key, "race", json!({})));
    let responses = futures::future::join_all(requests).await;
    for r in &responses {
        r.assert_status(StatusCode::ACCEPTED);
        assert_eq!(r.body, responses[0].body);
    }
    let after = app.db_snapshot().await;
    assert_eq!(after["capsules"], before["capsules"] + 1);
    assert_eq!(after["idempotency_keys"], before["idempotency_keys"] + 1);
}

#[tokio::test]
async fn lifecycle_posts_replay_too() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let created = app.create_capsule(&key).await;
    let id = app.make_running(&created).await;
    let path = format!("/v1/capsules/{id}/pause");
    let first = app.post_idempotent(&path, &key, "pause-1", json!({})).await;
    first.assert_status(StatusCode::ACCEPTED);
    // Without the key this would be 409 operation_in_progress; with it, the same 202.
    let again = app.post_idempotent(&path, &key, "pause-1", json!({})).await;
    again.assert_status(StatusCode::ACCEPTED);
    assert_eq!(again.body, first.body);
    assert_eq!(
        again.headers[header::LOCATION],
        first.headers[header::LOCATION]
    );
}

#[tokio::test]
async fn a_minted_key_is_never_stored_for_replay() {
    let app = TestApp::new().await;
    let team = app.create_team("acme").await;
    let path = format!("/v1/admin/teams/{team}/keys");
    let first = app
        .post_idempotent(&path, ADMIN_KEY, "mint-1", json!({"name": "ci"}))
        .await;
    first.assert_status(StatusCode::CREATED);
    assert!(first.body["key"].as_str().unwrap().starts_with("hk_"));
    let before = app.db_snapshot().await;
    let again = app
        .post_idempotent(&path, ADMIN_KEY, "mint-1", json!({"name": "ci"}))
        .await;
    again.assert_status(StatusCode::CREATED);
    assert_eq!(again.body["id"], first.body["id"]);
    assert_eq!(again.body["prefix"], first.body["prefix"]);
    assert!(again.body["key"].is_null());
    assert_eq!(app.db_snapshot().await, before);
}
