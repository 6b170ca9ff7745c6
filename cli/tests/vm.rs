//! Real microVMs (QEMU; TCG on machines without a usable KVM) through the HTTP API, across
//! real processes: api, a worker, and a host agent with the `qemu` driver.
//!
//! Needs QEMU and the guest image (`ops/build-guest-image.sh`, which `ops/test.sh` runs).
//! Without them the test says why and passes, unless `HANGAR_REQUIRE_VM=1` (CI sets it).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::Cluster;
use reqwest::Method;
use serde_json::{Value, json};

fn image_dir() -> PathBuf {
    std::env::var_os("HANGAR_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.hangar/image"))
}

/// Whether the test can run here; panics when it must (`HANGAR_REQUIRE_VM=1`) but cannot.
fn vm_available() -> bool {
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let image = ["vmlinux", "initramfs.cpio.gz", "base.qcow2"]
        .iter()
        .all(|f| image_dir().join(f).exists());
    let missing = match (qemu, image) {
        (true, true) => return true,
        (false, _) => "qemu-system-x86_64 is not installed",
        (_, false) => "the guest image is not built (bash ops/build-guest-image.sh)",
    };
    assert!(
        std::env::var("HANGAR_REQUIRE_VM").is_err(),
        "HANGAR_REQUIRE_VM is set but {missing}"
    );
    eprintln!("skipping the VM test: {missing}");
    false
}

/// The folder and QEMU pid the agent recorded for a capsule's VM (`<state>/qemu/vms/*/vm.json`).
fn vm_of(state: &Path, capsule: &str) -> Option<(PathBuf, i32)> {
    let vms = std::fs::read_dir(state.join("qemu/vms")).ok()?;
    vms.flatten().find_map(|entry| {
        let text = std::fs::read_to_string(entry.path().join("vm.json")).ok()?;
        let record: Value = serde_json::from_str(&text).ok()?;
        (record["sandbox_id"] == capsule)
            .then(|| (entry.path(), record["pid"].as_i64().unwrap_or(0) as i32))
    })
}

/// Whether `pid` is a live QEMU process of the VM in `dir`.
fn qemu_runs(pid: i32, dir: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline);
    cmdline.contains("qemu-system") && cmdline.contains(dir.to_str().unwrap())
}

async fn exec(cluster: &Cluster, capsule: &str, argv: &[&str]) -> (u16, Value) {
    cluster
        .request(
            Method::POST,
            &format!("/v1/capsules/{capsule}/exec"),
            Some(json!({ "argv": argv, "timeout_sec": 30 })),
        )
        .await
}

async fn stdout_of(cluster: &Cluster, capsule: &str, argv: &[&str]) -> String {
    let (status, body) = exec(cluster, capsule, argv).await;
    assert_eq!(status, 200, "{argv:?}: {body}");
    assert_eq!(body["exit_code"], 0, "{argv:?}: {body}");
    body["stdout"].as_str().unwrap().to_owned()
}

