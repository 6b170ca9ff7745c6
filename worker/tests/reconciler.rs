//! The reconciler against real Postgres, Redis and an in-process host agent over gRPC: one
//! `tick` at a time, asserting what it repaired in the database and on the host.

mod common;

use std::time::Duration;

use apalis::prelude::Data;
use apalis_cron::Tick;
use common::*;
use hangar_jobs::intents;
use hangar_jobs::store::hosts::{self, Usage};
use hangar_jobs::store::{capsules, operations};
use hangar_jobs::testing::TestEnv;
use hangar_jobs::{CapsuleStatus, OperationKind, OperationStatus, enqueue, keys};
use hangar_worker::{WorkerConfig, reconciler};
use tokio::sync::watch;

#[tokio::test]
async fn a_committed_but_never_pushed_operation_is_pushed_once() {
    let world = World::new().await;
    let ctx = world.ctx(|_| {});
    let accepted = world.create_intent().await;
    let op = accepted.operation.id;
    // The process "died" between commit and push.
    age(&world.env, op).await;
    assert_eq!(pushed(&world.env, op).await, (None, None));

    assert_eq!(reconciler::tick(&ctx).await.unwrap().pushed, 1);
    assert_eq!(
        world.env.queue.depth(OperationKind::Create).await.unwrap(),
        1
    );
    let (at, epoch) = pushed(&world.env, op).await;
    assert!(at.is_some(), "pushed_at not recorded");
    assert_eq!(epoch, Some(world.env.queue.epoch().await.unwrap()));

    assert_eq!(
        reconciler::tick(&ctx).await.unwrap().pushed,
        0,
        "pushed twice"
    );
    assert_eq!(
        world.env.queue.depth(OperationKind::Create).await.unwrap(),
        1
    );
    assert_eq!(pushed(&world.env, op).await.0, at);
    // Nothing else was touched: the operation waits for a worker.
    let mut conn = world.env.pool.acquire().await.unwrap();
    let row = operations::get(&mut conn, None, op).await.unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (OperationStatus::Queued, 0));
}

#[tokio::test]
async fn an_operation_whose_worker_died_is_pushed_again_once_its_lease_expires() {
    let world = World::new().await;
    let ctx = world.ctx(|_| {});
    let accepted = world.create_intent().await;
    let op = accepted.operation.id;
    assert!(
        enqueue::push_committed(
            &world.env.pool,
            &world.env.queue,
            &[(OperationKind::Create, op)]
        )
        .await
    );
    // A worker claims it and dies: its lease (zero long) is over at once.
    let mut conn = world.env.pool.acquire().await.unwrap();
    let claimed = operations::claim(&mut conn, op, "dead-worker", 0.0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claimed.status, OperationStatus::Running);
    drop(conn);

    assert_eq!(reconciler::tick(&ctx).await.unwrap().pushed, 1);
    assert_eq!(
        world.env.queue.depth(OperationKind::Create).await.unwrap(),
        2,
        "the dead worker's entry and the new one"
    );
    assert_eq!(reconciler::tick(&ctx).await.unwrap().pushed, 0);
    // Whoever reads the new entry may take the operation over.
    let mut conn = world.env.pool.acquire().await.unwrap();
    let taken = operations::claim(&mut conn, op, "live-worker", 30.0)
        .await
        .unwrap();
    assert_eq!(taken.map(|o| o.attempts), Some(2));
}

