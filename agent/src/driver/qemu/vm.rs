//! One VM: its QEMU process, and the owner task that serialises every lifecycle operation on
//! it (firecracker's one-action-enum-per-VMM shape) while watching the process for a crash.
//!
//! Exec does not go through the owner: it talks to the guest over its own connection, so a
//! long command does not hold up a pause or a destroy.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar_guest::protocol::{self, ErrorCode, Request, Response};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::files::{self, RecordStatus, SnapshotManifest, VmRecord};
use super::guest::{GuestConn, GuestError};
use super::process::{
    Boot, guest_error, internal, log_tail, qmp_error, spawn, start_machine, stop_process,
    wait_exit, wait_migration, watch_foreign,
};
use super::qmp::Qmp;
use crate::driver::{
    DriverError, DriverEvent, EventKind, EventSender, ExecOutput, ExecRequest, VmInfo, VmState,
    now_ms,
};

const QMP_TIMEOUT: Duration = Duration::from_secs(10);
const GUEST_CONNECT: Duration = Duration::from_secs(10);
/// Exec waits this much longer than the guest's own timeout for the guest's answer.
const EXEC_MARGIN: Duration = Duration::from_secs(5);

type Reply<T> = oneshot::Sender<Result<T, DriverError>>;

enum Command {
    Pause(Reply<()>),
    Resume(Reply<()>),
    Snapshot {
        staging: PathBuf,
        snapshot_id: String,
        resume_after: bool,
        reply: Reply<SnapshotManifest>,
    },
    Destroy(Reply<()>),
}

/// The state shared between the handle, the owner task and exec.
struct Shared {
    record: Mutex<VmRecord>,
    guest: tokio::sync::Mutex<Option<GuestConn>>,
}

impl Shared {
    fn record(&self) -> std::sync::MutexGuard<'_, VmRecord> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the record and writes it out (under the lock, so writes land in order).
    fn update(&self, change: impl FnOnce(&mut VmRecord)) -> Result<(), DriverError> {
        let mut record = self.record();
        change(&mut record);
        record
            .save()
            .map_err(|e| internal("saving the VM record", e))
    }
}

/// A handle on a VM's owner task. Dropping every handle ends the task but not QEMU.
pub struct Vm {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

impl Vm {
    /// Spawns QEMU for `record` (status `Starting`, argv and files set), connects QMP and the
    /// guest, restores memory if asked, and waits for the guest's `Ready` before `deadline`.
    /// On failure the process is killed and the VM's folder removed.
    pub async fn launch(
        mut record: VmRecord,
        boot: Boot,
        deadline: Instant,
        events: EventSender,
    ) -> Result<Self, DriverError> {
        record
            .save()
            .map_err(|e| internal("saving the VM record", e))?;
        let dir = record.files.dir.clone();
        let spawned = spawn(&record.argv, &dir);
        let (pid, exit) = match spawned {
            Ok(ok) => ok,
            Err(e) => {
                let _ = files::remove_dir(&dir);
                return Err(e);
            }
        };
        record.pid = Some(pid);
        let started = async {
            record
                .save()
                .map_err(|e| internal("saving the VM record", e))?;
            let (qmp_socket, agent_socket) =
                (record.files.qmp_socket(), record.files.agent_socket());
            // The guest connection is made right away: it waits in QEMU's socket while the
            // memory is restored, and the guest answers as soon as its vCPUs run.
            let (qmp, guest) = tokio::join!(
                start_machine(&qmp_socket, &boot, deadline),
                GuestConn::connect(&agent_socket, deadline),
            );
            let qmp = qmp?;
            let guest = guest.map_err(|e| guest_error("waiting for the guest agent", e))?;
            Ok::<_, DriverError>((qmp, guest))
        };
        let mut exit = Some(exit);
        let result = tokio::select! {
            result = started => result,
            status = wait_exit(&mut exit) => Err(DriverError::Unavailable(format!(
                "QEMU exited while starting ({status}): {}",
                log_tail(&dir.join("qemu.log")),
            ))),
        };
        let (qmp, guest) = match result {
            Ok(ok) => ok,
            Err(e) => {
                stop_process(pid, None, &mut exit).await;
                let _ = files::remove_dir(&dir);
                return Err(e);
            }
        };
        record.status = RecordStatus::Running;
        if let Err(e) = record.save() {
            stop_process(pid, None, &mut exit).await;
            let _ = files::remove_dir(&dir);
            return Err(internal("saving the VM record", e));
        }
        Ok(Self::start_owner(
            record,
            Some(qmp),
            Some(guest),
            exit,
            events,
        ))
    }

