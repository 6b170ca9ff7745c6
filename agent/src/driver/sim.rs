//! The simulated driver: in-memory VMs with configurable latency and injected faults, persisted
//! to `<state_dir>` (a snapshot plus a journal, see `sim_journal`) so a killed agent comes
//! back with its sandboxes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::sim_journal::{Journal, Records, Touched};
use super::{
    CreateSpec, Driver, DriverError, DriverEvent, EventKind, EventSender, ExecOutput, ExecRequest,
    Inventory, SnapshotInfo, Usage, VmInfo, VmSource, VmState, now_ms,
};

/// How often running VMs roll the dice for a crash.
const CRASH_TICK: Duration = Duration::from_millis(200);
/// A hung call sleeps this long; callers' deadlines fire well before.
const HANG: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub state_dir: PathBuf,
    pub vcpus: u32,
    pub memory_mb: u32,
    /// Every call takes `latency_ms` plus up to `jitter_ms` (uniform).
    pub latency_ms: u64,
    pub jitter_ms: u64,
    /// Fraction of calls that fail with `Unavailable`; half of them after the change was made,
    /// as when a reply is lost.
    pub error_rate: f64,
    /// Fraction of calls that never answer.
    pub hang_rate: f64,
    /// Expected crashes per running VM per minute.
    pub crash_rate_per_min: f64,
}

/// The records, which of them the change under way touched (journaled after it), and what
/// the live VMs hold (kept as VMs come and go: summing them per create made creates O(VMs)).
#[derive(Debug, Default)]
struct SimState {
    records: Records,
    touched: Vec<Touched>,
    vcpus_used: u32,
    memory_mb_used: u32,
}

impl std::ops::Deref for SimState {
    type Target = Records;
    fn deref(&self) -> &Records {
        &self.records
    }
}

impl SimState {
    fn new(records: Records) -> Self {
        let mut state = Self {
            records,
            ..Self::default()
        };
        let vms: Vec<VmInfo> = state.records.vms.values().cloned().collect();
        for vm in &vms {
            state.account(vm, true);
        }
        state
    }

    /// Adds (or takes back) what `vm` holds: crashed VMs hold nothing (their process is
    /// gone); paused ones keep their memory.
    fn account(&mut self, vm: &VmInfo, holds: bool) {
        if vm.state == VmState::Crashed {
            return;
        }
        if holds {
            self.vcpus_used = self.vcpus_used.saturating_add(vm.vcpus);
            self.memory_mb_used = self.memory_mb_used.saturating_add(vm.memory_mb);
        } else {
            self.vcpus_used = self.vcpus_used.saturating_sub(vm.vcpus);
            self.memory_mb_used = self.memory_mb_used.saturating_sub(vm.memory_mb);
        }
    }

    fn insert_vm(&mut self, vm: VmInfo) {
        self.touched.push(Touched::Vm(vm.sandbox_id.clone()));
        self.account(&vm, true);
        if let Some(old) = self.records.vms.insert(vm.sandbox_id.clone(), vm) {
            self.account(&old, false);
        }
    }

    fn remove_vm(&mut self, sandbox_id: &str) -> bool {
        self.touched.push(Touched::Vm(sandbox_id.to_owned()));
        match self.records.vms.remove(sandbox_id) {
            Some(old) => {
                self.account(&old, false);
                true
            }
            None => false,
        }
    }

    fn insert_snapshot(&mut self, snapshot: SnapshotInfo) {
        self.touched
            .push(Touched::Snapshot(snapshot.snapshot_id.clone()));
        self.records
            .snapshots
            .insert(snapshot.snapshot_id.clone(), snapshot);
    }

    fn remove_snapshot(&mut self, snapshot_id: &str) -> bool {
        self.touched.push(Touched::Snapshot(snapshot_id.to_owned()));
        self.records.snapshots.remove(snapshot_id).is_some()
    }

