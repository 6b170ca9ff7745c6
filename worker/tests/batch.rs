//! The batched create path against real Postgres, Redis and an in-process sim agent: a
//! batch mixing creates that succeed, creates that find no room, a create whose capsule
//! moved on and a create with a destroy waiting behind it settles each one exactly as the
//! one-at-a-time path would.

mod common;

use std::time::Duration;

use common::*;
use hangar_jobs::intents;
use hangar_jobs::store::{Operation, capsules, hosts, records};
use hangar_jobs::{CapsuleStatus, OperationId, OperationKind, OperationStatus, enqueue};
use tokio::sync::watch;

async fn create(world: &World, vcpus: i32) -> intents::Accepted {
    create_intent_sized(&world.env, vcpus, 256).await
}

async fn wait_terminal(world: &World, op: OperationId) -> Operation {
    common::wait_terminal(world, op, Duration::from_secs(30)).await
}

#[tokio::test]
async fn a_mixed_batch_of_creates_settles_each_as_alone() {
    let mut world = World::new().await; // a 64-vCPU host
    // Ten creates of 8 vCPUs: eight fit, two find no room (which ones depends on the
    // placement order). The first has a destroy waiting behind it, and a stale one is a
    // create whose capsule moved on.
    let sized = create_many(&world, 10, 8).await;
    let doomed = &sized[0];
    let stale = create(&world, 1).await;
    sqlx::query("update capsules set generation = generation + 1 where id = $1")
        .bind(stale.capsule.id.0)
        .execute(&world.env.pool)
        .await
        .unwrap();
    let destroy = {
        let mut tx = world.env.pool.begin().await.unwrap();
        let op = intents::capsule_operation(
            &mut tx,
            doomed.capsule.clone(),
            OperationKind::Destroy,
            serde_json::json!({}),
            3,
        )
        .await
        .unwrap()
        .operation;
        tx.commit().await.unwrap();
        op
    };
    let creates: Vec<_> = sized
        .iter()
        .chain(std::iter::once(&stale))
        .map(|a| (OperationKind::Create, a.operation.id))
        .collect();
    // Everything is queued before the worker starts, so it reads one batch of 11.
    enqueue::push_committed(&world.env.pool, &world.env.queue, &creates).await;
    let ctx = world.ctx(|c| c.concurrency = 64);
    let (stop, stopped) = watch::channel(false);
    let worker = tokio::spawn(hangar_worker::run(ctx, stopped));

    let mut placed = Vec::new();
    let mut refused = 0;
    for accepted in &sized {
        let op = wait_terminal(&world, accepted.operation.id).await;
        match op.status {
            OperationStatus::Succeeded => {
                assert_eq!(op.attempts, 1);
                assert!(op.result.unwrap()["host_id"].is_string());
                placed.push(accepted.capsule.id);
            }
            _ => {
                assert_eq!(
                    (op.status, op.error_code.as_deref()),
                    (OperationStatus::Failed, Some("capacity_unavailable")),
                    "{op:?}"
                );
                refused += 1;
            }
        }
    }
    // Two find no room in the batch; one of them may find the room the destroy gave back
    // when it retries placement alone.
    assert_eq!(placed.len() + refused, 10);
    assert!((1..=2).contains(&refused), "{refused} refused");
    let op = wait_terminal(&world, stale.operation.id).await;
    assert_eq!(
        (op.status, op.error_code.as_deref()),
        (OperationStatus::Cancelled, Some("superseded"))
    );
    // The destroy that waited behind its create was woken and ran.
    assert_eq!(
        wait_terminal(&world, destroy.id).await.status,
        OperationStatus::Succeeded
    );

    let mut conn = world.env.pool.acquire().await.unwrap();
    let mut running = Vec::new();
    for accepted in &sized {
        let capsule = capsules::get(&mut conn, None, accepted.capsule.id)
            .await
            .unwrap()
            .unwrap();
        if capsule.id == doomed.capsule.id {
            assert_eq!(capsule.status, CapsuleStatus::Stopped);
        } else if placed.contains(&capsule.id) {
            assert_eq!(capsule.status, CapsuleStatus::Running);
            // One transition, one event.
            let events = records::capsule_events(&mut conn, capsule.id, 10)
                .await
                .unwrap();
            let moves: Vec<_> = events
                .iter()
                .filter(|e| e.kind == "status_changed")
                .map(|e| (e.from_status.as_deref(), e.to_status.as_deref()))
                .collect();
            assert_eq!(moves, vec![(Some("starting"), Some("running"))]);
            running.push(capsule.id.to_string());
        } else {
            assert_eq!(capsule.status, CapsuleStatus::Error);
            assert!(capsule.host_id.is_none());
        }
    }

    // Nothing leaked: the host holds exactly the running capsules, in Postgres and on the agent.
    let host = hosts::get(&mut conn, world.host).await.unwrap().unwrap();
    let n = running.len() as i32;
    assert_eq!(
        (host.vcpus_reserved, host.memory_mb_reserved),
        (8 * n, 256 * n)
    );
    let mut vms = world.vms().await;
    vms.sort();
    running.sort();
    assert_eq!(vms, running);

    stop_worker(stop, worker).await;
}

/// `n` create intents of `vcpus` each, committed one after the other (ids in order).
async fn create_many(world: &World, n: usize, vcpus: i32) -> Vec<intents::Accepted> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(create(world, vcpus).await);
    }
    out
}
