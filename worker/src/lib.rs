//! Hangar's workers: an apalis worker per job kind, the agent client pool, placement, and
//! the reconciler (an apalis-cron worker). Run as many worker processes as you like, each
//! with a unique name.

mod context;
mod jobs;
pub mod metrics;
pub mod reconciler;
mod runner;

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::{Monitor, WorkerBuilder, WorkerBuilderExt};
use apalis_cron::CronScheduler;
use hangar_jobs::OperationKind;
use hangar_jobs::backend::JobStream;
use hangar_jobs::queue::JobQueue;
use hangar_jobs::store::PgPool;
use tokio::sync::watch;
use tower::limit::ConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tracing::{info, warn};

pub use context::JobContext;
pub use metrics::WorkerMetrics;

/// Worker settings (flags and `HANGAR_*` environment variables).
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerConfig {
    /// Unique name of this worker process (the lease owner of its operations).
    /// Default: `<hostname>-<pid>-<random>`.
    #[arg(long = "worker-name", env = "HANGAR_WORKER_NAME")]
    pub name: Option<String>,
    /// Jobs run at once per job kind.
    #[arg(long, env = "HANGAR_WORKER_CONCURRENCY", default_value_t = 32)]
    pub concurrency: usize,
    /// Attempts per operation before it fails (transient agent errors are retried).
    #[arg(long, env = "HANGAR_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: i32,
    /// How long a claimed operation is held before another worker may take it over.
    #[arg(long, env = "HANGAR_LEASE_SECS", default_value_t = 30.0)]
    pub lease_secs: f64,
    /// First retry delay; doubles per attempt, with jitter.
    #[arg(long, env = "HANGAR_RETRY_BASE_MS", default_value_t = 200)]
    pub retry_base_ms: u64,
    /// Longest retry delay.
    #[arg(long, env = "HANGAR_RETRY_CAP_MS", default_value_t = 5_000)]
    pub retry_cap_ms: u64,
    /// Timeout of one call to a host agent.
    #[arg(long, env = "HANGAR_AGENT_TIMEOUT_SECS", default_value_t = 30.0)]
    pub agent_timeout_secs: f64,
    /// When the reconciler ticks: a cron schedule with seconds (6 fields; the default is
    /// every 2 s). Every worker process ticks; one per tick does the work.
    #[arg(
        long,
        env = "HANGAR_RECONCILE_SCHEDULE",
        default_value = "*/2 * * * * *"
    )]
    pub reconcile_schedule: String,
    /// Interval of the reconciler's inventory sweep, which lists every host's VMs and
    /// compares them with every capsule (O(fleet), so less often than the tick).
    #[arg(long, env = "HANGAR_INVENTORY_INTERVAL_MS", default_value_t = 10_000)]
    pub inventory_interval_ms: u64,
    /// A host silent this long is marked unreachable and its capsules unknown.
    #[arg(long, env = "HANGAR_HOST_SILENT_SECS", default_value_t = 15.0)]
    pub host_silent_secs: f64,
    /// A VM no capsule owns is destroyed once it is this old.
    #[arg(long, env = "HANGAR_ORPHAN_GRACE_SECS", default_value_t = 30.0)]
    pub orphan_grace_secs: f64,
    /// A settled capsule whose VM is missing this long goes to `error`.
    #[arg(long, env = "HANGAR_MISSING_GRACE_SECS", default_value_t = 10.0)]
    pub missing_grace_secs: f64,
    /// How long shutdown waits for running jobs.
    #[arg(long, env = "HANGAR_SHUTDOWN_GRACE_SECS", default_value_t = 30.0)]
    pub shutdown_grace_secs: f64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct Defaults {
            #[command(flatten)]
            config: WorkerConfig,
        }
        Defaults::parse_from(["worker"]).config
    }
}

impl WorkerConfig {
    pub fn lease(&self) -> Duration {
        Duration::from_secs_f64(self.lease_secs)
    }
    pub fn retry_base(&self) -> Duration {
        Duration::from_millis(self.retry_base_ms)
    }
    pub fn retry_cap(&self) -> Duration {
        Duration::from_millis(self.retry_cap_ms)
    }
    pub fn inventory_interval(&self) -> Duration {
        Duration::from_millis(self.inventory_interval_ms.max(10))
    }
    pub fn orphan_grace(&self) -> Duration {
        Duration::from_secs_f64(self.orphan_grace_secs)
    }
    pub fn missing_grace(&self) -> Duration {
        Duration::from_secs_f64(self.missing_grace_secs)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_grace_secs)
    }
}

/// A unique default worker name: two processes never share one, even across restarts.
fn default_worker_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "worker".into());
    format!(
        "{}-{}-{}",
        host.trim(),
        std::process::id(),
        hangar_jobs::keys::random_hex(3)
    )
}

/// Builds the shared context of one worker process; its metrics are registered nowhere
/// until [`JobContext::metrics`] is replaced by [`WorkerMetrics::register`]'s.
pub fn context(pool: PgPool, queue: JobQueue, config: WorkerConfig) -> JobContext {
    let worker = config.name.clone().unwrap_or_else(default_worker_name);
    let agents =
        hangar_jobs::agents::AgentPool::new(Duration::from_secs_f64(config.agent_timeout_secs));
    JobContext {
        pool,
        queue,
        agents,
        worker,
        config: Arc::new(config),
        metrics: WorkerMetrics::default(),
    }
}

/// Runs an apalis worker per job kind and the reconciler's until `stop` flips to true; then
/// lets running jobs finish (up to the shutdown grace) and returns.
pub async fn run(ctx: JobContext, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    ctx.queue.ensure_groups().await?;
    let schedule = reconciler::schedule(&ctx.config)?;
    info!(worker = %ctx.worker, concurrency = ctx.config.concurrency, "worker started");
    let mut monitor = Monitor::new()
        .shutdown_timeout(ctx.config.shutdown_grace())
        // Our backends never fail; a panic that escapes a job restarts its worker (its
        // deliveries stay pending on the stream and are reclaimed).
        .should_restart(|worker, error| {
            warn!(worker = worker.name(), %error, "worker stopped by an error; restarting");
            true
        });
    for kind in OperationKind::ALL.iter().copied() {
        let ctx = ctx.clone();
        monitor = monitor.register(move |_restarts| {
            let stream = JobStream::new(
                ctx.queue.clone(),
                kind,
                &ctx.worker,
                runner::stream_settings(&ctx.config, kind),
            );
            WorkerBuilder::new(format!("{}:{kind}", ctx.worker))
                .backend(stream)
                .concurrency(ctx.config.concurrency)
                .data(ctx.clone())
                .build(runner::run_task)
        });
    }
    let reconciler_ctx = ctx.clone();
    monitor = monitor.register(move |_restarts| {
        WorkerBuilder::new(format!("{}:reconciler", reconciler_ctx.worker))
            .backend(CronScheduler::new(schedule.clone()))
            // A tick still running when the next is due makes the next one a no-op.
            .layer(LoadShedLayer::new())
            .layer(ConcurrencyLimitLayer::new(1))
            .data(reconciler_ctx.clone())
            .build(reconciler::run_tick)
    });
    monitor
        .run_with_signal(async move {
            while !*stop.borrow_and_update() {
                if stop.changed().await.is_err() {
                    break;
                }
            }
            Ok(())
        })
        .await?;
    info!(worker = %ctx.worker, "worker stopped");
    Ok(())
}