    fn usage(&self, config: &SimConfig) -> Usage {
        Usage {
            vcpus_total: config.vcpus,
            memory_mb_total: config.memory_mb,
            vcpus_used: self.vcpus_used,
            memory_mb_used: self.memory_mb_used,
            sandboxes: u32::try_from(self.vms.len()).unwrap_or(u32::MAX),
        }
    }

    fn vm_mut(&mut self, sandbox_id: &str) -> Result<&mut VmInfo, DriverError> {
        self.touched.push(Touched::Vm(sandbox_id.to_owned()));
        self.records
            .vms
            .get_mut(sandbox_id)
            .ok_or_else(|| DriverError::sandbox_not_found(sandbox_id))
    }
}

struct Inner {
    config: SimConfig,
    /// The journal is locked only while the state lock is held, so lines land in order.
    state: Mutex<SimState>,
    journal: Mutex<Journal>,
    events: EventSender,
}

impl Inner {
    /// Applies `op` under the lock; when it reports a change, the whole state is written out
    /// before the lock is released, so concurrent writers cannot reorder files on disk.
    fn apply<T>(
        &self,
        op: impl FnOnce(&mut SimState) -> Result<(T, bool), DriverError>,
    ) -> Result<T, DriverError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.touched.clear();
        let (out, changed) = op(&mut state)?;
        if changed {
            let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            journal
                .append(&state.records, &state.touched)
                .map_err(|e| DriverError::Internal(format!("writing the sim journal: {e}")))?;
        }
        Ok(out)
    }

    fn crash_some(&self, probability: f64) {
        let crashed = self.apply(|s| {
            let mut crashed = Vec::new();
            let mut released = Vec::new();
            for vm in s.records.vms.values_mut() {
                if vm.state == VmState::Running && rand::random_bool(probability) {
                    released.push(vm.clone());
                    vm.state = VmState::Crashed;
                    crashed.push(vm.sandbox_id.clone());
                }
            }
            for vm in &released {
                s.account(vm, false);
            }
            s.touched.extend(crashed.iter().cloned().map(Touched::Vm));
            let changed = !crashed.is_empty();
            Ok((crashed, changed))
        });
        match crashed {
            Ok(ids) => {
                for sandbox_id in ids {
                    tracing::info!(%sandbox_id, "sim: injected VM crash");
                    // The receiver only goes away at shutdown, when nobody needs the event.
                    let _ = self.events.send(DriverEvent {
                        sandbox_id,
                        kind: EventKind::Crashed,
                        message: "simulated VM crash".to_owned(),
                        at_ms: now_ms(),
                    });
                }
            }
            Err(e) => tracing::warn!(error = %e, "sim: recording injected crashes failed"),
        }
    }
}

/// In-memory VMs. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct SimDriver {
    inner: Arc<Inner>,
}

impl SimDriver {
    /// Loads `<state_dir>/sim.json` (if any) and, when a crash rate is set, starts the task that
    /// crashes VMs; that task ends when the last clone of the driver is dropped. Must be called
    /// inside a tokio runtime.
    pub fn open(config: SimConfig, events: EventSender) -> Result<Self, DriverError> {
        for (name, rate) in [
            ("error rate", config.error_rate),
            ("hang rate", config.hang_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(DriverError::Invalid(format!(
                    "sim {name} must be within 0..=1"
                )));
            }
        }
        if !(config.crash_rate_per_min >= 0.0 && config.crash_rate_per_min.is_finite()) {
            return Err(DriverError::Invalid(
                "sim crash rate must be >= 0".to_owned(),
            ));
        }
        // A corrupt file is an error, not an empty host: starting empty would orphan every VM.
        let (records, journal) = Journal::open(&config.state_dir).map_err(|e| {
            DriverError::Internal(format!(
                "loading the sim state in {}: {e}",
                config.state_dir.display()
            ))
        })?;
        let crash_rate = config.crash_rate_per_min;
        let inner = Arc::new(Inner {
            config,
            state: Mutex::new(SimState::new(records)),
            journal: Mutex::new(journal),
            events,
        });
        if crash_rate > 0.0 {
            let probability = 1.0 - (-crash_rate * CRASH_TICK.as_secs_f64() / 60.0).exp();
            tokio::spawn(crash_loop(Arc::downgrade(&inner), probability));
        }
        Ok(Self { inner })
    }

