use axum::http::Method;
use hangar_jobs::store::operations;
use hangar_jobs::{CapsuleStatus, HostId, OperationId, OperationStatus};

use super::{bad, run};
use crate::common::{ADMIN_KEY, TestApp};

#[tokio::test]
async fn bad_operator_actions_change_nothing() {
    const POST: Method = Method::POST;
    let app = TestApp::new().await;
    let (_, key) = app.team("acme").await;
    let (host, _) = app.register_host("host-a").await;
    // A queued create, a failed pause whose capsule is in error, and a running create.
    let queued = app.create_capsule(&key).await["operation"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let cap = app.make_running(&app.create_capsule(&key).await).await;
    let paused = app
        .post_json(
            &format!("/v1/capsules/{cap}/pause"),
            &key,
            serde_json::json!({}),
        )
        .await;
    let failed: OperationId = paused.body["operation"]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    app.finish(failed, OperationStatus::Failed).await;
    app.transition(cap, CapsuleStatus::Error).await;
    let running: OperationId = app.create_capsule(&key).await["operation"]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut conn = app.env.pool.acquire().await.unwrap();
    operations::claim(&mut conn, running, "w", 300.0)
        .await
        .unwrap()
        .unwrap();
    drop(conn);

    let a = Some(ADMIN_KEY);
    let k = Some(key.as_str());
    let unknown = OperationId::new();
    let mut cases = Vec::new();
    for action in ["retry", "cancel"] {
        cases.extend([
            bad(
                POST,
                format!("/v1/admin/operations/op_nope/{action}"),
                a,
                "",
                "invalid_id",
            ),
            bad(
                POST,
                format!("/v1/admin/operations/{unknown}/{action}"),
                a,
                "",
                "not_found",
            ),
            bad(
                POST,
                format!("/v1/admin/operations/{queued}/{action}"),
                k,
                "",
                "forbidden",
            ),
            bad(
                POST,
                format!("/v1/admin/operations/{queued}/{action}"),
                None,
                "",
                "unauthorized",
            ),
            bad(
                POST,
                format!("/v1/admin/operations/{queued}/{action}"),
                a,
                r#"{"force": true}"#,
                "invalid_json",
            ),
        ]);
    }
    cases.extend([
        // Not failed; failed but its capsule is in error.
        bad(
            POST,
            format!("/v1/admin/operations/{queued}/retry"),
            a,
            "",
            "invalid_state",
        ),
        bad(
            POST,
            format!("/v1/admin/operations/{failed}/retry"),
            a,
            "",
            "invalid_state",
        ),
        // Started, or finished: not cancellable.
        bad(
            POST,
            format!("/v1/admin/operations/{running}/cancel"),
            a,
            "",
            "invalid_state",
        ),
        bad(
            POST,
            format!("/v1/admin/operations/{failed}/cancel"),
            a,
            "",
            "invalid_state",
        ),
        bad(POST, "/v1/admin/hosts/h1/drain", a, "", "invalid_id"),
        bad(
            POST,
            format!("/v1/admin/hosts/{}/drain", HostId::new()),
            a,
            "",
            "not_found",
        ),
        bad(
            POST,
            format!("/v1/admin/hosts/{host}/drain"),
            k,
            "",
            "forbidden",
        ),
        bad(
            POST,
            format!("/v1/admin/hosts/{host}/drain"),
            a,
            r#"{"now": true}"#,
            "invalid_json",
        ),
    ]);
    run(&app, cases).await;
}
