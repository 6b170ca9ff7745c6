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

async fn reserved(env: &TestEnv, host: HostId) -> (i32, i32) {
    let mut conn = env.pool.acquire().await.unwrap();
    let host = hosts::get(&mut conn, host).await.unwrap().unwrap();
    (host.vcpus_reserved, host.memory_mb_reserved)
}

/// The host each capsule was recorded on, straight from the table.
async fn placements(env: &TestEnv) -> Vec<(uuid::Uuid, Option<uuid::Uuid>)> {
    sqlx::query_as("select id, host_id from capsules order by id")
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

/// Places each capsule from its own task, on its own pool connection, all at once.
async fn place_concurrently(env: &TestEnv, ids: &[CapsuleId]) -> Vec<Option<HostId>> {
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(ids.len()));
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| {
            let (pool, id, start) = (env.pool.clone(), *id, start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let mut conn = pool.acquire().await.unwrap();
                hosts::place(&mut conn, id, 1, 128, None).await.unwrap()
            })
        })
        .collect();
    let mut placed = Vec::new();
    for task in tasks {
        placed.push(task.await.unwrap());
    }
    placed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_never_overbook_a_host() {
    let env = TestEnv::new().await;
    let host = host(&env, "small", 10).await;
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(capsule(&env).await);
    }
    // The pool holds 20 connections: the 40 statements really overlap.
    let placed = place_concurrently(&env, &ids).await;

    assert_eq!(placed.iter().filter(|p| p.is_some()).count(), 10);
    assert!(placed.iter().flatten().all(|h| *h == host));
    assert_eq!(reserved(&env, host).await, (10, 10 * 128));
    // Exactly the capsules whose placement succeeded carry the host, and nothing else does.
    let recorded = placements(&env).await;
    let with_host: Vec<_> = recorded.iter().filter(|(_, h)| h.is_some()).collect();
    assert_eq!(with_host.len(), 10);
    assert!(with_host.iter().all(|(_, h)| *h == Some(host.0)));
    for (id, outcome) in ids.iter().zip(&placed) {
        let row = recorded.iter().find(|(c, _)| *c == id.0).unwrap();
        assert_eq!(row.1, outcome.map(|h| h.0), "capsule {id}");
    }
    let mut conn = env.pool.acquire().await.unwrap();
    assert_eq!(capsules::on_host(&mut conn, host).await.unwrap().len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_fill_two_hosts_to_exactly_their_capacity() {
    let env = TestEnv::new().await;
    let a = host(&env, "a", 7).await;
    let b = host(&env, "b", 5).await;
    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(capsule(&env).await);
    }
    let placed = place_concurrently(&env, &ids).await;

    assert_eq!(placed.iter().filter(|p| **p == Some(a)).count(), 7);
    assert_eq!(placed.iter().filter(|p| **p == Some(b)).count(), 5);
    assert_eq!(placed.iter().filter(|p| p.is_none()).count(), 18);
    assert_eq!(reserved(&env, a).await, (7, 7 * 128));
    assert_eq!(reserved(&env, b).await, (5, 5 * 128));
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
    // The second call places nothing (today it answers `None`; its doc promises the host).
    let again = hosts::place(&mut conn, id, 1, 128, None).await.unwrap();
    assert!(again.is_none() || again == Some(host), "{again:?}");
    drop(conn);
    assert_eq!(reserved(&env, host).await, (1, 128));
    assert_eq!(placements(&env).await, vec![(id.0, Some(host.0))]);
}

/// The same capsule placed from two connections at once (a create whose lease expired
/// while its first attempt was still placing, taken over by a second worker) must still
/// reserve room once.
///
/// Fails today: `hosts::place` reserves in a data-modifying CTE and records the host in the
/// outer `update capsules ... where host_id is null`. The CTE's guard
/// `exists (select 1 from capsules where id = $1 and host_id is null)` is read in the
/// statement's snapshot, so a statement that waited on the host row's lock (held by the
/// winner) still sees the capsule unplaced once the lock is granted: it increments the
/// host's reservation, and its outer update then finds `host_id` set and changes nothing.
/// The reservation leaks (vcpus_reserved 2 for one 1-vCPU capsule) and is never released.
/// To make the interleaving certain, the test holds the host row lock until both
/// statements are waiting on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn placing_one_capsule_concurrently_reserves_once() {
    let env = TestEnv::new().await;
    let host = host(&env, "h", 64).await;
    let id = capsule(&env).await;
    let mut gate = env.pool.begin().await.unwrap();
    sqlx::query("select 1 from hosts where id = $1 for update")
        .bind(host.0)
        .execute(&mut *gate)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..2)
        .map(|_| {
            let pool = env.pool.clone();
            tokio::spawn(async move {
                let mut conn = pool.acquire().await.unwrap();
                hosts::place(&mut conn, id, 1, 128, None).await.unwrap()
            })
        })
        .collect();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_stat_activity
             where datname = current_database() and wait_event_type = 'Lock'
               and query like '%place_capsule(%'",
        )
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if waiting == 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{waiting} waiting");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    gate.commit().await.unwrap();
    let mut placed = Vec::new();
    for task in tasks {
        placed.push(task.await.unwrap());
    }

    assert_eq!(placed.iter().filter(|p| p.is_some()).count(), 1);
    assert_eq!(placements(&env).await, vec![(id.0, Some(host.0))]);
    assert_eq!(reserved(&env, host).await, (1, 128), "reservation leaked");
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
    assert_eq!(
        hosts::place(&mut conn, id, 1, 128, Some(silent))
            .await
            .unwrap(),
        None
    );
    drop(conn);
    assert_eq!(reserved(&env, cordoned).await, (0, 0));
    assert_eq!(reserved(&env, silent).await, (0, 0));
    assert_eq!(placements(&env).await, vec![(id.0, None)]);

    // A template's snapshot host is honoured: only that host is considered.
    let healthy = host(&env, "healthy", 10).await;
    let mut conn = env.pool.acquire().await.unwrap();
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
    drop(conn);
    assert_eq!(reserved(&env, healthy).await, (1, 128));
    assert_eq!(reserved(&env, cordoned).await, (0, 0));
}
