//! A private Hangar deployment for one benchmark: a fresh database (migrated with
//! `hangar migrate`) on the Postgres server of `DATABASE_URL`, a Redis key prefix of its own,
//! and release `hangar` processes (api, workers, agents). Every child is killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Args;
use hangar_jobs::intents::{self, CreateCapsule};
use hangar_jobs::keys::random_hex;
use hangar_jobs::queue::JobQueue;
use hangar_jobs::store::PgPool;
use hangar_jobs::store::Template;
use hangar_jobs::store::tenancy::{self, PLATFORM_TEAM};
use hangar_jobs::{OperationId, OperationKind, enqueue};
use serde_json::{Value, json};
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Where the services are and which `hangar` to run.
#[derive(Args, Clone, Debug)]
pub struct Common {
    /// The release `hangar` binary.
    #[arg(long, global = true, default_value = "target/release/hangar")]
    pub hangar_bin: PathBuf,
    /// Postgres server (a fresh database is created on it per benchmark).
    #[arg(long, global = true, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    #[arg(long, global = true, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// `HANGAR_LOG` of the spawned processes.
    #[arg(long, global = true, default_value = "info,sqlx=warn")]
    pub hangar_log: String,
}

pub struct Cluster {
    pub pool: PgPool,
    pub queue: JobQueue,
    pub http: reqwest::Client,
    pub api_url: String,
    pub admin_key: String,
    pub database_url: String,
    template: Option<Template>,
    redis_url: String,
    join_token: String,
    bin: PathBuf,
    log_filter: String,
    pub dir: PathBuf,
    children: Vec<(String, Child)>,
}

