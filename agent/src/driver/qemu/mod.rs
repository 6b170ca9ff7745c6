//! The `qemu` driver: real microVMs (QEMU `microvm`, KVM when a probe boot works, TCG
//! otherwise), one owner task per VM ([`vm`]), QMP for the lifecycle ([`qmp`]), the guest
//! protocol over virtio-serial for exec ([`guest`]), everything recorded under
//! `<state_dir>/qemu` ([`files`]) so a restarted agent re-adopts its VMs.
//!
//! Creates never boot cold: an image is booted once per machine shape into a template
//! snapshot, and every create restores a copy of it (a few hundred ms instead of seconds).

pub mod argv;
pub mod files;
pub mod guest;
mod process;
pub mod qmp;
mod vm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use self::argv::{Accel, Machine, VmPaths};
use self::files::{Layout, RecordStatus, SnapshotManifest, VmFiles, VmRecord};
use self::process::Boot;
use self::vm::Vm;
use super::{
    CreateSpec, Driver, DriverError, EventSender, ExecOutput, ExecRequest, Inventory, SnapshotInfo,
    Usage, VmInfo, VmSource, VmState, now_ms,
};

/// A cold boot under TCG takes ~1.5 s alone; leave room for a busy host.
const COLD_BOOT_DEADLINE: Duration = Duration::from_secs(60);
const RESTORE_DEADLINE: Duration = Duration::from_secs(30);
/// A KVM probe boot that takes longer than this is not worth using.
const KVM_PROBE_DEADLINE: Duration = Duration::from_secs(10);

/// `--accel`: which accelerator VMs run with.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelSetting {
    /// KVM if a probe boot of the image reaches guest ready, otherwise TCG.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Debug)]
pub struct QemuConfig {
    pub state_dir: PathBuf,
    /// Holds `vmlinux`, `initramfs.cpio.gz` and `base.qcow2` (ops/build-guest-image.sh).
    pub image_dir: PathBuf,
    pub qemu: PathBuf,
    pub accel: AccelSetting,
    pub vcpus: u32,
    pub memory_mb: u32,
}

/// The files of the guest image.
struct Image {
    kernel: PathBuf,
    initrd: PathBuf,
    base: PathBuf,
}

struct Inner {
    config: QemuConfig,
    qemu_img: PathBuf,
    accel: Accel,
    layout: Layout,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
    /// Per-key async locks: a sandbox id, `snapshot:<id>` or `template:<key>`.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    events: EventSender,
}

/// Cheap to clone; clones share the VMs.
#[derive(Clone)]
pub struct QemuDriver {
    inner: Arc<Inner>,
}

impl QemuDriver {
    /// Picks the accelerator (probing KVM if asked to) and re-adopts the VMs an earlier agent
    /// left in `<state_dir>/qemu`. Must run inside a tokio runtime.
    pub async fn open(config: QemuConfig, events: EventSender) -> Result<Self, DriverError> {
        let layout = Layout::new(&config.state_dir)
            .map_err(|e| DriverError::Invalid(format!("qemu state dir: {e}")))?;
        let image_dir = std::path::absolute(&config.image_dir)
            .map_err(|e| DriverError::Invalid(format!("image dir: {e}")))?;
        let config = QemuConfig {
            image_dir,
            ..config
        };
        let qemu_img = sibling_tool(&config.qemu, "qemu-img");
        clean_staging(&layout);
        let mut driver = Self {
            inner: Arc::new(Inner {
                qemu_img,
                accel: Accel::Tcg,
                layout,
                vms: Mutex::new(HashMap::new()),
                locks: Mutex::new(HashMap::new()),
                events,
                config,
            }),
        };
        let accel = driver.choose_accel().await;
        Arc::get_mut(&mut driver.inner)
            .expect("not shared yet")
            .accel = accel;
        driver.adopt_all().await?;
        Ok(driver)
    }

    /// The accelerator VMs of this driver run with.
    pub fn accel(&self) -> Accel {
        self.inner.accel
    }

    /// The QEMU pid of a sandbox (tests and measurements use it).
    pub fn pid(&self, sandbox_id: &str) -> Option<i32> {
        self.vm(sandbox_id).ok()?.pid()
    }

