//! Crash tests: processes killed with SIGKILL mid-operation, pushes that fail, agents that
//! go away. Nothing is lost, nothing runs twice, nothing leaks.

mod common;

use std::time::Duration;

use common::Cluster;
use hangar_jobs::store::operations;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_create_leaves_exactly_one_vm() {
    let mut cluster = Cluster::start().await;
    // A slow create, so the kill lands while the agent call is in flight.
    cluster
        .spawn_agent("host-1", &[("HANGAR_SIM_LATENCY_MS", "2000")])
        .await;
    cluster.spawn_worker("doomed", &[("HANGAR_LEASE_SECS", "2")]);

    let (op, capsule) = cluster.create_capsule("base").await;
    let op_id = op.parse().unwrap();
    cluster
        .wait_until(
            "the doomed worker claims the create",
            Duration::from_secs(20),
            |c| {
                Box::pin(async move {
                    let mut conn = c.env.pool.acquire().await.unwrap();
                    let op = operations::get(&mut conn, None, op_id)
                        .await
                        .unwrap()
                        .unwrap();
                    op.status.as_str() == "running"
                })
            },
        )
        .await;
    cluster.kill("doomed");
    cluster.spawn_worker("survivor", &[("HANGAR_LEASE_SECS", "2")]);

    let done = cluster.wait_operation(&op).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(
        done["attempts"].as_i64().unwrap() >= 2,
        "the survivor took it over: {done}"
    );
    assert_eq!(cluster.capsule(&capsule).await["status"], "running");
    assert_eq!(cluster.sandboxes_on("host-1").await, vec![capsule.clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_push_after_commit_is_pushed_by_the_reconciler() {
    let mut cluster = Cluster::start().await;
    cluster.spawn_agent("host-1", &[]).await;
    // Break the create stream: a key of the wrong type makes every XADD to it fail.
    let stream = cluster
        .env
        .queue
        .stream_key(hangar_jobs::OperationKind::Create);
    let mut redis = cluster.env.queue.connection();
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&stream)
        .arg("not a stream")
        .query_async(&mut redis)
        .await
        .unwrap();

    let (op, capsule) = cluster.create_capsule("base").await;
    let mut conn = cluster.env.pool.acquire().await.unwrap();
    let pushed: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("select pushed_at from operations where id = $1")
            .bind(op.parse::<hangar_jobs::OperationId>().unwrap().0)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
    assert!(pushed.is_none(), "the push should have failed");

    // Redis heals (the stream is gone); workers recreate it, the reconciler re-pushes.
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut redis)
        .await
        .unwrap();
    cluster.spawn_worker("worker", &[]);
    let done = cluster.wait_operation(&op).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(cluster.capsule(&capsule).await["status"], "running");
}

async fn running_capsule(cluster: &Cluster) -> String {
    let (op, capsule) = cluster.create_capsule("base").await;
    assert_eq!(cluster.wait_operation(&op).await["status"], "succeeded");
    capsule
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_retries_while_the_agent_is_down_and_succeeds_when_it_returns() {
    // Attempts are fixed per operation when the API accepts it.
    let mut cluster = Cluster::start_with(&[("HANGAR_MAX_ATTEMPTS", "1000")]).await;
    cluster.spawn_agent("host-1", &[]).await;
    cluster.spawn_worker("worker", &[("HANGAR_RETRY_CAP_MS", "300")]);
    let capsule = running_capsule(&cluster).await;

    cluster.kill("host-1");
    let (op, _) = cluster
        .accepted(&format!("/v1/capsules/{capsule}/pause"), json!({}))
        .await;
    let op_id = op.parse().unwrap();
    cluster
        .wait_until("the pause is retrying", Duration::from_secs(20), |c| {
            Box::pin(async move {
                let mut conn = c.env.pool.acquire().await.unwrap();
                let op = operations::get(&mut conn, None, op_id)
                    .await
                    .unwrap()
                    .unwrap();
                op.attempts >= 2
            })
        })
        .await;
    // The agent comes back with its state folder: the VM is still there.
    cluster.spawn_agent("host-1", &[]).await;
    let done = cluster.wait_operation(&op).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(cluster.capsule(&capsule).await["status"], "paused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_fails_with_a_reason_when_the_agent_never_returns() {
    let mut cluster = Cluster::start_with(&[("HANGAR_MAX_ATTEMPTS", "3")]).await;
    cluster.spawn_agent("host-1", &[]).await;
    cluster.spawn_worker(
        "worker",
        &[
            ("HANGAR_RETRY_BASE_MS", "50"),
            ("HANGAR_RETRY_CAP_MS", "100"),
        ],
    );
    let capsule = running_capsule(&cluster).await;

    cluster.kill("host-1");
    let (op, _) = cluster
        .accepted(&format!("/v1/capsules/{capsule}/pause"), json!({}))
        .await;
    let done = cluster.wait_operation(&op).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error_code"], "attempts_exhausted");
    assert_eq!(done["attempts"], 3);
    let after = cluster.capsule(&capsule).await;
    assert_eq!(after["status"], "error");
    let reason = after["status_reason"].as_str().unwrap();
    assert!(
        reason.contains("pause failed") && reason.contains("3 attempts"),
        "{reason}"
    );
    // Each failure is logged once, where it is handled: one line per retried attempt (2),
    // one for the failure, none at error level anywhere else for this operation.
    let log = cluster.log("worker");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains(&op)).collect();
    let retries = lines
        .iter()
        .filter(|l| l.contains("transient failure; retrying"));
    assert_eq!(retries.count(), 2, "{lines:#?}");
    let errors: Vec<_> = lines.iter().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains("operation failed"), "{errors:#?}");
}
