use axum::http::StatusCode;
use hangar_jobs::{HostId, OperationKind};
use serde_json::json;

use crate::common::{JOIN_TOKEN, TestApp};

fn heartbeat() -> serde_json::Value {
    json!({"vcpus_total": 8, "memory_mb_total": 8192, "vcpus_used": 2, "memory_mb_used": 512, "sandboxes": 1})
}

#[tokio::test]
async fn register_is_idempotent_by_name_and_rotates_the_token() {
    let app = TestApp::new().await;
    let (id, token) = app.register_host("host-a").await;
    assert!(id.starts_with("host_"));
    assert_eq!(token.len(), 64);
    app.post_json(&format!("/v1/hosts/{id}/heartbeat"), &token, heartbeat())
        .await
        .assert_status(StatusCode::OK);

    let (again, new_token) = app.register_host("host-a").await;
    assert_eq!(again, id);
    assert_ne!(new_token, token);
    app.post_json(&format!("/v1/hosts/{id}/heartbeat"), &token, heartbeat())
        .await
        .assert_error(StatusCode::UNAUTHORIZED, "unauthorized");
    let r = app
        .post_json(
            &format!("/v1/hosts/{id}/heartbeat"),
            &new_token,
            heartbeat(),
        )
        .await;
    r.assert_status(StatusCode::OK);
    assert_eq!(r.body, json!({}));

    let host: HostId = id.parse().unwrap();
    let mut conn = app.env.pool.acquire().await.unwrap();
    let stored = hangar_jobs::store::hosts::get(&mut conn, host)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.vcpus_used, 2);
    assert_eq!(stored.memory_mb_used, 512);
    assert_eq!(stored.agent_token, "agent-secret");
    assert_eq!(stored.driver, "sim");
    let _ = JOIN_TOKEN;
}

#[tokio::test]
async fn events_become_host_event_jobs_once() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let (host, token) = app.register_host("host-a").await;
    let (other_host, _) = app.register_host("host-b").await;
    let created = app.create_capsule(&key).await;
    let capsule = app.make_running(&created).await;
    app.place_on(capsule, host.parse().unwrap()).await;
    let elsewhere = app.create_capsule(&key).await;
    let elsewhere = app.make_running(&elsewhere).await;
    app.place_on(elsewhere, other_host.parse().unwrap()).await;

    let event_id = uuid::Uuid::new_v4();
    let body = json!({"events": [
        {"event_id": event_id, "sandbox_id": capsule, "kind": "crashed", "message": "oom", "at_ms": 1_700_000_000_000i64},
        // Not on this host, and unknown: skipped.
        {"event_id": uuid::Uuid::new_v4(), "sandbox_id": elsewhere, "kind": "exited", "message": "", "at_ms": 1},
        {"event_id": uuid::Uuid::new_v4(), "sandbox_id": hangar_jobs::CapsuleId::new(), "kind": "auto_paused", "at_ms": 1},
        // No capsule id at all: acknowledged and skipped, never blocking the batch.
        {"event_id": uuid::Uuid::new_v4(), "sandbox_id": "vm-1", "kind": "crashed", "at_ms": 1},
    ]});
    let path = format!("/v1/hosts/{host}/events");
    let r = app.post_json(&path, &token, body.clone()).await;
    r.assert_status(StatusCode::ACCEPTED);
    assert_eq!(r.body, json!({"accepted": 1}));
    assert_eq!(app.stream_len(OperationKind::HostEvent).await, 1);

    let ops = app
        .get(
            &format!("/v1/operations?capsule_id={capsule}&kind=host_event"),
            &key,
        )
        .await;
    let ops = ops.body["operations"].as_array().unwrap();
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0]["params"]["kind"], "crashed");
    assert_eq!(ops[0]["params"]["message"], "oom");
    assert_eq!(ops[0]["params"]["event_id"], event_id.to_string());

    // A redelivery is skipped and changes nothing.
    let before = app.db_snapshot().await;
    let again = app.post_json(&path, &token, body).await;
    again.assert_status(StatusCode::ACCEPTED);
    assert_eq!(again.body, json!({"accepted": 0}));
    assert_eq!(app.db_snapshot().await, before);

    // An empty batch is fine.
    let empty = app.post_json(&path, &token, json!({"events": []})).await;
    assert_eq!(empty.body, json!({"accepted": 0}));
}