    async fn adopt_all(&self) -> Result<(), DriverError> {
        let dir = self.inner.layout.vms();
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| DriverError::Internal(format!("reading {}: {e}", dir.display())))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let record = match VmRecord::load(&path) {
                Ok(Some(record)) => record,
                // The folder of a create that died before its record: nothing runs there.
                Ok(None) => {
                    let _ = files::remove_dir(&path);
                    continue;
                }
                // Refuse to start rather than orphan a VM we cannot read.
                Err(e) => {
                    return Err(DriverError::Internal(format!(
                        "reading {}: {e}",
                        path.display()
                    )));
                }
            };
            let id = record.sandbox_id.clone();
            if let Some(vm) = Vm::adopt(record, self.inner.events.clone()).await {
                self.vms().insert(id, Arc::new(vm));
            }
        }
        Ok(())
    }

    async fn choose_accel(&self) -> Accel {
        let setting = self.inner.config.accel;
        let (accel, why) = match setting {
            AccelSetting::Tcg => (Accel::Tcg, "configured".to_owned()),
            AccelSetting::Kvm => (Accel::Kvm, "configured".to_owned()),
            AccelSetting::Auto => match self.probe_kvm().await {
                Ok(took) => (
                    Accel::Kvm,
                    format!("probe boot reached guest ready in {took:?}"),
                ),
                Err(e) => (Accel::Tcg, format!("KVM not usable: {e}")),
            },
        };
        tracing::info!(accel = %accel, reason = %why, "qemu driver accelerator");
        accel
    }

    /// Boots the image once under KVM; KVM is used only if the guest gets to ready. (A
    /// `/dev/kvm` can exist and still be unusable, e.g. nested PVM.)
    async fn probe_kvm(&self) -> Result<Duration, DriverError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| DriverError::Unavailable(format!("/dev/kvm: {e}")))?;
        self.boot_once("kvm-probe", Accel::Kvm, 1, 128, KVM_PROBE_DEADLINE)
            .await
    }

    /// Boots the image cold with this driver's accelerator, waits for guest ready, and
    /// removes the VM again: how long a boot takes here (for measurements).
    pub async fn time_cold_boot(
        &self,
        vcpus: u32,
        memory_mb: u32,
    ) -> Result<Duration, DriverError> {
        let accel = self.inner.accel;
        self.boot_once("cold-boot", accel, vcpus, memory_mb, COLD_BOOT_DEADLINE)
            .await
    }

    async fn boot_once(
        &self,
        name: &str,
        accel: Accel,
        vcpus: u32,
        memory_mb: u32,
        deadline: Duration,
    ) -> Result<Duration, DriverError> {
        let image = self.image()?;
        let machine = self.machine(&image, accel, vcpus, memory_mb);
        let _guard = self.lock(format!("scratch:{name}")).await;
        let dir = self.inner.layout.root.join(name);
        kill_recorded(&dir);
        let _ = files::remove_dir(&dir);
        let started = Instant::now();
        let vm = self.boot_cold(dir, name, machine, &image, deadline).await?;
        let took = started.elapsed();
        vm.destroy().await?;
        Ok(took)
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Vm>>> {
        self.inner.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn vm(&self, sandbox_id: &str) -> Result<Arc<Vm>, DriverError> {
        self.vms()
            .get(sandbox_id)
            .cloned()
            .ok_or_else(|| DriverError::sandbox_not_found(sandbox_id))
    }

    /// Serialises work on one key (a sandbox, a snapshot, a template).
    async fn lock(&self, key: String) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut locks = self.inner.locks.lock().unwrap_or_else(|e| e.into_inner());
            // Forget locks nobody holds or waits for.
            locks.retain(|_, l| Arc::strong_count(l) > 1);
            locks.entry(key).or_default().clone()
        };
        lock.lock_owned().await
    }

    fn image(&self) -> Result<Image, DriverError> {
        let dir = &self.inner.config.image_dir;
        let image = Image {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initramfs.cpio.gz"),
            base: dir.join("base.qcow2"),
        };
        for file in [&image.kernel, &image.initrd, &image.base] {
            if !file.exists() {
                return Err(DriverError::Unavailable(format!(
                    "guest image incomplete: {} is missing (build it with ops/build-guest-image.sh)",
                    file.display()
                )));
            }
        }
        Ok(image)
    }

    fn machine(&self, image: &Image, accel: Accel, vcpus: u32, memory_mb: u32) -> Machine {
        Machine {
            accel,
            vcpus,
            memory_mb,
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
        }
    }

    fn record(&self, sandbox_id: &str, machine: Machine, dir: PathBuf, incoming: bool) -> VmRecord {
        let files = VmFiles { dir };
        let paths = VmPaths {
            disk: &files.disk(),
            qmp_socket: &files.qmp_socket(),
            agent_socket: &files.agent_socket(),
            console_log: &files.console_log(),
        };
        let argv = argv::build(&self.inner.config.qemu, &machine, &paths, incoming);
        VmRecord {
            sandbox_id: sandbox_id.to_owned(),
            status: RecordStatus::Starting,
            machine,
            files,
            pid: None,
            argv,
            created_at_ms: now_ms(),
            exit: None,
        }
    }

    /// Boots `machine` cold in `dir` on a fresh overlay of the image.
    async fn boot_cold(
        &self,
        dir: PathBuf,
        name: &str,
        machine: Machine,
        image: &Image,
        deadline: Duration,
    ) -> Result<Vm, DriverError> {
        std::fs::create_dir_all(&dir).map_err(|e| internal("creating the VM dir", e))?;
        let record = self.record(name, machine, dir.clone(), false);
        if let Err(e) =
            files::create_overlay(&self.inner.qemu_img, &image.base, &record.files.disk()).await
        {
            let _ = files::remove_dir(&dir);
            return Err(internal("creating the overlay", e));
        }
        let deadline = Instant::now() + deadline;
        Vm::launch(record, Boot::Cold, deadline, self.inner.events.clone()).await
    }

    /// The template snapshot of the image for this machine shape, built on first use by
    /// booting cold once.
    async fn template(&self, vcpus: u32, memory_mb: u32) -> Result<PathBuf, DriverError> {
        let image = self.image()?;
        let machine = self.machine(&image, self.inner.accel, vcpus, memory_mb);
        // The machine is part of the key: a restore needs the same -m, -smp and accelerator.
        let key = format!("base-{}-c{vcpus}-m{memory_mb}", machine.accel);
        let _guard = self.lock(format!("template:{key}")).await;
        let dir = self.inner.layout.template(&key);
        let stamp = files::image_stamp(&[&image.kernel, &image.initrd, &image.base])
            .map_err(|e| internal("reading the image", e))?;
        match files::read_manifest(&dir) {
            Ok(Some(m)) if m.image_stamp == stamp && m.machine == machine => return Ok(dir),
            Ok(None) => {}
            _ => {
                tracing::info!(template = %key, "image changed: rebuilding its template");
                files::remove_dir(&dir).map_err(|e| internal("removing a stale template", e))?;
            }
        }
        let started = Instant::now();
        let build_dir = dir.with_file_name(format!(".build-{key}"));
        kill_recorded(&build_dir);
        let _ = files::remove_dir(&build_dir);
        let vm = self
            .boot_cold(build_dir, &key, machine, &image, COLD_BOOT_DEADLINE)
            .await?;
        let staging = Layout::staging_for(&dir);
        let snapshot = async {
            std::fs::create_dir_all(&staging).map_err(|e| internal("creating staging", e))?;
            let mut manifest = vm.snapshot(staging.clone(), &key, false).await?;
            manifest.image_stamp = stamp;
            files::write_manifest(&staging, &manifest)
                .map_err(|e| internal("writing manifest", e))?;
            std::fs::rename(&staging, &dir).map_err(|e| internal("publishing the template", e))
        };
        let result = snapshot.await;
        if result.is_err() {
            let _ = files::remove_dir(&staging);
        }
        vm.destroy().await?;
        result?;
        tracing::info!(template = %key, took = ?started.elapsed(), "built template snapshot");
        Ok(dir)
    }

    fn check_capacity(&self, vcpus: u32, memory_mb: u32) -> Result<(), DriverError> {
        let usage = self.usage_now();
        let vcpus_free = usage.vcpus_total.saturating_sub(usage.vcpus_used);
        let memory_free = usage.memory_mb_total.saturating_sub(usage.memory_mb_used);
        if vcpus > vcpus_free || memory_mb > memory_free {
            return Err(DriverError::CapacityExhausted(format!(
                "asked for {vcpus} vcpus / {memory_mb} MiB, {vcpus_free} / {memory_free} free"
            )));
        }
        Ok(())
    }

    fn usage_now(&self) -> Usage {
        let vms = self.vms();
        let infos: Vec<VmInfo> = vms.values().map(|vm| vm.info()).collect();
        // Crashed VMs hold no resources: their process is gone.
        let live = infos.iter().filter(|vm| vm.state != VmState::Crashed);
        let (vcpus, memory) = live.fold((0u32, 0u32), |(c, m), vm| {
            (c.saturating_add(vm.vcpus), m.saturating_add(vm.memory_mb))
        });
        Usage {
            vcpus_total: self.inner.config.vcpus,
            memory_mb_total: self.inner.config.memory_mb,
            vcpus_used: vcpus,
            memory_mb_used: memory,
            sandboxes: u32::try_from(infos.len()).unwrap_or(u32::MAX),
        }
    }
}

