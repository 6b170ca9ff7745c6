//! The Hangar host agent: serves the `HostAgent` gRPC API over a VMM [`driver::Driver`],
//! registers with the control plane, heartbeats, and delivers VM events durably.

pub mod control_plane;
pub mod driver;
pub mod metrics;
mod outbox;
pub mod secret;
pub mod server;
mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::control_plane::{ControlPlaneClient, Identity, Registration, maintain_session};
pub use crate::driver::qemu::AccelSetting;
use crate::driver::qemu::{QemuConfig, QemuDriver};
use crate::driver::sim::{SimConfig, SimDriver};
use crate::driver::{Driver, DriverEvent};
use crate::metrics::{AgentMetrics, Metered};
use crate::outbox::Outbox;
use crate::secret::Secret;

/// How long background tasks get to save their state once shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DriverKind {
    Sim,
    /// Real microVMs with QEMU (KVM or TCG, see `--accel`).
    Qemu,
}

/// Flags and `HANGAR_*` variables of `hangar agent`. `Debug` redacts the join token.
#[derive(clap::Args, Clone, Debug)]
pub struct AgentConfig {
    /// Address of the gRPC server.
    #[arg(long, env = "HANGAR_AGENT_LISTEN", default_value = "127.0.0.1:7001")]
    pub listen: SocketAddr,
    /// URL workers use to reach this agent [default: http://<bound address>].
    #[arg(long, env = "HANGAR_AGENT_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    #[arg(
        long,
        env = "HANGAR_CONTROL_PLANE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub control_plane_url: String,
    /// Shared secret that lets a new host register.
    #[arg(long, env = "HANGAR_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Secret,
    /// Name the host registers under [default: host-<bound port>].
    #[arg(long, env = "HANGAR_AGENT_HOST_NAME")]
    pub host_name: Option<String>,
    /// Where identity, outbox and driver state are kept.
    #[arg(long, env = "HANGAR_AGENT_STATE_DIR", default_value = ".hangar/agent")]
    pub state_dir: PathBuf,
    #[arg(long, env = "HANGAR_AGENT_DRIVER", value_enum, default_value_t = DriverKind::Sim)]
    pub driver: DriverKind,
    #[arg(long, env = "HANGAR_AGENT_VCPUS", default_value_t = 64)]
    pub vcpus: u32,
    #[arg(long, env = "HANGAR_AGENT_MEMORY_MB", default_value_t = 262_144)]
    pub memory_mb: u32,
    /// Sim: base latency of every driver call.
    #[arg(long, env = "HANGAR_SIM_LATENCY_MS", default_value_t = 0)]
    pub sim_latency_ms: u64,
    /// Sim: up to this much random latency on top.
    #[arg(long, env = "HANGAR_SIM_JITTER_MS", default_value_t = 0)]
    pub sim_jitter_ms: u64,
    /// Sim: fraction of calls failing with UNAVAILABLE.
    #[arg(long, env = "HANGAR_SIM_ERROR_RATE", default_value_t = 0.0)]
    pub sim_error_rate: f64,
    /// Sim: fraction of calls that never answer.
    #[arg(long, env = "HANGAR_SIM_HANG_RATE", default_value_t = 0.0)]
    pub sim_hang_rate: f64,
    /// Sim: expected crashes per running VM per minute.
    #[arg(long, env = "HANGAR_SIM_CRASH_RATE", default_value_t = 0.0)]
    pub sim_crash_rate: f64,
    /// Qemu: folder of the guest image (vmlinux, initramfs.cpio.gz, base.qcow2).
    #[arg(long, env = "HANGAR_IMAGE_DIR", default_value = ".hangar/image")]
    pub image_dir: PathBuf,
    /// Qemu: the QEMU binary.
    #[arg(long, env = "HANGAR_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// Qemu: accelerator; `auto` uses KVM only when a probe boot of the image succeeds.
    #[arg(long, env = "HANGAR_AGENT_ACCEL", value_enum, default_value_t = AccelSetting::Auto)]
    pub accel: AccelSetting,
    #[arg(
        long = "heartbeat-interval-ms",
        env = "HANGAR_AGENT_HEARTBEAT_MS",
        default_value_t = 2000
    )]
    pub heartbeat_interval_ms: u64,
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Agent::bind(config).await?.run(shutdown).await
}

/// An agent whose listener is bound but which serves nothing yet; lets callers (and tests)
/// learn the real address before running it.
pub struct Agent {
    config: AgentConfig,
    listener: TcpListener,
    addr: SocketAddr,
    identity: Identity,
    metrics: AgentMetrics,
}