#[tokio::test]
async fn jobs_pushed_into_a_redis_that_lost_its_data_are_pushed_again() {
    let world = World::new().await;
    let ctx = world.ctx(|_| {});
    let capsule = world.capsule(&[CapsuleStatus::Running]).await;
    let accepted = world.pause_intent(&capsule).await;
    assert!(
        enqueue::push_committed(
            &world.env.pool,
            &world.env.queue,
            &[(OperationKind::Pause, accepted.operation.id)]
        )
        .await
    );
    assert_eq!(
        reconciler::tick(&ctx).await.unwrap().pushed,
        0,
        "a healthy queue is left alone"
    );

    // Redis restarts empty: its epoch and streams are gone.
    let mut redis = world.env.queue.connection();
    let prefix = world.env.queue.prefix().to_owned();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut redis)
        .await
        .unwrap();

    assert_eq!(reconciler::tick(&ctx).await.unwrap().pushed, 1);
    assert_eq!(
        world.env.queue.depth(OperationKind::Pause).await.unwrap(),
        1
    );
    assert_eq!(reconciler::tick(&ctx).await.unwrap().pushed, 0);
}

#[tokio::test]
async fn a_vm_no_capsule_owns_is_destroyed_after_the_grace_period() {
    let mut world = World::new().await;
    let stopped = world
        .capsule(&[
            CapsuleStatus::Running,
            CapsuleStatus::Stopping,
            CapsuleStatus::Stopped,
        ])
        .await;
    let live = world.capsule(&[CapsuleStatus::Running]).await;
    let stranger = hangar_jobs::CapsuleId::new().to_string();
    for id in [
        stopped.id.to_string(),
        live.id.to_string(),
        stranger.clone(),
    ] {
        world.vm(&id).await;
    }

    let patient = world.ctx(|c| c.orphan_grace_secs = 3_600.0);
    assert_eq!(
        reconciler::tick(&patient).await.unwrap().orphans_destroyed,
        0
    );
    assert_eq!(world.vms().await.len(), 3);

    let eager = world.ctx(|c| c.orphan_grace_secs = 0.0);
    assert_eq!(reconciler::tick(&eager).await.unwrap().orphans_destroyed, 2);
    assert_eq!(world.vms().await, vec![live.id.to_string()]);
    assert_eq!(world.reload(&live).await.status, CapsuleStatus::Running);
}

#[tokio::test]
async fn a_running_capsule_whose_vm_vanished_goes_to_error() {
    let mut world = World::new().await;
    let vanished = world.capsule(&[CapsuleStatus::Running]).await;
    let vanished_paused = world
        .capsule(&[
            CapsuleStatus::Running,
            CapsuleStatus::Pausing,
            CapsuleStatus::Paused,
        ])
        .await;
    let busy = world.capsule(&[CapsuleStatus::Running]).await;
    let healthy = world.capsule(&[CapsuleStatus::Running]).await;
    world.vm(&healthy.id.to_string()).await;
    // `busy` has a pause in flight (and no VM): the job, not the reconciler, decides.
    let busy = world.pause_intent(&busy).await.capsule;

    let patient = world.ctx(|c| c.missing_grace_secs = 3_600.0);
    assert_eq!(
        reconciler::tick(&patient).await.unwrap().capsules_missing,
        0
    );
    assert_eq!(world.reload(&vanished).await.status, CapsuleStatus::Running);

    let ctx = world.ctx(|c| c.missing_grace_secs = 0.0);
    let repairs = reconciler::tick(&ctx).await.unwrap();
    assert_eq!(repairs.capsules_missing, 2);
    for capsule in [&vanished, &vanished_paused] {
        let after = world.reload(capsule).await;
        assert_eq!(after.status, CapsuleStatus::Error);
        assert!(after.status_reason.unwrap().contains("missing"));
    }
    let busy_after = world.reload(&busy).await;
    assert_eq!(
        (busy_after.status, busy_after.generation),
        (CapsuleStatus::Pausing, busy.generation)
    );
    assert_eq!(world.reload(&healthy).await.status, CapsuleStatus::Running);
    assert_eq!(world.vms().await, vec![healthy.id.to_string()]);
    // Settled: the next tick has nothing to do.
    assert_eq!(reconciler::tick(&ctx).await.unwrap().capsules_missing, 0);
}

