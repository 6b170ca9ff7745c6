//! `POST /v1/capsules/{id}/exec` across real processes (api, worker, a sim agent whose
//! simulated guest runs `echo`): the answer, a command that does not exist, a paused
//! capsule, and an Idempotency-Key replaying the first answer. The same path on real VMs is
//! in `vm.rs`.

mod common;

use common::{ADMIN_KEY, Cluster};
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_in_running_capsules_only() {
    let mut cluster = Cluster::start().await;
    cluster.spawn_worker("worker", &[]);
    cluster.spawn_agent("host-1", &[]).await;
    let (op, capsule) = cluster.create_capsule("base").await;
    assert_eq!(cluster.wait_operation(&op).await["status"], "succeeded");
    let path = format!("/v1/capsules/{capsule}/exec");

    let (status, body) = cluster
        .request(
            Method::POST,
            &path,
            Some(json!({ "argv": ["echo", "hi", "there"] })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stdout"], "hi there\n");
    assert_eq!(body["exit_code"], 0);
    assert_eq!(body["timed_out"], false);

    let (status, body) = cluster
        .request(Method::POST, &path, Some(json!({ "argv": ["ls", "/"] })))
        .await;
    assert_eq!(
        (status, body["exit_code"].as_i64()),
        (200, Some(127)),
        "{body}"
    );

    // Replayed, not run again: the stored answer comes back, and only one audit row is new.
    let audited = || async {
        sqlx::query_scalar::<_, i64>("select count(*) from audit_log where action = 'capsule.exec'")
            .fetch_one(&cluster.env.pool)
            .await
            .unwrap()
    };
    let before = audited().await;
    let send = || {
        cluster
            .http
            .post(format!("{}{path}", cluster.api_url))
            .bearer_auth(ADMIN_KEY)
            .header("idempotency-key", "exec-once")
            .json(&json!({ "argv": ["echo", "once"] }))
            .send()
    };
    let first: serde_json::Value = send().await.unwrap().json().await.unwrap();
    let second: serde_json::Value = send().await.unwrap().json().await.unwrap();
    assert_eq!(first, second);
    assert_eq!(audited().await, before + 1);

    let (op, _) = cluster
        .accepted(&format!("/v1/capsules/{capsule}/pause"), json!({}))
        .await;
    assert_eq!(cluster.wait_operation(&op).await["status"], "succeeded");
    let (status, body) = cluster
        .request(Method::POST, &path, Some(json!({ "argv": ["echo", "hi"] })))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("invalid_state")),
        "{body}"
    );
}