impl Agent {
    pub async fn bind(config: AgentConfig) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&config.state_dir)
            .with_context(|| format!("creating {}", config.state_dir.display()))?;
        let identity =
            Identity::load_or_create(&config.state_dir).context("loading identity.json")?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        Ok(Self {
            config,
            listener,
            addr,
            identity,
            metrics: AgentMetrics::default(),
        })
    }

    /// Records the driver's calls and the host's usage into `metrics` (registered nowhere
    /// by default).
    pub fn with_metrics(mut self, metrics: AgentMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The token workers must present on every gRPC call.
    pub fn agent_token(&self) -> &Secret {
        &self.identity.agent_token
    }

    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let metrics = self.metrics.clone();
        match self.config.driver {
            DriverKind::Sim => {
                let c = &self.config;
                let sim = SimConfig {
                    state_dir: c.state_dir.clone(),
                    vcpus: c.vcpus,
                    memory_mb: c.memory_mb,
                    latency_ms: c.sim_latency_ms,
                    jitter_ms: c.sim_jitter_ms,
                    error_rate: c.sim_error_rate,
                    hang_rate: c.sim_hang_rate,
                    crash_rate_per_min: c.sim_crash_rate,
                };
                let driver = SimDriver::open(sim, events_tx).context("opening the sim driver")?;
                let driver = Metered::new(driver, metrics);
                self.serve(Arc::new(driver), events_rx, shutdown).await
            }
            DriverKind::Qemu => {
                let c = &self.config;
                let qemu = QemuConfig {
                    state_dir: c.state_dir.clone(),
                    image_dir: c.image_dir.clone(),
                    qemu: c.qemu.clone(),
                    accel: c.accel,
                    vcpus: c.vcpus,
                    memory_mb: c.memory_mb,
                };
                let driver = QemuDriver::open(qemu, events_tx)
                    .await
                    .context("opening the qemu driver")?;
                let driver = Metered::new(driver, metrics);
                self.serve(Arc::new(driver), events_rx, shutdown).await
            }
        }
    }

    async fn serve<D: Driver>(
        self,
        driver: Arc<D>,
        mut events: mpsc::UnboundedReceiver<DriverEvent>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            config,
            listener,
            addr,
            mut identity,
            metrics: _,
        } = self;
        let agent_token = identity.agent_token.clone();
        let host_name = config
            .host_name
            .clone()
            .unwrap_or_else(|| format!("host-{}", addr.port()));
        let advertise = config
            .advertise_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            stop_tx.send_replace(true);
        });

        let client = ControlPlaneClient::new(&config.control_plane_url)?;
        let registration = Registration {
            join_token: config.join_token.clone(),
            name: host_name.clone(),
            address: advertise,
            driver: driver.description(),
            agent_token: identity.agent_token.clone(),
            vcpus: config.vcpus,
            memory_mb: config.memory_mb,
        };
        let (sessions_tx, mut sessions_rx) = watch::channel(None);
        let interval = Duration::from_millis(config.heartbeat_interval_ms.max(1));
        let session_task = {
            let (client, driver, state_dir) =
                (client.clone(), driver.clone(), config.state_dir.clone());
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let session = maintain_session(
                    &client,
                    &registration,
                    &mut identity,
                    &state_dir,
                    &*driver,
                    interval,
                    &sessions_tx,
                );
                tokio::select! {
                    () = session => {}
                    () = stopped(&mut stop) => {}
                }
            })
        };
        let mut outbox = Outbox::load(&config.state_dir).context("loading outbox.json")?;
        let outbox_task = {
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = outbox.deliver(&client, &mut events, &mut sessions_rx) => {}
                    () = stopped(&mut stop) => {}
                }
                // Keep what arrived while the last attempt was in flight.
                outbox.take_from(&mut events);
                outbox.save();
            })
        };

        tracing::info!(%addr, driver = driver.description(), host_name, "agent listening");
        let service = server::service(driver, host_name, &agent_token);
        let mut stop = stop_rx;
        let served = tonic::transport::Server::builder()
            // One span per call, in the caller's trace when it sent one.
            .trace_fn(|request| {
                let span = tracing::info_span!("grpc", rpc.method = %request.uri().path());
                hangar_proto::trace_context::set_parent_from_headers(&span, request.headers());
                span
            })
            .add_service(service)
            .serve_with_incoming_shutdown(
                // Without TCP_NODELAY, answers to concurrent calls wait on Nagle's algorithm
                // and the worker's delayed ACK: ~40 ms per burst.
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async move { stopped(&mut stop).await },
            )
            .await;

        let tasks = async {
            let _ = session_task.await;
            let _ = outbox_task.await;
        };
        if tokio::time::timeout(SHUTDOWN_GRACE, tasks).await.is_err() {
            tracing::warn!("background tasks did not stop in time");
        }
        served.context("gRPC server failed")
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A dropped sender also means stop.
    let _ = stop.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentConfig,
    }

    #[test]
    fn defaults_and_redacted_debug() {
        let config = Cli::try_parse_from(["agent", "--join-token", "join-secret"])
            .unwrap()
            .agent;
        assert_eq!(config.listen, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(config.control_plane_url, "http://127.0.0.1:8080");
        assert_eq!(config.state_dir, PathBuf::from(".hangar/agent"));
        assert_eq!(config.driver, DriverKind::Sim);
        assert_eq!(
            (config.vcpus, config.memory_mb, config.heartbeat_interval_ms),
            (64, 262_144, 2000)
        );
        assert_eq!(
            (config.advertise_url.as_deref(), config.host_name.as_deref()),
            (None, None)
        );
        assert!(!format!("{config:?}").contains("join-secret"));
        assert!(
            Cli::try_parse_from(["agent"]).is_err(),
            "the join token is required"
        );
        // VM tests are run with HANGAR_IMAGE_DIR set; the default matters only without it.
        if std::env::var_os("HANGAR_IMAGE_DIR").is_none() {
            assert_eq!(config.image_dir, PathBuf::from(".hangar/image"));
        }
        assert_eq!(config.qemu, PathBuf::from("qemu-system-x86_64"));
        assert_eq!(config.accel, AccelSetting::Auto);
    }

    #[test]
    fn qemu_flags() {
        let config = Cli::try_parse_from([
            "agent",
            "--join-token",
            "t",
            "--driver",
            "qemu",
            "--accel",
            "tcg",
            "--image-dir",
            "/img",
            "--qemu",
            "/opt/qemu",
        ])
        .unwrap()
        .agent;
        assert_eq!(config.driver, DriverKind::Qemu);
        assert_eq!(config.accel, AccelSetting::Tcg);
        assert_eq!(config.image_dir, PathBuf::from("/img"));
        assert_eq!(config.qemu, PathBuf::from("/opt/qemu"));
    }
}