#[tokio::test]
async fn a_silent_host_makes_its_capsules_unknown_until_it_returns() {
    let mut world = World::new().await;
    let alive = world.capsule(&[CapsuleStatus::Running]).await;
    let gone = world.capsule(&[CapsuleStatus::Running]).await;
    // A pause was under way when the host fell silent (its VM is gone too).
    let pausing = world.capsule(&[CapsuleStatus::Running]).await;
    let pause = world.pause_intent(&pausing).await.operation.id;
    world.vm(&alive.id.to_string()).await;
    // The last heartbeat is a minute old (rather than waiting past a tiny limit).
    sqlx::query("update host_heartbeats set last_heartbeat_at = now() - interval '1 minute'")
        .execute(&world.env.pool)
        .await
        .unwrap();

    let ctx = world.ctx(|c| c.host_silent_secs = 30.0);
    let repairs = reconciler::tick(&ctx).await.unwrap();
    assert_eq!(
        (repairs.hosts_unreachable, repairs.capsules_unknown),
        (1, 3)
    );
    assert_eq!(world.host_status().await, "unreachable");
    for capsule in [&alive, &gone, &pausing] {
        let unknown = world.reload(capsule).await;
        assert_eq!(unknown.status, CapsuleStatus::Unknown);
        assert_eq!(unknown.status_reason.as_deref(), Some("host unreachable"));
    }
    // While it stays silent, nothing more happens.
    let repairs = reconciler::tick(&ctx).await.unwrap();
    assert_eq!(
        (repairs.hosts_unreachable, repairs.capsules_unknown),
        (0, 0)
    );
    // Placement avoids it.
    let mut conn = world.env.pool.acquire().await.unwrap();
    let newcomer = world.create_intent().await.capsule;
    assert_eq!(
        hosts::place(&mut conn, newcomer.id, 1, 128, None)
            .await
            .unwrap(),
        None
    );
    drop(conn);

    let mut conn = world.env.pool.acquire().await.unwrap();
    let came_back = hosts::heartbeat(
        &mut conn,
        world.host,
        Usage {
            vcpus_used: 1,
            memory_mb_used: 128,
        },
    )
    .await
    .unwrap();
    assert!(came_back);
    drop(conn);
    assert_eq!(world.host_status().await, "healthy");
    let repairs = reconciler::tick(&ctx).await.unwrap();
    assert_eq!(
        (repairs.capsules_restored, repairs.capsules_missing),
        (1, 1)
    );
    assert_eq!(world.reload(&alive).await.status, CapsuleStatus::Running);
    let gone = world.reload(&gone).await;
    assert_eq!(gone.status, CapsuleStatus::Error);
    assert!(gone.status_reason.unwrap().contains("gone"));
    // The pause still in flight decides for its capsule first.
    assert_eq!(world.reload(&pausing).await.status, CapsuleStatus::Unknown);
    // The VM that survived is still there; nothing was destroyed.
    assert_eq!(world.vms().await, vec![alive.id.to_string()]);

    // Once the pause is settled (its capsule moved on: superseded), the next tick repairs.
    let mut conn = world.env.pool.acquire().await.unwrap();
    let outcome = operations::Outcome {
        status: OperationStatus::Cancelled,
        error_code: Some("superseded"),
        error: None,
        result: None,
    };
    assert!(
        operations::finish(&mut conn, pause, None, outcome)
            .await
            .unwrap()
    );
    drop(conn);
    assert_eq!(reconciler::tick(&ctx).await.unwrap().capsules_missing, 1);
    assert_eq!(world.reload(&pausing).await.status, CapsuleStatus::Error);
}