async fn succeeds(cluster: &Cluster, path: &str, body: Value) -> String {
    let (op, capsule) = cluster.accepted(path, body).await;
    let done = cluster.wait_operation(&op).await;
    assert_eq!(done["status"], "succeeded", "{path}: {done}");
    capsule
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capsules_are_real_vms_from_create_to_destroy() {
    if !vm_available() {
        return;
    }
    let image = image_dir().canonicalize().unwrap();
    let agent_env = [
        ("HANGAR_AGENT_DRIVER", "qemu"),
        ("HANGAR_IMAGE_DIR", image.to_str().unwrap()),
        ("HANGAR_AGENT_ACCEL", "tcg"),
    ];
    let mut cluster = Cluster::start().await;
    cluster.spawn_worker("worker", &[]);
    cluster.spawn_agent("host-1", &agent_env).await;
    let state = cluster.agent_state_dir("host-1");

    // A capsule from the base template: the agent boots the image once, snapshots it, and
    // restores that snapshot for every create.
    let first = succeeds(&cluster, "/v1/capsules", json!({ "template": "base" })).await;
    assert_eq!(cluster.capsule(&first).await["status"], "running");
    assert_eq!(
        stdout_of(&cluster, &first, &["echo", "hello"]).await,
        "hello\n"
    );
    stdout_of(
        &cluster,
        &first,
        &["sh", "-c", "echo kept > /data/f && sync"],
    )
    .await;
    // A command past its timeout is killed in the guest.
    let (status, body) = cluster
        .request(
            Method::POST,
            &format!("/v1/capsules/{first}/exec"),
            Some(json!({ "argv": ["sleep", "30"], "timeout_sec": 1 })),
        )
        .await;
    assert_eq!(
        (status, body["timed_out"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    assert!(body["duration_ms"].as_u64().unwrap() < 10_000, "{body}");

    // Paused: no exec. Resumed: the file is still there.
    succeeds(&cluster, &format!("/v1/capsules/{first}/pause"), json!({})).await;
    let (status, body) = exec(&cluster, &first, &["echo"]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("invalid_state"))
    );
    succeeds(&cluster, &format!("/v1/capsules/{first}/resume"), json!({})).await;
    assert_eq!(
        stdout_of(&cluster, &first, &["cat", "/data/f"]).await,
        "kept\n"
    );

    // Snapshot into a template; a capsule created from it sees the same file.
    succeeds(
        &cluster,
        &format!("/v1/capsules/{first}/snapshot"),
        json!({ "name": "vm-tpl", "keep": true }),
    )
    .await;
    assert_eq!(cluster.capsule(&first).await["status"], "running");
    let second = succeeds(&cluster, "/v1/capsules", json!({ "template": "vm-tpl" })).await;
    assert_eq!(
        stdout_of(&cluster, &second, &["cat", "/data/f"]).await,
        "kept\n"
    );

    // The agent dies (SIGKILL) while the VMs run; a new agent on the same state re-adopts them.
    let (first_dir, first_pid) = vm_of(&state, &first).expect("the first VM is recorded");
    let (second_dir, second_pid) = vm_of(&state, &second).expect("the second VM is recorded");
    assert!(qemu_runs(first_pid, &first_dir) && qemu_runs(second_pid, &second_dir));
    cluster.kill("host-1");
    assert!(qemu_runs(first_pid, &first_dir), "QEMU outlives its agent");
    cluster.spawn_agent("host-1", &agent_env).await;
    assert_eq!(
        stdout_of(&cluster, &first, &["echo", "back"]).await,
        "back\n"
    );
    assert_eq!(
        vm_of(&state, &first).map(|v| v.1),
        Some(first_pid),
        "the same process"
    );

    // A QEMU process killed from outside: the capsule goes to `error` with a reason.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second_pid),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    cluster
        .wait_until(
            "the crashed capsule is in error",
            Duration::from_secs(60),
            |c| {
                let second = second.clone();
                Box::pin(async move { c.capsule(&second).await["status"] == "error" })
            },
        )
        .await;
    let crashed = cluster.capsule(&second).await;
    assert!(
        crashed["status_reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "no reason recorded: {crashed}"
    );

    // Destroyed: no QEMU process and no file of theirs is left.
    for (capsule, dir, pid) in [
        (&first, &first_dir, first_pid),
        (&second, &second_dir, second_pid),
    ] {
        let (op, _) = cluster
            .accepted_delete(&format!("/v1/capsules/{capsule}"))
            .await;
        assert_eq!(cluster.wait_operation(&op).await["status"], "succeeded");
        assert_eq!(cluster.capsule(capsule).await["status"], "stopped");
        assert!(
            !qemu_runs(pid, dir),
            "the QEMU process of {capsule} is left"
        );
        assert!(
            !dir.exists(),
            "the files of {capsule} are left in {}",
            dir.display()
        );
        assert!(vm_of(&state, capsule).is_none());
    }
}