impl Driver for QemuDriver {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn description(&self) -> String {
        format!("qemu ({})", self.inner.accel)
    }

    async fn create(&self, spec: CreateSpec) -> Result<VmInfo, DriverError> {
        if spec.vcpus == 0 || spec.memory_mb < 64 {
            return Err(DriverError::Invalid(
                "vcpus must be positive and memory_mb at least 64".to_owned(),
            ));
        }
        let _guard = self.lock(spec.sandbox_id.clone()).await;
        if let Ok(vm) = self.vm(&spec.sandbox_id) {
            return Ok(vm.info());
        }
        self.check_capacity(spec.vcpus, spec.memory_mb)?;
        let source = match &spec.source {
            VmSource::Image(_) => self.template(spec.vcpus, spec.memory_mb).await?,
            VmSource::Snapshot(id) => self.inner.layout.snapshot(id),
        };
        let manifest = files::read_manifest(&source)
            .map_err(|e| internal("reading the snapshot manifest", e))?
            .ok_or_else(|| match &spec.source {
                VmSource::Snapshot(id) => DriverError::snapshot_not_found(id),
                VmSource::Image(_) => DriverError::Internal("template vanished".into()),
            })?;
        let machine = manifest.machine;
        if (machine.vcpus, machine.memory_mb) != (spec.vcpus, spec.memory_mb) {
            return Err(DriverError::Invalid(format!(
                "the snapshot was taken with {} vcpus / {} MiB; a restore must ask for the same",
                machine.vcpus, machine.memory_mb
            )));
        }
        let dir = self.inner.layout.new_vm_dir();
        std::fs::create_dir_all(&dir).map_err(|e| internal("creating the VM dir", e))?;
        let record = self.record(&spec.sandbox_id, machine, dir.clone(), true);
        // A copy, so the snapshot stays reusable.
        if let Err(e) = files::copy_sparse(&files::disk_file(&source), &record.files.disk()).await {
            let _ = files::remove_dir(&dir);
            return Err(internal("copying the snapshot's overlay", e));
        }
        let deadline = Instant::now() + RESTORE_DEADLINE;
        let boot = Boot::Restore(files::memory_file(&source));
        let vm = Vm::launch(record, boot, deadline, self.inner.events.clone()).await?;
        let info = vm.info();
        self.vms().insert(spec.sandbox_id, Arc::new(vm));
        Ok(info)
    }

