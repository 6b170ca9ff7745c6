//! What the worker's tests share: a migrated database, a Redis namespace and an in-process
//! sim agent over real gRPC, registered as a host.
#![allow(dead_code)] // each test binary uses a part of it

use std::time::Duration;

use chrono::{DateTime, Utc};
use hangar_jobs::intents::{self, CreateCapsule};
use hangar_jobs::store::hosts::{self, Registration};
use hangar_jobs::store::tenancy::{self, PLATFORM_TEAM};
use hangar_jobs::store::{Capsule, Operation, capsules, operations};
use hangar_jobs::testing::TestEnv;
use hangar_jobs::{CapsuleStatus, HostId, OperationId, OperationKind, OperationStatus, keys};
use hangar_proto::host_agent_client::HostAgentClient;
use hangar_proto::{CreateSandboxRequest, ListSandboxesRequest};
use hangar_worker::{JobContext, WorkerConfig};
use tokio::sync::watch;

pub type Bearer =
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>;
pub type Client = HostAgentClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

/// A migrated database, a Redis namespace, an in-process sim agent registered as a host.
pub struct World {
    pub env: TestEnv,
    pub host: HostId,
    pub agent: Client,
    _stop: watch::Sender<bool>,
}

impl World {
    pub async fn new() -> World {
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

    pub fn ctx(&self, tune: impl FnOnce(&mut WorkerConfig)) -> JobContext {
        let mut config = WorkerConfig {
            name: Some(format!("w-{}", keys::random_hex(3))),
            ..WorkerConfig::default()
        };
        tune(&mut config);
        hangar_worker::context(self.env.pool.clone(), self.env.queue.clone(), config)
    }

    /// A capsule placed on the host, moved through `path` of statuses (from `starting`).
    pub async fn capsule(&self, path: &[CapsuleStatus]) -> Capsule {
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

    pub async fn vm(&mut self, id: &str) {
        let request = CreateSandboxRequest {
            sandbox_id: id.into(),
            vcpus: 1,
            memory_mb: 128,
            image: "base".into(),
            ..Default::default()
        };
        self.agent.create_sandbox(request).await.unwrap();
    }

    pub async fn vms(&mut self) -> Vec<String> {
        let list = self
            .agent
            .list_sandboxes(ListSandboxesRequest {})
            .await
            .unwrap()
            .into_inner();
        list.sandboxes.into_iter().map(|s| s.sandbox_id).collect()
    }

    pub async fn reload(&self, capsule: &Capsule) -> Capsule {
        let mut conn = self.env.pool.acquire().await.unwrap();
        capsules::get(&mut conn, None, capsule.id)
            .await
            .unwrap()
            .unwrap()
    }

    pub async fn sql(&self, statement: &'static str, capsule: &Capsule) {
        sqlx::query(statement)
            .bind(capsule.id.0)
            .execute(&self.env.pool)
            .await
            .unwrap();
    }

    /// A committed create intent (a capsule in `starting`), not pushed.
    pub async fn create_intent(&self) -> intents::Accepted {
        create_intent(&self.env).await
    }

    /// A pause of `capsule`, committed and not pushed: an operation in flight.
    pub async fn pause_intent(&self, capsule: &Capsule) -> intents::Accepted {
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

    pub async fn host_status(&self) -> String {
        let mut conn = self.env.pool.acquire().await.unwrap();
        hosts::get(&mut conn, self.host)
            .await
            .unwrap()
            .unwrap()
            .status
    }

    /// Every operation of a capsule, newest first.
    pub async fn operations_of(&self, capsule: &Capsule) -> Vec<Operation> {
        let mut conn = self.env.pool.acquire().await.unwrap();
        let filter = operations::OperationFilter {
            capsule: Some(capsule.id),
            limit: 100,
            ..Default::default()
        };
        operations::list(&mut conn, &filter).await.unwrap()
    }
}

pub async fn create_intent(env: &TestEnv) -> intents::Accepted {
    create_intent_sized(env, 1, 128).await
}

/// A committed create intent of the base template with these sizes, not pushed.
pub async fn create_intent_sized(env: &TestEnv, vcpus: i32, memory_mb: i32) -> intents::Accepted {
    let mut tx = env.pool.begin().await.unwrap();
    let template = tenancy::template_for_team(&mut tx, PLATFORM_TEAM, "base")
        .await
        .unwrap()
        .unwrap();
    let create = CreateCapsule {
        team_id: PLATFORM_TEAM,
        template,
        vcpus,
        memory_mb,
        timeout_sec: 600,
        metadata: serde_json::json!({}),
        max_attempts: 5,
    };
    let accepted = intents::create_capsule(&mut tx, create).await.unwrap();
    tx.commit().await.unwrap();
    accepted
}

/// When an operation's job was last pushed, and in which Redis epoch.
pub async fn pushed(env: &TestEnv, op: OperationId) -> (Option<DateTime<Utc>>, Option<String>) {
    sqlx::query_as("select pushed_at, pushed_epoch from operations where id = $1")
        .bind(op.0)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// Makes an operation look committed a while ago (the reconciler leaves a fresh one to the
/// API's own push for a second).
pub async fn age(env: &TestEnv, op: OperationId) {
    sqlx::query("update operations set created_at = now() - interval '5 seconds' where id = $1")
        .bind(op.0)
        .execute(&env.pool)
        .await
        .unwrap();
}

/// Waits for an operation to succeed (polling the row: nothing here notifies).
pub async fn settle(world: &World, op: OperationId) {
    settle_within(world, op, Duration::from_secs(30)).await;
}

pub async fn settle_within(world: &World, op: OperationId, limit: Duration) {
    let row = wait_terminal(world, op, limit).await;
    assert_eq!(row.status, OperationStatus::Succeeded, "{row:?}");
}

/// Waits for an operation to end, whatever its outcome (polling the row).
pub async fn wait_terminal(world: &World, op: OperationId, limit: Duration) -> Operation {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut conn = world.env.pool.acquire().await.unwrap();
        let row = operations::get(&mut conn, None, op).await.unwrap().unwrap();
        if row.status.is_terminal() {
            return row;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "operation still {}",
            row.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops a worker started with `hangar_worker::run` and waits (10 s at most) for it to end.
pub async fn stop_worker(
    stop: watch::Sender<bool>,
    worker: tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
