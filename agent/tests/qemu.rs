//! The qemu driver on real VMs (TCG), mostly through the agent's real gRPC server.
//!
//! Needs `qemu-system-x86_64` and the guest image (`bash ops/build-guest-image.sh`, in
//! `$HANGAR_IMAGE_DIR` or `<repo>/.hangar/image`). Without them each test says why and
//! passes, unless `HANGAR_REQUIRE_VM=1`. VM tests run one at a time (2-core machines): they
//! share one lock.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{TestAgent, config};
use hangar_agent::driver::qemu::{AccelSetting, QemuConfig, QemuDriver, files};
use hangar_agent::driver::{CreateSpec, Driver, EventKind, ExecRequest, VmSource, VmState};
use hangar_proto::host_agent_client::HostAgentClient;
use hangar_proto::{
    CreateSandboxRequest, CreateSnapshotRequest, DeleteSnapshotRequest, ExecRequest as ExecRpc,
    ListSandboxesRequest, SandboxRef, SandboxState,
};
use tonic::Code;
use tonic::transport::Channel;

const NO_CONTROL_PLANE: &str = "http://127.0.0.1:9";

static VM_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct VmEnv {
    image_dir: PathBuf,
}

/// The image and QEMU, or `None` (after saying why) when a VM cannot run here.
fn vm_env() -> Option<VmEnv> {
    // The agent's logs (RUST_LOG=hangar_agent=debug) explain an internal error.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let image_dir = std::env::var_os("HANGAR_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.hangar/image"));
    let missing: Vec<String> = ["vmlinux", "initramfs.cpio.gz", "base.qcow2"]
        .iter()
        .map(|f| image_dir.join(f))
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    let qemu_ok = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let why = match (qemu_ok, missing.is_empty()) {
        (true, true) => return Some(VmEnv { image_dir }),
        (false, _) => "qemu-system-x86_64 is not installed".to_owned(),
        (true, false) => format!("guest image missing: {}", missing.join(", ")),
    };
    if std::env::var("HANGAR_REQUIRE_VM").is_ok_and(|v| v == "1") {
        panic!("HANGAR_REQUIRE_VM=1 but {why}");
    }
    eprintln!("skipping VM test: {why}");
    None
}

/// Kills every process whose command line mentions the state dir, even when a test fails.
struct KillGuard(PathBuf);

impl Drop for KillGuard {
    fn drop(&mut self) {
        files::kill_processes_mentioning(&self.0);
    }
}

/// QEMU processes (not zombies) whose argv mentions `dir`.
fn qemu_pids(dir: &Path) -> Vec<i32> {
    files::pids_mentioning(dir)
}

fn qemu_args(env: &VmEnv) -> Vec<String> {
    ["--driver", "qemu", "--accel", "tcg", "--image-dir"]
        .iter()
        .map(|s| s.to_string())
        .chain([env.image_dir.display().to_string()])
        .collect()
}

fn create_from_image(id: &str) -> CreateSandboxRequest {
    CreateSandboxRequest {
        sandbox_id: id.into(),
        vcpus: 1,
        memory_mb: 128,
        image: "base".into(),
        snapshot_id: String::new(),
        generation: 1,
    }
}

fn sandbox(id: &str) -> SandboxRef {
    SandboxRef {
        sandbox_id: id.into(),
    }
}

fn exec_rpc(id: &str, argv: &[&str]) -> ExecRpc {
    ExecRpc {
        sandbox_id: id.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout_ms: 10_000,
        ..Default::default()
    }
}

/// Runs `argv` in `id` and returns (stdout, exit code).
async fn exec(
    agent: &TestAgent,
    c: &mut HostAgentClient<Channel>,
    id: &str,
    argv: &[&str],
) -> (String, i32) {
    let out = c
        .exec(agent.authed(exec_rpc(id, argv)))
        .await
        .unwrap_or_else(|e| panic!("exec {argv:?} in {id}: {e}"))
        .into_inner();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.exit_code,
    )
}

