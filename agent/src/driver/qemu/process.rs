//! The QEMU process of a VM: spawning it so it outlives the agent, watching it end,
//! stopping it, and the QMP sequences around migration.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::files;
use super::guest::GuestError;
use super::qmp::{Qmp, QmpError};
use crate::driver::DriverError;

const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// A migration to or from a file of a few hundred MiB; generous for a busy TCG host.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
const QUIT_GRACE: Duration = Duration::from_secs(3);

/// How a new VM gets its memory.
pub enum Boot {
    Cold,
    /// `-incoming defer`, then this migration stream.
    Restore(std::path::PathBuf),
}

/// Resolves once the process has ended (then `exit` is `None`); never if it already had.
pub async fn wait_exit(exit: &mut Option<oneshot::Receiver<String>>) -> String {
    let Some(rx) = exit else {
        return std::future::pending().await;
    };
    let status = rx.await.unwrap_or_else(|_| "process watcher ended".into());
    *exit = None;
    status
}

/// Spawns QEMU in its own process group (so the agent's signals and death do not take it
/// along), with stdout and stderr in `<dir>/qemu.log`.
pub fn spawn(argv: &[String], dir: &Path) -> Result<(i32, oneshot::Receiver<String>), DriverError> {
    let log = std::fs::File::create(dir.join("qemu.log"))
        .map_err(|e| internal("creating qemu.log", e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| internal("creating qemu.log", e))?;
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .spawn()
        .map_err(|e| DriverError::Unavailable(format!("spawning {}: {e}", argv[0])))?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| DriverError::Internal("QEMU exited before its pid was read".into()))?;
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let status = match child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        let _ = tx.send(status);
    });
    Ok((pid, rx))
}

/// Watches a process that is not our child (started by an earlier agent) by polling /proc.
pub fn watch_foreign(pid: i32) -> oneshot::Receiver<String> {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tick.tick().await;
            if tx.is_closed() {
                return;
            }
            if !files::process_alive(pid) {
                let _ = tx.send(format!(
                    "process {pid} ended (not our child: status unknown)"
                ));
                return;
            }
        }
    });
    rx
}

/// `quit` over QMP if possible, SIGKILL after a grace period; waits for the exit.
pub async fn stop_process(
    pid: i32,
    qmp: Option<&mut Qmp>,
    exit: &mut Option<oneshot::Receiver<String>>,
) {
    if let Some(qmp) = qmp {
        let _ = qmp.execute("quit", None, QUIT_GRACE).await;
    }
    let Some(rx) = exit.as_mut() else { return };
    if tokio::time::timeout(QUIT_GRACE, &mut *rx).await.is_err() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = tokio::time::timeout(QUIT_GRACE, rx).await;
    }
    *exit = None;
}

/// Connects QMP and, for a restore, loads the migration stream and starts the vCPUs.
pub async fn start_machine(
    socket: &Path,
    boot: &Boot,
    deadline: Instant,
) -> Result<Qmp, DriverError> {
    let mut qmp = Qmp::connect(socket, deadline).await.map_err(qmp_error)?;
    if let Boot::Restore(memory) = boot {
        let uri = format!("file:{}", memory.display());
        qmp.execute("migrate-incoming", Some(json!({ "uri": uri })), QMP_TIMEOUT)
            .await
            .map_err(qmp_error)?;
        wait_migration(&mut qmp).await?;
        qmp.execute("cont", None, QMP_TIMEOUT)
            .await
            .map_err(qmp_error)?;
    }
    Ok(qmp)
}

/// Polls `query-migrate` until the migration (either direction) has completed.
pub async fn wait_migration(qmp: &mut Qmp) -> Result<(), DriverError> {
    let deadline = Instant::now() + MIGRATE_TIMEOUT;
    loop {
        let info = qmp
            .execute("query-migrate", None, QMP_TIMEOUT)
            .await
            .map_err(qmp_error)?;
        match info.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(()),
            Some(s @ ("failed" | "cancelled")) => {
                let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("");
                return Err(DriverError::Internal(format!("migration {s}: {why}")));
            }
            _ if Instant::now() >= deadline => return Err(DriverError::Timeout),
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// The last lines QEMU wrote, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    let tail: Vec<&str> = lines.into_iter().rev().collect();
    format!("qemu.log: {}", tail.join(" | "))
}

pub fn internal(what: &str, e: impl std::fmt::Display) -> DriverError {
    DriverError::Internal(format!("{what}: {e}"))
}

pub fn qmp_error(e: QmpError) -> DriverError {
    match e {
        QmpError::Timeout(_) => DriverError::Timeout,
        QmpError::Io(_) | QmpError::Closed => DriverError::Unavailable(e.to_string()),
        QmpError::Protocol(_) | QmpError::Command { .. } => DriverError::Internal(e.to_string()),
    }
}

pub fn guest_error(what: &str, e: GuestError) -> DriverError {
    match e {
        GuestError::Timeout => DriverError::Timeout,
        GuestError::Io(_) | GuestError::Closed => DriverError::Unavailable(format!("{what}: {e}")),
        GuestError::Protocol(_) | GuestError::Refused { .. } => {
            DriverError::Internal(format!("{what}: {e}"))
        }
    }
}
