//! Shared by the integration tests: a real agent on 127.0.0.1:0.

use std::path::Path;
use std::time::Duration;

use clap::Parser;
use hangar_agent::{Agent, AgentConfig};
use hangar_proto::host_agent_client::HostAgentClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    agent: AgentConfig,
}

/// Parses real flags, so the tests also cover the flag names.
pub fn config(state_dir: &Path, control_plane_url: &str, extra: &[&str]) -> AgentConfig {
    let mut args = vec![
        "agent",
        "--listen",
        "127.0.0.1:0",
        "--join-token",
        "join-secret",
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--control-plane-url",
        control_plane_url,
        "--heartbeat-interval-ms",
        "50",
    ];
    args.extend_from_slice(extra);
    Cli::parse_from(args).agent
}

pub struct TestAgent {
    pub addr: std::net::SocketAddr,
    pub token: String,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl TestAgent {
    pub async fn start(config: AgentConfig) -> Self {
        let agent = Agent::bind(config).await.unwrap();
        let addr = agent.local_addr();
        let token = agent.agent_token().expose().to_owned();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(agent.run(async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            token,
            stop,
            task,
        }
    }

    pub async fn client(&self) -> HostAgentClient<Channel> {
        HostAgentClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap()
    }

    /// `message` with this agent's token attached.
    pub fn authed<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {}", self.token).parse().unwrap();
        request.metadata_mut().insert("authorization", value);
        request
    }

    pub async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("agent did not shut down")
            .unwrap()
            .unwrap();
    }
}
