//! The reconciler against real Postgres, Redis and an in-process host agent over gRPC: one
//! `tick` at a time, asserting what it repaired in the database and on the host.

use std::time::Duration;

use hangar_jobs::intents::{self, CreateCapsule};
use hangar_jobs::store::hosts::{self, Registration, Usage};
use hangar_jobs::store::tenancy::{self, PLATFORM_TEAM};
use hangar_jobs::store::{Capsule, capsules, operations};
use hangar_jobs::testing::TestEnv;
use hangar_jobs::{CapsuleStatus, HostId, OperationKind, OperationStatus, enqueue, keys};
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
}

#[tokio::test]
async fn a_committed_but_never_pushed_operation_is_pushed_once() {
    let world = World::new().await;
    let ctx = world.ctx(|_| {});
    let mut tx = world.env.pool.begin().await.unwrap();
    let template = tenancy::template_for_team(&mut tx, PLATFORM_TEAM, "base")
        .await
        .unwrap()
        .unwrap();
    let create = CreateCapsule {
        team_id: PLATFORM_TEAM,
        template,
        vcpus: 1,
        memory_mb: 128,
        timeout_sec: 60,
        metadata: serde_json::json!({}),
        max_attempts: 5,
    };
    let accepted = intents::create_capsule(&mut tx, create).await.unwrap();
    tx.commit().await.unwrap();
    // The process "died" before the push. The reconciler waits a second for the API's own push.
    sqlx::query("update operations set created_at = now() - interval '5 seconds' where id = $1")
        .bind(accepted.operation.id.0)
        .execute(&world.env.pool)
        .await
        .unwrap();

    assert_eq!(reconciler::tick(&ctx).await.unwrap().pushed, 1);
    assert_eq!(
        world.env.queue.depth(OperationKind::Create).await.unwrap(),
        1
    );
    assert_eq!(
        reconciler::tick(&ctx).await.unwrap().pushed,
        0,
        "pushed twice"
    );
    assert_eq!(
        world.env.queue.depth(OperationKind::Create).await.unwrap(),
        1
    );
}

#[tokio::test]
async fn jobs_pushed_into_a_redis_that_lost_its_data_are_pushed_again() {
    let world = World::new().await;
    let ctx = world.ctx(|_| {});
    let capsule = world.capsule(&[CapsuleStatus::Running]).await;
    let mut tx = world.env.pool.begin().await.unwrap();
    let accepted = intents::capsule_operation(
        &mut tx,
        capsule,
        OperationKind::Pause,
        serde_json::json!({}),
        5,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
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
    let busy = world.capsule(&[CapsuleStatus::Running]).await;
    let healthy = world.capsule(&[CapsuleStatus::Running]).await;
    world.vm(&healthy.id.to_string()).await;
    // `busy` has a pause in flight: the job, not the reconciler, decides its fate.
    let mut tx = world.env.pool.begin().await.unwrap();
    intents::capsule_operation(
        &mut tx,
        busy.clone(),
        OperationKind::Pause,
        serde_json::json!({}),
        5,
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let ctx = world.ctx(|c| c.missing_grace_secs = 0.0);
    let repairs = reconciler::tick(&ctx).await.unwrap();
    assert_eq!(repairs.capsules_missing, 1);
    let after = world.reload(&vanished).await;
    assert_eq!(after.status, CapsuleStatus::Error);
    assert!(after.status_reason.unwrap().contains("missing"));
    assert_eq!(world.reload(&busy).await.status, CapsuleStatus::Pausing);
    assert_eq!(world.reload(&healthy).await.status, CapsuleStatus::Running);
}

#[tokio::test]
async fn a_silent_host_makes_its_capsules_unknown_until_it_returns() {
    let mut world = World::new().await;
    let alive = world.capsule(&[CapsuleStatus::Running]).await;
    let gone = world.capsule(&[CapsuleStatus::Running]).await;
    world.vm(&alive.id.to_string()).await;
    sqlx::query("update host_heartbeats set last_heartbeat_at = now() - interval '1 minute'")
        .execute(&world.env.pool)
        .await
        .unwrap();

    let ctx = world.ctx(|c| c.host_silent_secs = 30.0);
    let repairs = reconciler::tick(&ctx).await.unwrap();
    assert_eq!(
        (repairs.hosts_unreachable, repairs.capsules_unknown),
        (1, 2)
    );
    assert_eq!(world.reload(&alive).await.status, CapsuleStatus::Unknown);

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
    let repairs = reconciler::tick(&ctx).await.unwrap();
    assert_eq!(repairs.capsules_restored, 1);
    assert_eq!(world.reload(&alive).await.status, CapsuleStatus::Running);
    let gone = world.reload(&gone).await;
    assert_eq!(gone.status, CapsuleStatus::Error);
    assert!(gone.status_reason.unwrap().contains("gone"));
}

#[tokio::test]
async fn a_transient_status_past_its_deadline_is_settled() {
    let world = World::new().await;
    let stuck = world
        .capsule(&[CapsuleStatus::Running, CapsuleStatus::Pausing])
        .await;
    let busy = world.capsule(&[CapsuleStatus::Running]).await;
    let mut tx = world.env.pool.begin().await.unwrap();
    let busy = intents::capsule_operation(
        &mut tx,
        busy,
        OperationKind::Pause,
        serde_json::json!({}),
        5,
    )
    .await
    .unwrap()
    .capsule;
    tx.commit().await.unwrap();
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
    for capsule in [&expired, &fresh] {
        world.vm(&capsule.id.to_string()).await;
    }
    world
        .sql(
            "update capsules set expires_at = now() - interval '1 second' where id = $1",
            &expired,
        )
        .await;

    let ctx = world.ctx(|_| {});
    assert_eq!(reconciler::tick(&ctx).await.unwrap().auto_paused, 1);
    assert_eq!(world.reload(&expired).await.status, CapsuleStatus::Pausing);
    assert_eq!(world.reload(&fresh).await.status, CapsuleStatus::Running);
    assert_eq!(
        world.env.queue.depth(OperationKind::Pause).await.unwrap(),
        1
    );
    // The next tick does not pause it twice.
    assert_eq!(reconciler::tick(&ctx).await.unwrap().auto_paused, 0);
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
async fn settle(world: &World, op: hangar_jobs::OperationId) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
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
