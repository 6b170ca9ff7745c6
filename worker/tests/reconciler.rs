//! The reconciler against real Postgres, Redis and an in-process host agent over gRPC: one
//! `tick` at a time, asserting what it repaired in the database and on the host.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hangar_jobs::intents::{self, CreateCapsule};
use hangar_jobs::store::hosts::{self, Registration, Usage};
use hangar_jobs::store::tenancy::{self, PLATFORM_TEAM};
use hangar_jobs::store::{Capsule, Operation, capsules, operations};
use hangar_jobs::testing::TestEnv;
use hangar_jobs::{
    CapsuleStatus, HostId, OperationId, OperationKind, OperationStatus, enqueue, keys,
};
use hangar_proto::host_agent_client::HostAgentClient;
use hangar_proto::{CreateSandboxRequest, ListSandboxesRequest};
use hangar_worker::{JobContext, WorkerConfig, reconciler};
use tokio::sync::watch;

type Bearer =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
type Client = HostAgentClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// A migrated database, a Redis namespace, an in-process sim agent registered as a host.
struct World {
    env: TestEnv,
    host: HostId,
    agent: Client,
    _stop: watch::Sender<bool>,
}

impl World {
    async fn new() -> World {
        let env = TestEnv::new().await;
        let state = std::env::temp_dir().join(format!("hangar-reconciler-{}", keys::random_hex(4)));
        let config = hangar_agent::AgentConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise_url: None,
            // Nothing listens there: registration retries in the background, harmlessly.
            control_plane_url: "http://127.0.0.1:9".into(),
            join_token: hangar_agent::secret::Secret::new("unused"),
            host_name: Some("host-1".into()),
            state_dir: state,
            driver: hangar_agent::DriverKind::Sim,
            vcpus: 64,
            memory_mb: 262_144,
            sim_latency_ms: 0,
            sim_jitter_ms: 0,
            sim_error_rate: 0.0,
            sim_hang_rate: 0.0,
            sim_crash_rate: 0.0,
            image_dir: ".hangar/image".into(),
            qemu: "qemu-system-x86_64".into(),
            accel: hangar_agent::AccelSetting::Auto,
            heartbeat_interval_ms: 60_000,
        };
        let agent = hangar_agent::Agent::bind(config).await.unwrap();
        let address = format!("http://{}", agent.local_addr());
        let token = agent.agent_token().expose().to_owned();
        let (stop, mut stopped) = watch::channel(false);
        tokio::spawn(agent.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        let mut conn = env.pool.acquire().await.unwrap();
        let host = hosts::register(
            &mut conn,
            Registration {
                name: "host-1",
                address: &address,
                driver: "sim",
                token_hash: &keys::hash_secret("host-token"),
                agent_token: &token,
                vcpus: 64,
                memory_mb: 262_144,
            },
        )
        .await
        .unwrap();
        let channel = tonic::transport::Endpoint::from_shared(address)
            .unwrap()
            .connect_lazy();
        let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        let interceptor: Bearer = Box::new(move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        });
        World {
            env,
            host,
            agent: HostAgentClient::with_interceptor(channel, interceptor),
            _stop: stop,
        }
    }

    fn ctx(&self, tune: impl FnOnce(&mut WorkerConfig)) -> JobContext {
        let mut config = WorkerConfig {
            name: Some(format!("w-{}", keys::random_hex(3))),
            ..WorkerConfig::default()
        };
        tune(&mut config);
        hangar_worker::context(self.env.pool.clone(), self.env.queue.clone(), config)
    }

    /// A capsule placed on the host, moved through `path` of statuses (from `starting`).
    async fn capsule(&self, path: &[CapsuleStatus]) -> Capsule {
        let mut tx = self.env.pool.begin().await.unwrap();
        let template = tenancy::template_for_team(&mut tx, PLATFORM_TEAM, "base")
            .await
            .unwrap()
            .unwrap();
        let accepted = intents::create_capsule(
            &mut tx,
            CreateCapsule {
                team_id: PLATFORM_TEAM,
                template,
                vcpus: 1,
                memory_mb: 128,
                timeout_sec: 3_600,
                metadata: serde_json::json!({}),
                max_attempts: 5,
            },
        )
        .await
        .unwrap();
        // The create is settled: only the capsule matters here.
        operations::finish(
            &mut tx,
            accepted.operation.id,
            None,
            operations::Outcome {
                status: OperationStatus::Succeeded,
                error_code: None,
                error: None,
                result: None,
            },
        )
        .await
        .unwrap();
        capsules::assign_host(&mut tx, accepted.capsule.id, self.host)
            .await
            .unwrap();
        let mut capsule = accepted.capsule;
        for to in path {
            capsule = capsules::transition(
                &mut tx,
                capsule.id,
                capsule.status,
                capsule.generation,
                *to,
                None,
            )
            .await
            .unwrap()
            .unwrap();
        }
        tx.commit().await.unwrap();
        capsule
    }

    async fn vm(&mut self, id: &str) {
        let request = CreateSandboxRequest {
            sandbox_id: id.into(),
            vcpus: 1,
            memory_mb: 128,
            image: "base".into(),
            ..Default::default()
        };
        self.agent.create_sandbox(request).await.unwrap();
    }

    async fn vms(&mut self) -> Vec<String> {
        let list = self
            .agent
            .list_sandboxes(ListSandboxesRequest {})
            .await
            .unwrap()
            .into_inner();
        list.sandboxes.into_iter().map(|s| s.sandbox_id).collect()
    }

    async fn reload(&self, capsule: &Capsule) -> Capsule {
        let mut conn = self.env.pool.acquire().await.unwrap();
        capsules::get(&mut conn, None, capsule.id)
            .await
            .unwrap()
            .unwrap()
    }

    async fn sql(&self, statement: &'static str, capsule: &Capsule) {
        sqlx::query(statement)
            .bind(capsule.id.0)
            .execute(&self.env.pool)
            .await
            .unwrap();
    }

    /// A committed create intent (a capsule in `starting`), not pushed.
    async fn create_intent(&self) -> intents::Accepted {
        create_intent(&self.env).await
    }

    /// A pause of `capsule`, committed and not pushed: an operation in flight.
    async fn pause_intent(&self, capsule: &Capsule) -> intents::Accepted {
        let mut tx = self.env.pool.begin().await.unwrap();
        let accepted = intents::capsule_operation(
            &mut tx,
            capsule.clone(),
            OperationKind::Pause,
            serde_json::json!({}),
            5,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        accepted
    }

    async fn host_status(&self) -> String {
        let mut conn = self.env.pool.acquire().await.unwrap();
        hosts::get(&mut conn, self.host)
            .await
            .unwrap()
            .unwrap()
            .status
    }

    /// Every operation of a capsule, newest first.
    async fn operations_of(&self, capsule: &Capsule) -> Vec<Operation> {
        let mut conn = self.env.pool.acquire().await.unwrap();
        let filter = operations::OperationFilter {
            capsule: Some(capsule.id),
            limit: 100,
            ..Default::default()
        };
        operations::list(&mut conn, &filter).await.unwrap()
    }
}