    /// Takes over a VM recorded by an earlier agent: reconnects if its process still runs,
    /// otherwise keeps it as crashed (with an event). `None` for a VM whose create never
    /// finished; it is removed.
    pub async fn adopt(mut record: VmRecord, events: EventSender) -> Option<Self> {
        let alive = record
            .pid
            .is_some_and(|pid| files::process_matches(pid, &record.argv));
        if record.status == RecordStatus::Starting {
            if let (true, Some(pid)) = (alive, record.pid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = files::remove_dir(&record.files.dir);
            tracing::info!(sandbox_id = %record.sandbox_id, "discarded a VM whose create never finished");
            return None;
        }
        if record.status == RecordStatus::Crashed {
            return Some(Self::start_owner(record, None, None, None, events));
        }
        let pid = record.pid.unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(5);
        let qmp = match alive {
            true => Qmp::connect(&record.files.qmp_socket(), deadline)
                .await
                .ok(),
            false => None,
        };
        let Some(mut qmp) = qmp else {
            if alive {
                // Running but unmanageable: it would be an orphan nobody can stop.
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let why = format!("QEMU process {pid} is gone (found at agent start)");
            record.status = RecordStatus::Crashed;
            record.exit = Some(why.clone());
            let _ = record.save();
            send_crash(&events, &record.sandbox_id, why);
            return Some(Self::start_owner(record, None, None, None, events));
        };
        // The recorded status may predate a stop or cont the old agent did not record.
        if let Ok(status) = qmp.execute("query-status", None, QMP_TIMEOUT).await {
            record.status = match status.get("running").and_then(Value::as_bool) {
                Some(true) => RecordStatus::Running,
                _ => RecordStatus::Paused,
            };
            let _ = record.save();
        }
        tracing::info!(sandbox_id = %record.sandbox_id, pid, status = ?record.status, "re-adopted VM");
        let exit = watch_foreign(pid);
        // The guest is reconnected on the first exec.
        Some(Self::start_owner(
            record,
            Some(qmp),
            None,
            Some(exit),
            events,
        ))
    }

    fn start_owner(
        record: VmRecord,
        qmp: Option<Qmp>,
        guest: Option<GuestConn>,
        exit: Option<oneshot::Receiver<String>>,
        events: EventSender,
    ) -> Self {
        let shared = Arc::new(Shared {
            record: Mutex::new(record),
            guest: tokio::sync::Mutex::new(guest),
        });
        let (tx, rx) = mpsc::channel(8);
        let owner = Owner {
            shared: shared.clone(),
            qmp,
            exit,
            rx,
            events,
        };
        tokio::spawn(owner.run());
        Self { tx, shared }
    }

    pub fn info(&self) -> VmInfo {
        let record = self.shared.record();
        VmInfo {
            sandbox_id: record.sandbox_id.clone(),
            state: state_of(record.status),
            vcpus: record.machine.vcpus,
            memory_mb: record.machine.memory_mb,
            created_at_ms: record.created_at_ms,
        }
    }

    pub fn pid(&self) -> Option<i32> {
        self.shared.record().pid
    }

    async fn ask<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, DriverError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(command(reply))
            .await
            .map_err(|_| DriverError::Unavailable("the VM is being removed".into()))?;
        answer
            .await
            .map_err(|_| DriverError::Unavailable("the VM is being removed".into()))?
    }

    pub async fn pause(&self) -> Result<VmInfo, DriverError> {
        self.ask(Command::Pause).await?;
        Ok(self.info())
    }

    pub async fn resume(&self) -> Result<VmInfo, DriverError> {
        self.ask(Command::Resume).await?;
        Ok(self.info())
    }

    /// Writes memory, disk and manifest into `staging`; the caller renames it into place.
    pub async fn snapshot(
        &self,
        staging: PathBuf,
        snapshot_id: &str,
        resume_after: bool,
    ) -> Result<SnapshotManifest, DriverError> {
        let snapshot_id = snapshot_id.to_owned();
        self.ask(|reply| Command::Snapshot {
            staging,
            snapshot_id,
            resume_after,
            reply,
        })
        .await
    }

    /// Stops QEMU and removes every file of the VM. Safe to repeat.
    pub async fn destroy(&self) -> Result<(), DriverError> {
        match self.ask(Command::Destroy).await {
            // The owner already finished a destroy and exited.
            Err(DriverError::Unavailable(_)) if self.tx.is_closed() => Ok(()),
            other => other,
        }
    }

    pub async fn exec(&self, request: ExecRequest) -> Result<ExecOutput, DriverError> {
        let (status, socket) = {
            let record = self.shared.record();
            (record.status, record.files.agent_socket())
        };
        if status != RecordStatus::Running {
            return Err(DriverError::WrongState {
                current: state_of(status),
                wanted: VmState::Running,
            });
        }
        let mut guest = self.shared.guest.lock().await;
        if guest.is_none() {
            let deadline = Instant::now() + GUEST_CONNECT;
            let conn = GuestConn::connect(&socket, deadline)
                .await
                .map_err(|e| guest_error("connecting to the guest agent", e))?;
            *guest = Some(conn);
        }
        let conn = guest.as_mut().expect("connected above");
        let deadline = Instant::now() + request.timeout + EXEC_MARGIN;
        let call = Request::Exec(protocol::ExecRequest {
            argv: request.argv,
            env: request.env,
            cwd: request.cwd,
            stdin: request.stdin,
            timeout_ms: u64::try_from(request.timeout.as_millis()).unwrap_or(u64::MAX),
            max_output_bytes: request.max_output_bytes,
        });
        match conn.call(call, deadline).await {
            Ok(Response::Exec(r)) => Ok(ExecOutput {
                stdout: r.stdout,
                stderr: r.stderr,
                exit_code: r.exit_code,
                stdout_truncated: r.stdout_truncated,
                stderr_truncated: r.stderr_truncated,
                timed_out: r.timed_out,
            }),
            Ok(other) => {
                *guest = None;
                Err(DriverError::Internal(format!(
                    "guest answered exec with {other:?}"
                )))
            }
            // As a shell reports them, so callers see one shape for "could not run".
            Err(GuestError::Refused { code, message })
                if matches!(code, ErrorCode::NotFound | ErrorCode::Denied) =>
            {
                Ok(ExecOutput {
                    stderr: message.into_bytes(),
                    exit_code: if code == ErrorCode::NotFound {
                        127
                    } else {
                        126
                    },
                    ..ExecOutput::default()
                })
            }
            Err(GuestError::Refused {
                code: ErrorCode::Invalid,
                message,
            }) => Err(DriverError::Invalid(message)),
            Err(e) => {
                // The guest may still be busy with the request: start afresh next time.
                if !matches!(e, GuestError::Refused { .. }) {
                    *guest = None;
                }
                Err(guest_error("exec", e))
            }
        }
    }
}

/// The task that owns the QMP connection of one VM.
struct Owner {
    shared: Arc<Shared>,
    qmp: Option<Qmp>,
    /// Resolves with a description of how the process ended; `None` once it has.
    exit: Option<oneshot::Receiver<String>>,
    rx: mpsc::Receiver<Command>,
    events: EventSender,
}

enum Step {
    Command(Option<Command>),
    Exited(String),
    QmpClosed,
}

impl Owner {
    async fn run(mut self) {
        loop {
            let step = tokio::select! {
                command = self.rx.recv() => Step::Command(command),
                status = wait_exit(&mut self.exit) => Step::Exited(status),
                closed = watch_qmp(&mut self.qmp) => closed,
            };
            match step {
                // Every handle is gone (the driver was dropped): QEMU keeps running.
                Step::Command(None) => return,
                Step::Command(Some(Command::Destroy(reply))) => {
                    let result = self.destroy().await;
                    let done = result.is_ok();
                    let _ = reply.send(result);
                    if done {
                        return;
                    }
                }
                Step::Command(Some(command)) => self.handle(command).await,
                Step::Exited(status) => self.crashed(status).await,
                Step::QmpClosed => self.qmp = None,
            }
        }
    }

