//! `hangar dev`: the whole system in one process, for a laptop or a demo. Postgres and
//! Redis are spawned from the machine's own binaries into a private data folder unless
//! URLs are given. Ctrl-C stops everything, children included.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use hangar_jobs::store;
use prometheus_client::registry::Registry;
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
    /// The VMM driver: `auto` runs real VMs (`qemu`) when QEMU and the guest image are
    /// there (building the image when `ops/build-guest-image.sh` is at hand), else `sim`.
    #[arg(long, env = "HANGAR_DEV_DRIVER", value_enum, default_value_t = DevDriver::Auto)]
    driver: DevDriver,
    /// The guest image (kernel, initramfs, base disk) of the qemu driver.
    #[arg(long, env = "HANGAR_IMAGE_DIR", default_value = ".hangar/image")]
    image_dir: PathBuf,
    /// The qemu driver's accelerator: `auto` uses KVM only when a probe boot works.
    #[arg(long, env = "HANGAR_AGENT_ACCEL", value_enum, default_value_t = hangar_agent::AccelSetting::Auto)]
    accel: hangar_agent::AccelSetting,
    /// Simulated latency of each VM operation of the `sim` driver, in milliseconds.
    #[arg(long, env = "HANGAR_SIM_LATENCY_MS", default_value_t = 50)]
    sim_latency_ms: u64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DevDriver {
    Auto,
    Qemu,
    Sim,
}

const QEMU: &str = "qemu-system-x86_64";
const IMAGE_FILES: [&str; 3] = ["vmlinux", "initramfs.cpio.gz", "base.qcow2"];
const IMAGE_SCRIPT: &str = "ops/build-guest-image.sh";

/// The driver `--driver` asks for; `auto` says why it falls back to `sim`.
fn choose_driver(args: &DevArgs) -> hangar_agent::DriverKind {
    use hangar_agent::DriverKind;
    match args.driver {
        DevDriver::Sim => return DriverKind::Sim,
        DevDriver::Qemu => return DriverKind::Qemu,
        DevDriver::Auto => {}
    }
    let qemu_runs = std::process::Command::new(QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !qemu_runs {
        println!(
            "{QEMU} not found: running simulated VMs (driver: sim). For real VMs: bash ops/install-deps.sh"
        );
        return DriverKind::Sim;
    }
    let image_ready = |dir: &std::path::Path| IMAGE_FILES.iter().all(|f| dir.join(f).exists());
    // The script is cached: it rebuilds only when its inputs changed.
    if std::path::Path::new(IMAGE_SCRIPT).exists() {
        println!("checking the guest image ({IMAGE_SCRIPT})");
        let built = std::process::Command::new("bash")
            .arg(IMAGE_SCRIPT)
            .arg(&args.image_dir)
            .status()
            .is_ok_and(|s| s.success());
        if !built {
            println!("building the guest image failed (see above)");
        }
    }
    if image_ready(&args.image_dir) {
        DriverKind::Qemu
    } else {
        println!(
            "no guest image in {}: running simulated VMs (driver: sim). For real VMs: bash {IMAGE_SCRIPT}",
            args.image_dir.display()
        );
        DriverKind::Sim
    }
}

/// What the host registered as its driver (e.g. `qemu (tcg)`), once it has registered
/// (heartbeated since `since`: the row of an earlier run does not count).
async fn registered_driver(
    pool: &hangar_jobs::store::PgPool,
    address: &str,
    since: chrono::DateTime<chrono::Utc>,
) -> Option<String> {
    for _ in 0..600 {
        if let Ok(mut conn) = pool.acquire().await
            && let Ok(hosts) = store::hosts::list(&mut conn).await
            && let Some(host) = hosts
                .into_iter()
                .find(|h| h.address == address && h.last_heartbeat_at >= since)
        {
            return Some(host.driver);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
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
    // One registry for the three roles, served at the API's /metrics.
    let mut registry = Registry::default();
    let worker_metrics = hangar_worker::WorkerMetrics::register(&mut registry);
    let agent_metrics = hangar_agent::metrics::AgentMetrics::register(&mut registry);
    let config = hangar_api::ApiConfig::new(args.listen, join_token.clone());
    let state = hangar_api::AppState::new(pool.clone(), queue.clone(), config)
        .await?
        .with_registry(registry);
    let api = tokio::spawn(hangar_api::serve(listener, state, stopped(stop_rx.clone())));

    let worker_config = hangar_worker::WorkerConfig {
        name: Some(format!("dev-{}", hangar_jobs::keys::random_hex(3))),
        ..Default::default()
    };
    let mut worker_ctx = hangar_worker::context(pool.clone(), queue.clone(), worker_config);
    worker_ctx.metrics = worker_metrics;
    let worker = tokio::spawn(hangar_worker::run(worker_ctx, stop_rx.clone()));

    let agent_config = agent_config(args, data_dir, &join_token, choose_driver(args));
    let started = chrono::Utc::now();
    let agent = hangar_agent::Agent::bind(agent_config)
        .await?
        .with_metrics(agent_metrics);
    let agent = tokio::spawn(agent.run(stopped(stop_rx.clone())));
    let driver = registered_driver(&pool, &format!("http://{}", args.agent_listen), started)
        .await
        .unwrap_or_else(|| "the agent has not registered yet: see the log".into());

    let url = format!("http://{}", args.listen);
    println!();
    println!("Hangar is running (driver: {driver}).");
    println!("  API:        {url}");
    println!("  admin key:  {admin_key}");
    println!("  metrics:    {url}/metrics (api, worker and agent)");
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

/// The in-process agent, its state under the data folder.
fn agent_config(
    args: &DevArgs,
    data_dir: &std::path::Path,
    join_token: &str,
    driver: hangar_agent::DriverKind,
) -> hangar_agent::AgentConfig {
    hangar_agent::AgentConfig {
        listen: args.agent_listen,
        advertise_url: None,
        control_plane_url: format!("http://{}", args.listen),
        join_token: hangar_agent::secret::Secret::new(join_token),
        host_name: Some("dev-host".into()),
        state_dir: data_dir.join("agent"),
        driver,
        vcpus: 64,
        memory_mb: 262_144,
        sim_latency_ms: args.sim_latency_ms,
        sim_jitter_ms: 0,
        sim_error_rate: 0.0,
        sim_hang_rate: 0.0,
        sim_crash_rate: 0.0,
        image_dir: args.image_dir.clone(),
        qemu: QEMU.into(),
        accel: args.accel,
        heartbeat_interval_ms: 2_000,
    }
}
