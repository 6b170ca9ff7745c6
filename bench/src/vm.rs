//! `vm`: real microVMs with the agent's `qemu` driver. Cold boots go through a
//! [`QemuDriver`] of their own; everything else through the agent's real gRPC server, run
//! in-process on 127.0.0.1:0 (no control plane: its registration just keeps retrying).
//!
//! Needs `qemu-system-x86_64` and the guest image (`bash ops/build-guest-image.sh`). Needs no
//! Postgres or Redis. Every QEMU it started is killed when it ends, fails or is interrupted.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser};
use hangar_agent::driver::qemu::argv::Accel;
use hangar_agent::driver::qemu::{AccelSetting, QemuConfig, QemuDriver, files};
use hangar_agent::{Agent, AgentConfig};
use hangar_proto::host_agent_client::HostAgentClient;
use hangar_proto::{
    CreateSandboxRequest, CreateSnapshotRequest, DeleteSnapshotRequest, ExecRequest, SandboxRef,
};
use tokio::sync::oneshot;
use tonic::transport::Channel;

use crate::stats::Summary;

/// Nothing listens there: the agent serves gRPC without ever registering.
const NO_CONTROL_PLANE: &str = "http://127.0.0.1:9";

#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// Folder of the guest image (vmlinux, initramfs.cpio.gz, base.qcow2).
    #[arg(long, env = "HANGAR_IMAGE_DIR", default_value = ".hangar/image")]
    pub image_dir: PathBuf,
    /// Samples per measure (exec round trips: 5 × this).
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Memory of each VM (1 vCPU).
    #[arg(long, default_value_t = 128)]
    pub memory_mb: u32,
    /// `auto` probes KVM with one boot and falls back to TCG.
    #[arg(long, value_enum, default_value_t = AccelSetting::Auto)]
    pub accel: AccelSetting,
    /// The QEMU binary (`qemu-img` is looked up beside it).
    #[arg(long, env = "HANGAR_QEMU", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
}

/// Kills every process whose command line mentions `dir`, however the benchmark ends.
struct KillGuard(PathBuf);

impl Drop for KillGuard {
    fn drop(&mut self) {
        files::kill_processes_mentioning(&self.0);
    }
}

/// The one QEMU running under `dir`.
fn only_qemu(dir: &Path) -> anyhow::Result<i32> {
    match files::pids_mentioning(dir)[..] {
        [pid] => Ok(pid),
        ref pids => anyhow::bail!("expected one QEMU under {}, found {pids:?}", dir.display()),
    }
}

#[derive(Parser)]
struct AgentCli {
    #[command(flatten)]
    agent: AgentConfig,
}

/// The agent's gRPC server, running in-process, and a client with its token.
struct InProcessAgent {
    client: HostAgentClient<Channel>,
    token: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcessAgent {
    async fn start(state_dir: &Path, args: &VmArgs, accel: Accel) -> anyhow::Result<Self> {
        let state_dir = state_dir.to_str().context("state dir is not UTF-8")?;
        let image_dir = args.image_dir.to_str().context("image dir is not UTF-8")?;
        let qemu = args.qemu.to_str().context("QEMU path is not UTF-8")?;
        let config = AgentCli::try_parse_from([
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--join-token",
            "bench-join-token",
            "--state-dir",
            state_dir,
            "--control-plane-url",
            NO_CONTROL_PLANE,
            "--driver",
            "qemu",
            // What the cold-boot driver picked: no second KVM probe.
            "--accel",
            &accel.to_string(),
            "--image-dir",
            image_dir,
            "--qemu",
            qemu,
        ])?
        .agent;
        let agent = Agent::bind(config).await?;
        let addr = agent.local_addr();
        let token = agent.agent_token().expose().to_owned();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(agent.run(async {
            let _ = stopped.await;
        }));
        let client = HostAgentClient::connect(format!("http://{addr}")).await?;
        Ok(Self {
            client,
            token,
            stop,
            task,
        })
    }

    /// `message` with the agent's bearer token.
    fn authed<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {}", self.token)
            .parse()
            .expect("a hex token is a valid header value");
        request.metadata_mut().insert("authorization", value);
        request
    }