#[tokio::test]
async fn lifecycle_snapshot_and_restore_through_grpc() {
    let Some(env) = vm_env() else { return };
    let _serial = VM_LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _kill = KillGuard(dir.path().to_owned());
    let args = qemu_args(&env);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = TestAgent::start(config(dir.path(), NO_CONTROL_PLANE, &args)).await;
    let mut c = agent.client().await;

    let started = Instant::now();
    let a = c
        .create_sandbox(agent.authed(create_from_image("cap_a")))
        .await
        .unwrap()
        .into_inner();
    eprintln!(
        "first create (template build + restore): {:?}",
        started.elapsed()
    );
    assert_eq!(a.state(), SandboxState::Running);
    assert_eq!((a.vcpus, a.memory_mb), (1, 128));
    let again = c
        .create_sandbox(agent.authed(create_from_image("cap_a")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, a, "create is idempotent");

    assert_eq!(
        exec(&agent, &mut c, "cap_a", &["echo", "hello"]).await,
        ("hello\n".into(), 0)
    );
    let write = ["sh", "-c", "echo x > /data/f"];
    assert_eq!(exec(&agent, &mut c, "cap_a", &write).await.1, 0);
    let missing = exec(&agent, &mut c, "cap_a", &["no-such-program"]).await;
    assert_eq!(missing.1, 127);

    for _ in 0..2 {
        let paused = c
            .pause_sandbox(agent.authed(sandbox("cap_a")))
            .await
            .unwrap();
        assert_eq!(paused.into_inner().state(), SandboxState::Paused);
    }
    let err = c
        .exec(agent.authed(exec_rpc("cap_a", &["true"])))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::FailedPrecondition,
        "exec needs a running VM"
    );
    for _ in 0..2 {
        let resumed = c
            .resume_sandbox(agent.authed(sandbox("cap_a")))
            .await
            .unwrap();
        assert_eq!(resumed.into_inner().state(), SandboxState::Running);
    }
    assert_eq!(
        exec(&agent, &mut c, "cap_a", &["cat", "/data/f"]).await,
        ("x\n".into(), 0)
    );

    let snap = CreateSnapshotRequest {
        sandbox_id: "cap_a".into(),
        snapshot_id: "tpl_1".into(),
        resume_after: true,
    };
    let first = c
        .create_snapshot(agent.authed(snap.clone()))
        .await
        .unwrap()
        .into_inner();
    let second = c
        .create_snapshot(agent.authed(snap))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first, second, "snapshot is idempotent");
    assert!(first.size_bytes > 0);
    assert_eq!(
        exec(&agent, &mut c, "cap_a", &["cat", "/data/f"]).await.1,
        0
    );

    let from_snapshot = CreateSandboxRequest {
        sandbox_id: "cap_b".into(),
        snapshot_id: "tpl_1".into(),
        image: String::new(),
        ..create_from_image("cap_b")
    };
    c.create_sandbox(agent.authed(from_snapshot)).await.unwrap();
    assert_eq!(
        exec(&agent, &mut c, "cap_b", &["cat", "/data/f"]).await,
        ("x\n".into(), 0)
    );
    // The two VMs are independent from here on.
    assert_eq!(
        exec(&agent, &mut c, "cap_b", &["sh", "-c", "echo y > /data/f"])
            .await
            .1,
        0
    );
    assert_eq!(
        exec(&agent, &mut c, "cap_a", &["cat", "/data/f"]).await.0,
        "x\n"
    );
    // The worker's way: snapshot and leave it paused; it resumes from there later.
    let paused_snap = CreateSnapshotRequest {
        sandbox_id: "cap_b".into(),
        snapshot_id: "tpl_2".into(),
        resume_after: false,
    };
    c.create_snapshot(agent.authed(paused_snap)).await.unwrap();
    let listed = c
        .list_sandboxes(agent.authed(ListSandboxesRequest {}))
        .await
        .unwrap();
    let b = listed
        .into_inner()
        .sandboxes
        .into_iter()
        .find(|s| s.sandbox_id == "cap_b");
    assert_eq!(b.unwrap().state(), SandboxState::Paused);
    c.resume_sandbox(agent.authed(sandbox("cap_b")))
        .await
        .unwrap();
    assert_eq!(
        exec(&agent, &mut c, "cap_b", &["cat", "/data/f"]).await.0,
        "y\n"
    );
    let deleted = DeleteSnapshotRequest {
        snapshot_id: "tpl_2".into(),
    };
    assert!(
        c.delete_snapshot(agent.authed(deleted))
            .await
            .unwrap()
            .into_inner()
            .existed
    );

    let listed = c
        .list_sandboxes(agent.authed(ListSandboxesRequest {}))
        .await
        .unwrap();
    let listed = listed.into_inner();
    assert_eq!(listed.sandboxes.len(), 2);
    assert_eq!(listed.snapshot_ids, vec!["tpl_1".to_owned()]);

    for id in ["cap_a", "cap_b", "cap_a"] {
        c.destroy_sandbox(agent.authed(sandbox(id))).await.unwrap();
    }
    let deleted = DeleteSnapshotRequest {
        snapshot_id: "tpl_1".into(),
    };
    assert!(
        c.delete_snapshot(agent.authed(deleted))
            .await
            .unwrap()
            .into_inner()
            .existed
    );
    let listed = c
        .list_sandboxes(agent.authed(ListSandboxesRequest {}))
        .await
        .unwrap();
    assert!(listed.into_inner().sandboxes.is_empty());
    assert_eq!(qemu_pids(dir.path()), Vec::<i32>::new(), "no QEMU left");
    for sub in ["vms", "snapshots"] {
        let left: Vec<_> = std::fs::read_dir(dir.path().join("qemu").join(sub))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{sub} still holds {left:?}");
    }
    agent.stop().await;
}

