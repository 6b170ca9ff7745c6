use axum::http::{StatusCode, header};
use hangar_jobs::{CapsuleStatus, OperationKind, OperationStatus};
use serde_json::json;

use crate::common::TestApp;

#[tokio::test]
async fn create_answers_202_with_a_handle_and_pushes_the_job() {
    let app = TestApp::new().await;
    let (team, key) = app.team("acme").await;
    let before = app.db_snapshot().await;

    let r = app.post_json("/v1/capsules", &key, json!({})).await;
    r.assert_status(StatusCode::ACCEPTED);
    let op = &r.body["operation"];
    let capsule = &r.body["capsule"];
    assert_eq!(op["kind"], "create");
    assert_eq!(op["status"], "queued");
    assert_eq!(op["max_attempts"], 5);
    assert_eq!(op["capsule_id"], capsule["id"]);
    assert_eq!(capsule["status"], "starting");
    assert_eq!(capsule["team_id"], team);
    // The base template's sizes and the default timeout.
    assert_eq!(capsule["vcpus"], 1);
    assert_eq!(capsule["memory_mb"], 128);
    assert_eq!(capsule["timeout_sec"], 300);
    assert_eq!(
        r.headers[header::LOCATION],
        format!("/v1/operations/{}", op["id"].as_str().unwrap())
    );

    let after = app.db_snapshot().await;
    assert_eq!(after["capsules"], before["capsules"] + 1);
    assert_eq!(after["operations"], before["operations"] + 1);
    assert_eq!(after["operations.pushed"], before["operations.pushed"] + 1);
    assert_eq!(after["audit_log"], before["audit_log"] + 1);
    assert_eq!(after["events"], before["events"] + 1);
    assert_eq!(app.stream_len(OperationKind::Create).await, 1);
    assert_eq!(app.stream_len(OperationKind::Pause).await, 0);
}

#[tokio::test]
async fn create_takes_sizes_timeout_and_metadata() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let r = app
        .post_json(
            "/v1/capsules",
            &key,
            json!({"template": "base", "vcpus": 16, "memory_mb": 16384, "timeout_sec": 86400,
                   "metadata": {"owner": "ci", "run": "42"}}),
        )
        .await;
    r.assert_status(StatusCode::ACCEPTED);
    let c = &r.body["capsule"];
    assert_eq!(c["vcpus"], 16);
    assert_eq!(c["memory_mb"], 16384);
    assert_eq!(c["timeout_sec"], 86400);
    assert_eq!(c["metadata"], json!({"owner": "ci", "run": "42"}));
}