#[tokio::test]
async fn a_transient_status_past_its_deadline_is_settled() {
    let world = World::new().await;
    let stuck = world
        .capsule(&[CapsuleStatus::Running, CapsuleStatus::Pausing])
        .await;
    let busy = world.capsule(&[CapsuleStatus::Running]).await;
    let busy = world.pause_intent(&busy).await.capsule;
    for capsule in [&stuck, &busy] {
        world
            .sql(
                "update capsules set status_deadline = now() - interval '1 second' where id = $1",
                capsule,
            )
            .await;
    }

    let ctx = world.ctx(|_| {});
    assert_eq!(reconciler::tick(&ctx).await.unwrap().deadlines_settled, 1);
    let settled = world.reload(&stuck).await;
    assert_eq!(settled.status, CapsuleStatus::Error);
    assert!(settled.status_reason.unwrap().contains("deadline"));
    assert_eq!(
        world.reload(&busy).await.status,
        CapsuleStatus::Pausing,
        "its operation decides"
    );
}

#[tokio::test]
async fn a_capsule_past_its_timeout_is_paused() {
    let mut world = World::new().await;
    let expired = world.capsule(&[CapsuleStatus::Running]).await;
    let fresh = world.capsule(&[CapsuleStatus::Running]).await;
    let busy = world.capsule(&[CapsuleStatus::Running]).await;
    for capsule in [&expired, &fresh, &busy] {
        world.vm(&capsule.id.to_string()).await;
    }
    // `busy` has a host report waiting to be applied: an operation in flight.
    let mut tx = world.env.pool.begin().await.unwrap();
    let report = intents::host_report(
        &mut tx,
        &busy,
        serde_json::json!({ "kind": "auto_paused", "message": "idle" }),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    for capsule in [&expired, &busy] {
        world
            .sql(
                "update capsules set expires_at = now() - interval '1 second' where id = $1",
                capsule,
            )
            .await;
    }

    let ctx = world.ctx(|_| {});
    assert_eq!(reconciler::tick(&ctx).await.unwrap().auto_paused, 1);
    assert_eq!(world.reload(&expired).await.status, CapsuleStatus::Pausing);
    assert_eq!(world.reload(&fresh).await.status, CapsuleStatus::Running);
    assert_eq!(world.reload(&busy).await.status, CapsuleStatus::Running);
    let busy_ops = world.operations_of(&busy).await;
    assert!(
        busy_ops.iter().all(|o| o.kind != OperationKind::Pause),
        "a pause was queued beside the report"
    );
    assert!(busy_ops.iter().any(|o| o.id == report.id));
    let ops = world.operations_of(&expired).await;
    let pause = ops
        .iter()
        .find(|o| o.kind == OperationKind::Pause)
        .expect("a pause operation");
    assert_eq!(pause.status, OperationStatus::Queued);
    assert_eq!(pause.params["reason"], "timeout");
    assert!(pushed(&world.env, pause.id).await.0.is_some(), "not pushed");
    assert_eq!(
        world.env.queue.depth(OperationKind::Pause).await.unwrap(),
        1
    );
    // The next tick does not pause it twice.
    assert_eq!(reconciler::tick(&ctx).await.unwrap().auto_paused, 0);
    assert_eq!(world.operations_of(&expired).await.len(), ops.len());
    assert_eq!(
        world.env.queue.depth(OperationKind::Pause).await.unwrap(),
        1
    );
    // The VMs are untouched until the pause job runs.
    assert_eq!(world.vms().await.len(), 3);
}

/// Two worker processes on one Redis get the same cron ticks: one of them runs each tick.
/// Each process here talks to a database of its own holding one lost operation, so which
/// of them ran a tick shows in which operation got pushed.
#[tokio::test]
async fn each_tick_runs_in_one_process_only() {
    let a = TestEnv::new().await;
    let b = TestEnv::new().await;
    let ops = [
        create_intent(&a).await.operation.id,
        create_intent(&b).await.operation.id,
    ];
    age(&a, ops[0]).await;
    age(&b, ops[1]).await;
    let config = |name: &str| WorkerConfig {
        name: Some(format!("{name}-{}", keys::random_hex(3))),
        ..WorkerConfig::default()
    };
    // Same Redis prefix (`a.queue`), different databases.
    let contexts = [
        hangar_worker::context(a.pool.clone(), a.queue.clone(), config("alpha")),
        hangar_worker::context(b.pool.clone(), a.queue.clone(), config("beta")),
    ];
    let names = [contexts[0].worker.clone(), contexts[1].worker.clone()];
    let envs = [&a, &b];
    let tick = |ctx: &hangar_worker::JobContext, at: u64| {
        reconciler::run_tick(Tick::new(at), Data::new(ctx.clone()))
    };
    let at = 1_000_000;

    // Both processes get the tick at once: one runs it.
    tokio::join!(tick(&contexts[0], at), tick(&contexts[1], at));
    let done = [pushed(&a, ops[0]).await.0, pushed(&b, ops[1]).await.0];
    let ran: Vec<usize> = (0..2).filter(|i| done[*i].is_some()).collect();
    assert_eq!(ran.len(), 1, "both or neither ran the tick: {done:?}");
    let (winner, loser) = (ran[0], 1 - ran[0]);
    let mut redis = a.queue.connection();
    let key = format!("{}:reconciler:tick:{at}", a.queue.prefix());
    let holder: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(holder.as_deref(), Some(names[winner].as_str()));

    // The same tick seen late by the other process: already run.
    tick(&contexts[loser], at).await;
    assert_eq!(
        pushed(envs[loser], ops[loser]).await,
        (None, None),
        "{} ran a tick that had run",
        names[loser]
    );
    // The next tick is anybody's.
    tick(&contexts[loser], at + 1).await;
    assert!(pushed(envs[loser], ops[loser]).await.0.is_some());
    assert_eq!(a.queue.depth(OperationKind::Create).await.unwrap(), 2);
}

/// The apalis-cron worker ticks by itself: a lost push is repaired with no job running.
#[tokio::test]
async fn the_scheduled_reconciler_repairs_a_lost_push() {
    let world = World::new().await;
    let ctx = world.ctx(|c| c.reconcile_schedule = "* * * * * *".into());
    let op = world.create_intent().await.operation.id;
    age(&world.env, op).await;
    let (stop, stopped) = watch::channel(false);
    let worker = tokio::spawn(hangar_worker::run(ctx, stopped));
    settle_within(&world, op, Duration::from_secs(10)).await;
    stop_worker(stop, worker).await;
}

#[tokio::test]
async fn workers_run_a_capsule_through_its_life_and_leave_no_vm() {
    let mut world = World::new().await;
    let ctx = world.ctx(|_| {});
    let (stop, stopped) = watch::channel(false);
    let worker = tokio::spawn(hangar_worker::run(ctx, stopped));

    let accepted = create_intent_sized(&world.env, 2, 256).await;
    let capsule = accepted.capsule.id;
    enqueue::push_committed(
        &world.env.pool,
        &world.env.queue,
        &[(OperationKind::Create, accepted.operation.id)],
    )
    .await;
    settle(&world, accepted.operation.id).await;
    assert_eq!(world.vms().await, vec![capsule.to_string()]);

    for kind in [OperationKind::Pause, OperationKind::Destroy] {
        let mut tx = world.env.pool.begin().await.unwrap();
        let current = capsules::get(&mut tx, None, capsule)
            .await
            .unwrap()
            .unwrap();
        let op = intents::capsule_operation(&mut tx, current, kind, serde_json::json!({}), 5)
            .await
            .unwrap()
            .operation;
        tx.commit().await.unwrap();
        enqueue::push_committed(&world.env.pool, &world.env.queue, &[(kind, op.id)]).await;
        settle(&world, op.id).await;
    }
    let mut conn = world.env.pool.acquire().await.unwrap();
    let end = capsules::get(&mut conn, None, capsule)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end.status, CapsuleStatus::Stopped);
    assert!(world.vms().await.is_empty(), "a VM leaked");
    let host = hosts::get(&mut conn, world.host).await.unwrap().unwrap();
    assert_eq!(
        (host.vcpus_reserved, host.memory_mb_reserved),
        (0, 0),
        "the reservation was given back"
    );

    stop_worker(stop, worker).await;
}

