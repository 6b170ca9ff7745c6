//! Operator actions: retry a failed operation, cancel a queued one, drain a host.

use axum::http::StatusCode;
use hangar_jobs::{CapsuleId, CapsuleStatus, HostId, OperationId, OperationKind, OperationStatus};
use serde_json::{Value, json};

use crate::common::{ADMIN_KEY, TestApp};

fn op_id(body: &Value) -> OperationId {
    body["operation"]["id"].as_str().unwrap().parse().unwrap()
}

fn capsule_id(body: &Value) -> CapsuleId {
    body["capsule"]["id"].as_str().unwrap().parse().unwrap()
}

async fn audit_actions(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar("select action from audit_log order by id")
        .fetch_all(&app.env.pool)
        .await
        .unwrap()
}

/// What a worker's `fail` does: the operation fails and the capsule goes to `error`.
async fn fail(app: &TestApp, op: OperationId, capsule: CapsuleId) {
    app.finish(op, OperationStatus::Failed).await;
    app.transition(capsule, CapsuleStatus::Error).await;
}

#[tokio::test]
async fn a_failed_create_is_retried_as_a_new_create() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let created = app.create_capsule(&key).await;
    let (op, cap) = (op_id(&created), capsule_id(&created));
    fail(&app, op, cap).await;
    let path = format!("/v1/admin/operations/{op}/retry");

    app.post_json(&path, &key, json!({}))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    let r = app.post_json(&path, ADMIN_KEY, json!({})).await;
    r.assert_status(StatusCode::ACCEPTED);
    let retried = op_id(&r.body);
    assert_ne!(retried, op);
    assert_eq!(r.body["operation"]["kind"], "create");
    assert_eq!(r.body["operation"]["status"], "queued");
    assert_eq!(
        r.body["operation"]["params"],
        created["operation"]["params"]
    );
    assert_eq!(r.body["capsule"]["status"], "starting");
    assert!(r.body["capsule"]["status_deadline"].is_string());
    assert_eq!(
        r.headers["location"],
        format!("/v1/operations/{retried}").as_str()
    );
    // Pushed after commit: the first create and the retry.
    assert_eq!(app.stream_len(OperationKind::Create).await, 2);
    assert!(
        audit_actions(&app)
            .await
            .contains(&"operation.retry".to_owned())
    );

    // The capsule has moved on: the same failure cannot be retried twice.
    app.post_json(&path, ADMIN_KEY, json!({}))
        .await
        .assert_error(StatusCode::CONFLICT, "invalid_state");
    // Nor can an operation that did not fail.
    app.post_json(
        &format!("/v1/admin/operations/{retried}/retry"),
        ADMIN_KEY,
        json!({}),
    )
    .await
    .assert_error(StatusCode::CONFLICT, "invalid_state");
}