    async fn create(&mut self, id: &str, memory_mb: u32) -> anyhow::Result<()> {
        let request = CreateSandboxRequest {
            sandbox_id: id.into(),
            vcpus: 1,
            memory_mb,
            image: "base".into(),
            snapshot_id: String::new(),
            generation: 1,
        };
        let request = self.authed(request);
        self.client
            .create_sandbox(request)
            .await
            .with_context(|| format!("create {id}"))?;
        Ok(())
    }

    /// Runs `true`; fails unless it exits 0.
    async fn exec_true(&mut self, id: &str) -> anyhow::Result<()> {
        let request = self.authed(ExecRequest {
            sandbox_id: id.into(),
            argv: vec!["true".into()],
            timeout_ms: 10_000,
            ..Default::default()
        });
        let out = self
            .client
            .exec(request)
            .await
            .with_context(|| format!("exec in {id}"))?
            .into_inner();
        anyhow::ensure!(out.exit_code == 0, "`true` exited {}", out.exit_code);
        Ok(())
    }

    async fn pause(&mut self, id: &str) -> anyhow::Result<()> {
        let request = self.authed(sandbox(id));
        self.client.pause_sandbox(request).await?;
        Ok(())
    }

    async fn resume(&mut self, id: &str) -> anyhow::Result<()> {
        let request = self.authed(sandbox(id));
        self.client.resume_sandbox(request).await?;
        Ok(())
    }

    /// Returns the snapshot's size on disk.
    async fn snapshot(&mut self, id: &str, snap: &str, resume_after: bool) -> anyhow::Result<u64> {
        let request = self.authed(CreateSnapshotRequest {
            sandbox_id: id.into(),
            snapshot_id: snap.into(),
            resume_after,
        });
        let info = self.client.create_snapshot(request).await?.into_inner();
        Ok(info.size_bytes)
    }

    async fn delete_snapshot(&mut self, snap: &str) -> anyhow::Result<()> {
        let request = self.authed(DeleteSnapshotRequest {
            snapshot_id: snap.into(),
        });
        self.client.delete_snapshot(request).await?;
        Ok(())
    }

    async fn destroy(&mut self, id: &str) -> anyhow::Result<()> {
        let request = self.authed(sandbox(id));
        self.client.destroy_sandbox(request).await?;
        Ok(())
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .context("the agent did not shut down")??
    }
}

fn sandbox(id: &str) -> SandboxRef {
    SandboxRef {
        sandbox_id: id.into(),
    }
}

