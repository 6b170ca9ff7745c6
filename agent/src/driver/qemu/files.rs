//! What the qemu driver keeps on disk under `<state_dir>/qemu/`, and the process checks a
//! restarted agent uses to re-adopt VMs:
//!
//! ```text
//! vms/<dir>/vm.json          one VmRecord per VM (dir is short: unix socket paths are limited)
//! vms/<dir>/disk.qcow2       its overlay; qmp.sock, agent.sock, console.log
//! snapshots/<id>/            manifest.json, mem.bin (migration stream), disk.qcow2
//! templates/<key>/           the same, for the boot-once template of an image
//! ```
//!
//! Snapshots are written into a `.staging-*` folder and renamed into place, so a snapshot
//! folder that has a manifest is whole.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::argv::Machine;
use crate::state::{read_json, write_json};

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(state_dir: &Path) -> io::Result<Self> {
        let root = std::path::absolute(state_dir.join("qemu"))?;
        for sub in ["vms", "snapshots", "templates"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        let longest = root.join("vms/v-0123456789abcdef/agent.sock");
        if longest.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "state dir {} is too long for unix socket paths",
                    root.display()
                ),
            ));
        }
        Ok(Self { root })
    }

    pub fn vms(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// A fresh, short folder name for a new VM.
    pub fn new_vm_dir(&self) -> PathBuf {
        let id = uuid::Uuid::new_v4().simple().to_string();
        self.vms().join(format!("v-{}", &id[..16]))
    }

    pub fn snapshot(&self, snapshot_id: &str) -> PathBuf {
        self.root.join("snapshots").join(snapshot_id)
    }

    pub fn template(&self, key: &str) -> PathBuf {
        self.root.join("templates").join(key)
    }

    /// A staging folder next to `final_dir` (same file system, so the rename is atomic).
    pub fn staging_for(final_dir: &Path) -> PathBuf {
        let name = final_dir.file_name().unwrap_or_default().to_string_lossy();
        let tag = uuid::Uuid::new_v4().simple().to_string();
        final_dir.with_file_name(format!(".staging-{name}-{}", &tag[..8]))
    }
}

/// The files of one VM, all in its folder.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmFiles {
    pub dir: PathBuf,
}

impl VmFiles {
    pub fn record(&self) -> PathBuf {
        self.dir.join("vm.json")
    }
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn agent_socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordStatus {
    /// Spawned but not yet answered to the caller; a restarted agent discards it.
    Starting,
    Running,
    Paused,
    Crashed,
}

/// Everything a restarted agent needs to find a VM again.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmRecord {
    pub sandbox_id: String,
    pub status: RecordStatus,
    pub machine: Machine,
    pub files: VmFiles,
    pub pid: Option<i32>,
    pub argv: Vec<String>,
    pub created_at_ms: i64,
    /// Why the VM crashed, once it has.
    pub exit: Option<String>,
}

impl VmRecord {
    pub fn save(&self) -> io::Result<()> {
        write_json(&self.files.record(), self)
    }

    pub fn load(dir: &Path) -> io::Result<Option<Self>> {
        read_json(&dir.join("vm.json"))
    }
}

/// `manifest.json` of a snapshot or template.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotManifest {
    pub snapshot_id: String,
    pub sandbox_id: String,
    pub machine: Machine,
    pub size_bytes: u64,
    pub created_at_ms: i64,
    /// For templates: which image build it came from (see [`image_stamp`]).
    #[serde(default)]
    pub image_stamp: String,
}

pub fn memory_file(dir: &Path) -> PathBuf {
    dir.join("mem.bin")
}

pub fn disk_file(dir: &Path) -> PathBuf {
    dir.join("disk.qcow2")
}

pub fn read_manifest(dir: &Path) -> io::Result<Option<SnapshotManifest>> {
    read_json(&dir.join("manifest.json"))
}

pub fn write_manifest(dir: &Path, manifest: &SnapshotManifest) -> io::Result<()> {
    write_json(&dir.join("manifest.json"), manifest)
}

/// Bytes the files of a folder take on disk (sparse files count what they hold).
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Identifies one build of the image: a rebuilt image invalidates its templates.
pub fn image_stamp(files: &[&Path]) -> io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let mut parts = Vec::new();
    for file in files {
        let meta = std::fs::metadata(file)?;
        parts.push(format!(
            "{}:{}.{}",
            meta.len(),
            meta.mtime(),
            meta.mtime_nsec()
        ));
    }
    Ok(parts.join(","))
}

/// Copies a qcow2 overlay keeping holes (and sharing blocks where the file system can).
pub async fn copy_sparse(from: &Path, to: &Path) -> io::Result<()> {
    let out = tokio::process::Command::new("cp")
        .arg("--sparse=always")
        .arg("--reflink=auto")
        .arg(from)
        .arg(to)
        .output()
        .await?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "cp {} {}: {}",
            from.display(),
            to.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A fresh qcow2 overlay on `base` (which QEMU then opens read-only).
pub async fn create_overlay(qemu_img: &Path, base: &Path, overlay: &Path) -> io::Result<()> {
    let out = tokio::process::Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(overlay)
        .output()
        .await?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "qemu-img create: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Removes a folder and everything in it; a missing folder is fine.
pub fn remove_dir(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether `pid` is a live (not zombie) process running exactly `argv`, i.e. still our QEMU
/// and not a recycled pid.
pub fn process_matches(pid: i32, argv: &[String]) -> bool {
    if !process_alive(pid) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let found: Vec<&[u8]> = cmdline
        .strip_suffix(b"\0")
        .unwrap_or(&cmdline)
        .split(|&b| b == 0)
        .collect();
    found.len() == argv.len() && found.iter().zip(argv).all(|(a, b)| *a == b.as_bytes())
}

/// True while `pid` exists and is not a zombie (a dead child nobody has reaped yet).
pub fn process_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// Live processes whose command line mentions `dir`: the VMs whose files live under it.
pub fn pids_mentioning(dir: &Path) -> Vec<i32> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| process_alive(pid))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .collect()
}

/// SIGKILLs every process [`pids_mentioning`] `dir`: tests and benchmarks clean up with it,
/// since VMs outlive the agent that started them by design.
pub fn kill_processes_mentioning(dir: &Path) {
    for pid in pids_mentioning(dir) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Resident memory of a process in KiB (`VmRSS`), for measurements.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_checks_use_proc() {
        let me = std::process::id() as i32;
        assert!(process_alive(me));
        let cmdline = std::fs::read(format!("/proc/{me}/cmdline")).unwrap();
        let argv: Vec<String> = cmdline
            .strip_suffix(b"\0")
            .unwrap()
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert!(process_matches(me, &argv));
        assert!(!process_matches(me, &argv[..argv.len() - 1]));
        assert!(!process_alive(i32::MAX));
        assert!(rss_kib(me).unwrap() > 0);
    }

    #[test]
    fn layout_rejects_long_state_dirs_and_stages_beside_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path()).unwrap();
        assert!(layout.new_vm_dir().starts_with(layout.vms()));
        let snap = layout.snapshot("tpl_1");
        assert_eq!(Layout::staging_for(&snap).parent(), snap.parent());
        let long = dir.path().join("x".repeat(100));
        assert!(Layout::new(&long).is_err());
    }
}