#[tokio::test]
async fn a_failed_pause_is_retried_only_where_a_pause_is_accepted() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let cap = app.make_running(&app.create_capsule(&key).await).await;
    let paused = app
        .post_json(&format!("/v1/capsules/{cap}/pause"), &key, json!({}))
        .await;
    let op = op_id(&paused.body);
    fail(&app, op, cap).await;
    let path = format!("/v1/admin/operations/{op}/retry");

    // In `error` the VM's real state is unknown: only a destroy is accepted.
    let r = app.post_json(&path, ADMIN_KEY, json!({})).await;
    r.assert_error(StatusCode::CONFLICT, "invalid_state");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("error")
    );

    // A retried destroy of it is accepted, like a new destroy.
    let destroy = app.delete(&format!("/v1/capsules/{cap}"), &key).await;
    destroy.assert_status(StatusCode::ACCEPTED);
    let destroy_op = op_id(&destroy.body);
    app.finish(destroy_op, OperationStatus::Failed).await;
    let r = app
        .post_json(
            &format!("/v1/admin/operations/{destroy_op}/retry"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    r.assert_status(StatusCode::ACCEPTED);
    assert_eq!(r.body["operation"]["kind"], "destroy");
}

#[tokio::test]
async fn a_queued_pause_is_cancelled_and_the_capsule_goes_back_to_running() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let cap = app.make_running(&app.create_capsule(&key).await).await;
    let paused = app
        .post_json(&format!("/v1/capsules/{cap}/pause"), &key, json!({}))
        .await;
    let op = op_id(&paused.body);
    let before = app.capsule(cap).await;
    assert_eq!(before.status, CapsuleStatus::Pausing);
    let path = format!("/v1/admin/operations/{op}/cancel");

    app.post_json(&path, &key, json!({}))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    let r = app.post_json(&path, ADMIN_KEY, json!({})).await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.body["operation"]["status"], "cancelled");
    assert_eq!(r.body["operation"]["error_code"], "cancelled_by_operator");
    assert_eq!(r.body["capsule"]["status"], "running");
    let after = app.capsule(cap).await;
    assert_eq!(after.status, CapsuleStatus::Running);
    assert_eq!(after.generation, before.generation + 1);
    assert!(
        audit_actions(&app)
            .await
            .contains(&"operation.cancel".to_owned())
    );

    // Terminal now: neither cancelled again nor claimable by a worker.
    app.post_json(&path, ADMIN_KEY, json!({}))
        .await
        .assert_error(StatusCode::CONFLICT, "invalid_state");
    let mut conn = app.env.pool.acquire().await.unwrap();
    let claimed = hangar_jobs::store::operations::claim(&mut conn, op, "w", 30.0)
        .await
        .unwrap();
    assert!(claimed.is_none());
    // And the capsule accepts a new pause.
    app.post_json(&format!("/v1/capsules/{cap}/pause"), &key, json!({}))
        .await
        .assert_status(StatusCode::ACCEPTED);
}

#[tokio::test]
async fn a_cancelled_create_leaves_the_capsule_in_error_and_destroys_are_not_cancelled() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let created = app.create_capsule(&key).await;
    let (op, cap) = (op_id(&created), capsule_id(&created));
    let r = app
        .post_json(
            &format!("/v1/admin/operations/{op}/cancel"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.body["capsule"]["status"], "error");

    let destroy = app.delete(&format!("/v1/capsules/{cap}"), &key).await;
    let destroy_op = op_id(&destroy.body);
    let r = app
        .post_json(
            &format!("/v1/admin/operations/{destroy_op}/cancel"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    r.assert_error(StatusCode::CONFLICT, "invalid_state");
    assert_eq!(app.capsule(cap).await.status, CapsuleStatus::Stopping);
}

#[tokio::test]
async fn drain_cordons_the_host_and_lists_its_capsules() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let (host, _) = app.register_host("host-a").await;
    let cap = app.make_running(&app.create_capsule(&key).await).await;
    app.place_on(cap, host.parse::<HostId>().unwrap()).await;

    let path = format!("/v1/admin/hosts/{host}/drain");
    app.post_json(&path, &key, json!({}))
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");
    let r = app.post_json(&path, ADMIN_KEY, json!({})).await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.body["host"]["cordoned"], true);
    let drained_at = r.body["host"]["drain_requested_at"].clone();
    assert!(drained_at.is_string());
    let remaining = r.body["capsules"].as_array().unwrap();
    assert_eq!(remaining.len(), 1);
    assert_eq!(remaining[0]["id"], cap.to_string());
    assert!(audit_actions(&app).await.contains(&"host.drain".to_owned()));

    // A second drain keeps the first request's time; the listing shows it.
    let again = app.post_json(&path, ADMIN_KEY, json!({})).await;
    assert_eq!(again.body["host"]["drain_requested_at"], drained_at);
    let hosts = app.get("/v1/admin/hosts", ADMIN_KEY).await;
    assert_eq!(hosts.body["hosts"][0]["drain_requested_at"], drained_at);

    // Uncordoning ends the drain.
    let r = app
        .post_json(
            &format!("/v1/admin/hosts/{host}/uncordon"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.body["cordoned"], false);
    assert!(r.body["drain_requested_at"].is_null());
}
