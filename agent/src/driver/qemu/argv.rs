//! The QEMU command line of a capsule VM (see `/work/shared/VMM.md`: QEMU 10, microvm).
//!
//! A restored VM must get the same machine as the VM its snapshot came from, so everything
//! that shapes the machine (accelerator, vCPUs, memory, devices, kernel, initrd) comes from
//! [`Machine`], which snapshots record; only per-VM paths differ.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The accelerator a VM actually runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// What a snapshot pins: restoring needs exactly this machine again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The files of one VM process.
#[derive(Clone, Debug)]
pub struct VmPaths<'a> {
    pub disk: &'a Path,
    pub qmp_socket: &'a Path,
    pub agent_socket: &'a Path,
    pub console_log: &'a Path,
}

/// The full argv (program first). `incoming` adds `-incoming defer` for a restore.
pub fn build(qemu: &Path, machine: &Machine, paths: &VmPaths<'_>, incoming: bool) -> Vec<String> {
    let p = |path: &Path| path.display().to_string();
    let mut append = "console=ttyS0 reboot=t panic=-1 quiet".to_owned();
    let accel = match machine.accel {
        // microvm under TCG hangs calibrating the TSC without these two.
        Accel::Tcg => {
            append.push_str(" tsc_early_khz=2000000 no_timer_check");
            vec!["-accel".to_owned(), "tcg".to_owned()]
        }
        Accel::Kvm => ["-accel", "kvm", "-cpu", "host"]
            .map(str::to_owned)
            .to_vec(),
    };
    let mut argv = vec![p(qemu), "-M".into(), "microvm".into()];
    argv.extend(accel);
    argv.extend([
        "-m".to_owned(),
        machine.memory_mb.to_string(),
        "-smp".to_owned(),
        machine.vcpus.to_string(),
        "-nodefaults".to_owned(),
        "-no-user-config".to_owned(),
        "-display".to_owned(),
        "none".to_owned(),
        // No `-no-reboot`: under TCG a microvm often resets once before the kernel runs,
        // and with it QEMU then exits at once (measured: most cold boots).
        "-kernel".to_owned(),
        p(&machine.kernel),
        "-initrd".to_owned(),
        p(&machine.initrd),
        "-append".to_owned(),
        append,
        // A file, not stdio: QEMU must outlive the agent and its pipes.
        "-serial".to_owned(),
        format!("file:{}", p(paths.console_log)),
        "-qmp".to_owned(),
        format!("unix:{},server=on,wait=off", p(paths.qmp_socket)),
        "-drive".to_owned(),
        format!(
            "file={},format=qcow2,if=none,id=disk0,cache=writeback",
            p(paths.disk)
        ),
        "-device".to_owned(),
        "virtio-blk-device,drive=disk0".to_owned(),
        "-device".to_owned(),
        "virtio-serial-device".to_owned(),
        "-chardev".to_owned(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            p(paths.agent_socket)
        ),
        "-device".to_owned(),
        format!(
            "virtserialport,chardev=agent,name={}",
            hangar_guest::protocol::PORT_NAME
        ),
    ]);
    if incoming {
        argv.extend(["-incoming".to_owned(), "defer".to_owned()]);
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(accel: Accel) -> Machine {
        Machine {
            accel,
            vcpus: 1,
            memory_mb: 128,
            kernel: "/img/vmlinux".into(),
            initrd: "/img/initramfs.cpio.gz".into(),
        }
    }

    fn paths() -> VmPaths<'static> {
        VmPaths {
            disk: Path::new("/vm/disk.qcow2"),
            qmp_socket: Path::new("/vm/qmp.sock"),
            agent_socket: Path::new("/vm/agent.sock"),
            console_log: Path::new("/vm/console.log"),
        }
    }

    #[test]
    fn tcg_argv_matches_the_measured_command_line() {
        let argv = build(
            Path::new("qemu-system-x86_64"),
            &machine(Accel::Tcg),
            &paths(),
            false,
        );
        let line = argv.join(" ");
        assert!(line.starts_with("qemu-system-x86_64 -M microvm -accel tcg -m 128 -smp 1 "));
        assert!(line.contains(
            "-append console=ttyS0 reboot=t panic=-1 quiet tsc_early_khz=2000000 no_timer_check"
        ));
        assert!(line.contains("-qmp unix:/vm/qmp.sock,server=on,wait=off"));
        assert!(
            line.contains(
                "-drive file=/vm/disk.qcow2,format=qcow2,if=none,id=disk0,cache=writeback"
            )
        );
        assert!(line.contains("-chardev socket,id=agent,path=/vm/agent.sock,server=on,wait=off"));
        assert!(line.ends_with("-device virtserialport,chardev=agent,name=agent0"));
        // The append string is one argument.
        assert!(argv.iter().any(|a| a.starts_with("console=ttyS0 ")));
    }

    #[test]
    fn kvm_drops_the_tcg_timer_flags_and_restore_defers_incoming() {
        let argv = build(Path::new("qemu"), &machine(Accel::Kvm), &paths(), true);
        let line = argv.join(" ");
        assert!(line.contains("-accel kvm -cpu host"));
        assert!(!line.contains("tsc_early_khz"));
        assert!(line.ends_with("-incoming defer"));
        let cold = build(Path::new("qemu"), &machine(Accel::Kvm), &paths(), false);
        assert_eq!(
            &argv[..argv.len() - 2],
            &cold[..],
            "restore = same argv + -incoming"
        );
    }
}