    /// One driver call: simulated latency and faults around the state change `op`.
    async fn call<T>(
        &self,
        op: impl FnOnce(&mut SimState) -> Result<(T, bool), DriverError>,
    ) -> Result<T, DriverError> {
        let config = &self.inner.config;
        let jitter = match config.jitter_ms {
            0 => 0,
            j => rand::random_range(0..=j),
        };
        let delay = Duration::from_millis(config.latency_ms.saturating_add(jitter));
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if rand::random_bool(config.hang_rate) {
            tokio::time::sleep(HANG).await;
            return Err(DriverError::Timeout);
        }
        let fail = rand::random_bool(config.error_rate);
        let fail_after = fail && rand::random_bool(0.5);
        if fail && !fail_after {
            return Err(DriverError::Unavailable("injected fault".to_owned()));
        }
        let out = self.inner.apply(op)?;
        if fail_after {
            return Err(DriverError::Unavailable(
                "injected fault after the change".to_owned(),
            ));
        }
        Ok(out)
    }
}

async fn crash_loop(inner: Weak<Inner>, probability: f64) {
    let mut interval = tokio::time::interval(CRASH_TICK);
    loop {
        interval.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        inner.crash_some(probability);
    }
}

impl Driver for SimDriver {
    fn name(&self) -> &'static str {
        "sim"
    }

    async fn create(&self, spec: CreateSpec) -> Result<VmInfo, DriverError> {
        if spec.vcpus == 0 || spec.memory_mb == 0 {
            return Err(DriverError::Invalid(
                "vcpus and memory_mb must be positive".to_owned(),
            ));
        }
        let config = &self.inner.config;
        self.call(|s| {
            if let Some(vm) = s.vms.get(&spec.sandbox_id) {
                return Ok((vm.clone(), false));
            }
            if let VmSource::Snapshot(id) = &spec.source
                && !s.snapshots.contains_key(id)
            {
                return Err(DriverError::snapshot_not_found(id));
            }
            let usage = s.usage(config);
            let vcpus_free = usage.vcpus_total.saturating_sub(usage.vcpus_used);
            let memory_free = usage.memory_mb_total.saturating_sub(usage.memory_mb_used);
            if spec.vcpus > vcpus_free || spec.memory_mb > memory_free {
                return Err(DriverError::CapacityExhausted(format!(
                    "asked for {} vcpus / {} MiB, {vcpus_free} / {memory_free} free",
                    spec.vcpus, spec.memory_mb
                )));
            }
            let vm = VmInfo {
                sandbox_id: spec.sandbox_id.clone(),
                state: VmState::Running,
                vcpus: spec.vcpus,
                memory_mb: spec.memory_mb,
                created_at_ms: now_ms(),
            };
            s.insert_vm(vm.clone());
            Ok((vm, true))
        })
        .await
    }

    async fn pause(&self, sandbox_id: &str) -> Result<VmInfo, DriverError> {
        self.call(|s| {
            let vm = s.vm_mut(sandbox_id)?;
            match vm.state {
                VmState::Paused => Ok((vm.clone(), false)),
                VmState::Running => {
                    vm.state = VmState::Paused;
                    Ok((vm.clone(), true))
                }
                current => Err(DriverError::WrongState {
                    current,
                    wanted: VmState::Running,
                }),
            }
        })
        .await
    }

    async fn resume(&self, sandbox_id: &str) -> Result<VmInfo, DriverError> {
        self.call(|s| {
            let vm = s.vm_mut(sandbox_id)?;
            match vm.state {
                VmState::Running => Ok((vm.clone(), false)),
                VmState::Paused => {
                    vm.state = VmState::Running;
                    Ok((vm.clone(), true))
                }
                current => Err(DriverError::WrongState {
                    current,
                    wanted: VmState::Paused,
                }),
            }
        })
        .await
    }

    async fn snapshot(
        &self,
        sandbox_id: &str,
        snapshot_id: &str,
        resume_after: bool,
    ) -> Result<SnapshotInfo, DriverError> {
        self.call(|s| {
            // Checked before the sandbox: a retried snapshot-then-destroy finds its snapshot.
            if let Some(snap) = s.snapshots.get(snapshot_id) {
                if snap.sandbox_id != sandbox_id {
                    return Err(DriverError::Invalid(format!(
                        "snapshot {snapshot_id} belongs to another sandbox"
                    )));
                }
                return Ok((snap.clone(), false));
            }
            let vm = s.vm_mut(sandbox_id)?;
            if vm.state == VmState::Crashed {
                return Err(DriverError::WrongState {
                    current: VmState::Crashed,
                    wanted: VmState::Running,
                });
            }
            vm.state = if resume_after {
                VmState::Running
            } else {
                VmState::Paused
            };
            let snap = SnapshotInfo {
                snapshot_id: snapshot_id.to_owned(),
                sandbox_id: sandbox_id.to_owned(),
                size_bytes: u64::from(vm.memory_mb) * 1024 * 1024,
                created_at_ms: now_ms(),
            };
            s.insert_snapshot(snap.clone());
            Ok((snap, true))
        })
        .await
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<bool, DriverError> {
        self.call(|s| {
            let existed = s.remove_snapshot(snapshot_id);
            Ok((existed, existed))
        })
        .await
    }

    async fn destroy(&self, sandbox_id: &str) -> Result<bool, DriverError> {
        self.call(|s| {
            let existed = s.remove_vm(sandbox_id);
            Ok((existed, existed))
        })
        .await
    }

    async fn list(&self) -> Result<Inventory, DriverError> {
        self.call(|s| {
            let inventory = Inventory {
                sandboxes: s.vms.values().cloned().collect(),
                snapshot_ids: s.snapshots.keys().cloned().collect(),
            };
            Ok((inventory, false))
        })
        .await
    }

    /// Exempt from injected faults: heartbeats use it, and they should report the agent's
    /// liveness, not the simulated VMM's flakiness.
    async fn usage(&self) -> Result<Usage, DriverError> {
        self.inner
            .apply(|s| Ok((s.usage(&self.inner.config), false)))
    }

    /// A simulated guest knows one program, `echo`; anything else exits 127 as a shell's
    /// "command not found" would. Enough to drive the exec path without a VM.
    async fn exec(
        &self,
        sandbox_id: &str,
        request: ExecRequest,
    ) -> Result<ExecOutput, DriverError> {
        self.call(|s| {
            let vm = s
                .vms
                .get(sandbox_id)
                .ok_or_else(|| DriverError::sandbox_not_found(sandbox_id))?;
            if vm.state != VmState::Running {
                return Err(DriverError::WrongState {
                    current: vm.state,
                    wanted: VmState::Running,
                });
            }
            let output = match request.argv.split_first() {
                Some((program, args)) if program == "echo" => {
                    let mut stdout = args.join(" ").into_bytes();
                    stdout.push(b'\n');
                    let limit = usize::try_from(request.max_output_bytes).unwrap_or(usize::MAX);
                    let truncated = stdout.len() > limit;
                    stdout.truncate(limit);
                    ExecOutput {
                        stdout,
                        stdout_truncated: truncated,
                        ..ExecOutput::default()
                    }
                }
                _ => ExecOutput {
                    stderr: b"sim: only `echo` runs in a simulated sandbox\n".to_vec(),
                    exit_code: 127,
                    ..ExecOutput::default()
                },
            };
            Ok((output, false))
        })
        .await
    }
}

#[cfg(test)]
#[path = "sim_tests.rs"]
mod tests;