#[tokio::test]
async fn get_and_list_with_pagination_and_status_filter() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            app.create_capsule(&key).await["capsule"]["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let got = app.get(&format!("/v1/capsules/{}", ids[0]), &key).await;
    got.assert_status(StatusCode::OK);
    assert_eq!(got.body["id"], ids[0]);

    // Newest first, two per page.
    let page1 = app.get("/v1/capsules?limit=2", &key).await;
    page1.assert_status(StatusCode::OK);
    let listed: Vec<_> = page1.body["capsules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(listed, vec![json!(ids[2]), json!(ids[1])]);
    assert_eq!(page1.body["next_cursor"], ids[1]);
    let page2 = app
        .get(&format!("/v1/capsules?limit=2&cursor={}", ids[1]), &key)
        .await;
    let listed: Vec<_> = page2.body["capsules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(listed, vec![json!(ids[0])]);
    assert!(page2.body["next_cursor"].is_null());

    let created = app.create_capsule(&key).await;
    app.make_running(&created).await;
    let running = app.get("/v1/capsules?status=running", &key).await;
    assert_eq!(running.body["capsules"].as_array().unwrap().len(), 1);
    assert_eq!(running.body["capsules"][0]["id"], created["capsule"]["id"]);
}

#[tokio::test]
async fn lifecycle_happy_path() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let created = app.create_capsule(&key).await;
    let id = app.make_running(&created).await;
    let path = format!("/v1/capsules/{id}");

    // Pause (no body at all).
    let r = app.post_raw(&format!("{path}/pause"), Some(&key), "").await;
    r.assert_status(StatusCode::ACCEPTED);
    assert_eq!(r.body["operation"]["kind"], "pause");
    assert_eq!(r.body["capsule"]["status"], "pausing");
    assert!(r.headers.contains_key(header::LOCATION));
    assert_eq!(app.stream_len(OperationKind::Pause).await, 1);
    app.finish(
        r.body["operation"]["id"].as_str().unwrap().parse().unwrap(),
        OperationStatus::Succeeded,
    )
    .await;
    app.transition(id, CapsuleStatus::Paused).await;

    // Resume (an empty object).
    let r = app
        .post_json(&format!("{path}/resume"), &key, json!({}))
        .await;
    r.assert_status(StatusCode::ACCEPTED);
    assert_eq!(r.body["capsule"]["status"], "resuming");
    assert_eq!(app.stream_len(OperationKind::Resume).await, 1);
    app.finish(
        r.body["operation"]["id"].as_str().unwrap().parse().unwrap(),
        OperationStatus::Succeeded,
    )
    .await;
    app.transition(id, CapsuleStatus::Running).await;

    // Snapshot, then destroy.
    let r = app
        .post_json(
            &format!("{path}/snapshot"),
            &key,
            json!({"name": "golden", "keep": false}),
        )
        .await;
    r.assert_status(StatusCode::ACCEPTED);
    let params = &r.body["operation"]["params"];
    assert_eq!(params["name"], "golden");
    assert_eq!(params["destroy_after"], true);
    assert_eq!(params["prior_status"], "running");
    assert!(params["template_id"].as_str().unwrap().starts_with("tpl_"));
    assert!(params.get("platform").is_none());
    assert_eq!(r.body["capsule"]["status"], "snapshotting");
    assert_eq!(app.stream_len(OperationKind::Snapshot).await, 1);
    app.finish(
        r.body["operation"]["id"].as_str().unwrap().parse().unwrap(),
        OperationStatus::Succeeded,
    )
    .await;
    app.transition(id, CapsuleStatus::Running).await;

    // Keepalive: the given timeout, then the capsule's own.
    let r = app
        .post_json(
            &format!("{path}/keepalive"),
            &key,
            json!({"timeout_sec": 600}),
        )
        .await;
    r.assert_status(StatusCode::OK);
    assert!(r.body["expires_at"].is_string());
    assert_eq!(app.capsule(id).await.timeout_sec, 600);
    let r = app
        .post_raw(&format!("{path}/keepalive"), Some(&key), "")
        .await;
    r.assert_status(StatusCode::OK);
    assert_eq!(app.capsule(id).await.timeout_sec, 600);

    // Destroy; a second destroy returns the first one's handle.
    let first = app.delete(&path, &key).await;
    first.assert_status(StatusCode::ACCEPTED);
    assert_eq!(first.body["operation"]["kind"], "destroy");
    assert_eq!(first.body["capsule"]["status"], "stopping");
    let before = app.db_snapshot().await;
    let second = app.delete(&path, &key).await;
    second.assert_status(StatusCode::ACCEPTED);
    assert_eq!(
        second.body["operation"]["id"],
        first.body["operation"]["id"]
    );
    assert_eq!(app.stream_len(OperationKind::Destroy).await, 1);
    let after = app.db_snapshot().await;
    assert_eq!(after["operations"], before["operations"]);
}

#[tokio::test]
async fn pause_of_a_starting_capsule_is_invalid_state() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let created = app.create_capsule(&key).await;
    let id = created["capsule"]["id"].as_str().unwrap();
    let before = app.db_snapshot().await;
    app.post_json(&format!("/v1/capsules/{id}/pause"), &key, json!({}))
        .await
        .assert_error(StatusCode::CONFLICT, "invalid_state");
    app.post_json(&format!("/v1/capsules/{id}/resume"), &key, json!({}))
        .await
        .assert_error(StatusCode::CONFLICT, "invalid_state");
    assert_eq!(app.db_snapshot().await, before);
}

#[tokio::test]
async fn a_second_request_while_one_is_in_flight_gets_its_id() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let created = app.create_capsule(&key).await;
    let id = app.make_running(&created).await;
    let first = app
        .post_json(&format!("/v1/capsules/{id}/pause"), &key, json!({}))
        .await;
    first.assert_status(StatusCode::ACCEPTED);
    let before = app.db_snapshot().await;

    let again = app
        .post_json(&format!("/v1/capsules/{id}/pause"), &key, json!({}))
        .await;
    again.assert_error(StatusCode::CONFLICT, "operation_in_progress");
    assert_eq!(
        again.body["error"]["operation_id"],
        first.body["operation"]["id"]
    );

    // The VM is paused but the job has not finished: a resume waits for it too.
    app.transition(id, CapsuleStatus::Paused).await;
    let before_resume = app.db_snapshot().await;
    let resume = app
        .post_json(&format!("/v1/capsules/{id}/resume"), &key, json!({}))
        .await;
    resume.assert_error(StatusCode::CONFLICT, "operation_in_progress");
    assert_eq!(
        resume.body["error"]["operation_id"],
        first.body["operation"]["id"]
    );
    assert_eq!(app.db_snapshot().await, before_resume);
    assert_eq!(before["operations"], before_resume["operations"]);
}

