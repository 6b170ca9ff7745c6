//! Placement under concurrency: creates racing for one host's capacity never overbook it.

use hangar_jobs::store::capsules::{self, NewCapsule};
use hangar_jobs::store::hosts::{self, Registration};
use hangar_jobs::store::tenancy::{self, PLATFORM_TEAM};
use hangar_jobs::testing::TestEnv;
use hangar_jobs::{CapsuleId, HostId, keys};

async fn host(env: &TestEnv, name: &str, vcpus: i32) -> HostId {
    let mut conn = env.pool.acquire().await.unwrap();
    let registration = Registration {
        name,
        address: "http://127.0.0.1:1",
        driver: "sim",
        token_hash: &keys::hash_secret(name),
        agent_token: "t",
        vcpus,
        memory_mb: 1_000_000,
    };
    hosts::register(&mut conn, registration).await.unwrap()
}

async fn capsule(env: &TestEnv) -> CapsuleId {
    let mut conn = env.pool.acquire().await.unwrap();
    let template = tenancy::template_for_team(&mut conn, PLATFORM_TEAM, "base")
        .await
        .unwrap()
        .unwrap();
    let new = NewCapsule {
        id: CapsuleId::new(),
        team_id: PLATFORM_TEAM,
        template_id: template.id,
        vcpus: 1,
        memory_mb: 128,
        timeout_sec: 60,
        metadata: serde_json::json!({}),
    };
    capsules::insert(&mut conn, new).await.unwrap().id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_never_overbook_a_host() {
    let env = TestEnv::new().await;
    let host = host(&env, "small", 10).await;
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(capsule(&env).await);
    }
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| {
            let (pool, id) = (env.pool.clone(), *id);
            tokio::spawn(async move {
                let mut conn = pool.acquire().await.unwrap();
                hosts::place(&mut conn, id, 1, 128, None).await.unwrap()
            })
        })
        .collect();
    let mut placed = 0;
    for task in tasks {
        if task.await.unwrap().is_some() {
            placed += 1;
        }
    }
    assert_eq!(placed, 10);
    let mut conn = env.pool.acquire().await.unwrap();
    assert_eq!(
        hosts::get(&mut conn, host)
            .await
            .unwrap()
            .unwrap()
            .vcpus_reserved,
        10
    );
    let on_host = capsules::on_host(&mut conn, host).await.unwrap();
    assert_eq!(on_host.len(), 10);
}

#[tokio::test]
async fn placing_a_capsule_twice_reserves_once() {
    let env = TestEnv::new().await;
    let host = host(&env, "h", 10).await;
    let id = capsule(&env).await;
    let mut conn = env.pool.acquire().await.unwrap();
    assert_eq!(
        hosts::place(&mut conn, id, 1, 128, None).await.unwrap(),
        Some(host)
    );
    assert_eq!(
        hosts::place(&mut conn, id, 1, 128, None).await.unwrap(),
        None
    );
    assert_eq!(
        hosts::get(&mut conn, host)
            .await
            .unwrap()
            .unwrap()
            .vcpus_reserved,
        1
    );
}

#[tokio::test]
async fn cordoned_and_unreachable_hosts_get_nothing() {
    let env = TestEnv::new().await;
    let cordoned = host(&env, "cordoned", 10).await;
    let silent = host(&env, "silent", 10).await;
    let mut conn = env.pool.acquire().await.unwrap();
    hosts::set_cordoned(&mut conn, cordoned, true)
        .await
        .unwrap();
    sqlx::query("update hosts set status = 'unreachable' where id = $1")
        .bind(silent.0)
        .execute(&mut *conn)
        .await
        .unwrap();
    let id = capsule(&env).await;
    assert_eq!(
        hosts::place(&mut conn, id, 1, 128, None).await.unwrap(),
        None
    );
    // A template's snapshot host is honoured: only that host is considered.
    let healthy = host(&env, "healthy", 10).await;
    assert_eq!(
        hosts::place(&mut conn, id, 1, 128, Some(cordoned))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        hosts::place(&mut conn, id, 1, 128, Some(healthy))
            .await
            .unwrap(),
        Some(healthy)
    );
}
