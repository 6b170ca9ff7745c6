//! A cluster of real `hangar` processes (api, workers, agents) on a fresh database and a
//! private Redis namespace, for end-to-end and crash tests. Every child is killed on drop.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hangar_jobs::testing::TestEnv;
use serde_json::{Value, json};

pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

pub const ADMIN_KEY: &str = "hk_testadmn_0123456789abcdef0123456789abcdef";
pub const JOIN_TOKEN: &str = "test-join-token";

pub struct Cluster {
    pub env: TestEnv,
    pub api_url: String,
    pub http: reqwest::Client,
    dir: PathBuf,
    children: HashMap<String, Child>,
    /// The `/metrics` address of each spawned worker and agent, by name.
    pub metrics_addrs: HashMap<String, String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Cluster {
    /// A fresh database and Redis namespace, and the API process.
    pub async fn start() -> Cluster {
        Self::start_with(&[]).await
    }

    /// Like [`Cluster::start`], with extra environment for the API process.
    pub async fn start_with(api_env: &[(&str, &str)]) -> Cluster {
        let env = TestEnv::new().await;
        let dir =
            std::env::temp_dir().join(format!("hangar-e2e-{}", hangar_jobs::keys::random_hex(4)));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let mut cluster = Cluster {
            env,
            api_url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            dir,
            children: HashMap::new(),
            metrics_addrs: HashMap::new(),
        };
        cluster.spawn(
            "api",
            &["api", "--listen", &format!("127.0.0.1:{port}")],
            api_env,
        );
        cluster
            .wait_until("the API answers", Duration::from_secs(30), |c| {
                Box::pin(async move {
                    let health = c.http.get(format!("{}/healthz", c.api_url)).send().await;
                    health.is_ok_and(|r| r.status().is_success())
                })
            })
            .await;
        cluster
    }

    /// Spawns `hangar <args>` with the cluster's settings in its environment.
    pub fn spawn(&mut self, name: &str, args: &[&str], extra_env: &[(&str, &str)]) {
        let log = std::fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hangar"));
        // A port of its own, so parallel clusters and several workers never collide.
        let metrics = format!("127.0.0.1:{}", free_port());
        cmd.args(args)
            .env("HANGAR_WORKER_METRICS_LISTEN", &metrics)
            .env("HANGAR_AGENT_METRICS_LISTEN", &metrics)
            .env("HANGAR_DATABASE_URL", &self.env.database_url)
            .env("HANGAR_REDIS_URL", &self.env.redis_url)
            .env("HANGAR_REDIS_PREFIX", self.env.queue.prefix())
            .env("HANGAR_ADMIN_KEY", ADMIN_KEY)
            .env("HANGAR_JOIN_TOKEN", JOIN_TOKEN)
            .env("HANGAR_CONTROL_PLANE_URL", &self.api_url)
            .env("HANGAR_RECONCILE_SCHEDULE", "* * * * * *")
            .env("HANGAR_HOST_SILENT_SECS", "5")
            .env("HANGAR_LOG", "info,sqlx=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn hangar");
        self.children.insert(name.to_owned(), child);
        self.metrics_addrs.insert(name.to_owned(), metrics);
    }

    pub fn spawn_worker(&mut self, name: &str, extra_env: &[(&str, &str)]) {
        self.spawn(name, &["worker", "--worker-name", name], extra_env);
    }

    /// Starts an agent named `name` (its state folder survives restarts under that name).
    pub async fn spawn_agent(&mut self, name: &str, extra_env: &[(&str, &str)]) {
        let state = self.agent_state_dir(name);
        let listen = format!("127.0.0.1:{}", free_port());
        let args = [
            "agent",
            "--listen",
            &listen,
            "--host-name",
            name,
            "--state-dir",
            state.to_str().unwrap(),
        ];
        self.spawn(name, &args, extra_env);
        let name = name.to_owned();
        // Registered from this process: a restarted agent listens on a new address.
        let address = format!("http://{listen}");
        self.wait_until(
            "the agent registers and heartbeats",
            Duration::from_secs(30),
            |c| {
                let (name, address) = (name.clone(), address.clone());
                Box::pin(async move {
                    let hosts = c.admin_get("/v1/admin/hosts").await;
                    hosts["hosts"].as_array().is_some_and(|hs| {
                        hs.iter().any(|h| {
                            h["name"] == name.as_str()
                                && h["address"] == address.as_str()
                                && h["status"] == "healthy"
                        })
                    })
                })
            },
        )
        .await;
    }

    /// The state folder of the agent named `name`.
    pub fn agent_state_dir(&self, name: &str) -> PathBuf {
        self.dir.join(format!("state-{name}"))
    }

    /// The host tokens the agents got at registration (from their identity files).
    pub fn host_tokens(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("identity.json")).ok())
            .filter_map(|text| serde_json::from_str::<Value>(&text).ok())
            .filter_map(|identity| identity["host_token"].as_str().map(str::to_owned))
            .collect()
    }

    /// DELETEs and expects 202; returns (operation id, capsule id).
    pub async fn accepted_delete(&self, path: &str) -> (String, String) {
        let (status, body) = self.request(reqwest::Method::DELETE, path, None).await;
        assert_eq!(status, 202, "DELETE {path}: {body}");
        (
            body["operation"]["id"].as_str().unwrap().to_owned(),
            body["capsule"]["id"].as_str().unwrap().to_owned(),
        )
    }

    /// SIGKILL: no chance to clean up, like a crash.
    pub fn kill(&mut self, name: &str) {
        let mut child = self.children.remove(name).expect("no such process");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.api_url))
            .bearer_auth(ADMIN_KEY);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    pub async fn admin_get(&self, path: &str) -> Value {
        self.request(reqwest::Method::GET, path, None).await.1
    }

    /// POSTs and expects 202; returns (operation id, capsule id).
    pub async fn accepted(&self, path: &str, body: Value) -> (String, String) {
        let (status, body) = self.request(reqwest::Method::POST, path, Some(body)).await;
        assert_eq!(status, 202, "POST {path}: {body}");
        (
            body["operation"]["id"].as_str().unwrap().to_owned(),
            body["capsule"]["id"].as_str().unwrap().to_owned(),
        )
    }

    pub async fn create_capsule(&self, template: &str) -> (String, String) {
        self.accepted("/v1/capsules", json!({ "template": template }))
            .await
    }

    /// Long-polls an operation until it is terminal (the API's `?wait=`).
    pub async fn wait_operation(&self, op: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let body = self
                .admin_get(&format!("/v1/operations/{op}?wait=30"))
                .await;
            let status = body["status"].as_str().unwrap_or_default().to_owned();
            if ["succeeded", "failed", "cancelled"].contains(&status.as_str()) {
                return body;
            }
            assert!(Instant::now() < deadline, "operation {op} still {status}");
        }
    }

    pub async fn capsule(&self, id: &str) -> Value {
        self.admin_get(&format!("/v1/capsules/{id}")).await
    }

    /// Polls `check` until it holds or `limit` passes (for conditions nothing notifies).
    pub async fn wait_until<F>(&self, what: &str, limit: Duration, check: F)
    where
        F: for<'a> Fn(&'a Cluster) -> BoxFuture<'a, bool>,
    {
        let deadline = Instant::now() + limit;
        while !check(self).await {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The sandboxes an agent holds, asked over its real gRPC API.
    pub async fn sandboxes_on(&self, host_name: &str) -> Vec<String> {
        let mut conn = self.env.pool.acquire().await.unwrap();
        let hosts = hangar_jobs::store::hosts::list(&mut conn).await.unwrap();
        let host = hosts
            .into_iter()
            .find(|h| h.name == host_name)
            .expect("host registered");
        let channel = tonic::transport::Endpoint::from_shared(host.address)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let token: tonic::metadata::MetadataValue<_> =
            format!("Bearer {}", host.agent_token).parse().unwrap();
        let mut client = hangar_proto::host_agent_client::HostAgentClient::with_interceptor(
            channel,
            move |mut req: tonic::Request<()>| {
                req.metadata_mut().insert("authorization", token.clone());
                Ok(req)
            },
        );
        let list = client
            .list_sandboxes(hangar_proto::ListSandboxesRequest {})
            .await
            .unwrap()
            .into_inner();
        list.sandboxes.into_iter().map(|s| s.sandbox_id).collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for child in self.children.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // VM processes outlive their agent by design: kill those under this cluster's folder.
        hangar_agent::driver::qemu::files::kill_processes_mentioning(&self.dir);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("process logs kept in {}", self.dir.display());
        }
    }
}
