//! `hangar`: the one binary. A subcommand per role; each calls into its library crate. The
//! client commands (`capsule`, `op`, `host`) talk to a running API (`client/`).

mod client;
mod dev;
mod local_services;
mod metrics;
mod telemetry;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use hangar_jobs::queue::JobQueue;
use hangar_jobs::store::{self, PgPool};
use prometheus_client::registry::Registry;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "hangar",
    version,
    about = "Control plane for microVM sandboxes (capsules)",
    after_help = client::EXIT_CODES
)]
struct Cli {
    /// Log format: `human` or `json`.
    #[arg(
        long,
        global = true,
        env = "HANGAR_LOG_FORMAT",
        default_value = "human"
    )]
    log_format: telemetry::LogFormat,
    #[command(flatten)]
    tracing: telemetry::TracingArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process: Postgres and Redis (spawned unless URLs are given),
    /// migrations, the API, a worker, the reconciler and a host agent.
    Dev(dev::DevArgs),
    /// The HTTP API.
    Api(ApiArgs),
    /// A worker process: job consumers and the reconciler.
    Worker(WorkerArgs),
    /// The host agent (on each KVM host).
    Agent(AgentArgs),
    /// Applies the database migrations.
    Migrate(DatabaseArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
}

#[derive(Args, Clone)]
pub struct DatabaseArgs {
    /// Postgres URL.
    #[arg(long, env = "HANGAR_DATABASE_URL")]
    database_url: String,
}

#[derive(Args, Clone)]
pub struct RedisArgs {
    /// Redis URL.
    #[arg(long, env = "HANGAR_REDIS_URL")]
    redis_url: String,
    /// Namespace of every Redis key.
    #[arg(long, env = "HANGAR_REDIS_PREFIX", default_value = "hangar")]
    redis_prefix: String,
}

#[derive(Args)]
struct ApiArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    api: hangar_api::ApiConfig,
    /// A fixed admin key of the platform team (stored hashed at start).
    #[arg(long, env = "HANGAR_ADMIN_KEY", hide_env_values = true)]
    admin_key: Option<String>,
}

#[derive(Args)]
struct WorkerArgs {
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    redis: RedisArgs,
    #[command(flatten)]
    worker: hangar_worker::WorkerConfig,
    /// Address of the worker's Prometheus `/metrics` listener; empty for none.
    #[arg(
        long,
        env = "HANGAR_WORKER_METRICS_LISTEN",
        default_value = "127.0.0.1:9101"
    )]
    metrics_listen: metrics::MetricsListen,
}

#[derive(Args)]
struct AgentArgs {
    #[command(flatten)]
    agent: hangar_agent::AgentConfig,
    /// Address of the agent's Prometheus `/metrics` listener; empty for none.
    #[arg(
        long,
        env = "HANGAR_AGENT_METRICS_LISTEN",
        default_value = "127.0.0.1:9102"
    )]
    metrics_listen: metrics::MetricsListen,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli {
        log_format,
        tracing,
        command,
    } = Cli::parse();
    let command = match command {
        // Client commands print results, not logs.
        Command::Client(command) => std::process::exit(client::run(command).await),
        other => other,
    };
    let role = match &command {
        Command::Client(_) => unreachable!("handled above"),
        Command::Dev(_) => "dev",
        Command::Api(_) => "api",
        Command::Worker(_) => "worker",
        Command::Agent(_) => "agent",
        Command::Migrate(_) => "migrate",
    };
    let telemetry = telemetry::init(log_format, &tracing, role)?;
    let result = match command {
        Command::Client(_) => unreachable!("handled above"),
        Command::Dev(args) => dev::run(args).await,
        Command::Api(args) => run_api(args).await,
        Command::Worker(args) => run_worker(args).await,
        Command::Agent(args) => run_agent(args).await,
        Command::Migrate(args) => migrate(args).await,
    };
    telemetry.shutdown().await;
    result
}

async fn migrate(args: DatabaseArgs) -> anyhow::Result<()> {
    let pool = connect_postgres(&args.database_url, 2).await?;
    store::migrate(&pool).await.context("applying migrations")?;
    tracing::info!("migrations applied");
    Ok(())
}

async fn run_api(args: ApiArgs) -> anyhow::Result<()> {
    let pool = connect_postgres(&args.database.database_url, 32).await?;
    let queue = connect_redis(&args.redis).await?;
    if let Some(key) = &args.admin_key {
        hangar_api::ensure_admin_key(&pool, key).await?;
    }
    let config = args.api;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(url = %format!("http://{}", listener.local_addr()?), "api listening");
    let state = hangar_api::AppState::new(pool, queue, config).await?;
    hangar_api::serve(listener, state, shutdown_signal()).await
}

async fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    let pool = connect_postgres(&args.database.database_url, 40).await?;
    let queue = connect_redis(&args.redis).await?;
    let mut ctx = hangar_worker::context(pool, queue, args.worker);
    let mut registry = Registry::default();
    ctx.metrics = hangar_worker::WorkerMetrics::register(&mut registry);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut metrics_stop = stop_rx.clone();
    metrics::spawn(args.metrics_listen, registry, async move {
        let _ = metrics_stop.wait_for(|stop| *stop).await;
    })
    .await?;
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    hangar_worker::run(ctx, stop_rx).await
}

async fn run_agent(args: AgentArgs) -> anyhow::Result<()> {
    let mut registry = Registry::default();
    let agent_metrics = hangar_agent::metrics::AgentMetrics::register(&mut registry);
    let agent = hangar_agent::Agent::bind(args.agent).await?;
    // The listener outlives the agent's drain by a moment; the process exits right after.
    metrics::spawn(args.metrics_listen, registry, std::future::pending()).await?;
    agent
        .with_metrics(agent_metrics)
        .run(shutdown_signal())
        .await
}

pub async fn connect_postgres(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .connect(url)
        .await
        .context("connecting to Postgres (check --database-url)")
}

pub async fn connect_redis(args: &RedisArgs) -> anyhow::Result<JobQueue> {
    let queue = JobQueue::connect(&args.redis_url, &args.redis_prefix)
        .await
        .context("connecting to Redis (check --redis-url)")?;
    queue
        .ensure_groups()
        .await
        .context("creating the job streams")?;
    Ok(queue)
}

/// Resolves at the first Ctrl-C or SIGTERM: the one shutdown signal every role obeys.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
