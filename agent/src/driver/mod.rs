//! The VMM driver interface: what the agent asks of a hypervisor backend.
//!
//! `sim` keeps VMs in memory for scale and chaos tests; a `qemu` driver (one owner task per VM,
//! QMP) implements the same trait. Every operation is idempotent, so a worker may retry any call
//! whose answer it never saw.

pub mod qemu;
pub mod sim;
mod sim_journal;

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a driver can fail with. The server maps each variant to one gRPC code, and workers
/// retry only the transient ones (`Unavailable`, `Timeout`, `CapacityExhausted`).
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("sandbox is {current}, needs to be {wanted}")]
    WrongState { current: VmState, wanted: VmState },
    #[error("driver unavailable: {0}")]
    Unavailable(String),
    #[error("driver call timed out")]
    Timeout,
    #[error("host capacity exhausted: {0}")]
    CapacityExhausted(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("internal driver error: {0}")]
    Internal(String),
}

impl DriverError {
    pub fn sandbox_not_found(id: &str) -> Self {
        Self::NotFound {
            kind: "sandbox",
            id: id.to_owned(),
        }
    }

    pub fn snapshot_not_found(id: &str) -> Self {
        Self::NotFound {
            kind: "snapshot",
            id: id.to_owned(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
    /// The VM process died or exited; kept until destroyed so the control plane can see it.
    Crashed,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Crashed => "crashed",
        })
    }
}

/// Where a new VM's memory and disk come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmSource {
    /// Boot cold from a template's base image.
    Image(String),
    /// Restore from a snapshot taken earlier on this host.
    Snapshot(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateSpec {
    pub sandbox_id: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub source: VmSource,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub sandbox_id: String,
    pub state: VmState,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub created_at_ms: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub snapshot_id: String,
    pub sandbox_id: String,
    pub size_bytes: u64,
    pub created_at_ms: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    pub sandboxes: Vec<VmInfo>,
    pub snapshot_ids: Vec<String>,
}

/// Host capacity and what the VMs on it hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub vcpus_total: u32,
    pub memory_mb_total: u32,
    pub vcpus_used: u32,
    pub memory_mb_used: u32,
    pub sandboxes: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub stdin: Vec<u8>,
    /// The guest kills the command after this long.
    pub timeout: Duration,
    /// Output past this many bytes per stream is dropped and flagged.
    pub max_output_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// 128 + the signal number when the command was killed by a signal.
    pub exit_code: i32,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// The command ran into its timeout and was killed.
    pub timed_out: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Crashed,
    Exited,
    AutoPaused,
}

/// Something that happened to a VM without anyone asking; the agent reports it to the control
/// plane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverEvent {
    pub sandbox_id: String,
    pub kind: EventKind,
    pub message: String,
    pub at_ms: i64,
}

/// The sending half drivers emit [`DriverEvent`]s on. Unbounded so a driver never blocks (or
/// drops an event) while the agent is busy delivering earlier ones.
pub type EventSender = tokio::sync::mpsc::UnboundedSender<DriverEvent>;

/// A VMM backend. All methods are idempotent (see the module docs); ids are validated by the
/// caller with [`check_id`].
pub trait Driver: Send + Sync + 'static {
    /// The driver's name ("sim", "qemu").
    fn name(&self) -> &'static str;

    /// What the host registers as its driver, for operators: the name, and what matters
    /// about how it runs (the qemu driver's accelerator).
    fn description(&self) -> String {
        self.name().to_owned()
    }

    /// Creates and starts a VM; returns the existing one if `sandbox_id` is taken.
    fn create(&self, spec: CreateSpec) -> impl Future<Output = Result<VmInfo, DriverError>> + Send;

    /// Pauses a running VM; a paused one is returned as is.
    fn pause(&self, sandbox_id: &str) -> impl Future<Output = Result<VmInfo, DriverError>> + Send;

    /// Resumes a paused VM; a running one is returned as is.
    fn resume(&self, sandbox_id: &str) -> impl Future<Output = Result<VmInfo, DriverError>> + Send;

    /// Snapshots a VM into `snapshot_id` (left paused unless `resume_after`). An existing
    /// snapshot of the same sandbox is returned, even when the sandbox is gone by now.
    fn snapshot(
        &self,
        sandbox_id: &str,
        snapshot_id: &str,
        resume_after: bool,
    ) -> impl Future<Output = Result<SnapshotInfo, DriverError>> + Send;

    /// Deletes a snapshot; `Ok(false)` when it did not exist.
    fn delete_snapshot(
        &self,
        snapshot_id: &str,
    ) -> impl Future<Output = Result<bool, DriverError>> + Send;

    /// Stops and removes a VM; `Ok(false)` when it did not exist.
    fn destroy(&self, sandbox_id: &str) -> impl Future<Output = Result<bool, DriverError>> + Send;

    fn list(&self) -> impl Future<Output = Result<Inventory, DriverError>> + Send;

    fn usage(&self) -> impl Future<Output = Result<Usage, DriverError>> + Send;

    /// Runs a command in the guest and waits for it (bounded by `request.timeout`).
    fn exec(
        &self,
        sandbox_id: &str,
        request: ExecRequest,
    ) -> impl Future<Output = Result<ExecOutput, DriverError>> + Send;
}

/// Sandbox and snapshot ids end up in file names and QMP arguments, so only a safe alphabet is
/// accepted.
pub fn check_id(kind: &str, id: &str) -> Result<(), DriverError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(DriverError::Invalid(format!(
            "{kind} id must be 1-128 characters of [A-Za-z0-9_.-], not starting with '.'"
        )))
    }
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(check_id("sandbox", "cap_01HZX-a.b").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(
                matches!(check_id("sandbox", bad), Err(DriverError::Invalid(_))),
                "{bad}"
            );
        }
    }
}