/// The URL with its database (last path segment) replaced.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    match base.rsplit_once('/') {
        Some((head, _)) if head.contains("//") && head.len() > head.find("//").unwrap() + 2 => {
            format!("{head}/{db}{query}")
        }
        _ => format!("{base}/{db}{query}"),
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Cluster {
    /// A fresh migrated database `bench_<name>_<hex>`, the Redis prefix `bench-<name>-<hex>`,
    /// a pool of `pool_size` connections, and the API process.
    pub async fn start(common: &Common, name: &str, pool_size: u32) -> anyhow::Result<Cluster> {
        let server = common
            .database_url
            .clone()
            .context("DATABASE_URL is not set (run under ops/with-services.sh)")?;
        let redis_url = common.redis_url.clone().context("REDIS_URL is not set")?;
        ensure!(
            common.hangar_bin.exists(),
            "{} not found (cargo build --release -p hangar)",
            common.hangar_bin.display()
        );
        let suffix = random_hex(4);
        let db = format!("bench_{name}_{suffix}");
        let options: PgConnectOptions = server.parse().context("DATABASE_URL")?;
        let mut admin = sqlx::PgConnection::connect_with(&options.clone().database("postgres"))
            .await
            .context("connecting to Postgres")?;
        // The name is ours (letters, digits, underscores), so building the statement is safe.
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {db}")))
            .execute(&mut admin)
            .await?;
        let database_url = with_database(&server, &db);
        let dir = std::env::temp_dir().join(format!("hangar-bench-{name}-{suffix}"));
        std::fs::create_dir_all(&dir)?;
        let mut cluster = Cluster {
            pool: PgPoolOptions::new()
                .max_connections(pool_size)
                .connect_with(options.database(&db))
                .await?,
            queue: JobQueue::connect(&redis_url, &format!("bench-{name}-{suffix}")).await?,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()?,
            api_url: String::new(),
            admin_key: format!("hk_bench_{}", random_hex(16)),
            database_url,
            template: None,
            redis_url,
            join_token: random_hex(16),
            bin: common.hangar_bin.clone(),
            log_filter: common.hangar_log.clone(),
            dir,
            children: Vec::new(),
        };
        let status = cluster
            .command(&["migrate"], "migrate")?
            .status()
            .context("running hangar migrate")?;
        ensure!(
            status.success(),
            "hangar migrate failed: {}",
            cluster.log_hint("migrate")
        );
        cluster.queue.ensure_groups().await?;
        let mut conn = cluster.pool.acquire().await?;
        cluster.template = Some(
            tenancy::template_for_team(&mut conn, PLATFORM_TEAM, "base")
                .await?
                .context("no base template")?,
        );
        drop(conn);
        let port = free_port()?;
        cluster.api_url = format!("http://127.0.0.1:{port}");
        cluster.spawn(
            "api",
            &["api", "--listen", &format!("127.0.0.1:{port}")],
            &[],
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let health = cluster
                .http
                .get(format!("{}/healthz", cluster.api_url))
                .send()
                .await;
            if health.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            cluster.check_alive()?;
            ensure!(
                Instant::now() < deadline,
                "the API did not answer: {}",
                cluster.log_hint("api")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(cluster)
    }

    fn log_hint(&self, name: &str) -> String {
        format!("see {}", self.dir.join(format!("{name}.log")).display())
    }

    fn command(&self, args: &[&str], log: &str) -> anyhow::Result<Command> {
        let log = std::fs::File::create(self.dir.join(format!("{log}.log")))?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("HANGAR_DATABASE_URL", &self.database_url)
            .env("HANGAR_REDIS_URL", &self.redis_url)
            .env("HANGAR_REDIS_PREFIX", self.queue.prefix())
            .env("HANGAR_ADMIN_KEY", &self.admin_key)
            .env("HANGAR_JOIN_TOKEN", &self.join_token)
            .env("HANGAR_CONTROL_PLANE_URL", &self.api_url)
            .env("HANGAR_LOG", &self.log_filter)
            // Several workers and agents share the machine: no metrics listeners.
            .env("HANGAR_WORKER_METRICS_LISTEN", "")
            .env("HANGAR_AGENT_METRICS_LISTEN", "")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(cmd)
    }

    fn spawn(&mut self, name: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
        let mut cmd = self.command(args, name)?;
        cmd.envs(env.iter().copied());
        let child = cmd.spawn().context("spawning hangar")?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// Fails if a child has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "hangar {name} exited ({status}): see {}/{name}.log",
                    self.dir.display()
                );
            }
        }
        Ok(())
    }

    /// A worker process with `concurrency` job slots per kind.
    pub fn spawn_worker(&mut self, name: &str, concurrency: usize) -> anyhow::Result<()> {
        let concurrency = concurrency.to_string();
        self.spawn(
            name,
            &["worker", "--worker-name", name],
            &[("HANGAR_WORKER_CONCURRENCY", &concurrency)],
        )
    }

    /// A zero-latency sim agent with room for a million capsules; returns once the API
    /// lists its host as healthy.
    pub async fn spawn_agent(&mut self, name: &str) -> anyhow::Result<()> {
        let state = self.dir.join(format!("state-{name}"));
        let listen = format!("127.0.0.1:{}", free_port()?);
        let state = state.to_str().context("temp dir is not UTF-8")?.to_owned();
        let args = [
            "agent",
            "--listen",
            &listen,
            "--host-name",
            name,
            "--state-dir",
            &state,
        ];
        let env = [
            ("HANGAR_AGENT_DRIVER", "sim"),
            ("HANGAR_SIM_LATENCY_MS", "0"),
            ("HANGAR_AGENT_VCPUS", "1000000"),
            ("HANGAR_AGENT_MEMORY_MB", "1000000000"),
        ];
        self.spawn(name, &args, &env)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let hosts = self.get("/v1/admin/hosts").await.unwrap_or(Value::Null);
            let healthy = hosts["hosts"].as_array().is_some_and(|hs| {
                hs.iter()
                    .any(|h| h["name"] == name && h["status"] == "healthy")
            });
            if healthy {
                return Ok(());
            }
            self.check_alive()?;
            ensure!(
                Instant::now() < deadline,
                "agent {name} not healthy: {}",
                self.log_hint(name)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The children's names and process ids, for CPU accounting.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.children
            .iter()
            .map(|(n, c)| (n.clone(), c.id()))
            .collect()
    }

    /// CPU use now of the children, the bench, this database's Postgres backends, the
    /// Redis server, and the machine.
    pub async fn cpu(&self) -> crate::cpu::Snapshot {
        let mut pids = self.pids();
        let backends: Vec<i32> = sqlx::query_scalar(
            "select pid from pg_stat_activity where datname = current_database()",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        pids.extend(
            backends
                .into_iter()
                .map(|p| (format!("postgres-{p}"), p as u32)),
        );
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.queue.connection())
            .await
            .unwrap_or_default();
        let redis_pid = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse().ok());
        if let Some(pid) = redis_pid {
            pids.push(("redis".into(), pid));
        }
        crate::cpu::Snapshot::take(&pids)
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let resp = self
            .http
            .get(format!("{}{path}", self.api_url))
            .bearer_auth(&self.admin_key)
            .send()
            .await?;
        Ok(resp.error_for_status()?.json().await?)
    }

    /// A create request as the API would build it for `{"template": "base"}` (1 vCPU,
    /// 128 MiB), with an hour's timeout so nothing is auto-paused mid-benchmark.
    pub fn create_request(&self) -> CreateCapsule {
        CreateCapsule {
            team_id: PLATFORM_TEAM,
            template: self.template.clone().expect("set at start"),
            vcpus: 1,
            memory_mb: 128,
            timeout_sec: 3_600,
            metadata: json!({}),
            max_attempts: 5,
        }
    }

    /// Writes one create intent in its own transaction and commits it (no push).
    pub async fn write_intent(&self) -> anyhow::Result<OperationId> {
        let mut tx = self.pool.begin().await?;
        let accepted = intents::create_capsule(&mut tx, self.create_request()).await?;
        tx.commit().await?;
        Ok(accepted.operation.id)
    }

    /// The API's post-commit push of one create job (`enqueue::push_committed`).
    pub async fn push(&self, id: OperationId) -> anyhow::Result<()> {
        let jobs = [(OperationKind::Create, id)];
        ensure!(
            enqueue::push_committed(&self.pool, &self.queue, &jobs).await,
            "push failed"
        );
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_is_replaced() {
        assert_eq!(
            with_database("postgres://h@127.0.0.1:5/hangar", "b"),
            "postgres://h@127.0.0.1:5/b"
        );
        assert_eq!(
            with_database("postgres://h@127.0.0.1:5/hangar?sslmode=disable", "b"),
            "postgres://h@127.0.0.1:5/b?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h@127.0.0.1:5", "b"),
            "postgres://h@127.0.0.1:5/b"
        );
    }
}