/// Runs `f` and returns its output and how long it took in milliseconds.
async fn timed<T>(f: impl Future<Output = T>) -> (T, f64) {
    let started = Instant::now();
    let out = f.await;
    (out, ms(started.elapsed()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Everything measured, in milliseconds (RSS in MiB).
#[derive(Default)]
struct Samples {
    cold_boot: Vec<f64>,
    first_create: f64,
    create: Vec<f64>,
    first_exec: Vec<f64>,
    exec: Vec<f64>,
    pause: Vec<f64>,
    resume: Vec<f64>,
    snapshot_resume: Vec<f64>,
    snapshot_paused: Vec<f64>,
    snapshot_mib: f64,
    rss_restored: Vec<f64>,
    rss_after_execs: f64,
    rss_at_end: f64,
}

pub async fn run(args: &VmArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.runs > 0, "--runs must be at least 1");
    for file in ["vmlinux", "initramfs.cpio.gz", "base.qcow2"] {
        let path = args.image_dir.join(file);
        anyhow::ensure!(
            path.exists(),
            "guest image incomplete: {} is missing (bash ops/build-guest-image.sh, or --image-dir)",
            path.display()
        );
    }
    let args = VmArgs {
        image_dir: std::path::absolute(&args.image_dir)?,
        ..args.clone()
    };
    // Declared first, dropped last: the guard kills QEMU before the folder goes.
    let dir = tempfile::Builder::new()
        .prefix("hangar-bench-vm-")
        .tempdir()?;
    let _kill = KillGuard(dir.path().to_owned());

    let mut s = Samples::default();
    let accel = cold_boots(&args, &dir.path().join("cold"), &mut s).await?;
    eprintln!("accelerator: {}", accel_note(args.accel, accel));
    through_grpc(&args, &dir.path().join("agent"), accel, &mut s).await?;
    print_table(&args, accel, &s);
    Ok(())
}

/// Cold boots on a driver of their own; returns the accelerator it picked.
async fn cold_boots(args: &VmArgs, state_dir: &Path, s: &mut Samples) -> anyhow::Result<Accel> {
    let (tx, _events) = tokio::sync::mpsc::unbounded_channel();
    let config = QemuConfig {
        state_dir: state_dir.to_owned(),
        image_dir: args.image_dir.clone(),
        qemu: args.qemu.clone(),
        accel: args.accel,
        vcpus: 2,
        memory_mb: 2 * args.memory_mb,
    };
    let driver = QemuDriver::open(config, tx)
        .await
        .context("opening the qemu driver")?;
    for i in 0..args.runs {
        eprintln!("cold boot {}/{}", i + 1, args.runs);
        let took = driver.time_cold_boot(1, args.memory_mb).await?;
        s.cold_boot.push(ms(took));
    }
    Ok(driver.accel())
}

async fn through_grpc(
    args: &VmArgs,
    state_dir: &Path,
    accel: Accel,
    s: &mut Samples,
) -> anyhow::Result<()> {
    let mut agent = InProcessAgent::start(state_dir, args, accel).await?;
    let qemu_dir = state_dir.join("qemu");

    // The first create of a machine shape boots cold into the template snapshot.
    eprintln!("first create (builds the template)");
    let (created, took) = timed(agent.create("cap_0", args.memory_mb)).await;
    created?;
    s.first_create = took;
    agent.destroy("cap_0").await?;

    for i in 1..=args.runs {
        eprintln!("create from the template {i}/{}", args.runs);
        let id = format!("cap_{i}");
        let (created, took) = timed(agent.create(&id, args.memory_mb)).await;
        created?;
        s.create.push(took);
        let pid = only_qemu(&qemu_dir)?;
        s.rss_restored
            .push(mib(files::rss_kib(pid).context("reading VmRSS")?));
        let (done, took) = timed(agent.exec_true(&id)).await;
        done?;
        s.first_exec.push(took);
        agent.destroy(&id).await?;
    }

    eprintln!("exec, pause, resume, snapshot on one VM");
    let id = "cap_m";
    agent.create(id, args.memory_mb).await?;
    // The first exec after a restore is slower (measured above); leave it out here.
    agent.exec_true(id).await?;
    for _ in 0..5 * args.runs {
        let (done, took) = timed(agent.exec_true(id)).await;
        done?;
        s.exec.push(took);
    }
    let pid = only_qemu(&qemu_dir)?;
    s.rss_after_execs = mib(files::rss_kib(pid).context("reading VmRSS")?);
    for _ in 0..args.runs {
        let (done, took) = timed(agent.pause(id)).await;
        done?;
        s.pause.push(took);
        let (done, took) = timed(agent.resume(id)).await;
        done?;
        s.resume.push(took);
    }
    for i in 0..args.runs {
        let snap = format!("snap_r{i}");
        let (size, took) = timed(agent.snapshot(id, &snap, true)).await;
        s.snapshot_mib = size? as f64 / 1_048_576.0;
        s.snapshot_resume.push(took);
        agent.delete_snapshot(&snap).await?;
        // The worker's way: snapshot and leave it paused, resume later.
        let snap = format!("snap_p{i}");
        let (size, took) = timed(agent.snapshot(id, &snap, false)).await;
        size?;
        s.snapshot_paused.push(took);
        agent.resume(id).await?;
        agent.delete_snapshot(&snap).await?;
        agent.exec_true(id).await?;
    }
    s.rss_at_end = mib(files::rss_kib(only_qemu(&qemu_dir)?).context("reading VmRSS")?);
    agent.destroy(id).await?;
    agent.stop().await
}

/// The accelerator, and why when `auto` chose it.
fn accel_note(setting: AccelSetting, accel: Accel) -> String {
    match (setting, accel) {
        (AccelSetting::Auto, Accel::Tcg) => "tcg (auto: the KVM probe boot failed)".into(),
        (AccelSetting::Auto, Accel::Kvm) => "kvm (auto: the KVM probe boot succeeded)".into(),
        _ => format!("{accel} (configured)"),
    }
}

/// `p50 ≤ max: met` / `MISSED`.
fn p50_verdict(samples: &[f64], max: f64) -> String {
    match Summary::of(samples) {
        Some(s) if s.p50 <= max => format!("p50 ≤ {max}: met"),
        Some(_) => format!("p50 ≤ {max}: MISSED"),
        None => "no samples".into(),
    }
}

fn row(name: &str, unit: &str, samples: &[f64], target: &str) {
    match Summary::of(samples) {
        Some(s) => println!(
            "| {name} | {unit} | {} | **{:.1}** | {:.1} | {:.1}–{:.1} | {:.1} | {target} |",
            s.n, s.p50, s.min, s.p25, s.p75, s.max
        ),
        None => println!("| {name} | {unit} | 0 | – | – | – | – | {target} |"),
    }
}

fn print_table(args: &VmArgs, accel: Accel, s: &Samples) {
    let kernel = std::fs::read_to_string(args.image_dir.join("manifest.json"))
        .ok()
        .and_then(|m| serde_json::from_str::<serde_json::Value>(&m).ok())
        .and_then(|m| {
            let package = m["kernel_package"].as_str()?.to_owned();
            let version = m["kernel_package_version"].as_str()?;
            Some(format!("{package} {version}"))
        })
        .unwrap_or_else(|| "no manifest.json".into());
    println!();
    println!(
        "### Real VMs: qemu driver, {accel}, {} MiB, 1 vCPU",
        args.memory_mb
    );
    println!();
    println!(
        "Image `{}` (kernel: {kernel}); accelerator {}. Latencies end when the RPC answers; \
         creates answer once the guest said Ready.",
        args.image_dir.display(),
        accel_note(args.accel, accel)
    );
    println!();
    println!("| measure | unit | n | p50 | min | IQR (p25–p75) | max | target |");
    println!("|---|---|---:|---:|---:|---|---:|---|");
    let cold_target = "baseline (≈ 1,500 ms in VMM.md)";
    row(
        "cold boot → guest ready (driver)",
        "ms",
        &s.cold_boot,
        cold_target,
    );
    row(
        "first create of this shape (cold boot + template snapshot + restore)",
        "ms",
        &[s.first_create],
        "–",
    );
    row(
        "**create from the template snapshot → guest ready** (gRPC)",
        "ms",
        &s.create,
        &p50_verdict(&s.create, 400.0),
    );
    row(
        "first exec `true` after that create",
        "ms",
        &s.first_exec,
        "–",
    );
    row(
        "**exec `true` round trip** (gRPC → agent → guest)",
        "ms",
        &s.exec,
        &p50_verdict(&s.exec, 10.0),
    );
    row("pause", "ms", &s.pause, "–");
    row("resume", "ms", &s.resume, "–");
    row(
        "**snapshot**, resume_after = true",
        "ms",
        &s.snapshot_resume,
        &p50_verdict(&s.snapshot_resume, 100.0),
    );
    row(
        "snapshot, resume_after = false (left paused)",
        "ms",
        &s.snapshot_paused,
        &p50_verdict(&s.snapshot_paused, 100.0),
    );
    row(
        "host RSS of the VM right after a restore",
        "MiB",
        &s.rss_restored,
        "–",
    );
    row(
        &format!("host RSS of that VM after {} execs", 5 * args.runs),
        "MiB",
        &[s.rss_after_execs],
        "–",
    );
    row(
        &format!(
            "… and after {} pauses, {} snapshots and {} more execs",
            args.runs,
            2 * args.runs,
            args.runs
        ),
        "MiB",
        &[s.rss_at_end],
        "–",
    );
    println!();
    println!("A snapshot is {:.1} MiB on disk.", s.snapshot_mib);
}
