use axum::http::Method;
use serde_json::json;

use super::{bad, run};
use crate::common::TestApp;

#[tokio::test]
async fn bad_capsule_requests_change_nothing() {
    const GET: Method = Method::GET;
    const POST: Method = Method::POST;
    const DELETE: Method = Method::DELETE;
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let (_, other) = app.team("other").await;
    let theirs = app.create_capsule(&other).await;
    let foreign = app.make_running(&theirs).await;
    let their_op = theirs["operation"]["id"].as_str().unwrap().to_owned();
    let mine = app.create_capsule(&key).await;
    let mine = mine["capsule"]["id"].as_str().unwrap().to_owned();
    let k = Some(key.as_str());
    let caps = "/v1/capsules";
    let big = format!(r#"{{"metadata": {{"k": "{}"}}}}"#, "x".repeat(70 * 1024));
    let many: serde_json::Map<_, _> = (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
    let many = json!({ "metadata": many }).to_string();
    let long_key = json!({"metadata": {"k".repeat(65): "v"}}).to_string();
    let long_value = json!({"metadata": {"k": "v".repeat(513)}}).to_string();
    let wrong_key = Some("hk_00000000_00000000000000000000000000000000");

    let cases = vec![
        // Bodies.
        bad(POST, caps, k, r#"{"vcpus": "#, "invalid_json"),
        bad(POST, caps, k, "[1, 2]", "invalid_json"),
        bad(POST, caps, k, r#"{"cpus": 2}"#, "invalid_json"),
        bad(POST, caps, k, r#"{"vcpus": "two"}"#, "invalid_json"),
        bad(POST, caps, k, r#"{"metadata": {"a": 1}}"#, "invalid_json"),
        bad(POST, caps, k, big, "payload_too_large"),
        // Ranges.
        bad(POST, caps, k, r#"{"vcpus": 0}"#, "invalid_request"),
        bad(POST, caps, k, r#"{"vcpus": 17}"#, "invalid_request"),
        bad(
            POST,
            caps,
            k,
            r#"{"vcpus": 99999999999}"#,
            "invalid_request",
        ),
        bad(POST, caps, k, r#"{"memory_mb": 127}"#, "invalid_request"),
        bad(POST, caps, k, r#"{"memory_mb": 16385}"#, "invalid_request"),
        bad(POST, caps, k, r#"{"timeout_sec": 9}"#, "invalid_request"),
        bad(
            POST,
            caps,
            k,
            r#"{"timeout_sec": 86401}"#,
            "invalid_request",
        ),
        bad(POST, caps, k, many, "invalid_request"),
        bad(POST, caps, k, long_key, "invalid_request"),
        bad(POST, caps, k, long_value, "invalid_request"),
        bad(POST, caps, k, r#"{"template": "nope"}"#, "unknown_template"),
        bad(POST, caps, k, r#"{"template": "../base"}"#, "invalid_name"),
        // Ids.
        bad(GET, "/v1/capsules/cap_123", k, "", "invalid_id"),
        bad(GET, format!("/v1/capsules/{their_op}"), k, "", "invalid_id"),
        bad(POST, "/v1/capsules/xyz/pause", k, "{}", "invalid_id"),
        bad(DELETE, "/v1/capsules/xyz", k, "", "invalid_id"),
        bad(GET, "/v1/operations/op_zz", k, "", "invalid_id"),
        // Another team's capsule.
        bad(GET, format!("/v1/capsules/{foreign}"), k, "", "not_found"),
        bad(
            POST,
            format!("/v1/capsules/{foreign}/pause"),
            k,
            "{}",
            "not_found",
        ),
        bad(
            DELETE,
            format!("/v1/capsules/{foreign}"),
            k,
            "",
            "not_found",
        ),
        bad(
            GET,
            format!("/v1/operations/{their_op}"),
            k,
            "",
            "not_found",
        ),
        // Lifecycle bodies.
        bad(
            POST,
            format!("/v1/capsules/{mine}/pause"),
            k,
            r#"{"force": true}"#,
            "invalid_json",
        ),
        bad(
            POST,
            format!("/v1/capsules/{mine}/snapshot"),
            k,
            "{}",
            "invalid_json",
        ),
        bad(
            POST,
            format!("/v1/capsules/{mine}/snapshot"),
            k,
            r#"{"name": "a/b"}"#,
            "invalid_name",
        ),
        bad(
            POST,
            format!("/v1/capsules/{mine}/keepalive"),
            k,
            r#"{"timeout_sec": 1}"#,
            "invalid_request",
        ),
        // Exec.
        bad(
            POST,
            format!("/v1/capsules/{mine}/exec"),
            k,
            "{}",
            "invalid_json",
        ),
        bad(
            POST,
            format!("/v1/capsules/{mine}/exec"),
            k,
            r#"{"argv": []}"#,
            "invalid_request",
        ),
        bad(
            POST,
            format!("/v1/capsules/{mine}/exec"),
            k,
            r#"{"argv": ["echo"], "timeout_sec": 0}"#,
            "invalid_request",
        ),
        bad(
            POST,
            format!("/v1/capsules/{mine}/exec"),
            k,
            r#"{"argv": ["echo"], "timeout_sec": 301}"#,
            "invalid_request",
        ),
        bad(
            POST,
            format!("/v1/capsules/{mine}/exec"),
            k,
            r#"{"argv": ["echo"], "max_output_bytes": 4194305}"#,
            "invalid_request",
        ),
        bad(
            POST,
            format!("/v1/capsules/{mine}/exec"),
            k,
            r#"{"argv": ["echo"], "env": {"1A": "x"}}"#,
            "invalid_request",
        ),
        bad(
            POST,
            format!("/v1/capsules/{mine}/exec"),
            k,
            r#"{"argv": ["echo"], "cwd": "tmp"}"#,
            "invalid_request",
        ),
        bad(
            POST,
            format!("/v1/capsules/{mine}/exec"),
            k,
            r#"{"argv": ["echo"]}"#,
            "invalid_state",
        ),
        bad(
            POST,
            format!("/v1/capsules/{foreign}/exec"),
            k,
            r#"{"argv": ["echo"]}"#,
            "not_found",
        ),
        bad(
            POST,
            "/v1/capsules/xyz/exec",
            k,
            r#"{"argv": ["echo"]}"#,
            "invalid_id",
        ),
        // Query strings.
        bad(GET, "/v1/capsules?limit=0", k, "", "invalid_request"),
        bad(GET, "/v1/capsules?limit=201", k, "", "invalid_request"),
        bad(GET, "/v1/capsules?limit=abc", k, "", "invalid_request"),
        bad(
            GET,
            "/v1/capsules?status=sleeping",
            k,
            "",
            "invalid_request",
        ),
        bad(GET, "/v1/capsules?cursor=op_1", k, "", "invalid_request"),
        bad(GET, "/v1/capsules?stauts=running", k, "", "invalid_request"),
        bad(GET, "/v1/operations?kind=reboot", k, "", "invalid_request"),
        bad(
            GET,
            format!("/v1/operations/{their_op}?wait=301"),
            Some(&other),
            "",
            "invalid_request",
        ),
        // Credentials.
        bad(POST, caps, None, "{}", "unauthorized"),
        bad(POST, caps, wrong_key, "{}", "unauthorized"),
        bad(POST, caps, wrong_key, r#"{"vcpus": "#, "unauthorized"),
        bad(GET, caps, None, "", "unauthorized"),
        bad(GET, caps, None, "", "unauthorized").header("authorization", format!("Basic {key}")),
        bad(POST, "/v1/admin/teams", k, r#"{"name": "x"}"#, "forbidden"),
        bad(GET, "/v1/admin/capsules", k, "", "forbidden"),
        bad(
            DELETE,
            format!("/v1/admin/capsules/{foreign}"),
            k,
            "",
            "forbidden",
        ),
        bad(GET, "/v1/admin/hosts", k, "", "forbidden"),
        // Headers, routes and methods.
        bad(POST, caps, k, "{}", "invalid_request").header("idempotency-key", "k".repeat(256)),
        bad(GET, "/v1/nothing", k, "", "not_found"),
        bad(Method::PUT, caps, k, "{}", "method_not_allowed"),
    ];
    run(&app, cases).await;
}