/// Phase one runs on its own runtime, which is then shut down: every task of that agent
/// (server, owner tasks, connections) vanishes at once, as in a killed process.
#[test]
fn a_restarted_agent_re_adopts_running_vms() {
    let Some(env) = vm_env() else { return };
    let _serial = VM_LOCK.blocking_lock();
    let dir = tempfile::tempdir().unwrap();
    let _kill = KillGuard(dir.path().to_owned());
    let args = qemu_args(&env);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };

    let first = runtime();
    let pid = first.block_on(async {
        let agent = TestAgent::start(config(dir.path(), NO_CONTROL_PLANE, &args)).await;
        let mut c = agent.client().await;
        c.create_sandbox(agent.authed(create_from_image("cap_r")))
            .await
            .unwrap();
        let write = ["sh", "-c", "echo kept > /data/f"];
        assert_eq!(exec(&agent, &mut c, "cap_r", &write).await.1, 0);
        let pids = qemu_pids(dir.path());
        assert_eq!(pids.len(), 1);
        c.create_sandbox(agent.authed(create_from_image("cap_d")))
            .await
            .unwrap();
        pids[0]
    });
    first.shutdown_background();
    std::thread::sleep(Duration::from_millis(200));
    assert!(files::process_alive(pid), "QEMU must outlive the agent");
    // cap_d dies while no agent runs.
    let doomed: Vec<i32> = qemu_pids(dir.path())
        .into_iter()
        .filter(|&p| p != pid)
        .collect();
    assert_eq!(doomed.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(doomed[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while files::process_alive(doomed[0]) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }

    let second = runtime();
    second.block_on(async {
        let agent = TestAgent::start(config(dir.path(), NO_CONTROL_PLANE, &args)).await;
        let mut c = agent.client().await;
        let listed = c
            .list_sandboxes(agent.authed(ListSandboxesRequest {}))
            .await
            .unwrap();
        let mut listed = listed.into_inner().sandboxes;
        listed.sort_by(|a, b| a.sandbox_id.cmp(&b.sandbox_id));
        let states: Vec<_> = listed
            .iter()
            .map(|s| (s.sandbox_id.as_str(), s.state()))
            .collect();
        assert_eq!(
            states,
            [
                ("cap_d", SandboxState::Crashed),
                ("cap_r", SandboxState::Running)
            ]
        );
        assert_eq!(
            exec(&agent, &mut c, "cap_r", &["cat", "/data/f"]).await,
            ("kept\n".into(), 0)
        );
        assert_eq!(
            qemu_pids(dir.path()),
            vec![pid],
            "the same process, re-adopted"
        );
        c.pause_sandbox(agent.authed(sandbox("cap_r")))
            .await
            .unwrap();
        c.resume_sandbox(agent.authed(sandbox("cap_r")))
            .await
            .unwrap();
        for id in ["cap_r", "cap_d"] {
            c.destroy_sandbox(agent.authed(sandbox(id))).await.unwrap();
        }
        assert!(qemu_pids(dir.path()).is_empty());
        let left = std::fs::read_dir(dir.path().join("qemu/vms"))
            .unwrap()
            .count();
        assert_eq!(left, 0, "no VM files left");
        agent.stop().await;
    });
}

async fn open_driver(
    env: &VmEnv,
    state_dir: &Path,
) -> (
    QemuDriver,
    tokio::sync::mpsc::UnboundedReceiver<hangar_agent::driver::DriverEvent>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let config = QemuConfig {
        state_dir: state_dir.to_owned(),
        image_dir: env.image_dir.clone(),
        qemu: "qemu-system-x86_64".into(),
        accel: AccelSetting::Tcg,
        vcpus: 2,
        memory_mb: 1024,
    };
    (QemuDriver::open(config, tx).await.unwrap(), rx)
}

fn spec(id: &str) -> CreateSpec {
    CreateSpec {
        sandbox_id: id.into(),
        vcpus: 1,
        memory_mb: 128,
        source: VmSource::Image("base".into()),
    }
}

#[tokio::test]
async fn a_killed_qemu_is_reported_as_crashed() {
    let Some(env) = vm_env() else { return };
    let _serial = VM_LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _kill = KillGuard(dir.path().to_owned());
    let (driver, mut events) = open_driver(&env, dir.path()).await;

    driver.create(spec("cap_c")).await.unwrap();
    let pid = driver.pid("cap_c").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("no crash event")
        .unwrap();
    assert_eq!(
        (event.sandbox_id.as_str(), event.kind),
        ("cap_c", EventKind::Crashed)
    );
    assert!(event.message.contains("SIGKILL"), "{}", event.message);
    let listed = driver.list().await.unwrap();
    assert_eq!(listed.sandboxes[0].state, VmState::Crashed);
    let usage = driver.usage().await.unwrap();
    assert_eq!((usage.sandboxes, usage.vcpus_used), (1, 0));
    let exec = ExecRequest {
        argv: vec!["true".into()],
        timeout: Duration::from_secs(5),
        ..Default::default()
    };
    assert!(driver.exec("cap_c", exec).await.is_err());
    drop(driver);

    // A restarted driver still reports it crashed, without a second event.
    let (driver, mut events) = open_driver(&env, dir.path()).await;
    assert_eq!(
        driver.list().await.unwrap().sandboxes[0].state,
        VmState::Crashed
    );
    assert!(events.try_recv().is_err());
    assert!(driver.destroy("cap_c").await.unwrap());
    assert!(!driver.destroy("cap_c").await.unwrap());
    assert!(driver.list().await.unwrap().sandboxes.is_empty());
}

/// `auto` must never pick an accelerator whose probe boot fails (here `/dev/kvm` is a nested
/// PVM that cannot run Debian's kernel, so this host gets TCG).
#[tokio::test]
async fn auto_accel_probes_kvm_and_falls_back() {
    let Some(env) = vm_env() else { return };
    let _serial = VM_LOCK.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let _kill = KillGuard(dir.path().to_owned());
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let config = QemuConfig {
        state_dir: dir.path().to_owned(),
        image_dir: env.image_dir.clone(),
        qemu: "qemu-system-x86_64".into(),
        accel: AccelSetting::Auto,
        vcpus: 2,
        memory_mb: 1024,
    };
    let started = Instant::now();
    let driver = QemuDriver::open(config, tx).await.unwrap();
    eprintln!("auto picked {} in {:?}", driver.accel(), started.elapsed());
    assert!(qemu_pids(dir.path()).is_empty(), "the probe VM is gone");
    let probe_left = dir.path().join("qemu/kvm-probe");
    assert!(!probe_left.exists() || std::fs::read_dir(&probe_left).unwrap().count() == 0);
}