    async fn pause(&self, sandbox_id: &str) -> Result<VmInfo, DriverError> {
        self.vm(sandbox_id)?.pause().await
    }

    async fn resume(&self, sandbox_id: &str) -> Result<VmInfo, DriverError> {
        self.vm(sandbox_id)?.resume().await
    }

    async fn snapshot(
        &self,
        sandbox_id: &str,
        snapshot_id: &str,
        resume_after: bool,
    ) -> Result<SnapshotInfo, DriverError> {
        let _guard = self.lock(format!("snapshot:{snapshot_id}")).await;
        let dir = self.inner.layout.snapshot(snapshot_id);
        // Checked before the sandbox: a retried snapshot-then-destroy finds its snapshot.
        if let Some(m) = files::read_manifest(&dir).map_err(|e| internal("reading manifest", e))? {
            if m.sandbox_id != sandbox_id {
                return Err(DriverError::Invalid(format!(
                    "snapshot {snapshot_id} belongs to another sandbox"
                )));
            }
            return Ok(snapshot_info(m));
        }
        let vm = self.vm(sandbox_id)?;
        let staging = Layout::staging_for(&dir);
        let result = async {
            std::fs::create_dir_all(&staging).map_err(|e| internal("creating staging", e))?;
            let manifest = vm
                .snapshot(staging.clone(), snapshot_id, resume_after)
                .await?;
            std::fs::rename(&staging, &dir).map_err(|e| internal("publishing the snapshot", e))?;
            Ok(manifest)
        }
        .await;
        if result.is_err() {
            let _ = files::remove_dir(&staging);
        }
        result.map(snapshot_info)
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<bool, DriverError> {
        let _guard = self.lock(format!("snapshot:{snapshot_id}")).await;
        let dir = self.inner.layout.snapshot(snapshot_id);
        if !dir.exists() {
            return Ok(false);
        }
        // Restored VMs run on copies, so nothing else needs these files.
        files::remove_dir(&dir).map_err(|e| internal("removing the snapshot", e))?;
        Ok(true)
    }

    async fn destroy(&self, sandbox_id: &str) -> Result<bool, DriverError> {
        let _guard = self.lock(sandbox_id.to_owned()).await;
        let Ok(vm) = self.vm(sandbox_id) else {
            return Ok(false);
        };
        vm.destroy().await?;
        self.vms().remove(sandbox_id);
        Ok(true)
    }

    async fn list(&self) -> Result<Inventory, DriverError> {
        let sandboxes = self.vms().values().map(|vm| vm.info()).collect();
        let dir = self.inner.layout.root.join("snapshots");
        let entries = std::fs::read_dir(&dir).map_err(|e| internal("listing snapshots", e))?;
        let mut snapshot_ids: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| !name.starts_with('.'))
            .collect();
        snapshot_ids.sort();
        Ok(Inventory {
            sandboxes,
            snapshot_ids,
        })
    }

