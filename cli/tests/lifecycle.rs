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

    // A team key at work, then no secret of the run in any process's log: the admin key,
    // the team key, the join token, the agent's and the host's tokens.
    let (_, team) = cluster
        .request(
            Method::POST,
            "/v1/admin/teams",
            Some(json!({ "name": "acme" })),
        )
        .await;
    let team = team["id"].as_str().unwrap().to_owned();
    let (_, key) = cluster
        .request(
            Method::POST,
            &format!("/v1/admin/teams/{team}/keys"),
            Some(json!({ "name": "ci" })),
        )
        .await;
    let team_key = key["key"]
        .as_str()
        .expect("the key is shown once")
        .to_owned();
    let created = cluster
        .http
        .post(format!("{}/v1/capsules", cluster.api_url))
        .bearer_auth(&team_key)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 202);
    let hosts = hangar_jobs::store::hosts::list(&mut conn).await.unwrap();
    let mut secrets = vec![
        common::ADMIN_KEY.to_owned(),
        common::JOIN_TOKEN.to_owned(),
        team_key,
    ];
    secrets.extend(hosts.into_iter().map(|h| h.agent_token));
    let host_tokens = cluster.host_tokens();
    assert_eq!(host_tokens.len(), 1, "the agent's host token");
    secrets.extend(host_tokens);
    for process in ["api", "worker-a", "worker-b", "host-1"] {
        let log = cluster.log(process);
        assert!(!log.is_empty(), "no log of {process}");
        for secret in &secrets {
            assert!(
                !log.contains(secret.as_str()),
                "a secret is in the log of {process}"
            );
        }
    }
}
