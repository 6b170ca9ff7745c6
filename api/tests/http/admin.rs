use axum::http::StatusCode;
use hangar_jobs::OperationKind;
use hangar_jobs::store::tenancy::PLATFORM_TEAM;
use serde_json::json;

use crate::common::{ADMIN_KEY, TestApp};

async fn audit_actions(app: &TestApp) -> Vec<String> {
    sqlx::query_scalar("select action from audit_log order by id")
        .fetch_all(&app.env.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn teams_and_keys() {
    let app = TestApp::new().await;
    let r = app
        .post_json("/v1/admin/teams", ADMIN_KEY, json!({"name": "acme"}))
        .await;
    r.assert_status(StatusCode::CREATED);
    assert_eq!(r.body["name"], "acme");
    assert_eq!(r.body["is_platform"], false);
    let team = r.body["id"].as_str().unwrap().to_owned();
    assert!(team.starts_with("team_"));

    let k = app
        .post_json(
            &format!("/v1/admin/teams/{team}/keys"),
            ADMIN_KEY,
            json!({"name": "ci"}),
        )
        .await;
    k.assert_status(StatusCode::CREATED);
    let secret = k.body["key"].as_str().unwrap();
    assert!(k.body["id"].as_str().unwrap().starts_with("key_"));
    assert!(secret.starts_with(k.body["prefix"].as_str().unwrap()));
    // The new key works, as its team, and is not an admin.
    app.get("/v1/capsules", secret)
        .await
        .assert_status(StatusCode::OK);
    app.get("/v1/admin/hosts", secret)
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");

    // Admin keys can be minted for the platform team only; they work on admin routes.
    let admin = app
        .post_json(
            &format!("/v1/admin/teams/{PLATFORM_TEAM}/keys"),
            ADMIN_KEY,
            json!({"name": "ops", "admin": true}),
        )
        .await;
    admin.assert_status(StatusCode::CREATED);
    app.get("/v1/admin/hosts", admin.body["key"].as_str().unwrap())
        .await
        .assert_status(StatusCode::OK);
    // A non-admin key of the platform team is not an admin.
    let plain = app
        .post_json(
            &format!("/v1/admin/teams/{PLATFORM_TEAM}/keys"),
            ADMIN_KEY,
            json!({"name": "p"}),
        )
        .await;
    app.get("/v1/admin/hosts", plain.body["key"].as_str().unwrap())
        .await
        .assert_error(StatusCode::FORBIDDEN, "forbidden");

    assert_eq!(
        audit_actions(&app).await,
        ["team.create", "key.create", "key.create", "key.create"]
    );
}

#[tokio::test]
async fn admin_capsule_routes_span_teams() {
    let app = TestApp::new().await;
    let (team, key) = app.team("acme").await;
    let theirs = app.create_capsule(&key).await;
    let theirs_id = app.make_running(&theirs).await;

    let ours = app
        .post_json("/v1/admin/capsules", ADMIN_KEY, json!({"vcpus": 2}))
        .await;
    ours.assert_status(StatusCode::ACCEPTED);
    assert_eq!(ours.body["capsule"]["team_id"], PLATFORM_TEAM.to_string());
    assert_eq!(app.stream_len(OperationKind::Create).await, 2);

    let all = app.get("/v1/admin/capsules", ADMIN_KEY).await;
    all.assert_status(StatusCode::OK);
    assert_eq!(all.body["capsules"].as_array().unwrap().len(), 2);
    let of_team = app
        .get(&format!("/v1/admin/capsules?team_id={team}"), ADMIN_KEY)
        .await;
    assert_eq!(of_team.body["capsules"].as_array().unwrap().len(), 1);
    assert_eq!(of_team.body["capsules"][0]["id"], theirs_id.to_string());
    let running = app
        .get("/v1/admin/capsules?status=running&limit=1", ADMIN_KEY)
        .await;
    assert_eq!(running.body["capsules"][0]["id"], theirs_id.to_string());
    assert_eq!(running.body["next_cursor"], theirs_id.to_string());
    // The platform team's own listing (team route) shows only its capsule.
    let own = app.get("/v1/capsules", ADMIN_KEY).await;
    assert_eq!(own.body["capsules"].as_array().unwrap().len(), 1);

    app.get(&format!("/v1/admin/capsules/{theirs_id}"), ADMIN_KEY)
        .await
        .assert_status(StatusCode::OK);

    // Snapshot as a platform template, then destroy.
    let snap = app
        .post_json(
            &format!("/v1/admin/capsules/{theirs_id}/snapshot"),
            ADMIN_KEY,
            json!({"name": "golden"}),
        )
        .await;
    snap.assert_status(StatusCode::ACCEPTED);
    let params = &snap.body["operation"]["params"];
    assert_eq!(params["platform"], true);
    assert_eq!(params["destroy_after"], true);
    assert_eq!(params["prior_status"], "running");
    assert_eq!(params["name"], "golden");
    assert_eq!(snap.body["operation"]["team_id"], team);
    assert_eq!(app.stream_len(OperationKind::Snapshot).await, 1);

    // Destroy (waits behind the snapshot).
    let destroy = app
        .delete(&format!("/v1/admin/capsules/{theirs_id}"), ADMIN_KEY)
        .await;
    destroy.assert_status(StatusCode::ACCEPTED);
    assert_eq!(destroy.body["operation"]["kind"], "destroy");
    // The team sees the operations on its capsule.
    let op = destroy.body["operation"]["id"].as_str().unwrap();
    app.get(&format!("/v1/operations/{op}"), &key)
        .await
        .assert_status(StatusCode::OK);

    assert_eq!(
        audit_actions(&app).await,
        [
            "team.create",
            "key.create",
            "capsule.create",
            "capsule.create",
            "capsule.snapshot",
            "capsule.destroy"
        ]
    );
}

#[tokio::test]
async fn hosts_are_listed_and_cordoned() {
    let app = TestApp::new().await;
    let (host, _) = app.register_host("host-a").await;
    let r = app.get("/v1/admin/hosts", ADMIN_KEY).await;
    r.assert_status(StatusCode::OK);
    let hosts = r.body["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 1);
    assert_eq!(hosts[0]["id"], host);
    assert_eq!(hosts[0]["cordoned"], false);
    assert!(hosts[0].get("agent_token").is_none());
    assert!(!r.body.to_string().contains("agent-secret"));

    let c = app
        .post_raw(
            &format!("/v1/admin/hosts/{host}/cordon"),
            Some(ADMIN_KEY),
            "",
        )
        .await;
    c.assert_status(StatusCode::OK);
    assert_eq!(c.body["cordoned"], true);
    let u = app
        .post_json(
            &format!("/v1/admin/hosts/{host}/uncordon"),
            ADMIN_KEY,
            json!({}),
        )
        .await;
    u.assert_status(StatusCode::OK);
    assert_eq!(u.body["cordoned"], false);
    assert_eq!(
        audit_actions(&app).await,
        ["host.register", "host.cordon", "host.uncordon"]
    );
}