    async fn usage(&self) -> Result<Usage, DriverError> {
        Ok(self.usage_now())
    }

    async fn exec(
        &self,
        sandbox_id: &str,
        request: ExecRequest,
    ) -> Result<ExecOutput, DriverError> {
        if request.argv.is_empty() {
            return Err(DriverError::Invalid("argv must not be empty".into()));
        }
        self.vm(sandbox_id)?.exec(request).await
    }
}

fn snapshot_info(m: SnapshotManifest) -> SnapshotInfo {
    SnapshotInfo {
        snapshot_id: m.snapshot_id,
        sandbox_id: m.sandbox_id,
        size_bytes: m.size_bytes,
        created_at_ms: m.created_at_ms,
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> DriverError {
    DriverError::Internal(format!("{what}: {e}"))
}

/// `qemu-img` next to the configured QEMU binary when that is a path, else from `PATH`.
fn sibling_tool(qemu: &Path, tool: &str) -> PathBuf {
    match qemu.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && dir.join(tool).exists() => dir.join(tool),
        _ => PathBuf::from(tool),
    }
}

/// Kills the QEMU recorded in `dir` if it still runs (a probe or template build that an
/// earlier agent did not finish).
fn kill_recorded(dir: &Path) {
    if let Ok(Some(record)) = VmRecord::load(dir)
        && let Some(pid) = record.pid
        && files::process_matches(pid, &record.argv)
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Half-written snapshots and templates of an agent that died mid-way.
fn clean_staging(layout: &Layout) {
    for sub in ["snapshots", "templates"] {
        let Ok(entries) = std::fs::read_dir(layout.root.join(sub)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().starts_with(".staging-") {
                let _ = files::remove_dir(&entry.path());
            }
        }
    }
}
