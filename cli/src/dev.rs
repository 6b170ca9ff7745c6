//! `hangar dev`: the whole system in one process, for a laptop or a demo. Postgres and
//! Redis are spawned from the machine's own binaries into a private data folder unless
//! URLs are given. Ctrl-C stops everything, children included.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use hangar_jobs::store;
use tokio::sync::watch;

use crate::local_services::{LocalPostgres, LocalRedis, free_port};
use crate::{RedisArgs, connect_postgres, connect_redis, shutdown_signal};

#[derive(Args)]
pub struct DevArgs {
    /// Folder for the spawned Postgres and Redis data and the agent's state (kept across runs).
    #[arg(long, env = "HANGAR_DATA_DIR", default_value = ".hangar/dev")]
    data_dir: PathBuf,
    /// Address of the API.
    #[arg(long, env = "HANGAR_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Use this Postgres instead of spawning one.
    #[arg(long, env = "HANGAR_DATABASE_URL")]
    database_url: Option<String>,
    /// Use this Redis instead of spawning one.
    #[arg(long, env = "HANGAR_REDIS_URL")]
    redis_url: Option<String>,
    /// A fixed admin key (like a dev root token); generated and printed when absent.
    #[arg(long, env = "HANGAR_ADMIN_KEY")]
    admin_key: Option<String>,
    /// Address of the in-process host agent's gRPC server.
    #[arg(long, env = "HANGAR_AGENT_LISTEN", default_value = "127.0.0.1:7001")]
    agent_listen: SocketAddr,
    /// Simulated latency of each VM operation of the `sim` driver, in milliseconds.
    #[arg(long, env = "HANGAR_SIM_LATENCY_MS", default_value_t = 50)]
    sim_latency_ms: u64,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let data_dir = std::fs::canonicalize(&args.data_dir)?;

    let postgres = match &args.database_url {
        Some(_) => None,
        None => {
            println!(
                "starting Postgres in {}",
                data_dir.join("postgres").display()
            );
            Some(LocalPostgres::start(&data_dir.join("postgres"), free_port()?, true).await?)
        }
    };
    let redis = match &args.redis_url {
        Some(_) => None,
        None => {
            println!("starting Redis in {}", data_dir.join("redis").display());
            Some(LocalRedis::start(&data_dir.join("redis"), free_port()?).await?)
        }
    };
    let result = run_services(&args, &data_dir, postgres.as_ref(), redis.as_ref()).await;
    if let Some(redis) = redis {
        redis.stop().await;
    }
    if let Some(postgres) = postgres {
        postgres.stop().await;
    }
    result
}

async fn run_services(
    args: &DevArgs,
    data_dir: &std::path::Path,
    postgres: Option<&LocalPostgres>,
    redis: Option<&LocalRedis>,
) -> anyhow::Result<()> {
    let database_url = args
        .database_url
        .clone()
        .or(postgres.map(|p| p.url()))
        .expect("a database");
    let redis_url = args
        .redis_url
        .clone()
        .or(redis.map(|r| r.url()))
        .expect("a redis");
    let pool = connect_postgres(&database_url, 40).await?;
    store::migrate(&pool).await.context("applying migrations")?;
    let queue = connect_redis(&RedisArgs {
        redis_url,
        redis_prefix: "hangar".into(),
    })
    .await?;

    let admin_key = args
        .admin_key
        .clone()
        .unwrap_or_else(|| hangar_jobs::keys::mint_api_key().secret);
    hangar_api::ensure_admin_key(&pool, &admin_key).await?;
    let join_token = hangar_jobs::keys::random_hex(16);

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |rx: watch::Receiver<bool>| async move {
        let mut rx = rx;
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {} (is another hangar running?)", args.listen))?;
    let config = hangar_api::ApiConfig::new(args.listen, join_token.clone());
    let state = hangar_api::AppState::new(pool.clone(), queue.clone(), config).await?;
    let api = tokio::spawn(hangar_api::serve(listener, state, stopped(stop_rx.clone())));

    let worker_config = hangar_worker::WorkerConfig {
        name: Some(format!("dev-{}", hangar_jobs::keys::random_hex(3))),
        ..Default::default()
    };
    let worker = tokio::spawn(hangar_worker::run(
        hangar_worker::context(pool.clone(), queue.clone(), worker_config),
        stop_rx.clone(),
    ));

    let agent_config = agent_config(args, data_dir, &join_token);
    let agent = tokio::spawn(hangar_agent::run(agent_config, stopped(stop_rx.clone())));

    let url = format!("http://{}", args.listen);
    println!();
    println!("Hangar is running (driver: sim).");
    println!("  API:        {url}");
    println!("  admin key:  {admin_key}");
    println!(
        "  try:        curl -s -X POST {url}/v1/capsules -H 'Authorization: Bearer {admin_key}' -H 'Content-Type: application/json' -d '{{}}'"
    );
    println!("Press Ctrl-C to stop.");

    shutdown_signal().await;
    let _ = stop_tx.send(true);
    let grace = Duration::from_secs(35);
    for (name, task) in [("api", api), ("worker", worker), ("agent", agent)] {
        match tokio::time::timeout(grace, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::error!(%error, "{name} stopped with an error"),
            Ok(Err(error)) => tracing::error!(%error, "{name} panicked"),
            Err(_) => tracing::warn!("{name} did not stop in time"),
        }
    }
    Ok(())
}

/// The in-process agent: the `sim` driver, its state under the data folder.
fn agent_config(
    args: &DevArgs,
    data_dir: &std::path::Path,
    join_token: &str,
) -> hangar_agent::AgentConfig {
    hangar_agent::AgentConfig {
        listen: args.agent_listen,
        advertise_url: None,
        control_plane_url: format!("http://{}", args.listen),
        join_token: hangar_agent::secret::Secret::new(join_token),
        host_name: Some("dev-host".into()),
        state_dir: data_dir.join("agent"),
        driver: hangar_agent::DriverKind::Sim,
        vcpus: 64,
        memory_mb: 262_144,
        sim_latency_ms: args.sim_latency_ms,
        sim_jitter_ms: 0,
        sim_error_rate: 0.0,
        sim_hang_rate: 0.0,
        sim_crash_rate: 0.0,
        // Unused by the sim driver; the qemu driver's defaults.
        image_dir: ".hangar/image".into(),
        qemu: "qemu-system-x86_64".into(),
        accel: hangar_agent::AccelSetting::Auto,
        heartbeat_interval_ms: 2_000,
    }
}