// Bugs found while writing these tests: each test states the behaviour the design
// promises and fails today. Run them with `cargo test -p hangar-worker -- --ignored`.

/// The reconciler is level-triggered ("a missed tick or a crash mid-tick loses nothing"),
/// but `mark_silent_hosts` moves a silent host's capsules to `unknown` only in the tick
/// that flips the host to `unreachable`. If that tick dies after the flip (its own
/// statement, committed) and before the capsule moves, or a capsule's conditional move
/// loses a race (a job moved it meanwhile), no later tick looks at them again: they stay
/// `running` on an unreachable host for as long as it is gone.
#[tokio::test]
async fn capsules_on_a_host_already_marked_unreachable_become_unknown() {
    let mut world = World::new().await;
    let capsule = world.capsule(&[CapsuleStatus::Running]).await;
    world.vm(&capsule.id.to_string()).await;
    // The state a tick leaves when it dies right after marking the host unreachable.
    sqlx::query("update host_heartbeats set last_heartbeat_at = now() - interval '1 minute'")
        .execute(&world.env.pool)
        .await
        .unwrap();
    sqlx::query("update hosts set status = 'unreachable'")
        .execute(&world.env.pool)
        .await
        .unwrap();

    let ctx = world.ctx(|c| c.host_silent_secs = 30.0);
    reconciler::tick(&ctx).await.unwrap();
    assert_eq!(world.reload(&capsule).await.status, CapsuleStatus::Unknown);
}