async fn create_intent(env: &TestEnv) -> intents::Accepted {
    let mut tx = env.pool.begin().await.unwrap();
    let template = tenancy::template_for_team(&mut tx, PLATFORM_TEAM, "base")
        .await
        .unwrap()
        .unwrap();
    let create = CreateCapsule {
        team_id: PLATFORM_TEAM,
        template,
        vcpus: 1,
        memory_mb: 128,
        timeout_sec: 600,
        metadata: serde_json::json!({}),
        max_attempts: 5,
    };
    let accepted = intents::create_capsule(&mut tx, create).await.unwrap();
    tx.commit().await.unwrap();
    accepted
}

/// When an operation's job was last pushed, and in which Redis epoch.
async fn pushed(env: &TestEnv, op: OperationId) -> (Option<DateTime<Utc>>, Option<String>) {
    sqlx::query_as("select pushed_at, pushed_epoch from operations where id = $1")
        .bind(op.0)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// Makes an operation look committed a while ago (the reconciler leaves a fresh one to the
/// API's own push for a second).
async fn age(env: &TestEnv, op: OperationId) {
    sqlx::query("update operations set created_at = now() - interval '5 seconds' where id = $1")
        .bind(op.0)
        .execute(&env.pool)
        .await
        .unwrap();
}

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

/// Two worker processes on one Redis: each tick interval, one of them reconciles. Each
/// process here talks to a database of its own holding one lost operation, so which of
/// them ticked shows in which operation got pushed.
#[tokio::test]
async fn only_one_process_ticks_per_interval() {
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
        reconcile_interval_ms: 60_000,
        ..WorkerConfig::default()
    };
    // Same Redis prefix (`a.queue`), different databases.
    let contexts = [
        hangar_worker::context(a.pool.clone(), a.queue.clone(), config("alpha")),
        hangar_worker::context(b.pool.clone(), a.queue.clone(), config("beta")),
    ];
    let names = [contexts[0].worker.clone(), contexts[1].worker.clone()];
    let (stop, stopped) = watch::channel(false);
    // Both loops tick at once when they start; the lease lets one through.
    let loops: Vec<_> = contexts
        .into_iter()
        .map(|ctx| tokio::spawn(reconciler::run(ctx, stopped.clone())))
        .collect();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let winner = loop {
        let done = [pushed(&a, ops[0]).await.0, pushed(&b, ops[1]).await.0];
        if let Some(i) = done.iter().position(Option::is_some) {
            break i;
        }
        assert!(tokio::time::Instant::now() < deadline, "nobody ticked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut redis = a.queue.connection();
    let lease_key = format!("{}:reconciler:tick", a.queue.prefix());
    let holder: Option<String> = redis::cmd("GET")
        .arg(&lease_key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(holder.as_deref(), Some(names[winner].as_str()));
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(&lease_key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        (1..=54_000).contains(&ttl_ms),
        "the lease lives 90% of an interval: {ttl_ms} ms"
    );

    stop.send(true).unwrap();
    for task in loops {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
    }
    let loser = 1 - winner;
    let env = [&a, &b][loser];
    assert_eq!(
        pushed(env, ops[loser]).await,
        (None, None),
        "{} ticked in the same interval",
        names[loser]
    );
    assert_eq!(a.queue.depth(OperationKind::Create).await.unwrap(), 1);
}

#[tokio::test]
async fn workers_run_a_capsule_through_its_life_and_leave_no_vm() {
    let mut world = World::new().await;
    let ctx = world.ctx(|_| {});
    let (stop, stopped) = watch::channel(false);
    let worker = tokio::spawn(hangar_worker::run(ctx, stopped));

    let mut tx = world.env.pool.begin().await.unwrap();
    let template = tenancy::template_for_team(&mut tx, PLATFORM_TEAM, "base")
        .await
        .unwrap()
        .unwrap();
    let create = CreateCapsule {
        team_id: PLATFORM_TEAM,
        template,
        vcpus: 2,
        memory_mb: 256,
        timeout_sec: 600,
        metadata: serde_json::json!({}),
        max_attempts: 5,
    };
    let accepted = intents::create_capsule(&mut tx, create).await.unwrap();
    tx.commit().await.unwrap();
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

    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Waits for an operation to succeed (polling the row: nothing here notifies).
async fn settle(world: &World, op: OperationId) {
    settle_within(world, op, Duration::from_secs(30)).await;
}

async fn settle_within(world: &World, op: OperationId, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut conn = world.env.pool.acquire().await.unwrap();
        let row = operations::get(&mut conn, None, op).await.unwrap().unwrap();
        if row.status.is_terminal() {
            assert_eq!(row.status, OperationStatus::Succeeded, "{row:?}");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "operation still {}",
            row.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
/// no free connection) is acknowledged and deleted from the stream anyway
/// (`worker/src/runner.rs`: `consume` acks after `run_delivery` returns, whatever
/// happened; `run_delivery` logs "the job stays pending and will be redelivered"). The
/// operation stays `queued` with `pushed_at` set in the current epoch, which
/// `operations::needing_push` never selects, and its capsule's transient status is never
/// settled (an operation is in flight): the request hangs forever.
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
        reconcile_interval_ms: 100,
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
    drop(held);
    let mut conn = world.env.pool.acquire().await.unwrap();
    let row = operations::get(&mut conn, None, op).await.unwrap().unwrap();
    assert_eq!((row.status, row.attempts), (OperationStatus::Queued, 0));
    drop(conn);

    // Postgres is back, the worker and its reconciler run: the create should complete.
    settle_within(&world, op, Duration::from_secs(10)).await;
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