#[tokio::test]
async fn destroy_is_accepted_while_another_operation_is_in_flight() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let created = app.create_capsule(&key).await;
    let id = app.make_running(&created).await;
    let pause = app
        .post_json(&format!("/v1/capsules/{id}/pause"), &key, json!({}))
        .await;
    pause.assert_status(StatusCode::ACCEPTED);

    let destroy = app.delete(&format!("/v1/capsules/{id}"), &key).await;
    destroy.assert_status(StatusCode::ACCEPTED);
    assert_eq!(destroy.body["operation"]["kind"], "destroy");
    assert_ne!(
        destroy.body["operation"]["id"],
        pause.body["operation"]["id"]
    );
    // It waits behind the pause: the capsule is still pausing.
    assert_eq!(destroy.body["capsule"]["status"], "pausing");
    assert_eq!(app.stream_len(OperationKind::Destroy).await, 1);

    // Also during the create.
    let other = app.create_capsule(&key).await;
    let r = app
        .delete(
            &format!("/v1/capsules/{}", other["capsule"]["id"].as_str().unwrap()),
            &key,
        )
        .await;
    r.assert_status(StatusCode::ACCEPTED);
    assert_eq!(r.body["capsule"]["status"], "starting");
}

#[tokio::test]
async fn a_stopped_capsule_cannot_be_destroyed_again() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let created = app.create_capsule(&key).await;
    let id = app.make_running(&created).await;
    let destroy = app.delete(&format!("/v1/capsules/{id}"), &key).await;
    app.finish(
        destroy.body["operation"]["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap(),
        OperationStatus::Succeeded,
    )
    .await;
    app.transition(id, CapsuleStatus::Stopped).await;
    let before = app.db_snapshot().await;
    app.delete(&format!("/v1/capsules/{id}"), &key)
        .await
        .assert_error(StatusCode::CONFLICT, "invalid_state");
    app.post_json(&format!("/v1/capsules/{id}/keepalive"), &key, json!({}))
        .await
        .assert_error(StatusCode::CONFLICT, "invalid_state");
    assert_eq!(app.db_snapshot().await, before);
}

#[tokio::test]
async fn teams_are_isolated() {
    let app = TestApp::new().await;
    let (_, a) = app.team("team-a").await;
    let (_, b) = app.team("team-b").await;
    let created = app.create_capsule(&a).await;
    let id = app.make_running(&created).await;
    let op = created["operation"]["id"].as_str().unwrap();
    let before = app.db_snapshot().await;

    let listed = app.get("/v1/capsules", &b).await;
    assert_eq!(listed.body["capsules"], json!([]));
    let ops = app.get("/v1/operations", &b).await;
    assert_eq!(ops.body["operations"], json!([]));
    app.get(&format!("/v1/capsules/{id}"), &b)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    app.get(&format!("/v1/operations/{op}"), &b)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    app.get(&format!("/v1/operations/{op}?wait=30"), &b)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    for action in ["pause", "resume", "keepalive"] {
        app.post_json(&format!("/v1/capsules/{id}/{action}"), &b, json!({}))
            .await
            .assert_error(StatusCode::NOT_FOUND, "not_found");
    }
    app.post_json(
        &format!("/v1/capsules/{id}/snapshot"),
        &b,
        json!({"name": "x"}),
    )
    .await
    .assert_error(StatusCode::NOT_FOUND, "not_found");
    app.delete(&format!("/v1/capsules/{id}"), &b)
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
    assert_eq!(app.db_snapshot().await, before);

    // The owner still sees it all.
    assert_eq!(
        app.get("/v1/capsules", &a).await.body["capsules"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    app.get(&format!("/v1/operations/{op}"), &a)
        .await
        .assert_status(StatusCode::OK);
}

#[tokio::test]
async fn templates_are_listed() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let r = app.get("/v1/templates", &key).await;
    r.assert_status(StatusCode::OK);
    let names: Vec<_> = r.body["templates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("base")]);
}

#[tokio::test]
async fn concurrent_destroys_conflict_instead_of_failing() {
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let created = app.create_capsule(&key).await;
    let id = app.make_running(&created).await;
    // With a pause in flight a destroy inserts its row without moving the capsule, so
    // concurrent destroys meet at the one-destroy index.
    app.post_json(&format!("/v1/capsules/{id}/pause"), &key, json!({}))
        .await
        .assert_status(StatusCode::ACCEPTED);
    let path = format!("/v1/capsules/{id}");
    let responses = futures::future::join_all((0..4).map(|_| app.delete(&path, &key))).await;
    let mut handles = std::collections::BTreeSet::new();
    for r in &responses {
        match r.status {
            StatusCode::ACCEPTED => {
                handles.insert(r.body["operation"]["id"].as_str().unwrap().to_owned());
            }
            _ => r.assert_error(StatusCode::CONFLICT, "invalid_state"),
        }
    }
    assert_eq!(handles.len(), 1, "{responses:#?}");
    let destroys = app
        .get(
            &format!("/v1/operations?capsule_id={id}&kind=destroy"),
            &key,
        )
        .await;
    assert_eq!(destroys.body["operations"].as_array().unwrap().len(), 1);
}
