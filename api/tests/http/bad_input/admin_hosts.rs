use axum::http::Method;
use hangar_jobs::{CapsuleId, HostId, TeamId};
use serde_json::json;

use super::{bad, run};
use crate::common::{ADMIN_KEY, JOIN_TOKEN, TestApp};

#[tokio::test]
async fn bad_admin_requests_change_nothing() {
    const GET: Method = Method::GET;
    const POST: Method = Method::POST;
    let app = TestApp::new().await;
    let (team, key) = app.team("acme").await;
    let created = app.create_capsule(&key).await;
    let cap = created["capsule"]["id"].as_str().unwrap().to_owned();
    let a = Some(ADMIN_KEY);
    let long_name = json!({"name": "t".repeat(65)}).to_string();

    let mut cases = vec![
        bad(
            POST,
            "/v1/admin/teams",
            a,
            r#"{"name": "acme"}"#,
            "name_taken",
        ),
        bad(
            POST,
            "/v1/admin/teams",
            a,
            r#"{"name": ""}"#,
            "invalid_name",
        ),
        bad(POST, "/v1/admin/teams", a, long_name, "invalid_name"),
        bad(
            POST,
            "/v1/admin/teams",
            a,
            r#"{"name": "x", "plan": "pro"}"#,
            "invalid_json",
        ),
        bad(
            POST,
            format!("/v1/admin/teams/{}/keys", TeamId::new()),
            a,
            r#"{"name": "k"}"#,
            "not_found",
        ),
        bad(
            POST,
            format!("/v1/admin/teams/{team}/keys"),
            a,
            r#"{"name": "k", "admin": true}"#,
            "invalid_request",
        ),
        bad(
            POST,
            "/v1/admin/teams/acme/keys",
            a,
            r#"{"name": "k"}"#,
            "invalid_id",
        ),
        bad(
            POST,
            format!("/v1/admin/hosts/{}/cordon", HostId::new()),
            a,
            "",
            "not_found",
        ),
        bad(
            GET,
            "/v1/admin/capsules?team_id=acme",
            a,
            "",
            "invalid_request",
        ),
        bad(
            GET,
            "/v1/admin/capsules?host_id=h",
            a,
            "",
            "invalid_request",
        ),
        bad(
            GET,
            format!("/v1/admin/capsules/{}", CapsuleId::new()),
            a,
            "",
            "not_found",
        ),
        bad(
            POST,
            "/v1/admin/capsules",
            a,
            r#"{"vcpus": 64}"#,
            "invalid_request",
        ),
    ];
    // Admin snapshot names.
    for name in [
        "a/b",
        "a\\b",
        "..",
        "x..y",
        "a\u{1}b",
        "tab\t",
        &"n".repeat(65),
        "",
    ] {
        let path = format!("/v1/admin/capsules/{cap}/snapshot");
        cases.push(bad(
            POST,
            path,
            a,
            json!({ "name": name }).to_string(),
            "invalid_name",
        ));
    }
    run(&app, cases).await;
}

#[tokio::test]
async fn bad_host_requests_change_nothing() {
    const POST: Method = Method::POST;
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let (host_a, token_a) = app.register_host("host-a").await;
    let (host_b, _) = app.register_host("host-b").await;
    let created = app.create_capsule(&key).await;
    let cap = created["capsule"]["id"].as_str().unwrap().to_owned();
    let t = Some(token_a.as_str());
    let beat_a = format!("/v1/hosts/{host_a}/heartbeat");
    let heartbeat = json!({
        "vcpus_total": 8, "memory_mb_total": 8192, "vcpus_used": 0, "memory_mb_used": 0,
        "sandboxes": 0,
    });
    let negative = json!({
        "vcpus_total": 8, "memory_mb_total": 8192, "vcpus_used": -1, "memory_mb_used": 0,
        "sandboxes": 0,
    });
    let registration = |join: &str, name: &str| {
        json!({
            "join_token": join, "name": name, "address": "10.0.0.9:7070", "driver": "sim",
            "agent_token": "t", "vcpus": 1, "memory_mb": 1024,
        })
        .to_string()
    };
    let event = |sandbox: &str, kind: &str| {
        json!({"events": [{
            "event_id": uuid::Uuid::new_v4(), "sandbox_id": sandbox, "kind": kind,
            "message": "", "at_ms": 1,
        }]})
        .to_string()
    };
    let hb = heartbeat.to_string();
    let zeros = "0".repeat(64);

    let cases = vec![
        bad(
            POST,
            "/v1/hosts/register",
            None,
            registration("nope", "h"),
            "unauthorized",
        ),
        bad(
            POST,
            "/v1/hosts/register",
            None,
            registration(JOIN_TOKEN, "a/b"),
            "invalid_name",
        ),
        bad(
            POST,
            "/v1/hosts/register",
            None,
            r#"{"join_token": "x"}"#,
            "invalid_json",
        ),
        bad(POST, &beat_a, None, hb.clone(), "unauthorized"),
        bad(POST, &beat_a, Some(&zeros), hb.clone(), "unauthorized"),
        bad(POST, &beat_a, Some(&key), hb.clone(), "unauthorized"),
        bad(
            POST,
            format!("/v1/hosts/{host_b}/heartbeat"),
            t,
            hb.clone(),
            "forbidden",
        ),
        bad(
            POST,
            format!("/v1/hosts/{host_b}/events"),
            t,
            r#"{"events": []}"#,
            "forbidden",
        ),
        bad(POST, &beat_a, t, negative.to_string(), "invalid_request"),
        bad(POST, &beat_a, t, r#"{"vcpus_total": 8}"#, "invalid_json"),
        bad(
            POST,
            format!("/v1/hosts/{host_a}/events"),
            t,
            event(&cap, "rebooted"),
            "invalid_json",
        ),
        bad(POST, "/v1/hosts/h1/heartbeat", t, hb, "invalid_id"),
    ];
    run(&app, cases).await;
}