/// A delivery whose claim fails (Postgres briefly unavailable: here, the worker's pool has
/// no free connection) is not acknowledged: it stays pending on the stream, is reclaimed,
/// and the operation completes once Postgres is back. (It used to be acked and lost, and
/// the request hung forever.)
#[tokio::test]
async fn a_job_whose_claim_failed_is_delivered_again() {
    let world = World::new().await;
    let accepted = world.create_intent().await;
    let op = accepted.operation.id;
    // The worker's own pool, one connection, held by the test while the job arrives.
    let starved = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_millis(300))
        .connect(&world.env.database_url)
        .await
        .unwrap();
    let held = starved.acquire().await.unwrap();
    let config = WorkerConfig {
        name: Some(format!("w-{}", keys::random_hex(3))),
        reconcile_schedule: "* * * * * *".into(),
        // Entries idle for twice the lease are reclaimed: keep the test short.
        lease_secs: 1.0,
        ..WorkerConfig::default()
    };
    let ctx = hangar_worker::context(starved.clone(), world.env.queue.clone(), config);
    let (stop, stopped) = watch::channel(false);
    let worker = tokio::spawn(hangar_worker::run(ctx, stopped));
    assert!(
        enqueue::push_committed(
            &world.env.pool,
            &world.env.queue,
            &[(OperationKind::Create, op)]
        )
        .await
    );
    // The worker reads the entry but cannot claim the operation: the entry stays pending.
    let stream = world.env.queue.stream_key(OperationKind::Create);
    let mut redis = world.env.queue.connection();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pending: (i64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
            .arg(&stream)
            .arg("workers")
            .query_async(&mut redis)
            .await
            .unwrap();
        if pending.0 >= 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Checked while the worker still has no connection: once it has one, it may claim at once.
    let mut conn = world.env.pool.acquire().await.unwrap();
    let row = operations::get(&mut conn, None, op).await.unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (OperationStatus::Queued, 0));
    drop(conn);
    drop(held);

    // Postgres is back, the worker and its reconciler run: the create should complete.
    settle_within(&world, op, Duration::from_secs(10)).await;
    stop_worker(stop, worker).await;
}
