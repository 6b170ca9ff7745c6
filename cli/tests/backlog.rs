//! A backlog far past the ~8,000 due jobs at which apalis-redis 1.0 stops fetching
//! (STACK.md) drains completely.

mod common;

use std::time::Duration;

use common::Cluster;
use hangar_jobs::intents::{self, CreateCapsule};
use hangar_jobs::store::tenancy::{self, PLATFORM_TEAM};
use hangar_jobs::{OperationKind, enqueue};

const BACKLOG: usize = 20_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_queued_creates_drain_completely() {
    let mut cluster = Cluster::start().await;
    cluster
        .spawn_agent(
            "host-1",
            &[
                ("HANGAR_AGENT_VCPUS", "100000"),
                ("HANGAR_AGENT_MEMORY_MB", "100000000"),
            ],
        )
        .await;

    // Queue the backlog before any worker runs, exactly as the API would (intent rows, then
    // pushes), in batches so the set-up is quick.
    let pool = cluster.env.pool.clone();
    let template = {
        let mut conn = pool.acquire().await.unwrap();
        tenancy::template_for_team(&mut conn, PLATFORM_TEAM, "base")
            .await
            .unwrap()
            .unwrap()
    };
    for _ in 0..BACKLOG / 1_000 {
        let mut tx = pool.begin().await.unwrap();
        let mut jobs = Vec::with_capacity(1_000);
        for _ in 0..1_000 {
            let accepted = intents::create_capsule(
                &mut tx,
                CreateCapsule {
                    team_id: PLATFORM_TEAM,
                    template: template.clone(),
                    vcpus: 1,
                    memory_mb: 128,
                    timeout_sec: 3_600,
                    metadata: serde_json::json!({}),
                    max_attempts: 5,
                },
            )
            .await
            .unwrap();
            jobs.push((OperationKind::Create, accepted.operation.id));
        }
        tx.commit().await.unwrap();
        assert!(enqueue::push_committed(&pool, &cluster.env.queue, &jobs).await);
    }
    assert_eq!(
        cluster
            .env
            .queue
            .depth(OperationKind::Create)
            .await
            .unwrap(),
        BACKLOG as u64
    );

    cluster.spawn_worker("worker", &[("HANGAR_WORKER_CONCURRENCY", "64")]);
    cluster
        .wait_until("the backlog drains", Duration::from_secs(600), |c| {
            Box::pin(async move {
                let succeeded: i64 = sqlx::query_scalar(
                "select count(*) from operations where kind = 'create' and status = 'succeeded'",
            )
            .fetch_one(&c.env.pool)
            .await
            .unwrap();
                succeeded == BACKLOG as i64
            })
        })
        .await;
    let running: i64 = sqlx::query_scalar("select count(*) from capsules where status = 'running'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(running, BACKLOG as i64);
    assert_eq!(
        cluster
            .env
            .queue
            .depth(OperationKind::Create)
            .await
            .unwrap(),
        0,
        "every entry acked"
    );
}