    async fn handle(&mut self, command: Command) {
        match command {
            Command::Pause(reply) => {
                let _ = reply.send(self.set_running(false).await);
            }
            Command::Resume(reply) => {
                let _ = reply.send(self.set_running(true).await);
            }
            Command::Snapshot {
                staging,
                snapshot_id,
                resume_after,
                reply,
            } => {
                let result = self.snapshot(&staging, snapshot_id, resume_after).await;
                let _ = reply.send(result);
            }
            Command::Destroy(_) => unreachable!("handled by run"),
        }
    }

    fn status(&self) -> RecordStatus {
        self.shared.record().status
    }

    fn qmp(&mut self) -> Result<&mut Qmp, DriverError> {
        self.qmp
            .as_mut()
            .ok_or_else(|| DriverError::Unavailable("QMP connection lost".into()))
    }

    async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, DriverError> {
        let result = self.qmp()?.execute(command, args, QMP_TIMEOUT).await;
        result.map_err(qmp_error)
    }

    async fn set_running(&mut self, running: bool) -> Result<(), DriverError> {
        let (from, to, command) = match running {
            true => (RecordStatus::Paused, RecordStatus::Running, "cont"),
            false => (RecordStatus::Running, RecordStatus::Paused, "stop"),
        };
        match self.status() {
            s if s == to => return Ok(()),
            s if s == from => {}
            s => {
                return Err(DriverError::WrongState {
                    current: state_of(s),
                    wanted: state_of(from),
                });
            }
        }
        self.execute(command, None).await?;
        self.shared.update(|r| r.status = to)
    }

