//! The built binary as separate processes (api, two workers, one sim agent), driven over
//! HTTP through a capsule's whole life.

mod common;

use common::Cluster;
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_pause_resume_snapshot_destroy_across_processes() {
    let mut cluster = Cluster::start().await;
    cluster.spawn_worker("worker-a", &[]);
    cluster.spawn_worker("worker-b", &[]);
    cluster
        .spawn_agent("host-1", &[("HANGAR_SIM_LATENCY_MS", "20")])
        .await;

    let (op, capsule) = cluster.create_capsule("base").await;
    let done = cluster.wait_operation(&op).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(cluster.capsule(&capsule).await["status"], "running");

    let (op, _) = cluster
        .accepted(&format!("/v1/capsules/{capsule}/pause"), json!({}))
        .await;
    assert_eq!(cluster.wait_operation(&op).await["status"], "succeeded");
    assert_eq!(cluster.capsule(&capsule).await["status"], "paused");

    let (op, _) = cluster
        .accepted(&format!("/v1/capsules/{capsule}/resume"), json!({}))
        .await;
    assert_eq!(cluster.wait_operation(&op).await["status"], "succeeded");
    assert_eq!(cluster.capsule(&capsule).await["status"], "running");

    let (op, _) = cluster
        .accepted(
            &format!("/v1/capsules/{capsule}/snapshot"),
            json!({ "name": "with-tools", "keep": true }),
        )
        .await;
    let snap = cluster.wait_operation(&op).await;
    assert_eq!(snap["status"], "succeeded", "{snap}");
    assert_eq!(cluster.capsule(&capsule).await["status"], "running");
    let templates = cluster.admin_get("/v1/templates").await;
    assert!(
        templates["templates"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "with-tools"),
        "{templates}"
    );

    // A capsule restored from the new template lands on the host that holds the snapshot.
    let (op, restored) = cluster.create_capsule("with-tools").await;
    assert_eq!(cluster.wait_operation(&op).await["status"], "succeeded");
    assert_eq!(cluster.capsule(&restored).await["status"], "running");

    for id in [&capsule, &restored] {
        let (status, body) = cluster
            .request(Method::DELETE, &format!("/v1/capsules/{id}"), None)
            .await;
        assert_eq!(status, 202, "{body}");
        let op = body["operation"]["id"].as_str().unwrap().to_owned();
        assert_eq!(cluster.wait_operation(&op).await["status"], "succeeded");
        assert_eq!(cluster.capsule(id).await["status"], "stopped");
    }
    assert!(
        cluster.sandboxes_on("host-1").await.is_empty(),
        "a VM leaked"
    );

    // Both workers took part (each claims from the shared consumer group).
    let mut conn = cluster.env.pool.acquire().await.unwrap();
    let events =
        hangar_jobs::store::records::capsule_events(&mut conn, capsule.parse().unwrap(), 100)
            .await
            .unwrap();
    let path: Vec<_> = events.iter().filter_map(|e| e.to_status.clone()).collect();
    for status in [
        "starting",
        "running",
        "pausing",
        "paused",
        "resuming",
        "snapshotting",
        "stopping",
        "stopped",
    ] {
        assert!(
            path.iter().any(|s| s == status),
            "no {status} event in {path:?}"
        );
    }
}