    async fn snapshot(
        &mut self,
        staging: &Path,
        snapshot_id: String,
        resume_after: bool,
    ) -> Result<SnapshotManifest, DriverError> {
        let status = self.status();
        if status == RecordStatus::Crashed {
            return Err(DriverError::WrongState {
                current: VmState::Crashed,
                wanted: VmState::Running,
            });
        }
        if status == RecordStatus::Running {
            self.execute("stop", None).await?;
            self.shared.update(|r| r.status = RecordStatus::Paused)?;
        }
        // The default bandwidth cap (128 MiB/s) would make a paused VM's save take seconds.
        let unlimited = json!({ "max-bandwidth": 1u64 << 40 });
        self.execute("migrate-set-parameters", Some(unlimited))
            .await?;
        let uri = format!("file:{}", files::memory_file(staging).display());
        self.execute("migrate", Some(json!({ "uri": uri }))).await?;
        wait_migration(self.qmp()?).await?;
        let (disk, mut manifest) = {
            let r = self.shared.record();
            let manifest = SnapshotManifest {
                snapshot_id,
                sandbox_id: r.sandbox_id.clone(),
                machine: r.machine.clone(),
                size_bytes: 0,
                created_at_ms: now_ms(),
                image_stamp: String::new(),
            };
            (r.files.disk(), manifest)
        };
        // The source is now `postmigrate`: its block nodes are flushed and inactive.
        files::copy_sparse(&disk, &files::disk_file(staging))
            .await
            .map_err(|e| internal("copying the overlay", e))?;
        manifest.size_bytes = files::allocated_bytes(staging);
        files::write_manifest(staging, &manifest)
            .map_err(|e| internal("writing the snapshot manifest", e))?;
        if resume_after {
            self.execute("cont", None).await?;
            self.shared.update(|r| r.status = RecordStatus::Running)?;
        }
        Ok(manifest)
    }

    async fn destroy(&mut self) -> Result<(), DriverError> {
        let pid = self.shared.record().pid;
        if let Some(pid) = pid
            && self.exit.is_some()
        {
            stop_process(pid, self.qmp.as_mut(), &mut self.exit).await;
        }
        self.qmp = None;
        *self.shared.guest.lock().await = None;
        let dir = self.shared.record().files.dir.clone();
        files::remove_dir(&dir).map_err(|e| internal("removing the VM's files", e))
    }

    async fn crashed(&mut self, status: String) {
        self.exit = None;
        self.qmp = None;
        let (sandbox_id, dir) = {
            let r = self.shared.record();
            (r.sandbox_id.clone(), r.files.dir.clone())
        };
        let message = format!(
            "QEMU exited unexpectedly: {status}; {}",
            log_tail(&dir.join("qemu.log"))
        );
        tracing::warn!(%sandbox_id, %message, "VM crashed");
        if let Err(e) = self.shared.update(|r| {
            r.status = RecordStatus::Crashed;
            r.exit = Some(message.clone());
        }) {
            tracing::error!(%sandbox_id, error = %e, "recording a crash failed");
        }
        *self.shared.guest.lock().await = None;
        send_crash(&self.events, &sandbox_id, message);
    }
}

fn send_crash(events: &EventSender, sandbox_id: &str, message: String) {
    // The receiver is gone only at shutdown; the record keeps the crash for the next start.
    let _ = events.send(DriverEvent {
        sandbox_id: sandbox_id.to_owned(),
        kind: EventKind::Crashed,
        message,
        at_ms: now_ms(),
    });
}

/// Logs QMP events as they come and turns a closed connection into a step.
async fn watch_qmp(qmp: &mut Option<Qmp>) -> Step {
    let Some(conn) = qmp else {
        return std::future::pending().await;
    };
    loop {
        match conn.next_event().await {
            Ok(event) => tracing::debug!(event = %event.name, data = %event.data, "QMP event"),
            // The process watcher reports the exit itself.
            Err(_) => return Step::QmpClosed,
        }
    }
}

fn state_of(status: RecordStatus) -> VmState {
    match status {
        RecordStatus::Starting | RecordStatus::Running => VmState::Running,
        RecordStatus::Paused => VmState::Paused,
        RecordStatus::Crashed => VmState::Crashed,
    }
}
